"""scripts/gpu_check.py on its CPU path (tiny shapes), so that the GPU check cannot rot between GPU runs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_path_measures_finetune_against_plain_trl_and_states_every_skip(tmp_path):
    gpu_check = _load()
    out = tmp_path / "out"
    assert (
        gpu_check.main(["--cpu", "--out", str(out), "--steps", "2", "--cases", "lora-bf16,liger,deepspeed-zero2"]) == 0
    )
    report = json.loads((out / "gpu-check.json").read_text())
    lora = report["cases"]["lora-bf16"]
    ft, trl = lora["finetune"], lora["trl"]
    assert ft["tokens_per_s"] > 0 and trl["tokens_per_s"] > 0
    assert lora["ratio_tokens_per_s"] == pytest.approx(ft["tokens_per_s"] / trl["tokens_per_s"])
    assert ft["final_loss"] == pytest.approx(trl["final_loss"], rel=0.01)  # same settings, same seed: same training
    assert lora["plan_total_bytes"] > 0
    assert "data.group_by_length=false" in lora["overrides"]
    assert report["cases"]["liger"] == {"skipped": "needs a CUDA GPU"}
    assert report["cases"]["deepspeed-zero2"] == {"skipped": "needs a CUDA GPU"}
    table = (out / "gpu-check.md").read_text()
    assert "| lora-bf16 |" in table and "| liger | skipped: needs a CUDA GPU |" in table
    assert "RSS" in table  # no CUDA: the peak column says what it measured instead


def test_every_case_is_known_and_fast_paths_name_what_they_need():
    gpu_check = _load()
    assert {
        "lora-bf16",
        "qlora-nf4",
        "flash-attention",
        "padding-free",
        "packing",
        "liger",
        "paged-adamw-8bit",
        "deepspeed-zero2",
    } <= set(gpu_check.CASES)
    for name, (_, trl, needs) in gpu_check.CASES.items():
        assert (trl is not None) == (name in ("lora-bf16", "qlora-nf4")), name
        assert name in ("lora-bf16", "qlora-nf4", "defaults") or "cuda" in needs, name
    assert gpu_check.missing(("cuda",)) in (None, "needs a CUDA GPU")
    assert gpu_check.missing(("no_such_package_xyz",)) == "no_such_package_xyz not installed"
