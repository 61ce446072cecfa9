"""The run directory: its fixed layout, atomic writes, and the manifest that says where an adapter came from.

runs/<name>/
  recipe.yaml     the fully resolved recipe
  manifest.json   provenance and status, rewritten atomically as the run goes
  metrics.jsonl   one line per logged step
  adapter/        PEFT adapter + tokenizer and chat template
  eval/           held-out results (summary.json, examples.jsonl; harness.json with eval.harness)
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from finetune.errors import RunDirError
from finetune.recipe import Recipe
from finetune.secrets import redact
from finetune.yaml_source import dump

CHECKPOINT_PREFIX = "checkpoint"  # transformers' PREFIX_CHECKPOINT_DIR, without importing transformers
PACKAGES = ("finetune", "torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate")


class RunDir:
    """Paths of one run directory; the names are the contract in the README."""

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
        if not os.access(self.root, os.W_OK):
            raise RunDirError(f"run directory {self.root} is not writable")


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temporary file in the same directory, fsync, rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


@contextmanager
def atomic_dir(final: Path):
    """Yield a temporary directory beside `final`, renamed to `final` only when the block completes."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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


def write_recipe(run: RunDir, recipe: Recipe) -> None:
    text = dump(redact(recipe.resolved()))
    write_text_atomic(run.recipe, f"# Resolved recipe of run {recipe.name!r}: extends and --set applied.\n{text}")


def file_sha256(path: Path) -> str | None:
    """sha256 of a file's bytes, or None when it does not exist."""
    if not path.exists():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def hardware() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "cpu": platform.processor() or platform.machine()}
    info["cpu_count"] = os.cpu_count()
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


def _start_ticks(pid: int) -> int | None:
    """When a process started (clock ticks since boot, Linux), so that a reused pid is not taken for our process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def process_alive(record: dict[str, Any] | None) -> bool | None:
    """True/False for a process recorded on this host; None when it ran elsewhere (or was never recorded)."""
    if not record or record.get("host") != socket.gethostname():
        return None
    pid = record.get("pid")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, under another user
    except (OSError, TypeError):
        return None
    ticks = _start_ticks(pid)
    return record.get("start_ticks") is None or ticks is None or ticks == record["start_ticks"]


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
    def start(cls, run: RunDir, recipe: Recipe, recipe_dir: Path | None = None) -> Manifest:
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
            "git": git_state(recipe_dir or Path.cwd()),
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


def run_summary(root: Path) -> dict[str, Any]:
    """One row about a run: what it trained, how it went, its held-out figures."""
    import yaml

    manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    recipe = (
        yaml.safe_load((root / "recipe.yaml").read_text(encoding="utf-8")) if (root / "recipe.yaml").exists() else {}
    )
    tuned = (manifest.get("eval") or {}).get("tuned") or {}
    metrics = tuned.get("metrics") or {}
    started, finished = manifest.get("started"), manifest.get("finished")
    seconds = (
        (datetime.fromisoformat(finished) - datetime.fromisoformat(started)).total_seconds()
        if started and finished
        else None
    )
    return {
        "run": str(root),
        "name": manifest.get("name"),
        "status": status(manifest),
        "base": (manifest.get("base_model") or {}).get("id"),
        "rank": (recipe.get("lora") or {}).get("rank"),
        "best_eval_loss": manifest.get("best_eval_loss"),
        "metric": next(iter(metrics.items()), None),
        "seconds": seconds,
        "started": started,
    }


def list_runs(directory: Path) -> list[dict[str, Any]]:
    """Every run (a folder with manifest.json) directly under `directory`, newest first."""
    if not directory.is_dir():
        raise RunDirError(f"{directory}: no such directory")
    rows = [run_summary(p) for p in sorted(directory.iterdir()) if (p / "manifest.json").is_file()]
    return sorted(rows, key=lambda r: r["started"] or "", reverse=True)


def show_run(root: Path) -> dict[str, Any]:
    """The manifest, with `status` as it is now: a dead process's run is `died`, with the command to continue it."""
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


def compare_runs(roots: list[Path]) -> dict[str, Any]:
    """Recipe keys that differ between runs, and each run's held-out figures with deltas to the first."""
    import yaml

    recipes = []
    for root in roots:
        show_run(root)
        recipes.append(_flatten(yaml.safe_load((root / "recipe.yaml").read_text(encoding="utf-8"))))
    keys = sorted({k for r in recipes for k in r})
    differing = {k: [r.get(k) for r in recipes] for k in keys if len({json.dumps(r.get(k)) for r in recipes}) > 1}
    figures = [_figures(show_run(root)) for root in roots]
    deltas = [{k: v - figures[0][k] for k, v in f.items() if k in figures[0]} for f in figures]
    return {"runs": [str(r) for r in roots], "recipe_differences": differing, "figures": figures, "deltas": deltas}


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): data}


def _figures(manifest: dict[str, Any]) -> dict[str, float]:
    tuned = (manifest.get("eval") or {}).get("tuned") or {}
    out = {k: tuned[k] for k in ("loss", "perplexity") if tuned.get(k) is not None}
    out.update(tuned.get("metrics") or {})
    if manifest.get("train_loss") is not None:
        out["train_loss"] = manifest["train_loss"]
    return out
