"""Combining adapters: the choices checked before any weight is read, and the run-like recipe of the result.

The combination's math on real trained adapters (ties, linear, cat's exact weighted sum) is in test_merge.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.combine import _check_compatible, _combine_density, _combine_weights, _combined_recipe, combine
from finetune.errors import UserError
from finetune.recipe.load import load_recipe
from finetune.runs import Run

ADAPTER = {"r": 8, "target_modules": ["v_proj", "q_proj"]}


def run(root: Path, name: str, base: str = "org/base", train: str = "a.jsonl", **adapter) -> Run:
    """A run as `open_run` gives it: its resolved recipe and its adapter's config."""
    root = root / name
    root.mkdir(parents=True)
    (root / "recipe.yaml").write_text(f"name: {name}\nmodel: {{base: {base}}}\ndata: {{train: [{{path: {train}}}]}}\n")
    return Run(root, load_recipe(root / "recipe.yaml", check_files=False), {}, {**ADAPTER, **adapter}, {})


def test_weights_default_to_an_equal_share_and_must_be_one_finite_number_per_run():
    assert _combine_weights(None, 4) == [0.25] * 4
    assert _combine_weights([2, 1], 2) == [2.0, 1.0]
    with pytest.raises(UserError, match="3 weight"):
        _combine_weights([1, 1, 1], 2)
    with pytest.raises(UserError, match="finite"):
        _combine_weights([1.0, float("nan")], 2)


@pytest.mark.parametrize(
    ("method", "density", "expected"),
    [
        ("ties", None, 0.5),
        ("dare_ties", 0.2, 0.2),
        ("dare_linear", 1.0, 1.0),
        ("linear", None, None),
        ("cat", None, None),
    ],
)
def test_density_applies_to_the_pruning_methods_only(method, density, expected):
    assert _combine_density(method, density) == expected


@pytest.mark.parametrize(
    ("method", "density", "message"), [("linear", 0.5, "only applies to ties"), ("ties", 0.0, "must be > 0"),
                                       ("dare_ties", 1.5, "must be > 0")],
)  # fmt: skip
def test_a_density_that_does_not_apply_or_fit_is_refused(method, density, message):
    with pytest.raises(UserError, match=message):
        _combine_density(method, density)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((["runs/a"], "linear"), "two or more run directories"),
        ((["runs/a", "runs/b"], "average"), "--method: must be one of linear, ties"),
        ((["runs/a", "runs/b"], "ties", None, None, None), "--out is required"),
    ],
)
def test_the_call_is_checked_before_any_run_is_opened(args, message):
    with pytest.raises(UserError, match=message):
        combine(*args)


def test_every_incompatibility_is_named_at_once(tmp_path):
    first = run(tmp_path, "a")
    other = run(tmp_path, "b", base="org/other", target_modules=["q_proj"], use_dora=True, r=4)
    with pytest.raises(UserError) as e:
        _check_compatible([first, other], "linear")
    text = str(e.value)
    for said in ("base model differs", "target modules differ", "is a DoRA adapter", "needs equal ranks"):
        assert said in text, (said, text)


def test_cat_adds_the_ranks_svd_keeps_the_largest_and_targets_are_sorted(tmp_path):
    runs = [run(tmp_path, "a"), run(tmp_path, "b", r=4)]
    assert _check_compatible(runs, "cat") == (["q_proj", "v_proj"], 12)
    assert _check_compatible(runs, "svd") == (["q_proj", "v_proj"], 8)
    with pytest.raises(UserError, match="needs equal ranks"):
        _check_compatible(runs, "ties")


def test_a_regex_target_or_whole_trained_modules_cannot_be_combined(tmp_path):
    regex = [run(tmp_path, "a", target_modules=".*proj"), run(tmp_path, "b", target_modules=".*proj")]
    with pytest.raises(UserError, match="regular expression"):
        _check_compatible(regex, "linear")
    saved = [run(tmp_path, "c"), run(tmp_path, "d", modules_to_save=["lm_head"])]
    with pytest.raises(UserError, match="trains whole modules \\(lm_head"):
        _check_compatible(saved, "linear")


def test_the_combined_recipe_is_the_first_parents_with_every_parents_data_once(tmp_path):
    shared, own = str(tmp_path / "shared.jsonl"), str(tmp_path / "own.jsonl")
    runs = [run(tmp_path, "a", train=shared), run(tmp_path, "b", train=own), run(tmp_path, "c", train=shared)]
    recipe = _combined_recipe(runs, tmp_path / "mix", 16, ["q_proj", "v_proj"])
    assert recipe["name"] == "mix" and recipe["output_dir"] == str(tmp_path / "mix")
    assert [s["path"] for s in recipe["data"]["train"]] == [shared, own]
    assert {k: recipe["lora"][k] for k in ("rank", "alpha", "variant", "targets")} == {
        "rank": 16, "alpha": 16.0, "variant": "lora", "targets": ["q_proj", "v_proj"]}  # fmt: skip
    assert _combined_recipe(runs, tmp_path / "not a name!", 16, [])["name"] == "combined"
