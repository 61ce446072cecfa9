"""Our results in the user's trackers: the held-out figures, the recipe, the manifest and the lineage.

The trainer's own callbacks (transformers' MLflowCallback and TensorBoardCallback) log the training
curve and its arguments; what they cannot know is what `finetune` measured after training: tuned vs
base (and parent, for a run that continues another) on the held-out data, per metric. `log_results`
adds those to the same places, read back from the finished run directory, so a tracker shows the same
figures as `finetune runs show` and report.html:

- MLflow: metrics `heldout/{tuned,base,parent}/<metric>` and `heldout/delta_{base,parent}/<metric>`
  (tuned minus the other, in the metric's own units), the run directory's `recipe.yaml` and
  `manifest.json` (already secret-free) as artifacts under `finetune/`, and the lineage as `finetune.*`
  tags. They go to the run the trainer's callback opened in this process; a run with no such callback
  (none logged a step) gets a run of its own in the recipe's experiment.
- TensorBoard: the same figures as scalars at the run's last step, and the recipe and lineage as text,
  in the directory the training curve went to.

Every string is passed through `secrets.redact_text` before it leaves the process.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

from finetune.lineage import lineage
from finetune.recipe.schema import Recipe
from finetune.runs import RunDir
from finetune.secrets import redact_text
from finetune.summary import EvalSummary, Scores

ARTIFACT_DIR = "finetune"  # the folder of a run's MLflow artifacts that holds ours
NOT_A_NAME = re.compile(r"[^\w./ :-]")  # MLflow accepts letters, digits, _ - . space : / in a metric name


def log_results(recipe: Recipe, run: RunDir) -> None:
    """Send a finished run's held-out figures, recipe, manifest and lineage to the trackers in `report_to`.

    A tracker that fails (a server gone away) warns instead of failing the run: the run is complete
    on disk, and `finetune runs show` still has every figure.
    """
    trackers = [(name, log) for name, log in TRACKERS.items() if name in recipe.train.report_to]
    if not trackers:
        return
    manifest = json.loads(run.manifest.read_text(encoding="utf-8"))  # written by this process a moment ago
    figures = heldout_figures(EvalSummary.from_dict(manifest.get("eval")))
    for name, log in trackers:
        try:
            log(recipe, run, manifest, figures)
        except Exception as e:
            warnings.warn(f"could not log the held-out results to {name}: {redact_text(str(e))}", stacklevel=2)


def heldout_figures(summary: EvalSummary | None) -> dict[str, float]:
    """`heldout/tuned/exact_match`, `heldout/delta_base/loss`, ...: every held-out figure, flat and finite."""
    if summary is None:
        return {}
    parent = summary.preference.reference if summary.preference and not summary.preference.reference_is_base else None
    out: dict[str, float] = {}
    for name, scores in (("tuned", summary.tuned), ("base", summary.base), ("parent", parent)):
        out |= {f"heldout/{name}/{metric}": value for metric, value in _values(scores).items()}
    for name, other in (("base", summary.base), ("parent", parent)):
        theirs = _values(other)
        out |= {f"heldout/delta_{name}/{m}": v - theirs[m] for m, v in _values(summary.tuned).items() if m in theirs}
    return {_metric_name(k): float(v) for k, v in out.items() if math.isfinite(v)}


def lineage_tags(manifest: dict[str, Any], run: RunDir) -> dict[str, str]:
    """What the run continues and what it was trained from, as `finetune.*` tags (a value that is not a string,
    such as the weight files' hashes, as JSON)."""
    base = manifest.get("base_model") or {}
    parent = manifest.get("parent") or {}
    git = manifest.get("git") or {}
    tags = {
        "finetune.run_dir": str(run.root.resolve()),
        "finetune.status": manifest.get("status"),
        "finetune.recipe_sha256": manifest.get("recipe_sha256"),
        "finetune.base_model": base.get("id"),
        "finetune.base_revision": base.get("revision"),
        "finetune.base_weights_sha256": base.get("weights_sha256"),
        "finetune.parent.name": parent.get("name"),
        "finetune.parent.path": parent.get("path"),
        "finetune.parent.manifest_sha256": parent.get("manifest_sha256"),
        "finetune.lineage": " -> ".join(lineage(manifest)),
        "finetune.git_commit": git.get("commit"),
    }
    return {
        k: redact_text(v if isinstance(v, str) else json.dumps(v, sort_keys=True))
        for k, v in tags.items()
        if v is not None
    }


def _values(scores: Scores | None) -> dict[str, float]:
    return {} if scores is None else {n: v for n in scores.names() if isinstance(v := scores.get(n), int | float)}


def _metric_name(name: str) -> str:
    return NOT_A_NAME.sub("_", name)


def _log_mlflow(recipe: Recipe, run: RunDir, manifest: dict[str, Any], figures: dict[str, float]) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()  # MLFLOW_TRACKING_URI: the user's, or the run directory's file store (train.py)
    last = mlflow.last_active_run()  # the run the trainer's MLflowCallback opened and closed in this process
    run_id = last.info.run_id if last is not None else _new_run(client, recipe)
    step = int(manifest.get("steps") or 0)
    for key, value in figures.items():
        client.log_metric(run_id, key, value, step=step)
    for key, value in lineage_tags(manifest, run).items():
        client.set_tag(run_id, key, value)
    for path in (run.recipe, run.manifest):
        client.log_artifact(run_id, str(path), ARTIFACT_DIR)


def _new_run(client: Any, recipe: Recipe) -> str:
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or recipe.name
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    return client.create_run(experiment_id, run_name=recipe.name).info.run_id


def _log_tensorboard(recipe: Recipe, run: RunDir, manifest: dict[str, Any], figures: dict[str, float]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    directory = Path(os.environ.get("TENSORBOARD_LOGGING_DIR") or run.root / "tensorboard")
    step = int(manifest.get("steps") or 0)
    with SummaryWriter(log_dir=str(directory)) as writer:
        for key, value in figures.items():
            writer.add_scalar(key, value, step)
        writer.add_text("finetune/recipe", _markdown_code(run.recipe.read_text(encoding="utf-8")), step)
        tags = "\n".join(f"- {k}: {v}" for k, v in lineage_tags(manifest, run).items())
        writer.add_text("finetune/lineage", tags, step)


def _markdown_code(text: str) -> str:
    """TensorBoard renders text as Markdown: indent the YAML so it stays as written."""
    return "\n".join("    " + line for line in redact_text(text).splitlines())


TRACKERS = {"mlflow": _log_mlflow, "tensorboard": _log_tensorboard}  # wandb: the trainer's curve only
