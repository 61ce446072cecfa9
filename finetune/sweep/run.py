"""`finetune sweep`: one recipe trained at every point of a grid or a search, as an Optuna study.

Optuna is the engine: its GridSampler walks a grid, TPE (or random) searches a space, its
MedianPruner stops hopeless trials from the held-out loss that training reports at each eval step,
and its storage (a journal file in the sweep directory, or any URL given) lets several workers run
disjoint trials of one study. We drive it with ask/tell, so that a trial interrupted by a kill stays
`RUNNING` in the study and the next run continues it (the run directory's `--resume`) instead of
starting it over.

Every trial is an ordinary run directory under the sweep directory, named from its values
(`rank-8_targets-all-linear`, `_seed-N` with several seeds): `eval`, `merge`, `runs compare` work on it.
"""

from __future__ import annotations

import json
import math
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from finetune.errors import RunDirError, TrainingInterrupted, TrainingStopped, UserError
from finetune.files import write_json_atomic, write_text_atomic
from finetune.runs import RunDir, now
from finetune.summary import EvalPoint
from finetune.sweep.file import Sweep

JOURNAL = "optuna.journal"
FINISHED = ("COMPLETE", "PRUNED", "FAIL")


@dataclass
class SweepResult:
    dir: str
    json_path: str
    html_path: str
    metric: str
    direction: str
    keys: list[str]
    trials: list[dict[str, Any]]  # ranked: completed by the metric, then pruned, failed, running
    trained: list[str] = field(default_factory=list)  # trials this call trained (or continued)
    knees: list[dict[str, Any]] = field(default_factory=list)  # rank sweeps: where doubling stops paying

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sweep(s: Sweep, storage: str | None = None, worker: bool = False, progress: bool = True) -> SweepResult:
    """Run the trials that are missing, continue interrupted ones, and write sweep.json and sweep.html.

    `worker`: other processes share the study, so a `RUNNING` trial may be theirs and is left alone;
    without it, this process owns the study and continues any trial a kill left `RUNNING`.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    s.dir.mkdir(parents=True, exist_ok=True)
    study = _study(s, storage, worker)
    trained: list[str] = []
    if not worker:
        for frozen in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            trial = optuna.trial.Trial(study, frozen._trial_id)
            _say(
                progress, f"continuing trial {frozen.number} ({frozen.user_attrs.get('name', '?')}), interrupted before"
            )
            trained.append(_run_trial(s, study, trial, progress))
            write_results(s, study)
    while _remaining(s, study) > 0:
        trained.append(_run_trial(s, study, study.ask(), progress))
        write_results(s, study)
    result = write_results(s, study)
    result.trained = [t for t in trained if t]
    return result


def _say(progress: bool, line: str) -> None:
    if progress:
        import sys

        print(f"[sweep] {line}", file=sys.stderr, flush=True)


def _study(s: Sweep, storage: str | None, worker: bool) -> Any:
    """The sweep's study: created with its sampler and pruner, or loaded when it exists (same sweep only)."""
    import optuna

    study = optuna.create_study(
        study_name=s.name,
        storage=_storage(s, storage),
        sampler=_sampler(s, worker),
        pruner=_pruner(s),
        direction=s.direction,
        load_if_exists=True,
    )
    recorded = study.user_attrs.get("fingerprint")
    if recorded is None:
        study.set_user_attr("fingerprint", s.fingerprint())
        study.set_user_attr("sweep_file", str(s.path))
    elif recorded != s.fingerprint():
        raise UserError(
            f"the study {s.name!r} in {storage or s.dir / JOURNAL} was made by another version of this sweep "
            "(its file or recipe changed): give the sweep a new name or output_dir, or remove the old sweep directory"
        )
    return study


def _storage(s: Sweep, url: str | None) -> Any:
    """An RDB URL (sqlite:///..., postgresql://...) as given, else a journal file (default: in the sweep dir)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    if url and "://" in url:
        return _database(url)
    path = str(Path(url) if url else s.dir / JOURNAL)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))


def _database(url: str) -> Any:
    """Optuna's RDB storage on `url`. Workers started together on a fresh database race to create its tables
    (PostgreSQL: a duplicate `studydirection` type); the loser finds them made and only needs to connect again."""
    import sqlalchemy.exc
    from optuna.storages import RDBStorage

    for attempt in range(5):
        try:
            return RDBStorage(url)
        except ImportError as e:
            missing = getattr(e.__cause__, "name", None) or e.name  # Optuna wraps the driver's ImportError
            raise UserError(
                f"--storage {_shown(url)}: its database driver is not installed (no module {missing!r}); for "
                "PostgreSQL: pip install psycopg2-binary, with a postgresql+psycopg2://user@host/db URL"
            ) from None
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            if attempt == 4:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def _shown(url: str) -> str:
    """The URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def _sampler(s: Sweep, worker: bool) -> Any:
    """Grid: Optuna's GridSampler over the points (encoded as its scalars); search: TPE or random.

    Workers of a search draw from their own random streams, or they would suggest the same points.
    """
    import optuna

    seed = None if worker else s.seeds[0]
    if s.spec.grid is not None:
        space = {key: [_encode(v) for v in values] for key, values in s.spec.grid.items()}
        return _grid_sampler(space, seed=s.seeds[0])
    if s.spec.search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, s.spec.search.trials // 3)))


def _grid_sampler(space: dict[str, list[Any]], seed: int) -> Any:
    import optuna

    class Grid(optuna.samplers.GridSampler):
        """Optuna's grid, told through ask/tell: we stop when every point has a trial, so it need not call
        `study.stop()` (which only works inside `optimize`), and a continued trial keeps its grid point."""

        def after_trial(self, study, trial, state, values) -> None:
            pass

    return Grid(space, seed=seed)


def _pruner(s: Sweep) -> Any:
    import optuna

    if s.pruner == "none":
        return optuna.pruners.NopPruner()
    p = s.spec.pruning
    return optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_steps)


def _encode(value: Any) -> Any:
    """Optuna stores scalars: a list value (lora.targets: [q_proj, v_proj]) travels as its JSON text."""
    return json.dumps(value) if isinstance(value, list | dict) else value


def _decode(value: Any, key: str, s: Sweep) -> Any:
    if s.spec.grid is not None and isinstance(value, str) and any(isinstance(v, list | dict) for v in s.spec.grid[key]):
        return json.loads(value)
    return value


def _counted(trial: Any) -> bool:
    return "duplicate_of" not in trial.user_attrs


def _remaining(s: Sweep, study: Any) -> int:
    """Trials still to start: the grid's size (or search.trials) minus those started, duplicates aside."""
    target = len(s.points()) if s.spec.grid is not None else s.spec.search.trials
    return target - sum(_counted(t) for t in study.get_trials(deepcopy=False))


def _suggest(s: Sweep, trial: Any) -> dict[str, Any]:
    if s.spec.grid is not None:
        return {
            k: _decode(trial.suggest_categorical(k, [_encode(v) for v in vs]), k, s) for k, vs in s.spec.grid.items()
        }
    values = {}
    for key, space in s.spec.search.space.items():
        if space.kind == "choice":
            values[key] = _decode(trial.suggest_categorical(key, [_encode(v) for v in space.choice]), key, s)
        elif space.kind in ("uniform", "log_uniform"):
            values[key] = trial.suggest_float(key, *space.values, log=space.kind == "log_uniform")
        else:
            values[key] = trial.suggest_int(key, *space.values, log=space.kind == "log_integer")
    return values


def _run_trial(s: Sweep, study: Any, trial: Any, progress: bool) -> str | None:
    """Train one point (once per seed) and tell the study how it went; returns the trial's name.

    A kill or an interruption (SIGTERM) leaves the trial RUNNING for the next run to continue;
    a pruned trial is PRUNED; a trial whose training failed (NaN, out of memory) is FAIL with the
    error, and the sweep goes on.
    """
    import optuna

    values = _suggest(s, trial)
    name = s.trial_name(values, None if s.spec.grid is not None else trial.number)
    twin = next((t for t in study.get_trials(deepcopy=False)
                 if t.number != trial.number and t.user_attrs.get("name") == name and _counted(t)), None)  # fmt: skip
    if twin is not None:  # two workers took the same grid point at the very end: one trains it
        trial.set_user_attr("duplicate_of", twin.number)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return None
    trial.set_user_attr("name", name)
    trial.set_user_attr("values", values)
    _say(progress, f"trial {trial.number}: {name}")
    runs: list[dict[str, Any]] = []
    try:
        for i, seed in enumerate(s.seeds):
            report = _reporter(trial, s) if i == 0 else None
            runs.append(_train_run(s, values, seed, s.run_name(name, seed), report, progress))
            trial.set_user_attr("runs", runs)
    except TrainingStopped as e:
        seed = s.seeds[len(runs)]
        stopped = _outcome(RunDir(s.dir / s.run_name(name, seed)), seed, None, s.spec.metric)
        runs.append({**stopped, "error": str(e)})
        trial.set_user_attr("runs", runs)
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        _say(progress, f"trial {trial.number} pruned: {e}")
        return name
    except UserError:
        raise  # a run directory in the way: stop the sweep; the trial stays RUNNING, to continue once fixed
    except TrainingInterrupted as e:  # SIGTERM/SIGINT: checkpoint saved; the trial stays RUNNING
        raise TrainingInterrupted(f"{e}".split("; continue with")[0] + f"; continue the sweep with: "
                                  f"finetune sweep {s.path}") from None  # fmt: skip
    except Exception as e:
        trial.set_user_attr("error", f"{type(e).__name__}: {e}")
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        _say(progress, f"trial {trial.number} failed: {type(e).__name__}: {e}")
        return name
    metric = [r["metric"] for r in runs]
    if any(m is None or not math.isfinite(m) for m in metric):
        trial.set_user_attr("error", f"the metric {s.spec.metric!r} is missing from a run's held-out results")
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return name
    study.tell(trial, statistics.fmean(metric))
    return name


def _reporter(trial: Any, s: Sweep) -> Any:
    """The hook `train()` calls at each eval step: report the held-out figure, raise if the pruner says stop.

    The figure is the one the method ranks adapters by (the loss; GRPO's reward), and Optuna's pruners
    compare values in the study's direction, so a figure whose direction differs from the study's is
    negated. A NaN is reported as it is: Optuna's median pruner prunes it.
    """
    maximize = s.direction == "maximize"

    def on_eval(point: EvalPoint) -> None:
        value = point.value if point.higher_is_better == maximize else -point.value
        with warnings.catch_warnings():  # a continued trial reports its steps before the checkpoint again
            warnings.simplefilter("ignore")
            trial.report(value, point.step)
        if trial.should_prune():
            raise TrainingStopped(
                f"pruned at step {point.step}: held-out {point.metric} {point.value:.4f} is worse than the median"
            )

    return on_eval


def _train_run(s: Sweep, values: dict[str, Any], seed: int, run_name: str, on_eval: Any, progress: bool) -> dict:
    """One run of a trial: read back if completed, resumed from its checkpoint if interrupted, else trained."""
    from finetune.train import find_resume_point, train

    recipe = s.recipe(values, seed, run_name)
    run = RunDir(recipe.run_dir)
    status = json.loads(run.manifest.read_text()).get("status") if run.manifest.exists() else None
    started = time.perf_counter()
    if status == "completed":
        _say(progress, f"  {run_name}: completed before, read back")
        return _outcome(run, seed, None, s.spec.metric)
    if status == "stopped":
        raise TrainingStopped(json.loads(run.manifest.read_text()).get("error") or "pruned before")
    resume = False
    if status is not None:
        try:
            find_resume_point(run, recipe)
            resume = True
            _say(progress, f"  {run_name}: resuming from its newest checkpoint")
        except RunDirError:
            _say(progress, f"  {run_name}: no complete checkpoint to resume from: training it from the start")
    train(recipe, overwrite=status is not None and not resume, resume=resume, progress=False, on_eval=on_eval)
    outcome = _outcome(run, seed, time.perf_counter() - started, s.spec.metric)
    _say(progress, f"  {run_name}: {s.spec.metric} {outcome['metric']}")
    return outcome


def _outcome(run: RunDir, seed: int, seconds: float | None, metric: str) -> dict[str, Any]:
    """What sweep.json keeps of a run, read from its manifest (the run directory stays the source)."""
    from datetime import datetime

    m = json.loads(run.manifest.read_text(encoding="utf-8"))
    tuned = (m.get("eval") or {}).get("tuned") or {}
    figures = {k: tuned.get(k) for k in ("loss", "perplexity")} | dict(tuned.get("metrics") or {})
    if seconds is None and m.get("started") and m.get("finished"):
        seconds = (datetime.fromisoformat(m["finished"]) - datetime.fromisoformat(m["started"])).total_seconds()
    return {
        "seed": seed,
        "run_dir": str(run.root),
        "status": m.get("status"),
        "figures": figures,
        "metric": figures.get(metric),
        "trainable_params": (m.get("lora") or {}).get("trainable_params"),
        "steps": m.get("steps"),
        "seconds": seconds,
    }


# --- results ----------------------------------------------------------------------------------


def write_results(s: Sweep, study: Any) -> SweepResult:
    """sweep.json and sweep.html from the study's trials (any worker may write them; the last one wins)."""
    from finetune.sweep.report import knees, render

    trials = [_trial_row(s, t) for t in study.get_trials(deepcopy=False) if _counted(t) and "name" in t.user_attrs]
    trials = rank(trials, s.direction)
    result = SweepResult(
        dir=str(s.dir),
        json_path=str(s.dir / "sweep.json"),
        html_path=str(s.dir / "sweep.html"),
        metric=s.spec.metric,
        direction=s.direction,
        keys=s.keys,
        trials=trials,
        knees=knees(trials, s.keys, s.spec.metric, s.direction, s.spec.doubling_margin),
    )
    data = {"sweep": s.name, "file": str(s.path), "updated": now(), "seeds": s.seeds,
            "doubling_margin": s.spec.doubling_margin, **result.to_dict()}  # fmt: skip
    data.pop("trained")
    write_json_atomic(Path(result.json_path), data)
    write_text_atomic(Path(result.html_path), render(data))
    return result


def _trial_row(s: Sweep, t: Any) -> dict[str, Any]:
    runs = [{**r, "metric": (r.get("figures") or {}).get(s.spec.metric)} for r in t.user_attrs.get("runs", [])]
    done = [r for r in runs if r.get("figures")]
    status = {"COMPLETE": "completed", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running"}.get(t.state.name)
    row = {
        "number": t.number,
        "name": t.user_attrs["name"],
        "values": t.user_attrs.get("values", {}),
        "status": status,
        "metric": t.value if t.state.name == "COMPLETE" else None,
        "metric_std": _std([r["metric"] for r in done]),
        "figures": _mean_figures(done),
        "trainable_params": next((r["trainable_params"] for r in runs if r.get("trainable_params")), None),
        "seconds": sum(r.get("seconds") or 0 for r in runs) or None,
        "run_dirs": [r["run_dir"] for r in runs],
        "seeds": [r.get("seed") for r in runs],
        "error": t.user_attrs.get("error") or next((r["error"] for r in runs if r.get("error")), None),
    }
    if t.intermediate_values:
        step = max(t.intermediate_values)
        sign = 1.0 if s.direction == "minimize" else -1.0
        row["last_eval"] = {"step": step, "loss": sign * t.intermediate_values[step]}
    return row


def _std(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.stdev(values) if len(values) > 1 else None


def _mean_figures(runs: list[dict[str, Any]]) -> dict[str, float]:
    keys = {k for r in runs for k, v in r["figures"].items() if v is not None}
    return {k: statistics.fmean(r["figures"][k] for r in runs if r["figures"].get(k) is not None) for k in sorted(keys)}


def rank(trials: list[dict[str, Any]], direction: str) -> list[dict[str, Any]]:
    """Completed trials best first by the metric, then pruned, failed and running ones; `rank` set on completed.

    A tie on the metric (exact match on a few held-out rows often ties) goes to the lower held-out loss, and
    only then to the earlier trial."""
    order = {"completed": 0, "pruned": 1, "failed": 2, "running": 3}
    sign = 1 if direction == "minimize" else -1

    def key(t: dict[str, Any]) -> tuple:
        loss = (t.get("figures") or {}).get("loss")
        return (order.get(t["status"], 4), sign * t["metric"] if t["metric"] is not None else 0,
                math.inf if loss is None else loss, t["number"])  # fmt: skip

    ranked = sorted(trials, key=key)
    for i, t in enumerate(ranked):
        t["rank"] = i + 1 if t["status"] == "completed" else None
    return ranked


# --- --dry-run ------------------------------------------------------------------------------


def dry_run(s: Sweep, gpu: str | None = None, tflops: float | None = None) -> list[dict[str, Any]]:
    """Every trial the sweep would run (a search: its first point per key), with plan's params, memory and time."""
    from finetune.plan import plan

    points = s.points() or [{k: sp.values[0] for k, sp in s.spec.search.space.items()}]
    rows = []
    for values in points:
        name = s.trial_name(values)
        for seed in s.seeds:
            run_name = s.run_name(name, seed)
            p = plan(s.recipe(values, seed, run_name), gpu=gpu, tflops=tflops)
            run = RunDir(s.dir / run_name)
            done = json.loads(run.manifest.read_text()).get("status") if run.manifest.exists() else None
            rows.append({
                "name": run_name, "values": values, "seed": seed, "status": done or "to train",
                "trainable_params": p.params.trainable, "total_params": p.params.total,
                "memory_bytes": p.memory.total, "steps": p.work.total_steps,
                "seconds": p.time.total_seconds if p.time else None,
            })  # fmt: skip
    return rows
