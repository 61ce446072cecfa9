"""`eval.harness`: lm-evaluation-harness tasks on the base model and on the tuned one, beside our held-out eval.

lm-eval is optional and imported only here, when a recipe names tasks. Both models are loaded by
lm-eval's own `hf` model (the tuned one as the base plus `peft=` the run's adapter), with the
run's tokenizer, so the figures are those lm-eval itself would report for these weights.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.errors import UserError
from finetune.recipe.schema import Recipe

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

INSTALL = "pip install lm-eval"
KEPT = ("results", "groups", "versions", "n-shot", "n-samples", "higher_is_better")  # of lm-eval's result dict


def check(recipe: Recipe) -> None:
    """Fail before training, not after it, when lm-eval is missing or a task does not exist."""
    if recipe.eval.harness:
        _tasks(recipe.eval.harness)


def run_harness(recipe: Recipe, adapter_dir: Path, with_base: bool, limit: int | None) -> dict[str, Any]:
    """lm-eval's results ("base" when `with_base`, then "tuned"), trimmed to the metrics and their provenance."""
    manager, specs = _tasks(recipe.eval.harness)
    models = {"base": None, "tuned": adapter_dir} if with_base else {"tuned": adapter_dir}
    return {name: _simple_evaluate(recipe, manager, specs, adapter_dir, peft, limit) for name, peft in models.items()}


def summarize(results: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """task -> metric -> base, tuned, delta: the headline figures, without stderrs and bookkeeping fields."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for model, result in results.items():
        for task, fields in result["results"].items():
            for key, value in fields.items():
                name, _, filter_ = key.partition(",")
                if filter_ and not name.endswith("_stderr") and isinstance(value, int | float):
                    metric = name if filter_ == "none" else key
                    out.setdefault(task, {}).setdefault(metric, {})[model] = value
    for metrics in out.values():
        for figures in metrics.values():
            if "base" in figures and "tuned" in figures:
                figures["delta"] = figures["tuned"] - figures["base"]
    return out


def _tasks(tasks: list[str]) -> tuple[TaskManager, list[str]]:
    """lm-eval's task index and what to load from it; every unknown task is reported at once.

    The loader made local paths absolute (task names never are). lm-eval's own index (~5 s to
    build) is read only when a task is given by name.
    """
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError(f"eval.harness needs lm-evaluation-harness: {INSTALL}") from None
    paths = [Path(t) for t in tasks if Path(t).is_absolute()]
    folders = sorted({p if p.is_dir() else p.parent for p in paths})
    manager = TaskManager(include_path=folders or None, include_defaults=len(paths) < len(tasks))
    specs, problems = [], []
    for task in tasks:
        found = _specs(manager, Path(task)) if Path(task).is_absolute() else [task] * (task in manager.all_tasks)
        specs += found
        if not found:
            problems.append(_unknown(manager, task))
    if problems:
        raise UserError(problems)
    return manager, specs


def _specs(manager: TaskManager, path: Path) -> list[str]:
    """A task file is loaded by its path; a folder stands for every task defined in it."""
    index = manager.task_index
    if path.is_file():
        return [str(path)] if any(entry.yaml_path == path for entry in index.values()) else []
    return [name for name in manager.all_subtasks if path in getattr(index[name].yaml_path, "parents", ())]


def _unknown(manager: TaskManager, task: str) -> str:
    if Path(task).is_absolute():
        return f"eval.harness: {task} defines no lm-eval task (a task file needs a `task:` key)"
    hint = difflib.get_close_matches(task, manager.all_tasks, n=1)
    suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
    return f"eval.harness: {task!r} is not an lm-eval task, nor a task file (relative to the recipe){suggestion}"


def _simple_evaluate(
    recipe: Recipe, manager: TaskManager, specs: list[str], tokenizer: Path, peft: Path | None, limit: int | None
) -> dict[str, Any]:
    """One model through `lm_eval.simple_evaluate`: the base, or the base with the adapter (`peft`)."""
    import lm_eval
    import torch

    from finetune.machine import resolve_dtype
    from finetune.modeling import quantization_config

    args: dict[str, Any] = {
        "pretrained": recipe.model.base,
        "tokenizer": str(tokenizer),  # the run's: the same tokens for base and tuned
        "dtype": resolve_dtype(recipe.model.dtype),
        "trust_remote_code": recipe.model.trust_remote_code,
    }
    if recipe.model.revision:
        args["revision"] = recipe.model.revision
    if (quantization := quantization_config(recipe)) is not None:
        args["quantization_config"] = quantization
    if peft is not None:
        args["peft"] = str(peft)
    result = lm_eval.simple_evaluate(
        model="hf", model_args=args, tasks=specs, task_manager=manager, limit=limit, log_samples=False,
        batch_size=recipe.eval.batch_size, device="cuda" if torch.cuda.is_available() else "cpu",
    )  # fmt: skip
    return {key: result[key] for key in KEPT if key in result}
