"""Read rows from a recipe's data sources, each row tagged with where it came from.

JSON Lines and JSON are read here (so a broken line is reported as `file:line`, not as a
pyarrow traceback); CSV and Parquet through pyarrow; hub datasets through `datasets`.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.errors import DataError, Problem
from finetune.loading import is_local
from finetune.recipe import DataSource
from finetune.runs import update_sha256
from finetune.yaml_source import display_path

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class Row:
    data: Any
    where: str  # "data/train.jsonl:118" (line) or "data/train.parquet:row 7"


def files_of(source: DataSource) -> list[Path]:
    """The data files a local source names: a file, the data files of a folder, or a glob."""
    path = Path(source.path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES)
    elif path.exists():
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(source.path, recursive=True) if Path(p).is_file())
    if not files:
        raise DataError(f"{source.path}: no data files ({', '.join(SUFFIXES)}) found")
    return files


def fingerprint(source: DataSource) -> str:
    """sha256 over the source's file contents (local) or its id, subset, split and revision (hub)."""
    digest = hashlib.sha256()
    if is_local(source.path):
        for f in files_of(source):
            digest.update(f.name.encode())
            update_sha256(digest, f)
    else:
        snapshot = hub_snapshot(source)
        digest.update(json.dumps([source.path, snapshot.name, source.subset, source.split]).encode())
    return digest.hexdigest()


def read_rows(source: DataSource) -> Iterator[Row]:
    """Rows of one source, at most `source.limit` of them."""
    rows = _local_rows(source) if is_local(source.path) else _hub_rows(source)
    for n, row in enumerate(rows):
        if source.limit is not None and n >= source.limit:
            return
        yield row


def _local_rows(source: DataSource) -> Iterator[Row]:
    for path in files_of(source):
        reader = {".jsonl": _jsonl, ".json": _json, ".csv": _csv, ".parquet": _parquet}.get(path.suffix.lower())
        if reader is None:
            raise DataError(f"{display_path(path)}: unsupported file type; use {', '.join(SUFFIXES)}")
        yield from reader(path, display_path(path))


def _jsonl(path: Path, name: str) -> Iterator[Row]:
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield Row(json.loads(line), f"{name}:{line_no}")
            except json.JSONDecodeError as e:
                raise DataError(Problem(f"invalid JSON: {e.msg} (column {e.colno})", f"{name}:{line_no}")) from None


def _json(path: Path, name: str) -> Iterator[Row]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(Problem(f"invalid JSON: {e.msg} (line {e.lineno})", name)) from None
    if not isinstance(data, list):
        raise DataError(Problem("a .json data file must hold a list of rows (use .jsonl for one row per line)", name))
    for i, row in enumerate(data, 1):
        yield Row(row, f"{name}:row {i}")


def _csv(path: Path, name: str) -> Iterator[Row]:
    """Every CSV cell is text (no type guessing turns an answer "2" into a number); rows named by line."""
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        for row in reader:
            yield Row(row, f"{name}:{reader.line_num}")


def _parquet(path: Path, name: str) -> Iterator[Row]:
    from pyarrow import parquet

    for i, row in enumerate(parquet.read_table(path).to_pylist(), 1):
        yield Row(row, f"{name}:row {i}")


def hub_snapshot(source: DataSource) -> Path:
    """The local snapshot of a hub dataset repo at the source's revision: from the hub cache, else downloaded.

    Its folder name is the resolved commit, so the cache key follows the hub's revision.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(source.path, repo_type="dataset", revision=source.revision))
    except LocalEntryNotFoundError:
        raise DataError(f"{source.path}: hub dataset not in the local cache and the hub is unreachable") from None
    except HfHubHTTPError as e:
        raise DataError(f"{source.path}: cannot fetch the hub dataset ({e})") from None


def _hub_rows(source: DataSource) -> Iterator[Row]:
    """Rows of a split (and subset) of a hub dataset, read by `datasets` from its local snapshot."""
    import datasets

    try:
        dataset = datasets.load_dataset(str(hub_snapshot(source)), source.subset, split=source.split)
    except (ValueError, FileNotFoundError) as e:
        raise DataError(f"{source.path}: cannot read split {source.split!r} ({e})") from None
    for i, row in enumerate(dataset, 1):
        yield Row(row, f"{source.path}[{source.split}]:row {i}")
