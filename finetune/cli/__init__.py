"""The `finetune` command line: parse arguments, call a stage, render its result, map errors to exit codes.

One module per command group registers its commands here, in the order `finetune --help` lists them:
recipes (validate, schema), train, plan, data, evaluate (eval), merge_export (merge, export), sweep,
inference (chat, serve), runs (list, show, compare), review (review, reproduce); `common` holds the shared options, console and
error mapping, `render` the tables two commands share. Stages are imported inside the command that
needs them, so that `finetune --help` and `finetune validate` never import torch.
"""

from __future__ import annotations

import gc
from typing import Annotated

import typer

from finetune import __version__
from finetune.cli import data, evaluate, inference, merge_export, plan, recipes, review, runs, sweep, train

app = typer.Typer(
    name="finetune",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"finetune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Fine-tune LLMs with LoRA and QLoRA from version-controlled YAML recipes.

    Example: finetune validate recipes/quickstart.yaml && finetune train recipes/quickstart.yaml
    """


for group in (recipes, train, plan, data, evaluate, merge_export, sweep, inference, runs, review):
    group.register(app)


def main() -> None:
    import warnings

    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
    try:
        app()
    finally:
        # Nothing may run after the command is done: the interpreter's last garbage collection walks every
        # object torch, transformers and a loaded model made (~540k; seconds on a busy machine, 21-28 s was
        # seen after `chat`'s /quit). Frozen, they are left to the process's exit, which frees them at once.
        gc.freeze()
