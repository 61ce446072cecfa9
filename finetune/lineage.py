"""Runs that continue runs: `model.from_run` completes a recipe from its parent run and records where it came from.

A preference (and later GRPO) stage continues a completed SFT run: the same base model, revision,
weights, tokenizer and chat template, and the parent's adapter as the starting policy. Everything
the parent decided is taken from the parent's own resolved recipe and manifest, so that nothing
the user writes is silently ignored: a value that disagrees with the parent is an error naming both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finetune.errors import Problem, UserError
from finetune.files import file_sha256
from finetune.recipe.schema import Recipe
from finetune.runs import RunDir

MODEL_KEYS = ("base", "revision")  # taken from the parent; set in the recipe, they must agree with it


class ParentRunError(UserError):
    """`model.from_run` names no completed run, or the recipe contradicts the run it continues."""


def parent_of(recipe: Recipe) -> RunDir | None:
    """The parent run directory of a recipe with `model.from_run`, checked to be a completed run with an adapter."""
    if recipe.model.from_run is None:
        return None
    run = RunDir(recipe.model.from_run)
    located = recipe.source.where(("model", "from_run")) + " " if recipe.source else ""
    where = f"{located}model.from_run {recipe.model.from_run}"
    if not run.manifest.is_file() or not run.recipe.is_file():
        raise ParentRunError(f"{where}: not a run directory (no manifest.json and recipe.yaml there); train it first")
    status = json.loads(run.manifest.read_text(encoding="utf-8")).get("status")
    if status != "completed":
        raise ParentRunError(
            f"{where}: the run's status is {status!r}, not 'completed'; finish it (finetune train ... --resume) first"
        )
    if not (run.adapter / "adapter_config.json").is_file():
        raise ParentRunError(f"{where}: the run has no adapter (adapter/adapter_config.json is missing)")
    return run


def continue_parent(recipe: Recipe) -> Recipe:
    """The recipe completed from its parent run: base, revision, LoRA settings and chat template are the parent's.

    Keys that the recipe sets itself must agree with the parent's; every disagreement is reported at once.
    """
    run = parent_of(recipe)
    if run is None:
        return recipe
    from finetune.recipe.load import load_recipe

    parent = load_recipe(run.recipe, check_files=False)
    problems: list[Problem] = []

    def agree(key: str, ours: Any, theirs: Any, what: str) -> None:
        if ours != theirs:
            problems.append(
                Problem(
                    f"{ours!r} here, but the {what} of {run.root} that this run continues has {theirs!r}; "
                    f"remove {key} from the recipe (it comes from the parent) or set it to {theirs!r}",
                    key=key,
                )
            )

    for key in MODEL_KEYS:
        if key in recipe.model.model_fields_set and getattr(recipe.model, key) is not None:
            agree(f"model.{key}", getattr(recipe.model, key), getattr(parent.model, key), "run")
    for key in sorted(recipe.lora.model_fields_set):
        agree(f"lora.{key}", getattr(recipe.lora, key), getattr(parent.lora, key), "adapter")
    template = _parent_template(run, parent)
    if "chat_template" in recipe.data.model_fields_set and recipe.data.chat_template not in ("auto", template):
        agree("data.chat_template", recipe.data.chat_template, template, "chat template")
    if problems:
        raise ParentRunError(problems)
    model = recipe.model.model_copy(update={"base": parent.model.base, "revision": parent.model.revision,
                                            "from_run": str(run.root.resolve())})  # fmt: skip
    data = recipe.data.model_copy(update={"chat_template": template})
    return recipe.model_copy(update={"model": model, "lora": parent.lora, "data": data})


def _parent_template(run: RunDir, parent: Recipe) -> str:
    """The chat template the parent trained with, as saved beside its adapter (else as its recipe named it)."""
    saved = run.adapter / "chat_template.jinja"
    return str(saved.resolve()) if saved.is_file() else parent.data.chat_template


def parent_record(recipe: Recipe) -> dict[str, Any] | None:
    """The manifest's `parent`: the parent run's path, name and manifest sha256 (None without `from_run`)."""
    run = parent_of(recipe)
    if run is None:
        return None
    manifest = json.loads(run.manifest.read_text(encoding="utf-8"))
    return {
        "path": str(run.root.resolve()),
        "name": manifest.get("name"),
        "manifest_sha256": file_sha256(run.manifest),
        "adapter_sha256": file_sha256(run.adapter / "adapter_model.safetensors"),
        "base_model": manifest.get("base_model"),
    }


def check_same_weights(parent: dict[str, Any] | None, loaded: dict[str, Any]) -> None:
    """The base weights loaded now must be those the parent trained on (same file hashes)."""
    if not parent:
        return
    before = (parent.get("base_model") or {}).get("weights_sha256")
    now = loaded.get("weights_sha256")
    if before and now and before != now:
        raise ParentRunError(
            f"the base model's weights changed since the parent run {parent['path']} was trained "
            f"(sha256 {before} then, {now} now); its adapter would not fit them"
        )


def lineage(manifest: dict[str, Any], paths: bool = True) -> list[str]:
    """base -> parent(s) -> run, following `parent` records as far as their manifests still exist.

    `paths=False` names the parents without their local directories (for a model card that is published)."""
    chain = [manifest.get("name") or "?"]
    seen = set()
    parent = manifest.get("parent")
    base = (manifest.get("base_model") or {}).get("id")
    while parent and parent.get("path") not in seen:
        seen.add(parent["path"])
        chain.append(f"{parent.get('name')} ({parent['path']})" if paths else str(parent.get("name")))
        path = Path(parent["path"]) / "manifest.json"
        if not path.is_file():
            break
        upper = json.loads(path.read_text(encoding="utf-8"))
        base = (upper.get("base_model") or {}).get("id") or base
        parent = upper.get("parent")
    return [str(base), *reversed(chain)]
