"""Eval: metrics on hand-made cases, the CI gate, best-adapter selection, `finetune eval` on a run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from helpers import write_recipe

from finetune.errors import UserError
from finetune.scoring import contains, exact_match, json_valid, metric_functions, regex
from finetune.summary import EvalSummary, Requirement, gate
from finetune.trainer import BestAdapter


@pytest.mark.parametrize(
    ("metric", "prediction", "reference", "expected"),
    [
        (exact_match, " blue red\n", "blue red", 1.0),
        (exact_match, "blue  red", "blue red", 0.0),
        (exact_match, "", "blue", 0.0),
        (exact_match, "", "", 1.0),
        (exact_match, "naïve café ✓", "naïve café ✓", 1.0),
        (contains, "the answer is 42.", "42", 1.0),
        (contains, "", "42", 0.0),
        (regex, "Order #1234", r"Order #\d+", 1.0),
        (regex, "Order #12a", r"Order #\d+", 0.0),
        (regex, "anything", "([unclosed", 0.0),
        (json_valid, '{"a": [1, 2]}', "", 1.0),
        (json_valid, '{"a": [1, 2}', "", 0.0),
        (json_valid, "", "", 0.0),
        (json_valid, '"é"', "", 1.0),
    ],
)
def test_metrics_on_hand_made_cases(metric, prediction, reference, expected):
    assert metric(prediction, reference) == expected


def test_user_metric_is_imported_by_module_and_function():
    fns = metric_functions(["exact_match", "loss", "math:isclose"])
    assert set(fns) == {"exact_match", "math:isclose"} and fns["math:isclose"] is math.isclose


def test_an_unimportable_user_metric_is_a_user_error():
    from finetune.errors import UserError

    with pytest.raises(UserError, match=r"eval\.metrics: nope_module:f: no module 'nope_module'"):
        metric_functions(["nope_module:f"])


SUMMARY = EvalSummary.from_dict(
    {
        "tuned": {"loss": 0.5, "perplexity": 1.6, "metrics": {"exact_match": 0.9, "contains": 0.7}},
        "base": {"loss": 2.0, "perplexity": 7.4, "metrics": {"exact_match": 0.0, "contains": 0.8}},
        "examples": 10,
        "vs_base": {"exact_match": {"delta": 0.9, "wins": 9, "losses": 0, "ties": 1}, "loss": {"delta": -1.5}},
    }
)


def require(*texts: str) -> list[Requirement]:
    return [Requirement.parse(t) for t in texts]


def test_gate_reports_each_failed_condition_with_its_figures():
    assert gate(SUMMARY, require("exact_match>=0.8"), False) == []
    assert gate(SUMMARY, require("exact_match>=0.95"), False) == [
        "exact_match = 0.9000 is under 0.95 (required exact_match>=0.95)"
    ]
    assert gate(SUMMARY, [], True) == ["contains 0.7000 is worse than the base's 0.8000"]
    assert "not computed" in gate(SUMMARY, require("json_valid>=0.5"), False)[0]


def test_a_loss_gate_is_a_maximum_the_direction_a_user_means():
    assert gate(SUMMARY, require("loss<=1.0", "perplexity < 2"), False) == [], "0.5 is within a maximum of 1.0"
    assert gate(SUMMARY, require("loss<=0.4"), False) == ["loss = 0.5000 is over 0.4 (required loss<=0.4)"]
    assert Requirement.fail_under("exact_match=0.8") == Requirement("exact_match", ">=", 0.8)
    with pytest.raises(UserError, match=r"loss is better when lower.*--require 'loss<=1.0'"):
        Requirement.fail_under("loss=1.0")  # the old reading failed a loss *below* 1.0
    for bad in ("loss=1", "loss<=", "<=1", "loss<=abc"):
        with pytest.raises(UserError, match="--require: expected METRIC>=VALUE"):
            Requirement.parse(bad)


def test_every_row_knows_its_metrics_direction_and_the_json_shape_is_kept():
    rows = {row.metric: row for row in SUMMARY.rows()}
    assert list(rows) == ["loss", "perplexity", "exact_match", "contains"]
    assert rows["loss"].better is True and rows["perplexity"].better is True, "lower loss is better"
    assert rows["exact_match"].better is True and rows["contains"].better is False
    assert rows["exact_match"].record == "9/0/1" and rows["loss"].record == ""
    again = EvalSummary.from_dict(SUMMARY.to_dict())
    assert again == SUMMARY and SUMMARY.to_dict()["vs_base"]["loss"] == {"delta": -1.5}


def test_best_adapter_keeps_the_lowest_held_out_loss_even_when_not_last():
    saved = []
    best = BestAdapter(lambda step, loss: saved.append((step, loss)))

    class State:
        global_step = 0

    for step, loss in [(10, 3.0), (20, 2.0), (30, 2.5), (40, 2.1)]:
        State.global_step = step
        best.on_evaluate(None, State, None, metrics={"eval_loss": loss})
    assert saved == [(10, 3.0), (20, 2.0)]


def test_in_training_evaluation_reports_the_figure_the_method_ranks_by():
    """A GRPO evaluation also has an `eval_loss` (its policy loss, no measure of quality): a sweep must prune on
    the reward, in its direction, and on the loss for every other method."""
    from finetune.summary import EvalPoint
    from finetune.trainer import ReportEval

    points = []

    class State:
        global_step = 7

    metrics = {"eval_loss": 0.01, "eval_reward": 1.72}
    ReportEval(points.append, "eval_reward", higher=True).on_evaluate(None, State, None, metrics=metrics)
    ReportEval(points.append).on_evaluate(None, State, None, metrics=metrics)
    assert points == [EvalPoint(7, "reward", 1.72, True), EvalPoint(7, "loss", 0.01, False)]


@pytest.mark.slow
def test_eval_on_a_run_reproduces_the_training_summary_and_gates(tiny_model_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from finetune.cli import app

    monkeypatch.chdir(tmp_path)  # in-process: the CLI as a user runs it, without a Python start-up per command
    runner = CliRunner()
    recipe = write_recipe(tmp_path, tiny_model_dir())
    recipe.write_text(recipe.read_text().replace("logging_every: 1", "logging_every: 1\n  eval_every: 3"))
    assert runner.invoke(app, ["train", str(recipe)]).exit_code == 0
    run = tmp_path / "runs" / "tiny"
    manifest = json.loads((run / "manifest.json").read_text())
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    eval_losses = {e["step"]: e["eval_loss"] for e in evals if "eval_loss" in e}
    assert manifest["best_step"] == min(eval_losses, key=eval_losses.get)
    trained = json.loads((run / "eval" / "summary.json").read_text())
    record = {name: (run / "eval" / name).read_bytes() for name in ("summary.json", "examples.jsonl")}

    result = runner.invoke(app, ["eval", str(run), "--json"])
    assert result.exit_code == 0, result.stderr[-2000:]
    again = json.loads(result.stdout)
    assert {name: (run / "eval" / name).read_bytes() for name in record} == record  # training's record is kept
    assert Path(again["out_dir"]).parent == run / "eval"  # eval/<UTC time>/
    assert json.loads((Path(again["out_dir"]) / "summary.json").read_text())["tuned"] == again["tuned"]
    assert again["tuned"]["loss"] == pytest.approx(trained["tuned"]["loss"], abs=1e-5)
    assert again["tuned"]["loss"] == pytest.approx(eval_losses[manifest["best_step"]], abs=1e-4)
    assert again["base"]["loss"] == pytest.approx(trained["base"]["loss"], abs=1e-5)
    assert again["tuned"]["metrics"] == trained["tuned"]["metrics"]
    rows = [json.loads(line) for line in (run / "eval" / "examples.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and {"prompt", "reference", "tuned", "base", "tuned_scores", "base_scores"} <= set(rows[0])

    gated = runner.invoke(app, ["eval", str(recipe), "--require", "exact_match>=1.01", "--require", "loss<=100"])
    assert gated.exit_code == 1 and "gate failed: exact_match" in gated.stderr
    assert "gate failed: loss" not in gated.stderr, "a loss under its maximum passes"
    out = tmp_path / "first-3"
    limited_run = runner.invoke(app, ["eval", str(recipe), "--require", "exact_match>=1.01", "--limit", "3",
                                      "--against", "none", "--out", str(out)])  # fmt: skip
    assert limited_run.exit_code == 1 and "gate failed: exact_match" in limited_run.stderr
    limited = json.loads((out / "summary.json").read_text())
    assert limited["examples"] == 3 and len((out / "examples.jsonl").read_text().splitlines()) == 3
    assert limited["tuned"]["loss"] != pytest.approx(again["tuned"]["loss"], abs=1e-6)  # --limit applies to the loss
    assert runner.invoke(app, ["eval", str(run), "--out", str(out)]).exit_code == 2  # never overwritten
    assert runner.invoke(app, ["eval", str(tmp_path / "nope")]).exit_code == 2


def test_eval_chat_and_merge_describe_a_missing_run_directory_the_same_way(tmp_path):
    from finetune.errors import UserError
    from finetune.evaluate import evaluate
    from finetune.inference.loaded import load
    from finetune.runs import open_run

    for target in (tmp_path / "nope", tmp_path):  # missing; a folder that is not a run
        said = set()
        for opens in (evaluate, load, open_run):
            with pytest.raises(UserError) as e:
                opens(target)
            said.add(str(e.value))
        assert len(said) == 1, said


@pytest.mark.slow
def test_eval_and_chat_treat_a_recipe_whose_data_moved_alike(tiny_model_dir, tmp_path, monkeypatch):
    """A recipe names its run (`runs.resolve_run`, one rule): its data need not be where it was. Chat answers from
    the recipe as from the run directory; eval, which needs the run's data, says exactly what it says for the run."""
    from typer.testing import CliRunner

    from finetune.cli import app
    from finetune.recipe.load import load_recipe
    from finetune.runs import resolve_run
    from finetune.train import train

    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path, tiny_model_dir())
    run = Path(train(load_recipe(recipe, ["train.max_steps=1"]), progress=False).run_dir)
    (tmp_path / "data").rename(tmp_path / "moved")
    assert resolve_run(recipe).resolve() == run.resolve()
    runner = CliRunner()
    by_recipe, by_run = (runner.invoke(app, ["eval", str(target)]) for target in (recipe, run))
    assert by_recipe.exit_code == by_run.exit_code == 2, (by_recipe.output, by_run.output)
    assert by_recipe.stderr == by_run.stderr and "runs/tiny/recipe.yaml" in by_recipe.stderr, by_recipe.stderr
    chats = [runner.invoke(app, ["chat", str(target), "-p", "Reverse: a b c"]) for target in (recipe, run)]
    assert [c.exit_code for c in chats] == [0, 0], [c.output for c in chats]
    assert chats[0].stdout == chats[1].stdout


SLICES = ["odd", "even", "odd", "even"]  # the held-out rows' `level` column: eval.slice_by


def _comparison_by_method(method: str, model_dir: Path, tmp_path: Path) -> tuple[Any, list[str]]:
    """`method`'s own held-out comparison on an untrained adapter, over four rows in two slices, and the gold answers.

    Nothing is trained: the adapter's B matrices are drawn at random (a fresh LoRA's are zero) so that tuned differs
    from the base, and the reference model's answers (the random tiny base's) differ from the gold ones, which is
    what a row that mixes them up would show."""
    import tiny
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune import methods
    from finetune.data import prepare_data
    from finetune.modeling import load_tokenizer, lora_config, resolve_targets
    from finetune.recipe.load import load_recipe
    from finetune.scoring import compare

    held = [{**r, "level": level} for r, level in zip(tiny.reverse_rows(4, seed=1), SLICES, strict=True)]
    gold = [r["messages"][1]["content"] for r in held]
    prompts = [r["messages"][0]["content"] for r in held]
    as_pair = [{"prompt": p, "chosen": a, "rejected": "no", "level": level}
               for p, a, level in zip(prompts, gold, SLICES, strict=True)]  # fmt: skip
    unpaired = [{"prompt": p["prompt"], "completion": c, "label": c != "no", "level": p["level"]}
                for p in as_pair for c in (p["chosen"], "no")]  # fmt: skip
    rows = {"sft": held, "grpo": held, "dpo": as_pair, "kto": unpaired}[method]
    fmt = {"dpo": "preference", "kto": "unpaired"}.get(method, "messages")
    tiny.write_jsonl(tmp_path / "held.jsonl", rows)
    options = "grpo: {rewards: [exact_match], num_generations: 2, max_completion_length: 4}" if method == "grpo" else ""
    (tmp_path / "r.yaml").write_text(f"""\
name: rows
model: {{base: {model_dir}}}
lora: {{rank: 4, alpha: 8}}
data: {{train: [{{path: held.jsonl, format: {fmt}}}], eval: [{{path: held.jsonl, format: {fmt}}}], max_seq_length: 64}}
train: {{method: {method}, max_steps: 1, {options}}}
eval: {{metrics: [exact_match], max_new_tokens: 3, slice_by: level}}
""")  # fmt: skip
    recipe = load_recipe(tmp_path / "r.yaml")
    tokenizer = load_tokenizer(recipe)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(base, lora_config(recipe, resolve_targets(recipe, base)))
    torch.manual_seed(0)
    for name, param in model.named_parameters():  # tuned differs from base (a fresh LoRA's B is zero)
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    if method == "sft":
        data = prepare_data(recipe, tokenizer)
        e = recipe.eval
        comparison = compare(model, tokenizer, data.eval, data.eval_samples, list(e.metrics), e.max_new_tokens,
                             e.batch_size, with_base=True, kept=data.eval_kept)  # fmt: skip
    else:
        hooks = methods.load(method)
        comparison = hooks.compare(recipe, model, tokenizer, hooks.prepare(recipe, tokenizer), False)
    return comparison, gold


@pytest.fixture(scope="module")
def by_method(tiny_model_dir, tmp_path_factory):
    """method -> (comparison, gold answers), each made once for the module (the tests read them only)."""
    made: dict[str, tuple[Any, list[str]]] = {}

    def get(method: str) -> tuple[Any, list[str]]:
        if method not in made:
            made[method] = _comparison_by_method(method, tiny_model_dir(), tmp_path_factory.mktemp(method))
        return made[method]

    return get


@pytest.mark.parametrize("method", ["sft", "dpo", "kto", "grpo"])
def test_examples_rows_mean_one_thing_per_key_in_every_method(method, by_method):
    comparison, gold = by_method(method)
    rows = comparison.examples()
    assert [r["reference"] for r in rows] == gold  # `reference` is the gold answer, never a model's
    assert [r["slice"] for r in rows] == SLICES
    models = {"tuned", "base"} | ({"reference_model"} if method != "sft" else set())
    losses = {"loss_tokens", "tuned_loss", "base_loss"} if method == "sft" else set()  # SFT's loss, row by row
    for row in rows:
        per_model = {f"{m}{suffix}" for m in models for suffix in ("", "_scores", "_tokens", "_latency_s")}
        assert set(row) == {"prompt", "reference", "slice"} | per_model | losses, row
        for m in models:
            assert row[f"{m}_scores"]["exact_match"] == float(row[m].strip() == row["reference"].strip())


@pytest.mark.parametrize("method", ["sft", "dpo", "kto", "grpo"])
def test_every_method_reports_each_figure_per_slice_and_the_slices_make_up_the_whole(method, by_method):
    """Two slices of two prompts (pairs, KTO rows) each: every overall figure is there per slice, with its row
    counts, and (equal sizes) the two slices average to the overall figure; through the JSON and back; printed."""
    from rich.console import Console

    from finetune.cli.render import print_comparison

    comparison, _ = by_method(method)
    summary = comparison.summary()
    assert {name: part.examples for name, part in summary.slices.items()} == {"even": 2, "odd": 2}
    for part in summary.slices.values():
        assert part.tuned.names() == summary.tuned.names() and part.base is not None
    for name, value in summary.tuned.metrics.items():
        halves = [summary.slices[s].tuned.metrics[name] for s in ("even", "odd")]
        assert sum(halves) / 2 == pytest.approx(value, abs=1e-9), name
    if method in ("dpo", "kto"):
        assert {part.preference.pairs for part in summary.slices.values()} == {2 if method == "dpo" else 4}
        assert summary.tuned.metrics["reward_margin"] != 0.0  # the tuned adapter differs from the reference
    data = summary.to_dict()
    assert EvalSummary.from_dict(data).to_dict() == data and set(data["slices"]) == {"even", "odd"}
    console = Console(width=200, record=True)
    print_comparison(console, summary)
    lines = [line for line in console.export_text().splitlines() if line.startswith("│ odd")]
    assert len(lines) == len(summary.tuned.names()), lines  # one row per figure of the slice


def test_sft_loss_per_slice_is_token_weighted_with_an_interval_and_gated(by_method):
    """The loss of a slice is its rows' summed cross-entropy over their trained tokens, as the overall figure is
    (so the slices weight by tokens, not rows); its delta to the base has a token-weighted paired interval."""
    comparison, _ = by_method("sft")
    summary = comparison.summary()
    tuned, base = comparison.tuned, comparison.base
    assert summary.tuned.loss == pytest.approx(sum(tuned.loss_sums) / sum(tuned.loss_tokens))
    tokens = {name: sum(n for n, s in zip(tuned.loss_tokens, comparison.loss_slices, strict=True) if s == name)
              for name in ("even", "odd")}  # fmt: skip
    parts = {name: summary.slices[name] for name in tokens}
    weighted = sum(parts[n].tuned.loss * tokens[n] for n in tokens) / sum(tokens.values())
    assert weighted == pytest.approx(summary.tuned.loss)
    assert parts["odd"].tuned.perplexity == pytest.approx(math.exp(parts["odd"].tuned.loss))
    assert tuned.loss_tokens == base.loss_tokens and summary.base.loss != summary.tuned.loss
    (row,) = [r for r in parts["odd"].rows() if r.metric == "loss"]
    assert row.low <= row.delta <= row.high and sum(map(int, row.record.split("/"))) == 2
    data = summary.to_dict()
    assert set(data["slices"]["odd"]["vs_base"]["loss"]) == {"delta", "wins", "losses", "ties", "low", "high", "sign_p"}
    odd = parts["odd"].tuned.loss
    assert gate(summary, require(f"loss[odd]<={odd + 0.01}", f"loss[odd].delta.high<={row.high + 0.01}"), False) == []
    (failure,) = gate(summary, require(f"loss[odd]<={odd - 0.01}"), False)
    assert failure.startswith(f"loss[odd] = {odd:.4f} is over ")


def test_a_preference_slice_is_gated_by_name(by_method):
    comparison, _ = by_method("dpo")
    summary = comparison.summary()
    accuracy = summary.slices["even"].tuned.metrics["preference_accuracy"]
    (failure,) = gate(summary, require(f"preference_accuracy[even]>={accuracy + 0.01}"), False)
    assert failure.startswith(f"preference_accuracy[even] = {accuracy:.4f} is under")
    assert gate(summary, require(f"preference_accuracy[even]>={accuracy}"), False) == []


@pytest.mark.parametrize("method", ["sft", "kto"])
def test_report_and_runs_compare_show_every_figure_per_slice(method, by_method):
    """report.html has a table per slice (the loss in SFT's, the preference metrics in KTO's), and `runs compare`
    reads each slice's figures from the manifest's eval: `loss[odd]`, `preference_accuracy[odd]`."""
    from finetune.report import render
    from finetune.runs import _figures

    summary = by_method(method)[0].summary()
    page = render({"name": "x", "status": "completed"}, [], summary)
    assert "<h3>slice even" in page and "<h3>slice odd" in page
    figure = "loss" if method == "sft" else "preference_accuracy"
    odd = summary.slices["odd"].tuned.get(figure)
    assert f"<td>{figure}</td>" in page.split("<h3>slice odd")[1] and f"{odd:.4f}" in page.split("<h3>slice odd")[1]
    assert _figures({"eval": summary.to_dict()})[f"{figure}[odd]"] == pytest.approx(odd)
