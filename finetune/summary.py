"""The held-out summary: tuned vs base figures, typed, with the one place that knows each metric's direction.

Written by `finetune eval` and at the end of training (eval/summary.json, the manifest's `eval`),
read by every renderer (the CLI table, report.html, the exported model card, `runs`) and by the
CI gate, which all take their rows from `EvalSummary.rows()`. The JSON shape is the run
directory's contract and does not change.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Any

from finetune.errors import UserError
from finetune.recipe.schema import LOSS_METRICS
from finetune.uncertainty import CONFIDENCE, RESAMPLES, SEED

LOWER_IS_BETTER = frozenset(LOSS_METRICS)  # every other metric (exact_match, a user's function) is higher-is-better


def lower_is_better(metric: str) -> bool:
    return metric in LOWER_IS_BETTER


@dataclass(frozen=True)
class EvalPoint:
    """One held-out evaluation inside training: the figure the method ranks adapters by, and its direction."""

    step: int
    metric: str  # "loss", or "reward" for GRPO
    value: float
    higher_is_better: bool


@dataclass
class Scores:
    """One model's held-out figures."""

    loss: float | None = None
    perplexity: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    logps: dict[str, float] | None = None  # preference runs: mean log-probability of chosen and rejected answers

    def get(self, name: str) -> float | None:
        return {"loss": self.loss, "perplexity": self.perplexity}.get(name, self.metrics.get(name))

    def names(self) -> list[str]:
        """The figures this model has, in display order: loss, perplexity, then the metrics as configured."""
        return [n for n in LOSS_METRICS if self.get(n) is not None] + list(self.metrics)

    def to_dict(self) -> dict[str, Any]:
        out = {"loss": self.loss, "perplexity": self.perplexity, "metrics": dict(self.metrics)}
        return out if self.logps is None else {**out, "logps": dict(self.logps)}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Scores | None:
        if not data:
            return None
        return cls(data.get("loss"), data.get("perplexity"), dict(data.get("metrics") or {}), data.get("logps"))


@dataclass
class Row:
    """One metric, tuned against another model (`base`: the base, or for `rows("reference")` a preference run's
    reference); `better` says whether tuned beats it in the metric's own direction."""

    metric: str
    tuned: float
    base: float | None
    wins: int | None = None  # per-example record, for generation metrics
    losses: int | None = None
    ties: int | None = None
    low: float | None = None  # the paired bootstrap interval of the delta (finetune.uncertainty)
    high: float | None = None
    sign_p: float | None = None  # the sign test's two-sided p on wins against losses

    @property
    def delta(self) -> float | None:
        return None if self.base is None else self.tuned - self.base

    @property
    def better(self) -> bool | None:
        """True: tuned is better than base; False: worse; None: equal, or no base."""
        if self.base is None or self.tuned == self.base:
            return None
        return (self.tuned < self.base) == lower_is_better(self.metric)

    @property
    def record(self) -> str:
        return "" if self.wins is None else f"{self.wins}/{self.losses}/{self.ties}"

    def delta_text(self, digits: int = 4) -> str:
        """`+0.1200 [+0.0500, +0.1900]`: the delta and, where computed, its interval; "" without a base."""
        if self.delta is None:
            return ""
        interval = "" if self.low is None else f" [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"
        return f"{self.delta:+.{digits}f}{interval}"


@dataclass
class Preference:
    """What a preference run's summary adds: the method, its beta, the held-out pairs and the reference's figures."""

    method: str
    beta: float
    pairs: int
    reference: Scores  # the parent run's adapter (or the base, for a run started from the base)
    reference_is_base: bool = False
    records: dict[str, dict[str, int]] = field(default_factory=dict)  # metric -> wins, losses, ties vs reference

    def versus(self, tuned: Scores) -> dict[str, dict[str, Any]]:
        return {
            name: {"delta": tuned.metrics[name] - self.reference.metrics[name], **self.records.get(name, {})}
            for name in tuned.metrics
            if name in self.reference.metrics
        }


@dataclass
class EvalSummary:
    tuned: Scores
    base: Scores | None
    examples: int
    records: dict[str, dict[str, int]] = field(default_factory=dict)  # metric -> wins, losses, ties (with a base)
    harness: dict[str, Any] | None = None  # task -> metric -> base, tuned, delta (eval.harness)
    preference: Preference | None = None  # DPO/KTO runs
    intervals: dict[str, dict[str, float]] = field(default_factory=dict)  # metric -> low, high, sign_p (vs base)
    cost: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # model -> figure -> mean, p95
    slices: dict[str, EvalSummary] = field(default_factory=dict)  # slice -> the same figures on its rows
    loss_rows: int | None = None  # the tokenized rows the loss scored, where they differ from `examples` (cut, limit)

    def rows(self, against: str = "base") -> list[Row]:
        """Every figure of the tuned model, with the base's (or, `against="reference"`, the preference run's
        reference's: its parent run) beside it where there is one."""
        other, records = self.base, self.records
        if against == "reference":
            other, records = (
                (None, {}) if self.preference is None else (self.preference.reference, self.preference.records)
            )
        out = []
        for name in self.tuned.names():
            record = records.get(name, {})
            base = None if other is None else other.get(name)
            interval = self.intervals.get(name, {}) if against == "base" and base is not None else {}
            out.append(Row(name, self.tuned.get(name), base, record.get("wins"), record.get("losses"),
                           record.get("ties"), interval.get("low"), interval.get("high"), interval.get("sign_p")))  # fmt: skip
        return out

    def part(self, slice_name: str | None) -> EvalSummary:
        """The whole summary (None), or one slice's; a UserError naming the slices there are."""
        if slice_name is None:
            return self
        if slice_name not in self.slices:
            have = ", ".join(self.slices) or "none: set eval.slice_by or a held-out source's slice"
            raise UserError(f"--require: no slice {slice_name!r} in this evaluation (slices: {have})")
        return self.slices[slice_name]

    def to_dict(self) -> dict[str, Any]:
        """The JSON of eval/summary.json and the manifest's `eval`."""
        out: dict[str, Any] = {
            "tuned": self.tuned.to_dict(),
            "base": None if self.base is None else self.base.to_dict(),
            "examples": self.examples,
        }
        if self.base is not None:
            versus: dict[str, dict[str, Any]] = {
                name: {"delta": self.tuned.metrics[name] - self.base.metrics[name], **self.records.get(name, {}),
                       **self.intervals.get(name, {})}
                for name in self.tuned.metrics
            }  # fmt: skip
            if self.tuned.loss is not None and self.base.loss is not None:
                versus["loss"] = {"delta": self.tuned.loss - self.base.loss, **self.records.get("loss", {}),
                                  **self.intervals.get("loss", {})}  # fmt: skip
            out["vs_base"] = versus
        if self.intervals:
            out["uncertainty"] = UNCERTAINTY
        if self.loss_rows is not None:
            out["loss_rows"] = self.loss_rows
        if self.cost:
            out["cost"] = self.cost
        if self.slices:
            out["slices"] = {name: part.to_dict() for name, part in self.slices.items()}
        if self.harness:
            out["harness"] = self.harness
        if (p := self.preference) is not None:
            out |= {"method": p.method, "beta": p.beta, "pairs": p.pairs, "reference_is_base": p.reference_is_base,
                    "reference": p.reference.to_dict(), "vs_reference": p.versus(self.tuned)}  # fmt: skip
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> EvalSummary | None:
        """A summary read back from summary.json or a manifest; None where none was recorded."""
        tuned = Scores.from_dict((data or {}).get("tuned"))
        if tuned is None:
            return None
        preference = None
        if data.get("method") not in (None, "sft") and (reference := Scores.from_dict(data.get("reference"))):
            preference = Preference(data["method"], data.get("beta") or 0.0, int(data.get("pairs") or 0), reference,
                                    bool(data.get("reference_is_base")), _records(data.get("vs_reference")))  # fmt: skip
        slices = {name: cls.from_dict(part) for name, part in (data.get("slices") or {}).items()}
        return cls(
            tuned, Scores.from_dict(data.get("base")), int(data.get("examples") or 0), _records(data.get("vs_base")),
            data.get("harness"), preference, _intervals(data.get("vs_base")), dict(data.get("cost") or {}),
            {name: part for name, part in slices.items() if part is not None}, data.get("loss_rows"),
        )  # fmt: skip


# How every interval in a summary was computed (finetune.uncertainty's defaults), written beside them
UNCERTAINTY = {"method": "paired bootstrap, percentile", "confidence": CONFIDENCE, "resamples": RESAMPLES,
               "seed": SEED, "sign_test": "two-sided exact, ties dropped"}  # fmt: skip


def _records(versus: dict[str, Any] | None) -> dict[str, dict[str, int]]:
    """metric -> wins, losses, ties, from the `vs_base` / `vs_reference` JSON."""
    return {k: {n: v[n] for n in ("wins", "losses", "ties")} for k, v in (versus or {}).items() if "wins" in v}


def _intervals(versus: dict[str, Any] | None) -> dict[str, dict[str, float]]:
    """metric -> low, high, sign_p, from the `vs_base` JSON (absent in summaries written before intervals)."""
    return {k: {n: v[n] for n in ("low", "high", "sign_p")} for k, v in (versus or {}).items() if "low" in v}


# --- the CI gate ------------------------------------------------------------------------------------

COMPARISONS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
REQUIREMENT = re.compile(r"^\s*([^<>=\s][^<>=]*?)\s*(>=|<=|>|<)\s*([^<>=]+?)\s*$")


# A gated name: a metric, optionally one slice's (`[hard]`), optionally its delta to the base or that delta's
# interval bound: exact_match, exact_match[hard], exact_match.delta, exact_match[hard].delta.low
FIGURE = re.compile(r"^(?P<metric>.+?)(?:\[(?P<slice>[^\[\]]+)\])?(?:\.(?P<part>delta(?:\.low|\.high)?))?$")
PARTS = {None: "value", "delta": "delta", "delta.low": "low", "delta.high": "high"}


@dataclass(frozen=True)
class Requirement:
    """`exact_match>=0.8`, `loss<=0.5`: a bound on one tuned figure, in whichever direction the user means.

    `exact_match[hard]>=0.8` bounds one slice's figure; `exact_match.delta>0` the difference to the base, and
    `exact_match.delta.low>0` the lower end of its 95% interval (the tuned model is better, beyond the noise of
    this many rows); `.delta.high` the upper end. Both combine: `exact_match[hard].delta.low>0`.
    """

    metric: str
    op: str
    value: float
    slice: str | None = None
    part: str = "value"  # value | delta | low | high

    @property
    def name(self) -> str:
        """The figure as the user wrote it."""
        where = "" if self.slice is None else f"[{self.slice}]"
        suffix = {"value": "", "delta": ".delta", "low": ".delta.low", "high": ".delta.high"}[self.part]
        return f"{self.metric}{where}{suffix}"

    @classmethod
    def parse(cls, text: str) -> Requirement:
        match = REQUIREMENT.match(text)
        try:
            if match is None:
                raise ValueError
            figure = FIGURE.match(match[1])
            if figure is None:
                raise ValueError
            return cls(figure["metric"], match[2], float(match[3]), figure["slice"], PARTS[figure["part"]])
        except ValueError:
            raise UserError(
                f"--require: expected METRIC>=VALUE or METRIC<=VALUE (also > and <), e.g. exact_match>=0.8 or "
                f"loss<=0.5, for a slice exact_match[hard]>=0.8, on the delta to the base exact_match.delta>0 or its "
                f"interval exact_match.delta.low>0; got {text!r}"
            ) from None

    @classmethod
    def fail_under(cls, text: str) -> Requirement:
        """The deprecated `--fail-under METRIC=VALUE`: a minimum, so only for higher-is-better metrics."""
        name, sep, value = text.partition("=")
        try:
            requirement = cls(name.strip(), ">=", float(value))
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise UserError(f"--fail-under: expected METRIC=VALUE, got {text!r}")
        if lower_is_better(requirement.metric):
            raise UserError(
                f"--fail-under {text}: {requirement.metric} is better when lower, so a minimum is not a gate; "
                f"use --require '{requirement.metric}<={value.strip()}'"
            )
        return requirement

    def failure(self, value: float) -> str | None:
        if COMPARISONS[self.op](value, self.value):
            return None
        side = "under" if self.op in (">=", ">") else "over"
        return f"{self.name} = {value:.4f} is {side} {self.value:g} (required {self.name}{self.op}{self.value:g})"

    def figure(self, summary: EvalSummary) -> float | str:
        """The gated figure in `summary`, or why there is none (a UserError for a slice it does not have)."""
        part = summary.part(self.slice)
        if self.part == "value":
            value = part.tuned.get(self.metric)
            computed = ", ".join(part.tuned.names()) or "none"
            return value if value is not None else f"not computed (this evaluation has {computed})"
        row = next((r for r in part.rows() if r.metric == self.metric), None)
        if row is None or row.delta is None:
            return "needs the base model's scores (eval.compare_base)"
        value = {"delta": row.delta, "low": row.low, "high": row.high}[self.part]
        return value if value is not None else "no interval: it is computed for the loss and per-example metrics"


def gate(summary: EvalSummary, requirements: list[Requirement], worse_than_base: bool) -> list[str]:
    """The CI gate: each failed condition as a sentence with its figures; empty when all pass."""
    failures = []
    for requirement in requirements:
        value = requirement.figure(summary)
        if isinstance(value, str):
            failures.append(f"{requirement.name}: {value}")
        elif (failure := requirement.failure(value)) is not None:
            failures.append(failure)
    if worse_than_base:
        if summary.base is None:
            failures.append("--fail-if-worse-than-base needs the base model's scores (eval.compare_base)")
        for row in summary.rows() if summary.base is not None else []:
            if row.metric != "perplexity" and row.better is False:  # perplexity follows the loss
                failures.append(f"{row.metric} {row.tuned:.4f} is worse than the base's {row.base:.4f}")
    return failures
