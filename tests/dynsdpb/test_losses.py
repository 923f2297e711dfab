"""The distillation term and the weighting rules against numbers computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from trl_selfdistill.dynsdpb.losses import distillation_loss_sum, temperature_kl
from trl_selfdistill.dynsdpb.schedule import teacher_statistics

# Two re-used samples, vocabulary of 3: sample 0 has two response tokens, sample 1 one.
TEACHER = [[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [0.0, 1.0, 3.0]]
STUDENT = [[1.0, 0.5, 0.0], [0.0, 1.0, 0.0], [0.2, 0.1, 2.0]]
LABELS = [0, 1, 2]
SAMPLE_IDS = [0, 0, 1]


def softmax(z: list[float], t: float = 1.0) -> list[float]:
    exps = [math.exp(v / t) for v in z]
    return [e / sum(exps) for e in exps]


def by_hand(mode: str, alpha: float = 1.0, temperature: float = 3.0) -> tuple[float, list[float], list[float]]:
    uncertainty, discrimination = [], []
    for sample in (0, 1):
        tokens = [j for j, s in enumerate(SAMPLE_IDS) if s == sample]
        probs = [softmax(TEACHER[j]) for j in tokens]
        uncertainty.append(sum(-sum(p * math.log(p) for p in ps) / math.log(3) for ps in probs) / len(tokens))
        discrimination.append(sum(ps[LABELS[j]] for ps, j in zip(probs, tokens, strict=True)) / len(tokens))
    total = 0.0
    for j, sample in enumerate(SAMPLE_IDS):
        u, d = uncertainty[sample], discrimination[sample]
        a, t = (alpha * d * (1 - u), temperature * (1 + u)) if mode == "dynamic" else (alpha, temperature)
        p_t, p_s = softmax(TEACHER[j], t), softmax(STUDENT[j], t)
        total += a * t**2 * sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s, strict=True))
    return total, uncertainty, discrimination


def tensors():
    student = torch.tensor(STUDENT, requires_grad=True)
    return student, torch.tensor(TEACHER), torch.tensor(LABELS), torch.tensor(SAMPLE_IDS)


@pytest.mark.parametrize("mode", ["dynamic", "constant"])
def test_distillation_sum_matches_the_hand_computation(mode):
    student, teacher, labels, sample_ids = tensors()
    total, stats, alphas, temperatures = distillation_loss_sum(
        student, teacher, labels, sample_ids, 2, alpha=1.0, temperature=3.0, mode=mode
    )
    expected, uncertainty, discrimination = by_hand(mode)
    torch.testing.assert_close(total, torch.tensor(expected))
    torch.testing.assert_close(stats.uncertainty, torch.tensor(uncertainty))
    torch.testing.assert_close(stats.discrimination, torch.tensor(discrimination))
    if mode == "constant":
        assert alphas.tolist() == [1.0, 1.0] and temperatures.tolist() == [3.0, 3.0]
    total.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_kl_is_zero_for_identical_logits_and_chunking_changes_nothing():
    torch.manual_seed(0)
    student, teacher = torch.randn(37, 50), torch.randn(37, 50)
    temperature = torch.rand(37) + 1
    assert temperature_kl(teacher, teacher, temperature).abs().max() < 1e-6
    torch.testing.assert_close(
        temperature_kl(student, teacher.bfloat16(), temperature, chunk_size=1),
        temperature_kl(student, teacher.bfloat16(), temperature, chunk_size=1024),
    )
    assert (temperature_kl(student, teacher, temperature) > 0).all()


def test_statistics_extremes_and_empty_samples():
    uniform = torch.zeros(2, 8)
    confident = torch.full((2, 8), -20.0)
    confident[:, 3] = 20.0
    logits = torch.cat([uniform, confident])
    stats = teacher_statistics(logits, torch.tensor([0, 0, 3, 3]), torch.tensor([0, 0, 1, 1]), num_samples=3)
    torch.testing.assert_close(stats.uncertainty[:2], torch.tensor([1.0, 0.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(stats.discrimination[:2], torch.tensor([1 / 8, 1.0]), atol=1e-5, rtol=0)
    assert stats.uncertainty[2] == 0 and stats.discrimination[2] == 0  # no tokens: zeros, no NaN


def test_bad_shapes_and_modes_are_refused():
    student, teacher, labels, sample_ids = tensors()
    with pytest.raises(ValueError, match="differ"):
        temperature_kl(student, teacher[:2], torch.ones(3))
    with pytest.raises(ValueError, match="one entry per packed token"):
        distillation_loss_sum(student, teacher, labels[:2], sample_ids, 2, 1.0, 3.0)
    with pytest.raises(ValueError, match="Unknown distillation mode"):
        distillation_loss_sum(student, teacher, labels, sample_ids, 2, 1.0, 3.0, mode="adaptive")
