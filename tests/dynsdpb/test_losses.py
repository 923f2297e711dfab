"""The fused loss and the weighting rules against numbers computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from trl_selfdistill.dynsdpb.losses import fused_distillation_loss, project_in_chunks
from trl_selfdistill.dynsdpb.schedule import (
    DISTILL_MODES,
    SampleStatistics,
    constant_weights,
    dynamic_weights,
    sample_statistics,
)

# Three response tokens, vocabulary of 3. The first two are distilled (re-used sample 0), the third is not.
TEACHER = [[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]
STUDENT = [[1.0, 0.5, 0.0], [0.0, 1.0, 0.0], [0.2, 0.1, 2.0]]
LABELS = [0, 1, 2]
ALPHA, TEMPERATURE = 0.7, 3.0


def softmax(z: list[float], t: float = 1.0) -> list[float]:
    exps = [math.exp(v / t) for v in z]
    return [e / sum(exps) for e in exps]


def by_hand() -> dict[str, list]:
    """Per-token log-probabilities, entropies, weighted KL terms and d(loss)/d(logits) with plain `math`."""
    log_probs = [math.log(softmax(z)[y]) for z, y in zip(STUDENT, LABELS, strict=True)]
    entropy = [-sum(p * math.log(p) for p in softmax(z)) for z in STUDENT]
    distill, grads = [], []
    for j, (z, y) in enumerate(zip(STUDENT, LABELS, strict=True)):
        grad = [p - (v == y) for v, p in enumerate(softmax(z))]  # of -log p_y
        if j < len(TEACHER):
            p_t, p_s = softmax(TEACHER[j], TEMPERATURE), softmax(z, TEMPERATURE)
            kl = sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s, strict=True))
            distill.append(ALPHA * TEMPERATURE**2 * kl)
            grad = [g + ALPHA * TEMPERATURE * (ps - pt) for g, pt, ps in zip(grad, p_t, p_s, strict=True)]
        grads.append(grad)
    return {"log_probs": log_probs, "entropy": entropy, "distill": distill, "grads": grads}


def loss_inputs(teacher_is_hidden: bool, dtype: torch.dtype = torch.float32):
    """With the identity as output layer, hidden states are the logits: the hand computation applies directly."""
    hidden = torch.tensor(STUDENT, dtype=dtype, requires_grad=True)
    weight = torch.eye(3, dtype=dtype)
    teacher = torch.tensor(TEACHER, dtype=dtype)
    per_token = torch.full((2,), ALPHA), torch.full((2,), TEMPERATURE)
    return hidden, weight, None, torch.tensor(LABELS), teacher, teacher_is_hidden, *per_token


@pytest.mark.parametrize("teacher_is_hidden", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 2, 1024])
def test_fused_loss_matches_the_hand_computation(teacher_is_hidden, chunk_size):
    inputs = loss_inputs(teacher_is_hidden)
    log_probs, distill, entropy, is_top1 = fused_distillation_loss(*inputs, chunk_size=chunk_size)
    expected = by_hand()
    torch.testing.assert_close(log_probs, torch.tensor(expected["log_probs"]))
    torch.testing.assert_close(distill, torch.tensor(expected["distill"]))
    torch.testing.assert_close(entropy, torch.tensor(expected["entropy"]))
    assert is_top1.tolist() == [True, True, True]
    (distill.sum() - log_probs.sum()).backward()
    torch.testing.assert_close(inputs[0].grad, torch.tensor(expected["grads"]))


def test_gradients_match_autograd_numerically():
    torch.manual_seed(0)
    hidden = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (7,))
    kl_weight, temperature = torch.rand(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
    for teacher, is_hidden in (
        (torch.randn(4, 5, dtype=torch.float64), True),
        (torch.randn(4, 11, dtype=torch.float64), False),
    ):

        def loss(h, w=weight, b=bias, teacher=teacher, is_hidden=is_hidden):
            log_probs, distill, *_ = fused_distillation_loss(
                h, w, b, targets, teacher, is_hidden, kl_weight, temperature, chunk_size=3
            )
            return log_probs * torch.arange(7.0, dtype=torch.float64), distill

        # A teacher given as hidden states is only used with a frozen output layer: a constant, not a function of the
        # weight. A teacher given as logits serves a trained output layer: check the weight and bias gradients too.
        assert torch.autograd.gradcheck(loss, (hidden,) if is_hidden else (hidden, weight, bias))


def test_chunking_changes_nothing_in_value_or_gradient():
    torch.manual_seed(0)
    weight, teacher, targets = torch.randn(50, 16), torch.randn(20, 16), torch.randint(0, 50, (37,))
    kl_weight, temperature = torch.rand(20), torch.rand(20) + 1
    results = []
    for chunk_size in (1, 5, 16, 1024):
        hidden = torch.randn(37, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        log_probs, distill, entropy, _ = fused_distillation_loss(
            hidden, weight, None, targets, teacher, True, kl_weight, temperature, chunk_size
        )
        (distill.sum() - (log_probs * torch.arange(37.0)).sum()).backward()
        results.append((log_probs.detach(), distill.detach(), entropy, hidden.grad))
    for result in results[:-1]:
        for value, reference in zip(result, results[-1], strict=True):
            torch.testing.assert_close(value, reference)


def test_teacher_hidden_states_and_their_logits_are_the_same_teacher():
    torch.manual_seed(0)
    weight, bias = torch.randn(40, 8), torch.randn(40)
    hidden, teacher_hidden, targets = torch.randn(6, 8), torch.randn(4, 8), torch.randint(0, 40, (6,))
    teacher_logits = project_in_chunks(teacher_hidden, weight, bias, chunk_size=3, dtype=torch.float32)
    torch.testing.assert_close(teacher_logits, teacher_hidden @ weight.T + bias)
    weights = torch.rand(4), torch.rand(4) + 1
    from_hidden = fused_distillation_loss(hidden, weight, bias, targets, teacher_hidden, True, *weights)
    from_logits = fused_distillation_loss(hidden, weight, bias, targets, teacher_logits, False, *weights)
    for a, b in zip(from_hidden, from_logits, strict=True):
        torch.testing.assert_close(a, b)


def test_distillation_is_zero_for_an_identical_teacher_and_the_teacher_gets_no_gradient():
    torch.manual_seed(0)
    hidden = torch.randn(5, 8, requires_grad=True)
    weight, teacher = torch.randn(30, 8, requires_grad=True), hidden.detach()[:3].clone().requires_grad_()
    targets = torch.randint(0, 30, (5,))
    ones = torch.ones(3)
    _, distill, *_ = fused_distillation_loss(hidden, weight, None, targets, teacher, True, ones, ones)
    assert distill.abs().max() < 1e-6
    distill.sum().backward()
    assert teacher.grad is None and weight.grad is not None


def test_no_distilled_tokens_and_no_tokens_at_all():
    torch.manual_seed(0)
    hidden, weight = torch.randn(4, 8, requires_grad=True), torch.randn(30, 8)
    log_probs, distill, *_ = fused_distillation_loss(
        hidden, weight, None, torch.randint(0, 30, (4,)), torch.zeros(0, 8), True, torch.zeros(0), torch.zeros(0)
    )
    assert distill.shape == (0,) and torch.isfinite(log_probs).all()
    log_probs.sum().backward()
    assert torch.isfinite(hidden.grad).all()
    empty = torch.zeros(0, 8, requires_grad=True)
    log_probs, *_ = fused_distillation_loss(
        empty, weight, None, torch.zeros(0, dtype=torch.long), torch.zeros(0, 8), True, torch.zeros(0), torch.zeros(0)
    )
    log_probs.sum().backward()  # a differentiable zero
    assert empty.grad.shape == (0, 8)


def test_masked_vocabulary_entries_give_no_nan():
    hidden = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], requires_grad=True)
    bias = torch.tensor([0.0, float("-inf"), 0.0])  # token 1 can never be predicted
    teacher = torch.tensor([[2.0, 0.0, 0.0]])
    log_probs, distill, entropy, _ = fused_distillation_loss(
        hidden, torch.eye(3), bias, torch.tensor([0, 2]), teacher, True, torch.ones(1), torch.full((1,), 2.0)
    )
    (distill.sum() - log_probs.sum()).backward()
    for tensor in (log_probs, distill, entropy, hidden.grad):
        assert torch.isfinite(tensor).all()


def test_bf16_inputs_give_float32_terms_close_to_float32():
    torch.manual_seed(0)
    weight, teacher, targets = torch.randn(64, 16) / 4, torch.randn(5, 16), torch.randint(0, 64, (9,))
    kl_weight, temperature = torch.rand(5), torch.rand(5) + 1
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        hidden = torch.randn(9, 16, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_()
        log_probs, distill, *_ = fused_distillation_loss(
            hidden, weight.to(dtype), None, targets, teacher.to(dtype), True, kl_weight, temperature
        )
        assert log_probs.dtype == distill.dtype == torch.float32
        (distill.sum() - log_probs.sum()).backward()
        assert hidden.grad.dtype == dtype
        results[dtype] = (log_probs.detach(), distill.detach(), hidden.grad.float())
    for value, reference in zip(results[torch.bfloat16], results[torch.float32], strict=True):
        torch.testing.assert_close(value, reference, rtol=2e-2, atol=2e-2)


def test_the_fp16_gradient_scaler_round_trips():
    """What `fp16=True` does on a GPU: scale the loss, backpropagate in float16, unscale; here on the CPU scaler."""
    torch.manual_seed(0)
    weight, teacher, targets = torch.randn(64, 16).half() / 4, torch.randn(5, 16).half(), torch.randint(0, 64, (9,))
    kl_weight, temperature = torch.rand(5), torch.rand(5) + 1
    grads = []
    for scaler in (None, torch.amp.GradScaler("cpu")):
        hidden = torch.nn.Parameter(torch.randn(9, 16, generator=torch.Generator().manual_seed(1)))
        log_probs, distill, *_ = fused_distillation_loss(
            hidden.half(), weight, None, targets, teacher, True, kl_weight, temperature
        )
        loss = (distill.sum() - log_probs.sum()) / 9
        if scaler is None:
            loss.backward()
        else:
            optimizer = torch.optim.SGD([hidden], lr=0.0)
            scaler.scale(loss).backward()
            assert hidden.grad.abs().max() > 100  # scaled
            scaler.unscale_(optimizer)
            scaler.step(optimizer)  # skipped if anything overflowed
            assert scaler._found_inf_per_device(optimizer)[torch.device("cpu")].item() == 0
        grads.append(hidden.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-2, atol=1e-3)


def test_bad_shapes_are_refused():
    hidden, weight, bias, targets, teacher, is_hidden, kl_weight, temperature = loss_inputs(True)
    with pytest.raises(ValueError, match=r"\[N, H\], \[V, H\]"):
        fused_distillation_loss(hidden, weight[:, :2], bias, targets, teacher, is_hidden, kl_weight, temperature)
    with pytest.raises(ValueError, match=r"logits \[M, V\]"):
        fused_distillation_loss(hidden, torch.eye(4, 3), bias, targets, teacher, False, kl_weight, temperature)
    with pytest.raises(ValueError, match="one weight and temperature per distilled token"):
        fused_distillation_loss(hidden, weight, bias, targets, teacher, is_hidden, kl_weight[:1], temperature)
    with pytest.raises(ValueError, match="one target per token"):
        fused_distillation_loss(hidden, weight, bias, targets[:2], teacher, is_hidden, kl_weight, temperature)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_distillation_loss(hidden, weight, bias, targets, teacher, is_hidden, kl_weight, temperature, -1)


def test_uniform_prediction_is_fully_uncertain_and_gets_no_dynamic_weight():
    vocab = 8
    stats = sample_statistics(torch.full((3,), math.log(vocab)), torch.full((3,), -math.log(vocab)), [3], vocab)
    torch.testing.assert_close(stats.uncertainty, torch.tensor([1.0]))
    torch.testing.assert_close(stats.discrimination, torch.tensor([1 / vocab]))
    alphas, temperatures = dynamic_weights(stats, ALPHA, TEMPERATURE)
    torch.testing.assert_close(alphas, torch.tensor([0.0]))
    torch.testing.assert_close(temperatures, torch.tensor([2 * TEMPERATURE]))
    alphas, temperatures = constant_weights(stats, ALPHA, TEMPERATURE)
    torch.testing.assert_close(alphas, torch.tensor([ALPHA]))
    torch.testing.assert_close(temperatures, torch.tensor([TEMPERATURE]))


def test_statistics_of_the_fused_loss_drive_the_weights():
    """Confident and right keeps the full weight; confident and wrong gets none (`u`, `d` from a real forward)."""
    weight = torch.eye(8) * 40
    hidden = torch.zeros(4, 8)
    hidden[:, 3] = 1.0  # every token predicts 3 with near certainty
    targets = torch.tensor([3, 3, 0, 0])  # sample 0 right, sample 1 wrong
    log_probs, _, entropy, _ = fused_distillation_loss(
        hidden, weight, None, targets, torch.zeros(0, 8), True, torch.zeros(0), torch.zeros(0)
    )
    stats = sample_statistics(entropy, log_probs, [2, 2], vocab_size=8)
    torch.testing.assert_close(stats.uncertainty, torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(stats.discrimination, torch.tensor([1.0, 0.0]), atol=1e-5, rtol=0)
    alphas, temperatures = dynamic_weights(stats, ALPHA, TEMPERATURE)
    torch.testing.assert_close(alphas, torch.tensor([ALPHA, 0.0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(temperatures, torch.full((2,), TEMPERATURE), atol=1e-4, rtol=0)


def test_a_sample_without_tokens_gives_zeros_not_nan():
    stats = sample_statistics(torch.tensor([0.5, 0.7]), torch.tensor([-1.0, -2.0]), [1, 0, 1], vocab_size=10)
    assert stats.uncertainty[1] == 0 and stats.discrimination[1] == 0
    for mode in DISTILL_MODES.values():
        for tensor in (*mode(stats, ALPHA, TEMPERATURE), stats.uncertainty, stats.discrimination):
            assert torch.isfinite(tensor).all()
    with pytest.raises(ValueError, match="one entry per token"):
        sample_statistics(torch.zeros(3), torch.zeros(3), [1, 1], vocab_size=10)
    with pytest.raises(ValueError, match="at least 2"):
        sample_statistics(torch.zeros(1), torch.zeros(1), [1], vocab_size=1)


def test_the_weight_rules_are_one_entry_per_sample():
    stats = SampleStatistics(uncertainty=torch.tensor([0.2, 0.6]), discrimination=torch.tensor([0.9, 0.1]))
    alphas, temperatures = dynamic_weights(stats, ALPHA, TEMPERATURE)
    torch.testing.assert_close(alphas, torch.tensor([ALPHA * 0.9 * 0.8, ALPHA * 0.1 * 0.4]))
    torch.testing.assert_close(temperatures, torch.tensor([TEMPERATURE * 1.2, TEMPERATURE * 1.6]))
