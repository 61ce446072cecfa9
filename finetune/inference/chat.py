"""`finetune chat`: talk to a trained run with its own tokenizer, chat template and stop ids.

The run (or a merged directory) is opened by `finetune.inference.loaded`, as `eval` and `serve` open it.
Decoding is `finetune.generation`'s, the same as `eval`'s, so a greedy answer here is the
prediction `eval` wrote for the same prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from finetune.errors import UserError
from finetune.generation import Sampling, chat_prompt, stream
from finetune.inference.loaded import Loaded, load


@contextmanager
def adapter_off(loaded: Loaded, which: str):
    """`base`: the run's base model, the adapter disabled for the duration; `tuned`: as loaded."""
    if which == "base":
        if not loaded.has_adapter:
            raise UserError(f"{loaded.name}: a merged model has no adapter to disable; --base and --compare need a run")
        with loaded.model.disable_adapter():
            yield
    else:
        with nullcontext():
            yield


class Conversation:
    """One conversation with a loaded model: its messages, an optional system prompt, streamed replies."""

    def __init__(self, loaded: Loaded, sampling: Sampling, system: str | None = None):
        self.loaded, self.sampling, self.system = loaded, sampling, system
        self.turns: list[dict[str, str]] = []

    def messages(self, user: str) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, *self.turns, {"role": "user", "content": user}]

    def reply(self, user: str, which: str = "tuned", remember: bool = True) -> Iterator[str]:
        """Stream the answer to `user`; remembered in the conversation (as the tuned answer) when it ends."""
        prompt = chat_prompt(self.loaded.tokenizer, self.messages(user))
        pieces = []
        with adapter_off(self.loaded, which):
            for piece in stream(self.loaded.model, self.loaded.tokenizer, prompt, self.sampling):
                pieces.append(piece)
                yield piece
        if remember:
            self.turns += [{"role": "user", "content": user}, {"role": "assistant", "content": "".join(pieces)}]

    def reset(self) -> None:
        self.turns = []


def sampling_for(loaded: Loaded, max_new_tokens: int | None, temperature: float, top_p: float, seed: int | None):
    """The run's eval budget unless given; greedy unless a temperature is."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise UserError("--temperature must be ≥ 0 and --top-p in (0, 1]")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be ≥ 1 (got {max_new_tokens})")
    return Sampling(max_new_tokens or loaded.max_new_tokens, temperature, top_p, seed)


# --- the `finetune chat` stage, scripted: prompts in, answers out -----------------------------------


def scripted_prompts(prompts: list[str] | None, stdin: TextIO) -> list[str] | None:
    """What chat answers without a conversation: the given prompts, else every line of `stdin` when it is not a
    terminal; None when it is one (chat interactively).

    Every line gets one answer, a blank one included, so that answer N answers line N (what a script expects).
    """
    if prompts is not None:
        return list(prompts)
    if stdin.isatty():
        return None
    return [line.rstrip("\n") for line in stdin]


@dataclass
class ChatResult:
    model: str
    answers: list[dict[str, str]] = field(default_factory=list)  # {prompt, tuned?, base?}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def chat(
    target: str | Path,
    prompts: list[str],
    which: tuple[str, ...] = ("tuned",),
    system: str | None = None,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    loaded: Loaded | None = None,
) -> ChatResult:
    """Answer each prompt as its own conversation (greedy by default, as `eval` does), with each model asked for."""
    loaded = loaded or load(target)
    conversation = Conversation(loaded, sampling_for(loaded, max_new_tokens, temperature, top_p, seed), system)
    result = ChatResult(loaded.name)
    for prompt in prompts:
        row = {"prompt": prompt}
        for model in which:
            row[model] = "".join(conversation.reply(prompt, model, remember=False))
        result.answers.append(row)
    return result


# --- interactive ------------------------------------------------------------------------------------

HELP = "commands: /reset (forget the conversation), /system TEXT (set the system prompt and reset), /quit"


def repl(conversation: Conversation, which: tuple[str, ...], read: Callable[[str], str], out: TextIO) -> None:
    """Read a line, stream the answer(s); /reset, /system TEXT, /quit. Ends on /quit or end of input."""
    out.write(
        f"chatting with {conversation.loaded.name} ({'greedy' if conversation.sampling.temperature <= 0 else 'sampling'}); {HELP}\n"
    )
    while True:
        try:
            line = read("> ").strip()
        except EOFError:  # Ctrl-D: end the prompt's line, so the shell's prompt starts on its own
            out.write("\n")
            return
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            conversation.reset()
            out.write("(conversation reset)\n")
            continue
        if line.startswith("/system"):
            conversation.system = line.removeprefix("/system").strip() or None
            conversation.reset()
            out.write(f"(system prompt {'set' if conversation.system else 'cleared'}; conversation reset)\n")
            continue
        if line.startswith("/"):
            out.write(f"unknown command {line.split()[0]}; {HELP}\n")
            continue
        for model in which:
            out.write(f"{model}: " if len(which) > 1 else "")
            for piece in conversation.reply(line, model, remember=model == which[-1]):
                out.write(piece)
                out.flush()
            out.write("\n")
