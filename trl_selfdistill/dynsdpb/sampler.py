"""The overlapping batches of DLB (Shen et al., CVPR 2022), used by DynSDPB (Fu et al., arXiv 2411.16991).

**Chains.** A per-device micro-batch is the first `k = reuse_count` samples that were *new* in the same micro-batch
slot one optimizer step earlier (re-used, listed first) plus `B - k` new samples, where
`B = per_device_train_batch_size` and `k = round(B * dynsdpb_reuse_fraction)` (see `reuse_count_for`). A micro-batch
slot `g` (the gradient-accumulation index, `0 <= g < G`) on process `w` (`0 <= w < W`) is a *chain*; the `G * W` chains
are independent. Keeping the re-use inside a chain makes "the previous batch" always exactly one optimizer update
earlier, for any `gradient_accumulation_steps` and any number of processes, and keeps the cached logits of a sample on
the process that produced them (nothing crosses processes).

**Epochs and steps.** An epoch makes every sample new exactly once, over all chains together: in optimizer step `s`
chain `(g, w)` takes the new samples `perm[start : start + B - k]` with `start = (s * G * W + g * W + w) * (B - k)` of
the epoch's permutation. An epoch therefore takes `steps_per_epoch = ceil(N / (G * W * (B - k)))` optimizer steps (the
last one may give some chains fewer or no new samples), which is what the trainer counts per epoch for
`num_train_epochs`. Every sample is seen twice per epoch (new, then re-used one step later), so an epoch costs about
twice the forward/backward compute of an SFT epoch with the same batch size; with `dynsdpb_reuse_fraction = 0.5` an
epoch has twice as many optimizer steps as SFT with the same `per_device_train_batch_size`. As in DLB, the cache is
carried across epoch boundaries: the re-used samples of an epoch's first step are the last step's new samples of the
epoch before (only the very first step of training has none).

**Processes.** The sampler is rank-aware: each process builds its own and it yields only that process's
micro-batches, so the trainer makes accelerate's `BatchSamplerShard` a passthrough (as transformers does for its
`BatchRebalanceSampler`). Batches depend only on the arguments and the epoch, never on iteration history, so a
resumed run that skips the first batches of an epoch sees exactly the ones an uninterrupted run would.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch


def reuse_count_for(batch_size: int, reuse_fraction: float) -> int:
    """Re-used samples per micro-batch, `k = round(batch_size * reuse_fraction)`, validated against the batch size."""
    if not math.isfinite(reuse_fraction):
        raise ValueError(
            f"dynsdpb_reuse_fraction={reuse_fraction} is not a number: use a value in (0, 0.5], e.g. 0.5."
        )
    reuse = round(batch_size * reuse_fraction)
    # The previous step of a chain had only `batch_size - reuse` new samples, so more cannot be re-used.
    if reuse < 1 or reuse > batch_size - reuse:
        raise ValueError(
            f"per_device_train_batch_size={batch_size} with dynsdpb_reuse_fraction={reuse_fraction} gives {reuse} "
            "re-used samples per batch, but DynSDPB needs 1 <= re-used <= new (= batch size - re-used; a batch of 1 "
            "can never re-use). Use per_device_train_batch_size >= 2 and a dynsdpb_reuse_fraction in (0, 0.5] that "
            "keeps at least one sample, e.g. per_device_train_batch_size=8 with dynsdpb_reuse_fraction=0.5 (4 re-used "
            "+ 4 new)."
        )
    return reuse


def check_dataset_size(
    num_samples: int, batch_size: int, reuse_count: int, gradient_accumulation_steps: int, num_processes: int
) -> int:
    """The new samples one optimizer step takes (`G x W x (B - k)`); fails if the dataset cannot fill one step.

    The first step must fill every chain, or some chain would start empty and never re-use anything.
    """
    new_per_step = gradient_accumulation_steps * num_processes * (batch_size - reuse_count)
    if num_samples < new_per_step:
        raise ValueError(
            f"The training dataset has {num_samples} rows but one optimizer step takes {new_per_step} new samples "
            f"(gradient_accumulation_steps={gradient_accumulation_steps} x processes={num_processes} x new per "
            f"batch={batch_size - reuse_count}). Use at least {new_per_step} rows, or lower "
            "per_device_train_batch_size, gradient_accumulation_steps or the number of processes."
        )
    return new_per_step


class OverlappingBatchSampler(torch.utils.data.Sampler[list[tuple[int, bool]]]):
    """Yields this process's micro-batches as lists of `(dataset_index, reused)`, re-used entries first.

    Order on process `w`: for each optimizer step, the batches of chains `(0, w), (1, w), ..., (G - 1, w)`.
    """

    # Batches vary in size (the first and last steps): `None` tells accelerate not to pad or check them.
    batch_size = None

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
    ) -> None:
        if batch_size < 2:
            raise ValueError(
                f"batch_size={batch_size}: overlapping batches need at least 2 samples per micro-batch (1 re-used + "
                "1 new). Raise per_device_train_batch_size to 2 or more."
            )
        if not 1 <= reuse_count <= batch_size - reuse_count:
            raise ValueError(
                f"reuse_count={reuse_count} with batch_size={batch_size}: need 1 <= reuse_count <= batch_size - "
                f"reuse_count (the previous step has only that many new samples). Use a reuse_count between 1 and "
                f"{batch_size // 2}."
            )
        if gradient_accumulation_steps < 1:
            raise ValueError(
                f"gradient_accumulation_steps={gradient_accumulation_steps}: must be at least 1 (1 = no accumulation)."
            )
        if num_processes < 1 or not 0 <= process_index < num_processes:
            raise ValueError(
                f"process_index={process_index} with num_processes={num_processes}: need num_processes >= 1 and "
                "0 <= process_index < num_processes. Pass the accelerator's `process_index` and `num_processes`."
            )
        self.num_samples = num_samples
        self.reuse_count = reuse_count
        self.new_per_batch = batch_size - reuse_count
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.num_processes = num_processes
        self.process_index = process_index
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.new_per_step = check_dataset_size(
            num_samples, batch_size, reuse_count, gradient_accumulation_steps, num_processes
        )
        self.steps_per_epoch = math.ceil(num_samples / self.new_per_step)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches `__iter__` yields (its permutation and the previous epoch's last step)."""
        self.epoch = epoch

    def __len__(self) -> int:
        # The same on every rank (chains with no new samples in the last step still yield their re-used ones), so
        # all processes take the same number of optimizer steps.
        return self.steps_per_epoch * self.gradient_accumulation_steps

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        order = self._permutation(self.epoch)
        # At step 0 the previous step is the last step of the previous epoch (DLB carries the cache over epochs).
        previous_order = self._permutation(self.epoch - 1) if self.epoch > 0 else None
        for step in range(self.steps_per_epoch):
            for slot in range(self.gradient_accumulation_steps):
                if step > 0:
                    reused = self._new(order, step - 1, slot)
                elif previous_order is not None:
                    reused = self._new(previous_order, self.steps_per_epoch - 1, slot)
                else:
                    reused = []
                new = self._new(order, step, slot)
                yield [(index, True) for index in reused[: self.reuse_count]] + [(index, False) for index in new]

    def _new(self, order: list[int], step: int, slot: int) -> list[int]:
        """New samples of chain (slot, this process) at `step`: consecutive blocks, process index fastest."""
        chain = slot * self.num_processes + self.process_index
        start = step * self.new_per_step + chain * self.new_per_batch
        return order[start : start + self.new_per_batch]

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        # A fresh generator per epoch keeps the batches independent of iteration history (resume-safe).
        return torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
