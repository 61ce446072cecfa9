"""Streaming sources end to end through the CLI: a local parquet source streams, trains, is killed (SIGKILL) and
resumes to the bit-identical adapter of an uninterrupted run. Three trainings (~1 min on 2 loaded cores): not in the
main suite (tests/data/test_stream.py holds the fast checks: masks, sample statistics, the stream's own resume).
Run: python -m pytest -p no:cacheprovider scripts/stream_e2e.py
"""

from __future__ import annotations

import json
import random
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "support"))
import tiny
from helpers import finetune, losses, write_recipe
from training import adapter_tensors, start, wait_for_step

STREAMED = """\
data:
  train:
    - {path: data/a.parquet, streaming: true, weight: 0.7}
    - {path: data/b.jsonl, streaming: true, weight: 0.3}
  eval: [{path: data/eval.jsonl}]
  on_bad_row: skip
  max_seq_length: 64
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    return tiny.build_model("llama", root / "model", tiny.build_tokenizer(root / "tokenizer"))


def streaming_recipe(tmp_path: Path, model_dir: Path) -> Path:
    """Two weighted streams (parquet 30 rows, jsonl 10 rows with one broken line), 24 steps of 8 rows: the mix
    runs out and restarts several times; dropout, so that the RNG state matters; a checkpoint every 4 steps."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = write_recipe(tmp_path, model_dir)
    rows = tiny.reverse_rows(48, seed=1)
    pq.write_table(pa.Table.from_pylist(rows[:30]), tmp_path / "data" / "a.parquet")
    lines = [json.dumps(r) for r in rows[30:40]]
    (tmp_path / "data" / "b.jsonl").write_text("\n".join([*lines[:4], "{broken", *lines[4:]]) + "\n")
    tiny.write_jsonl(tmp_path / "data" / "eval.jsonl", rows[40:])
    text = path.read_text()
    text = text.replace("data:\n  train: [{path: data/train.jsonl}]\n  eval: {split_ratio: 0.25}\n  max_seq_length: 64\n",
                        STREAMED)  # fmt: skip
    text = text.replace("max_steps: 8", "max_steps: 24\n  save_every: 4\n  eval_every: 12")
    path.write_text(text.replace("lora: {rank: 8, alpha: 16}", "lora: {rank: 8, alpha: 16, dropout: 0.1}"))
    return path


@pytest.mark.slow
def test_a_killed_streaming_run_resumes_to_the_same_rows_and_weights(model_dir, tmp_path):
    recipe = streaming_recipe(tmp_path, model_dir)
    full = finetune("train", str(recipe), "--set", "output_dir=runs/full", cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    manifest = json.loads((tmp_path / "runs" / "full" / "manifest.json").read_text())
    sample = manifest["data"]["sample"]
    streams = manifest["data"]["sources"][:2]  # then the held-out source
    assert "statistics of a sample" in sample["note"]  # one pass of the mix, which ends with b (first_exhausted)
    assert sample["rows_read"] == sum(s["rows"] + s["skipped"] for s in streams) < 41
    assert streams[1]["rows"] == 10 and streams[1]["skipped_by_reason"] == {"invalid_json": 1}  # b read through
    assert manifest["steps"] == 24 and (tmp_path / "runs" / "full" / "checkpoints" / "checkpoint-24" /
                                        "stream_state.json").is_file()  # fmt: skip

    kill_at = random.Random().randint(5, 21)
    proc = start(recipe, tmp_path, "--set", "output_dir=runs/killed")
    run = tmp_path / "runs" / "killed"
    wait_for_step(run, kill_at, proc, timeout=600)
    proc.send_signal(signal.SIGKILL)
    print(f"killed at step {kill_at}")
    proc.wait()
    resumed = finetune("train", str(recipe), "--set", "output_dir=runs/killed", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed" and 0 < manifest["resumes"][0]["from_step"] <= kill_at
    expected, got = adapter_tensors(tmp_path / "runs" / "full"), adapter_tensors(run)
    assert expected.keys() == got.keys()
    for name in expected:
        assert (expected[name] - got[name]).abs().max() == 0, (kill_at, name)  # bit-identical
    assert losses(run) == losses(tmp_path / "runs" / "full"), kill_at
