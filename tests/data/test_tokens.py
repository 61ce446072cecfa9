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

    rows = [([5, 6, 7], [IGNORE, 6, 7]), ([], []), ([2**31 - 1], [2**31 - 1])]  # a label is an id or IGNORE
    ours, inferred = Tokens.of(rows).dataset(), Dataset.from_dict({"input_ids": [[5, 6, 7], [], [2**31 - 1]],
                                                                  "labels": [[IGNORE, 6, 7], [], [2**31 - 1]]})  # fmt: skip
    assert ours.features == inferred.features and ours.to_dict() == inferred.to_dict()


@settings(max_examples=30, deadline=None)
@given(rows_, st.integers(0, 14))
def test_selecting_every_row_whole_shares_the_arrays_and_anything_else_copies(rows, within):
    """The fast path of `select` (every row, in order, none cut) gives what the copy gives."""
    tokens = Tokens.of(rows)
    every = range(len(rows))
    assert tokens.select(every) is tokens
    cut = tokens.select(every, within)
    assert list(cut) == [(ids[:within], labels[:within]) for ids, labels in rows]
    assert (cut is tokens) == all(len(ids) <= within for ids, _ in rows)


def test_the_dataset_fingerprint_follows_the_rows():
    """A content fingerprint, not a random one: the same rows give the same, other rows another."""
    rows = [([5, 6, 7], [IGNORE, 6, 7]), ([8], [8])]
    same, other = Tokens.of(rows).dataset(), Tokens.of([rows[0], ([8], [IGNORE])]).dataset()
    assert Tokens.of(rows).dataset()._fingerprint == same._fingerprint != other._fingerprint
