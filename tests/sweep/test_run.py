"""`finetune sweep`: grids and searches as Optuna studies, one run directory per trial, safe to kill and share."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import write_recipe

from finetune.errors import RecipeError
from finetune.sweep.file import load_sweep

GRID = """\
recipe: recipe.yaml
fixed: {train.max_steps: 4, train.save_every: 2, eval.compare_base: false}
grid:
  lora.rank: [2, 8]
  lora.targets: [attention, all-linear]
"""


def write_sweep(tmp_path: Path, model_dir: Path, body: str = GRID, name: str = "sweep.yaml") -> Path:
    write_recipe(tmp_path, model_dir)
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(
        [sys.executable, "-m", "finetune.cli", "sweep", *args],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def finish(proc: subprocess.Popen) -> tuple[str, str]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out, err


def manifests(sweep_dir: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/manifest.json")}


def figures(sweep_dir: Path) -> dict[str, tuple]:
    data = json.loads((sweep_dir / "sweep.json").read_text())
    return {t["name"]: (t["status"], t["metric"], t["trainable_params"]) for t in data["trials"]}


@pytest.mark.slow
def test_a_2x2_grid_trains_four_run_directories_ranked_in_sweep_json_and_html(tiny_model_dir, tmp_path, monkeypatch):
    from finetune.sweep.run import sweep

    monkeypatch.chdir(tmp_path)
    result = sweep(load_sweep(write_sweep(tmp_path, tiny_model_dir())), progress=False)
    sweep_dir = tmp_path / "runs" / "sweep"
    names = {"rank-2_targets-attention", "rank-2_targets-all-linear", "rank-8_targets-attention", "rank-8_targets-all-linear"}  # fmt: skip
    runs = manifests(sweep_dir)
    assert set(runs) == names and all(m["status"] == "completed" for m in runs.values()), {
        n: (m["status"], m.get("error")) for n, m in runs.items()
    }
    assert {m["name"] for m in runs.values()} == {f"sweep_{n}" for n in names}  # ordinary runs, named apart
    data = json.loads((sweep_dir / "sweep.json").read_text())
    metrics = [t["metric"] for t in data["trials"]]
    assert data["metric"] == "loss" and data["direction"] == "minimize"
    assert metrics == sorted(metrics) and [t["rank"] for t in data["trials"]] == [1, 2, 3, 4]
    for t in data["trials"]:  # each trial's figure is its run's held-out loss, its params the run's own count
        run = runs[t["name"]]
        assert t["metric"] == pytest.approx(run["eval"]["tuned"]["loss"])
        assert t["trainable_params"] == run["lora"]["trainable_params"]
        assert t["values"]["lora.rank"] == json.loads(json.dumps(t["values"]))["lora.rank"]
    params = {t["name"]: t["trainable_params"] for t in data["trials"]}
    assert params["rank-8_targets-attention"] == 4 * params["rank-2_targets-attention"]
    assert params["rank-2_targets-all-linear"] > params["rank-2_targets-attention"]
    page = (sweep_dir / "sweep.html").read_text()
    assert page.count("<svg") >= 2 and "held-out loss vs rank" in page and "trainable params" in page
    assert all(n in page for n in names) and "doubling" in page  # where it stops paying, or that it still pays
    assert result.trained and len(result.trials) == 4


@pytest.mark.slow
def test_sigkill_in_the_second_trial_then_rerun_trains_only_what_is_unfinished(tiny_model_dir, tmp_path):
    body = GRID.replace("max_steps: 4", "max_steps: 8").replace("  lora.targets: [attention, all-linear]\n", "")
    path = write_sweep(tmp_path, tiny_model_dir(), body)
    sweep_dir = tmp_path / "runs" / "sweep"
    proc = start([str(path)], tmp_path)
    deadline = time.time() + 240
    while time.time() < deadline:  # the first trial completed, the second past its first checkpoint
        runs = manifests(sweep_dir)
        done = [n for n, m in runs.items() if m["status"] == "completed"]
        going = [n for n, m in runs.items() if m["status"] == "running" and any((sweep_dir / n / "checkpoints").glob("checkpoint-*"))]  # fmt: skip
        if done and going and (sweep_dir / "sweep.json").exists():
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = figures(sweep_dir)
    first, second = done[0], going[0]
    finished_at = runs[first]["finished"]
    assert before[first][0] == "completed" and before.get(second, ("running",))[0] == "running"

    out, err = finish(start([str(path)], tmp_path))
    after = manifests(sweep_dir)
    assert after[first]["finished"] == finished_at and "resumes" not in after[first]  # not trained again
    assert after[second]["status"] == "completed" and after[second]["resumes"][0]["from_step"] >= 2
    assert f"{first}: completed before" not in err and f"trial 0: {first}" not in err
    final = figures(sweep_dir)
    assert final[first] == before[first]  # the completed trial's figures are kept as they were
    assert set(final) == {"rank-2", "rank-8"} and all(f[0] == "completed" for f in final.values())
    assert "trained this time: 1" in out


@pytest.mark.slow
def test_two_workers_on_one_storage_run_disjoint_trials_and_complete_the_study(tiny_model_dir, tmp_path):
    path = write_sweep(tmp_path, tiny_model_dir(), GRID.replace("max_steps: 4", "max_steps: 2"))
    storage = str(tmp_path / "shared" / "study.journal")
    workers = [start([str(path), "--storage", storage, "--worker"], tmp_path) for _ in range(2)]
    logs = [finish(w)[1] for w in workers]
    trained = [
        {line.split(": ", 1)[1] for line in log.splitlines() if line.startswith("[sweep] trial ")} for log in logs
    ]
    assert all(trained) and not trained[0] & trained[1], trained  # both worked, never on the same trial
    sweep_dir = tmp_path / "runs" / "sweep"
    assert trained[0] | trained[1] == set(manifests(sweep_dir))
    assert len(trained[0] | trained[1]) == 4
    assert all(f[0] == "completed" for f in figures(sweep_dir).values()) and len(figures(sweep_dir)) == 4
    assert all("resumes" not in m for m in manifests(sweep_dir).values())


@pytest.mark.parametrize(
    ("direction", "metric", "higher", "reported"),
    [
        ("minimize", "loss", False, 2.0),
        ("maximize", "loss", False, -2.0),
        ("maximize", "reward", True, 2.0),
        ("minimize", "reward", True, -2.0),
    ],
)
def test_pruning_compares_the_held_out_figure_in_the_studys_direction(direction, metric, higher, reported):
    from types import SimpleNamespace

    from finetune.errors import TrainingStopped
    from finetune.summary import EvalPoint
    from finetune.sweep.run import _reporter

    class Trial:
        def __init__(self):
            self.reports = []

        def report(self, value, step):
            self.reports.append((value, step))

        def should_prune(self):
            return True

    trial = Trial()
    with pytest.raises(TrainingStopped, match=f"step 5: held-out {metric} 2.0000 is worse than the median"):
        _reporter(trial, SimpleNamespace(direction=direction))(EvalPoint(5, metric, 2.0, higher))
    assert trial.reports == [(reported, 5)]


@pytest.mark.slow
def test_a_search_with_pruning_stops_a_diverging_learning_rate_early(tiny_model_dir, tmp_path, monkeypatch):
    from finetune.sweep.run import sweep

    body = """\
        recipe: recipe.yaml
        fixed: {train.max_steps: 6, train.eval_every: 1, eval.compare_base: false}
        search:
          trials: 3
          sampler: random  # seeded by seeds[0]: 0.005, 0.005, then 50.0
          space:
            train.lr: {choice: [0.005, 50.0]}
        pruning: {method: median, startup_trials: 1}
        seeds: [6]
    """
    monkeypatch.chdir(tmp_path)
    result = sweep(load_sweep(write_sweep(tmp_path, tiny_model_dir(), body)), progress=False)
    by_status = {}
    for t in result.trials:
        by_status.setdefault(t["status"], []).append(t)
    assert by_status.get("pruned"), [(t["values"], t["status"], t.get("error")) for t in result.trials]
    for t in by_status["pruned"]:
        assert t["values"]["train.lr"] == 50.0 and t["last_eval"]["step"] < 6  # stopped before the end
        manifest = json.loads((Path(t["run_dirs"][0]) / "manifest.json").read_text())
        assert manifest["status"] == "stopped" and "pruned" in manifest["error"]
    assert all(t["values"]["train.lr"] == 0.005 for t in by_status["completed"])


def test_an_invalid_combination_is_reported_with_its_line_and_values_before_training(tiny_model_dir, tmp_path):
    body = """\
        recipe: recipe.yaml
        fixed:
          quantization.double_quant: false
        grid:
          quantization.method: [nf4, none]
          lora.rank: [4, 8]
    """
    path = write_sweep(tmp_path, tiny_model_dir(), body)
    with pytest.raises(RecipeError) as e:
        load_sweep(path)
    (problem,) = e.value.problems
    assert problem.where == f"{path}:5:30"  # the `none` in the grid
    assert 'quantization.method="none"' in problem.message and "lora.rank" not in problem.message
    assert "quantization.double_quant" in problem.message and "4-bit" in problem.message
    assert f"{path}:3:3" in problem.message  # where the clashing value was set
    result = subprocess.run([sys.executable, "-m", "finetune.cli", "sweep", str(path)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr and ":5:30" in result.stderr
    assert not (tmp_path / "runs").exists()  # nothing trained, nothing created
    validated = subprocess.run([sys.executable, "-m", "finetune.cli", "validate", str(path)], cwd=tmp_path,
                               capture_output=True, text=True, timeout=120)  # fmt: skip
    assert validated.returncode == 2 and "sweep.yaml:5:30 grid.quantization.method" in validated.stderr, validated


def test_a_value_the_recipe_refuses_is_located_at_its_grid_item(tiny_model_dir, tmp_path):
    body = """\
        recipe: recipe.yaml
        grid:
          lora.rank: [4, 0]
          lora.rnk: [2]
    """
    path = write_sweep(tmp_path, tiny_model_dir(), body)
    with pytest.raises(RecipeError) as e:
        load_sweep(path)
    shown = {(p.where, p.key): p.message for p in e.value.problems}
    assert "must be ≥ 1 (got 0)" in shown[(f"{path}:3:18", "grid.lora.rank")]
    assert "the combination lora.rank=0" in shown[(f"{path}:3:18", "grid.lora.rank")]
    assert shown[(f"{path}:4:14", "lora.rnk")] == "unknown key; did you mean 'rank'?"


@pytest.mark.parametrize(
    ("body", "where", "key", "message"),
    [
        ("grid: {lora.rank: [4]}\nmetrc: loss\n", ":3:", "metrc", "did you mean 'metric'?"),
        ("grid: {lora.rank: []}\n", ":2:", "grid.lora.rank", "at least 1 item"),
        ("search: {trials: 2, space: {train.lr: {log_uniform: [0.1, 0.01]}}}\n", ":2:",
         "search.space.train.lr.log_uniform", "low < high"),
        ("search: {trials: 2, space: {train.lr: {uniform: [0, 1], choice: [1]}}}\n", ":2:",
         "search.space.train.lr", "exactly one of"),
        ("grid: {lora.rank: [4]}\nsearch: {trials: 2, space: {train.lr: {choice: [1]}}}\n", "", "", "either grid"),
        ("grid: {lora.rank: [4]}\nmetric: bleu\n", ":3:", "metric", "not computed by the recipe"),
        ("grid: {lora.rank: [4]}\nfixed: {lora.rank: 8}\n", ":3:", "fixed.lora.rank", "also varied"),
        ("search: {trials: 2, space: {train.lr: {choice: [1]}}}\n", "", "pruning", "set train.eval_every"),
    ],
)  # fmt: skip
def test_bad_sweep_keys_get_located_errors(tiny_model_dir, tmp_path, body, where, key, message):
    path = write_sweep(tmp_path, tiny_model_dir(), "recipe: recipe.yaml\n" + body)
    with pytest.raises(RecipeError) as e:
        load_sweep(path)
    assert any(
        p.where.startswith(f"{path}{where}") and p.key == key and message in p.message for p in e.value.problems
    ), e.value.problems


def test_sweep_validation_imports_no_torch(tiny_model_dir, tmp_path):
    path = write_sweep(tmp_path, tiny_model_dir())
    code = f"import sys; from finetune.sweep.file import load_sweep; load_sweep({str(path)!r}); assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True).returncode == 0


def test_the_shipped_rank_sweep_validates():
    path = Path(__file__).parents[2] / "recipes" / "quickstart-rank-sweep.yaml"
    validated = subprocess.run([sys.executable, "-m", "finetune.cli", "validate", str(path)], capture_output=True,
                               text=True, timeout=120)  # fmt: skip
    assert validated.returncode == 0 and "(sweep: 14 trials, each a valid recipe)" in validated.stdout, validated
    sweep = load_sweep(path)
    assert len(sweep.points()) == 14 and sweep.direction == "maximize" and sweep.pruner == "none"
    assert sweep.trial_name(sweep.points()[0]) == "rank-1_targets-all-linear"


def _trial(rank: int, metric: float, std: float | None = None, targets: str = "all-linear") -> dict:
    return {"number": rank, "name": f"rank-{rank}", "values": {"lora.rank": rank, "lora.targets": targets},
            "status": "completed", "metric": metric, "metric_std": std, "figures": {"loss": 1 / (metric + 1)},
            "trainable_params": 1000 * rank, "seconds": 1.0, "rank": 1, "error": None}  # fmt: skip


def test_the_knee_is_the_smallest_rank_no_larger_rank_beats_by_more_than_the_margin():
    from finetune.sweep.report import knees

    curve = {1: 0.1, 2: 0.3, 4: 0.6, 8: 0.8, 16: 0.805, 32: 0.81, 64: 0.8}
    trials = [_trial(r, m) for r, m in curve.items()] + [_trial(r, 0.5, targets="attention") for r in (4, 8)]
    found = {
        k["group"]["lora.targets"]: k for k in knees(trials, ["lora.rank", "lora.targets"], "em", "maximize", 0.015)
    }
    assert found["all-linear"]["rank"] == 8 and found["all-linear"]["best_larger"] == 0.81
    assert found["attention"]["rank"] == 4 and not found["attention"]["still_paying"]
    rising = [_trial(r, r / 100) for r in (1, 2, 4)]  # still improving at the largest rank: no knee to mark
    (k,) = knees(rising, ["lora.rank", "lora.targets"], "em", "maximize", 0.001)
    assert k["still_paying"] and k["rank"] == 4
    losses = [_trial(r, m) for r, m in {1: 2.0, 2: 1.5, 4: 1.45, 8: 1.46}.items()]  # lower is better
    assert knees(losses, ["lora.rank", "lora.targets"], "loss", "minimize", 0.1)[0]["rank"] == 2


def test_sweep_html_draws_mean_and_spread_over_seeds_and_the_parameters_axis():
    from finetune.sweep.report import knees, render

    trials = [_trial(r, m, std) for r, m, std in ((2, 0.4, 0.05), (4, 0.6, 0.1), (8, 0.61, None))]
    data = {"sweep": "s", "file": "s.yaml", "updated": "now", "seeds": [1, 2], "metric": "em", "direction": "maximize",
            "keys": ["lora.rank", "lora.targets"], "trials": trials,
            "knees": knees(trials, ["lora.rank", "lora.targets"], "em", "maximize", 0.02)}  # fmt: skip
    page = render(data)
    assert "0.6000 ± 0.1000" in page  # the table gives the spread
    assert page.count('stroke="#2563eb"/>') >= 6  # two error bars of three strokes each on the metric chart
    assert 'stroke-dasharray="5,4"' in page and "8k" in page  # trainable params, dashed, labelled on the right
    assert "r=4: doubling stops paying" in page


def test_a_database_url_whose_driver_is_missing_names_the_package_and_hides_the_password(tmp_path):
    """SQLAlchemy 2.1 picks psycopg 3 for a bare postgresql://: the error says which driver, and the fix."""
    import importlib.util

    from finetune.errors import UserError
    from finetune.sweep.run import _database

    if importlib.util.find_spec("pg8000") is not None:
        pytest.skip("pg8000 is installed: its URL would connect instead")
    with pytest.raises(UserError) as caught:
        _database("postgresql+pg8000://user:hunter2secret@127.0.0.1:1/optuna")
    message = str(caught.value)
    assert "no module 'pg8000'" in message and "pip install psycopg2-binary" in message
    assert "postgresql+psycopg2://" in message and "hunter2secret" not in message


def overlapping_labels(page: str) -> list[tuple[str, str]]:
    """Pairs of SVG labels of one chart whose boxes (width estimated at 0.6 x font size per character) intersect."""
    import re

    found = []
    for svg in re.findall(r"<svg.*?</svg>", page, re.S):
        boxes = []
        for attrs, text in re.findall(r"<text ([^>]*)>([^<]*)</text>", svg):
            a = dict(re.findall(r'([\w-]+)="([^"]*)"', attrs))
            size = float(a.get("font-size", 12))
            width, x = 0.6 * size * len(text), float(a["x"])
            left = {"end": x - width, "middle": x - width / 2}.get(a.get("text-anchor"), x)
            boxes.append((left, left + width, float(a["y"]) - size, float(a["y"]), text))
        for i, p in enumerate(boxes):
            for q in boxes[i + 1 :]:
                if p[0] < q[1] and q[0] < p[1] and p[2] < q[3] and q[2] < p[3]:
                    found.append((p[4], q[4]))
    return found


def test_a_search_sweep_page_keeps_distinct_ticks_apart_and_draws_no_conclusion_from_one_point():
    from finetune.sweep.report import knees, render
    from finetune.sweep.run import rank

    keys = ["lora.rank", "lora.targets", "lora.alpha"]
    search = [  # a search: every combination of the other keys tried at one rank only
        {**_trial(8, 0.5, targets="attention"), "number": 0, "trainable_params": 74_752},
        {**_trial(16, 0.5, targets="all-linear"), "number": 1, "trainable_params": 149_504},
        {**_trial(4, 0.25, targets="mlp"), "number": 2, "trainable_params": 74_000},
    ]
    for t, alpha in zip(search, (16, 32, 8), strict=True):
        t["values"]["lora.alpha"] = alpha
    search[0]["figures"]["loss"], search[1]["figures"]["loss"] = 1.2, 0.9
    ranked = rank(search, "maximize")
    assert [t["number"] for t in ranked] == [1, 0, 2]  # the tie on the metric goes to the lower held-out loss
    found = knees(ranked, keys, "em", "maximize", 0.01)
    assert found == []  # one point per series says nothing about doubling the rank
    data = {"sweep": "s", "file": "s.yaml", "updated": "now", "seeds": [1], "metric": "em", "direction": "maximize",
            "keys": keys, "trials": ranked, "knees": found}  # fmt: skip
    page = render(data)
    assert "doubling" not in page.split("<h2>")[0].split("</h1>")[1]  # no conclusion above the charts
    import re

    charts = [svg for svg in re.findall(r"<svg.*?</svg>", page, re.S) if "trainable params" in svg]
    for svg in charts:  # the right axis: 74,000 and 149,504 at its ends, each once
        assert re.findall(r'fill="#6b7280">([^<]*)</text>', svg) == ["74k", "150k"]
    assert len(charts) == 2
    assert overlapping_labels(page) == []


def test_knee_labels_of_two_series_and_close_ticks_do_not_print_over_each_other():
    from finetune.sweep.report import knees, render

    curve = {1: 0.1, 2: 0.3, 4: 0.6, 8: 0.8, 16: 0.805}
    trials = [_trial(r, m) for r, m in curve.items()] + [_trial(r, m, targets="mlp") for r, m in curve.items()]
    keys = ["lora.rank", "lora.targets"]
    data = {"sweep": "s", "file": "s.yaml", "updated": "now", "seeds": [1], "metric": "em", "direction": "maximize",
            "keys": keys, "trials": trials, "knees": knees(trials, keys, "em", "maximize", 0.01)}  # fmt: skip
    page = render(data)
    assert page.count("r=8: doubling stops paying") == 2 and overlapping_labels(page) == []
    from finetune.report import tick_labels

    assert tick_labels([6.0, 6.005, 6.01]) == ["6", "6.005", "6.01"]  # was 6 / 6.01 / 6.01 (3 digits)
    assert tick_labels([74_752, 149_504], lambda v, d: f"{v / 1000:.{d}g}k") == ["74.8k", "150k"]
