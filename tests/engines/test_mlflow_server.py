"""MLflow for real: a run logged to an `mlflow server` (SQLite store) carries our held-out results, no secret."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import write_recipe
from services import start_mlflow

pytestmark = pytest.mark.engines

ENV_TOKEN = "hf_" + "e" * 34
RECIPE_TOKEN = "hf_" + "r" * 34
WANDB_KEY = "0123456789abcdef" * 2
SECRETS = (ENV_TOKEN, RECIPE_TOKEN, WANDB_KEY)


def test_a_run_on_an_mlflow_server_carries_our_held_out_figures_recipe_manifest_and_lineage(tiny_model_dir, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model_dir())
    recipe.write_text(recipe.read_text().replace("name: tiny", f"name: tiny\n# token {RECIPE_TOKEN}"))
    (tmp_path / "data" / "train.jsonl").rename(tmp_path / "data" / f"{RECIPE_TOKEN}.jsonl")
    recipe.write_text(recipe.read_text().replace("data/train.jsonl", f"data/{RECIPE_TOKEN}.jsonl"))
    store = tmp_path / "mlflow-server"
    with start_mlflow(store) as url:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": url, "HF_TOKEN": ENV_TOKEN,
               "WANDB_API_KEY": WANDB_KEY, "MLFLOW_EXPERIMENT_NAME": "finetune-engines"}  # fmt: skip
        env.pop("TENSORBOARD_LOGGING_DIR", None)
        result = subprocess.run(
            [sys.executable, "-m", "finetune.cli", "train", str(recipe), "--set", "train.report_to=[mlflow]"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        assert "could not log" not in result.stderr, result.stderr[-3000:]
        run = tmp_path / "runs" / "tiny"
        assert not (run / "mlruns").exists()  # the user's server, not the run directory's file store

        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=url)
        experiment = client.get_experiment_by_name("finetune-engines")
        [mlrun] = client.search_runs([experiment.experiment_id])
        run_id = mlrun.info.run_id
        manifest = json.loads((run / "manifest.json").read_text())
        held_out = manifest["eval"]
        # the trainer's curve and arguments, as before
        assert len(client.get_metric_history(run_id, "loss")) == 8
        assert mlrun.data.params["learning_rate"] == "0.005"
        # our figures: tuned, base and the difference, per metric, at the run's last step
        metrics = mlrun.data.metrics
        for metric in ("loss", "perplexity"):
            assert metrics[f"heldout/tuned/{metric}"] == pytest.approx(held_out["tuned"][metric])
            assert metrics[f"heldout/base/{metric}"] == pytest.approx(held_out["base"][metric])
            delta = held_out["tuned"][metric] - held_out["base"][metric]
            assert metrics[f"heldout/delta_base/{metric}"] == pytest.approx(delta)
        exact = held_out["tuned"]["metrics"]["exact_match"]
        assert metrics["heldout/tuned/exact_match"] == pytest.approx(exact)
        assert metrics["heldout/delta_base/exact_match"] == pytest.approx(held_out["vs_base"]["exact_match"]["delta"])
        [point] = client.get_metric_history(run_id, "heldout/tuned/loss")
        assert point.step == manifest["steps"] == 8
        # the lineage as tags, the resolved recipe and the manifest as artifacts, byte for byte
        tags = mlrun.data.tags
        assert tags["finetune.recipe_sha256"] == manifest["recipe_sha256"]
        assert tags["finetune.base_model"] == str(tiny_model_dir())
        assert json.loads(tags["finetune.base_weights_sha256"]) == manifest["base_model"]["weights_sha256"]
        assert tags["finetune.lineage"] == f"{tiny_model_dir()} -> tiny"
        assert tags["finetune.status"] == "completed"
        downloaded = tmp_path / "downloaded"
        downloaded.mkdir()
        client.download_artifacts(run_id, "finetune", str(downloaded))
        for name in ("recipe.yaml", "manifest.json"):
            assert (downloaded / "finetune" / name).read_bytes() == (run / name).read_bytes()
        # no planted secret in anything the server was given: its API, its SQLite store, its artifacts
        served = json.dumps([mlrun.data.params, mlrun.data.tags, mlrun.data.metrics, mlrun.info.run_name])
        for secret in SECRETS:
            assert secret not in served
    stored = [p for p in store.rglob("*") if p.is_file() and p.name != "server.log"]
    assert store / "mlflow.db" in stored and any("artifacts" in p.parts for p in stored)
    for path in stored:
        content = path.read_bytes()
        for secret in SECRETS:
            assert secret.encode() not in content, path
    for stream in (result.stdout, result.stderr):
        assert ENV_TOKEN not in stream and WANDB_KEY not in stream
