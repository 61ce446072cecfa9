"""`finetune merge` (one adapter into its base, verified; or several adapters combined) and `finetune export`."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from finetune.cli.common import JsonOpt, echo_json, fail, handles_errors
from finetune.cli.render import check_line
from finetune.errors import UserError

if TYPE_CHECKING:
    from finetune.combine import CombineResult
    from finetune.export import ExportResult
    from finetune.merge import MergeResult


def register(app: typer.Typer) -> None:
    app.command()(merge)
    app.command()(export)


@handles_errors
def merge(
    run_dirs: Annotated[
        list[Path], typer.Argument(help="Run directory, or several to combine their adapters.", show_default=False)
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output directory; default RUN_DIR/merged. Required when combining."),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype",
            help="float32 | bfloat16 | float16, never 4-bit; default the recipe's model.dtype "
            "(auto: as in training, bfloat16 or float16 on a GPU, float32 on the CPU).",
        ),
    ] = None,
    method: Annotated[
        str | None,
        typer.Option("--method", help="Combine several adapters: linear | ties | dare_linear | dare_ties | cat | svd."),
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option("--weights", help="Combining: one weight per adapter, e.g. 0.5,0.5; default equal, summing to 1."),
    ] = None,
    density: Annotated[
        float | None,
        typer.Option(
            "--density", help="Combining with ties/dare_*: share of each adapter's entries kept; default 0.5."
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output directory.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Merge the adapter into its base model and verify the logits match; or combine several adapters into one.

    Example: finetune merge runs/quickstart --out merged/quickstart
    (combine: finetune merge runs/a runs/b --method ties --weights 0.5,0.5 --out runs/a-b)
    """
    from finetune.combine import CombineResult
    from finetune.merge import merge_runs

    with _merge_check_reported(as_json):
        r = merge_runs(run_dirs, out, dtype, method, _weights(weights), density, overwrite=overwrite,
                       progress=_progress(as_json))  # fmt: skip
    if as_json:
        echo_json(r.to_dict())
    elif isinstance(r, CombineResult):
        _print_combined(r)
    else:
        _print_merged(r)


def _print_combined(r: CombineResult) -> None:
    shown_density = f", density {r.density:g}" if r.density is not None else ""
    typer.echo(
        f"combined {len(r.parents)} adapters ({r.method}, weights {', '.join(f'{w:g}' for w in r.weights)}"
        f"{shown_density}) into {r.adapter_dir}: rank {r.rank} on {', '.join(r.targets)}"
    )
    for note in r.notes:
        typer.echo(f"note: {note}")
    typer.echo(f"next: finetune merge {r.out_dir}   or   finetune export {r.out_dir} --format adapter")


def _print_merged(r: MergeResult) -> None:
    typer.echo(
        f"merged {r.run_dir}/adapter ({r.variant}, rank {r.rank}) into {r.base} in {r.dtype}: "
        f"{r.out_dir} ({r.size_bytes / 1e6:.1f} MB)"
    )
    typer.echo(check_line(r.check))
    for note in r.notes:
        typer.echo(f"note: {note}")


def _progress(as_json: bool) -> Callable[[str], None] | None:
    """Progress lines on stderr, none with --json (stdout stays one JSON document either way)."""
    return None if as_json else (lambda message: typer.echo(message, err=True))


@contextlib.contextmanager
def _merge_check_reported(as_json: bool) -> Iterator[None]:
    """A failed merge check exits 1 with its message, and with --json prints the check's figures too."""
    from finetune.gguf import ConversionError, GGUFCheckError
    from finetune.merge import MergeCheckError

    try:
        yield
    except MergeCheckError as e:
        if as_json:
            typer.echo(json.dumps({"passed": False, "check": e.check}, indent=2))
        raise fail(f"error: {e}", 1) from None
    except GGUFCheckError as e:  # the figures of every file and form, not only the failing one
        if as_json:
            typer.echo(json.dumps({"passed": False, "gguf": e.report}, indent=2))
        raise fail(f"error: {e}", 1) from None
    except ConversionError as e:
        raise fail(f"error: {e}", 1) from None


def _weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise UserError(f"--weights: expected numbers separated by commas, e.g. 0.5,0.5 (got {text!r})") from None


@handles_errors
def export(
    run_dir: Annotated[Path, typer.Argument(help="Run directory.", show_default=False)],
    format: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            help="adapter: the PEFT adapter; merged: the verified merged model; gguf: llama.cpp files "
            "(merged, and base + GGUF adapter) verified with llama.cpp, and Ollama Modelfiles.",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output directory; default RUN_DIR/export/FORMAT.")
    ] = None,
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="merged: float32 | bfloat16 | float16, as for finetune merge.")
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output directory.")] = False,
    quant: Annotated[list[str] | None, typer.Option(help="gguf: f32 | f16 | q8_0 | q4_k_m, repeatable.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Export the adapter or the merged model with a model card and a compatibility report.

    Example: finetune export runs/quickstart --format adapter
    """
    from finetune.export import export as export_run

    with _merge_check_reported(as_json):
        result = export_run(
            run_dir, format, out, dtype=dtype, overwrite=overwrite, progress=_progress(as_json), quants=quant
        )
    if as_json:
        echo_json(result.to_dict())
    else:
        _print_export(result)


def _print_export(result: ExportResult) -> None:
    """What was exported, the merge check, and each runtime's verdict with its reasons and command."""
    from finetune.export import TARGET_NAMES, verdict_word

    what = "adapter" if result.format == "adapter" else "merged model"
    typer.echo(f"exported the {what} of {result.run_dir} to {result.out_dir} ({len(result.files)} files)")
    if result.merge_check:
        typer.echo(check_line(result.merge_check))
    for key, v in result.compat["targets"].items():
        typer.echo(f"  {TARGET_NAMES.get(key, key):<20} {verdict_word(v['works']):<14} {v['summary']}")
        for reason in v["reasons"]:
            typer.echo(f"  {'':<20} {'':<14} - {reason}")
        if v["command"]:
            typer.echo(f"  {'':<20} {'':<14} $ {v['command']}")
    for note in result.notes:
        typer.echo(f"note: {note}")
    typer.echo(f"model card: {Path(result.out_dir) / 'README.md'}; report: {Path(result.out_dir) / 'compat.json'}")
