"""The generation engine behind the rewrite: one small interface, so a faster backend can be plugged in later.

An engine turns a batch of fully rendered prompts (special tokens already in the text) into completions. Batching
order, caching and progress are the caller's business (see `trl_selfdistill.sdft.rewrite`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


class GenerationEngine(Protocol):
    """What the rewrite needs from a generator."""

    def generate(self, prompts: list[str], generation_kwargs: dict[str, Any], seed: int) -> list[str]:
        """Returns one completion per prompt, decoded without special tokens and stripped; same seed, same output."""
        ...


class TransformersEngine:
    """`model.generate` on left-padded batches, under inference mode, in eval mode, with the adapter disabled if any.

    Args:
        model: a causal LM, a PEFT model (its adapter is disabled while generating: the rewrite must come from the
            seed model), a 4-bit model included.
        tokenizer: the model's tokenizer; its padding side is restored after each batch.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
        self.model = model
        self.tokenizer = tokenizer
        if tokenizer.pad_token is None:
            raise ValueError("The tokenizer has no pad token: set `tokenizer.pad_token` (e.g. to its eos token).")

    def generate(self, prompts: list[str], generation_kwargs: dict[str, Any], seed: int) -> list[str]:
        device = next(self.model.parameters()).device
        padding_side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            inputs = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        finally:
            self.tokenizer.padding_side = padding_side
        _keep_4bit_weights_trainable(self.model)
        was_training = self.model.training
        self.model.eval()
        # Seeded per batch without disturbing the caller's random state (training keeps its own stream).
        devices = [device] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), torch.inference_mode(), self._seed_model():
                torch.manual_seed(seed)
                output = self.model.generate(
                    **inputs,
                    **generation_kwargs,
                    pad_token_id=self.tokenizer.pad_token_id,
                    use_cache=True,  # gradient checkpointing turns the cache off in the config
                )
        finally:
            self.model.train(was_training)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return [text.strip() for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

    def _seed_model(self):
        disable_adapter = getattr(self.model, "disable_adapter", None)
        return disable_adapter() if callable(disable_adapter) else contextlib.nullcontext()


def _keep_4bit_weights_trainable(model: torch.nn.Module) -> None:
    """Stops bitsandbytes from repacking 4-bit weights for CPU inference during generation.

    On CPUs with AVX512-BF16, `Linear4bit.forward` in eval mode converts its weight to an inference-only layout and
    never converts it back, after which training through that layer gets no gradient (QLoRA would silently not learn).
    Generation here is a one-off before training, so the slower training-compatible path is the right trade.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
