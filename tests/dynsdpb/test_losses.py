"""The distillation term and the weighting rules against numbers computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from trl_selfdistill.dynsdpb.losses import distillation_loss_sum, temperature_kl
from trl_selfdistill.dynsdpb.schedule import (
    DISTILL_MODES,
    SampleStatistics,
    constant_weights,
    dynamic_weights,
    teacher_statistics,
)

# Two re-used samples, vocabulary of 3: sample 0 has two response tokens, sample 1 one.
TEACHER = [[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [0.0, 1.0, 3.0]]
STUDENT = [[1.0, 0.5, 0.0], [0.0, 1.0, 0.0], [0.2, 0.1, 2.0]]
LABELS = [0, 1, 2]
SAMPLE_IDS = [0, 0, 1]
ALPHA, TEMPERATURE = 0.7, 3.0


def softmax(z: list[float], t: float = 1.0) -> list[float]:
    exps = [math.exp(v / t) for v in z]
    return [e / sum(exps) for e in exps]


def by_hand(mode: str) -> dict[str, list[float]]:
    """u_i, d_i, alpha_i, T_i, the weighted per-token KL terms and d(loss)/d(student) with plain `math`."""
    uncertainty, discrimination = [], []
    for sample in (0, 1):
        tokens = [j for j, s in enumerate(SAMPLE_IDS) if s == sample]
        probs = [softmax(TEACHER[j]) for j in tokens]
        uncertainty.append(sum(-sum(p * math.log(p) for p in ps) / math.log(3) for ps in probs) / len(tokens))
        discrimination.append(sum(ps[LABELS[j]] for ps, j in zip(probs, tokens, strict=True)) / len(tokens))
    if mode == "dynamic":
        alphas = [ALPHA * d * (1 - u) for u, d in zip(uncertainty, discrimination, strict=True)]
        temperatures = [TEMPERATURE * (1 + u) for u in uncertainty]
    else:
        alphas, temperatures = [ALPHA, ALPHA], [TEMPERATURE, TEMPERATURE]
    terms, grads = [], []
    for j, sample in enumerate(SAMPLE_IDS):
        a, t = alphas[sample], temperatures[sample]
        p_t, p_s = softmax(TEACHER[j], t), softmax(STUDENT[j], t)
        terms.append(a * t**2 * sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s, strict=True)))
        grads.append([a * t**2 * (ps - pt) / t for pt, ps in zip(p_t, p_s, strict=True)])
    return {
        "uncertainty": uncertainty,
        "discrimination": discrimination,
        "alphas": alphas,
        "temperatures": temperatures,
        "terms": terms,
        "grads": grads,
    }


def tensors(teacher_dtype: torch.dtype = torch.float32):
    student = torch.tensor(STUDENT, requires_grad=True)
    teacher = torch.tensor(TEACHER, dtype=teacher_dtype, requires_grad=True)  # must receive no gradient
    return student, teacher, torch.tensor(LABELS), torch.tensor(SAMPLE_IDS)


@pytest.mark.parametrize("mode", ["dynamic", "constant"])
@pytest.mark.parametrize("chunk_size", [1, 2, 1024])
def test_distillation_sum_matches_the_hand_computation(mode, chunk_size):
    student, teacher, labels, sample_ids = tensors()
    total, stats, alphas, temperatures = distillation_loss_sum(
        student, teacher, labels, sample_ids, 2, alpha=ALPHA, temperature=TEMPERATURE, mode=mode, chunk_size=chunk_size
    )
    expected = by_hand(mode)
    assert total.dtype == torch.float32 and total.dim() == 0
    torch.testing.assert_close(stats.uncertainty, torch.tensor(expected["uncertainty"]))
    torch.testing.assert_close(stats.discrimination, torch.tensor(expected["discrimination"]))
    torch.testing.assert_close(alphas, torch.tensor(expected["alphas"]))
    torch.testing.assert_close(temperatures, torch.tensor(expected["temperatures"]))
    torch.testing.assert_close(total, torch.tensor(sum(expected["terms"])))
    # Each factor matters: the sample weights really differ in dynamic mode.
    if mode == "dynamic":
        assert abs(expected["alphas"][0] - expected["alphas"][1]) > 0.05
    total.backward()
    torch.testing.assert_close(student.grad, torch.tensor(expected["grads"]))
    assert teacher.grad is None


def test_per_token_kl_matches_the_hand_computation():
    temperature = [2.0, 3.0, 0.5]
    kl = temperature_kl(torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(temperature))
    expected = []
    for s, t, temp in zip(STUDENT, TEACHER, temperature, strict=True):
        p_t, p_s = softmax(t, temp), softmax(s, temp)
        expected.append(sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s, strict=True)))
    assert kl.dtype == torch.float32 and kl.shape == (3,)
    torch.testing.assert_close(kl, torch.tensor(expected))
    # One number for all tokens is the same as that number per token.
    torch.testing.assert_close(temperature_kl(torch.tensor(STUDENT), torch.tensor(TEACHER), 2.0)[0], kl[0])


def test_kl_is_zero_for_identical_logits_and_positive_otherwise():
    torch.manual_seed(0)
    student, teacher = torch.randn(37, 50), torch.randn(37, 50)
    temperature = torch.rand(37) + 1
    assert temperature_kl(teacher, teacher, temperature).abs().max() < 1e-6
    assert (temperature_kl(student, teacher, temperature) > 0).all()


def test_chunking_changes_nothing_in_value_or_gradient():
    torch.manual_seed(0)
    teacher, temperature = torch.randn(37, 50), torch.rand(37) + 1
    results = []
    for chunk_size in (1, 5, 1024):
        student = torch.randn(37, 50, generator=torch.Generator().manual_seed(1), requires_grad=True)
        kl = temperature_kl(student, teacher, temperature, chunk_size=chunk_size)
        (kl * torch.arange(37.0)).sum().backward()
        results.append((kl.detach(), student.grad))
    for kl, grad in results[:-1]:
        torch.testing.assert_close(kl, results[-1][0])
        torch.testing.assert_close(grad, results[-1][1])


def test_gradient_matches_autograd_numerically():
    torch.manual_seed(0)
    student = torch.randn(7, 11, dtype=torch.float64, requires_grad=True)
    teacher, temperature = torch.randn(7, 11, dtype=torch.float64), torch.rand(7, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(lambda s: temperature_kl(s, teacher, temperature, chunk_size=3), (student,))


def test_gradient_reaches_the_student_only():
    student, teacher, labels, sample_ids = tensors()
    total, *_ = distillation_loss_sum(student, teacher, labels, sample_ids, 2, ALPHA, TEMPERATURE, mode="constant")
    total.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_bf16_teacher_and_student_are_accepted():
    student, teacher, labels, sample_ids = tensors(torch.bfloat16)
    total, stats, *_ = distillation_loss_sum(student, teacher, labels, sample_ids, 2, ALPHA, TEMPERATURE)
    assert total.dtype == torch.float32 and stats.uncertainty.dtype == torch.float32
    reference, *_ = distillation_loss_sum(
        student, torch.tensor(TEACHER).bfloat16().float(), labels, sample_ids, 2, ALPHA, TEMPERATURE
    )
    torch.testing.assert_close(total, reference)
    bf16_student = torch.tensor(STUDENT, dtype=torch.bfloat16, requires_grad=True)
    total, *_ = distillation_loss_sum(bf16_student, teacher, labels, sample_ids, 2, ALPHA, TEMPERATURE)
    total.backward()
    assert bf16_student.grad.dtype == torch.bfloat16 and torch.isfinite(bf16_student.grad.float()).all()


def test_uniform_teacher_is_fully_uncertain_and_gets_no_dynamic_weight():
    stats = teacher_statistics(torch.zeros(3, 8), torch.tensor([0, 5, 7]), torch.tensor([0, 0, 0]), num_samples=1)
    torch.testing.assert_close(stats.uncertainty, torch.tensor([1.0]))
    torch.testing.assert_close(stats.discrimination, torch.tensor([1 / 8]))
    alphas, temperatures = dynamic_weights(stats, ALPHA, TEMPERATURE)
    torch.testing.assert_close(alphas, torch.tensor([0.0]))
    torch.testing.assert_close(temperatures, torch.tensor([2 * TEMPERATURE]))
    alphas, temperatures = constant_weights(stats, ALPHA, TEMPERATURE)
    torch.testing.assert_close(alphas, torch.tensor([ALPHA]))
    torch.testing.assert_close(temperatures, torch.tensor([TEMPERATURE]))


def test_confident_correct_teacher_keeps_the_full_weight():
    logits = torch.full((2, 8), -20.0)
    logits[:, 3] = 20.0
    stats = teacher_statistics(logits, torch.tensor([3, 3]), torch.tensor([0, 0]), num_samples=1)
    torch.testing.assert_close(stats.uncertainty, torch.tensor([0.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(stats.discrimination, torch.tensor([1.0]), atol=1e-5, rtol=0)
    alphas, temperatures = dynamic_weights(stats, ALPHA, TEMPERATURE)
    torch.testing.assert_close(alphas, torch.tensor([ALPHA]), atol=1e-4, rtol=0)
    torch.testing.assert_close(temperatures, torch.tensor([TEMPERATURE]), atol=1e-4, rtol=0)
    # Confident but wrong: no weight either.
    stats = teacher_statistics(logits, torch.tensor([0, 0]), torch.tensor([0, 0]), num_samples=1)
    assert dynamic_weights(stats, ALPHA, TEMPERATURE)[0].item() < 1e-6


def test_a_sample_without_tokens_gives_zeros_not_nan():
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6)
    labels, sample_ids = torch.tensor([1, 2, 3, 4]), torch.tensor([0, 0, 2, 2])  # sample 1 has no tokens
    for mode in DISTILL_MODES:
        total, stats, alphas, temperatures = distillation_loss_sum(
            student, teacher, labels, sample_ids, 3, ALPHA, TEMPERATURE, mode=mode
        )
        for tensor in (total, stats.uncertainty, stats.discrimination, alphas, temperatures):
            assert torch.isfinite(tensor).all()
        assert stats.uncertainty[1] == 0 and stats.discrimination[1] == 0
    # No tokens at all: a zero that still backpropagates.
    empty = torch.zeros(0, 6, requires_grad=True)
    total, stats, *_ = distillation_loss_sum(
        empty, torch.zeros(0, 6), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 2, 1.0, 3.0
    )
    assert total.item() == 0 and stats.uncertainty.tolist() == [0.0, 0.0]
    total.backward()


def test_masked_vocabulary_entries_give_no_nan():
    teacher = torch.tensor([[2.0, float("-inf"), 0.0]])
    student = torch.tensor([[1.0, 0.0, 0.0]], requires_grad=True)
    total, stats, *_ = distillation_loss_sum(student, teacher, torch.tensor([0]), torch.tensor([0]), 1, 1.0, 2.0)
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(stats.uncertainty).all() and torch.isfinite(student.grad).all()


def test_explicit_weights_override_the_mode():
    student, teacher, labels, sample_ids = tensors()
    expected = by_hand("dynamic")
    weights = (torch.tensor(expected["alphas"]), torch.tensor(expected["temperatures"]))
    total, _, alphas, _ = distillation_loss_sum(
        student, teacher, labels, sample_ids, 2, 123.0, 9.0, mode="constant", weights=weights
    )
    torch.testing.assert_close(total, torch.tensor(sum(expected["terms"])))
    torch.testing.assert_close(alphas, weights[0])

    def rule(stats: SampleStatistics) -> tuple[torch.Tensor, torch.Tensor]:
        return dynamic_weights(stats, ALPHA, TEMPERATURE)

    total, *_ = distillation_loss_sum(student, teacher, labels, sample_ids, 2, 123.0, 9.0, "constant", weights_fn=rule)
    torch.testing.assert_close(total, torch.tensor(sum(expected["terms"])))


def test_bad_shapes_and_modes_are_refused():
    student, teacher, labels, sample_ids = tensors()
    with pytest.raises(ValueError, match="differ"):
        temperature_kl(student, teacher[:2], torch.ones(3))
    with pytest.raises(ValueError, match="one per token"):
        temperature_kl(student, teacher, torch.ones(2))
    with pytest.raises(ValueError, match="differ"):
        distillation_loss_sum(student, teacher[:, :2], labels, sample_ids, 2, 1.0, 3.0)
    with pytest.raises(ValueError, match="one entry per packed token"):
        distillation_loss_sum(student, teacher, labels[:2], sample_ids, 2, 1.0, 3.0)
    with pytest.raises(ValueError, match="one entry per packed token"):
        distillation_loss_sum(student, teacher, labels, sample_ids[:1], 2, 1.0, 3.0)
    with pytest.raises(ValueError, match=r"Unknown distillation mode 'adaptive'.*'constant', 'dynamic'"):
        distillation_loss_sum(student, teacher, labels, sample_ids, 2, 1.0, 3.0, mode="adaptive")
    with pytest.raises(ValueError, match="sample_ids"):
        distillation_loss_sum(student, teacher, labels, sample_ids, 1, 1.0, 3.0)
    with pytest.raises(ValueError, match="labels"):
        distillation_loss_sum(student, teacher, torch.tensor([0, 1, 3]), sample_ids, 2, 1.0, 3.0)
    with pytest.raises(ValueError, match="per sample"):
        distillation_loss_sum(
            student, teacher, labels, sample_ids, 2, 1.0, 3.0, weights=(torch.ones(3), torch.ones(3))
        )
    with pytest.raises(ValueError, match="chunk_size"):
        temperature_kl(student, teacher, torch.ones(3), chunk_size=0)
