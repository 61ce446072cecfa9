"""Shared by test_docs and the tests that import from it."""

from __future__ import annotations

import functools
import re
import shlex
from typing import Any

import typer

from finetune.cli import app

SHELL_FENCES = {"bash", "sh", "shell", "console", "zsh"}


WRAPPERS = {"srun", "time", "nohup", "exec", "env"}  # commands that run the next word as a command


CONTROL = {"&&", "||", ";", "|", "&"}


REDIRECTS = {"<", ">", ">>", "2>", "&>"}


PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*(\.\.\.)?$|^<.*>$")


@functools.cache
def _root() -> Any:
    """The click group typer builds from the app: the parser `finetune` itself runs."""
    return typer.main.get_command(app)


def _blocks(text: str) -> tuple[list[tuple[str, int, str]], str]:
    """(fence language, first line number, body) of every fenced block, and the prose with the blocks blanked."""
    blocks, prose, fence, start, body = [], [], None, 0, []
    for number, line in enumerate(text.splitlines(), 1):
        if fence is None and line.lstrip().startswith("```"):
            fence, start, body = line.strip().strip("`").strip().lower(), number + 1, []
            prose.append("")
        elif fence is not None and line.strip().startswith("```"):
            blocks.append((fence, start, "\n".join(body)))
            fence = None
            prose.append("")
        elif fence is not None:
            body.append(line)
            prose.append("")
        else:
            prose.append(line)
    return blocks, "\n".join(prose)


def _shell_lines(language: str, body: str, first: int) -> list[tuple[int, str]]:
    """The command lines of a shell block: continuations joined; in a console block only the `$ ` lines."""
    lines, pending, pending_at = [], "", first
    for number, line in enumerate(body.splitlines(), first):
        if language == "console":
            if not line.startswith("$ ") and not pending:
                continue  # output
            line = line.removeprefix("$ ")
        if not pending:
            pending_at = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        lines.append((pending_at, pending + line))
        pending = ""
    if pending:
        lines.append((pending_at, pending))
    return lines


def _tokens(line: str) -> list[str]:
    """Shell words of one line, `#` comments dropped and control operators (`&&`, `|`, `&`, `;`) as their own words."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


def _invocations(tokens: list[str]) -> list[list[str]]:
    """The argument lists given to `finetune` (or `-m finetune.cli`) in one line of shell words."""
    found, segment = [], []
    for token in [*tokens, ";"]:
        if token in CONTROL:
            args = _finetune_args(segment)
            if args is not None:
                found.append(args)
            segment = []
        else:
            segment.append(token)
    return found


def _finetune_args(segment: list[str]) -> list[str] | None:
    """`finetune A B` -> [A, B]; also after env assignments, srun & co, and `python|torchrun|accelerate -m finetune.cli`."""
    words = _without_redirects(segment)
    while words and (re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]) or words[0] in WRAPPERS):
        words = words[1:]
    if words and words[0] == "finetune":
        return words[1:]
    if "-m" in words:
        at = words.index("-m")
        if words[at + 1 : at + 2] == ["finetune.cli"]:
            return words[at + 2 :]
    return None


def _without_redirects(words: list[str]) -> list[str]:
    out, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word in REDIRECTS:
            skip = True
        else:
            out.append(word)
    return out


def block_commands(text: str) -> list[tuple[int, list[str]]]:
    """(line, finetune arguments) of every command in the page's shell blocks."""
    found = []
    blocks, _ = _blocks(text)
    for language, first, body in blocks:
        if language.split()[0:1] and language.split()[0] not in SHELL_FENCES:
            continue  # yaml, python, text (output) ...
        if not language:
            continue  # an unlabelled block is a file tree or output
        for number, line in _shell_lines(language, body, first):
            found += [(number, args) for args in _invocations(_tokens(line))]
    return found


def parse_problem(args: list[str]) -> str | None:
    """Why the real click parser refuses these arguments, or None; an unconvertible placeholder value is fine."""
    root = _root()
    try:
        ctx = root.make_context("finetune", list(args))
        command = root
        while hasattr(command, "commands"):
            rest = _remaining(ctx)
            if not rest:
                return "no command given"
            name, command, rest = command.resolve_command(ctx, rest)
            ctx = command.make_context(name, rest, parent=ctx)
    except Exception as e:  # the parser's own errors; a bug in the CLI would show up here as well
        if type(e).__name__ == "BadParameter" and _placeholder_value(args, getattr(e, "param", None)):
            return None
        if type(e).__name__ == "Exit":  # --help, --version
            return None
        return f"{type(e).__name__}: {getattr(e, 'message', None) or e}"
    return None


def _remaining(ctx: Any) -> list[str]:
    """What a group left for its subcommand: the command name (click keeps it apart, as protected) and its args."""
    protected = getattr(ctx, "_protected_args", None) or getattr(ctx, "protected_args", None) or []
    return [*protected, *ctx.args]


def _placeholder_value(args: list[str], param: Any) -> bool:
    """A value such as N or RUN given to an option that wants a number: the docs' placeholder, not a mistake."""
    if param is None:
        return False
    opts = set(getattr(param, "opts", [])) | set(getattr(param, "secondary_opts", []))
    if param.param_type_name == "argument":
        return any(PLACEHOLDER.match(a) for a in args)
    values = [args[i + 1] for i, a in enumerate(args[:-1]) if a in opts]
    values += [a.split("=", 1)[1] for a in args if a.split("=", 1)[0] in opts and "=" in a]
    return any(PLACEHOLDER.match(v) for v in values)
