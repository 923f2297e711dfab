"""DynSDPBTrainer: dynamic self-distillation from the previous mini-batch (Fu et al., 2024) as a drop-in `SFTTrainer`.

    batch(t) = new samples of step t-1 (re-used) + new samples of step t          (sampler.py, one chain per slot)
    loss     = CE over the whole batch
             + sum_i alpha_i T_i^2 sum_j KL(softmax(z_prev_ij / T_i) || softmax(z_ij / T_i))   over re-used samples
             all divided by the number of response tokens, TRL's normalisation     (losses.py, schedule.py)

`z_prev` are the logits the model gave the same sample's response tokens one optimizer update earlier
(teacher_cache.py). The student's logits are projected from the final hidden states at response positions only.
"""

from __future__ import annotations

import os
import textwrap
from typing import Any

import torch
import torch.nn.functional as F
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers.utils import logging
from trl import SFTTrainer

from ..utils import shards_parameters
from .config import DynSDPBConfig
from .losses import distillation_loss_sum
from .sampler import OverlappingBatchSampler, reuse_count_for
from .schedule import DISTILL_MODES, SampleStatistics
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


class DynSDPBTrainer(SFTTrainer):
    """
    Trainer for dynamic self-distillation from the previous mini-batch (DynSDPB),
    [Fu et al., 2024](https://huggingface.co/papers/2411.16991), on top of DLB (Shen et al., CVPR 2022).

    Half of each per-device batch (`reuse_fraction`) repeats the samples that were new in the same batch slot one
    optimizer step earlier; those are distilled towards the logits the model gave them then, with a per-sample weight
    and temperature that adapt to how certain and how right those predictions were (`distill_mode="dynamic"`, this
    project's reading of the paper) or are fixed (`"constant"`, DLB). Everything else is [`~trl.SFTTrainer`]: same
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

    def __init__(self, model, args: DynSDPBConfig | None = None, train_dataset: Dataset | None = None, **kwargs):
        if args is None:
            args = DynSDPBConfig(f"{str(model).rstrip('/').split('/')[-1]}-DynSDPB")
        elif not isinstance(args, DynSDPBConfig):
            raise TypeError(f"`args` must be a `DynSDPBConfig`, got {type(args).__name__}.")
        self._validate_before_loading(args, train_dataset, kwargs)
        super().__init__(model, args=args, train_dataset=train_dataset, **kwargs)
        self._validate_model()
        self.teacher_cache = TeacherCache(getattr(torch, args.teacher_cache_dtype))

    @staticmethod
    def _validate_before_loading(args: DynSDPBConfig, train_dataset, kwargs: dict) -> None:
        """Every configuration that cannot work, refused before the model is loaded."""
        if not isinstance(train_dataset, Dataset):
            raise TypeError(
                "DynSDPB needs a map-style `datasets.Dataset`: its sampler re-uses samples by index. Got "
                f"{type(train_dataset).__name__}; materialize it with `Dataset.from_list(list(dataset))`."
            )
        if args.packing or args.padding_free:
            raise ValueError(
                "DynSDPB aligns each sample with its own previous-step logits, so samples must stay separate rows: "
                "set `packing=False` and `padding_free=False`."
            )
        if shards_parameters(args):
            raise ValueError(
                "DynSDPB projects hidden states through the output layer itself, which DeepSpeed ZeRO-3 and FSDP "
                "shard. Use plain data parallelism (`accelerate launch --multi_gpu`), with LoRA or QLoRA for large "
                "models."
            )
        if args.loss_type != "nll" or args.label_smoothing_factor > 0 or kwargs.get("compute_loss_func") is not None:
            raise ValueError(
                "DynSDPB computes its own loss (cross-entropy + distillation): use `loss_type='nll'`, no "
                "`label_smoothing_factor` and no `compute_loss_func`."
            )
        reuse = reuse_count_for(args.per_device_train_batch_size, args.reuse_fraction)
        needed = args.gradient_accumulation_steps * args.world_size * (args.per_device_train_batch_size - reuse)
        if len(train_dataset) < needed:
            raise ValueError(
                f"The training dataset has {len(train_dataset)} rows but one optimizer step takes {needed} new "
                "samples (gradient_accumulation_steps x processes x (per_device_train_batch_size - re-used)). Use "
                "more data or lower `per_device_train_batch_size` / `gradient_accumulation_steps`."
            )

    def _validate_model(self) -> None:
        text_config = self.model.config.get_text_config()
        for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
            if getattr(text_config, name, None) not in (None, 1, 1.0):
                raise ValueError(
                    f"DynSDPB projects hidden states with the plain output layer, but this model sets `{name}`. Only "
                    "models whose logits are `lm_head(hidden_states)` (Llama, Mistral, Qwen, ...) are supported."
                )

    # ------------------------------------------------------------------ data
    def get_train_dataloader(self) -> DataLoader:
        dataset = self._remove_unused_columns(self.train_dataset, description="training")
        args = self.args
        sampler = OverlappingBatchSampler(
            num_samples=len(dataset),
            batch_size=args.per_device_train_batch_size,
            reuse_count=reuse_count_for(args.per_device_train_batch_size, args.reuse_fraction),
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
        rule = DISTILL_MODES[self.args.distill_mode]
        return rule(stats, self.args.distill_alpha, self.args.distill_temperature)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        indices, reused = inputs.pop(_INDEX, None), inputs.pop(_REUSED, None)
        if not self.model.training or indices is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)  # plain SFT; no cache
        if return_outputs:
            raise ValueError("DynSDPBTrainer does not return outputs during training.")
        self.teacher_cache.advance_to(self.state.global_step)

        labels = inputs["labels"][:, 1:]
        forward_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "completion_mask", "assistant_masks")}
        # Only the last position's logits are built by the model; the response positions are projected below.
        outputs = model(**forward_inputs, output_hidden_states=True, logits_to_keep=1, use_cache=False)
        mask = labels != -100
        hidden = outputs.hidden_states[-1][:, :-1][mask]
        logits = self.accelerator.unwrap_model(model).get_output_embeddings()(hidden)  # [response tokens, vocab]
        targets = labels[mask]
        token_slices = _token_slices(mask.sum(dim=1).tolist())

        ce_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
        student, teacher, gold = [], [], []
        for row, (index, is_reused) in enumerate(zip(indices.tolist(), reused.tolist(), strict=True)):
            row_logits = logits[token_slices[row]]
            if not is_reused:
                self.teacher_cache.put(index, row_logits)
                continue
            cached = self.teacher_cache.take(index)
            if cached is None:  # the first step, or a checkpoint without a cache
                continue
            if cached.shape != row_logits.shape:
                raise RuntimeError(
                    f"Sample {index} has {row_logits.shape[0]} response tokens now but had {cached.shape[0]} one "
                    "step ago: its tokenization must be deterministic (no random truncation or augmentation)."
                )
            student.append(row_logits)
            teacher.append(cached)
            gold.append(targets[token_slices[row]])

        kl_sum, dynamics = logits.new_zeros((), dtype=torch.float32), None
        if student:
            sample_ids = torch.cat([torch.full((len(g),), i, device=logits.device) for i, g in enumerate(gold)])
            kl_sum, stats, alphas, temperatures = distillation_loss_sum(
                torch.cat(student),
                torch.cat(teacher),
                torch.cat(gold),
                sample_ids,
                len(student),
                self.args.distill_alpha,
                self.args.distill_temperature,
                chunk_size=self.args.kl_chunk_size,
                weights_fn=self.distillation_weights,
            )
            dynamics = [alphas, temperatures, stats.uncertainty, stats.discrimination]
        num_tokens = mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = (ce_sum + kl_sum) / torch.as_tensor(num_tokens).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; the token count spans all ranks
        self._record_metrics(logits, targets, ce_sum, kl_sum, len(indices), len(student), dynamics)
        return loss

    def _record_metrics(self, logits, targets, ce_sum, kl_sum, batch_rows, n_distilled, dynamics) -> None:
        """Sums gathered over processes, then turned into the means that appear in the logs."""
        with torch.no_grad():
            zero = ce_sum.new_zeros(())
            sums = torch.stack(
                [
                    ce_sum.detach(),
                    zero + targets.numel(),
                    (logits.argmax(dim=-1) == targets).sum().float(),
                    kl_sum.detach(),
                    zero + n_distilled,
                    zero + batch_rows,
                    *([zero + value.sum() for value in dynamics] if dynamics else [zero] * 4),
                ]
            ).float()
            ce, tokens, correct, kl, distilled, rows, alpha, temp, unc, disc = self.accelerator.gather(sums[None]).sum(
                0
            )
        metrics = self._metrics["train"]
        metrics["ce_loss"].append((ce / tokens.clamp(min=1)).item())
        metrics["mean_token_accuracy"].append((correct / tokens.clamp(min=1)).item())
        metrics["distill/loss"].append((kl / tokens.clamp(min=1)).item())
        metrics["distill/reused_fraction"].append((distilled / rows.clamp(min=1)).item())
        if distilled > 0:
            for name, value in (
                ("alpha", alpha),
                ("temperature", temp),
                ("uncertainty", unc),
                ("discrimination", disc),
            ):
                metrics[f"distill/mean_{name}"].append((value / distilled).item())

    # ------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        checkpoint = os.path.join(self._get_output_dir(trial), f"checkpoint-{self.state.global_step}")
        path = os.path.join(checkpoint, TEACHER_CACHE_FILE.format(rank=self.accelerator.process_index))
        torch.save(self.teacher_cache.state_dict(), path)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, TEACHER_CACHE_FILE.format(rank=self.accelerator.process_index))
        if os.path.isfile(path):
            self.teacher_cache.load_state_dict(torch.load(path, weights_only=True), self.accelerator.device)
        else:
            logger.warning(
                f"{path} not found: resuming without the previous step's logits, so the first re-used samples are "
                "trained without distillation."
            )


def _token_slices(counts: list[int]) -> list[slice]:
    """The slice of the packed response tokens that belongs to each row."""
    slices, start = [], 0
    for count in counts:
        slices.append(slice(start, start + count))
        start += count
    return slices
