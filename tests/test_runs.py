"""Reading runs back: list, show, compare, and the self-contained report."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_recipe

from finetune.report import line_chart, render, series


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_model_dir) -> Path:
    """Two finished runs differing in rank, trained in this process."""
    import os

    from finetune.recipe.load import load_recipe
    from finetune.train import train

    root = tmp_path_factory.mktemp("runs_root")
    recipe = write_recipe(root, tiny_model_dir())
    cwd = Path.cwd()
    os.chdir(root)
    try:
        for name, rank in (("r8", 8), ("r4", 4)):
            train(load_recipe(recipe, [f"name={name}", f"output_dir=runs/{name}", f"lora.rank={rank}"]), progress=False)
    finally:
        os.chdir(cwd)
    return root / "runs"


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finetune.cli", *args], cwd=cwd, capture_output=True, text=True)


@pytest.mark.slow
def test_runs_list_show_compare(two_runs):
    listed = json.loads(cli("runs", "list", str(two_runs), "--json", cwd=two_runs).stdout)
    assert {r["name"] for r in listed} == {"r8", "r4"}
    assert all(r["status"] == "completed" and r["best_eval_loss"] for r in listed)
    assert {r["rank"] for r in listed} == {8, 4}
    shown = json.loads(cli("runs", "show", str(two_runs / "r8"), "--json", cwd=two_runs).stdout)
    assert shown["lora"]["targets"] and shown["recipe_sha256"]
    compared = json.loads(
        cli("runs", "compare", str(two_runs / "r8"), str(two_runs / "r4"), "--json", cwd=two_runs).stdout
    )
    assert set(compared["recipe_differences"]) == {"name", "output_dir", "lora.rank"}
    assert compared["recipe_differences"]["lora.rank"] == [8, 4]
    assert compared["deltas"][0]["loss"] == 0
    assert compared["deltas"][1]["loss"] == pytest.approx(
        compared["figures"][1]["loss"] - compared["figures"][0]["loss"]
    )
    assert cli("runs", "show", str(two_runs / "nope"), cwd=two_runs).returncode == 2


@pytest.mark.slow
def test_report_is_self_contained_and_draws_every_logged_step(two_runs):
    page = (two_runs / "r8" / "report.html").read_text()
    assert "<script" not in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page
    logged = [json.loads(line) for line in (two_runs / "r8" / "metrics.jsonl").read_text().splitlines()]
    train_points = len([r for r in logged if "loss" in r])
    polylines = re.findall(r'<polyline[^>]*points="([^"]+)"', page)
    assert len(polylines[0].split()) == train_points  # the train loss curve, one vertex per logged step
    assert "base" in page and "tuned" in page and "completed" in page


def test_series_keeps_nan_out_of_the_drawing_only():
    logs = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": float("nan")}, {"step": 3, "loss": 1.0}]
    assert series(logs, "loss") == [(1, 2.0), (3, 1.0)]


def test_chart_scales_points_into_the_frame():
    svg = line_chart("t", {"a": [(0, 0.0), (10, 1.0)]}, width=200, height=100)
    coords = [tuple(map(float, p.split(","))) for p in re.search(r'points="([^"]+)"', svg).group(1).split()]
    assert coords[0][0] < coords[1][0] and coords[0][1] > coords[1][1]  # left-to-right, rising
    assert all(0 <= x <= 200 and 0 <= y <= 100 for x, y in coords)
    assert "no data" in line_chart("t", {"a": []})


def test_render_without_eval_says_so():
    page = render({"name": "x", "status": "failed", "error": "RuntimeError: boom"}, [], None)
    assert "No held-out evaluation" in page and "RuntimeError: boom" in page


def test_report_facts_ticks_and_a_preference_runs_deltas_read_as_the_cli_shows_them():
    from finetune.summary import EvalSummary, Preference, Scores

    manifest = {"name": "dpo", "status": "completed", "steps": 3, "best_step": None,
                "git": {"commit": "0123abcd" * 5, "dirty": True}}  # fmt: skip
    logs = [{"step": i, "loss": v} for i, v in enumerate((6.0, 6.004, 6.01), start=1)]
    summary = EvalSummary(  # tuned beats the base but lost to its reference (the parent run)
        tuned=Scores(metrics={"preference_accuracy": 0.6}), base=Scores(metrics={"preference_accuracy": 0.4}),
        examples=8, preference=Preference("dpo", 0.1, 8, Scores(metrics={"preference_accuracy": 0.7})),
    )  # fmt: skip
    page = render(manifest, logs, summary)
    assert "best held-out step" not in page and "None" not in page
    assert f"<td>git</td><td>{'0123abcd' * 5} (uncommitted changes)</td>" in page and '"commit"' not in page
    loss_chart = re.search(r"<svg.*?</svg>", page, re.S).group(0)
    ticks = re.findall(r'text-anchor="end" font-size="11">([^<]*)</text>', loss_chart)
    assert len(ticks) == len(set(ticks)) == 3, ticks  # was 6 / 6.01 / 6.01
    row = re.search(r"<tr><td>preference_accuracy</td>.*?</tr>", page).group(0)
    assert "<td>0.4000</td><td>0.7000</td><td>0.6000</td>" in row and '<td class="worse">-0.1000</td>' in row
    assert "Held-out: tuned vs its reference (the parent run)" in page and "8 held-out pairs" in page


def test_the_manifest_records_the_git_state_of_the_repo_holding_the_recipe(tmp_path, tiny_model_dir, monkeypatch):
    """The experiment repo is the recipe's, wherever the command runs from (here: a directory outside it)."""
    from finetune.recipe.load import load_recipe
    from finetune.runs import Manifest, RunDir

    repo = tmp_path / "experiments"
    repo.mkdir()
    recipe_path = write_recipe(repo, tiny_model_dir())
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "recipe.yaml"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "recipe"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    recipe = load_recipe(recipe_path)
    assert recipe.source.path.resolve() == recipe_path.resolve()
    manifest = Manifest.start(RunDir(elsewhere / "run"), recipe)
    assert manifest.data["git"] == {"commit": head, "dirty": True}  # data/ is untracked


def test_a_running_run_whose_process_is_gone_is_shown_as_died(tmp_path):
    import os
    import socket

    from finetune.runs import list_runs, process_record, show_run, status

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = {"pid": int(gone.stdout), "host": socket.gethostname(), "start_ticks": None}
    assert status({"status": "running", "process": process_record()}) == "running"  # this very process
    assert status({"status": "running", "process": dead}) == "died"
    assert status({"status": "running", "process": {**dead, "host": "another-host"}}) == "running"  # cannot tell
    assert status({"status": "failed", "process": dead}) == "failed"
    reused = {**process_record(), "start_ticks": -1}  # our pid, but a process that started at another time
    assert status({"status": "running", "process": reused}) == (
        "died" if os.path.exists("/proc/self/stat") else "running"
    )
    command = {"resume": "finetune train recipes/x.yaml --set lora.rank=4 --resume", "cwd": str(tmp_path)}
    manifest = {"name": "x", "status": "running", "process": dead, "command": command}
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "manifest.json").write_text(json.dumps(manifest))
    assert [r.status for r in list_runs(tmp_path)] == ["died"]
    shown = show_run(tmp_path / "x")
    assert shown["status"] == "died" and shown["status_detail"].endswith(command["resume"])


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="zombies are read from /proc (Linux)")
def test_a_killed_process_not_yet_reaped_is_dead_and_its_run_resumable(tmp_path):
    """A zombie answers kill(pid, 0), yet it is dead: --resume must not call its run "still training"."""
    import signal
    import socket
    import time

    from finetune.files import _start_ticks, process_alive
    from finetune.runs import RunDir, status

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = {"pid": child.pid, "host": socket.gethostname(), "start_ticks": _start_ticks(child.pid)}
        assert process_alive(record) is True
        os.kill(child.pid, signal.SIGKILL)  # and do not reap it: it stays a zombie
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
            assert time.monotonic() < deadline, "the killed child never became a zombie"
            time.sleep(0.01)
        os.kill(child.pid, 0)  # the trap: the zombie still answers
        assert process_alive(record) is False
        assert status({"status": "running", "process": record}) == "died"
        run = tmp_path / "killed"
        run.mkdir()
        (run / "manifest.json").write_text(json.dumps({"name": "killed", "status": "running", "process": record}))
        RunDir(run).refuse_resume()  # no "still training"
    finally:
        child.kill()
        child.wait()


def _row(name: str, **changes):
    from finetune.runs import RunRow

    fields = {"run": f"runs/{name}", "name": name, "status": "completed", "base": "meta-llama/Llama-3.1-8B-Instruct",
              "rank": 16, "best_eval_loss": 1.23456, "metric": ("mymetrics:first_word_of_the_answer", 0.875),
              "seconds": 3725.0, "started": None}  # fmt: skip
    return RunRow(**{**fields, **changes})


def test_runs_list_fits_80_columns_and_keeps_status_and_figures_whole():
    from finetune.cli.runs import runs_table

    rows = [_row("llama-3.1-8b-qlora-rank16-lr2e-4-with-a-long-name"),
            _row("r8", status="died", base="/data/models/tiny")]  # fmt: skip
    lines = runs_table(rows, 80).splitlines()
    assert all(len(line) <= 80 for line in lines), lines
    assert lines[0].split() == ["run", "status", "base", "rank", "eval", "loss", "metric", "time"]
    assert "completed" in lines[2] and "1.2346" in lines[2] and "0.8750" in lines[2] and "3725s" in lines[2]
    assert lines[3].split()[:3] == ["r8", "died", ".../tiny"]


def test_runs_list_at_80_columns_never_cuts_sweep_trials_until_they_look_alike():
    """The rank sweep's 14 trials share a 22-character prefix: cut at the end, they all read `quickstart-ran…`."""
    from finetune.cli.runs import runs_table

    names = [f"quickstart-rank-sweep_rank-{r}_targets-{t}" for r in (1, 2, 4, 8, 16, 32, 64)
             for t in ("all-linear", "attention")]  # fmt: skip
    lines = runs_table([_row(n, base="/models/quickstart-base-model-directory") for n in names], 80).splitlines()
    assert all(len(line) <= 80 for line in lines), lines
    cells = [line.split()[0] for line in lines[2:]]
    assert len(set(cells)) == len(names), cells
    for name, cell in zip(names, cells, strict=True):  # the pieces of a cell appear in the name, in order
        pieces = [piece for piece in cell.split("…") if piece]
        assert name.endswith(pieces[-1]) and all(piece in name for piece in pieces), (name, cell)
    alike = runs_table([_row("sweep_rank-1_targets-all-linear-long"), _row("sweep_rank-2_targets-all-linear-long")], 40)
    assert len({line.split()[0] for line in alike.splitlines()[2:]}) == 2, (
        "distinct names stay distinct, past the width"
    )


def _comparison():
    from finetune.runs import RunComparison

    data = "/home/someone/experiments/support-tone/data/{}.jsonl"
    train = lambda name, fmt: [{"path": data.format(name), "format": fmt, "columns": {}, "limit": None}]  # noqa: E731
    differences = {
        "data.train": [train("train", "messages"), train("preference_train", "preference"),
                       train("preference_train", "preference")],
        "train.dpo.label_smoothing": [None, 0.0, None],
        "train.method": ["sft", "dpo", "grpo"],
    }  # fmt: skip
    figures = [{"loss": 0.31, "exact_match": 0.9, "train_loss": 0.4},
               {"preference_accuracy": 0.875, "exact_match": 0.85, "train_loss": 0.6},
               {"reward": 1.5, "exact_match": 0.8}]  # fmt: skip
    deltas = [{"loss": 0.0, "exact_match": 0.0, "train_loss": 0.0}, {"exact_match": -0.05, "train_loss": 0.2},
              {"exact_match": -0.1}]  # fmt: skip
    return RunComparison(["runs/quickstart", "runs/quickstart-dpo", "runs/quickstart-grpo"], differences, figures,
                         deltas)  # fmt: skip


def _render(table, width: int = 80) -> str:
    from finetune.cli.common import console

    out = console(width=width, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    out.print(table)
    return out.export_text()


def test_runs_compare_lists_every_runs_figures_with_deltas_where_the_first_has_them():
    from finetune.cli.runs import figures_table

    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in _render(figures_table(_comparison()), 100).splitlines() if line.startswith("│")}  # fmt: skip
    assert rows["preference_accuracy"] == ["-", "0.8750", "-"], "the DPO run's preference accuracy"
    assert rows["reward"] == ["-", "-", "1.5000"], "the GRPO run's reward"
    assert rows["exact_match"] == ["0.9000", "0.8500 (-0.0500)", "0.8000 (-0.1000)"]
    assert rows["train_loss"] == ["0.4000", "0.6000 (+0.2000)", "-"]


def test_runs_compare_shows_each_differing_value_whole_at_80_columns():
    from finetune.cli.runs import differences_table

    text = _render(differences_table(_comparison()))
    assert "…" not in text and all(len(line) <= 80 for line in text.splitlines())
    cells: dict[str, list[str]] = {}  # one row per differing leaf; a folded value continues on the next lines
    for block in text.split("├")[1:] if "├" in text else []:
        lines = [line for line in block.splitlines() if line.startswith("│")]
        columns = [[c.strip() for c in line.split("│")[1:-1]] for line in lines]
        cells["".join(col[0] for col in columns)] = ["".join(col[i] for col in columns) for i in range(1, 4)]
    header = text.split("┡")[1].split("├")[0]  # the first row sits between the header and the first separator
    first = [[c.strip() for c in line.split("│")[1:-1]] for line in header.splitlines() if line.startswith("│")]
    cells["".join(col[0] for col in first)] = ["".join(col[i] for col in first) for i in range(1, 4)]
    path = "/home/someone/experiments/support-tone/data/{}.jsonl"
    assert cells["data.train.0.path"] == [json.dumps(path.format(n)) for n in ("train", "preference_train",
                                                                               "preference_train")]  # fmt: skip
    assert cells["data.train.0.format"] == ['"messages"', '"preference"', '"preference"']
    assert cells["train.dpo.label_smoothing"] == ["null", "0.0", "null"]
    assert "data.train.0.columns" not in cells, "equal items are not differences"


def _killed_child(code: str) -> None:
    """Run `code` in a Python child that SIGKILLs itself at its end (what a scheduler's kill -9 leaves), reaped."""
    import signal

    child = subprocess.run([sys.executable, "-c", code + "\nimport os, signal; os.kill(os.getpid(), signal.SIGKILL)"],
                           capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": os.getcwd()})  # fmt: skip
    assert child.returncode == -signal.SIGKILL, child.stderr


def test_a_killed_atomic_write_leaves_a_temporary_that_the_next_attempt_cleans(tmp_path):
    from finetune.files import atomic_dir

    final = tmp_path / "merged"
    _killed_child(f"""
from pathlib import Path
from finetune.files import atomic_dir
with atomic_dir(Path({str(final)!r})) as tmp:
    (tmp / "model.safetensors").write_bytes(bytes(1 << 20))
    import os, signal; os.kill(os.getpid(), signal.SIGKILL)
""")
    stale = [p.name for p in tmp_path.iterdir()]
    assert len(stale) == 1 and stale[0].startswith(".merged.") and stale[0].endswith(".tmp") and not final.exists()
    with atomic_dir(final) as tmp:  # the rerun (merge, export) cleans what the killed one left
        (tmp / "model.safetensors").write_bytes(b"new")
    assert [p.name for p in tmp_path.iterdir()] == ["merged"] and (final / "model.safetensors").read_bytes() == b"new"
    from finetune.files import clean_stale

    with atomic_dir(tmp_path / "other") as mine:  # a temporary whose process still runs is left alone
        assert clean_stale(tmp_path) == [] and mine.exists()


def test_a_kill_between_moving_the_old_output_aside_and_renaming_the_new_puts_the_old_back(tmp_path):
    from finetune.files import clean_stale

    final = tmp_path / "merged"
    final.mkdir()
    (final / "weights").write_text("old")
    _killed_child(f"""
import os
from pathlib import Path
from finetune.files import _temporary_dir
final = Path({str(final)!r})
old = _temporary_dir(final, "old")
os.replace(final, old / final.name)
""")
    assert not final.exists()
    (restored,) = clean_stale(tmp_path)
    assert restored.name.endswith(".old")
    assert (final / "weights").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_runs_compare_pairs_two_runs_answers_by_prompt_overall_and_per_slice():
    """Run B right on 40 more of 100 prompts than run A (all in slice `hard`): its interval clears 0 there and
    overall; `easy`, where both answer alike, has a zero-width interval at 0; prompts only one run has are left out."""
    from finetune.cli.runs import figures_table
    from finetune.runs import RunComparison, paired_runs

    def rows(right: set[int], extra: bool = False) -> list[dict]:
        out = [{"prompt": f"p{i}", "reference": "r", "slice": "hard" if i < 50 else "easy",
                "tuned_scores": {"exact_match": float(i in right)}} for i in range(100)]  # fmt: skip
        return out + ([{"prompt": "only-b", "reference": "r", "slice": "hard", "tuned_scores": {"exact_match": 1.0}}]
                      if extra else [])  # fmt: skip

    a, b = rows(set(range(50, 100))), rows(set(range(10, 100)), extra=True)
    paired = paired_runs(a, b)
    assert set(paired) == {"exact_match", "exact_match[hard]", "exact_match[easy]"}
    assert paired["exact_match"]["n"] == 100 and paired["exact_match"]["delta"] == pytest.approx(0.4)
    assert paired["exact_match"]["low"] > 0 and paired["exact_match[hard]"]["delta"] == pytest.approx(0.8)
    assert (paired["exact_match[easy]"]["low"], paired["exact_match[easy]"]["high"]) == (0.0, 0.0)
    comparison = RunComparison(["runs/a", "runs/b"], {}, [{"exact_match[hard]": 0.0}, {"exact_match[hard]": 0.8}],
                               [{"exact_match[hard]": 0.0}, {"exact_match[hard]": 0.8}], [{}, paired], {"hard": 50})  # fmt: skip
    text = " ".join(_render(figures_table(comparison), 120).split())
    hard = paired["exact_match[hard]"]
    assert f"exact_match[hard] (50 rows) │ 0.0000 │ 0.8000 (+0.80 [{hard['low']:+.2f}, {hard['high']:+.2f}])" in text


def test_runs_compare_pairs_the_losses_row_by_row_weighted_by_tokens():
    """Run B's loss is 1.0 lower on the long rows (9 tokens) of slice `long`, the same on the short ones: the
    delta is token-weighted (-0.9 overall, as the loss is), a win is a lower loss, and rows whose tokens differ
    (another tokenizer, another max_seq_length) are not paired."""
    from finetune.runs import paired_runs

    def rows(long_loss: float) -> list[dict]:
        return [{"prompt": f"p{i}", "reference": "r", "slice": "long" if i % 2 else "short", "tuned_scores": {},
                 "loss_tokens": 9 if i % 2 else 1, "tuned_loss": long_loss if i % 2 else 2.0} for i in range(40)]  # fmt: skip

    a, b = rows(2.0), rows(1.0)
    b[0]["loss_tokens"] = 2
    paired = paired_runs(a, b)
    assert set(paired) == {"loss", "loss[long]", "loss[short]"}
    assert paired["loss[long]"]["delta"] == pytest.approx(-1.0) and paired["loss[short]"]["n"] == 19
    assert paired["loss"]["delta"] == pytest.approx(-180 / 199) and paired["loss"]["high"] < 0
    assert (paired["loss"]["wins"], paired["loss"]["losses"], paired["loss"]["ties"]) == (20, 0, 19)


def test_report_shows_the_eval_per_slice_with_intervals_and_the_answers_cost():
    from finetune.scoring import Comparison, ModelScores

    def scores(right: list[float], tokens: int) -> ModelScores:
        return ModelScores(0.5, 1.6, {}, ["x"] * 4, {"exact_match": right}, [tokens] * 4, [0.25] * 4)

    summary = Comparison(scores([1.0, 1.0, 1.0, 0.0], 2), scores([0.0, 0.0, 1.0, 0.0], 8), ["r"] * 4, ["p"] * 4,
                         ["a<b", "a<b", "c", "c"]).summary()  # fmt: skip
    page = render({"name": "x", "status": "completed"}, [], summary)
    overall = summary.rows()[-1]
    assert f'<td>exact_match</td><td>0.2500</td><td>0.7500</td><td class="better">{overall.delta_text(2)}</td>' in page
    assert "<h3>slice a&lt;b (2 rows)</h3>" in page and "<h3>slice c (2 rows)</h3>" in page
    assert "<tr><td>tokens</td><td>2 / 2</td><td>8 / 8</td></tr>" in page
