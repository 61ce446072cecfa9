"""Weighted mixing end to end (issue 31): three trainings of a tiny model, so not in the main suite
(tests/data/test_mix.py holds the fast checks of data/mix.py). Run: python -m pytest -p no:cacheprovider scripts/mix_e2e.py

Sources of 100 and 10,000 rows weighted 0.8/0.2: through `prepare_data` the epoch's share of each source is within
sampling error of its weight and the same for the same seed; a weighted run killed with SIGKILL after a checkpoint
resumes (`--resume`) to the losses and adapter of a run never interrupted, so it went on with the same rows.
"""

from __future__ import annotations

import json
import signal
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "support"))
import tiny
from helpers import finetune, losses, write_recipe
from training import adapter_tensors, start, wait_for_step

WEIGHTS = (0.8, 0.2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    return tiny.build_model("llama", root / "model", tiny.build_tokenizer(root / "tokenizer"))


def mixed_recipe(tmp_path: Path, model_dir: Path) -> Path:
    """The helpers' tiny recipe on two weighted sources, 16 steps with dropout and a checkpoint every 4."""
    path = write_recipe(tmp_path, model_dir)
    tiny.write_jsonl(tmp_path / "data" / "small.jsonl", tiny.reverse_rows(100, seed=1))
    tiny.write_jsonl(tmp_path / "data" / "large.jsonl", tiny.reverse_rows(10_000, seed=2))
    sources = f"[{{path: data/small.jsonl, weight: {WEIGHTS[0]}}}, {{path: data/large.jsonl, weight: {WEIGHTS[1]}}}]"
    text = (
        path.read_text()
        .replace("[{path: data/train.jsonl}]", sources)
        .replace("eval: {split_ratio: 0.25}", "eval: null")
    )
    text = text.replace("max_steps: 8", "max_steps: 16\n  save_every: 4")
    path.write_text(text.replace("lora: {rank: 8, alpha: 16}", "lora: {rank: 8, alpha: 16, dropout: 0.1}"))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["first_exhausted", "all_exhausted"])
def test_an_epoch_over_the_mix_has_the_weights_as_shares_the_same_for_a_seed(model_dir, tmp_path, stop, monkeypatch):
    from finetune.data import prepare_data
    from finetune.modeling import load_tokenizer
    from finetune.recipe.load import load_recipe

    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(mixed_recipe(tmp_path, model_dir), [f"data.mix_stop={stop}"])
    tokenizer = load_tokenizer(recipe)
    first = prepare_data(recipe, tokenizer, use_cache=False)
    drawn = Counter("small" in where for where in first.train_where)
    n = sum(drawn.values())
    share = drawn[True] / n
    assert abs(share - WEIGHTS[0]) < 4 * (WEIGHTS[0] * WEIGHTS[1] / n) ** 0.5, (stop, share, n)
    assert first.train_where == prepare_data(recipe, tokenizer, use_cache=False).train_where
    other = load_recipe(mixed_recipe(tmp_path, model_dir), [f"data.mix_stop={stop}", "seed=7"])
    assert prepare_data(other, tokenizer, use_cache=False).train_where != first.train_where


@pytest.mark.slow
def test_a_killed_weighted_run_resumes_to_the_uninterrupted_adapter(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    recipe = mixed_recipe(tmp_path, model_dir)
    full = finetune("train", str(recipe), "--set", "output_dir=runs/full", cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    assert json.loads((tmp_path / "runs" / "full" / "manifest.json").read_text())["data"]["mix"]["sources"]
    proc = start(recipe, tmp_path, "--set", "output_dir=runs/killed")
    run = tmp_path / "runs" / "killed"
    wait_for_step(run, 10, proc, timeout=600)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = finetune("train", str(recipe), "--set", "output_dir=runs/killed", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["resumes"][0]["from_step"] in (4, 8)
    assert losses(run) == losses(tmp_path / "runs" / "full"), "every step trained the same rows"
    expected, got = adapter_tensors(tmp_path / "runs" / "full"), adapter_tensors(run)
    assert expected.keys() == got.keys()
    for name in expected:
        assert bool((expected[name] == got[name]).all()), name
