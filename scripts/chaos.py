"""Kill the quickstart with SIGKILL at random moments, N times, and check what a user would then rely on.

    python scripts/chaos.py --n 20 [--seed 1] [--workdir /tmp/chaos] > chaos.log

Moments, in turn: mid-step (at a random logged step plus a random delay), mid-checkpoint-write
(while checkpoints/.staging/ exists), mid-data-cache-write (while the cache's temporary folder
exists, cache empty), mid-merge and mid-export (at a random time within their measured duration).
After each kill it checks:
  - nothing that looks complete is partial: every checkpoint-N folder, adapter/, manifest.json,
    cache entry, merged or exported folder that exists is whole (loads, parses, has its files);
  - `finetune train --resume` (or a plain rerun where no checkpoint was written yet) ends with an
    adapter whose tensors are bit for bit those of the uninterrupted run, and the same losses;
  - a rerun merge/export succeeds and its weights are bit for bit those of an uninterrupted one.
The quickstart is shortened (12 steps of batch 4, a checkpoint every 3, a held-out loss on 16 rows
every 6, generations on 4) so that one kill and its resume take about a minute on 2 cores. Prints
one line per kill and a JSON summary last; exits 0 only when every check passed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "quickstart.yaml"
SHORT = ["train.max_steps=12", "train.batch_size=4", "train.save_every=3", "train.eval_every=6",
         "train.keep_checkpoints=2", "data.eval.0.limit=16", "eval.compare_base=false", "eval.limit=4",
         "train.logging_every=1"]  # fmt: skip
STEPS, SAVE_EVERY = 12, 3
CHECKPOINT_FILES = ("trainer_state.json", "adapter_model.safetensors", "adapter_config.json", "optimizer.pt",
                    "scheduler.pt", "rng_state.pth")  # fmt: skip


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "finetune.cli", *args]


def train_args(out: Path, *extra: str) -> list[str]:
    sets = [x for key in [*SHORT, f"output_dir={out}"] for x in ("--set", key)]
    return command("train", str(RECIPE), *sets, "--json", *extra)


def env(cache: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "FINETUNE_CACHE": str(cache), "PYTHONHASHSEED": "0"}


def run(cmd: list[str], cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env(cache), capture_output=True, text=True, timeout=900)


def start(cmd: list[str], cache: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env(cache), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_when(proc: subprocess.Popen, ready, delay: float, timeout: float = 600) -> bool:
    """SIGKILL `delay` seconds after `ready()` first holds; False when the process ended before that."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        if ready():
            time.sleep(delay)
            if proc.poll() is not None:  # it ended during the delay: no kill to count
                return False
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.001)
    proc.kill()
    raise TimeoutError("the moment to kill never came")


def last_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else -1
    except (OSError, ValueError):
        return -1


# --- what must hold after a kill --------------------------------------------------------------------


def tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


def same_tensors(a: Path, b: Path) -> bool:
    x, y = tensors(a), tensors(b)
    return x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and x[k].equal(y[k]) for k in x)


def partial_things(run_dir: Path) -> list[str]:
    """Everything in a run directory that looks complete but is not."""
    bad = []
    for name in ("manifest.json",):
        if (run_dir / name).exists():
            try:
                json.loads((run_dir / name).read_text())
            except ValueError:
                bad.append(f"{name} does not parse")
    for ckpt in sorted((run_dir / "checkpoints").glob("checkpoint-*")):
        missing = [f for f in CHECKPOINT_FILES if not (ckpt / f).is_file()]
        if missing:
            bad.append(f"{ckpt.name} lacks {missing}")
            continue
        try:
            tensors(ckpt / "adapter_model.safetensors")
            state = json.loads((ckpt / "trainer_state.json").read_text())
            if state["global_step"] != int(ckpt.name.split("-")[1]):
                bad.append(f"{ckpt.name} holds step {state['global_step']}")
        except Exception as e:
            bad.append(f"{ckpt.name} unreadable: {type(e).__name__}: {e}")
    adapter = run_dir / "adapter"
    if adapter.exists():
        bad += whole_adapter(adapter)
    return bad


def whole_adapter(adapter: Path) -> list[str]:
    try:
        json.loads((adapter / "adapter_config.json").read_text())
        tensors(adapter / "adapter_model.safetensors")
        json.loads((adapter / "tokenizer_config.json").read_text())
        return []
    except Exception as e:
        return [f"adapter/ partial: {type(e).__name__}: {e}"]


def partial_cache_entries(cache: Path) -> list[str]:
    """Cache entries that would be served (not a dot-named temporary) but do not load whole."""
    sys.path.insert(0, str(ROOT))
    os.environ["FINETUNE_CACHE"] = str(cache)
    from finetune.data import prepare

    bad = []
    root = cache / "data"
    for entry in sorted(root.iterdir()) if root.exists() else []:
        if entry.name.startswith("."):
            continue
        loaded = prepare._load_cached(entry.name)
        if loaded is None or len(loaded.train) != loaded.stats.train_rows:
            bad.append(f"cache entry {entry.name} is served but partial")
    return bad


def whole_model(out: Path) -> list[str]:
    """A merged or exported folder that exists must hold a model that loads and passed its check."""
    if not out.exists():
        return []
    try:
        files = sorted(out.rglob("*.safetensors"))
        if not files:
            return [f"{out.name}: no weights"]
        for f in files:
            tensors(f)
        check = next(out.rglob("merge_check.json"), None)
        if check is None or not json.loads(check.read_text()).get("passed", True):
            return [f"{out.name}: no passing merge_check.json"]
        return []
    except Exception as e:
        return [f"{out.name} partial: {type(e).__name__}: {e}"]


def weights_digest(out: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(out.rglob("*.safetensors")):
        for name, t in sorted(tensors(f).items()):
            digest.update(
                name.encode() + t.contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes()
            )
    return digest.hexdigest()


def losses(run_dir: Path) -> list:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(x["step"], x.get("loss"), x.get("eval_loss")) for x in lines]


# --- one kill ---------------------------------------------------------------------------------------


def complete_step(run_dir: Path) -> int:
    """The step of the newest complete checkpoint (0 without one)."""
    steps = [int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("checkpoint-*")]
    return max(steps, default=0)


def kill_chain(c: int, kills: int, ws: Path, rng: random.Random, ref: Path, moments: tuple[str, ...]) -> list[dict]:
    """One run killed `kills` times: first while it writes the (empty) data cache, then mid-step or
    mid-checkpoint at random, each time restarted with --resume (or afresh when no checkpoint exists yet);
    its final adapter and losses must be bit for bit the uninterrupted run's."""
    out, cache = ws / f"chain-{c}", ws / f"cache-{c}"
    records: list[dict] = []
    proc = start(train_args(out), cache)
    for n in range(kills):
        base = complete_step(out)
        moment = "cache" if n == 0 else rng.choice(moments)
        if moment == "step" and base + 1 <= STEPS - 1:
            k, delay = rng.randint(base + 1, STEPS - 1), rng.uniform(0, 0.3)
            killed = kill_when(proc, lambda k=k: last_step(out) >= k, delay)
            said = f"mid-step: after step {k} + {delay:.2f}s"
            mid = False
        elif moment in ("step", "checkpoint") and base + SAVE_EVERY <= STEPS:
            k = rng.choice(range(base + SAVE_EVERY, STEPS + 1, SAVE_EVERY))
            delay = rng.uniform(0, 0.05)
            staging = out / "checkpoints" / ".staging" / f"checkpoint-{k}"
            killed = kill_when(proc, staging.exists, delay)
            said = f"mid-checkpoint: writing checkpoint-{k} + {delay * 1000:.0f}ms"
            mid = (out / "checkpoints" / ".staging").exists()
        elif moment == "cache":
            delay = rng.uniform(0, 0.5)
            killed = kill_when(proc, lambda: any((cache / "data").glob(".*.tmp")), delay)
            said = f"mid-data-cache-write + {delay * 1000:.0f}ms"
            mid = any((cache / "data").glob(".*.tmp"))
        else:
            break  # the run is past its last checkpoint: nothing left to kill in
        if not killed:
            break
        problems = partial_things(out) + partial_cache_entries(cache)
        rerun = "resume" if any((out / "checkpoints").glob("checkpoint-*")) else "overwrite"
        records.append({"phase": said.split(":")[0].split(" +")[0], "moment": said, "killed": True,
                        "mid_write": mid, "rerun": rerun, "problems": problems})  # fmt: skip
        proc = start(train_args(out, f"--{rerun}"), cache)
    _, err = proc.communicate()
    final: list[str] = []
    if proc.returncode != 0:
        final.append(f"last rerun exit {proc.returncode}: {err.strip()[-600:]}")
    else:
        if not same_tensors(
            out / "adapter" / "adapter_model.safetensors", ref / "adapter" / "adapter_model.safetensors"
        ):
            final.append("adapter differs from the uninterrupted run")
        if losses(out) != losses(ref):
            final.append("losses differ from the uninterrupted run")
        final += partial_cache_entries(cache)
    for r in records:
        r["problems"] += final
        r["ok"] = not r["problems"]
    shutil.rmtree(out, ignore_errors=True)
    return records


def stage_args(phase: str, ref: Path, out: Path) -> list[str]:
    if phase == "merge":
        return ["merge", str(ref), "--out", str(out)]
    return ["export", str(ref), "--format", "merged", "--out", str(out)]


def writing(out: Path):
    """True while the stage's temporary output folder (atomic_dir's) exists."""
    return lambda: any(out.parent.glob(f".{out.name}.*.tmp"))


def kill_stage(phase: str, ws: Path, i: int, rng: random.Random, ref: Path, cache: Path, timing: dict) -> dict:
    """Kill a merge or export at a random moment while it writes its output (the measured write span)."""
    out = ws / f"{phase}-{i}"
    args = stage_args(phase, ref, out)
    delay = rng.uniform(0, timing[phase])
    proc = start(command(*args), cache)
    killed = kill_when(proc, writing(out), delay)
    if not killed:
        proc.communicate()
    mid_write = killed and writing(out)()
    problems = whole_model(out)
    again = run(command(*args, "--overwrite"), cache)
    if again.returncode != 0:
        problems.append(f"rerun exit {again.returncode}: {again.stderr.strip()[-600:]}")
    elif weights_digest(out) != timing[f"{phase}_digest"]:
        problems.append(f"{phase} weights differ from the uninterrupted {phase}")
    shutil.rmtree(out, ignore_errors=True)
    moment = f"mid-{phase}: {delay:.2f}s into its {timing[phase]:.1f}s of writing"
    return {"phase": phase, "moment": moment, "killed": killed, "mid_write": mid_write, "ok": not problems,
            "problems": problems}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chains", type=int, default=4, help="runs killed repeatedly (default 4)")
    parser.add_argument("--kills", type=int, default=4, help="kills per run (default 4)")
    parser.add_argument("--stage-kills", type=int, default=2, help="kills of merge and of export each (default 2)")
    parser.add_argument("--moments", default="step,checkpoint", help="what the kills after the first aim at")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=None, help="reuses its uninterrupted runs when present")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    ws = args.workdir or Path(tempfile.mkdtemp(prefix="finetune-chaos-"))
    ws.mkdir(parents=True, exist_ok=True)
    began = time.time()
    print(f"chaos: seed {seed}, {args.chains} runs x {args.kills} kills, {args.stage_kills} kills of merge and "
          f"of export each; workdir {ws}", flush=True)  # fmt: skip
    timing = uninterrupted(ws)
    if timing is None:
        return 1
    print("uninterrupted: " + ", ".join(f"{k} {v:.1f}s" for k, v in timing.items() if isinstance(v, float)), flush=True)

    ref, results = ws / "reference", []
    stages = [p for _ in range(args.stage_kills) for p in ("merge", "export")]
    for c in range(max(args.chains, len(stages))):
        moments = tuple(args.moments.split(","))
        batch = kill_chain(c, args.kills, ws, rng, ref, moments) if c < args.chains else []
        if c < len(stages):
            batch.append(kill_stage(stages[c], ws, c, rng, ref, ws / "cache", timing))
        for r in batch:
            results.append(r)
            verdict = "ok" if r["ok"] else "FAIL " + "; ".join(r["problems"])
            print(f"[{len(results)}] {r['moment']} (mid-write: {r.get('mid_write')}) -> {verdict}", flush=True)

    killed = [r for r in results if r["killed"]]
    training = [r for r in killed if r["phase"] not in ("merge", "export")]
    summary = {
        "seed": seed,
        "kills": len(killed),
        "passed": sum(r["ok"] for r in results),
        "tried": len(results),
        "identical_after_resume": f"{sum(r['ok'] for r in training)}/{len(training)}",
        "by_moment": {
            p: f"{sum(r['ok'] for r in results if r['phase'] == p)}/{sum(r['phase'] == p for r in results)}"
            for p in sorted({r["phase"] for r in results})
        },
        "killed_mid_write": sum(bool(r.get("mid_write")) for r in results),
        "minutes": round((time.time() - began) / 60, 1),
    }
    print(json.dumps(summary, indent=2), flush=True)
    return 0 if summary["passed"] == summary["tried"] else 1


def uninterrupted(ws: Path) -> dict | None:
    """Train, merge and export once without a kill (or reuse them from an earlier call on this workdir)."""
    saved = ws / "uninterrupted.json"
    if saved.exists():
        return json.loads(saved.read_text())
    cache, ref = ws / "cache", ws / "reference"
    t = time.time()
    done = run(train_args(ref), cache)
    if done.returncode != 0:
        print(done.stderr[-3000:])
        return None
    timing: dict = {"train": time.time() - t}
    for phase in ("merge", "export"):
        out = ws / f"{phase}-reference"
        proc = start(command(*stage_args(phase, ref, out)), cache)
        while proc.poll() is None and not writing(out)():
            time.sleep(0.001)
        t = time.time()
        _, err = proc.communicate()
        if proc.returncode != 0:
            print(err[-3000:])
            return None
        timing[phase], timing[f"{phase}_digest"] = time.time() - t, weights_digest(out)
    saved.write_text(json.dumps(timing))
    return timing


if __name__ == "__main__":
    sys.exit(main())
