"""The in-process engine: `model.generate` on length-sorted, left-padded batches, as large as memory allows.

Rows are sorted longest first, so similar lengths share a batch (little padding) and an out-of-memory error shows up
on the first batch. With `batch_size="auto"` the first batch is sized from the free accelerator memory and halved on
out-of-memory until it fits; nothing finished is lost, since every batch is handed back as soon as it is done.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import inspect
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging

from .base import Completion, Prompt, ScoringRow, numbered

logger = logging.get_logger(__name__)

# `"auto"` without an accelerator: on 2 CPU cores batch 16 was the fastest measured (benchmarks/rewrite_throughput.py);
# larger batches lose more to padding and to rows waiting for the longest one than they gain.
CPU_AUTO_BATCH_SIZE = 16
# `"auto"` never starts above this: longer batches only add padding and rows that wait for the slowest one.
MAX_AUTO_BATCH_SIZE = 512
# Share of the free accelerator memory the KV cache may take; the rest is for activations and the allocator.
KV_CACHE_MEMORY_FRACTION = 0.6
# Unquantized seed weights are loaded only if they take at most this share of the free accelerator memory.
UNQUANTIZED_MEMORY_FRACTION = 0.7
# Rows per forward pass when scoring: only the scored tokens' logits are held (16 was 1.7x faster than 4 on 2 CPU
# cores, bundled model, IFEval answers of up to 256 tokens).
SCORE_BATCH_SIZE = 16


class TransformersEngine:
    """`model.generate` under inference mode, in eval mode, by default with the adapter disabled if any.

    Args:
        model: a causal LM, or a PEFT model (its adapter is disabled while generating: the rewrite must come from the
            seed model); 4-bit and 8-bit models included.
        tokenizer: the model's tokenizer; it is not modified.
        batch_size: prompts per `generate` call, or `"auto"`: sized from free memory, halved on out-of-memory.
        disable_adapter: generate with the seed model, a PEFT model's adapter disabled (False to evaluate the
            fine-tuned model).
        static_cache: preallocate the KV cache instead of growing it at each step. `"auto"`: on a GPU only, where it
            measured 1.8x faster (7B, 4-bit, batch 256); on a CPU it did not pay.
        compile: with a static cache on a GPU and unquantized weights, compile the decoding step: 2.6x faster once
            compiled (7B, bf16), but every new batch shape (rows x length) compiles again, about 35 s each for a 7B
            model. Off by default; it pays on long rewrites.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int | str = "auto",
        disable_adapter: bool = True,
        static_cache: bool | str = "auto",
        compile: bool = False,
    ):
        if batch_size != "auto" and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"`batch_size` must be a positive integer or 'auto', got {batch_size!r}.")
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_token_id is None:
            raise ValueError("The tokenizer has neither a pad nor an eos token: set `tokenizer.pad_token`.")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.disable_adapter = disable_adapter
        self.static_cache = _device_of(model).type == "cuda" if static_cache == "auto" else bool(static_cache)
        self.compile = compile
        self.pad_token_id = pad_token_id
        self._fitting_tokens = 0  # with "auto", the tokens of the batch that fitted after running out of memory

    def identity(self) -> dict[str, Any]:
        """The seed weights, identified cheaply: name, class, size and a strided sample of a few tensors."""
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        params = [p for name, p in base.named_parameters() if "lora_" not in name]
        digest = hashlib.sha256()
        for param in (params[0], params[len(params) // 2], params[-1]):
            flat = param.detach().reshape(-1)
            digest.update(flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy().tobytes())
        return {
            "name": getattr(base.config, "_name_or_path", ""),
            "class": type(base).__name__,
            "num_parameters": sum(p.numel() for p in params),
            "weights": digest.hexdigest()[:20],
        }

    @property
    def position_limit(self) -> int | None:
        config = self.model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        limit = getattr(text_config, "max_position_embeddings", None)
        return int(limit) if limit else None

    @property
    def deal_size(self) -> int:
        # A fixed batch size makes batches, so their samples, the same under any number of processes if whole
        # batches are dealt; with "auto" the size depends on each process's memory anyway.
        return self.batch_size if isinstance(self.batch_size, int) else 1

    def check(self, decoding: Mapping[str, Any]) -> None:
        """Nothing to probe: `model.generate` refuses what it does not know when it starts."""

    def block_size(self, longest_prompt: int, decoding: Mapping[str, Any], rows: int) -> int:
        return self.planned_batch_size(longest_prompt, decoding, rows)

    def generate(
        self, prompts: list[str], decoding: Mapping[str, Any], seeds: list[int]
    ) -> Iterator[list[Completion]]:
        return self.generate_blocks([numbered(prompts, seeds)], decoding)

    def generate_blocks(
        self, blocks: Iterable[list[Prompt]], decoding: Mapping[str, Any]
    ) -> Iterator[list[Completion]]:
        for block in blocks:
            yield from self._generate_block(block, decoding)

    def _generate_block(self, prompts: list[Prompt], decoding: Mapping[str, Any]) -> Iterator[list[Completion]]:
        """Length-sorted batches of `prompts`; with "auto", the batch size halves on out-of-memory."""
        if not prompts:
            return
        token_ids = self.tokenizer([prompt.text for prompt in prompts], add_special_tokens=False)["input_ids"]
        order = sorted(range(len(prompts)), key=lambda i: -len(token_ids[i]))
        batch_size = self.planned_batch_size(len(token_ids[order[0]]), decoding, len(prompts))
        start = 0
        while start < len(order):
            batch = order[start : start + batch_size]
            try:
                completions = self._generate_batch([token_ids[i] for i in batch], decoding, prompts[batch[0]].seed)
            except torch.OutOfMemoryError:
                if self.batch_size != "auto" or batch_size == 1:
                    raise
                batch_size //= 2
                self._fitting_tokens = batch_size * _tokens_per_row(len(token_ids[batch[0]]), decoding)
                _release_cached_memory()
                logger.warning(f"Out of memory while rewriting: retrying with batches of {batch_size} prompts.")
                continue
            yield [Completion(prompts[i].index, text, cut) for i, (text, cut) in zip(batch, completions, strict=True)]
            start += len(batch)

    def planned_batch_size(self, longest_prompt: int, decoding: Mapping[str, Any], num_prompts: int) -> int:
        """The batch size `generate` starts with on these prompts: `batch_size`, or with `"auto"` what should fit."""
        if self.batch_size != "auto":
            return self.batch_size
        tokens_per_row = _tokens_per_row(longest_prompt, decoding)
        # Once out of memory, never start above what then fitted: callers generating block by block pay it once.
        limit = self._fitting_tokens // tokens_per_row if self._fitting_tokens else MAX_AUTO_BATCH_SIZE
        device = _device_of(self.model)
        if device.type != "cuda":  # no free-memory query elsewhere: the size measured fastest on a CPU
            return max(1, min(CPU_AUTO_BATCH_SIZE, num_prompts, limit))
        free_bytes, _ = torch.cuda.mem_get_info(device)
        row_bytes = max(tokens_per_row * _kv_cache_bytes_per_token(self.model), 1)
        fitting = int(free_bytes * KV_CACHE_MEMORY_FRACTION // row_bytes)
        return max(1, min(fitting, MAX_AUTO_BATCH_SIZE, num_prompts, limit))

    def _generate_batch(
        self, token_ids: list[list[int]], decoding: Mapping[str, Any], seed: int
    ) -> list[tuple[str, bool]]:
        """Each row's text, and whether it ran to `max_new_tokens` without an end token."""
        device = _device_of(self.model)
        input_ids, attention_mask = _left_pad(token_ids, self.pad_token_id, device)
        # Seeded per batch without disturbing the caller's random state (training keeps its own stream).
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), self.inference() as model:
            torch.manual_seed(seed)
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                **decoding,
                pad_token_id=self.pad_token_id,
                use_cache=True,  # gradient checkpointing turns the cache off in the config
                **({"cache_implementation": "static"} if self.static_cache else {}),
                disable_compile=not self.compile,  # transformers compiles static-cache decoding on a GPU
            )
        new_tokens = output[:, input_ids.shape[1] :]
        texts = [text.strip() for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        return list(zip(texts, self._cut(new_tokens, decoding), strict=True))

    def _cut(self, new_tokens: torch.Tensor, decoding: Mapping[str, Any]) -> list[bool]:
        """Rows that never produced an end token (a finished row is padded after it) and filled `max_new_tokens`."""
        model_config = getattr(self.model, "generation_config", None)
        stops = {self.pad_token_id}
        for ids in (
            decoding.get("eos_token_id"),
            getattr(model_config, "eos_token_id", None),
            self.tokenizer.eos_token_id,
        ):
            stops.update([ids] if isinstance(ids, int) else ids or [])
        finished = torch.isin(new_tokens, torch.tensor(sorted(stops), device=new_tokens.device)).any(dim=1)
        limit = decoding.get("max_new_tokens")
        return [not done and (limit is None or new_tokens.shape[1] >= limit) for done in finished.tolist()]

    def scoring_unavailable(self) -> str | None:
        return None  # the logits are at hand

    def score(self, rows: list[ScoringRow]) -> list[tuple[float, int]]:
        """The summed NLL of each row's `ids[first:]` and their number, in float32 (see `ScoringEngine.score`)."""
        return [(sum(losses), len(losses)) for losses in self.token_nlls(rows)]

    def token_nlls(self, rows: list[ScoringRow]) -> list[list[float]]:
        """Each row's per-token NLL of `ids[first:]` (the first token, predicted by nothing, is never scored).

        Rows are left-padded with their own position ids, so every row's scored tokens end the batch and only their
        logits are computed (`logits_to_keep`): the output layer and the float32 log-softmax, most of the cost over
        a 49k vocabulary, skip the prompts.
        """
        results: list[list[float]] = [[] for _ in rows]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i].ids))  # similar lengths share a batch
        with self.inference() as model:
            device = _device_of(model)
            keeps_logits = _accepts_logits_to_keep(model)
            for start in range(0, len(order), SCORE_BATCH_SIZE):
                batch = [i for i in order[start : start + SCORE_BATCH_SIZE] if _scored_count(rows[i])]
                if not batch:
                    continue
                input_ids, attention_mask = _left_pad([rows[i].ids for i in batch], self.pad_token_id, device)
                position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
                scored = [_scored_count(rows[i]) for i in batch]
                kept = max(scored) + 1  # the logits before each scored token, the last one's included
                extra = {"logits_to_keep": kept} if keeps_logits else {}
                logits = model(
                    input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **extra
                ).logits[:, -kept:]
                for position, (i, count) in enumerate(zip(batch, scored, strict=True)):
                    # Token t is predicted from position t - 1; one row at a time keeps the float32 copy small.
                    predicted = logits[position, kept - 1 - count : kept - 1].float()
                    targets = torch.tensor(rows[i].ids[-count:], device=predicted.device)
                    losses = torch.nn.functional.cross_entropy(predicted, targets, reduction="none")
                    results[i] = losses.tolist()
        return results

    @contextlib.contextmanager
    def inference(self) -> Iterator[PreTrainedModel]:
        """The model in eval and inference mode (the seed model: adapter disabled, unless told otherwise)."""
        _keep_4bit_weights_trainable(self.model)
        was_training = self.model.training
        self.model.eval()
        disable_adapter = getattr(self.model, "disable_adapter", None)
        adapter_off = self.disable_adapter and callable(disable_adapter)
        try:
            with torch.inference_mode(), disable_adapter() if adapter_off else contextlib.nullcontext():
                yield self.model
        finally:
            self.model.train(was_training)


def _scored_count(row: ScoringRow) -> int:
    """How many of the row's tokens are scored: from `first` on, never the first token (nothing predicts it)."""
    return max(len(row.ids) - max(row.first, 1), 0)


def _accepts_logits_to_keep(model: PreTrainedModel) -> bool:
    """Whether the causal LM (under any PEFT wrapper) can compute the logits of its last positions only."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def unquantized_seed_model(model: PreTrainedModel) -> PreTrainedModel | None:
    """The quantized `model`'s original weights, in its compute dtype on its device, if they fit; else None.

    They are loaded again from the name or path the model was loaded from. None, with a warning, when the model is
    not quantized, its checkpoint is itself quantized, or the weights do not fit in the free accelerator memory.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    quantization = getattr(base.config, "quantization_config", None)
    if quantization is None:
        logger.warning("`sdft_unquantized_seed=True` has no effect: the model is not quantized.")
        return None
    compute_dtype = getattr(quantization, "bnb_4bit_compute_dtype", None) or base.dtype
    if isinstance(quantization, dict):
        compute_dtype = quantization.get("bnb_4bit_compute_dtype") or base.dtype
    config = AutoConfig.from_pretrained(base.name_or_path)
    if getattr(config, "quantization_config", None) is not None:
        logger.warning(f"{base.name_or_path} is a quantized checkpoint: the rewrite uses the quantized weights.")
        return None
    device = _device_of(base)
    with torch.device("meta"):
        size = AutoModelForCausalLM.from_config(config).num_parameters() * torch.finfo(compute_dtype).bits // 8
    if device.type == "cuda" and size > torch.cuda.mem_get_info(device)[0] * UNQUANTIZED_MEMORY_FRACTION:
        free = torch.cuda.mem_get_info(device)[0]
        logger.warning(
            f"The unquantized seed weights ({size / 1e9:.1f} GB) do not fit in the free GPU memory ({free / 1e9:.1f} "
            "GB) with room to generate: the rewrite uses the quantized weights."
        )
        return None
    return AutoModelForCausalLM.from_pretrained(base.name_or_path, dtype=compute_dtype, device_map={"": device})


def release_unquantized(model: PreTrainedModel) -> None:
    """Frees the unquantized seed weights before training needs the memory."""
    model.to("meta")
    _release_cached_memory()


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _left_pad(token_ids: list[list[int]], pad_token_id: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    width = max(len(ids) for ids in token_ids)
    input_ids = torch.full((len(token_ids), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(token_ids), width), dtype=torch.long)
    for row, ids in enumerate(token_ids):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _tokens_per_row(prompt_tokens: int, decoding: Mapping[str, Any]) -> int:
    return prompt_tokens + int(decoding.get("max_new_tokens") or 512)


def _kv_cache_bytes_per_token(model: PreTrainedModel) -> int:
    """Keys and values of every layer for one token, in the model's compute dtype."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    dtype = getattr(config, "dtype", None) or torch.float32
    element = torch.finfo(dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype))).bits // 8
    return 2 * config.num_hidden_layers * kv_heads * head_dim * element


def _release_cached_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _keep_4bit_weights_trainable(model: torch.nn.Module) -> None:
    """Stops bitsandbytes from repacking 4-bit weights for CPU inference during generation.

    On CPUs with AVX512-BF16, `Linear4bit.forward` in eval mode converts its weight to an inference-only layout and
    never converts it back, after which training through that layer gets no gradient (QLoRA would silently not learn).
    Generation here is a one-off before training, so the slower training-compatible path is the right trade.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
