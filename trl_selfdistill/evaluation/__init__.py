"""Forgetting probes and the forgetting benchmark of SDFT and DynSDPB runs.

The probes score one model as the SDFT paper does (Yang et al., ACL 2024, arXiv 2402.13669): GSM8K (gsm8k.py),
HumanEval pass@1 with the code run in a sandbox (humaneval.py, sandbox.py), the AdvBench safe rate (advbench.py), and
the similarity of general answers to the seed model's (similarity.py); and as later self-distillation work does:
IFEval, scored by lm-eval's own implementation (ifeval.py). The benchmark (benchmark.py) trains the arms over several
seeds (arms.py), runs every probe on the seed model and every arm (probes.py), and writes the report (report.py) with
confidence intervals over seeds and paired differences (stats.py).
"""

from __future__ import annotations

from .advbench import ADVBENCH_JAILBREAK_SUFFIX, ADVBENCH_REFUSAL_KEYWORDS, evaluate_advbench, is_safe, load_advbench
from .gsm8k import GSM8K_SYSTEM_PROMPT, evaluate_gsm8k, load_gsm8k_test, score_gsm8k_answer
from .humaneval import HUMANEVAL_INSTRUCTION, evaluate_humaneval, load_humaneval, score_humaneval_answer
from .ifeval import evaluate_ifeval, load_ifeval, score_ifeval_responses
from .similarity import SentenceEmbedder, general_answers, load_general_prompts, mean_cosine_similarity

__all__ = [
    "ADVBENCH_JAILBREAK_SUFFIX",
    "ADVBENCH_REFUSAL_KEYWORDS",
    "GSM8K_SYSTEM_PROMPT",
    "HUMANEVAL_INSTRUCTION",
    "SentenceEmbedder",
    "evaluate_advbench",
    "evaluate_gsm8k",
    "evaluate_humaneval",
    "evaluate_ifeval",
    "general_answers",
    "is_safe",
    "load_advbench",
    "load_general_prompts",
    "load_gsm8k_test",
    "load_humaneval",
    "load_ifeval",
    "mean_cosine_similarity",
    "score_gsm8k_answer",
    "score_humaneval_answer",
    "score_ifeval_responses",
]
