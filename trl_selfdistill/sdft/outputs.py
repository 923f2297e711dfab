"""What the rewrite leaves beside the model: the distilled dataset, the report, and the audit trail of every row.

- `distilled_dataset.jsonl`: the training set as trained on (accepted rewrites in place of the references);
- `distillation_report.json`: the counts (accepted, fell back and why, skipped and why, cut by `max_length`);
- `distillation_rows.jsonl`: one line per response: `row`, `turn` (-1 for a completion string), `rewrite` (null when
  the response was skipped), `accepted`, `reason` (null when accepted), `truncated` (the rewrite stopped at
  `max_new_tokens`), and from SDFTTrainer `sft_truncated` / `sft_dropped` (its row was cut or dropped by `max_length`).
  With other `sdft_candidates` / `sdft_selection` than the default, also `target` (`own_answer`, `rewrite`,
  `reference`; null when skipped) and `candidates` (each candidate's `kind`, `text`, `accepted`, `reason`, `truncated`,
  `seed_nll`); `rewrite` and `truncated` stay those of the SDFT rewrite, `accepted` means "not the reference".
"""

from __future__ import annotations

import json
import os
from typing import Any

from datasets import Dataset
from transformers.utils import logging

logger = logging.get_logger(__name__)

DISTILLED_DATASET_FILE = "distilled_dataset.jsonl"
REPORT_FILE = "distillation_report.json"
ROWS_FILE = "distillation_rows.jsonl"


def save_distillation(output_dir: str, dataset: Dataset, report: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Writes the distilled dataset, the report and the audit trail into `output_dir`."""
    os.makedirs(output_dir, exist_ok=True)
    dataset.to_json(os.path.join(output_dir, DISTILLED_DATASET_FILE), lines=True)
    with open(os.path.join(output_dir, REPORT_FILE), "w", encoding="utf-8") as file:
        json.dump(report, file, indent=2, default=str)
    with open(os.path.join(output_dir, ROWS_FILE), "w", encoding="utf-8") as file:
        file.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def rows_cut_by_max_length(labels: list[list[int]], args) -> dict[str, set[int]]:
    """The rows SFT preparation will truncate, and those it will drop because none of their trained tokens is left.

    `labels` are the untruncated labels of each row (-100 where no loss is taken), `args` an `SFTConfig`. Packing with
    `bfd_split` or `wrapped` moves the overflow to other sequences instead of cutting it, so nothing is lost there.
    """
    limit = args.max_length
    if limit is None or (args.packing and args.packing_strategy != "bfd"):
        return {"truncated": set(), "dropped": set()}
    kept = slice(-limit, None) if args.truncation_mode == "keep_end" and not args.packing else slice(None, limit)
    truncated = {row for row, row_labels in enumerate(labels) if len(row_labels) > limit}
    dropped = {row for row in truncated if all(label == -100 for label in labels[row][kept])}
    return {"truncated": truncated - dropped, "dropped": dropped}


def warn_cut(cut: dict[str, set[int]], total: int, max_length: int | None) -> None:
    if not cut["truncated"] and not cut["dropped"]:
        return
    parts = []
    if cut["truncated"]:
        parts.append(f"truncates {len(cut['truncated'])} (first: row {min(cut['truncated'])})")
    if cut["dropped"]:
        parts.append(
            f"drops {len(cut['dropped'])} whose trained tokens are all cut (first: row {min(cut['dropped'])})"
        )
    logger.warning(
        f"`max_length={max_length}` {' and '.join(parts)} of the {total} distilled rows. Raise `max_length` (or set "
        "it to None) to train on them whole; the report counts them as `truncated_by_max_length` and "
        "`dropped_by_max_length`, and `distillation_rows.jsonl` marks each."
    )
