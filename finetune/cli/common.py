"""What every command shares: the recipe and `--set`/`--json` options, the console, and errors mapped to exit codes.

Exit codes: 0 ok, 2 invalid input (`UserError`), 1 runtime failure, 3 stopped after a checkpoint
(`TrainingInterrupted`), 130 interrupted; never a traceback unless FINETUNE_DEBUG is set.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from finetune.errors import LaunchError, TrainingInterrupted, UserError

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", "-s", help="Override a recipe key, e.g. --set lora.rank=32 (repeatable).", show_default=False
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]

Command = TypeVar("Command", bound=Callable[..., Any])


def console(**kwargs: Any) -> Any:
    """A rich console whose plain lines never wrap mid-sentence (logs and CI read them whole)."""
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True, **kwargs)


def echo_json(data: Any, ascii_only: bool = True) -> None:
    """`--json` output: indented, on stdout; the shapes are a contract for CI scripts."""
    typer.echo(json.dumps(data, indent=2, ensure_ascii=ascii_only))


def fail(message: str, code: int) -> typer.Exit:
    typer.echo(message, err=True)
    return typer.Exit(code)


def handles_errors(command: Command) -> Command:
    """Map errors to exit codes: UserError -> 2, interrupted -> 3, anything else -> 1 (no traceback)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except UserError as e:
            raise fail("\n".join(f"error: {p}" for p in e.problems), e.exit_code) from None
        except TrainingInterrupted as e:  # the graceful path (exit 3): not an error
            raise fail(str(e), e.exit_code) from None
        except LaunchError as e:  # the launched processes have printed their own errors
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as e:
            if os.environ.get("FINETUNE_DEBUG"):
                raise
            raise fail(f"error: {type(e).__name__}: {e}\n(set FINETUNE_DEBUG=1 for the traceback)", 1) from None

    return wrapper  # type: ignore[return-value]
