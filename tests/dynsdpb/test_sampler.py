"""The overlapping batch chains of DLB: per gradient-accumulation slot, per process, across epochs."""

from __future__ import annotations

import itertools

import pytest
import torch
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader

from trl_selfdistill.dynsdpb.sampler import OverlappingBatchSampler, reuse_count_for

Batch = list[tuple[int, bool]]


def reused_of(batch: Batch) -> list[int]:
    return [index for index, reused in batch if reused]


def new_of(batch: Batch) -> list[int]:
    return [index for index, reused in batch if not reused]


def run_chains(
    num_samples: int,
    batch_size: int = 4,
    reuse: int = 2,
    accumulation: int = 1,
    processes: int = 1,
    epochs: int = 1,
    **kwargs,
) -> dict[tuple[int, int], list[list[Batch]]]:
    """{(process, slot): [[batch of each step] for each epoch]}, from one sampler per process as in a real launch."""
    result: dict[tuple[int, int], list[list[Batch]]] = {}
    for process in range(processes):
        sampler = OverlappingBatchSampler(num_samples, batch_size, reuse, accumulation, processes, process, **kwargs)
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            batches = list(sampler)
            assert len(batches) == len(sampler) == sampler.steps_per_epoch * accumulation
            for slot in range(accumulation):
                result.setdefault((process, slot), []).append(batches[slot::accumulation])
    return result


def check_chains(by_chain: dict[tuple[int, int], list[list[Batch]]], num_samples: int, reuse: int) -> None:
    """The DLB properties: the overlap inside each chain (across epochs too) and every sample new once per epoch."""
    for batches_per_epoch in by_chain.values():
        flat = [batch for epoch in batches_per_epoch for batch in epoch]
        assert reused_of(flat[0]) == []  # the very first step has nothing to re-use
        for previous, current in itertools.pairwise(flat):
            assert reused_of(current) == new_of(previous)[:reuse]
            assert [reused for _, reused in current] == sorted((r for _, r in current), reverse=True)  # re-used first
    epochs = len(next(iter(by_chain.values())))
    for epoch in range(epochs):  # union over all ranks and slots
        new = [i for chain in by_chain.values() for batch in chain[epoch] for i in new_of(batch)]
        assert sorted(new) == list(range(num_samples))


def test_overlap_on_one_process():
    by_chain = run_chains(24, batch_size=8, reuse=4, epochs=2, seed=5)
    check_chains(by_chain, 24, reuse=4)
    batches = by_chain[(0, 0)][0]
    assert [len(b) for b in batches] == [4, 8, 8, 8, 8, 8]  # 24 samples / 4 new per step = 6 steps
    assert all(len(reused_of(b)) == 4 for b in batches[1:])


def test_overlap_with_gradient_accumulation():
    by_chain = run_chains(60, batch_size=6, reuse=2, accumulation=3, epochs=3, seed=1)
    check_chains(by_chain, 60, reuse=2)
    # Chains never mix: slot g re-uses only what slot g had, never what the other slots had in the same step.
    slot_new = {slot: {i for b in by_chain[(0, slot)][0] for i in new_of(b)} for slot in range(3)}
    for slot in range(3):
        reused = {i for b in by_chain[(0, slot)][0] for i in reused_of(b)}
        assert reused <= slot_new[slot]


@pytest.mark.parametrize(("processes", "accumulation"), [(2, 1), (3, 1), (2, 2), (3, 2)])
def test_chains_stay_on_their_process(processes, accumulation):
    n = 72
    by_chain = run_chains(n, accumulation=accumulation, processes=processes, epochs=2, seed=11)
    check_chains(by_chain, n, reuse=2)  # includes: the union over ranks is every sample exactly once per epoch
    for process in range(processes):
        own = {
            i for slot in range(accumulation) for epoch in by_chain[(process, slot)] for b in epoch for i in new_of(b)
        }
        for slot in range(accumulation):
            reused = {i for epoch in by_chain[(process, slot)] for b in epoch for i in reused_of(b)}
            assert reused  # every chain distils
            assert reused <= own  # a rank re-uses only samples it had itself (its cached logits are local)
        for epoch in range(2):  # within an epoch the ranks' new samples are disjoint
            mine = {i for slot in range(accumulation) for b in by_chain[(process, slot)][epoch] for i in new_of(b)}
            theirs = {
                i
                for (other, _), chain in by_chain.items()
                if other != process
                for b in chain[epoch]
                for i in new_of(b)
            }
            assert mine and not mine & theirs


def test_new_sample_layout_without_shuffle():
    # start = (s * G * W + g * W + w) * new_per_batch, process index fastest.
    by_chain = run_chains(12, batch_size=4, reuse=2, accumulation=1, processes=2, shuffle=False)
    assert [new_of(b) for b in by_chain[(0, 0)][0]] == [[0, 1], [4, 5], [8, 9]]
    assert [new_of(b) for b in by_chain[(1, 0)][0]] == [[2, 3], [6, 7], [10, 11]]
    assert [reused_of(b) for b in by_chain[(1, 0)][0]] == [[], [2, 3], [6, 7]]
    by_chain = run_chains(16, batch_size=4, reuse=2, accumulation=2, processes=2, shuffle=False)
    assert [new_of(b) for b in by_chain[(0, 1)][0]] == [[4, 5], [12, 13]]  # g=1, w=0: chain 2 of 4
    assert [new_of(b) for b in by_chain[(1, 1)][0]] == [[6, 7], [14, 15]]


def test_shuffle_false_batches():
    batches = list(OverlappingBatchSampler(8, 4, 2, shuffle=False))
    assert batches == [
        [(0, False), (1, False)],
        [(0, True), (1, True), (2, False), (3, False)],
        [(2, True), (3, True), (4, False), (5, False)],
        [(4, True), (5, True), (6, False), (7, False)],
    ]
    sampler = OverlappingBatchSampler(8, 4, 2, shuffle=False)
    sampler.set_epoch(3)  # the same order every epoch; step 0 re-uses the last step of the epoch before
    assert list(sampler)[0] == [(6, True), (7, True), (0, False), (1, False)]


def test_epoch_boundary_carries_the_previous_epoch_last_step():
    sampler = OverlappingBatchSampler(20, 6, 2, gradient_accumulation_steps=2, seed=4)
    last = list(sampler)[-2:]  # the two slots of epoch 0's last step
    sampler.set_epoch(1)
    first = list(sampler)[:2]
    for slot in range(2):
        assert reused_of(first[slot]) == new_of(last[slot])[:2]
        assert len(new_of(first[slot])) == 4


def test_partial_last_step():
    sampler = OverlappingBatchSampler(10, 4, 2, gradient_accumulation_steps=2, seed=3)
    assert sampler.steps_per_epoch == 3  # 4 new samples per step: 4 + 4 + 2
    batches = list(sampler)
    assert [len(b) for b in batches] == [2, 2, 4, 4, 4, 2]  # slot 1 of the last step has no new sample left
    assert new_of(batches[-1]) == [] and len(reused_of(batches[-1])) == 2
    sampler.set_epoch(1)  # next epoch: slot 0 re-uses its 2 last new samples, slot 1 had none to give
    assert [len(reused_of(b)) for b in list(sampler)[:2]] == [2, 0]
    # A last step with fewer new samples than reuse_count: the next epoch re-uses what there is.
    sampler = OverlappingBatchSampler(11, 6, 3, shuffle=False)
    assert sampler.steps_per_epoch == 4 and new_of(list(sampler)[-1]) == [9, 10]
    sampler.set_epoch(1)
    assert next(iter(sampler)) == [(9, True), (10, True), (0, False), (1, False), (2, False)]


def test_determinism_and_set_epoch():
    def make(seed: int = 3) -> OverlappingBatchSampler:
        return OverlappingBatchSampler(
            30, 4, 2, gradient_accumulation_steps=2, num_processes=2, process_index=1, seed=seed
        )

    sampler = make()
    epoch0 = list(sampler)
    assert epoch0 == list(sampler) == list(make())
    assert list(make(seed=4)) != epoch0
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != epoch0
    fresh = make()  # no history: a sampler that never saw epoch 0 gives the same epoch-1 batches (resume)
    fresh.set_epoch(1)
    assert list(fresh) == epoch1
    sampler.set_epoch(0)
    assert list(sampler) == epoch0
    # Skipping the first batches (as a resumed run does) leaves the rest unchanged.
    assert list(itertools.islice(iter(sampler), 3, None)) == epoch0[3:]
    # The new samples follow torch.randperm with seed + epoch.
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(3 + 1)).tolist()
    assert new_of(epoch1[0]) == perm[2:4]  # step 0, slot 0, process 1


@pytest.mark.parametrize(
    ("n", "batch_size", "reuse", "accumulation", "processes", "steps"),
    [(8, 4, 2, 1, 1, 4), (9, 4, 2, 1, 1, 5), (10, 4, 2, 2, 1, 3), (48, 8, 4, 3, 2, 2), (49, 8, 4, 3, 2, 3)],
)
def test_len(n, batch_size, reuse, accumulation, processes, steps):
    for process in range(processes):
        sampler = OverlappingBatchSampler(n, batch_size, reuse, accumulation, processes, process)
        assert sampler.new_per_batch == batch_size - reuse
        assert sampler.steps_per_epoch == steps
        assert len(sampler) == len(list(sampler)) == steps * accumulation  # the same on every rank
    assert OverlappingBatchSampler.batch_size is None and sampler.batch_size is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 1, "reuse_count": 1}, "at least 2 samples"),
        ({"reuse_count": 0}, "reuse_count=0"),
        ({"reuse_count": 3}, "reuse_count=3"),
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps=0"),
        ({"num_processes": 2, "process_index": 2}, "process_index=2"),
        ({"process_index": -1}, "process_index=-1"),
        ({"num_processes": 0}, "num_processes=0"),
        ({"num_samples": 7, "gradient_accumulation_steps": 2, "num_processes": 2}, "Use at least 8 rows"),
    ],
)
def test_constructor_validation(kwargs, message):
    arguments = {"num_samples": 16, "batch_size": 4, "reuse_count": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        OverlappingBatchSampler(**arguments)


def test_reuse_count_for():
    assert reuse_count_for(8, 0.5) == 4
    assert reuse_count_for(8, 0.25) == 2
    assert reuse_count_for(5, 0.5) == 2  # round(2.5) == 2; the config warns about it (test_dynsdpb_config.py)
    for batch_size, fraction in [(1, 0.5), (8, 0.75), (8, 0.01), (8, float("nan"))]:
        with pytest.raises(ValueError, match="dynsdpb_reuse_fraction"):
            reuse_count_for(batch_size, fraction)
    with pytest.raises(ValueError, match="per_device_train_batch_size=1"):
        reuse_count_for(1, 0.5)


class IndexedRows(torch.utils.data.Dataset):
    """A list dataset addressed by the sampler's `(index, reused)` requests; returns the row with its role."""

    def __init__(self, rows: list[str]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, request: tuple[int, bool]) -> tuple[str, bool]:
        index, reused = request
        return self.rows[index], reused


def test_drives_a_dataloader_prepared_by_accelerate():
    rows = [f"row{i}" for i in range(14)]
    sampler = OverlappingBatchSampler(len(rows), 4, 2, gradient_accumulation_steps=2, seed=9)
    expected = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        expected.append([[(rows[i], reused) for i, reused in batch] for batch in sampler])
    sampler.set_epoch(0)

    loader = torch.utils.data.DataLoader(IndexedRows(rows), batch_sampler=sampler, collate_fn=list)
    prepared = Accelerator(cpu=True).prepare(loader)
    assert len(prepared) == len(sampler)
    for epoch in range(2):
        prepared.set_epoch(epoch)  # as the trainer does at each epoch
        assert list(prepared) == expected[epoch]


def test_passes_through_a_neutralised_shard_wrapper_per_process():
    """With several processes accelerate wraps the sampler in `BatchSamplerShard`; the trainer neutralises it."""
    rows = [f"row{i}" for i in range(20)]
    for process in range(2):
        sampler = OverlappingBatchSampler(len(rows), 4, 2, 2, num_processes=2, process_index=process, seed=2)
        expected = [[(rows[i], reused) for i, reused in batch] for batch in sampler]
        loader = torch.utils.data.DataLoader(IndexedRows(rows), batch_sampler=sampler, collate_fn=list)
        prepared = prepare_data_loader(loader, num_processes=2, process_index=process, put_on_device=False)
        shard = prepared.batch_sampler
        assert shard.batch_sampler is sampler
        shard.num_processes, shard.process_index = 1, 0  # what DynSDPBTrainer.get_train_dataloader does
        assert len(prepared) == len(sampler)
        assert list(prepared) == expected
        # `DataLoaderShard.set_epoch` does not reach a wrapped batch sampler: set it directly (transformers does).
        sampler.set_epoch(1)
        assert list(prepared) == [[(rows[i], reused) for i, reused in batch] for batch in sampler]
