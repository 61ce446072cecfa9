"""Real services for the engine tests, started by the tests themselves and always stopped:
a throwaway PostgreSQL cluster and an `mlflow server`, each on 127.0.0.1 and a free port.

Each `start_*` skips the test with the reason when the service is not installed
(`bash scripts/setup_engines.sh` installs both).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SETUP = "bash scripts/setup_engines.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, seconds: float, log: Path) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the service exited with {proc.returncode}: {log.read_text()[-3000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)
    pytest.fail(f"nothing listened on 127.0.0.1:{port} after {seconds:.0f} s: {log.read_text()[-3000:]}")


# --- PostgreSQL -------------------------------------------------------------------------------------


def pg_bindir() -> Path | None:
    """FINETUNE_PG_BINDIR, else the newest Debian PostgreSQL, else initdb on PATH."""
    if os.environ.get("FINETUNE_PG_BINDIR"):
        return Path(os.environ["FINETUNE_PG_BINDIR"])
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _as_user() -> dict:
    """PostgreSQL refuses to run as root: as root, run it as the `postgres` user (Debian's package makes it)."""
    if os.geteuid() != 0:
        return {}
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and no `postgres` user to run PostgreSQL as (it refuses root)")
    return {"user": "postgres", "group": "postgres", "extra_groups": []}


@contextlib.contextmanager
def start_postgres() -> Iterator[str]:
    """A fresh cluster (initdb in a temporary directory, trust auth, 127.0.0.1 only); yields its SQLAlchemy URL."""
    bindir = pg_bindir()
    if bindir is None or not (bindir / "initdb").exists():
        pytest.skip(f"PostgreSQL is not installed (no initdb): run `{SETUP} postgres`")
    try:
        import psycopg2  # noqa: F401  the driver that the URL names
    except ImportError:
        pytest.skip(f"psycopg2 is not installed: run `{SETUP} postgres` (pip install psycopg2-binary)")
    user = _as_user()
    home = Path(tempfile.mkdtemp(prefix="finetune-pg-"))  # not under pytest's 0700 tmp: the postgres user reads it
    if user:
        shutil.chown(home, "postgres", "postgres")
    data, log, port = home / "data", home / "server.log", free_port()

    def run(*cmd: str) -> None:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, **user)
        if done.returncode != 0:
            server_log = log.read_text() if log.exists() else ""
            pytest.fail(f"{cmd[0]} failed ({done.returncode}): {done.stderr[-2000:]} {server_log[-2000:]}")

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "finetune", "--auth=trust", "--no-sync", "-E", "UTF8")
        options = f"-p {port} -h 127.0.0.1 -k {home} -c fsync=off"
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start")
        try:
            yield f"postgresql+psycopg2://finetune@127.0.0.1:{port}/postgres"
        finally:
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(home, ignore_errors=True)


# --- MLflow -----------------------------------------------------------------------------------------


def mlflow_command() -> str | None:
    """FINETUNE_MLFLOW, else the server venv setup_engines.sh makes, else an `mlflow` with its server on PATH."""
    for candidate in (os.environ.get("FINETUNE_MLFLOW"), str(ROOT / ".engines" / "mlflow" / "bin" / "mlflow")):
        if candidate and Path(candidate).is_file():
            return candidate
    found = shutil.which("mlflow")
    if found and subprocess.run([found, "server", "--help"], capture_output=True, timeout=60).returncode == 0:
        return found
    return None


@contextlib.contextmanager
def start_mlflow(directory: Path) -> Iterator[str]:
    """`mlflow server` with a SQLite store and an artifact folder in `directory`; yields its http:// URL."""
    command = mlflow_command()
    if command is None:
        pytest.skip(f"no `mlflow server` (mlflow-skinny has none): run `{SETUP} mlflow`")
    directory.mkdir(parents=True, exist_ok=True)
    port, log = free_port(), directory / "server.log"
    args = [command, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{directory / 'mlflow.db'}",
            "--artifacts-destination", str(directory / "artifacts")]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(port, proc, 180, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
