"""The overlapping batches of DLB (Shen et al., CVPR 2022), used by DynSDPB (Fu et al., arXiv 2411.16991).

Each per-device micro-batch is the first `reuse_count` samples that were *new* in the same micro-batch slot one
optimizer step earlier (re-used, listed first) plus `batch_size - reuse_count` new samples. A micro-batch slot on a
process is a *chain*: with `G` gradient-accumulation steps and `W` processes there are `G * W` independent chains,
so "one step earlier" is always one optimizer update earlier and never crosses processes.

An epoch makes every sample new exactly once, over all chains together: it takes
`steps_per_epoch = ceil(N / (G * W * (batch_size - reuse_count)))` optimizer steps, and each sample is seen twice in it
(new, then re-used), so an epoch costs about twice the compute of an SFT epoch with the same batch size. The re-used
samples of an epoch's first step are the last step's new samples of the epoch before (the cache carries over).

The sampler is rank-aware: each process yields only its own micro-batches, so the trainer makes accelerate's shard
wrapper a passthrough. Batches depend only on the arguments and the epoch, so a resumed run that skips the first
batches sees exactly the ones an uninterrupted run would.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import torch


def reuse_count_for(batch_size: int, reuse_fraction: float) -> int:
    """Number of re-used samples per micro-batch: `round(batch_size * reuse_fraction)`, validated."""
    reuse = round(batch_size * reuse_fraction)
    if reuse < 1 or reuse > batch_size - reuse:
        raise ValueError(
            f"per_device_train_batch_size={batch_size} with reuse_fraction={reuse_fraction} re-uses {reuse} samples, "
            f"but re-use needs 1 <= re-used <= new (the previous step has only batch_size - re-used new samples). "
            "Use reuse_fraction <= 0.5 and per_device_train_batch_size >= 2 (e.g. 8 with 0.5: 4 re-used + 4 new)."
        )
    if not math.isclose(batch_size * reuse_fraction, reuse):
        warnings.warn(
            f"per_device_train_batch_size={batch_size} x reuse_fraction={reuse_fraction} is not a whole number: "
            f"{reuse} samples are re-used (effective fraction {reuse / batch_size:.3f}).",
            stacklevel=2,
        )
    return reuse


class OverlappingBatchSampler(torch.utils.data.Sampler[list[tuple[int, bool]]]):
    """Yields this process's micro-batches as lists of `(dataset_index, reused)`, re-used entries first."""

    batch_size = None  # batches vary in size (the first and last steps), which accelerate must not "fix"

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        reuse_count: int,
        gradient_accumulation_steps: int = 1,
        num_processes: int = 1,
        process_index: int = 0,
        seed: int = 0,
        shuffle: bool = True,
    ):
        if batch_size < 2 or not 1 <= reuse_count <= batch_size - reuse_count:
            raise ValueError(
                f"batch_size={batch_size} with reuse_count={reuse_count}: need batch_size >= 2 and "
                "1 <= reuse_count <= batch_size - reuse_count."
            )
        if gradient_accumulation_steps < 1 or not 0 <= process_index < num_processes:
            raise ValueError(
                f"Invalid gradient_accumulation_steps={gradient_accumulation_steps} or process {process_index} of "
                f"{num_processes}."
            )
        self.num_samples = num_samples
        self.reuse_count = reuse_count
        self.new_per_batch = batch_size - reuse_count
        self.accumulation = gradient_accumulation_steps
        self.num_processes = num_processes
        self.process_index = process_index
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.new_per_step = gradient_accumulation_steps * num_processes * self.new_per_batch
        if num_samples < self.new_per_step:
            raise ValueError(
                f"One optimizer step takes {self.new_per_step} new samples (gradient_accumulation_steps x processes x "
                f"new per batch) but the dataset has {num_samples}. Use more data or lower "
                "`per_device_train_batch_size` / `gradient_accumulation_steps`."
            )
        self.steps_per_epoch = math.ceil(num_samples / self.new_per_step)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps_per_epoch * self.accumulation

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        order = self._permutation(self.epoch)
        previous = self._permutation(self.epoch - 1) if self.epoch > 0 else None
        for step in range(self.steps_per_epoch):
            for slot in range(self.accumulation):
                if step > 0:
                    reused = self._new(order, step - 1, slot)
                elif previous is not None:
                    reused = self._new(previous, self.steps_per_epoch - 1, slot)
                else:
                    reused = []
                reused = reused[: self.reuse_count]
                yield [(i, True) for i in reused] + [(i, False) for i in self._new(order, step, slot)]

    def _new(self, order: list[int], step: int, slot: int) -> list[int]:
        """The new samples of chain (slot, this process) at `step`: consecutive blocks, process-minor."""
        chain = slot * self.num_processes + self.process_index
        start = step * self.new_per_step + chain * self.new_per_batch
        return order[start : start + self.new_per_batch]

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        return torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
