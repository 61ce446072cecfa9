"""Combining adapters: several runs trained on the same base become one standard PEFT adapter.

Through PEFT's `add_weighted_adapter`, in a directory laid out like a run (recipe.yaml,
manifest.json naming the parents, adapter/), so that `finetune merge` and `finetune export`
take it like any run. `finetune merge RUN... --method M` calls `combine`.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finetune.errors import UserError
from finetune.files import atomic_dir, file_sha256, write_json_atomic
from finetune.machine import free_memory, this_machine
from finetune.modeling import load_model, quiet_libraries
from finetune.recipe.load import load_recipe
from finetune.recipe.schema import NAME_PATTERN
from finetune.recipe.yaml_source import dump
from finetune.runs import Result, Run, check_adapter, claim_output, hardware, now, open_run, package_versions
from finetune.secrets import redact
from finetune.speed import model_attention

COMBINE_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "cat", "svd")
EQUAL_RANK_METHODS = ("linear", "ties", "dare_linear", "dare_ties")
DENSITY_METHODS = ("ties", "dare_linear", "dare_ties")
DEFAULT_DENSITY = 0.5


@dataclass
class CombineResult(Result):
    out_dir: str
    adapter_dir: str
    method: str
    weights: list[float]
    density: float | None
    rank: int
    targets: list[str]
    parents: list[str]
    seconds: float
    notes: list[str]


def combine(
    run_dirs: list[str | Path],
    method: str,
    weights: list[float] | None = None,
    density: float | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> CombineResult:
    """Combine adapters trained on the same base into one PEFT adapter, in a run-like directory at `out`."""
    started, started_at = time.perf_counter(), now()
    progress = progress or (lambda _: None)
    if len(run_dirs) < 2:
        raise UserError("combining needs two or more run directories")
    if method not in COMBINE_METHODS:
        raise UserError(f"--method: must be one of {', '.join(COMBINE_METHODS)} (got {method!r})")
    if out is None:
        raise UserError("--out is required when combining adapters: the directory for the combined adapter")
    weights = _combine_weights(weights, len(run_dirs))
    density = _combine_density(method, density)
    runs = [open_run(d) for d in run_dirs]
    targets, rank = _check_compatible(runs, method)
    target = Path(out).expanduser().resolve()
    for run in runs:
        claim_output(target, overwrite, run)
    notes = _combine_notes(runs)
    seed = runs[0].recipe.seed
    with atomic_dir(target) as tmp:
        progress(f"loading {runs[0].recipe.model.base} with {len(runs)} adapters")
        recipe_data = _combined_recipe(runs, target, rank, targets)
        _write_combined_adapter(runs, tmp / "adapter", method, weights, density, seed)
        (tmp / "recipe.yaml").write_text(
            f"# Resolved recipe of the adapter combined ({method}) from: {', '.join(str(r.root) for r in runs)}\n"
            + dump(redact(recipe_data)),
            encoding="utf-8",
        )
        recipe = load_recipe(tmp / "recipe.yaml", check_files=False)  # the combined directory must work like a run
        check_adapter(tmp / "adapter")
        write_json_atomic(
            tmp / "manifest.json",
            redact(
                {
                    "name": recipe.name,
                    "kind": "combined",
                    "status": "completed",
                    "started": started_at,
                    "finished": now(),
                    "recipe_sha256": recipe.fingerprint(),
                    "seed": seed,
                    "base_model": {"id": recipe.model.base, "revision": recipe.model.revision},
                    "combination": {
                        "method": method,
                        "peft_combination_type": method,
                        "weights": weights,
                        "density": density,
                        "exact_weighted_sum": method == "cat",  # the others approximate sum(w_i * delta_i)
                    },
                    "parents": [
                        {
                            "run_dir": str(r.root),
                            "name": r.recipe.name,
                            "recipe_sha256": r.manifest.get("recipe_sha256") or r.recipe.fingerprint(),
                            "adapter_sha256": file_sha256(r.adapter / "adapter_model.safetensors"),
                            "variant": r.variant,
                            "rank": r.adapter_config.get("r"),
                            "weight": w,
                        }
                        for r, w in zip(runs, weights, strict=True)
                    ],
                    "lora": {"targets": targets, "rank": recipe.lora.rank},
                    "packages": package_versions(),
                    "hardware": hardware(),
                }
            ),
        )
    return CombineResult(
        out_dir=str(target),
        adapter_dir=str(target / "adapter"),
        method=method,
        weights=weights,
        density=density,
        rank=recipe.lora.rank,
        targets=targets,
        parents=[str(r.root) for r in runs],
        seconds=time.perf_counter() - started,
        notes=notes,
    )


def _combine_weights(weights: list[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise UserError(f"--weights: {len(weights)} weight(s) for {n} adapters; give one per run directory")
    if not all(math.isfinite(w) for w in weights):
        raise UserError("--weights: every weight must be a finite number")
    return [float(w) for w in weights]


def _combine_density(method: str, density: float | None) -> float | None:
    if method not in DENSITY_METHODS:
        if density is not None:
            raise UserError(f"--density: only applies to {', '.join(DENSITY_METHODS)}, not {method}")
        return None
    density = DEFAULT_DENSITY if density is None else density
    if not 0 < density <= 1:
        raise UserError(f"--density: must be > 0 and ≤ 1 (got {density})")
    return density


def _targets(config: dict[str, Any]) -> list[str] | str:
    targets = config.get("target_modules")
    return targets if isinstance(targets, str) else sorted(targets or [])


def _check_compatible(runs: list[Run], method: str) -> tuple[list[str], int]:
    """Same base (id and revision), same target modules, no DoRA or modules_to_save, equal ranks where needed."""
    first = runs[0]
    problems = []
    for run in runs[1:]:
        a, b = first.recipe.model, run.recipe.model
        if (a.base, a.revision) != (b.base, b.revision):
            problems.append(
                f"base model differs: {first.root} was trained on {a.base} (revision {a.revision}), "
                f"{run.root} on {b.base} (revision {b.revision})"
            )
        if _targets(first.adapter_config) != _targets(run.adapter_config):
            problems.append(
                f"target modules differ: {first.root} adapts {_targets(first.adapter_config)}, "
                f"{run.root} adapts {_targets(run.adapter_config)}"
            )
    for run in runs:
        if run.adapter_config.get("use_dora"):
            problems.append(
                f"{run.root} is a DoRA adapter: PEFT's add_weighted_adapter combines only the low-rank matrices, "
                "not DoRA's magnitude vectors; merge each DoRA run on its own instead"
            )
        if run.adapter_config.get("modules_to_save"):
            problems.append(
                f"{run.root} trains whole modules ({', '.join(run.adapter_config['modules_to_save'])}, "
                "modules_to_save), which cannot be combined by weighting low-rank matrices"
            )
        if run.adapter_config.get("trainable_token_indices"):
            problems.append(
                f"{run.root} added tokens and trained their rows (data.add_special_tokens, trainable_token_indices), "
                "which cannot be combined by weighting low-rank matrices"
            )
        if run.adapter_config.get("rank_pattern") or run.adapter_config.get("alpha_pattern"):
            problems.append(f"{run.root} uses per-module ranks (rank_pattern/alpha_pattern), not supported here")
    ranks = [int(r.adapter_config.get("r", 0)) for r in runs]
    if method in EQUAL_RANK_METHODS and len(set(ranks)) > 1:
        listed = ", ".join(f"{r.root}: {k}" for r, k in zip(runs, ranks, strict=True))
        problems.append(f"--method {method} needs equal ranks, got {listed}; use cat or svd for different ranks")
    if problems:
        raise UserError(problems)
    targets = _targets(first.adapter_config)
    if isinstance(targets, str):
        raise UserError(f"{first.adapter}: target_modules is a regular expression ({targets!r}); give a module list")
    rank = sum(ranks) if method == "cat" else max(ranks)
    return targets, rank


def _combine_notes(runs: list[Run]) -> list[str]:
    notes = []
    templates = {
        (r.adapter / "chat_template.jinja").read_text(encoding="utf-8")
        if (r.adapter / "chat_template.jinja").is_file()
        else None
        for r in runs
    }
    if len(templates) > 1:
        notes.append(
            f"the runs were trained with different chat templates; the combined adapter keeps {runs[0].root}'s"
        )
    if len({r.recipe.quantization.method for r in runs}) > 1:
        notes.append("some parents were trained on a quantized base and some not; the combination applies to the base")
    return notes


def _write_combined_adapter(
    runs: list[Run], out: Path, method: str, weights: list[float], density: float | None, seed: int
) -> None:
    from peft import PeftModel
    from transformers import AutoTokenizer

    quiet_libraries()
    recipe = runs[0].recipe
    base = load_model(recipe, model_attention(recipe, this_machine()), quantized=False)  # never quantized
    names = [f"parent{i}" for i in range(len(runs))]
    model = PeftModel.from_pretrained(base, str(runs[0].adapter), adapter_name=names[0], is_trainable=False)
    for name, run in zip(names[1:], runs[1:], strict=True):
        model.load_adapter(str(run.adapter), adapter_name=name, is_trainable=False)
    torch.manual_seed(seed)  # dare_* prune at random
    model.add_weighted_adapter(names, weights, "default", combination_type=method, density=density)
    # PEFT gives the new adapter lora_alpha = r with the first parent's scaling rule; the parents' scalings are
    # already folded into its matrices, so the combined adapter must be applied with scaling exactly 1.
    config = model.peft_config["default"]
    config.use_rslora = False
    config.lora_alpha = config.r
    config.inference_mode = True
    model.save_pretrained(str(out), selected_adapters=["default"])
    AutoTokenizer.from_pretrained(runs[0].adapter).save_pretrained(out)
    del model, base
    free_memory()


def _combined_recipe(runs: list[Run], target: Path, rank: int, targets: list[str]) -> dict[str, Any]:
    """The first parent's resolved recipe, renamed, with the combined adapter's shape and every parent's data."""
    data = runs[0].recipe.resolved()
    name = target.name if re.fullmatch(NAME_PATTERN, target.name) else "combined"
    sources: list[dict] = []
    for run in runs:
        for source in run.recipe.resolved()["data"]["train"]:
            if source not in sources:
                sources.append(source)
    data["name"] = name
    data["output_dir"] = str(target)
    data["lora"].update(rank=rank, alpha=float(rank), variant="lora", targets=targets, modules_to_save=[])
    data["data"]["train"] = sources
    return data
