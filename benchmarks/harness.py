"""What the benchmarks share: synthetic data and models built locally, and the measurement of training runs.

Nothing is downloaded. The tokenizer is a word-level vocabulary of the model's size (one word, one token), so a row of
`n` words is exactly `n` tokens and every batch has the same shape; the model is a Llama of any shape with random
weights, quantized on load when asked. Each trainer gets a freshly loaded model and is timed step by step; peak memory
is the CUDA allocator's (allocated and reserved) on a GPU, the process's peak resident memory growth on a CPU.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import platform
import random
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback

TRAINERS = ("SFTTrainer", "DynSDPBTrainer")
WARMUP_STEPS = 2  # not timed: allocator, kernel selection, and DynSDPB's first step has no teacher yet
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer of `vocab_size` entries (`w4`, `w5`, ...), with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL_TOKENS), vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def model_and_tokenizer_configs(vocab_size: int, **shape) -> tuple[LlamaConfig, PreTrainedTokenizerFast]:
    """A Llama configuration of the given shape and the word tokenizer of its vocabulary, special tokens shared."""
    tokenizer = word_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=vocab_size,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **shape,
    )
    return config, tokenizer


def prompt_completion_rows(num_rows: int, prompt_words: int, completion_words: int, vocab_size: int, seed: int = 0):
    """Rows of random words; with the EOS token SFT appends, each is `prompt_words + completion_words + 1` tokens."""
    rng = random.Random(seed)

    def words(n: int) -> str:
        return " ".join(f"w{rng.randrange(len(SPECIAL_TOKENS), vocab_size)}" for _ in range(n))

    # The completion starts with a space: SFT joins prompt and completion text before tokenizing.
    return Dataset.from_list(
        [{"prompt": words(prompt_words), "completion": " " + words(completion_words)} for _ in range(num_rows)]
    )


def random_state_dict(config: LlamaConfig, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights for `config` on the CPU, made on the GPU when there is one (seconds for 7B, not minutes)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device("meta"):
        shapes = {name: tensor.shape for name, tensor in LlamaForCausalLM(config).state_dict().items()}
    generator = torch.Generator(device).manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            state[name] = torch.ones(shape, dtype=dtype)
        else:
            std = config.initializer_range
            state[name] = (torch.randn(shape, generator=generator, device=device) * std).to(dtype).cpu()
    return state


def load_model(config: LlamaConfig, state_dict: dict, dtype: torch.dtype, quantization_config=None):
    """A fresh model from `state_dict` (quantized on load if asked), on the GPU when there is one."""
    return LlamaForCausalLM.from_pretrained(
        None,
        config=config,
        state_dict=dict(state_dict),
        dtype=dtype,
        quantization_config=quantization_config,
        device_map={"": 0} if torch.cuda.is_available() else None,
    )


def scratch_dir(prefix: str) -> Path:
    """A temporary directory (trainer outputs, rewrite cache), removed when the process exits."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _cpu_memory(field_name: str) -> int:
    """`VmRSS` or `VmHWM` (peak) of this process in bytes, from /proc (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field_name} not found in /proc/self/status")


class Measurement(TrainerCallback):
    """Times every optimizer step and records the peak memory of training (model loading excluded)."""

    def __init__(self):
        self.step_seconds: list[float] = []
        self.peak_allocated = self.peak_reserved = 0

    def on_train_begin(self, args, state, control, **kwargs):
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:  # writing 5 to clear_refs resets the peak resident set size (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
            self._base = _cpu_memory("VmRSS")

    def on_step_begin(self, args, state, control, **kwargs):
        synchronize()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        synchronize()
        self.step_seconds.append(time.perf_counter() - self._start)

    def on_train_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            self.peak_allocated = torch.cuda.max_memory_allocated()
            self.peak_reserved = torch.cuda.max_memory_reserved()
        else:
            self.peak_allocated = self.peak_reserved = _cpu_memory("VmHWM") - self._base


@dataclass
class TrainingResult:
    trainer: str
    median_step_s: float
    tokens_per_s: float
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    steps_timed: int
    extra: dict = field(default_factory=dict)


def measure_training(name: str, trainer, tokens_per_step: int, warmup_steps: int = WARMUP_STEPS) -> TrainingResult:
    """Trains `trainer` and summarises its steps after the first `warmup_steps`."""
    measurement = Measurement()
    trainer.add_callback(measurement)
    trainer.train()
    timed = measurement.step_seconds[warmup_steps:] or measurement.step_seconds
    median = statistics.median(timed)
    return TrainingResult(
        name, median, tokens_per_step / median, measurement.peak_allocated, measurement.peak_reserved, len(timed)
    )


def free_memory() -> None:
    """After the caller dropped its references to a finished trainer and model: collect them before the next run."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    with open("/proc/cpuinfo") as cpuinfo:
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    return f"{os.cpu_count()} CPU cores ({model or platform.machine()})"


def print_table(results: list[TrainingResult]) -> None:
    """A markdown table; on a CPU the one memory column is the peak resident memory growth during training."""
    gb, on_gpu = 1e9, torch.cuda.is_available()
    memory = "peak allocated | peak reserved" if on_gpu else "peak RSS growth"
    print(f"| trainer | median step | tokens/s | {memory} | extra |")
    print("|---|---|---|---|" + ("---|" if on_gpu else "") + "---|")
    for r in results:
        extra = ", ".join(f"{k}={v}" for k, v in r.extra.items())
        reserved = f" {r.peak_reserved_bytes / gb:.2f} GB |" if on_gpu else ""
        print(
            f"| {r.trainer} | {r.median_step_s:.3f} s | {r.tokens_per_s:,.0f} | {r.peak_allocated_bytes / gb:.2f} GB |"
            f"{reserved} {extra} |"
        )


def format_ratios(name: str, ratios: dict[str, float]) -> str:
    if torch.cuda.is_available():
        memory = f"allocated {ratios['peak_allocated']:.2f}x, reserved {ratios['peak_reserved']:.2f}x"
    else:
        memory = f"peak RSS growth {ratios['peak_allocated']:.2f}x"
    return f"{name}: step {ratios['step_time']:.2f}x, {memory}"


def ratios_to(baseline: TrainingResult, result: TrainingResult) -> dict[str, float]:
    return {
        "step_time": result.median_step_s / baseline.median_step_s,
        "peak_allocated": result.peak_allocated_bytes / max(baseline.peak_allocated_bytes, 1),
        "peak_reserved": result.peak_reserved_bytes / max(baseline.peak_reserved_bytes, 1),
    }


def write_json(path: str | os.PathLike, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    serializable = {k: [asdict(v) for v in value] if k == "training" else value for k, value in payload.items()}
    path.write_text(json.dumps(serializable, indent=2) + "\n")
    print(f"wrote {path}")


def check_run_arguments(parser, cli) -> None:
    """Sizes that cannot make the benchmark's batches, refused before anything is built (`parser.error` exits)."""
    if cli.prompt_tokens < 1 or cli.sequence_length < cli.prompt_tokens + 2:
        parser.error(
            f"--sequence-length {cli.sequence_length} must leave room for --prompt-tokens {cli.prompt_tokens}, at "
            "least one completion token and the EOS token: raise --sequence-length or lower --prompt-tokens."
        )
    if cli.batch_size < 2:
        parser.error("--batch-size must be at least 2: DynSDPB re-uses half of each batch.")
    if cli.steps <= WARMUP_STEPS:
        parser.error(f"--steps must exceed the {WARMUP_STEPS} warm-up steps that are not timed.")


def train_one(
    name, model, training_args: dict, tokenizer, dataset, peft_config, sequence_length, batch_size, label=None
) -> TrainingResult:
    """Trains `SFTTrainer` or `DynSDPBTrainer` (`name`) on `model` and measures it; every row is `sequence_length`.

    `training_args` are the keyword arguments of the trainer's configuration class.
    """
    from trl import SFTConfig, SFTTrainer

    from trl_selfdistill import DynSDPBConfig, DynSDPBTrainer

    classes = {"SFTTrainer": (SFTTrainer, SFTConfig), "DynSDPBTrainer": (DynSDPBTrainer, DynSDPBConfig)}
    trainer_class, config_class = classes[name]
    trainer = trainer_class(
        model=model,
        args=config_class(**training_args),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    check_row_lengths(trainer.train_dataset, sequence_length)
    result = measure_training(label or name, trainer, batch_size * sequence_length)
    if isinstance(trainer, DynSDPBTrainer):
        result.extra["teacher_cache_MB"] = round(trainer.teacher_cache.nbytes / 1e6, 1)
    return result


def check_row_lengths(dataset, sequence_length: int) -> None:
    lengths = {len(ids) for ids in dataset["input_ids"]}
    if lengths != {sequence_length}:
        raise RuntimeError(f"Rows should all be {sequence_length} tokens, got lengths {sorted(lengths)}.")
