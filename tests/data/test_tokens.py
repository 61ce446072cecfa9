"""data/tokens.py: the flat rows give what the lists of ints they replaced gave, for any rows."""

from hypothesis import given, settings
from hypothesis import strategies as st

from finetune.data.tokens import IGNORE, Tokens

token = st.integers(0, 50_000)
row = st.lists(st.tuples(token, st.booleans()), max_size=12).map(
    lambda pairs: ([t for t, _ in pairs], [t if trained else IGNORE for t, trained in pairs])
)
rows_ = st.lists(row, max_size=8)


@settings(max_examples=60, deadline=None)
@given(rows_, st.data())
def test_flat_rows_behave_as_the_lists(rows, data):
    tokens = Tokens.of(rows)
    assert list(tokens) == rows and len(tokens) == len(rows)
    assert [tokens[i] for i in range(len(rows))] == rows
    assert tokens.lengths().tolist() == [len(ids) for ids, _ in rows]
    within = data.draw(st.integers(0, 14))
    assert tokens.trained().tolist() == [sum(t != IGNORE for t in labels) for _, labels in rows]
    assert tokens.trained(within).tolist() == [sum(t != IGNORE for t in labels[:within]) for _, labels in rows]
    picked = data.draw(st.lists(st.integers(0, len(rows) - 1), max_size=10)) if rows else []
    assert list(tokens.select(picked)) == [rows[i] for i in picked]
    assert list(tokens.select(picked, within)) == [(rows[i][0][:within], rows[i][1][:within]) for i in picked]
    cut = data.draw(st.integers(0, len(rows)))
    assert Tokens.concat([Tokens.of(rows[:cut]), Tokens.of(rows[cut:])]) == tokens


def test_the_dataset_has_the_types_and_values_from_dict_infers():
    from datasets import Dataset

    rows = [([5, 6, 7], [IGNORE, 6, 7]), ([], []), ([2**31 - 1], [2**40])]
    ours, inferred = Tokens.of(rows).dataset(), Dataset.from_dict({"input_ids": [[5, 6, 7], [], [2**31 - 1]],
                                                                  "labels": [[IGNORE, 6, 7], [], [2**40]]})  # fmt: skip
    assert ours.features == inferred.features and ours.to_dict() == inferred.to_dict()
