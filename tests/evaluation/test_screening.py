"""The reference-style screening (stage 0 of the forgetting experiment): its command on the bundled model, its
numbers recomputed independently, and the qualifying rule on hand-made results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_selfdistill import distill_dataset
from trl_selfdistill.data import bundled_addition, gsm8k_to_prompt_completion
from trl_selfdistill.evaluation.screening import STYLE_MARKERS, markdown_table, qualifying_options
from trl_selfdistill.generation import TransformersEngine
from trl_selfdistill.sdft.checkers import false_equations
from trl_selfdistill.sdft.gap import response_nll, response_rows

EXAMPLES = Path(__file__).parents[2] / "examples"


def test_screening_command_on_the_bundled_model(tmp_path, bundled_model_dir):
    command = [sys.executable, str(EXAMPLES / "screen_reference_styles.py"), "--model_name_or_path", bundled_model_dir,
               "--rows", "4", "--styles", "german", "native", "--options", "greedy", "--checkers", "math",
               "math_strict", "--cache_dir", str(tmp_path / "cache"),
               "--output_dir", str(tmp_path / "out")]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    assert completed.returncode == 0, completed.stderr[-4000:]
    record = json.loads((tmp_path / "out" / "screening.json").read_text())
    assert "| german | " in completed.stdout and (tmp_path / "out" / "screening.md").is_file()

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_dir)
    model = AutoModelForCausalLM.from_pretrained(bundled_model_dir, dtype=torch.bfloat16)
    engine = TransformersEngine(model, tokenizer, 16)
    for style in ("german", "native"):
        dataset = gsm8k_to_prompt_completion(bundled_addition("train", n=4, style=style))
        pairs = [(row["prompt"][0]["content"], row["completion"][0]["content"]) for row in dataset]
        references = record["styles"][style]["references"]
        losses = [loss for row in engine.token_nlls(response_rows(tokenizer, pairs)) for loss in row]
        assert references["seed_nll"] == pytest.approx(sum(losses) / len(losses), abs=1e-4)
        assert references["share_above_3_nats"] == pytest.approx(sum(loss > 3 for loss in losses) / len(losses))
        assert references["tokens"] == pytest.approx(len(losses) / 4)
        for checker in ("math", "math_strict"):
            row = record["styles"][style]["options"]["greedy"][checker]
            again = distill_dataset(model, tokenizer, dataset, engine=engine, template="gsm8k", checker=checker,
                                    generation_kwargs={"do_sample": False, "max_new_tokens": 256},
                                    cache_dir=tmp_path / "cache", show_progress=False)  # fmt: skip
            assert again.report["generated"] == 0  # the command's rewrites, from its cache
            assert row["accepted"] == again.report["accepted"] and row["total"] == 4
            assert row["seed_nll_trained_on"] == again.report["seed_nll_distilled"]
            texts = [entry["text"] for entry in row["generated"]]
            assert texts == [again.dataset["completion"][entry["row"]][0]["content"] for entry in row["generated"]]
            assert row["generated_with_false_equation"] == sum(bool(false_equations(text)) for text in texts)
            assert row["generated_in_reference_style"] == sum(bool(STYLE_MARKERS[style].search(t)) for t in texts)
            if texts:
                scored = response_nll(engine, tokenizer, [(pairs[e["row"]][0], e["text"]) for e in row["generated"]])
                pooled = sum(total for total, _ in scored) / sum(count for _, count in scored)
                assert row["seed_nll_generated_targets"] == pytest.approx(pooled, abs=1e-4)
        strict, loose = (record["styles"][style]["options"]["greedy"][c] for c in ("math_strict", "math"))
        assert strict["accepted"] == loose["accepted"] - loose["generated_with_false_equation"]


def entry(reference_nll: float, accepted_share: float, trained_on: float) -> dict:
    row = {"accepted": int(100 * accepted_share), "total": 100, "accepted_share": accepted_share,
           "seed_nll_trained_on": trained_on, "seed_nll_generated_targets": trained_on - 0.1,
           "generated_with_false_equation": 3, "generated_in_reference_style": 1}  # fmt: skip
    references = {"seed_nll": reference_nll, "share_above_3_nats": 0.3, "tokens": 70.0}
    return {"references": references, "options": {"greedy": {"math": row}}}


def test_a_style_qualifies_by_the_rule_fixed_before_the_screening():
    screened = {
        "german": entry(2.7, 0.72, 2.1),  # far, accepted, 0.6 nat closer: qualifies
        "near": entry(0.9, 0.9, 0.3),  # references too close to the model
        "rare": entry(2.5, 0.6, 1.5),  # too few targets generated
        "copied": entry(2.5, 0.9, 2.2),  # the targets barely closer
    }
    assert qualifying_options(screened) == {"german": [("greedy", "math")], "rare": [], "copied": []}
    table = markdown_table(screened)
    assert "| german | 70 | 2.700 | 30 % | greedy | math | 72/100 (72 %) | 2.100 | 2.000 | 3 | 1 |" in table
