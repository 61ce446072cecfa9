"""One writer per run directory: an advisory `flock` on a lock file beside it.

`runs/<name>` is guarded by `runs/.<name>.lock`, which holds the holder's pid, host and start
time. The kernel releases a `flock` when its process dies, however it dies (SIGKILL
included), so a lock left by a killed run is stale by construction and is simply taken over;
the file's contents only name the holder in the refusal. The lock file lives beside the run
directory, not in it, because `--overwrite` deletes the directory (and would delete a lock
inside it while it is held).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from finetune.errors import RunDirError


def lock_path(run_root: Path) -> Path:
    root = Path(os.path.abspath(run_root))
    return root.parent / f".{root.name}.lock"


class RunLock:
    """Exclusive hold on a run directory for the life of one `finetune train` (a context manager)."""

    def __init__(self, run_root: str | Path):
        self.run_root = Path(run_root)
        self.path = lock_path(self.run_root)
        self.fd: int | None = None
        self.stale: dict[str, Any] | None = None  # the previous holder's record, when it died holding the lock

    def acquire(self) -> RunLock:
        """Take the lock or raise RunDirError naming the live holder (pid, host, start)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirError(f"cannot create the lock file {self.path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise RunDirError(
                f"run directory {self.run_root} is in use by another finetune train "
                f"({describe(holder)}); wait for it to end or stop it, or pick another name / output_dir"
            ) from None
        self.fd = fd
        self.stale = _read(fd) or None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        return self

    def release(self) -> None:
        """Empty the record, then unlock; the file stays (unlinking a locked path races with a new holder)."""
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "holder unknown: its record is not written yet"
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"


def _read(fd: int) -> dict[str, Any]:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8")
        return json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
