"""GRPO as a recipe stage: rewards written like eval metrics, per-step reward figures, held-out rewards for tuned,
parent and base, a reward failure stopped after a checkpoint, SIGTERM and exact resume, plan and merge.
The shipped example end to end (held-out reward rising on the quickstart) is scripts/check_quickstart_grpo.py."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import preference_runs
import pytest
from helpers import finetune
from shared_grpo import grpo_recipe

from finetune.errors import RecipeError, TrainingInterrupted
from finetune.recipe.load import load_recipe

_BUILT: dict[str, tuple] = {}
parent = preference_runs.parent  # the SFT run GRPO continues: a fixture shared with the preference tests


@pytest.fixture(scope="module")
def grpo(tmp_path_factory, parent):
    """(run directory, trained PeftModel, root) of a GRPO run continuing `parent`, trained once for the module."""
    from finetune.train import train

    if "grpo" not in _BUILT:
        root = tmp_path_factory.mktemp("grpo")
        result = train(load_recipe(grpo_recipe(root, parent)), progress=False)
        _BUILT["grpo"] = (Path(result.run_dir), result.model, root)
    return _BUILT["grpo"]


def logs(run: Path) -> list[dict]:
    """The per-step logs (not the end-of-training summary line)."""
    return [r for line in (run / "metrics.jsonl").read_text().splitlines() if "reward" in (r := json.loads(line))]


def test_every_step_logs_each_reward_kl_and_completion_lengths(grpo):
    run, _, _ = grpo
    steps = logs(run)
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for r in steps:
        for key in ("reward", "reward_std", "rewards/myrewards:first_word/mean", "rewards/myrewards:close_length/std",
                    "kl", "completions/mean_length", "completions/clipped_ratio", "frac_reward_zero_std"):  # fmt: skip
            assert key in r, (key, sorted(r))
        weighted = r["rewards/myrewards:first_word/mean"] + 0.5 * r["rewards/myrewards:close_length/mean"]
        assert r["reward"] == pytest.approx(weighted, abs=1e-5), "reward is the weighted sum of the functions"
        assert 0 < r["completions/mean_length"] <= 8
    assert steps[0]["kl"] == 0.0, "policy == reference (the parent's adapter) at the first step"
    assert any(r["kl"] > 0 for r in steps[1:]), "the policy moves away from the reference"
    html = (run / "report.html").read_text()
    for title in ("reward", "KL to the reference", "completion tokens", "myrewards:first_word"):
        assert f">{title}<" in html, title


def test_held_out_rewards_for_tuned_parent_and_base_and_lineage(grpo, parent):
    from safetensors.torch import load_file

    run, _, _ = grpo
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert summary["method"] == "grpo" and summary["examples"] == 6 and not summary["reference_is_base"]
    for name in ("tuned", "reference", "base"):
        metrics = summary[name]["metrics"]
        assert list(metrics)[:3] == ["reward", "myrewards:first_word", "myrewards:close_length"], metrics
        assert metrics["reward"] == pytest.approx(
            metrics["myrewards:first_word"] + 0.5 * metrics["myrewards:close_length"]
        )
        assert "exact_match" in metrics
    examples = [json.loads(line) for line in (run / "eval" / "examples.jsonl").read_text().splitlines()]
    assert len(examples) == 6 and all({"tuned", "reference_model", "base"} <= set(e) for e in examples)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["parent"]["path"] == str(parent)
    assert manifest["eval"]["tuned"]["metrics"]["reward"] == summary["tuned"]["metrics"]["reward"]
    sft = load_file(parent / "adapter" / "adapter_model.safetensors")
    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    assert saved.keys() == sft.keys(), "the run's adapter is the continued one, without the reference copy"
    assert any(not (saved[k] - sft[k]).abs().max() < 1e-9 for k in sft), "the policy was trained"


def test_eval_of_a_grpo_run_recomputes_the_rewards_and_gates_on_them(grpo):
    run, _, root = grpo
    from typer.testing import CliRunner

    from finetune.cli import app

    out = CliRunner().invoke(app, ["eval", str(run), "--require", "reward>=0", "--require", "myrewards:first_word>=1.01",
                                   "--json", "--out", str(root / "adhoc")])  # fmt: skip
    assert out.exit_code == 1, out.output
    result = json.loads(out.stdout)
    trained = json.loads((run / "eval" / "summary.json").read_text())
    assert result["tuned"]["metrics"] == trained["tuned"]["metrics"], "greedy: the same answers again"
    assert result["gate_failures"] == [
        f"myrewards:first_word = {trained['tuned']['metrics']['myrewards:first_word']:.4f} is under 1.01 "
        "(required myrewards:first_word>=1.01)"
    ]


def test_eval_names_a_metric_in_its_table_as_require_takes_it(grpo):
    """One name in both places: the table's row is `myrewards:first_word`, the name --require accepts."""
    run, _, root = grpo
    from typer.testing import CliRunner

    from finetune.cli import app

    shown = CliRunner().invoke(app, ["eval", str(run), "--limit", "2", "--require", "myrewards:first_word>=0",
                                     "--out", str(root / "named")])  # fmt: skip
    assert shown.exit_code == 0, shown.output
    rows = [line.split("│")[1].strip() for line in shown.stdout.splitlines() if line.startswith("│")]
    assert rows[:3] == ["reward", "myrewards:first_word", "myrewards:close_length"], rows


def test_a_misspelled_require_exits_2_before_anything_loads(grpo, tmp_path):
    """A copy of the run without its tokenizer fails once anything loads (exit 1); a bad --require comes first."""
    run, _, _ = grpo
    from typer.testing import CliRunner

    from finetune.cli import app

    broken = shutil.copytree(run, tmp_path / "copy")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (broken / "adapter" / name).unlink()
    for metric, hint in (("first_word", "myrewards:first_word"), ("rewrd", "reward"), ("loss", None)):
        out = CliRunner().invoke(app, ["eval", str(broken), "--require", f"{metric}>=0.5"])
        assert out.exit_code == 2, out.output
        assert f"--require {metric}: this evaluation reports reward, myrewards:first_word" in out.stderr, out.stderr
        assert (f"did you mean {hint}?" in out.stderr) == (hint is not None), out.stderr
    loads = CliRunner().invoke(app, ["eval", str(broken), "--require", "reward>=0", "--out", str(tmp_path / "o")])
    assert loads.exit_code == 1, loads.output


@pytest.mark.parametrize("fail_as, said", [("nan", "returned nan"), ("text", "returned 'long'"),
                                           ("raise", "raised ZeroDivisionError: division by zero")])  # fmt: skip
def test_a_failing_reward_stops_after_a_checkpoint_naming_function_row_and_value(tmp_path, parent, fail_as, said):
    from finetune.train import train

    recipe = load_recipe(grpo_recipe(tmp_path, parent, name=f"bad-{fail_as}", extra=""), ["train.save_every=1"])
    os.environ.update(REWARD_FAIL_AT="17", REWARD_FAIL_AS=fail_as)  # 8 completions a step: fails in step 3
    try:
        with pytest.raises(TrainingInterrupted) as e:
            train(recipe, progress=False)
    finally:
        del os.environ["REWARD_FAIL_AT"], os.environ["REWARD_FAIL_AS"]
    message = str(e.value)
    assert f"reward myrewards:close_length {said}" in message, message
    assert f"{tmp_path / 'data' / 'prompts.jsonl'}:" in message, "the data row is named"
    assert "checkpoint saved at step 2" in message and "--resume" in message
    run = Path(recipe.run_dir)
    assert (run / "checkpoints" / "checkpoint-2").is_dir()
    assert json.loads((run / "manifest.json").read_text())["status"] == "interrupted"


def test_sigterm_mid_step_then_resume_reproduces_the_uninterrupted_adapter(grpo, parent, tmp_path):
    from safetensors.torch import load_file

    from finetune.train import train

    uninterrupted, _, _ = grpo
    recipe = load_recipe(grpo_recipe(tmp_path, parent))
    os.environ["REWARD_SIGTERM_AT"] = "20"  # in step 3 (8 completions a step)
    try:
        with pytest.raises(TrainingInterrupted, match="stopped by signal 15 at step 3; checkpoint saved"):
            train(recipe, progress=False)
    finally:
        del os.environ["REWARD_SIGTERM_AT"]
    resumed = train(recipe, resume=True, progress=False)
    assert resumed.resumed_from == 3 and resumed.steps == 6
    expected, got = (
        load_file(r / "adapter" / "adapter_model.safetensors") for r in (uninterrupted, Path(recipe.run_dir))
    )
    for key in expected:
        assert (expected[key] - got[key]).abs().max() <= 1e-6, key
    assert [r["reward"] for r in logs(uninterrupted)] == pytest.approx(
        [r["reward"] for r in logs(Path(recipe.run_dir))]
    )


def test_plan_and_merge_work_on_a_grpo_run(grpo, tmp_path):
    from finetune.merge import merge_runs
    from finetune.plan import plan

    run, _, _ = grpo
    recipe = load_recipe(run / "recipe.yaml", check_files=False)
    planned = plan(recipe)
    assert planned.work.available and planned.work.train_rows == 32
    assert planned.work.total_steps == 6
    merged = merge_runs([run], tmp_path / "merged", "float32")
    assert merged.check["passed"] and merged.check["max_abs_diff"] < 1e-3


def test_rewards_are_checked_before_any_weight_loads(tmp_path, parent):
    recipe = grpo_recipe(tmp_path, parent)
    (tmp_path / "myrewards.py").write_text("def first_word(prediction):\n    return 1.0\n")
    bad = finetune("validate", str(recipe), cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "grpo.yaml:10:" in bad.stderr and "myrewards:first_word" in bad.stderr, bad.stderr
    shutil.copy(recipe, tmp_path / "other.yaml")
    (tmp_path / "myrewards.py").write_text("import not_a_module_anywhere\n")
    missing = finetune("validate", str(tmp_path / "other.yaml"), cwd=tmp_path)
    assert missing.returncode == 2 and "not_a_module_anywhere" in missing.stderr, missing.stderr


def test_grpo_options_are_validated_with_their_reasons(tmp_path, parent):
    recipe = grpo_recipe(tmp_path, parent)
    with pytest.raises(RecipeError, match=r"batch_size x grad_accum \(6\) counts completions"):
        load_recipe(recipe, ["train.batch_size=6"])
    with pytest.raises(RecipeError, match=r"reward_weights: has 1 weights for 2 rewards"):
        load_recipe(recipe, ["train.grpo.reward_weights=[1.0]"])
    with pytest.raises(RecipeError, match=r"unknown reward 'bleu'"):
        load_recipe(recipe, ["train.grpo.rewards=[bleu, exact_match]"])
    with pytest.raises(RecipeError, match=r"train.grpo: options of method grpo, but train.method is sft"):
        load_recipe(recipe, ["train.method=sft"])


def test_grpo_from_the_base_trains_a_new_adapter_whose_reference_is_the_base(tmp_path, tiny_model_dir):
    from finetune.train import train

    recipe = grpo_recipe(tmp_path, tmp_path, name="from-base")
    text = recipe.read_text().replace(f"model: {{from_run: {tmp_path}}}", f"model: {{base: {tiny_model_dir()}}}")
    recipe.write_text(text + "lora: {rank: 4, alpha: 8}\n")
    result = train(load_recipe(recipe, ["train.max_steps=2", "train.save_every=null"]), progress=False)
    summary = json.loads((Path(result.run_dir) / "eval" / "summary.json").read_text())
    assert summary["reference_is_base"] and summary["reference"] == summary["base"]
    manifest = json.loads((Path(result.run_dir) / "manifest.json").read_text())
    assert manifest["parent"] is None and manifest["lora"]["trainable_params"] > 0
    assert len(logs(Path(result.run_dir))) == 2


def test_vllm_generation_without_a_gpu_is_refused_before_any_weight_is_read(tmp_path, parent, monkeypatch):
    from finetune import train as stage
    from finetune.errors import UserError

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before use_vllm was checked")

    monkeypatch.setattr(stage, "load_model", no_load)
    recipe = load_recipe(grpo_recipe(tmp_path, parent), ["train.grpo.use_vllm=true"])
    with pytest.raises(UserError, match=r"train.grpo.use_vllm: true needs a CUDA GPU"):
        stage.train(recipe, progress=False)
