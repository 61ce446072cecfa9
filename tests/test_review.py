"""`finetune review` on a git repository built here: which recipes a commit touches, and how."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import tiny
from typer.testing import CliRunner

from finetune.cli import app
from finetune.plan import plan
from finetune.recipe.load import load_recipe
from finetune.review import gate, markdown, review

FRAGMENT = """\
lora:
  alpha: 16
  targets: [q_proj, v_proj]
train:
  max_steps: 4
  batch_size: 4
  gradient_checkpointing: false
"""


SWEEP = """\
recipe: e.yaml
fixed:
  train.max_steps: 2
  data.eval: {split_ratio: 0.25}
grid:
  lora.rank: [4, 8]
"""


def _recipe(name: str, model: Path, data: str = "../data/train.jsonl", rank: int = 8, extends: bool = True) -> str:
    head = "extends: ../configs/base.yaml\n" if extends else ""
    own = "" if extends else "  alpha: 16\n  targets: [q_proj]\n"
    return f"name: {name}\n{head}model: {{base: {model}}}\nlora:\n  rank: {rank}\n{own}" \
           f"data:\n  train: [{{path: {data}}}]\n  max_seq_length: 64\n"  # fmt: skip


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, env=env).stdout


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_model_dir) -> dict:
    """A committed repository, then the working tree edited: a rank, a fragment value two recipes read, a data
    file, an invalid value, a recipe added and one deleted, a sweep's grid and fixed value; e.yaml is untouched.
    Plans of both versions kept, and of the sweep's trials (rank 4 removed, 8 changed, 16 added)."""
    root = tmp_path_factory.mktemp("experiments")
    model = tiny_model_dir("llama")
    tiny.write_jsonl(root / "data" / "train.jsonl", tiny.reverse_rows(24))
    tiny.write_jsonl(root / "data" / "c.jsonl", tiny.reverse_rows(16, seed=1))
    (root / "configs").mkdir()
    (root / "configs" / "base.yaml").write_text(FRAGMENT)
    (root / "recipes").mkdir()
    for name in "abd":
        (root / "recipes" / f"{name}.yaml").write_text(_recipe(name, model))
    (root / "recipes" / "e.yaml").write_text(_recipe("e", model, extends=False))  # reads neither edit
    (root / "recipes" / "c.yaml").write_text(_recipe("c", model, "../data/c.jsonl", extends=False))
    (root / "recipes" / "g.yaml").write_text(_recipe("g", model, extends=False))
    (root / "recipes" / "s.yaml").write_text(SWEEP)  # a sweep of e.yaml: its trials are planned
    (root / ".gitignore").write_text("runs/\n")
    _git(root, "init", "-q", "-b", "main")
    _git(root, "add", ".")
    _git(root, "commit", "-q", "-m", "recipes")
    before = {n: plan(load_recipe(root / "recipes" / f"{n}.yaml")) for n in "abc"}
    (root / "recipes" / "a.yaml").write_text(_recipe("a", model, rank=16))  # a rank
    (root / "configs" / "base.yaml").write_text(FRAGMENT.replace("[q_proj, v_proj]", "[q_proj, k_proj, v_proj]"))
    tiny.write_jsonl(root / "data" / "c.jsonl", tiny.reverse_rows(20, seed=1))  # a data file only c reads
    (root / "recipes" / "d.yaml").write_text(_recipe("d", model).replace("rank: 8", "rank: 8\n  dropout: 2"))
    (root / "recipes" / "f.yaml").write_text(_recipe("f", model, extends=False))
    (root / "recipes" / "g.yaml").unlink()
    (root / "recipes" / "s.yaml").write_text(SWEEP.replace("[4, 8]", "[8, 16]").replace("steps: 2", "steps: 3"))
    after = {n: plan(load_recipe(root / "recipes" / f"{n}.yaml")) for n in "abc"}
    e = root / "recipes" / "e.yaml"
    trials = {(rank, steps): plan(load_recipe(e, [f"lora.rank={rank}", f"train.max_steps={steps}", "data.eval.split_ratio=0.25"]))
              for rank, steps in ((4, 2), (8, 2), (8, 3), (16, 3))}  # fmt: skip
    cwd = Path.cwd()
    os.chdir(root)
    try:
        result = review("HEAD")
    finally:
        os.chdir(cwd)
    return {"root": root, "result": result, "before": before, "after": after, "trials": trials}


def test_lists_exactly_the_affected_recipes(repo):
    found = {r.path: r.status for r in repo["result"].recipes}
    assert found == {"recipes/a.yaml": "changed", "recipes/b.yaml": "changed", "recipes/c.yaml": "changed",
                     "recipes/d.yaml": "changed", "recipes/f.yaml": "added", "recipes/g.yaml": "deleted",
                     "recipes/s.yaml": "changed"}  # fmt: skip
    assert repo["result"].unchanged == 1  # e.yaml reads neither the fragment nor c.jsonl


def _one(repo: dict, name: str):
    return next(r for r in repo["result"].recipes if r.path == f"recipes/{name}.yaml")


@pytest.mark.parametrize("name", ["a", "b"])
def test_parameter_deltas_are_plans_of_both_versions(repo, name):
    r = _one(repo, name)
    before, after = repo["before"][name], repo["after"][name]
    for figure, old, new in [
        ("trainable parameters", before.params.trainable, after.params.trainable),
        ("total parameters", before.params.total, after.params.total),
        ("peak memory", before.memory.total, after.memory.total),
        ("steps", before.work.total_steps, after.work.total_steps),
    ]:
        f = r.figure(figure)
        assert (f.old, f.new) == (old, new), figure
    assert r.figure("trainable parameters").delta > 0  # more targets (both), a higher rank (a)
    assert r.data == [] and r.files == []  # neither reads a changed data file


def test_key_by_key_diff_names_where_each_value_came_from(repo):
    a = {c.key: c for c in _one(repo, "a").changes}
    assert set(a) == {"lora.rank", "lora.targets"}
    assert (a["lora.rank"].old, a["lora.rank"].new) == (8, 16)
    assert a["lora.rank"].old_where == "HEAD:recipes/a.yaml:5:3" and a["lora.rank"].new_where == "recipes/a.yaml:5:3"
    assert a["lora.targets"].new == ["q_proj", "k_proj", "v_proj"] and a["lora.targets"].old == ["q_proj", "v_proj"]
    assert a["lora.targets"].new_where.startswith("configs/base.yaml:3:")  # changed only through the fragment
    b = {c.key: c for c in _one(repo, "b").changes}
    assert set(b) == {"lora.targets"}


def test_data_diff_of_a_recipe_whose_data_file_changed(repo):
    c = _one(repo, "c")
    assert c.changes == []  # the recipe text is the same: only the file it reads changed
    assert [(f.path, f.data) for f in c.files] == [("data/c.jsonl", True)]
    rows = c.figure("rows: data/c.jsonl")
    assert (rows.old, rows.new) == (16, 20)
    assert c.figure("train rows").delta == 4 and c.figure("trained tokens").delta > 0
    assert {"token length p50", "token length max", "truncated"} <= {f.name for f in c.data}


def test_invalid_new_version_is_located_and_added_and_deleted_are_listed(repo):
    d = _one(repo, "d")
    assert not d.valid and d.plan == []
    assert len(d.problems) == 1 and d.problems[0].startswith("recipes/d.yaml:6:")
    assert "lora.dropout" in d.problems[0]
    assert not repo["result"].valid
    f, g = _one(repo, "f"), _one(repo, "g")
    assert f.valid and f.figure("trainable parameters").old is None and f.figure("trainable parameters").new > 0
    assert g.status == "deleted" and g.plan == [] and g.problems == []


def test_sweep_trials_are_planned_from_their_resolved_recipes(repo):
    s, plans = _one(repo, "s"), repo["trials"]
    assert s.kind == "sweep" and s.valid and s.status == "changed"
    changes = {c.key: c for c in s.changes}  # the sweep's own keys; lora.rank and max_steps vary by trial
    assert set(changes) == {"grid.lora.rank", "fixed.train.max_steps"}
    assert (changes["grid.lora.rank"].old, changes["grid.lora.rank"].new) == ([4, 8], [8, 16])
    assert changes["grid.lora.rank"].old_where.startswith("HEAD:recipes/s.yaml:6:")
    trials = {t.name: t for t in s.trials}
    assert {n: t.status for n, t in trials.items()} == {"rank-8": "changed", "rank-16": "added", "rank-4": "removed"}
    for name, old, new in [("rank-4", plans[4, 2], None), ("rank-8", plans[8, 2], plans[8, 3]),
                           ("rank-16", None, plans[16, 3])]:  # fmt: skip
        for figure, of in [("trainable parameters", lambda p: p.params.trainable), ("steps", lambda p: p.work.total_steps),
                           ("peak memory", lambda p: p.memory.total)]:  # fmt: skip
            f = trials[name].figure(figure)
            assert (f.old, f.new) == (old and of(old), new and of(new)), (name, figure)
    assert trials["rank-8"].figure("trainable parameters").delta == 0 and trials["rank-8"].figure("steps").delta == 1
    steps, peak = s.figure("steps"), s.figure("peak memory")  # the whole sweep: steps added up, the largest memory
    assert (steps.old, steps.new) == (2 + 2, 3 + 3)
    assert (peak.old, peak.new) == (plans[8, 2].memory.total, plans[16, 3].memory.total)
    assert s.figure("trials").new == 2 and s.data == []


def test_a_search_is_planned_at_its_extremes(repo, tmp_path, monkeypatch):
    import finetune.review as stage
    from finetune.sweep.file import load_sweep

    search = tmp_path / "search.yaml"
    search.write_text(f"recipe: {repo['root'] / 'recipes' / 'e.yaml'}\nfixed: {{data.eval: {{split_ratio: 0.25}}}}\npruning: {{method: none}}\nsearch:\n  trials: 20\n  space:\n"
                      "    lora.rank: {log_integer: [2, 64]}\n    lora.dropout: {choice: [0.0, 0.1, 0.2]}\n")  # fmt: skip
    sweep = load_sweep(search)
    points, how = stage._trial_points(sweep)
    assert len(points) == 6 and {p["lora.rank"] for p in points} == {2, 64} and "extremes" in how
    monkeypatch.setattr(stage, "MAX_TRIAL_PLANS", 4)  # over the limit: each key's first and last value
    points, how = stage._trial_points(sweep)
    assert points == [{"lora.rank": 2, "lora.dropout": 0.0}, {"lora.rank": 64, "lora.dropout": 0.0},
                      {"lora.rank": 2, "lora.dropout": 0.2}] and "first and last" in how  # fmt: skip


def test_gates_name_the_figure_that_crossed_the_line(repo):
    result = repo["result"]
    assert gate(result) == []
    memory = gate(result, max_memory_gb=1e-9)
    assert memory and all("peak memory" in m and "--max-memory-gb" in m for m in memory)
    assert gate(result, fail_on_data_change=True) == [
        "recipes/c.yaml: data changed (--fail-on-data-change): data/c.jsonl"
    ]


def test_markdown_structure(repo):
    """Snapshot of the comment's structure: the figures and hashes vary with the libraries, the shape must not."""
    text = markdown(repo["result"])
    shape = [
        line
        for line in text.splitlines()
        if re.match(r"(##|\| Recipe|\| Key|\| File|\| Figure|\| Trial|<details|</details|\*\*)", line)
    ]
    summary = "<details><summary><code>recipes/{}.yaml</code>: {}</summary>"
    diff, plan, data = ["**Resolved recipe**", "| Key | Old | New | From |"], ["**Plan**"], ["**Data**"]
    figures = ["| Figure | Old | New | Change |"]
    assert shape == [
        f"## finetune review: 7 recipes changed against `HEAD` ({repo['result'].commit[:10]})",
        "| Recipe | Status | Valid | Trainable parameters | Peak memory | Steps | GPU time | Data |",
        summary.format("a", "changed"), *diff, *plan, *figures, "</details>",
        summary.format("b", "changed"), *diff, *plan, *figures, "</details>",
        summary.format("c", "changed"), "**Files read**", "| File | Old sha256 | New sha256 |", *plan, *figures,
        *data, *figures, "</details>",
        summary.format("d", "changed, invalid"), "**Errors**", "</details>",
        summary.format("f", "added"), *plan, *figures, *data, *figures, "</details>",
        summary.format("g", "deleted"), "</details>",
        summary.format("s", "changed"), *diff, *plan, *figures, "**Trials**",
        "| Trial | Status | Trainable parameters | Peak memory | Steps | GPU time |", "</details>",
    ]  # fmt: skip
    assert "| `recipes/a.yaml` | changed | yes | " in text and "| `recipes/d.yaml` | changed | **no** |" in text
    assert "| `lora.rank` | `8` | `16` | `HEAD:recipes/a.yaml:5:3` → `recipes/a.yaml:5:3` |" in text
    assert "| rows: data/c.jsonl | 16 | 20 | +4 (+25.0%) |" in text


def test_cli_exit_codes(repo, monkeypatch):
    """Through typer's runner, in this process: the three exit codes without three torch imports."""
    monkeypatch.chdir(repo["root"])

    def finetune(*args: str):
        return CliRunner().invoke(app, list(args))

    invalid = finetune("review", "--base", "HEAD", "recipes/d.yaml")
    assert invalid.exit_code == 2, invalid.output
    assert "error: recipes/d.yaml: recipes/d.yaml:6:" in invalid.stderr and "lora.dropout" in invalid.stderr
    gated = finetune("review", "--base", "HEAD", "recipes/c.yaml", "--fail-on-data-change", "--json")
    assert gated.exit_code == 1, gated.output
    out = json.loads(gated.stdout)
    assert [r["path"] for r in out["recipes"]] == ["recipes/c.yaml"] and out["valid"]
    assert "gate failed: recipes/c.yaml: data changed (--fail-on-data-change): data/c.jsonl" in gated.stderr
    clean = finetune("review", "--base", "HEAD", "recipes/e.yaml")
    assert clean.exit_code == 0 and "0 recipe(s) changed" in clean.stdout and "1 unchanged" in clean.stdout
    sweep = finetune("review", "--base", "HEAD", "recipes/s.yaml")
    assert sweep.exit_code == 0 and "trial rank-16: added (trainable parameters ? -> " in sweep.stdout
