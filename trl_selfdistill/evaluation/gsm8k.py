"""The GSM8K forgetting probe of SDFT (Yang et al., ACL 2024, arXiv 2402.13669).

Each question is asked with the paper's system text, rendered through the model's own chat template,
answered greedily, and counted correct when the last integer of the output equals the last integer of
the label (the number rule of the official code, shared with the SDFT math acceptance filter).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from tqdm.auto import tqdm

from ..sdft.checkers import extract_last_number

GSM8K_SYSTEM_PROMPT = (
    "You are an expert in math. Below is a math question. Write a response that appropriately answers the "
    "question. Your final answer should be an integer at the end of your response, formatted as: "
    "The answer is {answer}."
)
"""The paper's evaluation system text; ``{answer}`` is literal, not a placeholder to fill."""


def score_gsm8k_answer(output: str, answer: str) -> bool:
    """True if the last integer in ``output`` equals the last integer in the label ``answer``."""
    predicted = extract_last_number(output)
    expected = extract_last_number(answer)
    return predicted is not None and expected is not None and predicted == expected


def _question_and_answer(row: Mapping[str, Any]) -> tuple[str, str]:
    """Read (question, label) from a raw GSM8K row or a conversational prompt-completion row."""
    if "question" in row and "answer" in row:
        return row["question"], row["answer"]
    if "prompt" in row and "completion" in row:
        prompt, completion = row["prompt"], row["completion"]
        if not isinstance(prompt, str):
            prompt = next(m["content"] for m in reversed(prompt) if m["role"] == "user")
        if not isinstance(completion, str):
            completion = "".join(m["content"] for m in completion if m["role"] == "assistant")
        return prompt, completion
    raise ValueError(
        f"evaluate_gsm8k needs rows with 'question'/'answer' or 'prompt'/'completion'; got keys {sorted(row)}."
    )


def _render(tokenizer: Any, question: str, system_prompt: str | None) -> str:
    messages = [{"role": "user", "content": question}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:
        if not system_prompt:
            raise
        # Some templates reject a system role: prepend the system text to the user turn instead.
        merged = [{"role": "user", "content": f"{system_prompt}\n\n{question}"}]
        return tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)


def evaluate_gsm8k(
    model: Any,
    tokenizer: Any,
    dataset: Iterable[Mapping[str, Any]],
    batch_size: int = 16,
    max_new_tokens: int = 512,
    *,
    system_prompt: str | None = GSM8K_SYSTEM_PROMPT,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Greedy GSM8K accuracy of ``model`` (a transformers or PEFT causal LM) on ``dataset``.

    ``dataset`` holds raw GSM8K rows (``question``, ``answer``) or conversational prompt-completion rows.
    Prompts are batched by length with left padding; the tokenizer's padding side and the model's
    train/eval mode are restored afterwards.

    Returns ``{"accuracy", "correct", "total", "outputs"}``, where ``outputs`` lists, in dataset order,
    ``{"question", "answer", "output", "correct"}`` per row.
    """
    rows = [_question_and_answer(row) for row in dataset]
    prompts = [_render(tokenizer, question, system_prompt) for question, _ in rows]
    # Longest first: batches of similar length waste less compute on padding, and OOM shows up at once.
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])

    padding_side, set_pad_token = tokenizer.padding_side, tokenizer.pad_token is None
    was_training = model.training
    generations: list[str] = [""] * len(prompts)
    try:
        tokenizer.padding_side = "left"
        if set_pad_token:
            tokenizer.pad_token = tokenizer.eos_token
        model.eval()
        device = next(model.parameters()).device
        progress = tqdm(total=len(prompts), desc="GSM8K", disable=not show_progress)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                index = order[start : start + batch_size]
                inputs = tokenizer(
                    [prompts[i] for i in index], return_tensors="pt", padding=True, add_special_tokens=False
                ).to(device)
                output_ids = model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=tokenizer.pad_token_id,
                )
                texts = tokenizer.batch_decode(output_ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
                for i, text in zip(index, texts, strict=True):
                    generations[i] = text.strip()
                progress.update(len(index))
        progress.close()
    finally:
        tokenizer.padding_side = padding_side
        if set_pad_token:
            tokenizer.pad_token = None
        model.train(was_training)

    outputs = [
        {"question": q, "answer": a, "output": out, "correct": score_gsm8k_answer(out, a)}
        for (q, a), out in zip(rows, generations, strict=True)
    ]
    correct = sum(o["correct"] for o in outputs)
    total = len(outputs)
    return {"accuracy": correct / total if total else 0.0, "correct": correct, "total": total, "outputs": outputs}
