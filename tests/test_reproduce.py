"""`finetune reproduce`: the manifest's inputs checked against what is here, a run retrained and compared."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import finetune, losses, write_recipe

from finetune.reproduce import check

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
