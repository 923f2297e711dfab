"""Forgetting probes used to evaluate SDFT and DynSDPB runs."""

from __future__ import annotations

from .gsm8k import GSM8K_SYSTEM_PROMPT, evaluate_gsm8k, score_gsm8k_answer

__all__ = ["GSM8K_SYSTEM_PROMPT", "evaluate_gsm8k", "score_gsm8k_answer"]
