"""The real bundled SmolLM2-135M-Instruct rewriting GSM8K rows with the math checker: report, cache and resume."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_selfdistill import BUNDLED_MODEL_NAME, distill_dataset, resolve_model_name
from trl_selfdistill.cache import RowCache
from trl_selfdistill.data import bundled_gsm8k, gsm8k_to_prompt_completion
from trl_selfdistill.generation import TransformersEngine
from trl_selfdistill.sdft.checkers import extract_last_number

SPEC = dict(template="gsm8k", checker="math", generation_kwargs={"max_new_tokens": 64}, seed=0)
REWRITE = {**SPEC, "batch_size": 2}


class KilledAfter(TransformersEngine):
    """The real engine, in a process that dies (KeyboardInterrupt) once `batches` batches are done."""

    def __init__(self, model, tokenizer, batches: int):
        super().__init__(model, tokenizer, batch_size=2)
        self.batches_left = batches

    def generate_blocks(self, blocks, decoding):
        for group in super().generate_blocks(blocks, decoding):
            if self.batches_left == 0:
                raise KeyboardInterrupt
            self.batches_left -= 1
            yield group


@pytest.fixture(scope="module")
def seed_model(bundled_model_dir):
    return AutoModelForCausalLM.from_pretrained(bundled_model_dir), AutoTokenizer.from_pretrained(bundled_model_dir)


def test_interrupted_rewrite_resumes_without_regenerating(seed_model, tmp_path):
    model, tokenizer = seed_model
    dataset = gsm8k_to_prompt_completion(bundled_gsm8k("train", n=4))
    cache_root = tmp_path / "cache"

    with pytest.raises(KeyboardInterrupt):
        distill_dataset(
            model, tokenizer, dataset, cache_dir=cache_root, engine=KilledAfter(model, tokenizer, 1), **SPEC
        )
    (cache_dir,) = (cache_root / "rewrites").iterdir()
    before_resume = RowCache(cache_dir).load()
    assert len(before_resume) == 2  # k = 2 rows survived the kill

    resumed = distill_dataset(model, tokenizer, dataset, cache_dir=cache_root, show_progress=False, **REWRITE)
    report = resumed.report
    assert (report["total"], report["generated"], report["from_cache"]) == (4, 2, 2)
    after_resume = RowCache(cache_dir).load()
    assert all(after_resume[key] == record for key, record in before_resume.items())  # not regenerated

    # Resuming loses nothing: an uninterrupted run in a fresh cache writes the very same rewrites.
    uninterrupted = distill_dataset(
        model, tokenizer, dataset, cache_dir=tmp_path / "fresh", show_progress=False, **REWRITE
    )
    assert uninterrupted.report["generated"] == 4
    assert RowCache(next((tmp_path / "fresh" / "rewrites").iterdir())).load() == after_resume

    # The report adds up, and the math checker kept only rewrites that carry the reference's final answer.
    assert report["accepted"] + report["fallback"] == 4
    assert report["fallback"] == sum(v for k, v in report.items() if k.startswith("rejected_"))
    for original, distilled in zip(dataset["completion"], resumed.dataset["completion"], strict=True):
        reference, response = original[0]["content"], distilled[0]["content"]
        assert response == reference or extract_last_number(response) == extract_last_number(reference)
    assert (
        sum(o != d for o, d in zip(dataset["completion"], resumed.dataset["completion"], strict=True))
        == report["accepted"]
    )

    # A rerun reuses the whole cache.
    rerun = distill_dataset(model, tokenizer, dataset, cache_dir=cache_root, show_progress=False, **REWRITE)
    assert rerun.report["generated"] == 0 and rerun.dataset["completion"] == resumed.dataset["completion"]


def test_the_bundled_model_by_name_outside_the_trainers(bundled_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_name(BUNDLED_MODEL_NAME))
    dataset = gsm8k_to_prompt_completion(bundled_gsm8k("train", n=2))
    result = distill_dataset(BUNDLED_MODEL_NAME, tokenizer, dataset, cache_dir=tmp_path, show_progress=False,
                             **{**REWRITE, "generation_kwargs": {"max_new_tokens": 16}})  # fmt: skip
    assert result.report["generated"] == 2 and result.report["engine"] == "transformers"
    assert all(entry["rewrite"] for entry in result.rows)  # the model itself rewrote both, loaded from the name
