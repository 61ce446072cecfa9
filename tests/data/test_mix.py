"""data/mix.py: weighted mixing whose shares do not depend on the sources' sizes, seeded, through prepare_data."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from finetune.data.mix import mix


def test_weights_are_the_shares_of_an_epoch_whatever_the_sizes():
    order = mix([100, 10_000], [0.8, 0.2], "all_exhausted", seed=0)
    counts = Counter(s for s, _ in order)
    share = counts[0] / len(order)
    assert abs(share - 0.8) < 3 * (0.8 * 0.2 / len(order)) ** 0.5 + 1e-9, share  # within sampling error
    assert {r for s, r in order if s == 1} == set(range(10_000))  # the large source is read through once
    assert counts[1] == 10_000 and order == mix([100, 10_000], [0.8, 0.2], "all_exhausted", seed=0)
    assert order != mix([100, 10_000], [0.8, 0.2], "all_exhausted", seed=1)


def test_first_exhausted_repeats_no_row_and_ends_with_the_first_source_to_run_out():
    shares = []
    for seed in range(30):
        order = mix([100, 10_000], [0.8, 0.2], "first_exhausted", seed=seed)
        assert len(set(order)) == len(order)  # no row twice
        assert sum(s == 0 for s, _ in order) == 100  # the small source, drawn 80% of the time, ran out
        shares.append(sum(s == 0 for s, _ in order) / len(order))
    assert abs(sum(shares) / len(shares) - 0.8) < 0.02, shares


def _chats(path, n, tag):
    rows = [{"messages": [{"role": "user", "content": f"{tag} question {i}"},
                          {"role": "assistant", "content": f"{tag} answer {i}"}]} for i in range(n)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prepare_data_trains_the_mix_and_records_it(tmp_path):
    from finetune.data.prepare import prepare_data
    from finetune.errors import RecipeError
    from finetune.modeling import load_tokenizer
    from finetune.recipe.load import load_recipe

    small, large = _chats(tmp_path / "small.jsonl", 10, "s"), _chats(tmp_path / "large.jsonl", 200, "l")
    sources = f"data.train=[{{path: {small}, weight: 3}}, {{path: {large}, weight: 1}}]"
    recipe = load_recipe("recipes/quickstart.yaml", [sources, "data.eval=null", "data.mix_stop=all_exhausted"])
    prepared = prepare_data(recipe, load_tokenizer(recipe), use_cache=False)
    mixed = {m["path"]: m for m in prepared.stats.mix["sources"]}
    assert mixed[str(small)]["weight"] == 0.75 and mixed[str(large)]["effective_rows"] == 200
    assert mixed[str(small)]["times_seen"] > 40  # 10 rows drawn 3x as often as 200
    drawn = Counter(w.rsplit(":", 1)[0] for w in prepared.train_where)
    assert drawn == {str(small): mixed[str(small)]["effective_rows"], str(large): 200}
    assert prepared.stats.train_rows == len(prepared.train) == sum(drawn.values())
    from finetune.plan import plan

    work = plan(recipe).work  # plan counts the epoch over the mix: its steps and each source's share
    assert work.sequences_per_epoch == prepared.stats.train_rows and work.mix == prepared.stats.mix["sources"]
    with pytest.raises(RecipeError, match=r"data.train\[1\].weight: give every training source a weight"):
        load_recipe("recipes/quickstart.yaml", [f"data.train=[{{path: {small}, weight: 3}}, {{path: {large}}}]"])
