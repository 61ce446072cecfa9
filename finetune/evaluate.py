"""`finetune eval`: a finished run's adapter scored on its held-out data, against its base (and parent), ad hoc.

One entry for every method, as `finetune.train` has: the run (a directory, or the recipe that made
it) is opened by `finetune.inference.loaded`, its own resolved recipe, tokenizer and chat template are used,
so the held-out rows, masks and prompts are exactly those of training, and the method's hooks
(`finetune.methods`) prepare and score what differs. SFT's scoring is `finetune.scoring`'s.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.errors import UserError
from finetune.scoring import compare
from finetune.summary import EvalSummary

if TYPE_CHECKING:
    from finetune.recipe.schema import Recipe
    from finetune.runs import RunDir
    from finetune.summary import Requirement


@dataclass
class EvalResult:
    run_dir: str
    summary: EvalSummary
    out_dir: str = ""
    judge: dict[str, Any] | None = None  # judge.json's content, with eval.judge (finetune.judge)

    def to_dict(self) -> dict[str, Any]:
        extra = {} if self.judge is None else {"judge": self.judge}
        return {"run_dir": self.run_dir, "out_dir": self.out_dir, **self.summary.to_dict(), **extra}


def evaluate(
    target: str | Path,
    against_base: bool | None = None,
    limit: int | None = None,
    out: str | Path | None = None,
    require: Sequence[Requirement] = (),
) -> EvalResult:
    """Evaluate a run's adapter (a run directory, or the recipe that made it) on its held-out data.

    `limit` applies to every figure (loss too). `require` (the CI gate's bounds) must name figures
    this evaluation reports: a misspelled one is refused before anything loads. Results go to `out`,
    default RUN/eval/<UTC time>/: the run's own eval/summary.json and examples.jsonl, written by
    training, stay as they were.
    """
    from finetune.modeling import quiet_libraries
    from finetune.recipe.load import load_recipe
    from finetune.runs import RunDir, open_run

    quiet_libraries()
    run = RunDir(open_run(target).root)
    out_dir = _out_dir(run, out)
    recipe = load_recipe(run.recipe)
    judge = _open_judge(recipe, run)
    if recipe.train.method == "sft":
        if recipe.data.eval is None:
            raise _no_held_out(run)
        check_requirements(recipe, require)
        summary = _evaluate_sft(recipe, run, against_base, limit, out_dir)
    else:
        summary = _evaluate_method(recipe, run, against_base, limit, out_dir, require)
    judged = None if judge is None else _judge(judge, out_dir, recipe.seed)
    return EvalResult(str(run.root), summary, str(out_dir), judged)


# --- eval.judge (issue 32): the LLM judge of finetune.judge, reached before any model loads ---
def _open_judge(recipe: Recipe, run: RunDir) -> Any:
    if recipe.eval.judge is None:
        return None
    from finetune.judge import open_judge

    return open_judge(recipe.eval.judge, run.eval)


def _judge(judge: Any, out_dir: Path, seed: int) -> dict[str, Any]:
    from finetune.judge import judge_file

    return judge_file(judge, out_dir / "examples.jsonl", seed)


def _no_held_out(run: RunDir) -> UserError:
    return UserError(f"{run.recipe}: data.eval is not set, so the run has no held-out data to evaluate on")


def _evaluate_sft(
    recipe: Recipe, run: RunDir, against_base: bool | None, limit: int | None, out_dir: Path
) -> EvalSummary:
    """Held-out loss and generation metrics of tuned and (with a base comparison) base; eval.harness tasks too."""
    from finetune.data import prepare_data
    from finetune.harness import check as check_harness
    from finetune.inference.loaded import for_evaluation, saved_tokenizer
    from finetune.methods.sft import write_comparison

    check_harness(recipe)
    tokenizer = saved_tokenizer(run.adapter)
    data = prepare_data(recipe, tokenizer)
    model = for_evaluation(recipe, run.adapter)
    e = recipe.eval
    with_base = e.compare_base if against_base is None else against_base
    held_out = data.eval if not limit or data.eval is None else data.eval.select(range(min(limit, len(data.eval))))
    comparison = compare(
        model, tokenizer, held_out, data.eval_samples, list(e.metrics), e.max_new_tokens, e.batch_size,
        with_base=with_base, limit=limit or e.limit, options=e, kept=data.eval_kept,
    )  # fmt: skip
    return write_comparison(recipe, run, comparison, with_base, limit or e.limit, out_dir)


def _evaluate_method(
    recipe: Recipe,
    run: RunDir,
    against_base: bool | None,
    limit: int | None,
    out_dir: Path,
    require: Sequence[Requirement],
) -> EvalSummary:
    """A DPO, KTO or GRPO run: its adapter, its parent's as the reference, and the base, through the method's hooks."""
    from finetune import methods
    from finetune.inference.loaded import REFERENCE_ADAPTER, for_evaluation, saved_tokenizer
    from finetune.lineage import continue_parent
    from finetune.runs import write_eval

    recipe = continue_parent(recipe)
    if recipe.data.eval is None:
        raise _no_held_out(run)
    check_requirements(recipe, require)
    changes: dict[str, Any] = {"limit": limit or recipe.eval.limit}
    if against_base is not None:
        changes["compare_base"] = against_base
    recipe = recipe.model_copy(update={"eval": recipe.eval.model_copy(update=changes)})
    tokenizer = saved_tokenizer(run.adapter)
    method = methods.load(recipe.train.method)
    data = _first(method.prepare(recipe, tokenizer), limit)
    model = for_evaluation(recipe, run.adapter)
    comparison = method.compare(recipe, model, tokenizer, data, REFERENCE_ADAPTER in model.peft_config)
    summary = comparison.summary()
    write_eval(run, summary.to_dict(), comparison.examples(), None, out_dir)
    return summary


def _first(data: Any, limit: int | None) -> Any:
    """The method's held-out data cut to its first `limit` rows for every figure: `--limit` counts the pairs (DPO),
    judged rows (KTO) and prompts alike, not only the prompts the generation metrics answer."""
    if not limit:
        return data
    cut = {"eval_samples": data.eval_samples[:limit]}
    if hasattr(data, "eval_rows"):  # DPO/KTO: the tokenized held-out groups the preference metrics score
        cut["eval_rows"] = data.eval_rows[:limit]
    return replace(data, **cut)


def figures(recipe: Recipe) -> list[str]:
    """The tuned figures an evaluation of this recipe reports, by the names its table and JSON give them."""
    from finetune import methods

    return methods.load(recipe.train.method).figures(recipe)


def check_requirements(recipe: Recipe, require: Sequence[Requirement]) -> None:
    """Every bound names a figure this evaluation reports; else a UserError with the likely name, before any work."""
    names = figures(recipe)
    problems = []
    for requirement in require:
        if requirement.metric in names:
            continue
        by_function = [n for n in names if n.rpartition(":")[2] == requirement.metric]
        close = by_function or difflib.get_close_matches(requirement.metric, names, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        problems.append(f"--require {requirement.metric}: this evaluation reports {', '.join(names)}{hint}")
    sliced = recipe.eval.slice_by is not None or any(s.slice for s in _eval_sources(recipe))
    problems += [f"--require {r.name}: names slice {r.slice!r}, but the held-out rows have no slices (set "
                 "eval.slice_by, or a `slice:` on each data.eval source)" for r in require if r.slice and not sliced]  # fmt: skip
    if problems:
        raise UserError(problems)


def _eval_sources(recipe: Recipe) -> list[Any]:
    return list(recipe.data.eval) if isinstance(recipe.data.eval, list) else []


def _out_dir(run: RunDir, out: str | Path | None) -> Path:
    """Where an ad-hoc evaluation goes: `out` (which must not hold anything yet), else eval/<UTC time>/."""
    from datetime import datetime, timezone

    from finetune.errors import RunDirError

    if out is not None:
        path = Path(out)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise RunDirError(f"--out {path} already exists; choose another directory (nothing is overwritten)")
        return path
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path, n = run.eval / stamp, 1
    while path.exists():
        n += 1
        path = run.eval / f"{stamp}-{n}"
    return path
