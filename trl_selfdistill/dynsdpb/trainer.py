"""DynSDPBTrainer: dynamic self-distillation from the previous mini-batch (Fu et al., 2024) as a drop-in `SFTTrainer`.

    batch(t) = new samples of step t-1 (re-used) + new samples of step t          (sampler.py, one chain per slot)
    loss     = CE over the whole batch
             + sum_i alpha_i T_i^2 sum_j KL(softmax(z_prev_ij / T_i) || softmax(z_ij / T_i))   over re-used samples
             all divided by the number of response tokens, TRL's normalisation     (losses.py, schedule.py)

`z_prev` are the logits the model gave the same sample's response tokens one optimizer update earlier
(teacher_cache.py): cached as final hidden states when the output layer is frozen (LoRA, QLoRA), as logits otherwise.
Both terms are computed inside the model's forward pass, from the final hidden states at response positions, a chunk
of tokens at a time, so that no full logits tensor ever exists (head.py, losses.py).
"""

from __future__ import annotations

import math
import os
import pickle
import re
import textwrap
from typing import Any, NamedTuple

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset
from peft.utils.other import ModulesToSaveWrapper
from torch import nn
from torch.utils.data import DataLoader
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from transformers.utils import logging
from trl import SFTTrainer

from ..files import atomic_file
from ..model_card import MethodModelCard
from ..models import resolve_model_name
from ..utils import check_liger_kernel, check_trainable_dtypes, default_output_dir
from .card import dynsdpb_settings_section
from .config import DynSDPBConfig
from .head import DistillationInputs, DistillationOutput, add_distillation_head, output_layer, output_layer_sizes
from .sampler import OverlappingBatchSampler, check_dataset_size
from .schedule import DISTILL_MODES, SampleStatistics, sample_statistics
from .teacher_cache import TeacherCache

logger = logging.get_logger(__name__)

TEACHER_CACHE_FILE = "dynsdpb_teacher_cache_rank{rank}.pt"
_INDEX, _REUSED = "dynsdpb_index", "dynsdpb_reused"


class _IndexedDataset(torch.utils.data.Dataset):
    """Serves `(index, reused)` requests from the sampler as rows that remember their index and role.

    It also forwards `set_epoch` to the sampler: when a resumed multi-process run wraps the sampler in accelerate's
    skip and shard samplers, `DataLoaderShard.set_epoch` only reaches the dataset.
    """

    def __init__(self, dataset: Dataset, sampler: OverlappingBatchSampler):
        self.dataset = dataset
        self.sampler = sampler

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, request: tuple[int, bool]) -> dict[str, Any]:
        index, reused = request
        return {**self.dataset[int(index)], _INDEX: int(index), _REUSED: bool(reused)}


class _CollatorWithIndices:
    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        indices = torch.tensor([example.pop(_INDEX) for example in examples])
        reused = torch.tensor([example.pop(_REUSED) for example in examples])
        return {**self.collator(examples), _INDEX: indices, _REUSED: reused}


class DynSDPBTrainer(MethodModelCard, SFTTrainer):
    """
    Trainer for dynamic self-distillation from the previous mini-batch (DynSDPB),
    [Fu et al., 2024](https://huggingface.co/papers/2411.16991), on top of DLB (Shen et al., CVPR 2022).

    Half of each per-device batch (`dynsdpb_reuse_fraction`) repeats the samples that were new in the same batch slot
    one optimizer step earlier; those are distilled towards the logits the model gave them then, with a per-sample
    weight and temperature that adapt to how certain and how right those predictions were (`dynsdpb_mode="dynamic"`,
    this project's reading of the paper) or are fixed (`"constant"`, DLB). Everything else is [`~trl.SFTTrainer`]: same
    arguments, LoRA, QLoRA (`quantization_config`) and full fine-tuning. Evaluation uses the plain SFT loss.

    The weighting rule is [`~DynSDPBTrainer.distillation_weights`]: override it in a subclass to try another.
    """

    _tag_names = ["trl", "dynsdpb", "dlb", "trl-selfdistill"]
    _name = "DynSDPB"
    _paper = {
        "title": "Dynamic Self-Distillation via Previous Mini-batches for Fine-tuning Small Language Models",
        "id": "2411.16991",
        "citation": textwrap.dedent(
            """\
            @article{fu2024dynsdpb,
                title   = {{Dynamic Self-Distillation via Previous Mini-batches for Fine-tuning Small Language
                           Models}},
                author  = {Yao Fu and Yin Yu and Xiaotian Han and Runchao Li and Xianxuan Long and Haotian Yu
                           and Pan Li},
                year    = 2024,
                journal = {arXiv preprint arXiv:2411.16991},
            }"""
        ),
    }

    _inputs_checked = False  # set by a step mixed in front of this trainer that ran `check_inputs` before loading

    def __init__(self, model, args: DynSDPBConfig | None = None, train_dataset: Dataset | None = None, **kwargs):
        if args is None:
            args = DynSDPBConfig(default_output_dir(model, "DynSDPB"))
        elif not isinstance(args, DynSDPBConfig):
            raise TypeError(f"`args` must be a `DynSDPBConfig`, got {type(args).__name__}.")
        if not self._inputs_checked:  # a step in front of this trainer (the SDFT rewrite) ran them, first
            self.check_inputs(args, train_dataset, **kwargs)
        if isinstance(model, str):
            model = resolve_model_name(model)
        super().__init__(model, args=args, train_dataset=train_dataset, **kwargs)
        check_trainable_dtypes(self.model, uses_grad_scaler=self.accelerator.scaler is not None)
        output_layer_is_trained = self._validate_model()
        add_distillation_head(self.model.get_base_model() if is_peft_model(self.model) else self.model)
        # A frozen output layer turns the same hidden states into the same logits one step later: cache the former.
        self.teacher_cache = TeacherCache(
            getattr(torch, args.dynsdpb_teacher_cache_dtype), not output_layer_is_trained
        )
        self._step_sums: tuple[int, dict[str, list[float]]] = (-1, {})  # step, name -> [sum, weight] (metrics)
        self._teacher_cache_to_restore: tuple[str, dict] | None = None  # (file, state), read by `train` on resume
        # An overridden weighting rule is tried now, on two made-up samples, rather than at the second step.
        self._checked_weights(SampleStatistics(torch.tensor([0.2, 0.9]), torch.tensor([0.7, 0.1])))

    @staticmethod
    def check_inputs(args: DynSDPBConfig, train_dataset, **trainer_kwargs: Any) -> None:
        """Every configuration that cannot work, refused before the model is loaded. `trainer_kwargs` are the
        trainer's other keyword arguments (`compute_loss_func`, ...)."""
        if not isinstance(train_dataset, Dataset):
            raise TypeError(
                "DynSDPB needs a map-style `datasets.Dataset`: its sampler re-uses samples by index. Got "
                f"{type(train_dataset).__name__}; materialize it with `Dataset.from_list(list(dataset))`."
            )
        if args.packing or args.padding_free:
            raise ValueError(
                "DynSDPB aligns each sample with its own previous-step predictions, so samples must stay separate "
                "rows: set `packing=False` and `padding_free=False`."
            )
        if args.fsdp and (getattr(args, "fsdp_plugin_args", None) or {}).get("fsdp_version") == 1:
            # FSDP2 and ZeRO-3 are tested: both hold the whole output layer inside the forward, where DynSDPB uses it.
            raise ValueError(
                "DynSDPB is tested with FSDP2, not with FSDP1 (deprecated by transformers; it runs on GPUs only, so "
                "the CPU tests cannot cover it). Use FSDP2: `fsdp_config={'version': 2}` (the default)."
            )
        if (
            args.loss_type != "nll"
            or args.label_smoothing_factor > 0
            or trainer_kwargs.get("compute_loss_func") is not None
        ):
            raise ValueError(
                "DynSDPB computes its own loss (cross-entropy + distillation): use `loss_type='nll'`, no "
                "`label_smoothing_factor` and no `compute_loss_func`."
            )
        check_liger_kernel(args)
        check_dataset_size(
            len(train_dataset),
            args.per_device_train_batch_size,
            args.reuse_count,
            args.gradient_accumulation_steps,
            args.world_size,
        )

    def _validate_model(self) -> bool:
        """Refuses models whose logits are not `output_layer(final hidden states)`; says whether that layer trains."""
        text_config = self.model.config.get_text_config()
        for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
            if getattr(text_config, name, None) not in (None, 1, 1.0):
                raise ValueError(
                    f"DynSDPB projects hidden states with the plain output layer, but this model sets `{name}`. Only "
                    "models whose logits are `lm_head(hidden_states)` (Llama, Mistral, Qwen, ...) are supported."
                )
        head = output_layer(self.model)
        linear = head.original_module if isinstance(head, ModulesToSaveWrapper) else head
        if not isinstance(linear, nn.Linear):
            raise ValueError(
                f"DynSDPB projects hidden states through the output layer's weight itself, so it must be a linear "
                f"layer, but it is a {type(head).__name__}. With PEFT, leave `lm_head` out of `target_modules` and "
                "`trainable_token_indices`; to train it, list it in `modules_to_save` instead."
            )
        if not head.weight.is_floating_point():
            raise ValueError(
                f"The output layer is quantized ({type(linear).__name__}), but DynSDPB projects hidden states through "
                "its weight. Keep `lm_head` unquantized (bitsandbytes does by default; do not remove it from "
                "`llm_int8_skip_modules`)."
            )
        if head.weight.is_meta:
            raise ValueError(
                "The output layer is offloaded (its weights are loaded only during the forward pass): `device_map` "
                "puts `lm_head` on 'cpu' or 'disk'. DynSDPB uses the output layer's weight directly; keep `lm_head` "
                "on an accelerator (for example give `max_memory` room for it, or place it with an explicit "
                "`device_map`)."
            )
        return head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad)

    # ------------------------------------------------------------------ data
    def get_train_dataloader(self) -> DataLoader:
        dataset = self._remove_unused_columns(self.train_dataset, description="training")
        args = self.args
        sampler = OverlappingBatchSampler(
            num_samples=len(dataset),
            batch_size=args.per_device_train_batch_size,
            reuse_count=args.reuse_count,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            num_processes=self.accelerator.num_processes,
            process_index=self.accelerator.process_index,
            seed=args.data_seed if args.data_seed is not None else args.seed,
        )
        dataloader = DataLoader(
            _IndexedDataset(dataset, sampler),
            batch_sampler=sampler,
            collate_fn=_CollatorWithIndices(self.data_collator),
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory,
        )
        dataloader = self.accelerator.prepare(dataloader)
        # The sampler already yields this process's batches only: make accelerate's shard wrapper a passthrough, as
        # transformers does for its rank-aware `BatchRebalanceSampler`.
        shard = getattr(dataloader, "batch_sampler", None)
        if shard is not None and getattr(shard, "batch_sampler", None) is sampler:
            shard.num_processes, shard.process_index = 1, 0
        return dataloader

    # ------------------------------------------------------------------ loss
    def distillation_weights(self, stats: SampleStatistics) -> tuple[torch.Tensor, torch.Tensor]:
        """Per re-used sample weight `alpha_i` and temperature `T_i`, from the previous step's statistics.

        `"dynamic"` (default, this project's reading of Fu et al.): `alpha * d_i * (1 - u_i)` and `T * (1 + u_i)`;
        `"constant"` (DLB): `alpha` and `T`. Override in a subclass to try another rule.
        """
        rule = DISTILL_MODES[self.args.dynsdpb_mode]
        return rule(stats, self.args.dynsdpb_alpha, self.args.dynsdpb_temperature)

    def _checked_weights(self, stats: SampleStatistics) -> tuple[torch.Tensor, torch.Tensor]:
        """`distillation_weights(stats)`, refused unless it gives one `alpha_i` and one `T_i > 0` per sample."""
        alphas, temperatures = (torch.as_tensor(w) for w in self.distillation_weights(stats))
        expected = tuple(stats.uncertainty.shape)
        if (
            tuple(alphas.shape) != expected
            or tuple(temperatures.shape) != expected
            or (temperatures <= 0).any()
            or not (alphas.isfinite().all() and temperatures.isfinite().all())
        ):
            raise ValueError(
                f"`{type(self).__name__}.distillation_weights` must return one finite weight and one finite positive "
                f"temperature per re-used sample, as two tensors of shape {expected}; got {alphas.tolist()} and "
                f"{temperatures.tolist()}. Compute them per sample from `stats.uncertainty` and "
                "`stats.discrimination`."
            )
        return alphas, temperatures

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        indices, reused = inputs.pop(_INDEX, None), inputs.pop(_REUSED, None)
        if not self.model.training or indices is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)  # plain SFT; no cache
        if return_outputs:
            raise ValueError("DynSDPBTrainer does not return outputs during training.")
        if self._teacher_cache_to_restore is not None:  # the first step of a resumed run
            self._restore_teacher_cache(*self._teacher_cache_to_restore)
            self._teacher_cache_to_restore = None
        self.teacher_cache.advance_to(self.state.global_step)
        rows = _Rows(indices.tolist(), reused.tolist(), (inputs["labels"][:, 1:] != -100).sum(dim=1).tolist())
        distillation, weights = self._distillation_inputs(rows)
        model_inputs = {k: v for k, v in inputs.items() if k not in ("completion_mask", "assistant_masks")}
        outputs = model(**model_inputs, dynsdpb=distillation)  # the loss terms, computed inside the forward (head.py)
        self._cache_new_samples(rows, outputs)

        ce_sum, distill_sum = -outputs.log_probs.sum(), outputs.distill.sum()
        num_tokens = sum(rows.counts) if num_items_in_batch is None else num_items_in_batch
        loss = (ce_sum + distill_sum) / torch.as_tensor(num_tokens).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; the token count spans all ranks
        self._record_metrics(inputs, outputs, ce_sum, distill_sum, rows, weights, num_tokens, num_items_in_batch)
        return loss

    def _distillation_inputs(self, rows: _Rows) -> tuple[DistillationInputs, torch.Tensor]:
        """Takes the re-used rows' teachers from the cache; returns the forward's inputs and `[u, d, alpha, T]`."""
        teachers = {}
        for row, (index, is_reused) in enumerate(zip(rows.indices, rows.reused, strict=True)):
            teacher = self.teacher_cache.take(index) if is_reused else None
            if teacher is None:  # a new sample, the first step, or a checkpoint without a cache
                continue
            if teacher.states.shape[0] != rows.counts[row]:
                raise RuntimeError(
                    f"Sample {index} has {rows.counts[row]} response tokens now but had {teacher.states.shape[0]} "
                    "one step ago: its tokenization must be deterministic (no random truncation or augmentation)."
                )
            teachers[row] = teacher
        device = output_layer(self.model).weight.device
        vocab_size, hidden_size = output_layer_sizes(self.model)
        width = hidden_size if self.teacher_cache.holds_hidden_states else vocab_size
        statistics = torch.stack([t.statistics for t in teachers.values()]) if teachers else torch.zeros(0, 2)
        statistics = statistics.to(device)
        alphas, temperatures = self._checked_weights(SampleStatistics(statistics[:, 0], statistics[:, 1]))
        token_counts = torch.tensor([rows.counts[row] for row in teachers], dtype=torch.long, device=device)
        teacher_states = [t.states for t in teachers.values()]
        inputs = DistillationInputs(
            distilled_rows=torch.tensor([row in teachers for row in range(len(rows.indices))], device=device),
            teacher=torch.cat(teacher_states) if teachers else torch.zeros(0, width, device=device),
            teacher_is_hidden=self.teacher_cache.holds_hidden_states,
            kl_weight=alphas.float().repeat_interleave(token_counts),
            temperature=temperatures.float().repeat_interleave(token_counts),
            returned_rows=~torch.tensor(rows.reused, dtype=torch.bool, device=device),
            chunk_size=self.args.dynsdpb_loss_chunk_size,
            returned_logits_dtype=None if self.teacher_cache.holds_hidden_states else self.teacher_cache.dtype,
        )
        return inputs, torch.stack([statistics[:, 0], statistics[:, 1], alphas.float(), temperatures.float()], 1)

    @torch.no_grad()
    def _cache_new_samples(self, rows: _Rows, outputs: DistillationOutput) -> None:
        """Caches each new sample's prediction (hidden states, or logits for a trained output layer) and its `u, d`."""
        new = [row for row, is_reused in enumerate(rows.reused) if not is_reused]
        if not new:
            return
        counts = [rows.counts[row] for row in new]
        is_new = torch.repeat_interleave(
            ~torch.tensor(rows.reused, device=outputs.entropy.device),
            torch.tensor(rows.counts, device=outputs.entropy.device),
        )
        vocab_size = output_layer_sizes(self.model)[0]
        stats = sample_statistics(outputs.entropy[is_new], outputs.log_probs[is_new], counts, vocab_size)
        states = outputs.returned_hidden if self.teacher_cache.holds_hidden_states else outputs.returned_logits
        statistics = torch.stack([stats.uncertainty, stats.discrimination], dim=1)
        for row, row_states, row_statistics in zip(new, states.split(counts), statistics, strict=True):
            self.teacher_cache.put(rows.indices[row], row_states, row_statistics)

    def _record_metrics(
        self, inputs, outputs, ce_sum, distill_sum, rows: _Rows, weights: torch.Tensor, num_tokens, num_items_in_batch
    ) -> None:
        """Adds this micro-batch to its optimizer step's sums, gathered over processes, and logs the step's means.

        Each metric holds one entry per optimizer step, which `SFTTrainer.log` averages: as `Trainer` does for `loss`.
        Within a step, the per-token metrics (`ce_loss`, `distill/loss`, `mean_token_accuracy`, `entropy`) are
        weighted exactly as the loss is: each micro-batch's sum is divided by what `compute_loss` divides it by (the
        step's response tokens), then by the accumulation steps if `training_step` does so, and averaged over
        processes; so `loss == ce_loss + distill/loss`. The per-sample means are weighted by their samples.
        """
        scaled_for_ga = self.loss_is_scaled_for_ga
        if scaled_for_ga is None:  # `Trainer.training_step`'s rule
            scaled_for_ga = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        with torch.no_grad():
            zero = ce_sum.new_zeros(()).float()
            scale = 1 / (zero + torch.as_tensor(num_tokens).to(zero.device)).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                scale = scale * self.accelerator.num_processes  # as `compute_loss` scales the loss
            if not scaled_for_ga:  # only set during `train`; a direct `compute_loss` call is not divided
                scale = scale / getattr(self, "current_gradient_accumulation_steps", 1)
            sums = torch.stack(
                [
                    ce_sum.detach().float() * scale,
                    distill_sum.detach().float() * scale,
                    outputs.is_top1.sum().float() * scale,
                    outputs.entropy.sum().float() * scale,
                    zero + weights.shape[0],
                    zero + len(rows.indices),
                    zero + inputs["attention_mask"].sum(),
                    *weights.to(zero.device).float().sum(0),
                ]
            )
            gathered = self.accelerator.gather(sums[None]).sum(0).tolist()
        ce, distill, correct, entropy, distilled, batch_rows, seen, *dynamics = gathered
        self._stop_on_non_finite_loss(ce, distill, distilled, dynamics)
        self._total_train_tokens += int(seen)
        metrics = self._metrics["train"]
        metrics["num_tokens"] = [self._total_train_tokens]
        # `Trainer` logs the mean over processes of each process's loss, hence the division.
        processes = self.accelerator.num_processes
        entries = [
            ("ce_loss", ce / processes, None),
            ("distill/loss", distill / processes, None),
            ("mean_token_accuracy", correct / processes, None),
            ("entropy", entropy / processes, None),
            ("distill/reused_fraction", distilled, batch_rows),
        ]
        if distilled > 0:
            names = (f"distill/mean_{name}" for name in ("uncertainty", "discrimination", "alpha", "temperature"))
            entries += [(name, value, distilled) for name, value in zip(names, dynamics, strict=True)]
        if self._step_sums[0] != self.state.global_step:
            self._step_sums = (self.state.global_step, {})
        step_sums = self._step_sums[1]
        for name, value, weight in entries:
            seen_this_step = name in step_sums
            total = step_sums.setdefault(name, [0.0, 0.0])
            total[0] += value
            total[1] += weight or 0.0
            mean = total[0] if weight is None else total[0] / max(total[1], 1)  # the former are already per token
            if seen_this_step and metrics[name]:
                metrics[name][-1] = mean  # the step's entry so far
            else:
                metrics[name].append(mean)

    def _stop_on_non_finite_loss(self, ce: float, distill: float, distilled: float, dynamics: list[float]) -> None:
        """Raises before the backward pass of a micro-batch whose loss is NaN or infinite (see `_get_grad_norm`).

        The values are gathered over processes, so every process stops at the same micro-batch.
        """
        self._last_loss_terms = (ce, distill, distilled, dynamics)
        if not (math.isfinite(ce) and math.isfinite(distill)):
            self._stop_non_finite("the loss is not finite")

    def _get_grad_norm(self, model, grad_norm=None):
        # A finite loss can still give NaN gradients (a temperature so small that the logits over it overflow), and
        # one such update puts NaN in every trained weight, which no later step undoes, while the logged loss can
        # show 0.0. `Trainer` computes the global norm of the step's gradients here, just before the optimizer step.
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        # fp16's gradient scaler expects overflows: it skips those steps and lowers its scale by itself.
        if self.accelerator.scaler is None and grad_norm is not None and not math.isfinite(float(grad_norm)):
            self._stop_non_finite(f"the gradient norm is {float(grad_norm)}")
        return grad_norm

    def _stop_non_finite(self, what: str) -> None:
        ce, distill, distilled, dynamics = getattr(self, "_last_loss_terms", (math.nan, math.nan, 0, []))
        means = ", ".join(
            f"{name} {value / distilled:.4g}"
            for name, value in zip(("uncertainty", "discrimination", "alpha", "temperature"), dynamics, strict=True)
        )
        raise FloatingPointError(
            f"Training stopped at step {self.state.global_step + 1}, before its update: {what} (last micro-batch: "
            f"cross-entropy {ce:.4g}, distillation term {distill:.4g}, {int(distilled)} re-used samples"
            f"{' with mean ' + means if distilled else ''}; dynsdpb_mode={self.args.dynsdpb_mode!r}, "
            f"dynsdpb_alpha={self.args.dynsdpb_alpha}, dynsdpb_temperature={self.args.dynsdpb_temperature}). The "
            "weights are those of the previous step. A tiny temperature or a huge weight overflows the distillation "
            "term: use values nearer DLB's defaults (alpha 1, temperature 3), or load the model in higher precision."
        )

    # ------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model, trial):
        # `Trainer` writes into the final `checkpoint-N` folder and `trainer_state.json` last, so that file marks a
        # complete checkpoint: each process's teacher cache is written, whole, before `Trainer` starts.
        checkpoint = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        path = os.path.join(checkpoint, TEACHER_CACHE_FILE.format(rank=self.accelerator.process_index))
        with atomic_file(path, "wb", durable=True) as file:  # a stopped save leaves no cut file under the real name
            torch.save(self.teacher_cache.state_dict(), file)
        self.accelerator.wait_for_everyone()  # process 0 writes `trainer_state.json` only once every cache is saved
        super()._save_checkpoint(model, trial)

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None):
        # Every resume passes here, whichever loader then restores the weights: `Trainer._load_from_checkpoint`, or
        # DeepSpeed's own (ZeRO-1/2/3), which never calls it. So the teacher cache is checked here, before anything is
        # loaded (a broken checkpoint stops the run instead of silently changing its losses), and restored at the
        # first training step, once the model is on its device.
        checkpoint = resume_from_checkpoint
        if checkpoint is True and os.path.isdir(self.args.output_dir):
            checkpoint = get_last_checkpoint(self.args.output_dir)  # as `Trainer.train` resolves it
        self._teacher_cache_to_restore = None
        if isinstance(checkpoint, (str, os.PathLike)) and os.path.isdir(checkpoint):  # else `Trainer`'s own error
            self._teacher_cache_to_restore = self._read_teacher_cache(os.fspath(checkpoint))
        return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval)

    def _restore_teacher_cache(self, path: str, state: dict) -> None:
        self.teacher_cache.load_state_dict(state, output_layer(self.model).weight.device, source=path)

    def _read_teacher_cache(self, checkpoint: str) -> tuple[str, dict]:
        """This process's teacher cache in `checkpoint`, checked to belong to it; a clear error if it cannot."""
        rank = self.accelerator.process_index
        path = os.path.join(checkpoint, TEACHER_CACHE_FILE.format(rank=rank))
        try:
            step = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME)).global_step
        except (OSError, ValueError, TypeError) as error:  # missing, cut (JSONDecodeError) or not a trainer state
            raise _unusable_checkpoint(
                checkpoint, _step_of(checkpoint), rank,
                f"its {TRAINER_STATE_NAME}, which `Trainer` writes last, is missing or unreadable "
                f"({_first_line(error)}), so the run was stopped while saving it",
            ) from error  # fmt: skip
        if not os.path.isfile(path):
            raise _unusable_checkpoint(
                checkpoint, step, rank,
                f"{path} is missing (the run was stopped before saving it, or the checkpoint was not written by "
                "DynSDPBTrainer), so the re-used samples of the next step would train without distillation",
            )  # fmt: skip
        try:
            state = torch.load(path, weights_only=True)
        except (EOFError, OSError, RuntimeError, pickle.UnpicklingError) as error:
            raise _unusable_checkpoint(
                checkpoint, step, rank, f"{path} is cut short or damaged ({_first_line(error)})"
            ) from error
        if not isinstance(state, dict) or not {"step", "kind", "entries"} <= state.keys():
            raise _unusable_checkpoint(checkpoint, step, rank, f"{path} is not a DynSDPB teacher cache")
        # The cache of the checkpoint at step N holds what step N's forward passes (counted from 0: N - 1) wrote.
        saved_at = None if state["step"] is None else state["step"] + 1
        if saved_at != step:
            raise _unusable_checkpoint(
                checkpoint, step, rank,
                f"{path} was saved at step {saved_at}, not at the checkpoint's step {step} (a stale file), so it "
                "does not hold the predictions the next step distils from",
            )  # fmt: skip
        return path, state

    # ------------------------------------------------------------ model card
    def _model_card_sections(self) -> list[str]:
        return [dynsdpb_settings_section(self.args), *super()._model_card_sections()]


_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def _step_of(checkpoint: str) -> int | None:
    match = _CHECKPOINT_NAME.match(os.path.basename(os.path.normpath(checkpoint)))
    return int(match.group(1)) if match else None


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _unusable_checkpoint(checkpoint: str, step: int | None, rank: int, problem: str) -> ValueError:
    """The error for a checkpoint that cannot resume exactly, with the way out: an earlier checkpoint, or none."""
    checkpoint = os.path.normpath(checkpoint)
    number = _step_of(checkpoint) if _step_of(checkpoint) is not None else step
    previous = None if number is None else _previous_checkpoint(checkpoint, number, rank)
    if previous is not None:
        fix = (
            f"Resume from the previous checkpoint instead, `resume_from_checkpoint='{previous}'`, or delete "
            f"{checkpoint} so that `resume_from_checkpoint=True` picks {os.path.basename(previous)}."
        )
    else:
        fix = f"There is no complete earlier checkpoint next to it: delete {checkpoint} and train from the start."
    at = "" if step is None else f" (step {step})"
    return ValueError(f"Cannot resume exactly from {checkpoint}{at}: {problem}. {fix}")


def _previous_checkpoint(checkpoint: str, number: int, rank: int) -> str | None:
    """The newest checkpoint before step `number` next to `checkpoint` with a trainer state and this rank's cache."""
    parent, complete = os.path.dirname(checkpoint), {}
    for name in os.listdir(parent or "."):
        folder, step = os.path.join(parent, name), _step_of(name)
        required = (TRAINER_STATE_NAME, TEACHER_CACHE_FILE.format(rank=rank))
        if step is not None and step < number and all(os.path.isfile(os.path.join(folder, f)) for f in required):
            complete[step] = folder
    return complete[max(complete)] if complete else None


class _Rows(NamedTuple):
    """The rows of a micro-batch: dataset index, whether re-used, number of response tokens."""

    indices: list[int]
    reused: list[bool]
    counts: list[int]
