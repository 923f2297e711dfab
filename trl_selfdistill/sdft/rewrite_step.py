"""`SDFTRewriteMixin`: the SDFT rewrite (Yang et al., ACL 2024) as one step in front of a trainer.

Mixed in before one full trainer (`SDFTTrainer = SDFTRewriteMixin + SFTTrainer`, `SDFTDynSDPBTrainer =
SDFTRewriteMixin + DynSDPBTrainer`), it adds what the rewrite needs and nothing else: its checks before loading, the
server engine built and checked before loading, the rewrite itself, the raw training set held back until the rewrite
is done, the distillation report and saved rows, their logs and their model-card section.
"""

from __future__ import annotations

import copy
import textwrap
from typing import Any

from datasets import Dataset
from transformers import AutoProcessor, PreTrainedTokenizerBase, ProcessorMixin

from ..generation.local import release_unquantized, unquantized_seed_model
from ..generation.server import completion_fields
from ..models import resolve_model_name
from ..utils import check_liger_kernel, check_trainable_dtypes, shards_parameters
from .card import sdft_report_section
from .config import SDFTConfig
from .outputs import REPORT_FILE, ROWS_FILE, rows_cut_by_max_length, save_distillation, warn_cut
from .rewrite import check_scoring, distill_with_engine, engine_from_config
from .targets import RewriteTarget, collect_targets
from .templates import check_renderable


class SDFTRewriteMixin:
    """The seed model rewrites the training set before the trainer it is mixed into (listed after it) trains on it.

    The trainer after it runs as it would alone, except that its pre-load checks run once, first, through
    `check_inputs` (it sees `_inputs_checked` set) and that its training set reaches `_prepare_dataset` only after
    the rewrite. After construction, `distillation_report` holds the counts, also logged, saved in `output_dir` next to
    the distilled dataset and shown in the model card.
    """

    _paper = {
        "title": "Self-Distillation Bridges Distribution Gap in Language Model Fine-Tuning",
        "id": "2402.13669",
        "citation": textwrap.dedent(
            """\
            @inproceedings{yang2024selfdistillation,
                title     = {{Self-Distillation Bridges Distribution Gap in Language Model Fine-Tuning}},
                author    = {Zhaorui Yang and Tianyu Pang and Haozhe Feng and Han Wang and Wei Chen and Minfeng Zhu
                             and Qian Liu},
                year      = 2024,
                booktitle = {Proceedings of the 62nd Annual Meeting of the Association for Computational Linguistics},
            }"""
        ),
    }

    def __init__(
        self,
        model,
        args: SDFTConfig,
        train_dataset: Dataset | None = None,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin | None = None,
        formatting_func=None,
        **kwargs: Any,
    ):
        # Every pre-load check, once: the trainer's, then the rewrite's (which also walks the dataset for the targets).
        self._distill_targets = self.check_inputs(args, train_dataset, formatting_func=formatting_func, **kwargs)
        self._inputs_checked = True
        self._server_engine = None  # built and checked once, before any loading, when the tokenizer is at hand
        if isinstance(model, str):
            model = resolve_model_name(model)
            if processing_class is None:  # loaded here, before the weights, to check the chat template early
                processing_class = AutoProcessor.from_pretrained(
                    model,
                    revision=(args.model_init_kwargs or {}).get("revision"),
                    trust_remote_code=args.trust_remote_code,
                )
        if processing_class is not None:
            tokenizer = getattr(processing_class, "tokenizer", processing_class)
            check_renderable(tokenizer, args.sdft_template_mode)
            if args.sdft_engine == "server":  # the server answers, serves the seed model and can score, before loading
                self._server_engine = engine_from_config(args, model, tokenizer)
                self._server_engine.check(args.sdft_spec.decoding)
                check_scoring(args.sdft_spec, self._server_engine)  # `lowest_nll` needs its prompt log-probabilities

        # The training set is tokenized only after the rewrite (see `_prepare_dataset`).
        self._train_dataset_distilled = False
        super().__init__(model, args=args, train_dataset=train_dataset, processing_class=processing_class, **kwargs)
        check_trainable_dtypes(self.model, uses_grad_scaler=self.accelerator.scaler is not None)

        result = self._rewrite(train_dataset)
        self._train_dataset_distilled = True
        self.train_dataset = self._prepare_dataset(
            result.dataset, self.processing_class, args, args.packing, None, "train"
        )
        cut = self._cut_by_max_length
        self.distillation_report = {
            **result.report,
            "truncated_by_max_length": len(cut["truncated"]),
            "dropped_by_max_length": len(cut["dropped"]),
        }
        for entry in result.rows:
            entry["sft_truncated"], entry["sft_dropped"] = (
                entry["row"] in cut["truncated"],
                entry["row"] in cut["dropped"],
            )
        self._save_distillation(result.dataset, result.rows)
        self.log({f"distill/{k}": float(v) for k, v in self.distillation_report.items() if isinstance(v, int | float)})

    @classmethod
    def check_inputs(cls, args: SDFTConfig, train_dataset, **trainer_kwargs: Any) -> list[RewriteTarget]:
        """Every check that can fail, done before the model is loaded and before any generation: first those of the
        trainer the rewrite is mixed into (DynSDPB's refuse what cannot train before the rewrite reads the data), then
        the rewrite's. `trainer_kwargs` are the trainer's other keyword arguments (`formatting_func`, ...). Returns
        the responses to rewrite (the dataset's only walk)."""
        trainer_checks = getattr(super(), "check_inputs", None)  # `SFTTrainer` has none
        if trainer_checks is not None:
            trainer_checks(args, train_dataset, **trainer_kwargs)
        if train_dataset is None:
            raise ValueError("`train_dataset` is required: SDFT rewrites it before training.")
        if trainer_kwargs.get("formatting_func") is not None:
            raise ValueError(
                "`formatting_func` turns rows into plain text, leaving SDFT no response to rewrite. Format the "
                "dataset as prompt-completion or `messages` instead."
            )
        if (args.dataset_kwargs or {}).get("skip_prepare_dataset"):
            raise ValueError(
                "`dataset_kwargs={'skip_prepare_dataset': True}` means the dataset is already tokenized, so SDFT "
                "cannot rewrite it. Pass an untokenized prompt-completion or `messages` dataset."
            )
        if shards_parameters(args) and args.sdft_engine != "server":
            # Sharded parameters need every rank in every forward, but each rank generates its own share of rows.
            raise ValueError(
                "SDFTTrainer cannot rewrite in process under DeepSpeed ZeRO-3 or FSDP. Rewrite on a server "
                "(`sdft_engine='server'`, which needs no local weights), or run the rewrite first with "
                "`trl_selfdistill.distill_dataset` (one process or plain data parallel), then train `SFTTrainer` on "
                "the distilled dataset with your sharded setup."
            )
        check_liger_kernel(args)
        if args.sdft_engine == "server":
            completion_fields(args.sdft_spec.decoding)
        return collect_targets(train_dataset)

    def _rewrite(self, train_dataset: Dataset):
        """The seed model rewrites the training set: on the server, with the unquantized weights, or in process."""
        args = self.args
        model = self.accelerator.unwrap_model(self.model)
        in_process = args.sdft_engine == "transformers"
        seed_model = unquantized_seed_model(model) if in_process and args.sdft_unquantized_seed else None
        engine = self._server_engine or engine_from_config(args, seed_model or model, self._tokenizer)
        try:
            return distill_with_engine(
                engine,
                self._tokenizer,
                train_dataset,
                self._distill_targets,
                args.sdft_spec,
                seed=args.seed,
                cache_dir=args.sdft_cache_dir,
                show_progress=not args.disable_tqdm,
            )
        finally:
            if seed_model is not None:  # freed before training needs the memory
                del engine
                release_unquantized(seed_model)

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        # `SFTTrainer.__init__` tokenizes the training set before the model is ready to rewrite it: keep it raw until
        # the rewrite is done. Evaluation sets are never rewritten.
        if dataset_name == "train" and not self._train_dataset_distilled:
            return dataset
        if dataset_name != "train":
            return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        # Tokenized first without `max_length`, to count the rows it cuts, then truncated (and packed) as SFT does.
        uncut_args = copy.copy(args)
        uncut_args.max_length, uncut_args.packing, uncut_args.shuffle_dataset = None, False, False
        tokenized = super()._prepare_dataset(dataset, processing_class, uncut_args, False, formatting_func, "train")
        self._cut_by_max_length = rows_cut_by_max_length(tokenized["labels"], args)
        warn_cut(self._cut_by_max_length, len(tokenized), args.max_length)
        return super()._prepare_dataset(tokenized, processing_class, args, packing, None, dataset_name)

    def _save_distillation(self, dataset: Dataset, rows: list[dict]) -> None:
        if self.is_world_process_zero():
            save_distillation(self.args.output_dir, dataset, self.distillation_report, rows)

    # ------------------------------------------------------------ model card
    def _model_card_sections(self) -> list[str]:
        return [sdft_report_section(self.distillation_report, ROWS_FILE, REPORT_FILE), *super()._model_card_sections()]
