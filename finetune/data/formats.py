"""Turn rows of the five formats into samples, rejecting malformed rows with their file and row.

A sample is either a chat (`messages`: role/content turns, rendered by the chat template)
or raw text (`prompt` + `completion`, the completion trained). Every later step sees only
samples, so formats differ in exactly one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune.recipe.schema import DataSource
from finetune.recipe.yaml_source import SURROGATE

ROLES = ("system", "user", "assistant")
# A conversation of more turns is refused: masks are found by rendering each assistant turn's prefix, which
# costs turns^2 (a 10,000-turn row would take hours); real multi-turn data stays far below.
MAX_TURNS = 1000
MAX_ROW_CHARS = 16 * 2**20  # the same bound as one row's bytes in sources.MAX_ROW_BYTES


@dataclass(frozen=True)
class Sample:
    where: str
    messages: tuple[tuple[str, str], ...] = ()  # (role, content); empty for raw text
    prompt: str = ""
    completion: str = ""
    source: int = 0  # index of its data.train source, for weighted mixing (data/mix.py)
    slice: str | None = None  # a held-out row's slice (its source's `slice:`, or its `eval.slice_by` column)

    @property
    def is_chat(self) -> bool:
        return bool(self.messages)

    def as_messages(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]

    def key(self) -> tuple:
        """Identity for duplicate detection between train and eval."""
        return (self.messages, self.prompt, self.completion)


@dataclass(frozen=True)
class Judged:
    """A completion of a prompt with a verdict: one side of a preference pair, or a KTO row.

    `prompt` holds the turns before the answer (ending on the user's); `pair` numbers the pair a
    side came from (-1 for an unpaired row), so that paired sides stay together.
    """

    where: str
    prompt: tuple[tuple[str, str], ...]
    completion: str
    desirable: bool
    pair: int = -1
    slice: str | None = None  # a held-out row's slice, as a Sample's

    def as_sample(self) -> Sample:
        """The chat up to and including this completion, for generation metrics (reference = completion)."""
        return Sample(self.where, messages=(*self.prompt, ("assistant", self.completion)), slice=self.slice)


class BadRow(ValueError):
    """A row that does not fit its format; the message says what is wrong with it, `reason` counts it."""

    def __init__(self, message: str, reason: str = "wrong_type"):
        super().__init__(message)
        self.reason = reason


def to_sample(row: Any, where: str, source: DataSource) -> Sample:
    """Validate one row of `source.format` and return it as a Sample; raise BadRow."""
    if not isinstance(row, dict):
        raise BadRow(f"expected an object with fields, got {type(row).__name__}", "not_an_object")
    sample = _sample(row, where, source)
    if sum(len(c) for _, c in sample.messages) + len(sample.prompt) + len(sample.completion) > MAX_ROW_CHARS:
        raise BadRow(f"more than {MAX_ROW_CHARS // 2**20}M characters of text in one row", "too_large")
    return sample


def _sample(row: dict, where: str, source: DataSource) -> Sample:
    get = _getter(row, source)
    if source.format == "messages":
        return Sample(where, messages=_messages(get("messages")))
    if source.format == "alpaca":
        instruction, extra = _text(get("instruction"), "instruction"), _text(get("input", ""), "input", empty=True)
        system = _text(get("system", ""), "system", empty=True)
        turns = [("system", system)] if system.strip() else []
        turns += [("user", f"{instruction}\n\n{extra}" if extra.strip() else instruction), ("assistant", get("output"))]
        return Sample(where, messages=_messages([{"role": r, "content": c} for r, c in turns]))
    if source.format == "completion":
        if _has(row, source, "text") and not _has(row, source, "prompt"):
            return Sample(where, completion=_text(get("text"), "text"))
        return Sample(
            where, prompt=_text(get("prompt"), "prompt", empty=True), completion=_text(get("completion"), "completion")
        )
    # preference: SFT trains on the chosen conversation, in either shape (a prompt with text answers, or chosen and
    # rejected conversations sharing their prompt turns); the pair is read as the preference stages read it
    chosen, _ = to_judged(row, where, source)
    return Sample(where, messages=_messages([{"role": r, "content": c} for r, c in chosen.as_sample().messages]))


def to_judged(row: Any, where: str, source: DataSource, pair: int = -1) -> list[Judged]:
    """A `preference` row as [chosen, rejected], an `unpaired` row as [completion]; raise BadRow."""
    if not isinstance(row, dict):
        raise BadRow(f"expected an object with fields, got {type(row).__name__}")
    get = _getter(row, source)
    if source.format == "unpaired":
        label = get("label")
        if isinstance(label, str) and label.strip().lower() in ("true", "false"):  # CSV cells are text
            label = label.strip().lower() == "true"
        if not isinstance(label, bool):
            raise BadRow(f"field 'label' must be true or false, got {label!r}")
        answer = get("completion")
        prompt = _prompt_turns(get("prompt"), answer)
        return [Judged(where, prompt, _text_or_turns(answer, "completion"), label, pair)]
    if source.format != "preference":
        raise BadRow(f"format {source.format} has no chosen/rejected answers; preference methods need preference data")
    chosen, rejected = get("chosen"), get("rejected")
    prompt_value = get("prompt", None)
    if prompt_value is None and isinstance(chosen, list) and isinstance(rejected, list):
        prompt_value = chosen[:-1]  # conversations: the prompt is the turns that chosen and rejected share
        if list(rejected[:-1]) != list(prompt_value):
            raise BadRow("chosen and rejected conversations must share every turn but their last")
    prompt = _prompt_turns(prompt_value, chosen)
    _prompt_turns(prompt_value, rejected)
    good, bad = _text_or_turns(chosen, "chosen"), _text_or_turns(rejected, "rejected")
    if good.strip() == bad.strip():
        raise BadRow("chosen and rejected are identical: the pair prefers nothing")
    return [Judged(where, prompt, good, True, pair), Judged(where, prompt, bad, False, pair)]


def _prompt_turns(value: Any, answer: Any) -> tuple[tuple[str, str], ...]:
    """The turns before the answer: a text prompt is one user turn; an answer given as a conversation that
    repeats the prompt turns must start with them exactly."""
    if value is None:
        raise BadRow("missing field 'prompt'")
    if isinstance(value, str):
        return (("user", _text(value, "prompt")),)
    if isinstance(answer, list) and len(answer) > 1 and list(answer[:-1]) != list(value):
        raise BadRow("an answer given as a conversation must repeat the prompt turns exactly before its last turn")
    if not isinstance(value, list) or not value:
        raise BadRow("field 'prompt' must be text or a non-empty list of {role, content} turns")
    return _messages([*value, {"role": "assistant", "content": "-"}])[:-1]


def _getter(row: dict, source: DataSource):
    missing = object()

    def get(field: str, default: Any = missing) -> Any:
        column = source.columns.get(field, field)
        if column in row and row[column] is not None:
            return row[column]
        if default is not missing:
            return default
        raise BadRow(
            f"missing field {column!r}" + (f" (the {field!r} of format {source.format})" if column != field else ""),
            "missing_field",
        )

    return get


def _has(row: dict, source: DataSource, field: str) -> bool:
    return row.get(source.columns.get(field, field)) is not None


def _text(value: Any, field: str, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise BadRow(f"field {field!r} must be text, got {type(value).__name__}")
    _encodable(value, f"field {field!r}")
    if not empty and not value.strip():
        raise BadRow(f"field {field!r} is empty", "empty_text")
    return value


def _encodable(text: str, what: str) -> None:
    """A lone surrogate (JSON's `"\\ud800"`) is valid JSON but not text: no tokenizer or file can encode it.
    ASCII text holds none, and `isascii` reads a flag the string keeps (no scan)."""
    if not text.isascii() and SURROGATE.search(text):
        raise BadRow(f"{what} holds a lone surrogate escape (such as \\ud800), which is not text", "not_utf8")


def _text_or_turns(value: Any, field: str) -> str:
    """A preference answer: text, or a list of turns whose last is the assistant's."""
    if isinstance(value, list) and value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant":
        return _text(value[-1].get("content"), f"{field}[-1].content")
    return _text(value, field)


def _messages(value: Any) -> tuple[tuple[str, str], ...]:
    """Check role/content turns: known roles, system first only, user and assistant alternating, ending on assistant."""
    if not isinstance(value, list) or not value:
        raise BadRow("'messages' must be a non-empty list of {role, content} turns")
    if len(value) > MAX_TURNS:
        raise BadRow(f"{len(value)} turns; at most {MAX_TURNS} per row (split long conversations)", "too_many_turns")
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise BadRow(f"turn {i} must be an object with 'role' and 'content'")
        role, content = turn["role"], turn["content"]
        if role not in ROLES:
            hint = " (ShareGPT's human/gpt: map them to user/assistant)" if role in ("human", "gpt") else ""
            raise BadRow(f"turn {i} has unknown role {role!r}; roles are {', '.join(ROLES)}{hint}", "unknown_role")
        if not isinstance(content, str):
            raise BadRow(f"turn {i} ({role}) content must be text, got {type(content).__name__}")
        _encodable(content, f"turn {i} ({role}) content")
        if role == "assistant" and not content.strip():
            raise BadRow(f"turn {i} (assistant) is empty", "empty_text")
        turns.append((role, content))
    body = turns[1:] if turns[0][0] == "system" else turns
    for i, (role, _) in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            offset = len(turns) - len(body)
            raise BadRow(
                f"turn {i + offset} is {role!r} where {expected!r} was expected (system first, then user/assistant "
                "alternating)",
                "turn_order",
            )
    if body[-1][0] != "assistant" if body else True:
        raise BadRow("the last turn must be the assistant's (it is what the model learns)", "turn_order")
    return tuple(turns)
