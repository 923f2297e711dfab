"""The in-process engine on a tiny model: batches halved on out-of-memory without losing rows, batch order, seeds."""

from __future__ import annotations

import logging

import pytest
import torch
from tiny_models import build_tiny_llama, build_tiny_tokenizer

from trl_selfdistill.generation import TransformersEngine

GREEDY = {"do_sample": False, "max_new_tokens": 5}
PROMPTS = [f"<|user|>\nWhat is {i} plus {i * 7}?{'' if i % 2 else ' Think.'}\n<|assistant|>\n" for i in range(12)]


def completions(engine, prompts, decoding=GREEDY, seeds=None) -> tuple[list[str], list[int]]:
    texts, group_sizes = [""] * len(prompts), []
    for group in engine.generate(prompts, decoding, seeds or [0] * len(prompts)):
        group_sizes.append(len(group))
        for completion in group:
            texts[completion.index] = completion.text
    return texts, group_sizes


def refuse_batches_above(model, limit: int):
    """The memory of a smaller device: a forward on more than `limit` rows runs out of memory, as CUDA would."""

    def hook(module, args, kwargs):
        if kwargs["input_ids"].shape[0] > limit:
            raise torch.OutOfMemoryError(f"batch of {kwargs['input_ids'].shape[0]} does not fit")

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def test_auto_batch_halves_on_out_of_memory_and_loses_nothing(caplog):
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(tokenizer)
    expected, _ = completions(TransformersEngine(model, tokenizer, batch_size=3), PROMPTS)

    handle = refuse_batches_above(model, 3)
    try:
        with caplog.at_level(logging.WARNING):
            texts, groups = completions(TransformersEngine(model, tokenizer), PROMPTS)  # "auto": 12 -> 6 -> 3
        assert texts == expected and all(texts)
        assert groups == [3, 3, 3, 3]
        assert "retrying with batches of 3 prompts" in caplog.text
        with pytest.raises(torch.OutOfMemoryError):  # an explicit size is the user's: not changed behind their back
            completions(TransformersEngine(model, tokenizer, batch_size=4), PROMPTS)
    finally:
        handle.remove()


def test_batches_follow_length_and_seeds_repeat_samples():
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(tokenizer)
    engine = TransformersEngine(model, tokenizer, batch_size=4)
    texts, groups = completions(engine, PROMPTS)
    assert groups == [4, 4, 4] and len(texts) == len(PROMPTS)
    one_by_one = [completions(TransformersEngine(model, tokenizer, batch_size=1), [p])[0][0] for p in PROMPTS]
    assert texts == one_by_one  # left padding changes no greedy output

    sampling = {"do_sample": True, "top_k": 0, "temperature": 1.0, "max_new_tokens": 6}
    first, _ = completions(engine, PROMPTS, sampling, seeds=list(range(12)))
    again, _ = completions(engine, PROMPTS, sampling, seeds=list(range(12)))
    other, _ = completions(engine, PROMPTS, sampling, seeds=list(range(100, 112)))
    assert first == again and first != other
    assert list(engine.generate([], GREEDY, [])) == []


def test_a_model_name_is_enough_for_the_in_process_engine(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from trl_selfdistill import distill_dataset
    from trl_selfdistill.data import bundled_gsm8k, gsm8k_to_prompt_completion

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    dataset = gsm8k_to_prompt_completion(bundled_gsm8k("train", n=2))
    result = distill_dataset(tiny_model_dir, tokenizer, dataset, generation_kwargs={"max_new_tokens": 3},
                             cache_dir=tmp_path, show_progress=False)  # fmt: skip
    assert (result.report["generated"], result.report["engine"]) == (2, "transformers")
    with pytest.raises(ValueError, match="seed model's name"):
        distill_dataset(None, tokenizer, dataset, engine="server", server_url="http://127.0.0.1:1")


def test_distill_dataset_refuses_a_batch_size_it_would_ignore_and_an_engine_it_cannot_drive(tmp_path):
    from trl_selfdistill import distill_dataset
    from trl_selfdistill.data import bundled_gsm8k, gsm8k_to_prompt_completion

    tokenizer = build_tiny_tokenizer()
    engine = TransformersEngine(build_tiny_llama(tokenizer), tokenizer, batch_size=3)
    dataset = gsm8k_to_prompt_completion(bundled_gsm8k("train", n=1))
    with pytest.raises(ValueError, match=r"TransformersEngine\(model, tokenizer, batch_size=...\)"):
        distill_dataset(None, tokenizer, dataset, engine=engine, batch_size=8, cache_dir=tmp_path)

    class GenerateOnly:  # enough for the evaluation probes, not for the rewrite
        def generate(self, prompts, decoding, seeds):
            yield from ()

        def identity(self):
            return {}

    with pytest.raises(TypeError, match="GenerateOnly is not a `RewriteEngine`.*generate_blocks"):
        distill_dataset(None, tokenizer, dataset, engine=GenerateOnly(), cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # refused before anything is written


def test_a_vllm_server_without_a_vllm_interpreter_names_the_fix(tmp_path):
    from trl_selfdistill.generation.vllm_server import VLLMServer

    with pytest.raises(ValueError, match="tools/vllm_env.sh"):
        VLLMServer(str(tmp_path), python=str(tmp_path / "no-env" / "bin" / "python"))


def test_a_vllm_server_that_exits_while_starting_is_named_and_leaves_nothing(tmp_path, monkeypatch):
    import tempfile

    from trl_selfdistill.generation.vllm_server import VLLMServer

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where its socket directory is made

    python = tmp_path / "python"  # an interpreter whose vLLM fails at once, as a broken environment does
    python.write_text("#!/bin/sh\necho 'no module named vllm' >&2\nexit 3\n")
    python.chmod(0o755)
    server = VLLMServer(str(tmp_path), python=str(python), log_path=tmp_path / "server.log")
    with pytest.raises(RuntimeError, match=r"vLLM exited with 3 while starting; see .*server\.log"):
        server.start(timeout=30)
    assert server.rpc_dir is None and not any((tmp_path / "tmp").iterdir())  # its socket directory is gone with it
    assert "no module named vllm" in (tmp_path / "server.log").read_text()
