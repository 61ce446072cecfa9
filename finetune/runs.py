"""The run directory: its fixed layout, the manifest that says where an adapter came from,
reading runs back (`finetune runs`) and opening a finished run, its adapter checked (merge, combine, export,
and through `finetune.inference.loaded` eval, chat and serve).

runs/<name>/
  recipe.yaml     the fully resolved recipe
  manifest.json   provenance and status, rewritten atomically as the run goes
  metrics.jsonl   one line per logged step
  adapter/        PEFT adapter + tokenizer and chat template
  eval/           held-out results (summary.json, examples.jsonl; harness.json with eval.harness)
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from finetune.errors import RunDirError, UserError
from finetune.files import _start_ticks, _temporary_dir, atomic_dir, process_alive, write_json_atomic, write_text_atomic
from finetune.recipe.load import is_local, load_recipe
from finetune.recipe.schema import Recipe
from finetune.recipe.yaml_source import dump
from finetune.secrets import redact
from finetune.summary import EvalSummary

CHECKPOINT_PREFIX = "checkpoint"  # transformers' PREFIX_CHECKPOINT_DIR, without importing transformers
PACKAGES = ("finetune", "torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate")


class Result:
    """Base of the stages' results: dataclasses that `--json` prints field by field."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RunDir:
    """Paths of one run directory; the names are the contract in docs/reference/run-directory.md."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    recipe = property(lambda self: self.root / "recipe.yaml")
    manifest = property(lambda self: self.root / "manifest.json")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    adapter = property(lambda self: self.root / "adapter")
    checkpoints = property(lambda self: self.root / "checkpoints")
    eval = property(lambda self: self.root / "eval")

    def refuse_existing(self, overwrite: bool, command: str | None = None) -> None:
        """An existing non-empty run directory is an error unless `overwrite`: nothing is lost silently.

        A run that stopped before its first step (failed, or its process died) holds nothing to lose:
        it may be replaced without `overwrite`. `command` (the train command that was run) makes the
        message name the exact command that continues the run.
        """
        if overwrite or not self.root.exists() or not any(self.root.iterdir()) or self.replaceable():
            return
        manifest = self.read_manifest() or {}
        resumable = command and manifest.get("status") not in (None, "completed")
        hint = f"; the run there is {status(manifest)}: continue it with: {command} --resume" if resumable else ""
        raise RunDirError(
            f"run directory {self.root} already exists; pass --overwrite to replace it "
            f"(or set a new name / output_dir){hint}"
        )

    def read_manifest(self) -> dict[str, Any] | None:
        """manifest.json as data; None when missing or unreadable."""
        try:
            data = json.loads(self.manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def complete_checkpoints(self) -> list[Path]:
        """Checkpoint directories in step order; anything still under .staging is partial by construction."""
        found = [p for p in self.checkpoints.glob(f"{CHECKPOINT_PREFIX}-*") if p.name.split("-")[1].isdigit()]
        complete = (p for p in found if (p / "trainer_state.json").is_file())
        return sorted(complete, key=lambda p: int(p.name.split("-")[1]))

    def steps_logged(self) -> int:
        """The last step metrics.jsonl recorded (0: not one step was finished)."""
        try:
            lines = self.metrics.read_text(encoding="utf-8").splitlines()
        except OSError:
            return 0
        return max((json.loads(line).get("step", 0) for line in lines if line.strip()), default=0)

    def replaceable(self) -> bool:
        """A run that stopped before its first training step: failed, interrupted or died, nothing saved."""
        manifest = self.read_manifest()
        return (
            manifest is not None
            and status(manifest) in ("failed", "interrupted", "died")
            and self.steps_logged() == 0
            and not self.complete_checkpoints()
            and not self.adapter.exists()
        )

    def refuse_resume(self) -> None:
        """Cheap checks before anything heavy is imported: a completed run has nothing to resume, a live one is busy."""
        manifest = self.read_manifest()
        if manifest is None:
            return
        if manifest.get("status") == "completed":
            raise RunDirError(
                f"{self.root} is already completed: nothing to resume; pass --overwrite instead of --resume to "
                "train it again (or set a new name / output_dir)"
            )
        if manifest.get("status") == "running" and process_alive(manifest.get("process")):
            raise RunDirError(
                f"{self.root} is still training (process {manifest['process']['pid']} on this host); "
                "stop it first (it saves a checkpoint on SIGTERM), or let it finish"
            )

    def create(self, overwrite: bool) -> None:
        """Make an empty run directory (replacing an existing one only with `overwrite`)."""
        self.refuse_existing(overwrite)
        if self.root.exists():
            shutil.rmtree(self.root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunDirError(f"cannot create run directory {self.root}: {e.strerror}") from None
        self.check_writable()

    def check_writable(self) -> None:
        """Write and remove a probe file: a read-only, full or foreign directory is refused before any work."""
        try:
            fd, probe = tempfile.mkstemp(dir=self.root, prefix=".probe.")
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise RunDirError(f"run directory {self.root} is not writable: {e.strerror}") from None


def discard(path: Path) -> None:
    """Delete a directory by renaming it aside first, then removing it: a kill leaves it whole or gone (its
    remains hidden in a `.old` that `clean_stale` removes), never a half-deleted directory under its name."""
    trash = _temporary_dir(path, "old")
    os.replace(path, trash / path.name)
    shutil.rmtree(trash, ignore_errors=True)


def write_eval(
    run: RunDir,
    summary: dict[str, Any],
    examples: list[dict[str, Any]],
    harness: dict[str, Any] | None = None,
    out: Path | None = None,
) -> None:
    """eval/summary.json, eval/examples.jsonl and (with `eval.harness`) eval/harness.json, replaced together.

    `out`: another directory for them (an ad-hoc `finetune eval`, which keeps training's record).
    """
    with atomic_dir(out or run.eval) as tmp:
        write_json_atomic(tmp / "summary.json", summary)
        if harness is not None:
            write_json_atomic(tmp / "harness.json", harness)
        lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in examples)
        (tmp / "examples.jsonl").write_text(lines, encoding="utf-8")


def read_summary(run: RunDir) -> EvalSummary | None:
    """The run's held-out summary: eval/summary.json, else the manifest's copy; None where neither holds one."""
    for path, key in ((run.eval / "summary.json", None), (run.manifest, "eval")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        summary = EvalSummary.from_dict(data.get(key) if key else data)
        if summary is not None:
            return summary
    return None


def write_recipe(run: RunDir, recipe: Recipe) -> None:
    text = dump(redact(recipe.resolved()))
    write_text_atomic(run.recipe, f"# Resolved recipe of run {recipe.name!r}: extends and --set applied.\n{text}")


def run_seconds(manifest: dict[str, Any]) -> float | None:
    """How long a run took, from its manifest's start and end; None while running or when unreadable."""
    started, finished = manifest.get("started"), manifest.get("finished")
    try:
        return (datetime.fromisoformat(finished) - datetime.fromisoformat(started)).total_seconds()
    except (TypeError, ValueError):
        return None


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def compute_dtypes(recipe: Recipe) -> dict[str, str]:
    """The dtypes the run computes in on this machine: the model's and, quantized to 4 bits, the matmuls' on the
    quantized weights. Recorded because `auto` resolves per machine (float32 on a CPU, bfloat16 on an Ampere GPU):
    the recipe's text alone does not say it, and `reproduce` compares and pins it."""
    from finetune.machine import resolve_dtype

    def name(dtype: str) -> str:
        return str(resolve_dtype(dtype)).removeprefix("torch.")

    q = recipe.quantization
    dtypes = {"model": name(recipe.model.dtype)}
    if q.method in ("nf4", "fp4"):
        dtypes["compute"] = name(q.compute_dtype if q.compute_dtype != "auto" else recipe.model.dtype)
    return dtypes


def hardware() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "cpu": platform.processor() or platform.machine()}
    info["cpu_count"] = os.cpu_count()
    info["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")  # threads change float sums: `reproduce` checks it
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda"] = torch.version.cuda
    else:
        info["gpus"] = []
    return info


def git_state(directory: Path) -> dict[str, Any] | None:
    """Commit and dirtiness of the git repository holding the recipe, if any."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(directory), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "-C", str(directory), "status", "--porcelain"], capture_output=True, text=True, timeout=10
        )
        return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def process_record() -> dict[str, Any]:
    """Which process writes the run: pid, host and the process's start time, to tell a dead run from a live one."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "start_ticks": _start_ticks(os.getpid())}


def status(manifest: dict[str, Any]) -> str:
    """The manifest's status, except `died` for a `running` run whose process on this host is gone."""
    recorded = manifest.get("status") or "unknown"
    if recorded == "running" and process_alive(manifest.get("process")) is False:
        return "died"
    return recorded


def resume_hint(manifest: dict[str, Any]) -> str:
    """The command that continues a run, as recorded when it started (with the directory it ran from)."""
    command = (manifest.get("command") or {}).get("resume")
    if not command:
        return "finetune train RECIPE --resume, with the recipe and --set options that started it"
    cwd = manifest["command"].get("cwd")
    return command if not cwd or Path(cwd) == Path.cwd() else f"cd {shlex.quote(cwd)} && {command}"


class Manifest:
    """manifest.json, kept in memory and rewritten atomically on every update."""

    def __init__(self, run: RunDir, data: dict[str, Any], enabled: bool = True):
        self.run, self.data, self.enabled = run, data, enabled

    @classmethod
    def disabled(cls, run: RunDir) -> Manifest:
        """For the non-main processes of a distributed run: updates are kept in memory, never written."""
        return cls(run, {}, enabled=False)

    @classmethod
    def start(cls, run: RunDir, recipe: Recipe) -> Manifest:
        experiment_repo = recipe.source.path.resolve().parent if recipe.source else Path.cwd()
        data = {
            "name": recipe.name,
            "status": "running",
            "started": now(),
            "finished": None,
            "recipe_sha256": recipe.fingerprint(),
            "seed": recipe.seed,
            "base_model": {"id": recipe.model.base, "revision": recipe.model.revision},
            "packages": package_versions(),
            "python": platform.python_version(),
            "hardware": hardware(),
            "dtype": compute_dtypes(recipe),
            "git": git_state(experiment_repo),
            "process": process_record(),
        }
        manifest = cls(run, data)
        manifest.save()
        return manifest

    @classmethod
    def load(cls, run: RunDir) -> Manifest:
        return cls(run, json.loads(run.manifest.read_text(encoding="utf-8")))

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        self.save()

    def save(self) -> None:
        if self.enabled:
            write_json_atomic(self.run.manifest, redact(self.data))


# --- reading runs back: `finetune runs list | show | compare` --------------------------------


@dataclass
class RunRow(Result):
    """One row about a run (`finetune runs list`): what it trained, how it went, its held-out figures."""

    run: str
    name: str | None
    status: str
    base: str | None
    rank: int | None
    best_eval_loss: float | None
    metric: tuple[str, float] | None  # the first metric of the tuned model's held-out figures
    seconds: float | None
    started: str | None


def run_summary(root: Path) -> RunRow:
    """The row of one run directory, from its manifest and resolved recipe."""
    import yaml

    manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    recipe = (
        yaml.safe_load((root / "recipe.yaml").read_text(encoding="utf-8")) if (root / "recipe.yaml").exists() else {}
    )
    summary = EvalSummary.from_dict(manifest.get("eval"))
    metrics = summary.tuned.metrics if summary else {}
    return RunRow(
        run=str(root),
        name=manifest.get("name"),
        status=status(manifest),
        base=(manifest.get("base_model") or {}).get("id"),
        rank=(recipe.get("lora") or {}).get("rank"),
        best_eval_loss=manifest.get("best_eval_loss"),
        metric=next(iter(metrics.items()), None),
        seconds=run_seconds(manifest),
        started=manifest.get("started"),
    )


def list_runs(directory: Path) -> list[RunRow]:
    """Every run (a folder with manifest.json) directly under `directory`, newest first."""
    if not directory.is_dir():
        raise RunDirError(f"{directory}: no such directory")
    rows = [run_summary(p) for p in sorted(directory.iterdir()) if (p / "manifest.json").is_file()]
    return sorted(rows, key=lambda r: r.started or "", reverse=True)


def show_run(target: Path) -> dict[str, Any]:
    """The manifest, with `status` as it is now: a dead process's run is `died`, with the command to continue it."""
    root = resolve_run(target)
    if not (root / "manifest.json").is_file():
        raise RunDirError(f"{root}: not a run directory (no manifest.json)")
    manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    if status(manifest) == "died":
        process = manifest["process"]
        manifest["status"] = "died"
        manifest["status_detail"] = (
            f"the manifest says running, but its process {process['pid']} on {process['host']} is gone; "
            f"continue it with: {resume_hint(manifest)}"
        )
    return manifest


@dataclass
class RunComparison(Result):
    """`finetune runs compare`: the recipe keys that differ, and every run's held-out figures with deltas."""

    runs: list[str]
    recipe_differences: dict[str, list[Any]]  # dotted key -> each run's value
    figures: list[dict[str, float]]  # per run: figure -> value
    deltas: list[dict[str, float]]  # per run: figure -> value minus the first run's (where the first has it)
    # per run: figure (`exact_match`, `exact_match[short]`) -> the paired interval of its delta to the first run,
    # over the held-out prompts both answered (eval/examples.jsonl): delta, low, high, n, wins, losses, ties, sign_p
    intervals: list[dict[str, dict[str, Any]]] = field(default_factory=list)
    slice_rows: dict[str, int] = field(default_factory=dict)  # the first run's held-out rows per slice

    def figure_names(self) -> list[str]:
        """Every figure any run has, in the order they first appear: a DPO run's preference accuracy and a GRPO
        run's reward too, not only the first run's."""
        return list(dict.fromkeys(name for figures in self.figures for name in figures))


def compare_runs(roots: list[Path]) -> RunComparison:
    """Recipe keys that differ between runs, and each run's held-out figures with deltas to the first."""
    import yaml

    recipes = []
    roots = [resolve_run(root) for root in roots]
    for root in roots:
        show_run(root)
        recipes.append(yaml.safe_load((root / "recipe.yaml").read_text(encoding="utf-8")))
    differing = recipe_differences(recipes)
    figures = [_figures(show_run(root)) for root in roots]
    deltas = [{k: v - figures[0][k] for k, v in f.items() if k in figures[0]} for f in figures]
    examples = [_examples(root) for root in roots]
    intervals = [paired_runs(examples[0], other) for other in examples]
    slice_rows: dict[str, int] = {}
    for row in examples[0]:
        if row.get("slice") is not None:
            slice_rows[row["slice"]] = slice_rows.get(row["slice"], 0) + 1
    return RunComparison(
        [str(r) for r in roots], differing, figures, deltas, intervals, dict(sorted(slice_rows.items()))
    )


def _examples(root: Path) -> list[dict[str, Any]]:
    """The run's eval/examples.jsonl rows (none if it has none, or it cannot be read)."""
    try:
        text = (RunDir(root).eval / "examples.jsonl").read_text(encoding="utf-8")
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def paired_runs(first: list[dict[str, Any]], other: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The tuned answers' per-example scores of `other` against `first` on the prompts both answered (matched by
    prompt and reference), per metric overall and per slice of the first run's rows: `exact_match[short]`."""
    from finetune.uncertainty import paired

    theirs = {(row["prompt"], row["reference"]): row for row in other}
    pairs = [(row, theirs[key]) for row in first if (key := (row["prompt"], row["reference"])) in theirs]
    groups: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {"": pairs}
    for a, b in pairs:
        if a.get("slice") is not None:
            groups.setdefault(f"[{a['slice']}]", []).append((a, b))
    out = {}
    for metric in (pairs[0][0].get("tuned_scores") or {}) if pairs else {}:
        for suffix, rows in groups.items():
            scored = [(b["tuned_scores"][metric], a["tuned_scores"][metric]) for a, b in rows
                      if metric in (b.get("tuned_scores") or {})]  # fmt: skip
            if scored:
                out[f"{metric}{suffix}"] = paired([x for x, _ in scored], [y for _, y in scored]).to_dict()
    for suffix, rows in groups.items():
        if (loss := _paired_loss(rows)) is not None:
            out[f"loss{suffix}"] = loss
    return out


def _paired_loss(rows: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any] | None:
    """The tuned loss of the second run against the first on the rows both scored (`tuned_loss`, the same
    `loss_tokens`): token-weighted, as the loss is, and a win is a row where the second run's loss is lower."""
    from finetune.uncertainty import paired

    both = [(b["tuned_loss"], a["tuned_loss"], a["loss_tokens"]) for a, b in rows
            if "tuned_loss" in a and "tuned_loss" in b and a.get("loss_tokens") == b.get("loss_tokens")]  # fmt: skip
    if not both:
        return None
    interval = paired([x for x, _, _ in both], [y for _, y, _ in both], weights=[w for _, _, w in both]).to_dict()
    return interval | {"wins": interval["losses"], "losses": interval["wins"]}


def recipe_differences(recipes: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Dotted key -> each recipe's value, for the keys whose values differ (a missing key reads as null)."""
    flat = [_flatten(r) for r in recipes]
    keys = sorted({k for f in flat for k in f})
    return {k: [f.get(k) for f in flat] for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1}


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): data}


def _figures(manifest: dict[str, Any]) -> dict[str, float]:
    """The tuned figures, each slice's (`exact_match[short]`) and the tuned answers' mean cost (`tokens.mean`)."""
    summary = EvalSummary.from_dict(manifest.get("eval"))
    out = {row.metric: row.tuned for row in summary.rows()} if summary else {}
    for name, part in summary.slices.items() if summary else ():
        out |= {f"{row.metric}[{name}]": row.tuned for row in part.rows()}
    for figure, spread in (summary.cost.get("tuned") or {}).items() if summary else ():
        out[f"{figure}.mean"] = spread["mean"]
    if manifest.get("train_loss") is not None:
        out["train_loss"] = manifest["train_loss"]
    return out


# --- opening a finished run: `finetune merge`, `export`, `eval`, `chat`, `serve` -------------------------


def resolve_run(target: str | Path) -> Path:
    """The run directory a command was given: the directory itself, or the recipe that made it (its output_dir).

    One rule for every command that reads a finished run (eval, chat, serve, merge, export, runs): a
    recipe only names its run here, so its own files (data, metric modules) need not exist any more;
    what the run itself needs, such as its held-out data for `eval`, is read from the run's resolved
    recipe by the command that needs it, and reported there.
    """
    path = Path(target).expanduser()
    if path.is_file():
        run = Path(load_recipe(path, check_files=False).run_dir).expanduser()
        if not run.is_dir():
            raise UserError(f"{target}: the recipe's run directory {run} does not exist; train it first")
        return run
    if not path.exists():
        raise UserError(f"{target}: no such run directory or recipe")
    return path


@dataclass
class Run:
    """A run directory opened for merging or export: its recipe, manifest and checked adapter."""

    root: Path
    recipe: Recipe
    manifest: dict[str, Any]
    adapter_config: dict[str, Any]
    tensors: dict[str, list[int]]  # adapter tensor name -> shape
    notes: list[str] = field(default_factory=list)

    @property
    def dirs(self) -> RunDir:
        return RunDir(self.root)

    @property
    def adapter(self) -> Path:
        return self.dirs.adapter

    @property
    def quantized(self) -> bool:
        return self.recipe.quantization.method != "none"

    @property
    def variant(self) -> str:
        if self.adapter_config.get("use_dora"):
            return "dora"
        return "rslora" if self.adapter_config.get("use_rslora") else "lora"


def open_run(run_dir: str | Path) -> Run:
    """Read a run's (a run directory, or its recipe) resolved recipe, manifest and adapter; refuse what cannot be
    used: a run still training, one whose process died, a missing or broken adapter, a missing base model."""
    root = resolve_run(run_dir).resolve()
    run = RunDir(root)
    if not run.recipe.is_file():
        raise UserError(f"{run_dir}: not a run directory (no recipe.yaml); give the directory `finetune train` wrote")
    recipe = load_recipe(run.recipe, check_files=False)
    manifest: dict[str, Any] = {}
    notes: list[str] = []
    if run.manifest.is_file():
        try:
            manifest = json.loads(run.manifest.read_text(encoding="utf-8"))
        except ValueError as e:
            raise UserError(f"{run.manifest}: unreadable manifest ({e})") from None
    state = status(manifest) if manifest else None
    if state == "died":
        raise UserError(
            f"{run_dir}: its training process died before the run finished; continue it with: {resume_hint(manifest)}"
        )
    if state == "running":
        raise UserError(
            f"{run_dir}: the manifest says 'running': the run is still training (or its process on another host "
            f"was killed; then continue it with: {resume_hint(manifest)}); its adapter may still change"
        )
    if state not in (None, "completed"):
        notes.append(f"the run's manifest says {state!r}, not 'completed'; its saved adapter is used as it is")
    if manifest.get("parent"):  # a DPO/KTO/GRPO run continued its parent's adapter: one adapter holds both updates
        stage = recipe.train.method.upper()
        notes.append(
            f"this run continued {manifest['parent']['name']} ({manifest['parent']['path']}): its adapter started as "
            f"that run's and holds both updates ({manifest['parent']['name']} + {stage} in one adapter)"
        )
    config, tensors = check_adapter(run.adapter)
    base = recipe.model.base
    if is_local(base) and not Path(base).exists():
        raise UserError(f"{run.recipe}: model.base {base} does not exist (the base model this adapter was trained on)")
    return Run(root, recipe, manifest, config, tensors, notes)


def check_adapter(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """The adapter's config and tensor shapes; a missing, empty, truncated or unreadable file is a UserError."""
    config_path = adapter_dir / "adapter_config.json"
    weights = adapter_dir / "adapter_model.safetensors"
    if not adapter_dir.is_dir():
        raise UserError(f"{adapter_dir}: no adapter directory (did training finish?)")
    if not config_path.is_file():
        raise UserError(f"{config_path}: missing adapter config")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{config_path}: unreadable adapter config ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise UserError(f"{config_path}: not a LoRA adapter (peft_type {kind!r}); only LoRA adapters are supported")
    if not weights.is_file():
        extra = (
            " (adapter_model.bin is there: only safetensors adapters are read)"
            if (adapter_dir / "adapter_model.bin").exists()
            else ""
        )
        raise UserError(f"{weights}: missing adapter weights{extra}")
    tensors = _safetensors_shapes(weights)
    if not tensors:
        raise UserError(f"{weights}: the adapter holds no tensors")
    if not any(".lora_A." in name or ".lora_embedding_A" in name for name in tensors):
        raise UserError(f"{weights}: no LoRA tensors (lora_A/lora_B) in the adapter")
    return config, tensors


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors header, checking that the file holds every byte the header promises."""
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(fh.read(length))
            if not isinstance(header, dict):
                raise ValueError("the header is not a mapping of tensors")
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:  # validates offsets, dtypes and coverage
            names = list(f.keys())
    except Exception as e:  # struct.error, ValueError, SafetensorError: all mean an unusable file
        raise UserError(f"{path}: unreadable or truncated safetensors file ({e})") from None
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end != size:
        raise UserError(f"{path}: truncated safetensors file ({size} bytes, the header describes {8 + length + end})")
    return {name: list(header[name]["shape"]) for name in names}


def claim_output(target: Path, overwrite: bool, run: Run | None = None) -> None:
    """Refuse an existing output directory unless `overwrite`, and outputs that would clobber a run's own files."""
    if run is not None and (
        target == run.root or run.root.is_relative_to(target) or target.is_relative_to(run.adapter)
    ):
        raise UserError(f"--out {target}: would overwrite the run itself; choose a directory outside {run.adapter}")
    if target.exists() and not target.is_dir():
        raise RunDirError(f"{target} exists and is not a directory")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise RunDirError(f"{target} already exists; pass --overwrite to replace it (or choose another --out)")
