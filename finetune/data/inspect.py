"""`finetune data`: what the model will be trained on, before a GPU is spent. Tokenizer only, no weights."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from finetune.data.prepare import DataStats
from finetune.data.templates import IGNORE
from finetune.lineage import continue_parent
from finetune.recipe.schema import Recipe

if TYPE_CHECKING:
    from finetune.data.preference import PreferenceStats
    from finetune.data.prompts import PromptStats

HISTOGRAM_BINS = 10


@dataclass
class Example:
    where: str
    pieces: list[tuple[str, bool]]  # decoded text runs, trained or not
    tokens: int
    trained_tokens: int


@dataclass
class PairTokens:
    prompt: int
    chosen: int
    rejected: int


@dataclass
class PairExample:
    """A preference training pair as the model sees it: the prompt once, each scored answer after it."""

    where: str
    prompt: str
    chosen: str
    rejected: str
    tokens: PairTokens


@dataclass
class PromptExample:
    """A GRPO training prompt as rendered, with the reference answer its rewards receive."""

    where: str
    prompt: str
    reference: str
    tokens: int


@dataclass
class DataResult:
    stats: DataStats | PreferenceStats | PromptStats
    histogram: list[tuple[int, int, int]]  # (from, to, rows) of training row lengths, before truncation
    examples: list[Example] | list[PairExample] | list[PromptExample]

    def to_dict(self) -> dict[str, Any]:
        return {
            "stats": self.stats.to_dict(),
            "histogram": [{"from": a, "to": b, "rows": n} for a, b, n in self.histogram],
            "examples": [
                {"where": e.where, "tokens": e.tokens, "trained_tokens": e.trained_tokens,
                 "pieces": [{"text": t, "trained": m} for t, m in e.pieces]}
                if isinstance(e, Example) else asdict(e)
                for e in self.examples
            ],
        }  # fmt: skip


def inspect_data(recipe: Recipe, show: int = 3) -> DataResult:
    """Statistics of the recipe's data and `show` training examples split into trained and masked text."""
    from finetune.modeling import load_tokenizer, quiet_libraries

    quiet_libraries()
    recipe = continue_parent(recipe)
    tokenizer = load_tokenizer(recipe)
    if recipe.train.method == "grpo":
        from finetune.data.prompts import prepare_prompts

        prompts = prepare_prompts(recipe, tokenizer)
        return DataResult(prompts.stats, [], [PromptExample(**e) for e in prompts.examples[:show]])
    if recipe.train.method != "sft":
        from finetune.data.preference import prepare_preference

        pairs = prepare_preference(recipe, tokenizer)
        examples = [PairExample(**{**e, "tokens": PairTokens(**e["tokens"])}) for e in pairs.examples[:show]]
        return DataResult(pairs.stats, [], examples)
    from finetune.data.stream import prepare_training_data

    prepared = prepare_training_data(recipe, tokenizer)
    lengths = prepared.lengths
    sample = getattr(prepared, "sample_rows", None)  # a stream's examples: the rows of its sample
    rows = prepared.train if sample is None else sample
    examples = []
    for i in range(min(show, len(rows))):
        ids, labels = rows[i]["input_ids"], rows[i]["labels"]
        examples.append(
            Example(
                prepared.train_where[i], _pieces(tokenizer, ids, labels), len(ids), sum(x != IGNORE for x in labels)
            )
        )
    return DataResult(prepared.stats, histogram(lengths), examples)


def _pieces(tokenizer: Any, ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """Decode runs of consecutive trained / masked tokens."""
    runs: list[tuple[list[int], bool]] = []
    for tok, label in zip(ids, labels, strict=True):
        trained = label != IGNORE
        if runs and runs[-1][1] == trained:
            runs[-1][0].append(tok)
        else:
            runs.append(([tok], trained))
    return [(tokenizer.decode(group), trained) for group, trained in runs]


def histogram(lengths: list[int], bins: int = HISTOGRAM_BINS) -> list[tuple[int, int, int]]:
    if not lengths:
        return []
    low, high = min(lengths), max(lengths)
    width = max(1, -(-(high - low + 1) // bins))
    counts = [0] * bins
    for n in lengths:
        counts[min((n - low) // width, bins - 1)] += 1
    return [(low + i * width, low + (i + 1) * width - 1, c) for i, c in enumerate(counts) if low + i * width <= high]
