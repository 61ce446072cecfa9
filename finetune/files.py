"""Writing files so that a kill or a full disk never leaves half of one, and hashing files in blocks.

Building blocks that the run directory, data preparation, merge and export share: a temporary file or
directory beside the target, renamed over it only when complete; a disk-full or read-only OSError turned
into a WriteError that says what was kept.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from finetune.errors import WriteError

# Write failures that no retry fixes; reported as WriteError naming the path instead of a bare OSError.
NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


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
def no_room_names(path: Path, kept: str, staging: Path | None = None):
    """Turn a disk-full / read-only OSError into a WriteError that says what could not be written and what was kept.

    `staging`: the folder the files are written in before they become `path`; the message then names the file
    that was being written, where it would have ended up (`runs/x/adapter/adapter_model.safetensors`).
    """
    try:
        yield
    except OSError as e:
        if e.errno not in NO_ROOM:
            raise
        raise WriteError(f"could not write {_being_written(e, path, staging)}: {e.strerror}; {kept}") from e


def _being_written(e: OSError, path: Path, staging: Path | None) -> Path:
    """The file an OSError was writing: its own filename, else (a failed write() names none) the newest file in
    `staging`, which is the one the disk filled up under."""
    if staging is None:
        return path
    written = Path(e.filename) if e.filename else None
    if written is None and staging.is_dir():
        files = [f for f in staging.rglob("*") if f.is_file()]
        written = max(files, key=lambda f: f.stat().st_mtime_ns, default=None)
    if written is not None and written.is_relative_to(staging) and written != staging:
        return path / written.relative_to(staging)
    return written or path


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


# Our temporary directories beside an output: `.NAME.PID-START.RANDOM.tmp` (being written) and `.old` (an
# output moved aside to be replaced or deleted). The owner's pid and start time tell a stale one (its process
# was killed) from one another process is still writing.
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-(?P<ticks>\d+)\.[a-z0-9_]+\.(?P<kind>tmp|old)$")


def _temporary_dir(final: Path, kind: str) -> Path:
    ticks = _start_ticks(os.getpid()) or 0
    return Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.{os.getpid()}-{ticks}.", suffix=f".{kind}"))


def clean_stale(parent: Path, name: str | None = None) -> list[Path]:
    """Remove our temporary directories in `parent` (for outputs called `name`, or all) whose process is gone.

    A kill during a merge or an export leaves a full-size `.tmp`; a kill between moving an output aside and
    renaming its replacement in leaves the output only in its `.old`: that one is put back (the old state).
    Returns what was removed or restored."""
    done = []
    for path in sorted(parent.iterdir()) if parent.is_dir() else []:
        match = _TEMPORARY.match(path.name)
        if not match or not path.is_dir() or (name is not None and match["name"] != name):
            continue
        owner = {"pid": int(match["pid"]), "host": socket.gethostname(), "start_ticks": int(match["ticks"]) or None}
        if process_alive(owner) is not False:
            continue
        final, inside = parent / match["name"], path / match["name"]
        if match["kind"] == "old" and not final.exists() and inside.exists():
            os.replace(inside, final)
        shutil.rmtree(path, ignore_errors=True)
        done.append(path)
    return done


@contextmanager
def atomic_dir(final: Path):
    """Yield a temporary directory beside `final`, renamed to `final` only when the block completes.

    Stale temporaries of an earlier, killed attempt at `final` are cleaned first. A full or read-only disk
    is reported as WriteError naming the file in `final` that was being written; `final` is then as it was.
    """
    kept = f"{final} is unchanged" if final.exists() else "nothing was written there"
    with no_room_names(final, kept):
        final.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(final.parent, final.name)
        tmp = _temporary_dir(final, "tmp")
    try:
        with no_room_names(final, kept, staging=tmp):
            yield tmp
        if final.exists():  # moved aside whole, never deleted in place: a kill leaves it absent, not half-deleted
            old = _temporary_dir(final, "old")
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def file_sha256(path: Path) -> str | None:
    """sha256 of a file's bytes, or None when it does not exist."""
    if not path.exists():
        return None
    return update_sha256(hashlib.sha256(), path).hexdigest()


def update_sha256(digest: Any, path: Path) -> Any:
    """Feed a file's bytes to `digest` in 1 MiB blocks (weights and data files can be far larger than memory)."""
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """A process's state letter and start time (clock ticks since boot) from /proc (Linux); None where unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return fields[0], int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def _start_ticks(pid: int) -> int | None:
    """When a process started, so that a reused pid is not taken for our process."""
    stat = _proc_stat(pid)
    return stat[1] if stat else None


def process_alive(record: dict[str, Any] | None) -> bool | None:
    """True/False for a process recorded on this host; None when it ran elsewhere (or was never recorded).

    A zombie (killed, not yet reaped: what a requeued job sees where PID 1 does not reap) is dead,
    although `kill(pid, 0)` still succeeds for it.
    """
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
    stat = _proc_stat(pid)
    if stat is None:
        return True  # no /proc to ask (not Linux): kill(pid, 0) is all there is
    state, ticks = stat
    if state in ("Z", "X"):
        return False
    return record.get("start_ticks") is None or ticks == record["start_ticks"]
