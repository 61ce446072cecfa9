"""The CLI reference (docs/reference/cli.md), generated from the typer app so that it can never disagree with it.

`python scripts/cli_reference.py` rewrites the page; `--check` exits 1 when the page is stale (tests/test_docs.py
asserts the same). It walks the click commands typer builds from `finetune.cli.app`: for every command its usage,
its help (the docstring, whose `Example:` paragraph becomes a command block that tests/test_docs.py parses against
the CLI like every other example), its arguments, and every option with its type, default and help. Nothing here
imports torch: the app keeps its imports lazy so that `--help` is instant.
"""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "reference" / "cli.md"

HEADER = """# CLI reference

Every command, argument and option of `finetune`, generated from the typer app (`finetune.cli.app`) by
`python scripts/cli_reference.py`; `tests/test_docs.py` fails when this page and the app disagree.
The guides say when to use each: start at [Getting started](../getting-started.md).
"""

TYPE_NAMES = {str: "text", int: "integer", float: "number", bool: "flag", Path: "path"}


def _root() -> Any:
    """The click group typer builds from the app (typer's own vendored click in typer >= 0.29)."""
    import typer

    from finetune.cli import app

    return typer.main.get_command(app)


def _escape(text: str) -> str:
    """Text inside a Markdown table cell: no pipes, no line breaks."""
    return " ".join(text.split()).replace("|", "\\|")


def _annotation(param: Any) -> tuple[Any, bool]:
    """The parameter's Python type and whether it repeats (a list), from typer's descriptor or click's type."""
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is None:  # typer on plain click: the click type says it
        return getattr(getattr(param, "type", None), "name", "text"), bool(getattr(param, "multiple", False))
    annotation = descriptor.annotation
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def _kind(param: Any) -> str:
    """What the option takes, in words: a flag, or a value of some type (repeatable for a list)."""
    if getattr(param, "is_flag", False):
        return "flag"
    annotation, repeats = _annotation(param)
    name = TYPE_NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)).lower())
    return f"{name}, repeatable" if repeats or getattr(param, "multiple", False) else name


def _default(param: Any) -> str:
    """The default as a reader types it; nothing where there is none (None, an unset flag, an empty list)."""
    value = param.default
    if callable(value) or value is None or value is False or value == () or value == []:
        return ""
    return f"`{value}`"


def _usage(path: list[str], command: Any) -> str:
    """`finetune train [OPTIONS] RECIPE`: arguments upper-cased, optional ones bracketed, `...` when they repeat."""
    pieces = [*path, "[OPTIONS]"]
    for param in command.params:
        if param.param_type_name != "argument":
            continue
        name = param.name.upper() + ("..." if param.nargs == -1 else "")
        pieces.append(name if param.required else f"[{name}]")
    if hasattr(command, "commands"):
        pieces.append("COMMAND [ARGS]...")
    return " ".join(pieces)


def _help(text: str) -> str:
    """The docstring's paragraphs; an `Example:` paragraph becomes a bash block (checked by tests/test_docs.py)."""
    out = []
    for paragraph in (text or "").strip().split("\n\n"):
        paragraph = paragraph.strip()
        if paragraph.startswith("Example:"):
            example = " ".join(paragraph.removeprefix("Example:").split())
            if example.endswith(")") and " (" in example:  # a closing note in brackets becomes a shell comment
                command, note = example.split(" (", 1)
                example = f"{command}  # {note[:-1]}"
            out.append(f"Example:\n\n```bash\n{example}\n```")
        elif paragraph:
            out.append(" ".join(paragraph.split()))
    return "\n\n".join(out)


def _params(command: Any) -> str:
    """The argument and option tables of one command."""
    arguments = [p for p in command.params if p.param_type_name == "argument"]
    options = [p for p in command.params if p.param_type_name == "option" and not getattr(p, "hidden", False)]
    parts = []
    if arguments:
        rows = [
            f"| `{p.name.upper()}` | {'required' if p.required else 'optional'}"
            f"{', repeatable' if p.nargs == -1 else ''} | {_default(p)} | {_escape(p.help or '')} |"
            for p in arguments
        ]
        parts.append("| argument | | default | help |\n|---|---|---|---|\n" + "\n".join(rows))
    rows = [
        f"| {' / '.join(f'`{o}`' for o in [*p.opts, *p.secondary_opts])} | {_kind(p)}{', required' if p.required else ''}"
        f" | {_default(p)} | {_escape(p.help or '')} |"
        for p in options
    ]
    rows.append("| `--help` | flag | | Show the command's help and exit. |")
    parts.append("| option | takes | default | help |\n|---|---|---|---|\n" + "\n".join(rows))
    return "\n\n".join(parts)


def _commands(path: list[str], command: Any) -> list[tuple[list[str], Any]]:
    """Every command under this one, depth first, in the order the app registers them."""
    found = [(path, command)]
    if hasattr(command, "commands"):
        ctx = command.make_context(path[-1], [], resilient_parsing=True)
        for name in command.list_commands(ctx):
            found += _commands([*path, name], command.commands[name])
    return found


def markdown() -> str:
    """The whole page."""
    sections = [HEADER.rstrip("\n")]
    for path, command in _commands(["finetune"], _root()):
        level = "#" * min(len(path) + 1, 4)
        sections.append(
            f"{level} `{' '.join(path)}`\n\n{_help(command.help)}\n\n```text\n{_usage(path, command)}\n```\n\n"
            f"{_params(command)}"
        )
    return "\n\n".join(sections).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is stale instead of writing it")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    text = markdown()
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is stale: run python scripts/cli_reference.py", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
