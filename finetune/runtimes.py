"""What runtimes accept of a LoRA adapter: its facts, read from adapter_config.json and its tensors, and vLLM's
rules for serving it. Shared by `export`'s compatibility report and `serve --engine vllm`, so that the two
never disagree and neither stage imports the other.

A verdict's `works` is True only after a check that ran on the export, False where the adapter's files hold
something the runtime refuses (the reasons say what), None (not checked: the summary says why).
"""

from __future__ import annotations

from typing import Any

from finetune.runs import Run

# vLLM accepts only these values for --max-lora-rank (its LoRAConfig); its default is 16.
VLLM_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
VLLM_SAVABLE_MODULES = ("classifier", "score")  # the only modules_to_save vLLM serves (classification heads)
VLLM_UNSERVED_INITS = ("pissa", "olora", "corda", "loftq")  # inits that rewrite the base weights at load time
EMBEDDING_MODULES = ("embed_tokens", "lm_head", "wte", "embed_out")


def verdict(
    works: bool | None, summary: str, reasons: list[str], command: str | None = None, checked: str | None = None,
    **extra: Any,
) -> dict:  # fmt: skip
    """works: True (a check was run on the export and passed: `checked` says which), False (the adapter's files
    hold something the runtime refuses: the reasons say what), None (not checked: `summary` says why)."""
    if works is True and not checked:
        raise ValueError(f"a 'works' verdict needs the check that was run ({summary})")
    reasons = [f"checked: {checked}", *reasons] if checked else reasons
    return {"works": works, "summary": summary, "reasons": reasons, "command": command, "checked": checked, **extra}


def adapter_facts(run: Run) -> dict[str, Any]:
    """What the runtimes care about, read from adapter_config.json and the adapter's tensor names."""
    config = run.adapter_config
    names = list(run.tensors)
    # the rank a server must allocate is that of the tensors themselves (rank_pattern included)
    ranks = [shape[0] for n, shape in run.tensors.items() if (".lora_A." in n or ".lora_embedding_A" in n) and shape]
    targets = config.get("target_modules")
    return {
        "peft_type": config.get("peft_type"),
        "rank": int(config.get("r", 0)),
        "max_rank": max(ranks, default=int(config.get("r", 0))),
        "alpha": config.get("lora_alpha"),
        "variant": run.variant,
        "target_modules": targets if isinstance(targets, str) else sorted(targets or []),
        "modules_to_save": sorted(config.get("modules_to_save") or []),
        "bias": config.get("bias", "none"),
        "lora_bias": bool(config.get("lora_bias")),
        "init_lora_weights": config.get("init_lora_weights", True),
        "tensors": len(names),
        "magnitude_vectors": sum("lora_magnitude_vector" in n for n in names),
        "full_tensors": sorted(n for n in names if ".lora_" not in n),
        "embedding_lora": sorted(
            {m for n in names for m in EMBEDDING_MODULES if f".{m}.lora_" in n or (".lora_embedding_" in n and m in n)}
        ),
        # new token rows trained by PEFT's trainable_token_indices: `<module>.token_adapter.trainable_tokens_delta`
        "trainable_tokens": sorted({n.split(".token_adapter.")[0].rsplit(".", 1)[-1] for n in names if _rows(n)}),
        # tokens the run added (data.add_special_tokens): what the manifest recorded, None for a run without
        "new_tokens": run.manifest.get("new_tokens"),
        "per_layer": sorted(k for k in ("rank_pattern", "alpha_pattern", "layers_to_transform") if config.get(k)),
        "base_model": run.recipe.model.base,
        "base_revision": run.recipe.model.revision,
        "quantization_in_training": run.recipe.quantization.method,
        "on_quantized_base": run.recipe.lora.init.on_quantized_base,
    }


def _rows(tensor: str) -> bool:
    return ".token_adapter." in tensor


def adapter_vllm(facts: dict, run: Run) -> dict:
    """Whether vLLM's LoRA serving takes this adapter, the --max-lora-rank it needs, and the command."""
    blockers = []
    if facts["variant"] == "dora" or facts["magnitude_vectors"]:
        blockers.append(
            "DoRA is not served by vLLM (its LoRA kernels have no magnitude vectors); export --format merged"
        )
    unsaved = [m for m in facts["modules_to_save"] if m not in VLLM_SAVABLE_MODULES]
    if unsaved:
        blockers.append(
            f"modules_to_save ({', '.join(unsaved)}) is not served by vLLM, which swaps only low-rank matrices per "
            "request (whole modules only for classification heads); export --format merged"
        )
    if facts["embedding_lora"]:
        blockers.append(
            f"LoRA on {', '.join(facts['embedding_lora'])} is not served by current vLLM releases; export --format merged"
        )
    if facts.get("trainable_tokens"):
        blockers.append(
            f"trained token rows of {', '.join(facts['trainable_tokens'])} (trainable_token_indices) are not served by "
            "vLLM 0.32, whose LoRA loader knows only lora_A/lora_B tensors (read in its source, not run); "
            "export --format merged"
        )
    if (new := facts.get("new_tokens")) and new.get("resized"):
        blockers.append(
            f"the run added {len(new['ids'])} tokens ({', '.join(new['tokens'])}) beyond the base's vocabulary, and "
            "vLLM 0.32 serves a LoRA on the base's own embeddings, with no extra-vocabulary rows (read in its source, "
            "not run); export --format merged, whose vocabulary holds them, and serve that"
        )
    if facts["bias"] != "none" or facts["lora_bias"]:
        blockers.append("adapter biases (bias/lora_bias) are not served by vLLM")
    if facts["on_quantized_base"]:
        blockers.append(
            "a LoftQ adapter is relative to the NF4 base, and vLLM applies it to the original weights (on llama.cpp "
            "that form gave 77/100 of eval's answers, measured); export --format merged (built on the NF4 weights "
            "dequantized) and serve that"
        )
    init = facts["init_lora_weights"]
    if isinstance(init, str) and init.lower().startswith(VLLM_UNSERVED_INITS):
        blockers.append(f"init_lora_weights={init!r} changes the base weights when PEFT loads it; vLLM does not")
    if facts["max_rank"] > VLLM_MAX_LORA_RANKS[-1]:
        blockers.append(f"rank {facts['max_rank']} is above vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]})")
    if isinstance(facts["target_modules"], str):
        blockers.append(
            f"target_modules is a regular expression ({facts['target_modules']!r}); vLLM needs module names"
        )
    if blockers:
        return verdict(False, "not served by vLLM LoRA serving", blockers, max_lora_rank=None)
    needed = next(r for r in VLLM_MAX_LORA_RANKS if r >= facts["max_rank"])
    summary = f"vLLM was not run; nothing in the adapter's files rules it out (--enable-lora --max-lora-rank {needed})"
    reasons = []
    if needed != facts["max_rank"]:
        reasons.append(
            f"rank {facts['max_rank']} is not one of vLLM's sizes ({', '.join(map(str, VLLM_MAX_LORA_RANKS))}): "
            f"it needs --max-lora-rank {needed}"
        )
    if needed > VLLM_DEFAULT_MAX_LORA_RANK:
        reasons.append(f"vLLM's default --max-lora-rank is {VLLM_DEFAULT_MAX_LORA_RANK}: pass {needed} explicitly")
    if facts.get("per_layer"):
        reasons.append(
            f"{', '.join(facts['per_layer'])}: vLLM 0.32 reads rank_pattern and alpha_pattern from adapter_config.json "
            "with PEFT's matching rule, and loads only the layers the adapter has (read in its source, not run)"
        )
    if facts["variant"] == "rslora":
        reasons.append("rsLoRA scaling (alpha/sqrt(rank)) is applied by vLLM from adapter_config.json")
    if facts["quantization_in_training"] != "none":
        reasons.append(
            "vLLM applies the adapter to the base it serves (16-bit or its own quantization), not to the "
            f"{facts['quantization_in_training']} base it was trained on"
        )
    command = (
        f"vllm serve {facts['base_model']} --enable-lora --max-lora-rank {needed} "
        f"--lora-modules {run.recipe.name}=<this directory>"
    )
    return verdict(None, summary, reasons, command, max_lora_rank=needed)
