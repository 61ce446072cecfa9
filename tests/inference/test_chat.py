"""`finetune chat`: scripted through stdin it answers as `eval` predicted; --compare shows base and tuned;
the interactive loop keeps the conversation, /system, /reset and /quit; a merged directory chats the same."""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune.cli import app
from finetune.generation import Sampling
from finetune.inference.chat import Conversation, chat, repl
from finetune.inference.loaded import load

pytestmark = pytest.mark.slow
runner = CliRunner()


@pytest.fixture(scope="module")
def loaded(serving_runs):
    return load(serving_runs.quickstart)


def test_chat_through_stdin_answers_as_eval_predicted(serving_runs):
    examples = serving_runs.examples()
    stdin = "".join(row["user"] + "\n" for row in examples)
    result = runner.invoke(app, ["chat", str(serving_runs.quickstart)], input=stdin)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [row["tuned"] for row in examples]


def test_every_stdin_line_gets_one_answer_a_blank_one_included(serving_runs):
    """Output line N answers input line N, as a script reading both expects (blank lines were skipped)."""
    examples = serving_runs.examples()[:2]
    stdin = f"{examples[0]['user']}\n\n{examples[1]['user']}\n"
    result = runner.invoke(app, ["chat", str(serving_runs.quickstart)], input=stdin)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and lines[0] == examples[0]["tuned"] and lines[2] == examples[1]["tuned"], lines


def _chat_in_a_terminal(run: Path, keys: bytes, tmp_path: Path) -> tuple[bytes, float, int]:
    """`finetune chat RUN` in a pseudo-terminal: `keys` typed at the first prompt; returns what the terminal showed,
    the seconds from the keys to the process's exit, and how many objects were frozen out of the last collection."""
    import pty

    (tmp_path / "sitecustomize.py").write_text(  # reports, as the interpreter shuts down, what gc.freeze() spared
        "import atexit, gc, os\n"
        "atexit.register(lambda: open(os.environ['FROZEN_FILE'], 'w').write(str(gc.get_freeze_count())))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path]), "FROZEN_FILE": str(tmp_path / "n")}
    pid, fd = pty.fork()
    if pid == 0:  # the child: the CLI exactly as a user starts it
        os.execvpe(sys.executable, [sys.executable, "-m", "finetune.cli", "chat", str(run)], env)
    shown, deadline = b"", time.monotonic() + 240
    while b"> " not in shown and time.monotonic() < deadline:
        if select.select([fd], [], [], 1)[0]:
            shown += os.read(fd, 4096)
    os.write(fd, keys)
    sent = time.monotonic()
    while True:
        if select.select([fd], [], [], 0.1)[0]:
            with contextlib.suppress(OSError):  # the terminal closed with the process
                shown += os.read(fd, 4096)
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return shown, time.monotonic() - sent, int((tmp_path / "n").read_text())
        assert time.monotonic() - sent < 120, shown


@pytest.mark.parametrize("keys", [b"/quit\r", b"\x04"], ids=["quit", "ctrl-d"])
def test_chat_exits_at_once_after_quit_or_ctrl_d_and_ends_its_line(serving_runs, tmp_path, keys):
    """Nothing may run after the user quits: the interpreter's final garbage collection over every object torch,
    transformers and the model made took 21-28 s on a loaded machine; the CLI freezes them out of it. Ctrl-D ends
    the prompt's line, so the shell's prompt does not start on it."""
    shown, seconds, frozen = _chat_in_a_terminal(serving_runs.quickstart, keys, tmp_path)
    assert frozen > 100_000, f"only {frozen} objects frozen: the final collection walks the rest"
    assert seconds < 10, f"{seconds:.1f} s from {keys!r} to the exit"
    assert shown.endswith(b"\r\n"), shown[-40:]


def test_compare_shows_base_and_tuned_for_each_prompt(serving_runs):
    examples = serving_runs.examples()[:3]
    args = ["chat", str(serving_runs.quickstart), "--compare", "--json"]
    for row in examples:
        args += ["--prompt", row["user"]]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    answers = json.loads(result.stdout)["answers"]
    assert [(a["prompt"], a["tuned"], a["base"]) for a in answers] == [
        (row["user"], row["tuned"], row["base"]) for row in examples
    ]
    table = runner.invoke(app, ["chat", str(serving_runs.quickstart), "--compare", "-p", examples[0]["user"]])
    assert table.exit_code == 0, table.output
    assert "base" in table.stdout and "tuned" in table.stdout
    assert examples[0]["tuned"].split(",")[0] in table.stdout


def test_the_interactive_loop_keeps_the_conversation_and_its_commands(loaded, serving_runs):
    user = serving_runs.examples()[0]["user"]
    lines = iter([user, "/system Be brief.", "/bogus", user, user, "/reset", "/quit", "never read"])
    out = io.StringIO()
    conversation = Conversation(loaded, Sampling(8))
    repl(conversation, ("tuned",), lambda _prompt: next(lines), out)
    assert conversation.system == "Be brief." and conversation.turns == []  # reset after the last two turns
    text = out.getvalue()
    assert "unknown command /bogus" in text and "system prompt set" in text and "conversation reset" in text
    assert next(lines) == "never read"
    # a second turn sees the first: its prompt holds the first answer
    conversation.turns = []
    first = "".join(conversation.reply(user))
    assert conversation.messages("again")[-2] == {"role": "assistant", "content": first}
    assert conversation.messages("again")[0] == {"role": "system", "content": "Be brief."}


def test_sampling_is_seeded_and_greedy_by_default(loaded, serving_runs):
    user = serving_runs.examples()[0]["user"]
    once = chat(None, [user] * 2, ("base",), temperature=1.0, seed=7, loaded=loaded).answers
    again = chat(None, [user], ("base",), temperature=1.0, seed=7, loaded=loaded).answers
    assert again[0]["base"] == once[0]["base"]
    assert chat(None, [user], loaded=loaded).answers[0]["tuned"] == serving_runs.examples()[0]["tuned"]


def test_a_merged_directory_chats_like_the_run(serving_runs, tmp_path):
    from finetune.merge import merge

    merged = merge(serving_runs.quickstart, out=tmp_path / "merged").out_dir
    examples = serving_runs.examples()[:2]
    args = ["chat", merged, "--json", *[a for row in examples for a in ("-p", row["user"])]]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert [a["tuned"] for a in json.loads(result.stdout)["answers"]] == [row["tuned"] for row in examples]
    refused = runner.invoke(app, ["chat", merged, "--base", "-p", "hi"])
    assert refused.exit_code == 2 and "no adapter to disable" in refused.output


def test_a_qlora_run_chats_on_its_4bit_base_as_eval_predicted(tmp_path):
    """The quickstart as QLoRA: it trains in NF4, and chat loads the base in NF4 as training and eval did and
    answers as eval predicted."""
    import serving

    run = serving._train(serving.QUICKSTART, [f"output_dir={tmp_path / 'nf4'}", "quantization.method=nf4",
                                              "train.max_steps=8", "data.eval.0.limit=3", "eval.compare_base=false",
                                              "eval.max_new_tokens=12"])  # fmt: skip
    rows = [json.loads(line) for line in (run / "eval" / "examples.jsonl").read_text().splitlines()]
    prompts = [json.loads(line)["messages"][0]["content"] for line in
               (serving.ROOT / "assets" / "quickstart" / "data" / "eval.jsonl").read_text().splitlines()[:3]]  # fmt: skip
    args = ["chat", str(run), "--json", "--max-new-tokens", "12", *[a for p in prompts for a in ("--prompt", p)]]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    answers = json.loads(result.stdout)["answers"]
    assert [a["tuned"] for a in answers] == [row["tuned"] for row in rows]
    assert "method: nf4" in (run / "recipe.yaml").read_text() and len((run / "metrics.jsonl").read_text()) > 0
