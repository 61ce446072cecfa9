"""`finetune reproduce`: the manifest's inputs checked against what is here, a run retrained and compared."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import finetune, losses, write_recipe
from preference_runs import dpo, parent  # noqa: F401  (a DPO run continuing an SFT run: fixtures)

from finetune.reproduce import check, reproduce

FAST = ["--set", "train.max_steps=4", "--set", "eval.compare_base=false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished 4-step run of the tiny recipe, trained by the CLI as a user would."""
    root = tmp_path_factory.mktemp("reproduce")
    write_recipe(root, tiny_model_dir("llama"))
    done = finetune("train", "recipe.yaml", *FAST, "--json", cwd=root)
    assert done.returncode == 0, done.stderr
    return root


def _copy(root: Path, name: str) -> Path:
    copy = root / "runs" / name
    shutil.copytree(root / "runs" / "tiny", copy)
    return copy


def test_check_of_a_fresh_run_matches_every_input(trained):
    checked = check(trained / "runs" / "tiny")
    assert checked.matches, [(i.name, i.recorded, i.now) for i in checked.differing]
    names = {i.name for i in checked.inputs}
    assert {"recipe (run's recipe.yaml)", "base model weights (sha256)", "tokenizer (sha256)", "package torch",
            "package peft", "hardware cpu_count", "hardware omp_num_threads"} <= names  # fmt: skip
    assert f"data {trained / 'data' / 'train.jsonl'}" in names
    done = finetune("reproduce", "runs/tiny", "--check", cwd=trained)
    assert done.returncode == 0, done.stderr
    assert "DIFF" not in done.stdout and "same  package torch" in done.stdout


def test_check_names_exactly_the_edited_data_file(trained):
    data = trained / "data" / "train.jsonl"
    original = data.read_bytes()
    try:
        data.write_bytes(original + original.splitlines(keepends=True)[0])  # one row more
        checked = check(trained / "runs" / "tiny")
        assert [i.name for i in checked.differing] == [f"data {data}"]
        (differing,) = checked.differing
        assert differing.recorded["rows"] == 48 and differing.now["rows"] == 49
        assert differing.recorded["sha256"] != differing.now["sha256"]
    finally:
        data.write_bytes(original)


def test_check_names_exactly_the_changed_package_version(trained):
    copy = _copy(trained, "tiny-old-peft")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["packages"]["peft"] = "0.0.1"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    done = finetune("reproduce", str(copy), "--check", "--json", cwd=trained)
    assert done.returncode == 1
    rows = json.loads(done.stdout)["inputs"]
    assert [(r["name"], r["recorded"]) for r in rows if not r["matches"]] == [("package peft", "0.0.1")]
    assert done.stderr.strip() == "differs: package peft"


def test_reproduce_gives_the_identical_adapter(trained):
    done = finetune("reproduce", "runs/tiny", "--out", "runs/again", "--json", cwd=trained)
    assert done.returncode == 0, done.stderr
    report = json.loads((trained / "runs" / "again" / "reproduction.json").read_text())
    assert report["identical"] and report["ok"] and report["max_abs_diff"] == 0.0
    assert report["tensors"] and all(t["identical"] for t in report["tensors"])
    assert report["steps_compared"] == 4 and report["first_divergence"] is None
    assert all(h["original"] == h["reproduced"] for h in report["held_out"]) and report["held_out"]
    manifest = json.loads((trained / "runs" / "again" / "manifest.json").read_text())
    assert manifest["reproduces"]["run"] == str((trained / "runs" / "tiny").resolve())
    assert losses(trained / "runs" / "again") == losses(trained / "runs" / "tiny")


def test_reproduce_with_another_seed_names_the_first_diverging_step(trained):
    copy = _copy(trained, "tiny-seed")
    recipe = copy / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace("seed: 42", "seed: 7"))
    done = finetune("reproduce", str(copy), "--out", "runs/seed-again", cwd=trained)
    assert done.returncode == 1, done.stderr
    original, again = losses(copy), losses(trained / "runs" / "seed-again")
    step = next(i + 1 for i, (a, b) in enumerate(zip(original, again, strict=True)) if a != b)
    assert f"not reproduced: first divergence at step {step} (tolerance 0)" in done.stderr
    assert "inputs that differ: recipe (run's recipe.yaml)" in done.stderr  # the edited seed changed its hash
    report = json.loads((trained / "runs" / "seed-again" / "reproduction.json").read_text())
    assert not report["identical"] and report["first_divergence"]["step"] == step


def test_an_auto_dtype_is_pinned_to_the_recorded_one(trained, tiny_model_dir):
    """A run recorded as computing in bfloat16 (`dtype: auto` on a bf16 GPU) is reproduced in bfloat16 here, where
    auto means float32; the dtype is the one input that differs, and the failure names it."""
    copy = _copy(trained, "tiny-bf16")
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["dtype"] == {"model": "float32"}  # recorded by train: auto on this CPU
    manifest["dtype"] = {"model": "bfloat16"}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert [i.name for i in check(copy).differing] == ["dtype (model, 4-bit compute)"]
    out = trained / "runs" / "bf16-again"
    result = reproduce(copy, out)
    assert result.pinned == ["model.dtype=bfloat16"]
    assert json.loads((out / "manifest.json").read_text())["dtype"] == {"model": "bfloat16"}
    assert "dtype: bfloat16" in (out / "recipe.yaml").read_text()
    assert not result.identical and [i.name for i in result.check.differing] == ["dtype (model, 4-bit compute)"]
    assert json.loads((out / "reproduction.json").read_text())["pinned"] == ["model.dtype=bfloat16"]


def test_with_parents_rebuilds_the_sft_parent_and_the_dpo_run_reproduces(dpo, monkeypatch):  # noqa: F811
    """A DPO run continued from an SFT run: the parent retrained first, the DPO run retrained on that copy; both
    bit-identical (the parent's logged losses and the DPO run's 8 too)."""
    run, _, root = dpo
    monkeypatch.chdir(root)
    out = root / "runs" / "dpo-again"
    result = reproduce(run, out, with_parents=True)
    (sft,) = result.parents
    assert sft.identical and sft.out == str(root / "runs" / "dpo-again-parent")
    assert sft.steps_compared == len(losses(Path(sft.run))) > 0 and sft.first_divergence is None
    assert result.identical and result.ok and result.check.matches
    assert result.steps_compared == 8 and result.first_divergence is None
    assert result.held_out and all(h.original == h.reproduced for h in result.held_out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parent"]["path"] == str((root / "runs" / "dpo-again-parent").resolve())  # trained on the copy
    assert manifest["reproduces"]["run"] == str(run.resolve())
    report = json.loads((out / "reproduction.json").read_text())
    assert report["parents"][0]["identical"] and report["identical"]
