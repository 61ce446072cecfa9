"""`finetune reproduce`: use a run's manifest to get its adapter again, and prove it.

The manifest records what went into a run: the resolved recipe and the recipe file it came from, each
data file's hash and rows, the base model's id, revision, weights and tokenizer, package versions,
the experiment repo's commit, seed, hardware and the dtypes it computed in. `check` compares each of these with what is here now
without training. `reproduce` retrains the recorded recipe into a new run directory and compares the
result with the original: adapter tensors (bit-identical, or the largest difference per tensor), the
loss curve step by step (the first step where it diverges), and the held-out figures.

The dtype is an input of its own: `model.dtype: auto` is float32 on a CPU and bfloat16 on an Ampere GPU, so
the recipe's text does not say what the run computed in. The manifest records the resolved dtypes; `check`
compares them, and `reproduce` pins an `auto` dtype to the recorded one (`--set model.dtype=...`), so a
reproduction computes in the original's dtype where this machine can, and says that it pinned it.
"""

from __future__ import annotations

import json
import shlex
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.errors import RunDirError, UserError
from finetune.files import file_sha256, write_json_atomic
from finetune.lineage import parent_record
from finetune.recipe.load import load_recipe
from finetune.recipe.schema import Recipe
from finetune.runs import Manifest, Result, RunDir, compute_dtypes, git_state, hardware, package_versions

NOT_RECORDED = "(not recorded)"
HARDWARE_KEYS = ("cpu", "cpu_count", "gpus", "omp_num_threads")  # what makes floating-point sums come out the same


@dataclass
class InputCheck:
    """One recorded input beside its value now."""

    name: str
    recorded: Any
    now: Any

    @property
    def matches(self) -> bool:
        return self.recorded == NOT_RECORDED or self.recorded == self.now


@dataclass
class ReproduceCheck(Result):
    run: str
    inputs: list[InputCheck]

    @property
    def differing(self) -> list[InputCheck]:
        return [i for i in self.inputs if not i.matches]

    @property
    def matches(self) -> bool:
        return not self.differing

    def to_dict(self) -> dict[str, Any]:
        rows = [{"name": i.name, "recorded": i.recorded, "now": i.now, "matches": i.matches} for i in self.inputs]
        return {"run": self.run, "matches": self.matches, "inputs": rows}


@dataclass
class TensorDiff:
    name: str
    identical: bool
    max_abs_diff: float | None  # None: the tensor is missing from one adapter, or the shapes differ


@dataclass
class LossStep:
    step: int
    original: float | None
    reproduced: float | None

    @property
    def difference(self) -> float | None:
        return None if self.original is None or self.reproduced is None else abs(self.reproduced - self.original)


@dataclass
class HeldOut:
    name: str
    original: float | None
    reproduced: float | None


@dataclass
class ReproduceResult(Result):
    run: str
    out: str
    tolerance: float
    check: ReproduceCheck
    tensors: list[TensorDiff]
    steps_compared: int
    first_divergence: LossStep | None  # the first logged step whose loss differs by more than the tolerance
    held_out: list[HeldOut]
    seconds: float
    parents: list[ReproduceResult] = field(default_factory=list)  # with --with-parents, the parent's first
    pinned: list[str] = field(default_factory=list)  # `--set` options the reproduction added: the recorded dtypes

    @property
    def identical(self) -> bool:
        return bool(self.tensors) and all(t.identical for t in self.tensors)

    @property
    def max_abs_diff(self) -> float | None:
        diffs = [t.max_abs_diff for t in self.tensors]
        return None if not diffs or None in diffs else max(diffs)  # type: ignore[type-var]

    @property
    def ok(self) -> bool:
        """Identical, or every tensor and every logged loss within the tolerance (and the parents so)."""
        within = self.max_abs_diff is not None and self.max_abs_diff <= self.tolerance and not self.first_divergence
        return (self.identical or within) and all(p.ok for p in self.parents)

    def to_dict(self) -> dict[str, Any]:
        divergence = self.first_divergence
        return {
            "run": self.run,
            "out": self.out,
            "ok": self.ok,
            "identical": self.identical,
            "max_abs_diff": self.max_abs_diff,
            "tolerance": self.tolerance,
            "inputs": self.check.to_dict(),
            "tensors": [t.__dict__ for t in self.tensors],
            "steps_compared": self.steps_compared,
            "first_divergence": None
            if divergence is None
            else {**divergence.__dict__, "difference": divergence.difference},
            "held_out": [h.__dict__ for h in self.held_out],
            "seconds": self.seconds,
            "parents": [p.to_dict() for p in self.parents],
            "pinned": self.pinned,
        }


# --- check: the recorded inputs against what is here now ---------------------------------------------


def check(run: str | Path) -> ReproduceCheck:
    """Every input the manifest recorded beside its value now; trains nothing, loads no weights."""
    rd, manifest = _open(run)
    recipe = _recorded_recipe(rd)
    inputs = [InputCheck("recipe (run's recipe.yaml)", manifest.get("recipe_sha256"), recipe.fingerprint())]
    inputs += _repo_inputs(manifest)
    inputs += _data_inputs(recipe, manifest)
    inputs += _model_inputs(recipe, manifest)
    recorded_packages = manifest.get("packages") or {}
    inputs += [InputCheck(f"package {name}", recorded_packages.get(name, NOT_RECORDED), version)
               for name, version in package_versions().items()]  # fmt: skip
    inputs.append(InputCheck("python", manifest.get("python", NOT_RECORDED), _python()))
    recorded_hw, now_hw = manifest.get("hardware") or {}, hardware()
    inputs += [InputCheck(f"hardware {key}", recorded_hw.get(key, NOT_RECORDED), now_hw.get(key))
               for key in HARDWARE_KEYS]  # fmt: skip
    return ReproduceCheck(str(rd.root), inputs)


def _open(run: str | Path) -> tuple[RunDir, dict[str, Any]]:
    rd = RunDir(run)
    manifest = rd.read_manifest()
    if manifest is None:
        raise RunDirError(f"{run}: not a run directory (no readable manifest.json)")
    if not rd.recipe.is_file():
        raise RunDirError(f"{run}: no recipe.yaml (the resolved recipe a run writes first)")
    return rd, manifest


def _recorded_recipe(rd: RunDir, overrides: tuple[str, ...] = ()) -> Recipe:
    """The run's resolved recipe, loaded as `train` would; its data files may be gone (check reports them)."""
    return load_recipe(rd.recipe, overrides, check_files=False)


def _repo_inputs(manifest: dict[str, Any]) -> list[InputCheck]:
    """The recipe file the run was started from (with its --set options) and the experiment repo's git state."""
    from finetune.lineage import continue_parent

    command = (manifest.get("command") or {}).get("resume")
    if not command:
        return [InputCheck("recipe file in the repo", NOT_RECORDED, None)]
    words = shlex.split(command)
    cwd = Path(manifest["command"].get("cwd") or ".")
    path = cwd / words[2]
    sets = tuple(words[i + 1] for i, w in enumerate(words) if w in ("--set", "-s") and i + 1 < len(words))
    sets += tuple(w.split("=", 1)[1] for w in words if w.startswith("--set="))
    try:  # continued from its parent, as train fingerprinted it (a DPO run's base, LoRA and template are the parent's)
        now = continue_parent(load_recipe(path, sets, check_files=False)).fingerprint() if path.is_file() \
            else f"missing: {path}"  # fmt: skip
    except UserError as e:  # an invalid recipe, a parent run gone
        now = f"invalid: {e.problems[0]}"
    rows = [InputCheck(f"recipe file {words[2]} (sha256 of its resolved content)", manifest.get("recipe_sha256"), now)]
    recorded = manifest.get("git")
    state = git_state(path.resolve().parent) if path.is_file() else None
    rows.append(InputCheck("git commit", (recorded or {}).get("commit"), (state or {}).get("commit")))
    rows.append(InputCheck("git dirty", (recorded or {}).get("dirty"), (state or {}).get("dirty")))
    return rows


def _data_inputs(recipe: Recipe, manifest: dict[str, Any]) -> list[InputCheck]:
    """Each data file's sha256 and rows, read by the same code that recorded them."""
    from finetune.data.prepare import DataStats, load_samples

    recorded = {(s["path"], s.get("format")): s for s in (manifest.get("data") or {}).get("sources", [])}
    sources = [*recipe.data.train, *(recipe.data.eval if isinstance(recipe.data.eval, list) else [])]
    rows = []
    for source in sources:
        before = recorded.get((source.path, source.format)) or recorded.get((source.path, None))
        stats = DataStats()
        try:
            load_samples([source], "skip", stats)
            now: Any = {"sha256": stats.sources[0].sha256, "rows": stats.sources[0].rows}
        except UserError as e:
            now = f"unreadable: {e.problems[0]}"
        shown = NOT_RECORDED if before is None else {"sha256": before.get("sha256"), "rows": before.get("rows")}
        rows.append(InputCheck(f"data {source.path}", shown, now))
    return rows


def _model_inputs(recipe: Recipe, manifest: dict[str, Any]) -> list[InputCheck]:
    """The base model (id, revision, weights), the tokenizer and chat template as the run saved them, the parent."""
    from finetune.lineage import continue_parent

    base = manifest.get("base_model") or {}
    recipe = continue_parent(recipe)
    rows = [
        InputCheck("base model id", base.get("id", NOT_RECORDED), recipe.model.base),
        InputCheck("base model revision", base.get("revision", NOT_RECORDED), recipe.model.revision),
        InputCheck("base model weights (sha256)", base.get("weights_sha256", NOT_RECORDED), _weights(recipe)),
    ]
    rows.append(InputCheck("dtype (model, 4-bit compute)", manifest.get("dtype", NOT_RECORDED), compute_dtypes(recipe)))
    tokenizer, template = _tokenizer_hashes(recipe)
    rows.append(InputCheck("tokenizer (sha256)", manifest.get("tokenizer_sha256", NOT_RECORDED), tokenizer))
    rows.append(InputCheck("chat template (sha256)", manifest.get("chat_template_sha256", NOT_RECORDED), template))
    if manifest.get("parent"):
        now = parent_record(recipe)
        rows.append(InputCheck("parent run manifest (sha256)", manifest["parent"].get("manifest_sha256"),
                               (now or {}).get("manifest_sha256")))  # fmt: skip
    return rows


class _NoModel:
    """`weight_files` asks a loaded model for its hub commit; check loads none (the snapshot gives it)."""

    config = None


def _weights(recipe: Recipe) -> Any:
    from finetune.modeling import weight_files

    return weight_files(recipe, _NoModel())["weights_sha256"]  # type: ignore[arg-type]


def _tokenizer_hashes(recipe: Recipe) -> tuple[str | None, str | None]:
    """The tokenizer saved the way train saves it beside the adapter, hashed the way the manifest hashed it."""
    from finetune.data.templates import recipe_template
    from finetune.modeling import load_tokenizer, quiet_libraries

    quiet_libraries()
    try:
        tokenizer = load_tokenizer(recipe)
        recipe_template(recipe, tokenizer)
    except Exception as e:  # an offline hub id: reported as the value now, not a crash
        return f"unavailable: {type(e).__name__}", f"unavailable: {type(e).__name__}"
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return file_sha256(Path(tmp) / "tokenizer.json"), file_sha256(Path(tmp) / "chat_template.jinja")


def _python() -> str:
    import platform

    return platform.python_version()


# --- reproduce: retrain and compare ------------------------------------------------------------------


def reproduce(
    run: str | Path,
    out: str | Path | None = None,
    tolerance: float = 0.0,
    with_parents: bool = False,
    progress: bool = False,
) -> ReproduceResult:
    """Retrain the run's recorded recipe and seed into `out` (default RUN-reproduced) and compare the results."""
    from finetune.train import train

    if tolerance < 0:
        raise UserError(f"--tolerance must be >= 0, got {tolerance}")
    rd, manifest = _open(run)
    if manifest.get("status") != "completed":
        raise RunDirError(f"{run}: the run is {manifest.get('status')}, not completed: nothing to reproduce")
    target = Path(out) if out is not None else rd.root.with_name(rd.root.name + "-reproduced")
    if target.resolve() == rd.root.resolve():
        raise UserError("--out is the run itself: give another directory")
    started = time.perf_counter()
    inputs = check(rd.root)
    overrides = [f"output_dir={target.resolve()}"]
    parents = []
    if with_parents and manifest.get("parent"):
        parent_dir = Path(manifest["parent"]["path"])
        parents.append(reproduce(parent_dir, target.with_name(target.name + "-parent"), tolerance, True, progress))
        overrides += _onto_parent(_recorded_recipe(rd), parent_dir, Path(parents[0].out).resolve())
    pinned = pinned_dtypes(_recorded_recipe(rd), manifest.get("dtype"))
    recipe = _recorded_recipe(rd, (*overrides, *pinned))
    train(recipe, progress=progress)
    new = RunDir(target)
    record = {"run": str(rd.root.resolve()), "manifest_sha256": file_sha256(rd.manifest)}
    Manifest.load(new).update(reproduces=record)
    result = ReproduceResult(
        run=str(rd.root),
        out=str(target),
        tolerance=tolerance,
        check=inputs,
        tensors=compare_adapters(rd.adapter, new.adapter),
        steps_compared=0,
        first_divergence=None,
        held_out=_held_out(manifest, new.read_manifest() or {}),
        seconds=0.0,
        parents=parents,
        pinned=pinned,
    )
    result.steps_compared, result.first_divergence = compare_losses(rd.metrics, new.metrics, tolerance)
    result.seconds = time.perf_counter() - started
    write_json_atomic(new.root / "reproduction.json", result.to_dict())
    return result


def _onto_parent(recipe: Recipe, recorded: Path, rebuilt: Path) -> list[str]:
    """`--set` options that continue the rebuilt parent: its directory, and its saved chat template where the
    resolved recipe names the recorded parent's (the parent's template is the one a continued run must use)."""
    sets = [f"model.from_run={rebuilt}"]
    if recipe.data.chat_template == str((recorded / "adapter" / "chat_template.jinja").resolve()):
        sets.append(f"data.chat_template={rebuilt / 'adapter' / 'chat_template.jinja'}")
    return sets


def pinned_dtypes(recipe: Recipe, recorded: dict[str, str] | None) -> list[str]:
    """`--set` options that make the recipe's `auto` dtypes the ones the run recorded, where they would resolve
    to others here (a GPU run reproduced on a CPU); a dtype the recipe names resolves the same everywhere."""
    if not recorded:
        return []
    now = compute_dtypes(recipe)
    keys = {"model": ("model.dtype", recipe.model.dtype), "compute": ("quantization.compute_dtype",
            recipe.quantization.compute_dtype)}  # fmt: skip
    return [f"{key}={recorded[side]}" for side, (key, value) in keys.items()
            if value == "auto" and side in recorded and side in now and recorded[side] != now[side]]  # fmt: skip


def compare_adapters(original: Path, reproduced: Path) -> list[TensorDiff]:
    """Every adapter tensor: bit-identical, else the largest absolute difference."""
    from safetensors.torch import load_file

    name = "adapter_model.safetensors"
    a, b = load_file(str(original / name)), load_file(str(reproduced / name))
    out = []
    for key in sorted(a.keys() | b.keys()):
        x, y = a.get(key), b.get(key)
        if x is None or y is None or x.shape != y.shape:
            out.append(TensorDiff(key, False, None))
            continue
        same = bool((x == y).all()) and x.dtype == y.dtype
        out.append(TensorDiff(key, same, float((x.double() - y.double()).abs().max()) if x.numel() else 0.0))
    return out


def compare_losses(original: Path, reproduced: Path, tolerance: float) -> tuple[int, LossStep | None]:
    """(steps compared, the first logged step whose training loss differs by more than `tolerance`)."""
    a, b = _losses(original), _losses(reproduced)
    for step in sorted(a.keys() | b.keys()):
        x, y = a.get(step), b.get(step)
        if x is None or y is None or abs(x - y) > tolerance:
            return len(a.keys() & b.keys()), LossStep(step, x, y)
    return len(a), None


def _losses(metrics: Path) -> dict[int, float]:
    try:
        lines = metrics.read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    rows = [json.loads(line) for line in lines if line.strip()]
    return {int(r["step"]): float(r["loss"]) for r in rows if "loss" in r and "step" in r}


def _held_out(original: dict[str, Any], reproduced: dict[str, Any]) -> list[HeldOut]:
    """The tuned adapter's held-out loss and metrics of both runs (the base's are not the adapter's)."""

    def figures(manifest: dict[str, Any]) -> dict[str, float]:
        tuned = (manifest.get("eval") or {}).get("tuned") or {}
        return {**{k: tuned[k] for k in ("loss", "perplexity") if tuned.get(k) is not None},
                **(tuned.get("metrics") or {})}  # fmt: skip

    a, b = figures(original), figures(reproduced)
    return [HeldOut(name, a.get(name), b.get(name)) for name in dict.fromkeys([*a, *b])]
