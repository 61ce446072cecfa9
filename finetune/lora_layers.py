"""Per-layer adapter structure: `lora.rank_pattern`, `lora.alpha_pattern` and `lora.layers`, checked against the model.

PEFT decides which module gets an adapter and with which rank and alpha; this module asks PEFT's own
matching functions the same questions before any weight is touched (on the meta model `finetune plan`
builds too), so that a pattern or layer index that would silently do nothing is a located recipe error,
and so that `plan`, `data` and `train` can say compactly which modules got which rank.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from finetune.errors import Problem, RecipeError
from finetune.recipe.schema import Recipe

# PEFT's own rule for the block index of a module name when layers_pattern is unset (tuners_utils)
_BLOCK_INDEX = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")


@dataclass(frozen=True)
class Adapted:
    """One module PEFT will adapt, with the rank and alpha it will get."""

    name: str
    rank: int
    alpha: float


def peft_fields(recipe: Recipe) -> dict[str, Any]:
    """The LoraConfig fields of the per-layer options (PEFT's names)."""
    lora = recipe.lora
    return {
        "rank_pattern": dict(lora.rank_pattern),
        "alpha_pattern": dict(lora.alpha_pattern),
        "layers_to_transform": list(lora.layers) if lora.layers is not None else None,
    }


def adapted_modules(model: Any, config: Any) -> list[Adapted]:
    """Every module of the (unwrapped) base `model` that PEFT adapts under `config`, with its rank and alpha, found by
    PEFT's own functions (check_target_module_exists, get_pattern_key), in model order."""
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    out = []
    for name, _ in model.named_modules():
        found = check_target_module_exists(config, name)
        if not found or type(found).__name__ == "_ExcludedModule":
            continue
        rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), name), config.lora_alpha)
        out.append(Adapted(name, rank, alpha))
    return out


def in_model(peft_model: Any) -> list[Adapted]:
    """The LoRA layers PEFT actually built, with their rank and alpha: what a run records."""
    out = []
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and getattr(module, "active_adapters", None):
            adapter = module.active_adapters[0]
            if adapter in module.r:
                name = name.removeprefix("base_model.model.")
                out.append(Adapted(name, module.r[adapter], module.lora_alpha[adapter]))
    return out


def check(recipe: Recipe, model: Any, config: Any) -> list[Adapted]:
    """The adapted modules, or a located RecipeError for each pattern that matches none of them and each
    `lora.layers` index the model does not have (PEFT would ignore both without a word)."""
    adapted = adapted_modules(model, config)
    names = [a.name for a in adapted]
    problems = []
    for option in ("rank_pattern", "alpha_pattern"):
        for key in getattr(recipe.lora, option):
            if not any(re.match(rf"(.*\.)?({key})$", n) for n in names):
                problems.append(_problem(recipe, ("lora", option, key),
                                         f"{key!r} matches no adapted module; they are named like {_examples(names)}"))  # fmt: skip
    if recipe.lora.layers is not None:
        blocks = _blocks(model)
        missing = sorted(set(recipe.lora.layers) - blocks)
        if missing:
            have = f"0-{max(blocks)}" if blocks else "none"
            problems.append(_problem(recipe, ("lora", "layers"),
                                     f"{recipe.model.base} has no block {', '.join(map(str, missing))} (its blocks: {have})"))  # fmt: skip
    if problems:
        raise RecipeError(problems)
    return adapted


def summary(adapted: list[Adapted]) -> list[str]:
    """Which modules got which rank, compactly: one line per (rank, alpha), leaf names with their blocks, e.g.
    `rank 8, alpha 16: k_proj, v_proj (blocks 0-1); o_proj (block 1)`."""
    by_structure: dict[tuple[int, float], dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for a in adapted:
        match = _BLOCK_INDEX.match(a.name + ".")
        block = int(match["idx"]) if match else -1
        by_structure[a.rank, a.alpha][a.name.rsplit(".", 1)[-1]].append(block)
    lines = []
    for (rank, alpha), leaves in sorted(by_structure.items(), key=lambda kv: -kv[0][0]):
        by_blocks: dict[str, list[str]] = defaultdict(list)
        for leaf, blocks in leaves.items():
            by_blocks[_ranges(sorted(set(blocks)))].append(leaf)
        parts = [f"{', '.join(leafs)} ({where})" if where else ", ".join(leafs) for where, leafs in by_blocks.items()]
        lines.append(f"rank {rank}, alpha {alpha:g}: " + "; ".join(parts))
    return lines


def _blocks(model: Any) -> set[int]:
    """The block indices of the model's modules, by PEFT's rule."""
    return {int(m["idx"]) for name, _ in model.named_modules() if (m := _BLOCK_INDEX.match(name + "."))}


def _ranges(blocks: list[int]) -> str:
    """`block 3`, `blocks 0-11`, `blocks 0-3, 8`; empty for modules outside numbered blocks."""
    blocks = [b for b in blocks if b >= 0]
    if not blocks:
        return ""
    spans, start, prev = [], blocks[0], blocks[0]
    for b in [*blocks[1:], None]:
        if b is not None and b == prev + 1:
            prev = b
            continue
        spans.append(f"{start}-{prev}" if prev > start else str(start))
        start = prev = b
    return ("block " if len(blocks) == 1 else "blocks ") + ", ".join(spans)


def _examples(names: list[str]) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    return f"{names[0]} ({', '.join(leaves)})" if names else "(none)"


def _problem(recipe: Recipe, key: tuple[str, ...], message: str) -> Problem:
    where = recipe.source.where(key) if recipe.source else ""
    return Problem(message, where, ".".join(key[:2]))
