"""GGUF export's own logic without llama.cpp: pre-tokenizer derivation, template family, Modelfile, --quant.

The conversion and its verification run with the real llama.cpp in tests/engines/test_gguf.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.errors import UserError
from finetune.gguf import OLLAMA_TEMPLATES, judge, modelfile, pre_tokenizer, template_family

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART_MODEL = ROOT / "assets" / "quickstart" / "model"


def test_the_quickstarts_byte_level_bpe_is_gpt2():
    name, why = pre_tokenizer(json.loads((QUICKSTART_MODEL / "tokenizer.json").read_text()))
    assert name == "gpt-2" and "GPT-2" in why


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"model": {"type": "Unigram"}}, "not BPE"),
        ({"normalizer": {"type": "NFC"}}, "normalizer"),
        ({"pre_tokenizer": {"type": "Metaspace"}}, "Metaspace"),
        ({"pre_tokenizer": {"type": "ByteLevel", "use_regex": False}}, "use_regex"),
        ({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True, "use_regex": True}}, "add_prefix_space"),
    ],
)
def test_other_vocabularies_are_refused_with_the_reason(change, reason):
    tokenizer = {"model": {"type": "BPE"}, "normalizer": None, "pre_tokenizer": {"type": "ByteLevel"}, **change}
    name, why = pre_tokenizer(tokenizer)
    assert name is None and reason in why


@pytest.mark.parametrize("family", ["chatml", "llama3", "mistral", "qwen2.5", "gemma", "phi3"])
def test_a_shipped_template_is_recognised_by_what_it_renders(family):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(QUICKSTART_MODEL)
    tokenizer.chat_template = (ROOT / "finetune" / "templates" / f"{family}.jinja").read_text()
    assert template_family(tokenizer) == family


def test_the_quickstarts_own_template_is_chatml_and_a_custom_one_is_none():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(QUICKSTART_MODEL)
    assert template_family(tokenizer) == "chatml"  # its own file, written differently, renders the same
    tokenizer.chat_template = "{% for m in messages %}### {{ m['content'] }}\n{% endfor %}"
    assert template_family(tokenizer) is None


def test_the_modelfile_has_from_adapter_template_and_one_stop_per_token():
    text, notes = modelfile("base-q8_0.gguf", "chatml", ["<|im_end|>", "<|endoftext|>"], "adapter-f32.gguf")
    lines = text.splitlines()
    assert lines[:2] == ["FROM ./base-q8_0.gguf", "ADAPTER ./adapter-f32.gguf"]
    assert f'TEMPLATE """{OLLAMA_TEMPLATES["chatml"]}"""' in text
    assert lines[-2:] == ['PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|endoftext|>"']
    assert notes == []


def test_a_custom_template_is_said_plainly_not_guessed():
    text, notes = modelfile("model-f16.gguf", None, ["</s>"])
    assert "TEMPLATE" not in text and "cannot be turned into Ollama's Go template" in notes[0]
    assert modelfile("m.gguf", "llama3", [])[1] == ["llama3: " + "message content is not trimmed (the jinja "
                                                   "template trims it); same for content without outer spaces"]  # fmt: skip


def _check(agreed: int, prompts: int = 10, tokens: bool = True) -> dict:
    return {"agreed": agreed, "prompts": prompts, "agreement": agreed / prompts, "token_ids_equal": tokens,
            "token_mismatch_prompts": [] if tokens else [3], "max_logit_diff_vs_f32": 0.02,
            "argmax_agreement_vs_f32": 0.99}  # fmt: skip


def test_unquantized_files_must_agree_on_every_prompt_and_quantized_on_their_share():
    assert judge("f16", _check(10))[0] and not judge("f16", _check(9))[0]
    assert judge("q8_0", _check(9))[0] and not judge("q8_0", _check(8))[0]
    assert not judge("f16", _check(9), "base")[0]  # the base alone, unquantized, must still answer exactly
    ok, why = judge("q4_k_m", _check(3), "base")  # quantized: its never-stopping answers are reported, not judged
    assert ok and "3/10" in why and "not judged" in why
    ok, why = judge("q8_0", _check(10, tokens=False))
    assert not ok and "tokenizes prompts [3]" in why


def test_quant_is_checked_before_anything_loads(tmp_path):
    from finetune.export import export

    with pytest.raises(UserError, match="q3_k"):
        export(tmp_path, "gguf", quants=["q3_k"])
    with pytest.raises(UserError, match="only applies to --format gguf"):
        export(tmp_path, "adapter", quants=["q8_0"])
