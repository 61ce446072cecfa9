"""The sweep file: a recipe, the keys that vary (a grid or a search space), the metric and the seeds.

    recipe: quickstart.yaml                 # relative to this file
    fixed: {train.epochs: 2}                # the same in every trial
    grid: {lora.rank: [4, 8, 16], lora.targets: [attention, all-linear]}
    metric: exact_match

It is read with the recipes' located YAML (every mistake with its file:line) and validated
completely before anything trains, without torch: the sweep's own keys, then every combination
of values as a recipe. A combination that makes the recipe invalid is reported with the values
that cause it, located at their line in the sweep file.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from finetune.errors import Problem, RecipeError
from finetune.recipe.load import SET_ORIGIN, load_recipe, located_problems
from finetune.recipe.schema import LOSS_METRICS, NAME_PATTERN, FieldRuleError, Recipe
from finetune.recipe.yaml_source import KeyPath, Loc, display_path, load_file

KINDS = ("choice", "uniform", "log_uniform", "integer", "log_integer")
MAX_CHECKED = 512  # combinations validated one by one; beyond, each key's values are checked on their own


class SweepSection(BaseModel):
    """Strict like the recipe: a typo in a sweep file is an error, never ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, validate_default=True)


class Space(SweepSection):
    """One searched key: exactly one of its fields."""

    choice: list[Any] | None = Field(None, min_length=1, description="Pick one of these values.")
    uniform: list[float] | None = Field(None, min_length=2, max_length=2, description="A float in [low, high].")
    log_uniform: list[Annotated[float, Field(gt=0)]] | None = Field(
        None, min_length=2, max_length=2, description="A float in [low, high], sampled on a log scale (learning rates)."
    )
    integer: list[int] | None = Field(None, min_length=2, max_length=2, description="A whole number in [low, high].")
    log_integer: list[Annotated[int, Field(ge=1)]] | None = Field(
        None, min_length=2, max_length=2, description="A whole number in [low, high] on a log scale (ranks)."
    )

    @model_validator(mode="after")
    def _one_kind(self) -> Space:
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(KINDS)} (got {', '.join(given) or 'none'})")
        bounds = getattr(self, given[0])
        if given[0] != "choice" and not bounds[0] < bounds[1]:
            raise FieldRuleError(given[0], f"must be [low, high] with low < high (got {bounds})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    @property
    def values(self) -> list[Any]:
        """The values a validation tries: every choice, or both bounds."""
        return list(getattr(self, self.kind))


class Search(SweepSection):
    trials: int = Field(ge=1, description="Number of trials (points) to run.")
    sampler: Literal["tpe", "random"] = Field("tpe", description="Optuna sampler: `tpe` (Bayesian) or `random`.")
    space: dict[str, Space] = Field(min_length=1, description="Recipe key -> its range, e.g. train.lr: {log_uniform: [1e-5, 1e-2]}.")  # fmt: skip


class Pruning(SweepSection):
    method: Literal["auto", "median", "none"] = Field(
        "auto",
        description="`median`: stop a trial whose held-out loss at an eval step is worse than the median of the "
        "trials before it at that step (Optuna's MedianPruner). `auto`: median for a search, none for a grid "
        "(an ablation wants every point).",
    )
    startup_trials: int = Field(2, ge=0, description="Trials that finish before any is pruned.")
    warmup_steps: int = Field(0, ge=0, description="Steps of a trial before it may be pruned.")


class SweepFile(SweepSection):
    """A sweep: one recipe trained once per point of a grid or of a search, per seed."""

    recipe: str = Field(min_length=1, description="The recipe every trial starts from, relative to this file.")
    name: str | None = Field(None, pattern=NAME_PATTERN, description="Sweep name; default: the file's stem.")
    output_dir: str | None = Field(
        None, description="Sweep directory, relative to the working directory; default runs/<name>."
    )
    fixed: dict[str, Any] = Field({}, description="Recipe keys set the same in every trial, e.g. train.epochs: 2.")
    grid: dict[str, Annotated[list[Any], Field(min_length=1)]] | None = Field(
        None, description="Recipe key -> the values to try; every combination is a trial."
    )
    search: Search | None = Field(None, description="A search space and a number of trials, instead of a grid.")
    metric: str = Field(
        "loss", description="What ranks the trials: loss, perplexity (held-out) or one of the recipe's eval.metrics."
    )
    direction: Literal["minimize", "maximize"] | None = Field(
        None, description="Whether the metric should go down or up; default: minimize loss/perplexity, maximize others."
    )
    seeds: list[int] | None = Field(
        None, min_length=1, description="Train each point once per seed (mean and spread); default: the recipe's seed."
    )
    pruning: Pruning = Field(Pruning(), description="Stopping hopeless trials early, from the held-out loss.")
    doubling_margin: float = Field(
        0.01,
        ge=0,
        description="For a lora.rank sweep: doubling the rank 'stops paying' when it improves the metric by less "
        "than this (in the metric's units); sweep.html marks that rank.",
    )

    @model_validator(mode="after")
    def _grid_or_search(self) -> SweepFile:
        if (self.grid is None) == (self.search is None):
            raise ValueError("give either grid: (values to try) or search: (a space and a number of trials)")
        varied = self.grid if self.grid is not None else self.search.space
        for key in varied:
            if key in self.fixed:
                raise FieldRuleError(f"fixed.{key}", "is also varied by the sweep: keep it in one place")
            if key in ("name", "output_dir"):
                raise ValueError(f"{key} cannot vary: each trial gets its own, named from its values")
        return self


@dataclass(frozen=True)
class Sweep:
    """A validated sweep: its file, the spec, where trials go, and the recipe each trial trains."""

    path: Path
    spec: SweepFile
    recipe_path: Path
    name: str
    dir: Path
    base: Recipe  # the recipe with `fixed` applied (first point, first seed): for names and checks

    @property
    def keys(self) -> list[str]:
        return list(self.spec.grid or self.spec.search.space)

    @property
    def seeds(self) -> list[int]:
        return list(self.spec.seeds or [self.base.seed])

    @property
    def direction(self) -> str:
        if self.spec.direction:
            return self.spec.direction
        return "minimize" if self.spec.metric in LOSS_METRICS else "maximize"

    @property
    def pruner(self) -> str:
        method = self.spec.pruning.method
        return ("median" if self.spec.search else "none") if method == "auto" else method

    @property
    def trial_count(self) -> int:
        """Trials the sweep runs: every grid point (or the search's trials) once per seed."""
        return (len(self.points()) if self.spec.grid else self.spec.search.trials) * len(self.seeds)

    def points(self) -> list[dict[str, Any]]:
        """Every point of the grid, in the file's order (empty for a search)."""
        grid = self.spec.grid or {}
        return [dict(zip(grid, combo, strict=True)) for combo in itertools.product(*grid.values())]

    def trial_name(self, values: dict[str, Any], number: int | None = None) -> str:
        """`rank-8_targets-all-linear`: the run directory of a point; a search trial starts with its number."""
        parts = [f"{_short(key, self.keys)}-{_show(value)}" for key, value in values.items()]
        return "_".join(([f"{number:03d}"] if number is not None else []) + parts)

    def run_name(self, trial: str, seed: int) -> str:
        return trial + (f"_seed-{seed}" if len(self.seeds) > 1 else "")

    def recipe(self, values: dict[str, Any], seed: int, run: str) -> Recipe:
        return load_recipe(self.recipe_path, overrides(self.spec, self.name, self.dir, values, seed, run))

    def fingerprint(self) -> str:
        """What a study's results depend on: the sweep spec and the base recipe (a change means a new study)."""
        data = {"spec": self.spec.model_dump(mode="json"), "recipe": self.base.resolved()}
        data["recipe"].pop("name", None), data["recipe"].pop("output_dir", None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def overrides(
    spec: SweepFile, name: str, directory: Path, values: dict[str, Any], seed: int | None, run: str
) -> list[str]:
    """`--set` overrides of one run: fixed keys, the point's values, the seed, its name and directory."""
    pairs = {**spec.fixed, **values, **({"seed": seed} if seed is not None else {})}
    sets = [f"{key}={json.dumps(value)}" for key, value in pairs.items()]
    return [*sets, f"name={json.dumps(f'{name}_{run}')}", f"output_dir={json.dumps(str(directory / run))}"]


def _short(key: str, keys: list[str]) -> str:
    """The last part of a key (`rank`), unless another varied key ends the same way."""
    last = key.split(".")[-1]
    return last if sum(k.split(".")[-1] == last for k in keys) == 1 else key


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ".".join(_show(v) for v in value)
    text = f"{value:g}" if isinstance(value, float) else str(value).lower() if isinstance(value, bool) else str(value)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text)


# --- loading ---------------------------------------------------------------------------------


def is_sweep_file(path: str | Path) -> bool:
    """A sweep file names a recipe and what varies (`recipe:` with `grid:` or `search:`); anything else is a recipe.

    Read by our YAML source, which bounds aliases, nesting and numbers; a file it cannot read is left to the
    recipe loader, which reports the problem with its location.
    """
    doc = load_file(Path(path)).data
    return isinstance(doc, dict) and "recipe" in doc and bool({"grid", "search"} & doc.keys())


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file and every combination it makes; raise `RecipeError` with all problems."""
    path = Path(path).expanduser().resolve()
    doc = load_file(path)
    shown = display_path(path)
    if doc.data is None or not isinstance(doc.data, dict):
        raise RecipeError(
            doc.problems or [Problem("a sweep file must be a mapping of keys (recipe:, grid:, ...)", shown)]
        )
    locs = {**doc.locs, (): Loc(shown)}
    try:
        spec = SweepFile.model_validate(doc.data)
    except ValidationError as e:
        raise RecipeError(doc.problems + located_problems(e, doc.data, locs, SweepFile)) from None
    if doc.problems:
        raise RecipeError(doc.problems)
    recipe_path = (path.parent / spec.recipe).resolve()
    if not recipe_path.is_file():
        raise RecipeError(Problem(f"file not found: {spec.recipe} (looked at {display_path(recipe_path)})",
                                  str(locs[("recipe",)]), "recipe"))  # fmt: skip
    name = spec.name or re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem)
    directory = Path(spec.output_dir or f"runs/{name}")
    checked = _Checker(spec, recipe_path, name, directory, locs)
    base = checked.run()
    sweep = Sweep(path, spec, recipe_path, name, directory, base)
    _check_names(sweep, locs)
    _check_metric(sweep, locs)
    return sweep


class _Checker:
    """Validates every combination as a recipe and reports each problem once, with the values that cause it."""

    def __init__(self, spec: SweepFile, recipe_path: Path, name: str, directory: Path, locs: dict[KeyPath, Loc]):
        self.spec, self.recipe_path, self.name, self.dir, self.locs = spec, recipe_path, name, directory, locs
        self.section = "grid" if spec.grid is not None else "search"
        self.values = spec.grid if spec.grid is not None else {k: s.values for k, s in spec.search.space.items()}

    def run(self) -> Recipe:
        combos = list(self._combinations())
        failures: dict[Problem, list[dict[str, Any]]] = {}
        base = None
        for combo in combos:
            seed = self.spec.seeds[0] if self.spec.seeds else None
            try:
                recipe = load_recipe(self.recipe_path, overrides(self.spec, self.name, self.dir, combo, seed, "check"))
                base = base or recipe
            except RecipeError as e:
                for problem in e.problems:
                    failures.setdefault(self._locate(problem, combo), []).append(combo)
        problems = [self._explain(p, failed, combos) for p, failed in failures.items()]
        if problems:
            raise RecipeError(list(dict.fromkeys(problems)))
        return base

    def _combinations(self) -> Iterator[dict[str, Any]]:
        keys, lists = list(self.values), list(self.values.values())
        total = 1
        for values in lists:
            total *= len(values)
        if total <= MAX_CHECKED:
            yield from (dict(zip(keys, combo, strict=True)) for combo in itertools.product(*lists))
            return
        first = {k: v[0] for k, v in self.values.items()}
        for key, values in self.values.items():
            yield from ({**first, key: value} for value in values)

    def _value_path(self, key: str, value: Any) -> KeyPath:
        if self.section == "grid":
            return ("grid", key, self.values[key].index(value))
        space = self.spec.search.space[key]
        return ("search", "space", key, space.kind, space.values.index(value))

    def _where(self, path: KeyPath) -> str:
        for n in range(len(path), -1, -1):
            if path[:n] in self.locs:
                return str(self.locs[path[:n]])
        return str(self.locs[()])

    def _locate(self, problem: Problem, combo: dict[str, Any]) -> Problem:
        """A problem of a `--set` value moves to the sweep file line that gave the value."""
        if problem.where != SET_ORIGIN:
            return problem
        for key in sorted([*combo, *self.spec.fixed], key=len, reverse=True):
            if problem.key == key or problem.key.startswith((f"{key}.", f"{key}[")):
                path = self._value_path(key, combo[key]) if key in combo else ("fixed", key)
                return Problem(problem.message, self._where(path), problem.key)
        return problem

    def _explain(self, problem: Problem, failed: list[dict[str, Any]], combos: list[dict[str, Any]]) -> Problem:
        """Every combination fails: the problem as it is. Some do: name the values they share that others lack."""
        if len(failed) == len(combos):
            return problem
        culprits = {}
        for key, values in self.values.items():
            bad = {json.dumps(c[key]) for c in failed}
            if len(bad) < len({json.dumps(v) for v in values}) and len(bad) == 1:
                culprits[key] = failed[0][key]
        if culprits:
            key, value = next(iter(culprits.items()))
            where = self._where(self._value_path(key, value))
            which = ", ".join(f"{k}={json.dumps(v)}" for k, v in culprits.items())
        else:
            where = self._where((self.section,))
            which = "; ".join(", ".join(f"{k}={json.dumps(v)}" for k, v in c.items()) for c in failed[:3])
            which += f" (and {len(failed) - 3} more)" if len(failed) > 3 else ""
        origin = "" if problem.where == where else f"{problem.where} "
        return Problem(
            f"the combination {which} makes the recipe invalid: {origin}{problem.key}: {problem.message}",
            where,
            f"{self.section}.{next(iter(culprits), '')}".rstrip("."),
        )


def _check_names(sweep: Sweep, locs: dict[KeyPath, Loc]) -> None:
    """Two grid points must not share a run directory (0.001 and 1e-3, or floats equal to 6 digits)."""
    seen: dict[str, dict[str, Any]] = {}
    for point in sweep.points():
        name = sweep.trial_name(point)
        if name in seen:
            raise RecipeError(Problem(f"two points would share the run directory {name!r}: {seen[name]} and {point}",
                                      str(locs.get(("grid",), locs[()])), "grid"))  # fmt: skip
        seen[name] = point


def _check_metric(sweep: Sweep, locs: dict[KeyPath, Loc]) -> None:
    """The metric must be computed by every trial, and pruning needs held-out losses during training."""
    recipe, metric = sweep.base, sweep.spec.metric
    problems = []
    where = str(locs.get(("metric",), locs[()]))
    if recipe.data.eval is None:
        problems.append(Problem("needs held-out data: set data.eval in the recipe (or fixed:)", where, "metric"))
    elif metric not in LOSS_METRICS and metric not in recipe.eval.metrics:
        allowed = ", ".join(dict.fromkeys([*LOSS_METRICS, *recipe.eval.metrics]))
        problems.append(Problem(f"{metric!r} is not computed by the recipe: use one of {allowed}", where, "metric"))
    if sweep.pruner != "none" and recipe.train.eval_every is None:
        problems.append(
            Problem(
                "pruning reads the held-out loss at eval steps: set train.eval_every (in fixed: or the recipe), "
                "or pruning: {method: none}",
                str(locs.get(("pruning",), locs.get(("search",), locs[()]))),
                "pruning",
            )
        )
    if problems:
        raise RecipeError(problems)
