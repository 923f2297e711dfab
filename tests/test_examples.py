"""`examples/sdft.py` end to end on a tiny local model and local raw GSM8K files, and its YAML configs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import build_tiny_llama, build_tiny_tokenizer
from trl import ModelConfig, TrlParser

from trl_selfdistill import SDFTConfig
from trl_selfdistill.data import bundled_gsm8k
from trl_selfdistill.sdft.spec import DistillSpec

EXAMPLES = Path(__file__).parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
from sdft import SDFTScriptArguments  # noqa: E402


def save_tiny_model_and_gsm8k(tmp_path, rows: int) -> None:
    """A tiny model in `tmp_path/model`; `rows` raw GSM8K rows (question, answer) in `tmp_path/train.jsonl`."""
    tokenizer = build_tiny_tokenizer()
    build_tiny_llama(tokenizer).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    bundled_gsm8k("train", n=rows).to_json(tmp_path / "train.jsonl")


def parse(argv: list[str]):
    return TrlParser((SDFTScriptArguments, SDFTConfig, ModelConfig)).parse_args_and_config(argv)


def test_cpu_demo_config_parses_with_cli_overrides():
    script_args, args, model_args = parse(
        ["--config", str(EXAMPLES / "configs/sdft_smollm2_cpu.yaml"), "--sdft_generation_kwargs", '{"top_k": 5}']
    )
    assert model_args.model_name_or_path == "bundled/SmolLM2-135M-Instruct"
    assert script_args.dataset_name == "bundled/addition"
    assert (args.sdft_template, args.sdft_checker) == ("gsm8k", "math")
    assert DistillSpec.from_config(args).decoding == {"do_sample": True, "temperature": 0.95, "top_p": 0.7,
                                                      "top_k": 5, "max_new_tokens": 512}  # fmt: skip
    _, args, _ = parse(["--config", str(EXAMPLES / "configs/sdft_smollm2_cpu.yaml")])
    decoding = DistillSpec.from_config(args).decoding  # the YAML dict: greedy rewrites of at most 256 tokens
    assert (decoding["do_sample"], decoding["max_new_tokens"]) == (False, 256)


def test_paper_recipe_config_is_the_paper_recipe():
    recipe = (EXAMPLES / "configs/sdft_llama2_7b_gsm8k_qlora.yaml").read_text()
    for line in ["load_in_4bit: true", "bnb_4bit_quant_type: nf4", "use_bnb_nested_quant: true", "dtype: bfloat16",
                 "lora_r: 8", "lora_alpha: 16", "lora_target_modules: [q_proj, v_proj]", "learning_rate: 1.0e-4",
                 "lr_scheduler_type: cosine", "num_train_epochs: 5", "per_device_train_batch_size: 4",
                 "gradient_accumulation_steps: 2", "sdft_checker: math", "sdft_template: gsm8k"]:  # fmt: skip
        assert line in recipe


@pytest.mark.slow
@pytest.mark.parametrize("peft", [True, False])
def test_example_script_on_local_raw_gsm8k(tmp_path, peft):
    save_tiny_model_and_gsm8k(tmp_path, rows=4)
    command = [sys.executable, str(EXAMPLES / "sdft.py"), "--model_name_or_path", str(tmp_path / "model"),
               "--dataset_name", str(tmp_path / "train.jsonl"), "--output_dir", str(tmp_path / "out"),
               "--sdft_checker", "math", "--sdft_generation_kwargs", '{"max_new_tokens": 4}',
               "--sdft_cache_dir", str(tmp_path / "cache"), "--max_steps", "1", "--bf16", "false",
               "--use_cpu", "true", "--report_to", "none", "--save_strategy", "no",
               "--eval_task_samples", "2", "--eval_task_dataset", str(tmp_path / "train.jsonl"),
               "--dataset_test_split", "train", "--eval_max_new_tokens", "4",
               "--eval_ifeval_samples", "2", "--eval_ifeval_max_new_tokens", "4"]  # fmt: skip
    if peft:
        command += ["--use_peft", "--lora_target_modules", "q_proj", "v_proj"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "Task accuracy on 2 held-out questions (what SDFT teaches): before" in completed.stdout
    assert "IFEval prompt-level strict accuracy on 2 prompts (what it forgets): before" in completed.stdout
    report = json.loads((tmp_path / "out" / "distillation_report.json").read_text())
    assert report["total"] == 4 and report["checker"] == "math" and report["template"] == "math"
    saved = {p.name for p in (tmp_path / "out").iterdir()}
    assert ("adapter_model.safetensors" if peft else "model.safetensors") in saved


@pytest.mark.slow
def test_distill_dataset_script_writes_the_distilled_dataset_without_training(tmp_path):
    save_tiny_model_and_gsm8k(tmp_path, rows=4)
    command = [sys.executable, str(EXAMPLES / "distill_dataset.py"), "--model_name_or_path", str(tmp_path / "model"),
               "--dataset_name", str(tmp_path / "train.jsonl"), "--output_dir", str(tmp_path / "out"),
               "--sdft_checker", "math", "--sdft_generation_kwargs", '{"max_new_tokens": 4}',
               "--sdft_batch_size", "2", "--sdft_cache_dir", str(tmp_path / "cache"),
               "--use_cpu", "true"]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = json.loads((tmp_path / "out" / "distillation_report.json").read_text())
    # Byte-level tokens of the tiny tokenizer make some GSM8K prompts longer than the tiny model's 512 positions.
    assert (report["total"], report["engine"]) == (4, "transformers") and report["generated"] >= 1
    assert report["generated"] + report.get("skipped_too_long", 0) == 4
    rows = [json.loads(line) for line in open(tmp_path / "out" / "distilled_dataset.jsonl")]
    assert len(rows) == 4 and all(row["completion"][0]["role"] == "assistant" for row in rows)
    audit = [json.loads(line) for line in open(tmp_path / "out" / "distillation_rows.jsonl")]
    assert [entry["row"] for entry in audit] == [0, 1, 2, 3]
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "distillation_report.json", "distilled_dataset.jsonl", "distillation_rows.jsonl"
    }  # fmt: skip


@pytest.mark.slow
def test_dynsdpb_script_on_local_raw_gsm8k(tmp_path):
    save_tiny_model_and_gsm8k(tmp_path, rows=8)
    command = [sys.executable, str(EXAMPLES / "dynsdpb.py"),
               "--config", str(EXAMPLES / "configs/dynsdpb_smollm2_cpu.yaml"),
               "--model_name_or_path", str(tmp_path / "model"), "--dataset_name", str(tmp_path / "train.jsonl"),
               "--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--logging_steps", "1",
               "--dynsdpb_mode", "constant"]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "'distill/reused_fraction': '0.5'" in completed.stdout  # the second step re-uses half of each batch
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_benchmark_script_on_a_tiny_model(tmp_path):
    save_tiny_model_and_gsm8k(tmp_path, rows=4)
    out = tmp_path / "out"
    command = [sys.executable, str(EXAMPLES / "benchmark_forgetting.py"),
               "--model_name_or_path", str(tmp_path / "model"), "--dataset_name", str(tmp_path / "train.jsonl"),
               "--output_dir", str(out), "--arms", "sft", "sdft", "--probes", "gsm8k", "advbench", "general",
               "--gsm8k_samples", "2", "--advbench_samples", "2", "--general_samples", "2",
               "--gsm8k_max_new_tokens", "4", "--advbench_max_new_tokens", "4", "--general_max_new_tokens", "4",
               "--sdft_checker", "math", "--sdft_generation_kwargs", '{"max_new_tokens": 4}',
               "--sdft_cache_dir", str(tmp_path / "cache"), "--max_steps", "1", "--bf16", "false",
               "--use_cpu", "true", "--report_to", "none", "--save_strategy", "no", "--eval_batch_size", "2",
               "--use_peft", "--lora_target_modules", "q_proj", "v_proj"]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "| model | GSM8K (n=2) | raw safe (n=2) | similarity to seed (n=2) |" in completed.stdout
    report = json.loads((out / "forgetting_benchmark.json").read_text())
    assert report["models"] == ["seed", "sft", "sdft"]
    assert {p.name for p in out.glob("chart_*.png")} == {"chart_gsm8k.png", "chart_advbench.png", "chart_general.png"}


SCRIPT_CLASSES = {  # the config's name prefix -> the module of its script and its argument classes
    "sdft_": ("sdft", ("SDFTScriptArguments",), "SDFTConfig"),
    "dynsdpb_": ("dynsdpb", ("DynSDPBScriptArguments",), "DynSDPBConfig"),
    "benchmark_forgetting_": ("benchmark_forgetting", ("BenchmarkScriptArguments",), "SDFTDynSDPBConfig"),
}


@pytest.mark.parametrize("config", sorted(p.name for p in (EXAMPLES / "configs").glob("*.yaml")))
def test_every_shipped_config_parses_with_its_script(config):
    """Each YAML is read by the parser of its script; every key must be a field there (a renamed field fails)."""
    import importlib

    import trl_selfdistill
    from trl_selfdistill.evaluation.probes import ProbeArguments

    (module_name, script_classes, config_class), *others = [
        v for k, v in SCRIPT_CLASSES.items() if config.startswith(k)
    ]
    assert not others, f"{config} matches several scripts"
    module = importlib.import_module(module_name)
    classes = [getattr(module, name) for name in script_classes]
    if module_name == "benchmark_forgetting":
        classes.append(ProbeArguments)
    # GPU recipes ask for bf16, which a CPU-only machine refuses at parse time; everything else is parsed as written.
    *_, args, model_args = TrlParser(
        (*classes, getattr(trl_selfdistill, config_class), ModelConfig)
    ).parse_args_and_config(["--config", str(EXAMPLES / "configs" / config), "--bf16", "false", "--use_cpu", "true"])
    assert model_args.model_name_or_path and args.output_dir


def test_paper_scale_benchmark_config_probes_every_item_with_the_papers_recipe():
    from benchmark_forgetting import BenchmarkScriptArguments

    from trl_selfdistill import SDFTDynSDPBConfig
    from trl_selfdistill.evaluation.probes import ProbeArguments, probe_items

    config = EXAMPLES / "configs/benchmark_forgetting_llama2_7b_qlora.yaml"
    script_args, probes, args, model_args = TrlParser(
        (BenchmarkScriptArguments, ProbeArguments, SDFTDynSDPBConfig, ModelConfig)
    ).parse_args_and_config(["--config", str(config), "--bf16", "false", "--use_cpu", "true"])
    assert model_args.model_name_or_path == "meta-llama/Llama-2-7b-chat-hf" and model_args.load_in_4bit
    assert script_args.dataset_name == "openai/gsm8k" and script_args.max_train_samples is None
    assert script_args.gsm8k_style == "official" and len(script_args.arms) == 5
    sizes = {name: len(probe_items(name, probes)) for name in ("gsm8k", "humaneval", "advbench")}
    assert sizes == {"gsm8k": 1319, "humaneval": 164, "advbench": 520}
    assert (args.learning_rate, args.num_train_epochs, args.max_length) == (1e-4, 5, 1024)
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 8
    assert (model_args.lora_r, model_args.lora_alpha, model_args.lora_target_modules) == (8, 16, ["q_proj", "v_proj"])


@pytest.mark.parametrize(
    ("config", "seeds", "fewer", "updates", "ifeval"),
    [
        ("benchmark_forgetting_smollm2_cpu.yaml", 3, {}, 40, 120),
        ("benchmark_forgetting_smollm2_cpu_full.yaml", 4, {"sdft_own_answer": 3, "dynsdpb": 3}, 80, 541),
    ],
)
def test_the_forgetting_experiment_configs(config, seeds, fewer, updates, ifeval):
    """The default and full runs of the experiment: SFT on native and foreign references and SDFT, the drift on all
    541 IFEval prompts, the arms the hypotheses need."""
    from benchmark_forgetting import BenchmarkScriptArguments

    from trl_selfdistill import SDFTDynSDPBConfig
    from trl_selfdistill.evaluation.hypotheses import applies
    from trl_selfdistill.evaluation.probes import ProbeArguments, probe_items

    script_args, probes, args, model_args = TrlParser(
        (BenchmarkScriptArguments, ProbeArguments, SDFTDynSDPBConfig, ModelConfig)
    ).parse_args_and_config(["--config", str(EXAMPLES / "configs" / config)])
    datasets = (script_args.dataset_name, script_args.native_dataset_name)
    assert datasets == ("bundled/addition-german", "bundled/addition")
    assert script_args.arms[:3] == ["sft_native", "sft", "sdft"] and applies(script_args.arms, probes.probes)
    assert len(script_args.seeds) == seeds and (script_args.seeds_per_arm or {}) == fewer
    assert (args.max_steps, args.bf16, model_args.dtype) == (updates, True, "bfloat16")
    assert len(probe_items("drift", probes)) == 541 and len(probe_items("ifeval", probes)) == ifeval
