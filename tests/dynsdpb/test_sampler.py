"""The overlapping batch chains: per slot, per process, across epochs."""

from __future__ import annotations

import pytest

from trl_selfdistill.dynsdpb.sampler import OverlappingBatchSampler, reuse_count_for


def chains(num_samples, batch_size=4, reuse=2, accumulation=1, processes=1, epochs=1, **kwargs):
    """{(process, slot): [batches over all steps of all epochs]} built from one sampler per process."""
    result = {}
    for process in range(processes):
        sampler = OverlappingBatchSampler(num_samples, batch_size, reuse, accumulation, processes, process, **kwargs)
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            batches = list(sampler)
            assert len(batches) == len(sampler) == sampler.steps_per_epoch * accumulation
            for position, batch in enumerate(batches):
                result.setdefault((process, position % accumulation), []).append(batch)
    return result


@pytest.mark.parametrize(("accumulation", "processes"), [(1, 1), (3, 1), (1, 2), (2, 3)])
def test_each_chain_reuses_its_previous_new_samples(accumulation, processes):
    n, epochs = 48, 3
    by_chain = chains(n, accumulation=accumulation, processes=processes, epochs=epochs, seed=7)
    steps = len(next(iter(by_chain.values())))
    for batches in by_chain.values():
        assert [i for i, reused in batches[0] if reused] == []  # nothing to re-use at the very first step
        for previous, current in zip(batches, batches[1:], strict=False):
            previous_new = [i for i, reused in previous if not reused]
            assert [i for i, reused in current if reused] == previous_new[:2]
            assert [reused for _, reused in current] == sorted((r for _, r in current), reverse=True)
    for epoch in range(epochs):  # every sample new exactly once per epoch, over all chains
        per_epoch = steps // epochs
        new = [i for b in by_chain.values() for batch in b[epoch * per_epoch : (epoch + 1) * per_epoch]
               for i, reused in batch if not reused]  # fmt: skip
        assert sorted(new) == list(range(n))


def test_partial_last_step_and_determinism():
    sampler = OverlappingBatchSampler(10, 4, 2, gradient_accumulation_steps=2, seed=3)
    assert sampler.steps_per_epoch == 3  # 4 new per step: 4 + 4 + 2
    batches = list(sampler)
    assert [len(b) for b in batches] == [2, 2, 4, 4, 4, 2]  # the last slot of the last step gets no new sample
    assert batches == list(OverlappingBatchSampler(10, 4, 2, gradient_accumulation_steps=2, seed=3))
    sampler.set_epoch(1)
    assert list(sampler) != batches
    ordered = list(OverlappingBatchSampler(8, 4, 2, shuffle=False))
    assert [[i for i, _ in b] for b in ordered] == [[0, 1], [0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7]]


def test_validation_and_reuse_count():
    assert reuse_count_for(8, 0.5) == 4 and reuse_count_for(8, 0.25) == 2
    with pytest.warns(UserWarning, match="effective fraction"):
        assert reuse_count_for(5, 0.5) == 2
    for batch_size, fraction in [(1, 0.5), (8, 0.75), (8, 0.01)]:
        with pytest.raises(ValueError, match="reuse_fraction"):
            reuse_count_for(batch_size, fraction)
    with pytest.raises(ValueError, match="new samples"):
        OverlappingBatchSampler(5, 4, 2, gradient_accumulation_steps=2, num_processes=2)
    with pytest.raises(ValueError, match="process"):
        OverlappingBatchSampler(16, 4, 2, num_processes=2, process_index=2)
