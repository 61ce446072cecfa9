"""`finetune train` end to end on tiny models of five families, through the CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tiny

from finetune.loading import load_recipe
from finetune.modeling import resolve_targets

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


def write_recipe(tmp_path: Path, model_dir: Path, extra: str = "") -> Path:
    tiny.write_jsonl(tmp_path / "data" / "train.jsonl", tiny.reverse_rows(48))
    recipe = tmp_path / "recipe.yaml"
    body = f"""\
        name: tiny
        model: {{base: {model_dir}}}
        lora: {{rank: 8, alpha: 16}}
        data:
          train: [{{path: data/train.jsonl}}]
          eval: {{split_ratio: 0.25}}
          max_seq_length: 64
        train:
          max_steps: 8
          lr: 5.0e-3
          batch_size: 8
          warmup_ratio: 0.0
          gradient_checkpointing: false
          logging_every: 1
        eval:
          max_new_tokens: 6
        output_dir: runs/tiny
    """
    recipe.write_text(textwrap.dedent(body) + extra)
    return recipe


def finetune(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "finetune.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def run_files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


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
        ("phi3", ["quantization.method=nf4"]),
        ("mistral", ["lora.variant=dora"]),
        ("qwen2", ["lora.variant=rslora"]),
    ],
    ids=lambda v: "-".join(v) if isinstance(v, list) else v,
)
def test_train_end_to_end(family, overrides, tiny_model_dir, tmp_path):
    sets = [a for o in overrides for a in ("--set", o)]
    result = finetune("train", str(write_recipe(tmp_path, tiny_model_dir(family))), *sets, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
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


def hub_cache_with(model_dir: Path, cache: Path, repo_id: str, commit: str) -> None:
    """Lay a model out as huggingface_hub's cache does: content-addressed blobs, a snapshot of links, refs/main."""
    import hashlib

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / commit).mkdir(parents=True)
    for f in model_dir.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        (repo / "blobs" / digest).write_bytes(f.read_bytes())
        (repo / "snapshots" / commit / f.name).symlink_to(Path("..") / ".." / "blobs" / digest)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


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
