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
from typing import Any, BinaryIO

from finetune.errors import DataError, Problem
from finetune.files import update_sha256
from finetune.recipe.load import is_local
from finetune.recipe.schema import DataSource
from finetune.recipe.yaml_source import display_path

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
BOM = b"\xef\xbb\xbf"
# Limits, so that one absurd input cannot hang or exhaust a run: a row (a JSONL line, a CSV record) of at most
# 16 MiB (about 4M tokens, past any context length), and a .json document of at most 1 GiB (use .jsonl beyond).
MAX_ROW_BYTES = 16 * 2**20
MAX_JSON_BYTES = 2**30
EXPECTED = {
    ".jsonl": "expected one JSON object per line",
    ".json": "a .json data file must hold a list of rows (use .jsonl for one row per line)",
    ".csv": "expected a header line, then one row per line",
    ".parquet": "expected a table with one row per example",
}


@dataclass(frozen=True)
class Row:
    data: Any
    where: str  # "data/train.jsonl:118" (line) or "data/train.parquet:row 7"
    problem: tuple[str, str] | None = None  # (reason, message) of a row that could not be read, e.g. not UTF-8


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
            try:
                update_sha256(digest, f)
            except OSError as e:
                raise DataError(Problem(f"cannot read the file ({e.strerror or e})", display_path(f))) from None
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
        name = display_path(path)
        if reader is None:
            raise DataError(f"{name}: unsupported file type; use {', '.join(SUFFIXES)}")
        rows = 0
        try:
            if path.stat().st_size == 0:
                raise DataError(Problem(f"empty file (0 bytes); {EXPECTED[path.suffix.lower()]}", name))
            for row in reader(path, name):
                rows += 1
                yield row
        except OSError as e:
            raise DataError(Problem(f"cannot read the file ({e.strerror or e})", name)) from None
        if rows == 0:
            raise DataError(
                Problem(f"no rows: the file is empty or holds only blank lines; {EXPECTED[path.suffix.lower()]}", name)
            )


def _bad(where: str, reason: str, message: str) -> Row:
    return Row(None, where, (reason, message))


def _lines(fh: BinaryIO) -> Iterator[tuple[int, bytes | None]]:
    """Lines of a binary file by number, ending in \\n, \\r\\n or \\r; None for a line over MAX_ROW_BYTES.

    A line is read at most MAX_ROW_BYTES at a time, so one endless line cannot exhaust memory.
    """
    number = 0
    while True:
        chunk = fh.readline(MAX_ROW_BYTES + 1)
        if not chunk:
            return
        if len(chunk) > MAX_ROW_BYTES and not chunk.endswith(b"\n"):
            while chunk and not chunk.endswith(b"\n"):  # skip the rest of the line without keeping it
                chunk = fh.readline(1 << 20)
            number += 1
            yield number, None
            continue
        body = chunk[:-1] if chunk.endswith(b"\n") else chunk
        body = body[:-1] if body.endswith(b"\r") else body
        for part in body.split(b"\r"):  # a file with classic Mac line endings (\r alone)
            number += 1
            yield number, part


def _jsonl(path: Path, name: str) -> Iterator[Row]:
    """One JSON value per line; UTF-8 with or without a byte-order mark; any line ending."""
    with path.open("rb") as fh:
        for line_no, raw in _lines(fh):
            where = f"{name}:{line_no}"
            if raw is None:
                yield _bad(where, "too_large", f"line longer than {MAX_ROW_BYTES // 2**20} MiB (the limit of one row)")
                continue
            if line_no == 1 and raw.startswith(BOM):
                raw = raw[len(BOM) :]
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield _bad(where, "not_utf8", _not_utf8(raw, e))
                continue
            try:
                yield Row(json.loads(text), where)
            except json.JSONDecodeError as e:
                yield _bad(where, "invalid_json", f"invalid JSON: {e.msg} (column {e.colno}); {EXPECTED['.jsonl']}")
            except (ValueError, RecursionError) as e:  # e.g. an integer of 5,000 digits, nesting 10,000 deep
                yield _bad(where, "invalid_json", f"invalid JSON: {str(e) or 'nested too deeply'}")


def _json(path: Path, name: str) -> Iterator[Row]:
    """A whole file holding a list of rows; its problems are the file's (no row can be skipped around them)."""
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise DataError(Problem(f"{size / 2**20:.0f} MiB is too large for one .json document "
                                f"(limit {MAX_JSON_BYTES // 2**20} MiB); write one row per line as .jsonl", name))  # fmt: skip
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        start = e.start + (len(BOM) if raw.startswith(BOM) else 0)
        line = raw[:start].count(b"\n") + 1
        raise DataError(Problem(_not_utf8(raw[raw.rfind(b"\n", 0, start) + 1 :], e, start), f"{name}:{line}")) from None
    if not text.strip():
        raise DataError(Problem(f"no rows: the file holds only blank space; {EXPECTED['.json']}", name))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        ends = e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated")
        cut = " (the file ends early: truncated?)" if ends else ""
        raise DataError(Problem(f"invalid JSON: {e.msg} (column {e.colno}){cut}", f"{name}:{e.lineno}")) from None
    except (ValueError, RecursionError) as e:
        raise DataError(Problem(f"invalid JSON: {str(e) or 'nested too deeply'}", name)) from None
    if not isinstance(data, list):
        raise DataError(Problem(f"{EXPECTED['.json']}, got {_kind(data)}", name))
    for i, row in enumerate(data, 1):
        yield Row(row, f"{name}:row {i}")


def _csv(path: Path, name: str) -> Iterator[Row]:
    """Every CSV cell is text (no type guessing turns an answer "2" into a number); rows named by the line they
    end on. Undecodable bytes are kept as surrogates while parsing, so that only their row is refused.
    """
    csv.field_size_limit(MAX_ROW_BYTES)
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        reader = csv.DictReader(fh, strict=True)  # a stray quote, or a file cut inside a quoted cell, is an error
        try:
            reader.fieldnames  # noqa: B018 -- reads the header now, so that line numbers below count it
        except csv.Error as e:
            raise DataError(Problem(f"malformed CSV header: {e}", f"{name}:1")) from None
        while True:
            starts = reader.line_num + 1  # a malformed record is named by the line it starts on
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                cut = " (the file ends inside a quoted cell: truncated?)" if "end of data" in str(e) else ""
                yield _bad(f"{name}:{starts}", "invalid_csv", f"malformed CSV: {e}{cut}")
                continue
            where = f"{name}:{reader.line_num}"
            if None in row or None in row.values():
                columns = len(reader.fieldnames or [])
                yield _bad(where, "invalid_csv", f"{columns} columns in the header, another number in this row")
                continue
            if any("\udc80" <= c <= "\udcff" for c in "".join(row.values()) + "".join(row)):
                yield _bad(where, "not_utf8", "not UTF-8 text (a byte such as Latin-1's); save the file as UTF-8")
                continue
            yield Row(row, where)


def _parquet(path: Path, name: str) -> Iterator[Row]:
    from pyarrow import ArrowException, parquet

    try:
        table = parquet.ParquetFile(path)
        batches = table.iter_batches(batch_size=1024)
        n = 0
        for batch in batches:
            for row in _dates_as_text(batch).to_pylist():
                n += 1
                yield Row(row, f"{name}:row {n}")
    except ArrowException as e:
        raise DataError(Problem(f"not a readable Parquet file (truncated or another format?): {e}", name)) from None


def _dates_as_text(batch: Any) -> Any:
    """Date, time and duration columns as text, the way Arrow writes them: Python's datetime cannot hold every
    Arrow date (year 5,000,000 is one), and a column no format reads must not stop the file."""
    import pyarrow as pa

    columns = [c.cast(pa.string()) if pa.types.is_temporal(c.type) else c for c in batch.columns]
    return pa.RecordBatch.from_arrays(columns, names=batch.schema.names)


def _not_utf8(line: bytes, e: UnicodeDecodeError, offset: int | None = None) -> str:
    byte = e.object[e.start : e.start + 1].hex()
    column = len(line[: e.start].decode("utf-8", errors="replace")) + 1 if offset is None else None
    at = f" at column {column}" if column else ""
    return f"not UTF-8 text: byte 0x{byte}{at} (Latin-1 or another legacy encoding?); save the file as UTF-8"


def _kind(value: Any) -> str:
    return {dict: "an object", str: "a string", bool: "true/false", type(None): "null"}.get(
        type(value), f"a {type(value).__name__}"
    )


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
