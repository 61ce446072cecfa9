"""eval.harness: lm-evaluation-harness tasks on the base and the tuned model, stored beside our held-out eval."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import tiny
from helpers import finetune, write_recipe
from typer.testing import CliRunner

from finetune.cli import app
from finetune.errors import RecipeError, UserError
from finetune.harness import check, summarize
from finetune.recipe.load import load_recipe


def write_tasks(folder: Path) -> Path:
    """Two offline lm-eval tasks over local jsonl: multiple choice (acc) and rolling loglikelihood (bits_per_byte)."""
    pairs = [("alpha", "beta"), ("red", "blue"), ("lake", "river"), ("plum", "pear"), ("hill", "valley")]
    words = tiny.write_jsonl(
        folder / "words.jsonl", [{"q": f"{a} {b}", "choices": [b, a], "answer": 0} for a, b in pairs]
    )
    text = tiny.write_jsonl(folder / "text.jsonl", [{"text": f"{a} {b} {b} {a}"} for a, b in pairs])
    common = "dataset_path: json\ntest_split: test\n"
    (folder / "words.yaml").write_text(
        f"task: tiny_words\n{common}dataset_kwargs: {{data_files: {{test: {words}}}}}\n"
        'output_type: multiple_choice\ndoc_to_text: "{{q}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
        "metric_list: [{metric: acc}]\n"
    )
    (folder / "text.yaml").write_text(
        f"task: tiny_text\n{common}dataset_kwargs: {{data_files: {{test: {text}}}}}\n"
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list: [{metric: bits_per_byte}]\n"
    )
    return folder


def harness_recipe(tmp_path: Path, model_dir: Path, harness: str) -> Path:
    recipe = write_recipe(tmp_path, model_dir)
    recipe.write_text(
        recipe.read_text().replace("  max_new_tokens: 6\n", f"  max_new_tokens: 6\n  harness: {harness}\n")
    )
    return recipe


def test_summary_keeps_headline_metrics_per_model_with_deltas():
    def result(acc: float) -> dict:
        fields = {"alias": "t", "sample_len": 5, "acc,none": acc, "acc_stderr,none": 0.1, "exact_match,strict": 1.0}
        return {"results": {"t": fields}}

    assert summarize({"base": result(0.25), "tuned": result(0.75)}) == {
        "t": {
            "acc": {"base": 0.25, "tuned": 0.75, "delta": 0.5},
            "exact_match,strict": {"base": 1.0, "tuned": 1.0, "delta": 0.0},
        }
    }
    assert summarize({"tuned": result(0.75)})["t"]["acc"] == {"tuned": 0.75}


def test_task_paths_resolve_against_the_recipe_and_names_stay_names(tmp_path, tiny_model_dir):
    write_tasks(tmp_path / "tasks")
    recipe = load_recipe(harness_recipe(tmp_path, tiny_model_dir(), "[tasks/words.yaml, tasks, hellaswag]"))
    assert recipe.eval.harness == [str(tmp_path / "tasks" / "words.yaml"), str(tmp_path / "tasks"), "hellaswag"]


def test_harness_without_held_out_data_is_a_recipe_error(tmp_path, tiny_model_dir):
    recipe = harness_recipe(tmp_path, tiny_model_dir(), "[hellaswag]")
    recipe.write_text(recipe.read_text().replace("  eval: {split_ratio: 0.25}\n", ""))
    with pytest.raises(RecipeError, match=r"eval.harness: runs with the held-out comparison, which needs data.eval"):
        load_recipe(recipe)


def test_without_lm_eval_training_stops_before_it_starts(tmp_path, tiny_model_dir, monkeypatch):
    recipe = harness_recipe(tmp_path, tiny_model_dir(), "[hellaswag]")
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval...` raise ImportError
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["train", str(recipe)])
    assert result.exit_code == 2, result.output
    assert "error: eval.harness needs lm-evaluation-harness: pip install lm-eval" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_unknown_tasks_are_all_reported_with_a_suggestion(tmp_path, tiny_model_dir):
    pytest.importorskip("lm_eval")
    write_tasks(tmp_path / "tasks")
    (tmp_path / "tasks" / "notes.yaml").write_text("just: notes\n")
    recipe = load_recipe(harness_recipe(tmp_path, tiny_model_dir(), "[hellaswagg, tasks/notes.yaml, tasks]"))
    with pytest.raises(UserError) as raised:
        check(recipe)
    assert [str(p) for p in raised.value.problems] == [
        "eval.harness: 'hellaswagg' is not an lm-eval task, nor a task file (relative to the recipe); "
        "did you mean 'hellaswag'?",
        f"eval.harness: {tmp_path / 'tasks' / 'notes.yaml'} defines no lm-eval task (a task file needs a `task:` key)",
    ]


@pytest.mark.slow
def test_train_and_eval_store_harness_results_for_base_and_tuned(tmp_path, tiny_model_dir):
    pytest.importorskip("lm_eval")
    write_tasks(tmp_path / "tasks")
    recipe = harness_recipe(tmp_path, tiny_model_dir(), "[tasks]")
    trained = finetune("train", str(recipe), cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "lm-eval harness" in trained.stdout and "tiny_words" in trained.stdout
    run = tmp_path / "runs" / "tiny"
    stored = json.loads((run / "eval" / "harness.json").read_text())
    assert set(stored) == {"base", "tuned"}
    for model in ("base", "tuned"):
        assert stored[model]["n-samples"]["tiny_words"]["effective"] == 5
        assert 0 <= stored[model]["results"]["tiny_words"]["acc,none"] <= 1
    bpb = {model: stored[model]["results"]["tiny_text"]["bits_per_byte,none"] for model in ("base", "tuned")}
    assert bpb["base"] != bpb["tuned"], "the tuned model must carry the adapter (peft=)"
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert summary["harness"]["tiny_text"]["bits_per_byte"] == pytest.approx(
        {**bpb, "delta": bpb["tuned"] - bpb["base"]}
    )
    assert json.loads((run / "manifest.json").read_text())["eval"]["harness"] == summary["harness"]

    again = finetune("eval", str(run), "--against", "none", "--json", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["harness"]["tiny_text"]["bits_per_byte"] == pytest.approx({"tuned": bpb["tuned"]})
    ad_hoc = Path(json.loads(again.stdout)["out_dir"])  # eval/<UTC time>/: training's record stays
    assert set(json.loads((ad_hoc / "harness.json").read_text())) == {"tuned"}
    assert set(json.loads((run / "eval" / "harness.json").read_text())) == {"base", "tuned"}
