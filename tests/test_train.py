"""`finetune train` end to end on tiny models of five families, through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import tiny
from helpers import finetune, hub_cache_with, losses, run_files, write_recipe

from finetune.modeling import resolve_targets
from finetune.recipe.load import load_recipe

RUN_FILES = {
    "recipe.yaml",
    "manifest.json",
    "metrics.jsonl",
    "adapter/adapter_config.json",
    "adapter/adapter_model.safetensors",
    "adapter/tokenizer.json",
    "adapter/tokenizer_config.json",
    "adapter/chat_template.jinja",
    "adapter/README.md",
    "eval/summary.json",
    "eval/examples.jsonl",
    "report.html",
}
PRESETS = {
    "llama": (["k_proj", "o_proj", "q_proj", "v_proj"], ["down_proj", "gate_proj", "up_proj"]),
    "mistral": (["k_proj", "o_proj", "q_proj", "v_proj"], ["down_proj", "gate_proj", "up_proj"]),
    "qwen2": (["k_proj", "o_proj", "q_proj", "v_proj"], ["down_proj", "gate_proj", "up_proj"]),
    "gemma": (["k_proj", "o_proj", "q_proj", "v_proj"], ["down_proj", "gate_proj", "up_proj"]),
    "phi3": (["o_proj", "qkv_proj"], ["down_proj", "gate_up_proj"]),
}


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_presets_resolve_to_the_family_modules(family, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(family))
    recipe_path = write_recipe(tmp_path, tiny_model_dir(family))
    attention, mlp = PRESETS[family]
    for preset, expected in (("attention", attention), ("mlp", mlp), ("all-linear", sorted(attention + mlp))):
        assert resolve_targets(load_recipe(recipe_path, [f"lora.targets={preset}"]), model) == expected


def test_a_target_that_matches_nothing_lists_the_models_linear_layers(tiny_model_dir, tmp_path):
    result = finetune(
        "train", str(write_recipe(tmp_path, tiny_model_dir())), "--set", "lora.targets=[q_prj]", cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr
    assert "lora.targets: q_prj match no linear layer" in result.stderr
    assert "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "overrides"),
    [
        ("llama", []),
        ("llama", ["quantization.method=nf4"]),
        ("mistral", []),
        ("qwen2", ["quantization.method=nf4"]),
        ("gemma", []),
        ("phi3", []),
        # QLoRA as on a GPU: embeddings and norms stay bf16 (no fp32 upcast), checkpointing without reentrancy
        ("phi3", ["quantization.method=nf4", "model.dtype=bfloat16", "train.gradient_checkpointing=true"]),
        ("mistral", ["lora.variant=dora"]),
        ("qwen2", ["lora.variant=rslora"]),
    ],
    ids=lambda v: "-".join(v) if isinstance(v, list) else v,
)
def test_train_end_to_end(family, overrides, tiny_model_dir, tmp_path, monkeypatch):
    """Through the CLI in this process (the subprocess path is the quickstart's and the faults' tests)."""
    from typer.testing import CliRunner

    from finetune.cli import app

    monkeypatch.chdir(tmp_path)
    sets = [a for o in overrides for a in ("--set", o)]
    result = CliRunner().invoke(app, ["train", str(write_recipe(tmp_path, tiny_model_dir(family))), *sets])
    assert result.exit_code == 0, (result.output[-3000:], result.exception)
    run = tmp_path / "runs" / "tiny"
    assert run_files(run) == RUN_FILES
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["steps"] == 8
    assert manifest["data"]["train_rows"] == 36 and manifest["data"]["eval_rows"] == 12
    curve = losses(run)
    assert len(curve) == 8 and curve[-1] < curve[0], curve
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    attention, mlp = PRESETS[family]
    assert sorted(config["target_modules"]) == sorted(attention + mlp)
    assert config["use_dora"] == ("lora.variant=dora" in overrides)
    assert config["use_rslora"] == ("lora.variant=rslora" in overrides)
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert summary["tuned"]["loss"] < summary["base"]["loss"]
    assert "held-out" in result.stdout and "adapter:" in result.stdout


def test_existing_run_directory_is_never_overwritten_silently(tiny_model_dir, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model_dir())
    run = tmp_path / "runs" / "tiny"
    run.mkdir(parents=True)
    (run / "precious.txt").write_text("keep me")
    result = finetune("train", str(recipe), cwd=tmp_path)
    assert result.returncode == 2
    assert "already exists; pass --overwrite" in result.stderr
    assert (run / "precious.txt").read_text() == "keep me"


@pytest.mark.slow
def test_overwrite_replaces_and_adapter_reloads_with_the_same_logits(tiny_model_dir, tmp_path):
    """Train in this process, then load base + adapter with plain PEFT in a fresh one: same logits."""
    import torch

    from finetune.train import train

    recipe_path = write_recipe(tmp_path, tiny_model_dir())
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    (tmp_path / "runs" / "tiny" / "stale.txt").write_text("old")
    os.chdir(tmp_path)
    result = train(load_recipe(recipe_path), overwrite=True, progress=False)
    run = tmp_path / "runs" / "tiny"
    assert not (run / "stale.txt").exists()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    result.model.eval()
    with torch.no_grad():
        expected = result.model(input_ids=ids).logits
    script = textwrap.dedent(f"""
        import sys, torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained({str(tiny_model_dir())!r})
        model = PeftModel.from_pretrained(base, {str(run / "adapter")!r}).eval()
        with torch.no_grad():
            torch.save(model(input_ids=torch.tensor({ids.tolist()})).logits, sys.argv[1])
    """)
    out = tmp_path / "logits.pt"
    subprocess.run([sys.executable, "-c", script, str(out)], check=True, timeout=120)
    reloaded = torch.load(out)
    assert torch.allclose(reloaded, expected, atol=1e-5), (reloaded - expected).abs().max()
    with torch.no_grad(), result.model.disable_adapter():
        base = result.model(input_ids=ids).logits
    assert (base - expected).abs().max() > 1e-3, "the trained adapter should change the logits"


@pytest.mark.slow
def test_a_hub_model_trains_offline_from_a_prepopulated_cache(tiny_model_dir, tmp_path):
    import hashlib

    commit = "fedcba9876543210fedcba9876543210fedcba98"
    hub_cache_with(tiny_model_dir(), tmp_path / "hub", "acme/tiny-llama", commit)
    recipe = write_recipe(tmp_path, tiny_model_dir())
    recipe.write_text(recipe.read_text().replace(f"base: {tiny_model_dir()}", "base: acme/tiny-llama"))
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "finetune.cli", "train", str(recipe), "--set", "train.max_steps=2"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    base = json.loads((tmp_path / "runs" / "tiny" / "manifest.json").read_text())["base_model"]
    weights = (tiny_model_dir() / "model.safetensors").read_bytes()
    assert base["id"] == "acme/tiny-llama" and base["commit"] == commit
    assert base["weights_sha256"] == {"model.safetensors": hashlib.sha256(weights).hexdigest()}


def test_train_distributed_needs_a_recipe_loaded_from_a_file(tiny_model_dir, tmp_path):
    """The stage itself launches `train.distributed` (the Python API as the CLI): its processes re-read the file."""
    from finetune.errors import UserError
    from finetune.recipe.schema import Recipe
    from finetune.train import train

    config = tmp_path / "single.yaml"
    config.write_text("distributed_type: 'NO'\nnum_processes: 1\n")
    loaded = load_recipe(write_recipe(tmp_path, tiny_model_dir()), [f"train.distributed={config}"])
    assert loaded.overrides == (f"train.distributed={config}",) and loaded.source is not None
    in_code = Recipe.model_validate(loaded.resolved())
    with pytest.raises(UserError, match=r"train\.distributed: the launched processes re-read the recipe"):
        train(in_code)
