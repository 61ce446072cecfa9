"""The compatibility report's vLLM rules, on adapters PEFT itself saved (their real config and tensor names)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest


def saved_adapter(tmp_path, model_dir, init="kaiming", **fields):
    """A PEFT adapter saved from the tiny model, opened as finetune.runs.Run exposes it (config, tensor shapes), from
    a run whose recipe's lora.init is `init`."""
    from peft import LoraConfig, get_peft_model
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from finetune.recipe.schema import LoraInitSection

    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", **fields)
    get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config).save_pretrained(tmp_path / "a")
    with safe_open(tmp_path / "a" / "adapter_model.safetensors", "pt") as f:
        tensors = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    recipe = SimpleNamespace(name="r", model=SimpleNamespace(base=str(model_dir), revision=None),
                             quantization=SimpleNamespace(method="nf4" if init == "loftq" else "none"),
                             lora=SimpleNamespace(init=LoraInitSection(method=init)))  # fmt: skip
    adapter_config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    return SimpleNamespace(adapter_config=adapter_config, tensors=tensors, variant="lora", recipe=recipe, manifest={})


@pytest.mark.parametrize(
    ("fields", "works", "says"),
    [
        ({"rank_pattern": {"v_proj": 32}, "layers_to_transform": [1]}, None,
         "layers_to_transform, rank_pattern: vLLM 0.32 reads rank_pattern and alpha_pattern"),
        ({"trainable_token_indices": {"embed_tokens": [3, 4]}}, False,
         "trained token rows of embed_tokens (trainable_token_indices) are not served by vLLM 0.32"),
    ],
)  # fmt: skip
def test_vllm_verdict_on_per_layer_ranks_and_trained_token_rows(fields, works, says, tiny_model_dir, tmp_path):
    from finetune.runtimes import adapter_facts, adapter_vllm

    run = saved_adapter(tmp_path, tiny_model_dir("llama"), **fields)
    verdict = adapter_vllm(adapter_facts(run), run)
    assert verdict["works"] is works
    assert any(r.startswith(says) for r in verdict["reasons"]), verdict["reasons"]
    if works is None:  # the rank vLLM must allocate is the pattern's, not r
        assert verdict["max_lora_rank"] == 32


def test_a_loftq_adapter_is_not_offered_to_vllm_on_the_original_base(tiny_model_dir, tmp_path):
    """Its saved config is a plain LoRA (init_lora_weights: true), so only the run's lora.init tells: on vLLM it would
    sit on the original weights, not the NF4 base it was trained on."""
    from finetune.runtimes import adapter_facts, adapter_vllm

    run = saved_adapter(tmp_path, tiny_model_dir("llama"), init="loftq")
    assert run.adapter_config["init_lora_weights"] is True
    verdict = adapter_vllm(adapter_facts(run), run)
    assert verdict["works"] is False
    assert any(r.startswith("a LoftQ adapter is relative to the NF4 base") for r in verdict["reasons"])
    plain = saved_adapter(tmp_path / "plain", tiny_model_dir("llama"))
    assert not any("LoftQ" in r for r in adapter_vllm(adapter_facts(plain), plain)["reasons"])
