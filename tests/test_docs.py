"""The docs cannot drift from the code: every `finetune ...` command they show parses against the real CLI.

Code blocks (bash, sh, shell, console) hold full command lines: each is parsed by the click parser typer builds
from `finetune.cli.app`, so a command, a subcommand or a flag that does not exist, a flag missing its value, an
extra argument or a missing required option fails. Inline code such as `finetune eval RUN --require 'M>=V'` is
often a synopsis (`[--set k=v]`, `A | B`), so for it the command path and every flag named must exist.
Placeholders (RUN, RECIPE, N) are fine as values. Nothing here imports torch: the CLI keeps its imports lazy.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from shared_docs import _blocks, _root, block_commands, parse_problem

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FLAG = re.compile(r"^--?[A-Za-z][\w-]*")
# --- where the commands are ---------------------------------------------------------------------------------


def inline_commands(text: str) -> list[tuple[int, str]]:
    """(line, text) of every inline code span in the prose that starts with `finetune ` or runs `-m finetune.cli`."""
    _, prose = _blocks(text)
    found = []
    for match in re.finditer(r"`([^`\n]+(?:\n[^`\n]+)?)`", prose):
        span = " ".join(match.group(1).split())
        if span.startswith("finetune ") or "-m finetune.cli " in span:
            found.append((prose.count("\n", 0, match.start()) + 1, span))
    return found


# --- what the CLI says about them ---------------------------------------------------------------------------


def synopsis_problem(span: str) -> str | None:
    """The command path of an inline synopsis exists and every flag it names is an option of that command."""
    words = span.replace("\\|", " | ").split()
    words = words[words.index("finetune.cli") + 1 :] if "finetune.cli" in words else words[1:]
    command, path = _root(), ["finetune"]
    while hasattr(command, "commands") and words and not words[0].startswith("-"):
        name = words[0].strip("[]()`'\".,;:")
        if name not in command.commands:
            if re.match(r"^[a-z][a-z-]*$", name):  # a command name, not a placeholder or a bracket
                return f"no command {' '.join([*path, name])!r}"
            break
        command, path, words = command.commands[name], [*path, name], words[1:]
    options = {o for p in command.params for o in [*p.opts, *p.secondary_opts]} | {"--help"}
    for word in words:
        flag = FLAG.match(word.strip("[](){}`'\",;…"))
        if flag and flag.group(0) not in options:
            return f"{' '.join(path)} has no option {flag.group(0)}"
    return None


def problems(text: str, name: str = "page") -> list[str]:
    """Every command of a Markdown page that the CLI refuses, with its line."""
    found = []
    for number, args in block_commands(text):
        problem = parse_problem(args)
        if problem:
            found.append(f"{name}:{number}: finetune {shlex.join(args)}: {problem}")
    for number, span in inline_commands(text):
        problem = synopsis_problem(span)
        if problem:
            found.append(f"{name}:{number}: `{span}`: {problem}")
    return found


# --- the tests ----------------------------------------------------------------------------------------------


def _name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_command_in_the_docs_parses_against_the_cli(page):
    assert problems(page.read_text(encoding="utf-8"), _name(page)) == []


def test_the_check_covers_the_examples():
    """The extractor finds the commands that are there: a regression in it would pass every page vacuously."""
    texts = [p.read_text(encoding="utf-8") for p in PAGES]
    blocks = sum(len(block_commands(t)) for t in texts)
    inline = sum(len(inline_commands(t)) for t in texts)
    assert blocks >= 40 and inline >= 80, (blocks, inline)
    readme = [args for _, args in block_commands((ROOT / "README.md").read_text(encoding="utf-8"))]
    assert ["train", "recipes/quickstart.yaml"] in readme, readme  # the fresh-machine line, after its `&&`s


PLANTED = """
Some prose with `finetune train RECIPE --resume` and `finetune eval RUN --no-such-gate`.

```bash
# a comment: finetune train --not-checked
finetune train recipes/quickstart.yaml --set lora.rank=8 \\
  --resume                                  # continued line
OMP_NUM_THREADS=1 finetune sweep s.yaml --worker & finetune sweep s.yaml --wrker & wait
finetune trian recipes/quickstart.yaml
finetune runs shw runs/x
finetune eval runs/x --limit N --require 'loss<=0.5'
finetune eval runs/x --limit
finetune export runs/x
torchrun --nproc_per_node 2 -m finetune.cli train r.yaml --overwrit
```

```text
finetune train x.yaml --this-is-output-not-a-command
```
"""


def test_a_planted_bad_flag_fails():
    """Each planted mistake is found, at its line, and nothing else is: the check is not vacuous."""
    found = problems(PLANTED, "planted")
    assert len(found) == 7, "\n".join(found)
    for line, needle in (
        (2, "--no-such-gate"),
        (8, "--wrker"),
        (9, "trian"),
        (10, "shw"),
        (12, "requires an argument"),
        (13, "format"),
        (14, "--overwrit"),
    ):
        assert any(f.startswith(f"planted:{line}:") and needle in f for f in found), (line, needle, found)


def test_shell_words_and_continuations():
    assert block_commands("```bash\nfinetune train a.yaml \\\n  --resume   # note\n```") == [
        (2, ["train", "a.yaml", "--resume"])
    ]
    assert block_commands("```console\n$ finetune runs list\nruns/x completed\n```") == [(2, ["runs", "list"])]
    assert block_commands("```bash\nfinetune chat runs/q --json < prompts.txt\n```") == [
        (2, ["chat", "runs/q", "--json"])
    ]
    assert inline_commands("see `finetune\neval RUN` there") == [(1, "finetune eval RUN")]


def test_cli_reference_is_generated_from_the_app():
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "scripts" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    page = (ROOT / "docs" / "reference" / "cli.md").read_text(encoding="utf-8")
    assert page == module.markdown(), "run: python scripts/cli_reference.py"
    for command in _root().commands:
        assert f"`finetune {command}`" in page, command


def _python_imports(text: str) -> list[tuple[str, str]]:
    """(module, name) of every `from finetune... import name` in the page's python blocks."""
    found = []
    for language, _, body in _blocks(text)[0]:
        if language == "python":
            for node in ast.walk(ast.parse(body)):
                if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "finetune":
                    found += [(node.module, alias.name) for alias in node.names]
    return found


def _defines(module: str, name: str) -> bool:
    """The module's source defines or imports `name` at its top level (read, not imported: no torch)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return False
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and node.name == name:
            return True
        if isinstance(node, (ast.Import, ast.ImportFrom)) and name in {a.asname or a.name for a in node.names}:
            return True
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return True
    return False


def test_python_examples_import_what_exists():
    imports = [(p, m, n) for p in PAGES for m, n in _python_imports(p.read_text(encoding="utf-8"))]
    assert any(p.name == "README.md" for p, _, _ in imports), "the README shows the Python entry point"
    missing = [f"{_name(p)}: from {m} import {n}" for p, m, n in imports if not _defines(m, n)]
    assert missing == []


def test_readme_starts_with_the_two_fresh_machine_commands_and_stays_short():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert lines[2] == "```bash", lines[:3]
    assert lines[4].endswith("pip install -e . && finetune train recipes/quickstart.yaml")
    assert lines[7].endswith('pip install -e ".[test]" && lint-imports && python -m pytest -q -p no:cacheprovider')
    assert len(text.encode()) <= 15 * 1024, len(text.encode())


def test_every_docs_page_is_in_the_nav():
    """mkdocs build --strict says so too, but only where mkdocs is installed; this needs nothing."""
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    assert {p for p in pages if f": {p}" not in nav} == set()


def test_checking_the_docs_imports_no_torch():
    code = "import sys; sys.path.insert(0, 'tests/support'); import tests.test_docs as t; t.problems(open('README.md').read()); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _slug(heading: str) -> str:
    """Python-Markdown's toc anchor for a heading (what mkdocs links to)."""
    text = re.sub(r"[^\w\s-]", "", heading.replace("`", "")).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def test_readme_links_reach_pages_and_headings():
    """mkdocs --strict checks the links inside docs/; the README is outside it, so this checks its links."""
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", (ROOT / "README.md").read_text(encoding="utf-8")):
        if "://" in target:
            continue
        path, _, anchor = target.partition("#")
        page = ROOT / path
        if not page.is_file():
            missing.append(target)
        elif anchor:
            headings = re.findall(r"^#+ (.+)$", _blocks(page.read_text(encoding="utf-8"))[1], re.M)
            if anchor not in {_slug(h) for h in headings}:
                missing.append(target)
    assert missing == []
