"""Chat templates and loss masks.

Masks come from the template itself, with no `{% generation %}` markers needed: an
assistant turn's trained text is what rendering `messages[:i+1]` adds to rendering
`messages[:i]` with the generation prompt, so it always includes the turn's end-of-turn
token, and nothing of system or user turns. Tokens are then labelled by their character
offsets in the one full rendering, so BPE merges across turn boundaries cannot shift a mask.
"""

from __future__ import annotations

import bisect
import re
import warnings
from array import array
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.data.formats import Sample
from finetune.data.tokens import IGNORE
from finetune.errors import Problem, UserError
from finetune.recipe.schema import BUILTIN_TEMPLATES

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from finetune.data.tokens import Tokens
    from finetune.recipe.schema import Recipe

Segments = list[tuple[str, bool]]  # (text, trained)


def builtin_template(name: str) -> str:
    return resources.files("finetune.templates").joinpath(f"{name}.jinja").read_text(encoding="utf-8")


def apply_chat_template(
    tokenizer: PreTrainedTokenizerBase, choice: str, add: str | list[str] = "none", where: str = ""
) -> list[str]:
    """Set the recipe's template on the tokenizer, so that it is saved with the adapter and used everywhere after;
    add the special tokens `add` asks for (`data.add_special_tokens`, located by `where`). The tokens added."""
    if choice in BUILTIN_TEMPLATES:
        tokenizer.chat_template = builtin_template(choice)
    elif choice != "auto":
        tokenizer.chat_template = Path(choice).read_text(encoding="utf-8")
    elif not tokenizer.chat_template:
        raise UserError(
            "data.chat_template: the tokenizer has no chat template of its own; "
            f"set one of {', '.join(BUILTIN_TEMPLATES)} or a .jinja file"
        )
    added = add_special_tokens(tokenizer, add, where)
    if missing := missing_markers(tokenizer):
        warnings.warn(
            f"data.chat_template {choice}: {', '.join(missing)} not in the tokenizer's vocabulary, so each is split "
            "into several ordinary tokens the model must learn to use as markers; set data.add_special_tokens: auto "
            "to add them as new tokens (the embeddings grow and their rows are trained), or use a template the base "
            "model's tokenizer has tokens for",
            stacklevel=2,
        )
    return added


def add_special_tokens(tokenizer: PreTrainedTokenizerBase, add: str | list[str], where: str = "") -> list[str]:
    """Add `data.add_special_tokens` to the tokenizer as special tokens (never split, skipped when decoding):
    `auto` the template's markers it lacks, a list exactly those (each must be new). The tokens added, in id order."""
    if add == "none":
        return []
    if add == "auto":
        tokens = missing_markers(tokenizer)
    else:
        vocab = tokenizer.get_vocab()
        if known := [t for t in add if t in vocab]:
            raise UserError(Problem(
                ", ".join(f"{t} is already token {vocab[t]}" for t in known) + " of the tokenizer; list only new "
                "tokens, or use auto (the chat template's markers the tokenizer lacks)",
                where, "data.add_special_tokens",
            ))  # fmt: skip
        tokens = list(add)
    if tokens:
        tokenizer.add_special_tokens({"extra_special_tokens": tokens}, replace_extra_special_tokens=False)
        _end_turns_with(tokenizer, tokens)
    return tokens


def _end_turns_with(tokenizer: PreTrainedTokenizerBase, added: list[str]) -> None:
    """Make the new token that closes an assistant turn (ChatML's <|im_end|>) the tokenizer's eos, which generation
    stops at (`generation.stop_ids`): a base tokenizer's own eos (`</s>`) never follows an answer in this template,
    so eval, chat and serve would otherwise talk past the end of the turn."""
    turn = render(tokenizer, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ANSWER"}])
    after = turn[turn.rfind("ANSWER") + len("ANSWER") :]
    closing = min((t for t in added if t in after), key=after.index, default=None)
    if closing is not None and tokenizer.eos_token not in after:
        tokenizer.eos_token = closing


def new_token_ids(tokenizer: PreTrainedTokenizerBase, tokens: list[str]) -> list[int]:
    return [int(i) for i in tokenizer.convert_tokens_to_ids(tokens)]


# Marker-like literals of a template: `<|im_start|>`, `<start_of_turn>`, `</s>` (what a tokenizer holds as special tokens)
_MARKER = re.compile(r"<\|?/?[A-Za-z_][\w.]*\|?>")


def missing_markers(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The template's marker literals the tokenizer lacks as single tokens (ChatML's on a base model's tokenizer):
    each is then split into several ordinary tokens, whose embeddings mean something else, unless
    `data.add_special_tokens` adds them."""
    vocab = tokenizer.get_vocab()
    markers = dict.fromkeys(_MARKER.findall(tokenizer.chat_template or ""))
    return [m for m in markers if m not in vocab]


def recipe_template(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """`apply_chat_template` with the recipe's template and new tokens, errors located at the recipe's line."""
    where = recipe.source.where(("data", "add_special_tokens")) if recipe.source else ""
    return apply_chat_template(tokenizer, recipe.data.chat_template, recipe.data.add_special_tokens, where)


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


class Renderer:
    """`render` for many rows: the tokenizer's template compiled once and called directly.

    `apply_chat_template` spends most of a call copying and normalising the messages and looking the template up
    (about 2/3 of its time on two-turn chats); our messages are plain role/content strings, for which the template
    then sees exactly what it is given here. The first rendering is compared with `apply_chat_template`'s and on
    any difference (a transformers version that prepares messages otherwise) every row goes through it.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self._template = None
        self._kwargs: dict[str, str] = {}
        self._checked = False
        self._bos: bool | None = None
        if tokenizer.chat_template:
            try:
                from transformers.utils.chat_template_utils import _compile_jinja_template
            except ImportError:  # a transformers without it: the public path, slower
                return
            self._template = _compile_jinja_template(tokenizer.get_chat_template())
            self._kwargs = dict(tokenizer.special_tokens_map)  # what apply_chat_template passes the template

    def __call__(self, messages: list[dict], generation_prompt: bool = False) -> str:
        if self._template is None:
            return render(self.tokenizer, messages, generation_prompt)
        text = self._template.render(
            messages=messages, tools=None, documents=None, add_generation_prompt=generation_prompt, **self._kwargs
        )
        if not self._checked:
            self._checked = True
            reference = render(self.tokenizer, messages, generation_prompt)
            if text != reference:
                self._template, text = None, reference
        return text

    def adds_bos(self) -> bool:
        if self._bos is None:
            self._bos = _adds_bos(self.tokenizer)
        return self._bos


def segments(tokenizer: PreTrainedTokenizerBase, sample: Sample, train_on: str) -> Segments:
    """The sample's full text cut into trained and untrained pieces."""
    return sample_segments(Renderer(tokenizer), sample, train_on)


def sample_segments(render_: Renderer, sample: Sample, train_on: str) -> Segments:
    """`segments` with a renderer shared by many samples.

    An assistant turn's trained text starts where `messages[:i]` with the generation prompt ends and ends
    where `messages[:i+1]` ends; for the last turn that rendering is the full one, so it is not rendered twice."""
    tokenizer = render_.tokenizer
    if not sample.is_chat:
        bos = tokenizer.bos_token if render_.adds_bos() else ""
        pieces = [(bos + sample.prompt, False), (sample.completion + (tokenizer.eos_token or ""), True)]
        return [(t, train_on == "all" or trained) for t, trained in pieces if t]
    messages = sample.as_messages()
    full = render_(messages)
    if train_on == "all":
        return [(full, True)]
    out: Segments = []
    pos = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render_(messages[:i], generation_prompt=True)
        upto = full if i == len(messages) - 1 else render_(messages[: i + 1])
        start, end = len(prefix), len(upto)
        if not (full.startswith(upto) and upto.startswith(prefix) and pos <= start < end):
            raise UserError(
                f"{sample.where}: the chat template renders a conversation differently from its prefixes, "
                "so assistant tokens cannot be located; use another data.chat_template or train_on: all"
            )
        out += [(full[pos:start], False), (full[start:end], True)]
        pos = end
    out.append((full[pos:], False))
    return [(t, trained) for t, trained in out if t]


def _adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id


def tokenize(tokenizer: PreTrainedTokenizerBase, batch: list[Segments]) -> Tokens:
    """input_ids and labels of each segmented text (iterating gives (ids, labels) lists); labels are IGNORE outside
    trained pieces.

    A token takes the mark of the piece its first character is in. Token start offsets only grow along a text,
    so each piece's tokens are one run, found by bisecting the starts at the piece's end: a few probes per piece,
    read from the Rust encoding one at a time (copying out every token's offsets cost more than the bisection),
    and the labels are the ids with each untrained run masked, in one vectorised call per batch."""
    import numpy as np

    from finetune.data.tokens import Tokens, starts_of

    texts = ["".join(t for t, _ in segs) for segs in batch]
    flat, lengths, counts, flags = array("i"), [], [], []  # C int: 32 bits, the type of Tokens.ids
    for segs, (ids, starts) in zip(batch, _ids_and_starts(tokenizer, texts), strict=True):
        flat.extend(ids)
        lengths.append(len(ids))
        first, pos = 0, 0
        for k, (text, trained) in enumerate(segs):
            pos += len(text)
            last = len(ids) if k == len(segs) - 1 else bisect.bisect_right(starts, pos - 1, lo=first)
            counts.append(last - first)
            flags.append(trained)
            first = last
    ids = np.frombuffer(flat, np.int32) if flat else np.zeros(0, np.int32)
    labels = np.where(np.repeat(np.array(flags, bool), np.array(counts, np.int64)), ids, IGNORE)
    return Tokens(ids, labels, starts_of(lengths))


class _Starts:
    """The start offsets of an encoding's tokens, read one at a time from the Rust encoding (for bisection)."""

    __slots__ = ("encoding",)

    def __init__(self, encoding: Any) -> None:
        self.encoding = encoding

    def __len__(self) -> int:
        return len(self.encoding)

    def __getitem__(self, i: int) -> int:
        return self.encoding.token_to_chars(i)[0]


def _ids_and_starts(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[tuple[list[int], Sequence[int]]]:
    """Token ids and start offsets of each text, as `tokenizer(texts, add_special_tokens=False,
    return_offsets_mapping=True)` gives them, from the Rust tokenizer's encodings directly.

    transformers copies every encoding into dicts of lists first. Its own call on the first text sets the Rust
    tokenizer up as it would (no truncation or padding) and is compared with ours; on any difference every
    text goes through transformers."""
    if not texts:
        return []
    head = tokenizer(texts[:1], add_special_tokens=False, return_offsets_mapping=True)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        encodings = backend.encode_batch(texts, add_special_tokens=False)
        if encodings[0].ids == head["input_ids"][0] and encodings[0].offsets == head["offset_mapping"][0]:
            return [(e.ids, _Starts(e)) for e in encodings]
    every = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return [(list(ids), [start for start, _ in offsets])
            for ids, offsets in zip(every["input_ids"], every["offset_mapping"], strict=True)]  # fmt: skip


def prompt_and_reference(tokenizer: PreTrainedTokenizerBase, sample: Sample) -> tuple[str, str]:
    """The text the model is given (up to the generation prompt) and the answer expected after it."""
    if sample.is_chat:
        messages = sample.as_messages()
        return render(tokenizer, messages[:-1], generation_prompt=True), messages[-1]["content"]
    return sample.prompt, sample.completion


def encode(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Prompt token ids as generate() sees them (the template already holds any special tokens)."""
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]
