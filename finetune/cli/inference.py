"""`finetune chat` (a terminal conversation, or prompts in and answers out) and `finetune serve` (an OpenAI API)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from finetune.cli.common import JsonOpt, console, echo_json, handles_errors


def register(app: typer.Typer) -> None:
    app.command()(chat)
    app.command()(serve)


@handles_errors
def chat(
    target: Annotated[
        Path, typer.Argument(help="Run directory, its recipe, or a merged model directory.", show_default=False)
    ],
    prompt: Annotated[
        list[str] | None,
        typer.Option("--prompt", "-p", help="Answer this prompt and exit (repeatable); else stdin lines."),
    ] = None,
    base: Annotated[bool, typer.Option("--base", help="Talk to the base model (the adapter disabled).")] = False,
    compare: Annotated[bool, typer.Option("--compare", help="Base and tuned answers, side by side.")] = False,
    system: Annotated[str | None, typer.Option("--system", help="System prompt.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Default: the run's eval.max_new_tokens.")] = None,
    temperature: Annotated[float, typer.Option(help="0 (the default) decodes greedily, as eval does.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling (with a temperature).")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Chat with a run: its own tokenizer, chat template and stop tokens, streamed; /reset, /system TEXT, /quit.

    Example: finetune chat runs/quickstart --compare -p "Reverse the list: width, socket, when"
    """
    from finetune.inference.chat import Conversation, repl, sampling_for, scripted_prompts
    from finetune.inference.chat import chat as chat_stage
    from finetune.inference.loaded import load

    which = ("base", "tuned") if compare else ("base",) if base else ("tuned",)
    prompts = scripted_prompts(prompt, sys.stdin)
    loaded = load(target)
    if prompts is None:
        import readline  # noqa: F401  (line editing and history for input())

        conversation = Conversation(loaded, sampling_for(loaded, max_new_tokens, temperature, top_p, seed), system)
        return repl(conversation, which, input, sys.stdout)
    result = chat_stage(target, prompts, which, system, max_new_tokens, temperature, top_p, seed, loaded=loaded)
    if as_json:
        echo_json(result.to_dict(), ascii_only=False)
    elif compare:
        from rich.table import Table

        table = Table("prompt", "base", "tuned", show_lines=True)
        for row in result.answers:
            table.add_row(row["prompt"], row["base"], row["tuned"])
        console().print(table)
    else:
        for row in result.answers:
            typer.echo(row[which[0]])


@handles_errors
def serve(
    runs: Annotated[
        list[Path], typer.Argument(help="Run directories (or recipes), all on one base.", show_default=False)
    ],
    host: Annotated[str, typer.Option(help="Address to bind; a non-local one needs an API key.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    api_key: Annotated[
        str | None, typer.Option(envvar="FINETUNE_API_KEY", show_envvar=True, help="Required on every request.")
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="Default and largest max_tokens of a request.")] = 1024,
    max_prompt_tokens: Annotated[int | None, typer.Option(help="Largest prompt; default the model's context.")] = None,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body.")] = 1 << 20,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait for the model; more get 503.")] = 32,
    max_lora_rank: Annotated[int | None, typer.Option(help="Refuse adapters of a higher rank.")] = None,
    engine: Annotated[
        str, typer.Option(help="transformers (this process) or vllm (starts vLLM's server).")
    ] = "transformers",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="--engine vllm: print vLLM's command, start nothing.")
    ] = False,
) -> None:
    """Serve runs' adapters on one base through an OpenAI-compatible API; `model` = run name.

    Example: finetune serve runs/a runs/b --port 8000   # then: OpenAI(base_url="http://127.0.0.1:8000/v1")
    """
    from finetune.inference import serve as stage

    stage.check_engine(engine)
    stage.check_bind(host, api_key)
    if engine == "vllm":
        plan = stage.vllm_plan(list(runs), host, port)
        for note in plan.notes:
            typer.echo(f"note: {note}", err=True)
        if dry_run:
            return typer.echo(plan.shell())
        raise typer.Exit(stage.run_vllm(plan, api_key))
    limits = stage.Limits(max_tokens, max_prompt_tokens, max_body_bytes, max_queue, max_lora_rank)
    ready = lambda m: typer.echo(f"serving {', '.join(m.names())} at http://{host}:{port}/v1", err=True)  # noqa: E731
    stage.serve(list(runs), host, port, api_key, limits, ready)
