"""Runs that continue runs: what a recipe takes from its parent, what it must agree with, and the recorded lineage.

The parents here are directories laid out like finished runs (no training); methods/test_preference.py and
methods/test_grpo.py continue real trained runs end to end.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.files import file_sha256
from finetune.lineage import ParentRunError, check_same_weights, continue_parent, lineage, parent_of, parent_record
from finetune.recipe.load import load_recipe


def parent_run(root: Path, status: str = "completed", template: str | None = "{{ messages }}") -> Path:
    """A finished SFT run's files: resolved recipe, manifest, adapter (and the template saved beside it)."""
    run = root / "runs" / "sft"
    (run / "adapter").mkdir(parents=True)
    (run / "recipe.yaml").write_text(
        "name: sft\nmodel: {base: org/base-model, revision: abc123}\n"
        "lora: {rank: 4, alpha: 8, targets: [q_proj, v_proj]}\n"
        "data: {train: [{path: train.jsonl}], chat_template: chatml}\n"
    )
    manifest = {"name": "sft", "status": status, "base_model": {"id": "org/base-model", "weights_sha256": "w1"}}
    (run / "manifest.json").write_text(json.dumps(manifest))
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    if template is not None:
        (run / "adapter" / "chat_template.jinja").write_text(template)
    return run


def child(root: Path, run: Path, extra: str = "", base: str = ""):
    (root / "dpo.yaml").write_text(
        f"name: dpo\nmodel: {{from_run: {run}{', base: ' + base if base else ''}}}\n{extra}"
        "data: {train: [{path: pairs.jsonl, format: preference}]}\ntrain: {method: dpo}\n"
    )
    (root / "pairs.jsonl").write_text("")
    return load_recipe(root / "dpo.yaml", check_files=False)


def test_a_continued_recipe_takes_base_revision_lora_and_the_saved_template_from_its_parent(tmp_path):
    run = parent_run(tmp_path)
    recipe = continue_parent(child(tmp_path, run))
    assert (recipe.model.base, recipe.model.revision) == ("org/base-model", "abc123")
    assert (recipe.lora.rank, recipe.lora.alpha, list(recipe.lora.targets)) == (4, 8, ["q_proj", "v_proj"])
    assert recipe.data.chat_template == str((run / "adapter" / "chat_template.jinja").resolve())
    assert recipe.model.from_run == str(run.resolve())


def test_without_a_saved_template_the_parents_recipe_names_it(tmp_path):
    recipe = continue_parent(child(tmp_path, parent_run(tmp_path, template=None)))
    assert recipe.data.chat_template == "chatml"


def test_every_disagreement_with_the_parent_is_named_at_once_with_both_values(tmp_path):
    recipe = child(tmp_path, parent_run(tmp_path), extra="lora: {rank: 8, alpha: 8}\n", base="org/other")
    with pytest.raises(ParentRunError) as e:
        continue_parent(recipe)
    text = str(e.value)
    assert "'org/other' here, but the run of" in text and "has 'org/base-model'" in text
    assert "8 here, but the adapter of" in text and "has 4" in text
    assert "lora.alpha" not in text, "a value that agrees is no problem"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: root / "nowhere", "not a run directory"),
        (lambda root: parent_run(root, status="failed"), "status is 'failed', not 'completed'"),
    ],
)
def test_a_parent_that_is_not_a_completed_run_is_refused(tmp_path, make, message):
    with pytest.raises(ParentRunError, match=message):
        parent_of(child(tmp_path, make(tmp_path)))


def test_a_parent_without_its_adapter_is_refused(tmp_path):
    run = parent_run(tmp_path)
    (run / "adapter" / "adapter_config.json").unlink()
    with pytest.raises(ParentRunError, match="has no adapter"):
        parent_of(child(tmp_path, run))


def test_the_record_pins_the_parents_manifest_and_adapter_by_hash(tmp_path):
    run = parent_run(tmp_path)
    record = parent_record(child(tmp_path, run))
    assert record["path"] == str(run.resolve()) and record["name"] == "sft"
    assert record["manifest_sha256"] == file_sha256(run / "manifest.json")
    assert record["adapter_sha256"] == file_sha256(run / "adapter" / "adapter_model.safetensors")
    assert record["base_model"]["weights_sha256"] == "w1"


def test_other_base_weights_than_the_parents_are_refused():
    parent = {"path": "runs/sft", "base_model": {"weights_sha256": "w1"}}
    check_same_weights(parent, {"weights_sha256": "w1"})
    check_same_weights(parent, {"weights_sha256": None})  # unknown is not different
    check_same_weights(None, {"weights_sha256": "w2"})
    with pytest.raises(ParentRunError, match="weights changed since the parent run runs/sft"):
        check_same_weights(parent, {"weights_sha256": "w2"})


def test_lineage_follows_parents_while_their_manifests_exist_and_never_loops(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "manifest.json").write_text(json.dumps({"name": "sft", "base_model": {"id": "org/base"}}))
    (b / "manifest.json").write_text(json.dumps({"name": "dpo", "parent": {"name": "sft", "path": str(a)}}))
    run = {"name": "grpo", "parent": {"name": "dpo", "path": str(b)}, "base_model": {"id": "org/base"}}
    assert lineage(run) == ["org/base", f"sft ({a})", f"dpo ({b})", "grpo"]
    (a / "manifest.json").unlink()
    assert lineage(run) == ["org/base", f"sft ({a})", f"dpo ({b})", "grpo"], "a moved grandparent still has its name"
    (b / "manifest.json").write_text(json.dumps({"name": "dpo", "parent": {"name": "dpo", "path": str(b)}}))
    assert lineage(run) == ["org/base", f"dpo ({b})", "grpo"], "a parent naming itself ends the walk"
