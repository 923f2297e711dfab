"""What one optimizer step leaves for the next: the logits each new sample got, on its response tokens only.

Two generations of entries: `previous` (written during the last optimizer step, read-only now) and `current` (being
written now). Moving to a new optimizer step promotes `current` to `previous`, so a teacher is always exactly one
update old, whatever the gradient accumulation, and a sample that is new and re-used in the same step (possible across
an epoch boundary) never sees its own fresh logits. Each process keeps its own cache: its chains never leave it.
"""

from __future__ import annotations

import torch


class TeacherCache:
    def __init__(self, dtype: torch.dtype = torch.bfloat16):
        self.dtype = dtype
        self.step: int | None = None  # the optimizer step whose forward passes wrote `current`
        self.current: dict[int, torch.Tensor] = {}
        self.previous: dict[int, torch.Tensor] = {}

    def advance_to(self, step: int) -> None:
        """Called before each micro-batch with the number of optimizer updates done so far."""
        if step == self.step:
            return
        self.previous = self.current if self.step == step - 1 else {}
        self.current = {}
        self.step = step

    def put(self, index: int, logits: torch.Tensor) -> None:
        """Stores a new sample's response-token logits `[num_response_tokens, vocab]`, detached and compact."""
        self.current[index] = logits.detach().to(self.dtype)

    def take(self, index: int) -> torch.Tensor | None:
        """The teacher of a re-used sample, written one optimizer step ago (None if there is none)."""
        return self.previous.pop(index, None)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.current.values(), *self.previous.values()))

    def state_dict(self) -> dict:
        """What a checkpoint taken after an optimizer step needs: the entries that step wrote."""
        return {"step": self.step, "entries": {index: t.cpu() for index, t in self.current.items()}}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        self.step = state["step"]
        self.current = {int(index): t.to(device) for index, t in state["entries"].items()}
        self.previous = {}
