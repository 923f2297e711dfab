"""Helpers of the `trl_selfdistill_ifeval` lm-eval task: the bundled IFEval prompts and lm-eval's own IFEval scoring.

lm-eval imports this file by path (``!function utils.<name>`` in the task's yaml), not as part of the package.
"""

from __future__ import annotations

from typing import Any

from trl_selfdistill.evaluation.ifeval import ensure_punkt_tab, load_ifeval

# lm-eval's IFEval tries to download NLTK's punkt_tab when first imported: write it locally first.
ensure_punkt_tab()

from lm_eval.tasks.ifeval.utils import agg_inst_level_acc, process_results  # noqa: E402

__all__ = ["agg_inst_level_acc", "load_bundled_ifeval", "process_results"]


def load_bundled_ifeval(**kwargs: Any):
    """The 541 bundled IFEval prompts as the ``train`` split (the split lm-eval's ``ifeval`` task reads).

    lm-eval calls a ``custom_dataset`` with the task's metadata and ``dataset_kwargs`` as keyword arguments
    (``version``, and whatever ``--metadata`` adds); none of them change the data.
    """
    import datasets

    ensure_punkt_tab()
    return datasets.DatasetDict({"train": datasets.Dataset.from_list(load_ifeval())})
