"""What one optimizer step leaves for the next: each new sample's prediction on its response tokens.

An entry holds the sample's `states` (its final hidden states `[n, H]` when the output layer is frozen, else its
logits `[n, V]`) and the `statistics` `[u, d]` of that prediction (`schedule.SampleStatistics`), which the forward pass
that produced it computed for free.

Two generations of entries: `previous` (written during the last optimizer step, read-only now) and `current` (being
written now). Moving to a new optimizer step promotes `current` to `previous`, so a teacher is always exactly one
update old, whatever the gradient accumulation, and a sample that is new and re-used in the same step (possible across
an epoch boundary) never sees its own fresh prediction. Each process keeps its own cache: its chains never leave it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)


class Teacher(NamedTuple):
    states: torch.Tensor  # [n, H] final hidden states or [n, V] logits, in the cache dtype
    statistics: torch.Tensor  # [2] float32: uncertainty u and discrimination d of the prediction


class TeacherCache:
    def __init__(self, dtype: torch.dtype = torch.bfloat16, holds_hidden_states: bool = True):
        self.dtype = dtype
        self.holds_hidden_states = holds_hidden_states
        self.step: int | None = None  # the optimizer step whose forward passes wrote `current`
        self.current: dict[int, Teacher] = {}
        self.previous: dict[int, Teacher] = {}

    def advance_to(self, step: int) -> None:
        """Called before each micro-batch with the number of optimizer updates done so far."""
        if step == self.step:
            return
        self.previous = self.current if self.step == step - 1 else {}
        self.current = {}
        self.step = step

    def put(self, index: int, states: torch.Tensor, statistics: torch.Tensor) -> None:
        """Stores a new sample's prediction, detached and compact."""
        self.current[index] = Teacher(states.detach().to(self.dtype), statistics.detach().float())

    def take(self, index: int) -> Teacher | None:
        """The teacher of a re-used sample, written one optimizer step ago (None if there is none)."""
        return self.previous.pop(index, None)

    @property
    def kind(self) -> str:
        return "hidden_states" if self.holds_hidden_states else "logits"

    @property
    def nbytes(self) -> int:
        entries = (*self.current.values(), *self.previous.values())
        return sum(t.numel() * t.element_size() for entry in entries for t in entry)

    def state_dict(self) -> dict:
        """What a checkpoint taken after an optimizer step needs: the entries that step wrote."""
        return {
            "step": self.step,
            "kind": self.kind,
            "entries": {index: tuple(t.cpu() for t in entry) for index, entry in self.current.items()},
        }

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu", source: str = "the checkpoint") -> None:
        """Restores the entries onto `device` (the output layer's) in this cache's dtype.

        Entries of the other kind (the output layer was frozen in one run and trained in the other) cannot serve as
        teachers: they are dropped with a warning, and the first re-used samples train without distillation.
        """
        self.step, self.previous = state["step"], {}
        if state.get("kind") != self.kind:
            logger.warning(
                f"{source} holds teacher {state.get('kind')} but this run caches {self.kind} (the output layer is "
                f"{'frozen' if self.holds_hidden_states else 'trained'} now): resuming without the previous step's "
                "predictions, so the first re-used samples train without distillation."
            )
            self.current = {}
            return
        self.current = {
            int(index): Teacher(states.to(device=device, dtype=self.dtype), statistics.to(device))
            for index, (states, statistics) in state["entries"].items()
        }
