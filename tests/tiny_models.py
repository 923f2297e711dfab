"""Tiny local models for tests: a byte-level BPE tokenizer trained in memory and a random Llama (no downloads).

Imported by the conftest files and by the scripts that tests launch in subprocesses (with `tests/` on the path).
"""

from __future__ import annotations

# A minimal chat template in the ChatML-like style, with a BOS token in front.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tiny_tokenizer(chat_template: str | None = TINY_CHAT_TEMPLATE, with_bos: bool = True):
    """A ``PreTrainedTokenizerFast`` with a 300-token byte-level BPE vocabulary and optional chat template.

    With ``with_bos`` it has a ``<s>`` BOS token that encoding adds in front (like Llama-2); without, it has
    no BOS token at all.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = ["Below are an instruction and a reference answer.", "The answer is 72.", "def f(x): return x"]
    backend.train_from_iterator(corpus, trainer=trainer)
    if with_bos:  # Llama-like: encoding with special tokens puts <s> in front
        bos_id = backend.token_to_id("<s>")
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>" if with_bos else None,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def build_tiny_llama(tokenizer, seed: int = 0):
    """A randomly initialised 2-layer Llama sized for `tokenizer`; widths are multiples of 32 so 4-bit works on CPU."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def addition_rows(n: int = 16):
    """`n` prompt-completion rows of small additions, a dataset the tiny models can fit."""
    from datasets import Dataset

    return Dataset.from_list(
        [{"prompt": f"Add {i} and {i + 1}.", "completion": f"{i} plus {i + 1} is {2 * i + 1}."} for i in range(n)]
    )
