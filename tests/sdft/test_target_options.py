"""The training-target options beside the paper's SDFT: the seed model's own answer first (Selective Self-Rehearsal,
S3FT) and the least surprising passing candidate (GRAPE); the default stays the paper's rewrite, cache key included."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from datasets import Dataset
from tiny_models import addition_rows

from trl_selfdistill import SDFTConfig, SDFTTrainer, distill_dataset
from trl_selfdistill.cache import fingerprint
from trl_selfdistill.data import bundled_gsm8k, gsm8k_to_prompt_completion
from trl_selfdistill.generation import TransformersEngine
from trl_selfdistill.sdft import rewrite as rewrite_module
from trl_selfdistill.sdft.card import sdft_report_section
from trl_selfdistill.sdft.gap import response_nll
from trl_selfdistill.sdft.outputs import REPORT_FILE, ROWS_FILE
from trl_selfdistill.sdft.spec import DistillSpec

# A random tiny model never ends within 6 tokens: cut answers are kept, so the checker alone decides.
FAST = dict(generation_kwargs={"max_new_tokens": 6}, keep_truncated=True, batch_size=4, show_progress=False)
BOTH = ["own_answer", "rewrite"]
OLD_ROW_KEYS = {"row", "turn", "rewrite", "accepted", "reason", "truncated"}


def config(tmp_path, **fields) -> SDFTConfig:
    return SDFTConfig(output_dir=str(tmp_path), bf16=False, report_to=[], **fields)


def accept_any(text, reference, row):  # a custom callable: unlike the "none" checker, own answers may use it
    return True


def accepting(texts: set[str]):
    def checker(text, reference, row):
        return text in texts

    return checker


def candidate_texts(result) -> list[dict[str, str]]:
    return [{c["kind"]: c["text"] for c in entry["candidates"]} for entry in result.rows]


def first_run(tmp_path, model, tokenizer, dataset, **options):
    result = distill_dataset(model, tokenizer, dataset, candidates=BOTH, checker=accept_any, cache_dir=tmp_path,
                             **FAST, **options)  # fmt: skip
    assert all(c["accepted"] for entry in result.rows for c in entry["candidates"])  # no blank or banned text
    return result


def test_first_passing_is_own_answer_then_rewrite_then_reference(tmp_path, tiny_tokenizer, make_tiny_llama):
    model, dataset = make_tiny_llama(tiny_tokenizer), addition_rows(4)
    texts = candidate_texts(first_run(tmp_path, model, tiny_tokenizer, dataset))
    passing = {texts[0]["own_answer"], texts[0]["rewrite"], texts[1]["rewrite"], texts[3]["own_answer"]}
    result = distill_dataset(model, tiny_tokenizer, dataset, candidates=BOTH, checker=accepting(passing),
                             cache_dir=tmp_path, **FAST)  # fmt: skip

    assert [entry["target"] for entry in result.rows] == ["own_answer", "rewrite", "reference", "own_answer"]
    assert result.dataset["completion"] == [
        texts[0]["own_answer"], texts[1]["rewrite"], dataset["completion"][2], texts[3]["own_answer"]
    ]  # fmt: skip
    report = result.report
    assert report["generated"] == 0 and report["from_cache"] == 8  # both kinds came from the cache
    assert (report["target_own_answer"], report["target_rewrite"], report["target_reference"]) == (2, 1, 1)
    assert (report["accepted"], report["fallback"], report["rejected_checker"]) == (3, 1, 1)
    assert report["candidates"] == BOTH and report["selection"] == "first"
    # the audit: every candidate, its check, and the NLL of those scored (the references and the targets)
    row2, row3 = result.rows[2], result.rows[3]
    assert [(c["kind"], c["accepted"], c["reason"]) for c in row2["candidates"]] == [
        ("own_answer", False, "checker"), ("rewrite", False, "checker"), ("reference", True, None)
    ]  # fmt: skip
    assert (row2["accepted"], row2["reason"], row2["rewrite"]) == (False, "checker", texts[2]["rewrite"])
    assert row3["accepted"] and row3["reason"] is None and row3["candidates"][0]["text"] == texts[3]["own_answer"]
    assert [c["seed_nll"] is not None for c in row3["candidates"]] == [True, False, True]
    assert report["seed_nll_distilled"] != report["seed_nll_reference"]


def test_lowest_nll_trains_on_the_least_surprising_passing_candidate(tmp_path, tiny_tokenizer, make_tiny_llama):
    model, dataset = make_tiny_llama(tiny_tokenizer), addition_rows(4)
    result = first_run(tmp_path, model, tiny_tokenizer, dataset, selection="lowest_nll")
    engine = TransformersEngine(model, tiny_tokenizer, 4)
    expected_nll = []
    for entry, prompt in zip(result.rows, dataset["prompt"], strict=True):
        kinds = [c["kind"] for c in entry["candidates"]]
        scores = response_nll(engine, tiny_tokenizer, [(prompt, c["text"]) for c in entry["candidates"]])
        per_token = [nll / tokens for nll, tokens in scores]
        assert entry["target"] == kinds[per_token.index(min(per_token))]
        assert [c["seed_nll"] for c in entry["candidates"]] == pytest.approx(per_token, abs=1e-3)
        expected_nll.append(scores[kinds.index(entry["target"])])
    distilled = sum(nll for nll, _ in expected_nll) / sum(tokens for _, tokens in expected_nll)
    assert result.report["seed_nll_distilled"] == pytest.approx(distilled, abs=1e-3)
    assert result.report["seed_nll_distilled"] <= result.report["seed_nll_reference"]
    assert sum(result.report[f"target_{kind}"] for kind in ("own_answer", "rewrite", "reference")) == 4

    # A failing candidate is never trained on, however likely: reject each row's least surprising generated one.
    best = {min((c for c in entry["candidates"] if c["kind"] != "reference"), key=lambda c: c["seed_nll"])["text"]
            for entry in result.rows}  # fmt: skip
    others = {c["text"] for entry in result.rows for c in entry["candidates"]} - best
    strict = distill_dataset(model, tiny_tokenizer, dataset, candidates=BOTH, checker=accepting(others),
                             selection="lowest_nll", cache_dir=tmp_path, **FAST)  # fmt: skip
    assert strict.report["generated"] == 0
    for entry in strict.rows:
        chosen = next(c for c in entry["candidates"] if c["kind"] == entry["target"])
        assert chosen["accepted"] and chosen["text"] not in best
        passing = [c["seed_nll"] for c in entry["candidates"] if c["accepted"]]
        assert chosen["seed_nll"] == min(passing)
        assert all(c["seed_nll"] is None for c in entry["candidates"] if not c["accepted"])  # failing: not scored
        if entry["target"] == "reference" and len(passing) > 1:
            assert entry["reason"] == "higher_nll"


def test_default_keeps_its_report_rows_and_cache_key(tmp_path, tiny_tokenizer, make_tiny_llama):
    model, dataset = make_tiny_llama(tiny_tokenizer), addition_rows(3)
    pairs = list(zip(dataset["prompt"], dataset["completion"], strict=True))
    default = distill_dataset(model, tiny_tokenizer, dataset, checker=accept_any, cache_dir=tmp_path, **FAST)
    spec = DistillSpec.create(checker=accept_any, generation_kwargs=FAST["generation_kwargs"], keep_truncated=True)
    old_key = fingerprint(
        TransformersEngine(model, tiny_tokenizer, 4).identity(),
        [spec.render(prompt, completion, tiny_tokenizer) for prompt, completion in pairs],
        dict(spec.decoding),
        42,
    )
    assert Path(default.report["cache_dir"]) == tmp_path / "rewrites" / old_key
    assert list(default.report) == [
        "rows", "total", "accepted", "fallback", "skipped", "generated", "from_cache", "seed_nll_reference",
        "seed_nll_distilled", "template", "template_mode", "checker", "generation_kwargs", "engine", "cache_dir",
    ]  # fmt: skip
    assert all(set(entry) == OLD_ROW_KEYS and entry["accepted"] for entry in default.rows)
    engine = TransformersEngine(model, tiny_tokenizer, 4)
    refs = response_nll(engine, tiny_tokenizer, pairs)
    rewrites = response_nll(
        engine, tiny_tokenizer, list(zip(dataset["prompt"], default.dataset["completion"], strict=True))
    )
    for key, scores in (("seed_nll_reference", refs), ("seed_nll_distilled", rewrites)):
        assert default.report[key] == pytest.approx(sum(s[0] for s in scores) / sum(s[1] for s in scores), abs=1e-3)
    explicit = distill_dataset(model, tiny_tokenizer, dataset, checker=accept_any, candidates=["rewrite"],
                               selection="first", cache_dir=tmp_path, **FAST)  # fmt: skip
    assert explicit.rows == default.rows and explicit.report == {**default.report, "generated": 0, "from_cache": 3}

    # Own answers get a cache of their own; the rewrites of the default run are reused, and a rerun generates nothing.
    both = distill_dataset(model, tiny_tokenizer, dataset, candidates=BOTH, checker=accept_any, cache_dir=tmp_path,
                           **FAST)  # fmt: skip
    assert both.report["generated"] == 3 and both.report["cache_dir"] == default.report["cache_dir"]
    assert both.report["own_answer_cache_dir"] != both.report["cache_dir"]
    assert [entry["rewrite"] for entry in both.rows] == [entry["rewrite"] for entry in default.rows]
    metadata = json.loads((Path(both.report["own_answer_cache_dir"]) / "meta.json").read_text())
    assert metadata["kind"] == "own_answer"
    again = distill_dataset(model, tiny_tokenizer, dataset, candidates=["own_answer"], checker=accept_any,
                            cache_dir=tmp_path, **FAST)  # fmt: skip
    assert again.report["generated"] == 0 and again.report["from_cache"] == 3
    assert again.report["cache_dir"] == both.report["own_answer_cache_dir"]
    assert [e["candidates"][0]["text"] for e in again.rows] == [e["candidates"][0]["text"] for e in both.rows]


def test_kinds_never_share_a_cache_even_with_identical_prompts(tmp_path, tiny_tokenizer, make_tiny_llama, monkeypatch):
    spec = DistillSpec.create(checker=accept_any)
    monkeypatch.setattr(rewrite_module, "instruction_prompt",
                        lambda tokenizer, instruction: spec.render(instruction, "It is 2.", tokenizer))  # fmt: skip
    dataset = Dataset.from_list([{"prompt": "What is 1 plus 1?", "completion": "It is 2."}])
    result = distill_dataset(make_tiny_llama(tiny_tokenizer), tiny_tokenizer, dataset, candidates=BOTH,
                             checker=accept_any, cache_dir=tmp_path, **FAST)  # fmt: skip
    assert result.report["generated"] == 2 and result.report["own_answer_cache_dir"] != result.report["cache_dir"]


def test_refusals_before_anything_is_loaded_or_generated(tmp_path, tiny_tokenizer):
    with pytest.raises(ValueError, match=r"'own_answer' needs a checker .* 'none', which accepts every answer"):
        DistillSpec.create(candidates=["own_answer"], checker="none")
    with pytest.raises(ValueError, match=r"'own_answer' needs a checker"):
        distill_dataset(None, tiny_tokenizer, addition_rows(2), candidates=BOTH, cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())
    # On a server, `lowest_nll` depends on what the server returns: asked when the engine is checked (the server
    # tests, `test_server_answers.py`, `test_server_engine.py` and `test_vllm_server.py`).
    assert config(tmp_path, sdft_engine="server", sdft_server_url="http://localhost:8000",
                  sdft_selection="lowest_nll").sdft_selection == "lowest_nll"  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"sdft_candidates": ["own_answr"]}, r"Unknown `sdft_candidates` \['own_answr'\]"),
        ({"sdft_candidates": []}, r"`sdft_candidates` must name at least one of \['own_answer', 'rewrite'\]"),
        ({"sdft_candidates": ["reference"]}, r"must name at least one of"),
        ({"sdft_candidates": [1]}, r"`sdft_candidates` must be a list of names"),
        ({"sdft_selection": "lowest"}, r"Unknown `sdft_selection` 'lowest': use 'first' .* or 'lowest_nll'"),
        ({"sdft_candidates": ["own_answer"]}, r"'own_answer' needs a checker"),
    ],
)
def test_config_validation(tmp_path, fields, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, **fields)


def test_config_takes_lists_comma_strings_and_the_command_line(tmp_path):
    from trl import TrlParser

    args = config(tmp_path, sdft_checker="math", sdft_candidates="rewrite, own_answer")
    assert args.sdft_candidates == BOTH and args.sdft_spec.candidates == tuple(BOTH)
    assert config(tmp_path).sdft_spec.is_default
    for words in (["own_answer", "rewrite"], ["own_answer,rewrite"]):
        (parsed,) = TrlParser([SDFTConfig]).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--bf16", "false", "--sdft_checker", "math",
             "--sdft_selection", "lowest_nll", "--sdft_candidates", *words]
        )  # fmt: skip
        assert parsed.sdft_candidates == BOTH and parsed.sdft_spec.selection == "lowest_nll"


def test_trainer_with_own_answers_on_gsm8k(tmp_path, tiny_tokenizer, make_tiny_llama):
    dataset = gsm8k_to_prompt_completion(bundled_gsm8k("train", n=2), style="official")
    args = SDFTConfig(
        output_dir=str(tmp_path / "out"), sdft_cache_dir=str(tmp_path / "cache"), sdft_checker="math",
        sdft_candidates=BOTH, sdft_generation_kwargs={"max_new_tokens": 6}, sdft_batch_size=2,
        max_steps=1, per_device_train_batch_size=2, use_cpu=True, bf16=False, report_to=[], save_strategy="no",
        disable_tqdm=True,
    )  # fmt: skip
    trainer = SDFTTrainer(model=make_tiny_llama(tiny_tokenizer), args=args, train_dataset=dataset,
                          processing_class=tiny_tokenizer)  # fmt: skip
    trainer.train()
    report = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    kept = report["total"] - report["skipped"]
    assert kept >= 1 and report["generated"] == 2 * kept
    assert report["target_own_answer"] + report["target_rewrite"] + report["target_reference"] == kept
    assert report["candidates"] == BOTH and math.isfinite(report["seed_nll_distilled"])
    rows = [json.loads(line) for line in (tmp_path / "out" / ROWS_FILE).read_text().splitlines()]
    assert all(entry["target"] in {"own_answer", "rewrite", "reference"} for entry in rows if entry["candidates"])
    assert {c["kind"] for c in rows[0]["candidates"]} == {"own_answer", "rewrite", "reference"}
    section = sdft_report_section(report, ROWS_FILE, REPORT_FILE)  # the model card's SDFT section
    assert "candidates `own_answer`, `rewrite`, `reference` by `first` selection" in section
    assert f"| `target_own_answer` | {report['target_own_answer']} | targets that are the seed model's own" in section


class GenerateOnly:
    """A rewrite engine that generates (through the in-process one) but has no `score`: a third-party engine."""

    def __init__(self, engine: TransformersEngine):
        self._engine = engine
        self.position_limit, self.deal_size = engine.position_limit, engine.deal_size
        self.check, self.block_size, self.identity = engine.check, engine.block_size, engine.identity
        self.generate, self.generate_blocks = engine.generate, engine.generate_blocks


def test_an_engine_that_cannot_score_is_refused_for_lowest_nll_and_leaves_the_gap_out(
    tmp_path, tiny_tokenizer, make_tiny_llama
):
    engine = GenerateOnly(TransformersEngine(make_tiny_llama(tiny_tokenizer), tiny_tokenizer, batch_size=4))
    options = dict(generation_kwargs={"max_new_tokens": 6}, keep_truncated=True, show_progress=False)
    with pytest.raises(ValueError, match=r"lowest_nll.*cannot give: GenerateOnly has no `score`"):
        distill_dataset(None, tiny_tokenizer, addition_rows(2), engine=engine, selection="lowest_nll",
                        checker=accept_any, cache_dir=tmp_path, **options)  # fmt: skip
    assert not any(tmp_path.iterdir())  # refused before anything was generated
    result = distill_dataset(None, tiny_tokenizer, addition_rows(2), engine=engine, cache_dir=tmp_path, **options)
    assert result.report["generated"] == 2 and "seed_nll_reference" not in result.report


SAMPLED = dict(FAST, generation_kwargs={"max_new_tokens": 6, "do_sample": True, "temperature": 1.5, "top_k": 0})


def test_several_rewrite_samples_are_candidates_of_their_own(tmp_path, tiny_tokenizer, make_tiny_llama):
    model, dataset = make_tiny_llama(tiny_tokenizer), addition_rows(4)
    result = distill_dataset(model, tiny_tokenizer, dataset, checker=accept_any, cache_dir=tmp_path,
                             rewrite_samples=3, **SAMPLED)  # fmt: skip
    samples = [[c["text"] for c in entry["candidates"] if c["kind"] == "rewrite"] for entry in result.rows]
    assert all(len(texts) == 3 for texts in samples)
    assert len({text for texts in samples for text in texts}) > 4  # each sample drew its own rewrite
    assert [c.get("sample") for c in result.rows[0]["candidates"]] == [None, 2, 3, None]  # 1st, 2nd, 3rd, reference
    # the first passing sample is trained on; the report counts samples as rewrites
    assert result.dataset["completion"] == [texts[0] for texts in samples]
    assert result.report["target_rewrite"] == 4 and result.report["rewrite_samples"] == 3
    assert result.report["generated"] == 12
    again = distill_dataset(model, tiny_tokenizer, dataset, checker=accepting({samples[1][2], samples[2][1]}),
                            cache_dir=tmp_path, rewrite_samples=3, **SAMPLED)  # fmt: skip
    assert again.report["generated"] == 0 and again.report["from_cache"] == 12  # each sample has its own cache
    assert [entry["target"] for entry in again.rows] == ["reference", "rewrite", "rewrite", "reference"]
    assert [entry.get("target_sample") for entry in again.rows] == [None, 3, 2, None]
    assert again.dataset["completion"][1:3] == [samples[1][2], samples[2][1]]
    assert [entry["rewrite"] for entry in again.rows][1:3] == [samples[1][2], samples[2][1]]  # the one trained on


def test_least_surprising_of_several_rewrite_samples(tmp_path, tiny_tokenizer, make_tiny_llama):
    model, dataset = make_tiny_llama(tiny_tokenizer), addition_rows(3)
    result = distill_dataset(model, tiny_tokenizer, dataset, checker=accept_any, cache_dir=tmp_path,
                             rewrite_samples=2, selection="lowest_nll", **SAMPLED)  # fmt: skip
    for entry, trained in zip(result.rows, result.dataset["completion"], strict=True):
        lowest = min(entry["candidates"], key=lambda c: c["seed_nll"])
        assert trained == lowest["text"] and all(c["seed_nll"] is not None for c in entry["candidates"])


def test_several_rewrite_samples_need_sampling():
    with pytest.raises(ValueError, match="greedy"):
        DistillSpec.create(checker="math", generation_kwargs={"do_sample": False}, rewrite_samples=2)
    with pytest.raises(ValueError, match="sdft_rewrite_samples"):
        DistillSpec.create(checker="math", rewrite_samples=0)
    assert DistillSpec.create(checker="math", rewrite_samples=2).candidate_ids == ("rewrite", "rewrite_2")
    assert not DistillSpec.create(checker="math", rewrite_samples=2).is_default


def test_greedy_candidates_are_shared_by_every_seed(tmp_path, tiny_tokenizer, make_tiny_llama):
    model, dataset = make_tiny_llama(tiny_tokenizer), addition_rows(3)
    greedy = dict(FAST, generation_kwargs={"max_new_tokens": 6, "do_sample": False})
    first = distill_dataset(model, tiny_tokenizer, dataset, candidates=BOTH, checker=accept_any, cache_dir=tmp_path,
                            seed=1, **greedy)  # fmt: skip
    again = distill_dataset(model, tiny_tokenizer, dataset, candidates=BOTH, checker=accept_any, cache_dir=tmp_path,
                            seed=2, **greedy)  # fmt: skip
    assert first.report["generated"] == 6 and again.report["generated"] == 0
    assert again.dataset["completion"] == first.dataset["completion"]
    sampled = distill_dataset(model, tiny_tokenizer, dataset, checker=accept_any, cache_dir=tmp_path, seed=2, **FAST)
    assert sampled.report["generated"] == 3  # sampling: the seed is part of the key
