"""Trackers for real, offline: tensorboard event files and an mlflow file store inside the run."""

from __future__ import annotations

import pytest
from helpers import finetune, write_recipe


@pytest.mark.slow
def test_tensorboard_and_mlflow_log_the_training_curve(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    recipe = write_recipe(tmp_path, tiny_model_dir())
    result = finetune("train", str(recipe), "--set", "train.report_to=[tensorboard, mlflow]", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    run = tmp_path / "runs" / "tiny"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert len(events.Scalars("train/loss")) == 8
    assert len(events.Scalars("eval/loss")) == 1

    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # reading the store the run wrote

    client = MlflowClient(tracking_uri=(run / "mlruns").as_uri())
    [experiment] = [e for e in client.search_experiments() if e.name == "tiny"]
    [mlrun] = client.search_runs([experiment.experiment_id])
    assert len(client.get_metric_history(mlrun.info.run_id, "loss")) == 8
    assert mlrun.data.params["learning_rate"] == "0.005"
    # our own results beside the trainer's: the held-out figures, recipe and manifest, lineage tags
    import json

    manifest = json.loads((run / "manifest.json").read_text())
    tuned_loss = manifest["eval"]["tuned"]["loss"]
    [held_out] = events.Scalars("heldout/tuned/loss")
    assert held_out.step == manifest["steps"] and held_out.value == pytest.approx(tuned_loss, rel=1e-6)
    assert "heldout/delta_base/loss" in events.Tags()["scalars"]
    metrics = mlrun.data.metrics
    assert metrics["heldout/tuned/loss"] == pytest.approx(tuned_loss)
    base_loss = manifest["eval"]["base"]["loss"]
    assert metrics["heldout/delta_base/loss"] == pytest.approx(tuned_loss - base_loss)
    assert metrics["heldout/tuned/exact_match"] == manifest["eval"]["tuned"]["metrics"]["exact_match"]
    assert mlrun.data.tags["finetune.recipe_sha256"] == manifest["recipe_sha256"]
    assert mlrun.data.tags["finetune.lineage"].endswith("-> tiny")
    artifacts = {a.path for a in client.list_artifacts(mlrun.info.run_id, "finetune")}
    assert artifacts == {"finetune/recipe.yaml", "finetune/manifest.json"}


def test_held_out_figures_name_tuned_base_parent_and_their_deltas_and_drop_what_is_not_finite():
    from finetune.summary import EvalSummary, Preference, Scores
    from finetune.tracking import heldout_figures

    tuned = Scores(loss=1.0, perplexity=2.7, metrics={"exact_match": 0.5, "mine:score": float("nan")})
    base = Scores(loss=1.5, perplexity=4.5, metrics={"exact_match": 0.25, "mine:score": 0.1})
    parent = Scores(loss=1.2, metrics={"exact_match": 0.4})
    summary = EvalSummary(tuned, base, 16, preference=Preference("dpo", 0.1, 16, parent))
    figures = heldout_figures(summary)
    assert figures["heldout/tuned/loss"] == 1.0 and figures["heldout/base/exact_match"] == 0.25
    assert figures["heldout/parent/exact_match"] == 0.4 and "heldout/parent/perplexity" not in figures
    assert figures["heldout/delta_base/loss"] == -0.5
    assert figures["heldout/delta_parent/exact_match"] == pytest.approx(0.1)
    assert figures["heldout/base/mine:score"] == 0.1 and "heldout/tuned/mine:score" not in figures  # NaN dropped
    assert "heldout/delta_base/mine:score" not in figures
    from_base = EvalSummary(tuned, base, 16, preference=Preference("dpo", 0.1, 16, base, reference_is_base=True))
    assert not any("parent" in k for k in heldout_figures(from_base))  # the reference is the base, not a parent
    assert heldout_figures(None) == {}
