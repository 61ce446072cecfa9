"""`finetune review`: what a change to a repository's recipes does, for the reviewer of a pull request.

A YAML diff shows `lora.rank: 16 -> 64`, or an edit to a shared `extends` fragment; it does not show
which recipes that touches, what it does to parameters, memory, steps and time, or whether the data
they read changed. So each recipe is resolved twice, with the very loader `train` uses: once in the
tree of the base commit (materialised with `git archive`, so its fragments, configs and data files are
the ones at that commit) and once in the working tree. Recipes whose resolved content or read files
differ are reported with the key-by-key diff (each value's file:line), the `plan` of both versions and,
where data changed, both versions' data statistics. Tokenizer and config only: never weights.

A sweep file is planned trial by trial: each grid point's resolved recipe (or, for a search, each
key's choices and range bounds), both versions, matched by the trial's name; its summary figures are
the whole sweep's (the largest trial's memory, every trial's steps and GPU time added up).

Over 600 lines, kept whole for now: its parts (git trees, one version resolved, two compared, a sweep's
trials, the Markdown) share the private `_Version` and `Figure`; the Markdown is the first to move out.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.errors import RecipeError, UserError
from finetune.recipe.load import load_recipe
from finetune.recipe.schema import Recipe
from finetune.recipe.yaml_source import KeyPath, dotted, load_file
from finetune.runs import Result
from finetune.sweep.file import Sweep, is_sweep_file, load_sweep
from finetune.units import duration

YAML_SUFFIXES = (".yaml", ".yml")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")  # read files hashed, weights never
GB = 10**9
MAX_TRIAL_PLANS = 32  # a bigger grid (or search space) is planned at each key's first and last value


@dataclass
class Change:
    """One resolved key that differs: `lora.rank: 16 -> 64`, with where each side's value was written."""

    key: str
    old: Any
    new: Any
    old_where: str  # file:line:col, or "default" (the schema's)
    new_where: str


@dataclass
class Figure:
    """One planned or measured figure of both versions; None where that version has none."""

    name: str
    old: float | None
    new: float | None
    unit: str = ""  # "bytes", "s", "h" or "" (a count)

    @property
    def delta(self) -> float | None:
        return None if self.old is None or self.new is None else self.new - self.old

    @property
    def percent(self) -> float | None:
        return None if self.delta is None or not self.old else 100 * self.delta / self.old


@dataclass
class FileChange:
    """A file a recipe reads (data, template, fragment-free config) whose bytes differ, by sha256."""

    path: str  # relative to the repository
    old_sha256: str | None  # None: the file is new
    new_sha256: str | None  # None: the file is gone
    data: bool = False  # one of the recipe's data files


@dataclass
class TrialPlan:
    """One trial of a sweep file, planned in both versions: a grid point, or an extreme of a search space."""

    name: str  # the trial's run name, from its values (`rank-8_targets-all-linear`)
    values: dict[str, Any]
    status: str  # "changed" | "added" | "removed" | "same"
    plan: list[Figure] = field(default_factory=list)

    def figure(self, name: str) -> Figure | None:
        return next((f for f in self.plan if f.name == name), None)


@dataclass
class RecipeReview:
    path: str  # relative to the repository
    kind: str  # "recipe" | "sweep"
    status: str  # "changed" | "added" | "deleted"
    problems: list[str] = field(default_factory=list)  # the new version's located errors (as `validate`)
    changes: list[Change] = field(default_factory=list)
    files: list[FileChange] = field(default_factory=list)
    plan: list[Figure] = field(default_factory=list)
    fits: dict[str, list[int]] = field(default_factory=dict)  # "old"/"new": the GPU sizes (GB) each fits
    data: list[Figure] = field(default_factory=list)
    not_computed: list[str] = field(default_factory=list)  # "plan of the base version: why"
    trials: list[TrialPlan] = field(default_factory=list)  # a sweep's, each planned
    notes: list[str] = field(default_factory=list)  # how a sweep's figures were made

    @property
    def valid(self) -> bool:
        return not self.problems

    def figure(self, name: str) -> Figure | None:
        return next((f for f in [*self.plan, *self.data] if f.name == name), None)


@dataclass
class ReviewResult(Result):
    base: str  # the ref as given (or the merge base found)
    commit: str
    recipes: list[RecipeReview]  # changed, added or deleted
    unchanged: int  # recipes and sweeps whose resolved content is the same

    @property
    def valid(self) -> bool:
        return all(r.valid for r in self.recipes)

    def to_dict(self) -> dict[str, Any]:
        def figures(items: list[Figure]) -> list[dict[str, Any]]:
            return [{"name": f.name, "old": f.old, "new": f.new, "unit": f.unit, "delta": f.delta,
                     "percent": f.percent} for f in items]  # fmt: skip

        recipes = [
            {**{k: v for k, v in r.__dict__.items() if k not in ("plan", "data", "changes", "files", "trials")},
             "valid": r.valid, "changes": [c.__dict__ for c in r.changes], "files": [f.__dict__ for f in r.files],
             "plan": figures(r.plan), "data": figures(r.data),
             "trials": [{"name": t.name, "values": t.values, "status": t.status, "plan": figures(t.plan)}
                        for t in r.trials]}
            for r in self.recipes
        ]  # fmt: skip
        return {"base": self.base, "commit": self.commit, "valid": self.valid, "unchanged": self.unchanged,
                "recipes": recipes}  # fmt: skip


@dataclass
class _Version:
    """One version of a recipe file, resolved in its own tree."""

    root: Path
    kind: str
    recipe: Recipe | None = None  # a sweep: its base recipe (fixed values applied)
    sweep: Sweep | None = None
    spec: dict[str, Any] = field(default_factory=dict)  # a sweep file's own keys, defaults filled in
    spec_where: dict[KeyPath, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    resolved: dict[str, Any] = field(default_factory=dict)  # paths made relative to the tree
    where: dict[KeyPath, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # read file (relative) -> sha256
    data_files: set[str] = field(default_factory=set)
    text: str = ""  # a sweep file's own text: its grid is not in any recipe

    def key(self) -> str:
        return json.dumps([self.kind, self.problems, self.resolved, self.files, self.text], sort_keys=True)

    @property
    def valid(self) -> bool:
        return self.recipe is not None and not self.problems


def review(base_ref: str | None = None, paths: list[str] | tuple[str, ...] = (), gpu: str = "H100") -> ReviewResult:
    """Every recipe and sweep file under `paths` whose resolved content differs between `base_ref` and the
    working tree (default base: the merge base with the default branch), with validity, diff, plan and data."""
    top = _toplevel()
    ref = base_ref or _default_base(top)
    commit = _git(top, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", what=f"--base {ref}: no such commit")
    wanted = [_relative(top, p) for p in paths]
    with tempfile.TemporaryDirectory(prefix="finetune-review-") as tmp:
        old_root = Path(tmp) / "base"
        _materialise(top, commit, old_root)
        names = sorted(
            _candidates(old_root, _tracked_at(top, commit), wanted) | _candidates(top, _tracked(top), wanted)
        )
        reviews, unchanged = [], 0
        for name in names:
            old, new = _version(old_root, name, ref), _version(top, name, None)
            if old is not None and new is not None and old.key() == new.key():
                unchanged += 1
                continue
            reviews.append(_review_one(name, old, new, gpu))
    return ReviewResult(ref, commit, reviews, unchanged)


def gate(
    result: ReviewResult,
    max_memory_gb: float | None = None,
    max_gpu_hours: float | None = None,
    fail_on_data_change: bool = False,
) -> list[str]:
    """CI's limits, each failure naming the recipe and the figure that crossed the line."""
    failures = []
    for r in result.recipes:
        peak, hours = r.figure("peak memory"), r.figure("GPU time")
        if max_memory_gb is not None and peak and peak.new is not None and peak.new > max_memory_gb * GB:
            failures.append(f"{r.path}: peak memory {peak.new / GB:.1f} GB > --max-memory-gb {max_memory_gb:g}")
        if max_gpu_hours is not None and hours and hours.new is not None and hours.new > max_gpu_hours:
            failures.append(f"{r.path}: estimated GPU time {hours.new:.2f} h > --max-gpu-hours {max_gpu_hours:g}")
        data_files = [f.path for f in r.files if f.data]
        if fail_on_data_change and data_files:
            failures.append(f"{r.path}: data changed (--fail-on-data-change): {', '.join(data_files)}")
    return failures


# --- git -----------------------------------------------------------------------------------------------


def _git(top: Path, *args: str, what: str) -> str:
    try:
        done = subprocess.run(["git", "-C", str(top), *args], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        raise UserError(f"{what} ({e})") from None
    if done.returncode != 0:
        raise UserError(what + (f": {done.stderr.strip()}" if done.stderr.strip() else ""))
    return done.stdout.strip()


def _toplevel() -> Path:
    return Path(_git(Path.cwd(), "rev-parse", "--show-toplevel", what="review needs a git checkout (run it in one)"))


def _default_base(top: Path) -> str:
    """The merge base of HEAD with the default branch (origin's HEAD, else main or master)."""
    for branch in ("origin/HEAD", "origin/main", "origin/master", "main", "master"):
        try:
            return _git(top, "merge-base", "HEAD", branch, what=branch)
        except UserError:
            continue
    raise UserError("no default branch (origin/HEAD, main or master) to compare with: pass --base REF")


def _materialise(top: Path, commit: str, out: Path) -> None:
    """The tree at `commit` as files, so its recipes resolve against its own fragments, configs and data."""
    out.mkdir(parents=True)
    archive = out.parent / "base.tar"
    _git(top, "archive", "--format=tar", f"--output={archive}", commit, what=f"cannot read the tree of {commit}")
    with tarfile.open(archive) as tar:
        tar.extractall(out, filter="data")
    archive.unlink()


def _tracked(top: Path) -> list[str]:
    """The working tree's files as git sees them: tracked and new, not ignored (run directories stay out)."""
    listed = _git(top, "ls-files", "--cached", "--others", "--exclude-standard", what="cannot list files")
    return [n for n in listed.splitlines() if (top / n).is_file()]


def _tracked_at(top: Path, commit: str) -> list[str]:
    return _git(top, "ls-tree", "-r", "--name-only", commit, what=f"cannot list {commit}").splitlines()


def _relative(top: Path, path: str) -> str:
    resolved = Path(path).expanduser().resolve()
    try:
        return resolved.relative_to(top.resolve()).as_posix()
    except ValueError:
        raise UserError(f"{path}: not inside the repository {top}") from None


def _candidates(root: Path, names: list[str], wanted: list[str]) -> set[str]:
    """The recipes and sweep files among `names` (those under `wanted`, when given)."""
    inside = [n for n in names if not wanted or any(n == w or n.startswith(w.rstrip("/") + "/") for w in wanted)]
    return {n for n in inside if n.endswith(YAML_SUFFIXES) and _kind(root / n) is not None}


def _kind(path: Path) -> str | None:
    """ "sweep", "recipe" (a top-level `name:` beside `model:` or `extends:`), or None: fragments, CI files."""
    import yaml

    if is_sweep_file(path):
        return "sweep"
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return "recipe" if "name:" in _text(path) else None  # unreadable YAML: the loader will locate the problem
    return "recipe" if isinstance(doc, dict) and "name" in doc and {"model", "extends"} & doc.keys() else None


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


# --- one version of one recipe -----------------------------------------------------------------------


def _version(root: Path, name: str, ref: str | None) -> _Version | None:
    """Resolve `name` in the tree at `root`; values' locations read `REF:path:line` for the base tree."""
    path = root / name
    if not path.is_file():
        return None
    kind = _kind(path) or "recipe"
    version = _Version(root, kind)
    prefix = str(root.resolve()) + "/"
    label = f"{ref}:" if ref else ""
    try:
        if kind == "sweep":
            version.text = _text(path)
            version.sweep = load_sweep(path)
            recipe = version.sweep.base
            version.spec = version.sweep.spec.model_dump(mode="json")
            version.spec_where = {k: _strip(str(v), prefix, label) for k, v in load_file(path).locs.items()}
        else:
            recipe = load_recipe(path)
    except RecipeError as e:
        version.problems = [_strip(str(p), prefix, label) for p in e.problems]
        return version
    version.recipe = recipe
    here = str(Path.cwd().resolve()) + "/"  # paths made from the working directory (a sweep's trial dirs)
    version.resolved = _strip(_strip(recipe.resolved(), prefix, ""), here, "")
    locations = recipe.source.locations if recipe.source else {}
    version.where = {k: _strip(v, prefix, label) for k, v in locations.items()}
    version.files, version.data_files = _read_files(recipe, root)
    return version


def _strip(value: Any, prefix: str, label: str) -> Any:
    """Paths inside the tree written relative to it, so both trees' resolved recipes compare."""
    if isinstance(value, str):
        return value.replace(prefix, label)
    if isinstance(value, dict):
        return {k: _strip(v, prefix, label) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strip(v, prefix, label) for v in value]
    return value


def _read_files(recipe: Recipe, root: Path) -> tuple[dict[str, str], set[str]]:
    """sha256 of every file inside the tree the resolved recipe names (a folder: its files, weights left out)."""
    from finetune.data.sources import files_of

    root = root.resolve()
    files: dict[str, str] = {}
    data: set[str] = set()
    sources = [*recipe.data.train, *(recipe.data.eval if isinstance(recipe.data.eval, list) else [])]
    for source in sources:
        try:
            found = files_of(source) if Path(source.path).is_absolute() else []
        except UserError:
            found = []
        data.update(_inside(Path(f), root) or "" for f in found)
    for value in _strings(recipe.resolved()):
        path = Path(value)
        if path.is_absolute() and _inside(path, root) is not None and path.exists():
            for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
                if f.is_file() and f.suffix not in WEIGHT_SUFFIXES:
                    files[_inside(f, root)] = hashlib.sha256(f.read_bytes()).hexdigest()
    for name in data - {""}:
        files.setdefault(name, hashlib.sha256((root / name).read_bytes()).hexdigest())
    return files, data - {""}


def _inside(path: Path, root: Path) -> str | None:
    try:
        return path.resolve().relative_to(root).as_posix()
    except ValueError:
        return None


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


# --- comparing two versions --------------------------------------------------------------------------


def _review_one(name: str, old: _Version | None, new: _Version | None, gpu: str) -> RecipeReview:
    kind = (new or old).kind  # type: ignore[union-attr]
    status = "added" if old is None else "deleted" if new is None else "changed"
    r = RecipeReview(name, kind, status)
    if new is None:
        return r
    r.problems = new.problems
    if not new.valid:  # nothing resolved to compare: the located errors are the review
        return r
    if old is not None and old.valid:
        r.changes = _changes(old, new)
        r.files = _file_changes(old, new)
    old_recipe = old.recipe if old is not None and old.valid else None
    if kind == "sweep":
        _review_sweep(old.sweep if old_recipe else None, new.sweep, gpu, r)  # type: ignore[union-attr,arg-type]
        if old_recipe is None or any(f.data for f in r.files) or any(c.key.startswith("data") for c in r.changes):
            r.data = _data_figures(old if old_recipe else None, new, r)
            r.notes.append("data: of the sweep's recipe with its fixed values (the first trial's data)")
        return r
    old_plan = _planned(old_recipe, gpu, r, "the base version") if old_recipe else None
    new_plan = _planned(new.recipe, gpu, r, "the new version")
    r.plan = _plan_figures(old_plan, new_plan)
    r.fits = {side: [f.memory_gb for f in p.memory.fits if f.fits] for side, p in (("old", old_plan), ("new", new_plan))
              if p is not None}  # fmt: skip
    if old_recipe is None or any(f.data for f in r.files) or any(c.key.startswith("data") for c in r.changes):
        r.data = _data_figures(old if old_recipe else None, new, r)
    return r


def _changes(old: _Version, new: _Version) -> list[Change]:
    """Resolved keys that differ; a sweep's own keys first (`grid.lora.rank`), then its recipe's, less the keys the
    sweep sets (those differ from trial to trial: the sweep's keys show them)."""
    out = _diff(old.spec, new.spec, old.spec_where, new.spec_where)
    swept = _swept(old.sweep) | _swept(new.sweep)
    changes = _diff(old.resolved, new.resolved, old.where, new.where)
    return out + [c for c in changes if not any(c.key == k or c.key.startswith(k + ".") for k in swept)]


def _diff(old: dict[str, Any], new: dict[str, Any], old_where: dict[KeyPath, str], new_where: dict[KeyPath, str]
          ) -> list[Change]:  # fmt: skip
    a, b = _flatten(old), _flatten(new)
    out = []
    for key in sorted(a.keys() | b.keys(), key=lambda k: [str(p) for p in k]):
        if a.get(key, _MISSING) != b.get(key, _MISSING):
            out.append(Change(dotted(key), _shown(a.get(key, _MISSING)), _shown(b.get(key, _MISSING)),
                              _where(old_where, key), _where(new_where, key)))  # fmt: skip
    return out


def _swept(sweep: Sweep | None) -> set[str]:
    """The recipe keys a sweep sets in its trials: fixed, varied, the seed, each trial's name and directory."""
    if sweep is None:
        return set()
    return {*sweep.spec.fixed, *sweep.keys, "name", "output_dir", *(["seed"] if sweep.spec.seeds else [])}


_MISSING = object()


def _shown(value: Any) -> Any:
    return "(absent)" if value is _MISSING else value


def _where(where: dict[KeyPath, str], key: KeyPath) -> str:
    """Where the value was written; a key no file sets comes from the schema's default."""
    for n in range(len(key), 0, -1):
        if key[:n] in where:
            return where[key[:n]]
    return "default"


def _flatten(data: Any, prefix: KeyPath = ()) -> dict[KeyPath, Any]:
    """Leaves by key path; a list of mappings by item (`data.train[0].limit`), a list of scalars whole."""
    if isinstance(data, dict) and data:
        return {k: v for key, value in data.items() for k, v in _flatten(value, (*prefix, key)).items()}
    if isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        return {k: v for i, value in enumerate(data) for k, v in _flatten(value, (*prefix, i)).items()}
    return {prefix: data}


def _file_changes(old: _Version, new: _Version) -> list[FileChange]:
    names = sorted(old.files.keys() | new.files.keys())
    return [FileChange(n, old.files.get(n), new.files.get(n), n in old.data_files | new.data_files)
            for n in names if old.files.get(n) != new.files.get(n)]  # fmt: skip


def _planned(recipe: Recipe, gpu: str, r: RecipeReview, side: str) -> Any:
    from finetune.plan import plan

    try:
        return plan(recipe, gpu=gpu)
    except UserError as e:
        r.not_computed.append(f"plan of {side}: {'; '.join(str(p) for p in e.problems)}")
    except Exception as e:  # a hub model whose config is not cached, a broken tokenizer: said, never a gap
        r.not_computed.append(f"plan of {side}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}")
    return None


def _plan_figures(old: Any, new: Any) -> list[Figure]:
    def of(p: Any) -> dict[str, tuple[float | None, str]]:
        if p is None:
            return {}
        figures = {"trainable parameters": (p.params.trainable, ""), "total parameters": (p.params.total, "")}
        figures |= {f"memory: {t.name}": (t.bytes, "bytes") for t in p.memory.terms}
        figures["peak memory"] = (p.memory.total, "bytes")
        w = p.work
        figures |= {"steps": (w.total_steps, ""), "tokens per epoch": (w.tokens_per_epoch, ""),
                    "trained tokens per epoch": (w.trained_tokens_per_epoch, "")}  # fmt: skip
        seconds = p.time.total_seconds if p.time else None
        figures["GPU time"] = (None if seconds is None else seconds / 3600, "h")  # on `gpu` at plan's MFU
        return figures

    a, b = of(old), of(new)
    names = list(dict.fromkeys([*b, *a]))
    return [Figure(n, a.get(n, (None, ""))[0], b.get(n, (None, ""))[0], (b.get(n) or a.get(n))[1]) for n in names]


# --- a sweep file: its trials planned ------------------------------------------------------------------


def _review_sweep(old: Sweep | None, new: Sweep, gpu: str, r: RecipeReview) -> None:
    """Each trial planned in both versions, matched by name; the sweep's figures: its largest trial's memory and
    parameters, and every trial's steps and GPU time added up (once per seed)."""
    r.notes.append(_trial_points(new)[1])
    before = _trial_plans(old, gpu, r, "the base version") if old is not None else {}
    after = _trial_plans(new, gpu, r, "the new version")
    for name in dict.fromkeys([*after, *before]):
        values, a = before.get(name, ({}, None))
        values, b = after.get(name, (values, None))
        figures = _plan_figures(a, b)
        status = "added" if name not in before else "removed" if name not in after else \
            "changed" if any(f.old != f.new for f in figures) else "same"  # fmt: skip
        r.trials.append(TrialPlan(name, values, status, figures))
    totals = [_sweep_totals(sweep, plans) for sweep, plans in ((old, before), (new, after))]
    r.plan = [Figure(n, totals[0].get(n, (None, ""))[0], totals[1][n][0], totals[1][n][1]) for n in totals[1]]
    r.fits = {side: sorted(set.intersection(*(set(f.memory_gb for f in p.memory.fits if f.fits) for _, p in plans.values())))
              for side, plans in (("old", before), ("new", after)) if plans and all(p for _, p in plans.values())}  # fmt: skip
    if new.spec.search is not None:
        r.notes.append(f"a search: steps and GPU time are its {new.spec.search.trials} trials at the slowest "
                       "extreme planned (an upper bound); the trials it samples lie between the extremes")  # fmt: skip


def _trial_points(sweep: Sweep) -> tuple[list[dict[str, Any]], str]:
    """The points planned: every grid point, or every combination of a search's choices and range bounds; over
    MAX_TRIAL_PLANS, each key's first and last value with the others at their first."""
    search = sweep.spec.search
    values = sweep.spec.grid if search is None else {k: s.values for k, s in search.space.items()}
    how = "trials: every grid point" if search is None else "trials: the search space's extremes (each choice, " \
          "each range's bounds)"  # fmt: skip
    combos = [dict(zip(values, c, strict=True)) for c in itertools.product(*values.values())]
    if len(combos) > MAX_TRIAL_PLANS:
        first = {k: v[0] for k, v in values.items()}
        combos = list({json.dumps(c, sort_keys=True, default=str): c
                       for c in ({**first, k: x} for k, v in values.items() for x in (v[0], v[-1]))}.values())  # fmt: skip
        how += f"; over {MAX_TRIAL_PLANS} combinations, so each key's first and last value, the others at their first"
    return combos, how


def _trial_plans(sweep: Sweep, gpu: str, r: RecipeReview, side: str) -> dict[str, tuple[dict[str, Any], Any]]:
    """trial name -> (its values, its plan or None), each trial's recipe resolved as `sweep` resolves it."""
    out = {}
    seed = sweep.seeds[0]
    for values in _trial_points(sweep)[0]:
        name = sweep.trial_name(values)
        try:
            recipe = sweep.recipe(values, seed, sweep.run_name(name, seed))
        except RecipeError as e:  # validated by load_sweep: only a file changed under it gets here
            r.not_computed.append(f"plan of trial {name} of {side}: {e.problems[0]}")
            out[name] = (values, None)
            continue
        out[name] = (values, _planned(recipe, gpu, r, f"trial {name} of {side}"))
    return out


def _sweep_totals(sweep: Sweep | None, plans: dict[str, tuple[dict[str, Any], Any]]) -> dict[str, tuple[Any, str]]:
    """The whole sweep's figures; None where a trial could not be planned."""
    if sweep is None:
        return {}
    done = [p for _, p in plans.values()]
    complete = bool(done) and all(p is not None for p in done)
    seeds, search = len(sweep.seeds), sweep.spec.search

    def total(figure: Any) -> float | None:
        each = [figure(p) for p in done] if complete else [None]
        if None in each:
            return None
        return max(each) * search.trials * seeds if search is not None else sum(each) * seeds

    def largest(figure: Any) -> float | None:
        each = [figure(p) for p in done] if complete else [None]
        return None if None in each else max(each)

    def hours(p: Any) -> float | None:
        return None if p.time is None else p.time.total_seconds / 3600

    return {"trials": (sweep.trial_count, ""),
            "trainable parameters": (largest(lambda p: p.params.trainable), ""),
            "peak memory": (largest(lambda p: p.memory.total), "bytes"),
            "steps": (total(lambda p: p.work.total_steps), ""),
            "GPU time": (total(hours), "h")}  # fmt: skip


def _data_figures(old: _Version | None, new: _Version, r: RecipeReview) -> list[Figure]:
    """Rows per source, token-length percentiles, trained tokens and rows cut by max_seq_length, both versions."""
    a = _data_stats(old, r, "the base version") if old is not None else {}
    b = _data_stats(new, r, "the new version")
    names = list(dict.fromkeys([*b, *a]))
    return [Figure(n, a.get(n), b.get(n)) for n in names]


def _data_stats(version: _Version, r: RecipeReview, side: str) -> dict[str, float]:
    from finetune.data.inspect import inspect_data

    try:
        stats = inspect_data(version.recipe, show=0).stats.to_dict()
    except UserError as e:
        r.not_computed.append(f"data of {side}: {'; '.join(str(p) for p in e.problems)}")
        return {}
    except Exception as e:  # a tokenizer that cannot be loaded offline: said, never a gap
        r.not_computed.append(f"data of {side}: {type(e).__name__}: {e}")
        return {}
    root = version.root.resolve()
    out = {f"rows: {_inside(Path(s['path']), root) or s['path']}": s["rows"] for s in stats.get("sources", [])}
    for key in ("train_rows", "eval_rows", "train_tokens", "trained_tokens", "truncated", "dropped",
                "over_max_seq_length"):  # fmt: skip
        if key in stats:
            out[key.replace("_", " ")] = stats[key]
    out |= {f"token length {k}": v for k, v in (stats.get("length_percentiles") or {}).items()}
    return out


# --- Markdown for a pull-request comment -------------------------------------------------------------

SUMMARY_FIGURES = {"trainable parameters": "Trainable parameters", "peak memory": "Peak memory", "steps": "Steps",
                   "GPU time": "GPU time"}  # fmt: skip


def markdown(result: ReviewResult, failures: list[str] = ()) -> str:
    """One summary table of the changed recipes, then one folded section per recipe: a PR comment."""
    n = len(result.recipes)
    lines = [f"## finetune review: {n} recipe{'s' * (n != 1)} changed against `{result.base}` ({result.commit[:10]})",
             ""]  # fmt: skip
    if result.recipes:
        lines += ["| Recipe | Status | Valid | " + " | ".join(SUMMARY_FIGURES.values()) + " | Data |",
                  "|---" * (len(SUMMARY_FIGURES) + 4) + "|"]  # fmt: skip
        for r in result.recipes:
            cells = [_arrow(r.figure(name)) for name in SUMMARY_FIGURES]
            data = "changed" if any(f.data for f in r.files) else "-"
            valid = "-" if r.status == "deleted" else "yes" if r.valid else "**no**"
            lines.append(f"| `{r.path}` | {r.status} | {valid} | " + " | ".join(cells) + f" | {data} |")
        lines.append("")
    lines.append(f"{result.unchanged} recipe{'s' * (result.unchanged != 1)} unchanged.")
    if failures:
        lines += ["", "**Gates failed:**", *(f"- {f}" for f in failures)]
    for r in result.recipes:
        lines += ["", f"<details><summary><code>{r.path}</code>: {r.status}"
                      f"{'' if r.valid else ', invalid'}</summary>", "", *_section(r), "</details>"]  # fmt: skip
    return "\n".join(lines) + "\n"


def _section(r: RecipeReview) -> list[str]:
    out: list[str] = []
    if r.problems:
        out += ["**Errors**", "", *(f"- `{p}`" for p in r.problems), ""]
    if r.changes:
        out += ["**Resolved recipe**", "", "| Key | Old | New | From |", "|---|---|---|---|"]
        out += [f"| `{c.key}` | `{_value(c.old)}` | `{_value(c.new)}` | {_from(c)} |" for c in r.changes]
        out.append("")
    if r.files:
        out += ["**Files read**", "", "| File | Old sha256 | New sha256 |", "|---|---|---|"]
        out += [f"| `{f.path}`{' (data)' * f.data} | {_sha(f.old_sha256)} | {_sha(f.new_sha256)} |" for f in r.files]
        out.append("")
    for title, figures in (("Plan", r.plan), ("Data", r.data)):
        if figures:
            out += [f"**{title}**", "", "| Figure | Old | New | Change |", "|---|---|---|---|"]
            out += [f"| {f.name} | {figure_text(f.old, f.unit)} | {figure_text(f.new, f.unit)} | {change_text(f)} |"
                    for f in figures]  # fmt: skip
            out.append("")
    if r.trials:
        out += ["**Trials**", "", "| Trial | Status | " + " | ".join(SUMMARY_FIGURES.values()) + " |",
                "|---" * (len(SUMMARY_FIGURES) + 2) + "|"]  # fmt: skip
        out += [f"| `{t.name}` | {t.status} | " + " | ".join(_arrow(t.figure(n)) for n in SUMMARY_FIGURES) + " |"
                for t in r.trials]  # fmt: skip
        out.append("")
    if r.notes:
        out += [*(f"- {n}" for n in r.notes), ""]
    if r.fits:
        shown = {side: ", ".join(f"{gb} GB" for gb in sizes) or "none" for side, sizes in r.fits.items()}
        out += ["Fits GPUs of: " + "; ".join(f"{side} {sizes}" for side, sizes in shown.items()), ""]
    if r.not_computed:
        out += ["**Could not compute**", "", *(f"- {n}" for n in r.not_computed), ""]
    return out


def _arrow(f: Figure | None) -> str:
    if f is None or (f.old is None and f.new is None):
        return "-"
    if f.old == f.new:
        return figure_text(f.new, f.unit)
    return f"{figure_text(f.old, f.unit)} → {figure_text(f.new, f.unit)}"


def change_text(f: Figure) -> str:
    if f.delta is None:
        return "-"
    if f.delta == 0:
        return "="
    sign = "+" if f.delta > 0 else "-"
    pct = f" ({f.percent:+.1f}%)" if f.percent is not None else ""
    return f"{sign}{figure_text(abs(f.delta), f.unit)}{pct}"


def figure_text(value: float | None, unit: str) -> str:
    """A figure as people read it: 1.23 GB, 4.5M, 0.12 h."""
    if value is None:
        return "?"
    if unit == "bytes":
        for name, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
            if abs(value) >= scale:
                return f"{value / scale:.3g} {name}"
        return f"{int(value)} B"
    if unit == "h":
        return duration(value * 3600)
    for name, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{name}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _value(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text.replace("|", "\\|").replace("`", "'")


def _from(c: Change) -> str:
    return f"`{c.new_where}`" if c.old_where == c.new_where else f"`{c.old_where}` → `{c.new_where}`"


def _sha(digest: str | None) -> str:
    return f"`{digest[:12]}`" if digest else "(absent)"
