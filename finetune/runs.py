"""The run directory: its fixed layout, atomic writes, and the manifest that says where an adapter came from.

runs/<name>/
  recipe.yaml     the fully resolved recipe
  manifest.json   provenance and status, rewritten atomically as the run goes
  metrics.jsonl   one line per logged step
  adapter/        PEFT adapter + tokenizer and chat template
  eval/           held-out results (summary.json, examples.jsonl; harness.json with eval.harness)
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from finetune.errors import RunDirError, WriteError
from finetune.recipe import Recipe
from finetune.secrets import redact
from finetune.yaml_source import dump

# Write failures that no retry fixes; reported as WriteError naming the path instead of a bare OSError.
NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)
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

    def refuse_existing(self, overwrite: bool) -> None:
        """An existing non-empty run directory is an error unless `overwrite`: nothing is lost silently."""
        if not overwrite and self.root.exists() and any(self.root.iterdir()):
            raise RunDirError(
                f"run directory {self.root} already exists; pass --overwrite to replace it "
                "(or set a new name / output_dir)"
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


@contextmanager
def no_room_names(path: Path, kept: str):
    """Turn a disk-full / read-only OSError into a WriteError that says what could not be written and what was kept."""
    try:
        yield
    except OSError as e:
        if e.errno not in NO_ROOM:
            raise
        raise WriteError(f"could not write {path}: {e.strerror}; {kept}") from e


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


@contextmanager
def atomic_dir(final: Path):
    """Yield a temporary directory beside `final`, renamed to `final` only when the block completes.

    A full or read-only disk is reported as WriteError naming `final`; `final` is then as it was.
    """
    kept = f"{final} is unchanged" if final.exists() else "nothing was written there"
    with no_room_names(final, kept):
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        with no_room_names(final, kept):
            yield tmp
        if final.exists():  # moved aside whole, never deleted in place: a kill leaves it absent, not half-deleted
            old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".old"))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_eval(
    run: RunDir, summary: dict[str, Any], examples: list[dict[str, Any]], harness: dict[str, Any] | None = None
) -> None:
    """eval/summary.json, eval/examples.jsonl and (with `eval.harness`) eval/harness.json, replaced together."""
    with atomic_dir(run.eval) as tmp:
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
        "status": manifest.get("status"),
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
    if not (root / "manifest.json").is_file():
        raise RunDirError(f"{root}: not a run directory (no manifest.json)")
    return json.loads((root / "manifest.json").read_text(encoding="utf-8"))


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
