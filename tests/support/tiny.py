"""Tiny models and tokenizers that the tests build themselves: no hub, a few seconds in all.

Every linear dimension is a multiple of 64: bitsandbytes' CPU 4-bit kernels need it.
"""

from __future__ import annotations

import json
from pathlib import Path

CHATML = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
SPECIAL = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
# The special tokens of the built-in templates (llama3, mistral, gemma, phi3), so each is one id as in the real models.
TEMPLATE_SPECIALS = [
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<s>", "</s>",
    "<bos>", "<start_of_turn>", "<end_of_turn>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
]  # fmt: skip
FAMILIES = ("llama", "mistral", "qwen2", "gemma", "phi3")
WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "theta",
    "kappa",
    "lambda",
    "sigma",
    "omega",
    "red",
    "green",
    "blue",
    "cyan",
    "magenta",
    "yellow",
    "black",
    "white",
    "apple",
    "pear",
    "plum",
    "cherry",
    "lemon",
    "lime",
    "mango",
    "melon",
    "river",
    "lake",
    "ocean",
    "hill",
    "valley",
    "forest",
    "desert",
]


def build_tokenizer(out: Path, vocab_size: int = 512, base: bool = False) -> Path:
    """A byte-level BPE tokenizer with a ChatML template; eos is <|im_end|>, pad is <|pad|>.

    base: a base model's tokenizer instead, without ChatML's tokens or any template (eos </s>, pad <|pad|>),
    the case data.add_special_tokens is for."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 4
    corpus += ['Reverse the words: user assistant system You are a helpful assistant. 0123456789 {}[]":,'] * 4
    specials = ["<|pad|>", "</s>"] if base else SPECIAL + TEMPLATE_SPECIALS
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="</s>" if base else "<|im_end|>", bos_token=None,
        unk_token=None, additional_special_tokens=[] if base else TEMPLATE_SPECIALS,
    )  # fmt: skip
    fast.chat_template = None if base else CHATML
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return out


def model_config(family: str, vocab_size: int, pad_id: int, eos_id: int):
    """A 2-layer config of the family, hidden 64, everything a multiple of 64."""
    import transformers

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=None,
        tie_word_embeddings=family == "gemma",
    )
    if family == "llama":
        return transformers.LlamaConfig(**common, head_dim=64)
    if family == "mistral":
        return transformers.MistralConfig(**common, head_dim=64, sliding_window=None)
    if family == "qwen2":
        return transformers.Qwen2Config(**common)
    if family == "gemma":
        return transformers.GemmaConfig(**common, head_dim=64)
    if family == "phi3":
        return transformers.Phi3Config(**common)
    raise ValueError(family)


def build_model(family: str, out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A randomly initialised model of `family` saved with the tokenizer beside it (a loadable model dir)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = model_config(family, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def reverse_rows(n: int, seed: int = 0) -> list[dict]:
    """A learnable task: reverse three words."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(WORDS, 3)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": "Reverse: " + " ".join(words)},
                    {"role": "assistant", "content": " ".join(reversed(words))},
                ]
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
