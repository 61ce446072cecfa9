"""Findings over preference data (DPO pairs, KTO judged completions): what ruins those runs, with rows as `file:row`.

Duplicates, near-duplicates and train/eval leakage as for SFT rows (a pair's text is its prompt and
both answers; leakage is a held-out prompt in train, or a near copy of a whole held-out pair); and
what only preference data can get wrong:
- `identical_pairs` (DPO): chosen == rejected after normalising whitespace: no preference to learn,
  the loss stays at log 2 while the step is paid for;
- `contradictions`: one prompt whose answers A over B and B over A both appear (DPO), or one
  (prompt, completion) labelled both desirable and undesirable (KTO): each cancels the other's gradient;
- `label_balance` (KTO): desirable against undesirable after `train.kto.desirable_weight` /
  `undesirable_weight`, outside 1:1 to 4:3 (desirable_weight x desirable rows to undesirable_weight x
  undesirable rows: the range TRL's KTO trainer docs recommend), or one label missing;
- `empty_answers`, `template_tokens` on every side.
"""

from __future__ import annotations

from collections import defaultdict

from finetune.data.checks import (
    ChecksResult,
    Finding,
    Texts,
    _duplicates,
    _finding,
    _leakage,
    _per_source,
    _template_tokens,
    exact_duplicates,
    leaked,
    near_duplicates,
    normalise,
)
from finetune.data.formats import Judged
from finetune.data.near import Sketch

KTO_BALANCE = (1.0, 4 / 3)  # weighted desirable : undesirable, as the KTO paper recommends


def check_pairs(
    train: list[list[Judged]],
    held_out: list[list[Judged]],
    special_tokens: list[str],
    threshold: float,
    kto_weights: tuple[float, float] | None = None,
) -> ChecksResult:
    """Every finding over the training groups (a DPO pair, or a KTO row or pair); `kto_weights` for KTO runs."""
    rows, held_rows = [g[0] for g in train], [g[0] for g in held_out]
    texts, held = _texts(train), _texts(held_out)
    sketch = Sketch.of(held.wholes + texts.wholes)
    exact = exact_duplicates(texts.wholes)
    near = {i: j for i, j in near_duplicates(sketch.part(len(held_out)), threshold).items() if i not in exact}
    leaks = leaked(texts, held, sketch, threshold)
    empty = [i for i, g in enumerate(train) if any(not j.completion.strip() for j in g)]
    findings = [
        *_duplicates(rows, exact, near, None),
        *_leakage(rows, held_rows, leaks),
        _identical(train, rows) if kto_weights is None else Finding("identical_pairs", 0, ""),
        _contradictions(train, rows),
        _finding("empty_answers", empty, rows, "a side whose answer is empty or only whitespace"),
        *_template_tokens(rows, [_raw(g) for g in train], special_tokens),
        *([_balance(train, kto_weights)] if kto_weights is not None else []),
    ]
    findings = [f for f in findings if f.rows]
    matches = {"duplicates": set(exact), "near_duplicates": set(near), "leakage": set(leaks)}
    return ChecksResult(findings, _per_source(rows, findings), matches=matches)


def _prompt(judged: Judged) -> str:
    return "\n".join(f"{r}: {normalise(c)}" for r, c in judged.prompt)


def _texts(groups: list[list[Judged]]) -> Texts:
    """A group's prompt, its first answer, and its whole text: prompt, then each answer with its verdict."""
    prompts = [_prompt(g[0]) for g in groups]
    answers = [normalise(g[0].completion) for g in groups]
    wholes = [
        p + "".join(f"\n{'=>' if j.desirable else '<>'} {normalise(j.completion)}" for j in g)
        for p, g in zip(prompts, groups, strict=True)
    ]
    last = [normalise(g[0].prompt[-1][1]) if g[0].prompt else "" for g in groups]
    return Texts(prompts, answers, wholes, last)


def _raw(group: list[Judged]) -> str:
    return "\n".join([*(c for _, c in group[0].prompt), *(j.completion for j in group)])


def _identical(train: list[list[Judged]], rows: list[Judged]) -> Finding:
    same = [i for i, g in enumerate(train) if len(g) == 2 and normalise(g[0].completion) == normalise(g[1].completion)]
    return _finding("identical_pairs", same, rows, "chosen == rejected: nothing to prefer, the loss stays at log 2")


def _contradictions(train: list[list[Judged]], rows: list[Judged]) -> Finding:
    """Pairs preferring A over B and B over A for one prompt; a (prompt, completion) judged both ways."""
    verdicts: dict[tuple, dict[bool, int]] = defaultdict(dict)  # (prompt, answer[, other answer]) -> verdict -> row
    for i, g in enumerate(train):
        if len(g) == 2 and g[0].desirable != g[1].desirable:  # a pair: A over B is True for (A, B), False for (B, A)
            a, b = normalise(g[0].completion), normalise(g[1].completion)
            verdicts[(_prompt(g[0]), *sorted((a, b)))].setdefault(a < b, i)
        for j in g if len(g) == 1 else ():
            verdicts[(_prompt(j), normalise(j.completion))].setdefault(j.desirable, i)
    groups = [sorted(v.values()) for v in verdicts.values() if len(v) == 2]
    found = sorted({i for g in groups for i in g})
    f = _finding("contradictions", found, rows, f"{len(groups)} prompts judged both ways (the two verdicts cancel)")
    f.examples = [" vs ".join(rows[i].where for i in g) for g in groups[:5]]
    return f


def _balance(train: list[list[Judged]], weights: tuple[float, float]) -> Finding:
    good = sum(j.desirable for g in train for j in g)
    bad = sum(not j.desirable for g in train for j in g)
    if not good or not bad:
        return Finding(
            "label_balance", good + bad, f"only {'desirable' if good else 'undesirable'} rows: KTO needs both"
        )
    ratio = weights[0] * good / (weights[1] * bad)
    if KTO_BALANCE[0] <= ratio <= KTO_BALANCE[1]:
        return Finding("label_balance", 0, "")
    even = weights[1] * bad / good  # the desirable_weight that makes the weighted ratio 1
    return Finding(
        "label_balance",
        good + bad,
        f"{good} desirable / {bad} undesirable, weighted ratio {ratio:.2f} (recommended 1 to 1.33); "
        f"train.kto.desirable_weight {even:.2f} would make it 1",
    )
