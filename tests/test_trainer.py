"""The shared trainer: LoRA+ (`train.loraplus_lr_ratio`) through PEFT's optimizer helper, exact on resume; the
per-layer structure as trained, in the manifest, and merged (a killed LoRA+ run resuming exactly: minutes,
scripts/lora_options_e2e.py)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import finetune, write_recipe

LORAPLUS = "  loraplus_lr_ratio: 16\n  scheduler: constant\n  save_every: 4\n"


def loraplus_recipe(tmp_path, model_dir, steps: int = 8):
    path = write_recipe(tmp_path, model_dir)
    text = path.read_text().replace("max_steps: 8", f"max_steps: {steps}")
    path.write_text(text.replace("train:\n", "train:\n" + LORAPLUS))
    return path


def test_loraplus_trains_the_b_matrices_at_ratio_times_lr_and_the_manifest_says_so(tiny_model_dir, tmp_path):
    recipe = loraplus_recipe(tmp_path, tiny_model_dir(), steps=4)
    done = finetune("train", str(recipe), "--set", "lora.rank_pattern={v_proj: 2}", "--set", "lora.layers=[1]",
                    cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    run = tmp_path / "runs" / "tiny"
    state = torch.load(run / "checkpoints" / "checkpoint-4" / "optimizer.pt", weights_only=False)
    groups = state["param_groups"]
    # PEFT's groups: A at lr, LoRA embeddings (none here), B with and without decay at lr x 16
    assert [g["lr"] for g in groups] == pytest.approx([5e-3, 1e-6, 8e-2, 8e-2])
    assert len(groups[0]["params"]) == len(groups[2]["params"]) + len(groups[3]["params"]) > 0
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["lora"]["ranks"] == [
        "rank 8, alpha 16: q_proj, k_proj, o_proj, gate_proj, up_proj, down_proj (block 1)",
        "rank 2, alpha 16: v_proj (block 1)",
    ]  # PEFT's layers as trained: rank_pattern and lora.layers reached them
    assert manifest["optimizer"] == {"name": "adamw_torch_fused", "lr": 5e-3, "loraplus_lr_ratio": 16, "lr_b": 8e-2}
    from finetune.merge import merge

    merged = merge(run)  # per-layer ranks and blocks merge like any adapter: verified by logits
    assert merged.check["passed"] and merged.check["max_abs_diff"] <= 1e-4, merged.check
    from finetune.export import export

    card = (tmp_path / "export" / "README.md").read_text() if export(run, "adapter", tmp_path / "export") else ""
    assert "| learning rate | 0.005, constant, warmup 0; LoRA+: B matrices at 16 x (0.08) |" in card
    assert f"| adapter layout | {'; '.join(manifest['lora']['ranks'])} |" in card
    assert "vLLM 0.32 reads rank_pattern and alpha_pattern" in card  # the compatibility section
