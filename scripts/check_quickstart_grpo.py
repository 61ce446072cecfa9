"""The GRPO quickstart end to end, as a user runs it, with its figures checked (too slow for CI: a few minutes idle).

    python scripts/check_quickstart_grpo.py [--workdir DIR] [--reuse-parent] [--seeds 42,1,2]

1. `finetune train recipes/quickstart-two-styles.yaml`, the SFT parent (skipped with --reuse-parent when
   WORKDIR/runs/quickstart-two-styles is completed);
2. `finetune train recipes/quickstart-grpo.yaml` continuing it, once per seed; each held-out table must show
   - the summed reward (exact_match + task_exact_match, 0-2) of the tuned model at least MARGIN above the parent's;
   - the ' | ' style in greedy answers: the tuned model >= 0.8;
   - the task (correct reversal, either style) kept: the tuned model >= the parent's - 0.1;
   - the GRPO stage within 360 s of wall time (on 2 idle cores);
3. `finetune eval` on the first GRPO run agrees and passes `--require 'reward>=1.5'`; `finetune merge` verifies it.
Exits 1 naming every figure that misses its bound.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from example_checks import completed, eval_and_merge, finetune, workdir

ROOT = Path(__file__).resolve().parent.parent
MARGIN = 0.6  # of the summed reward (0-2): at least +0.3 on each 0-1 reward on average
STYLE, TASK = "quickstart_style:preferred_style", "quickstart_style:task_exact_match"


def curve(run: Path) -> str:
    """The training reward at the start, at each quarter and at the end (mean of the logs in each fifth)."""
    logs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rewards = [(r["step"], r["reward"]) for r in logs if "reward" in r]
    last = rewards[-1][0]
    marks = [min(rewards, key=lambda p, q=q: abs(p[0] - q * last)) for q in (0, 0.25, 0.5, 0.75, 1.0)]
    return "  ".join(f"step {s}: {r:.2f}" for s, r in marks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--reuse-parent", action="store_true")
    parser.add_argument("--seeds", default="42")
    args = parser.parse_args()
    work = workdir(args.workdir, "quickstart-grpo-")
    if not (args.reuse_parent and completed(work, "quickstart-two-styles")):
        _, seconds = finetune("train", str(ROOT / "recipes" / "quickstart-two-styles.yaml"), "--overwrite", cwd=work)
        print(f"parent (SFT, two styles): {seconds:.0f} s")
    misses = []
    for seed in (int(s) for s in args.seeds.split(",")):
        name = f"quickstart-grpo-{seed}"
        trained, seconds = finetune("train", str(ROOT / "recipes" / "quickstart-grpo.yaml"), "--overwrite", "--json",
                                    "--set", f"seed={seed}", "--set", f"name={name}", cwd=work)  # fmt: skip
        result = json.loads(trained.stdout)
        summary = result["eval"]
        print(
            f"grpo seed {seed}: {result['steps']} steps, {seconds:.0f} s wall ({result['seconds']:.0f} s in the stage)"
        )
        for model in ("base", "reference", "tuned"):
            print(
                f"  {model:<9} "
                + "  ".join(f"{k.split(':')[-1]} {v:.3f}" for k, v in summary[model]["metrics"].items())
            )
        print(f"  training reward: {curve(work / 'runs' / name)}")
        tuned, parent = summary["tuned"]["metrics"], summary["reference"]["metrics"]
        if tuned["reward"] < parent["reward"] + MARGIN:
            misses.append(f"seed {seed}: reward {parent['reward']:.3f} -> {tuned['reward']:.3f}, less than +{MARGIN}")
        if tuned[STYLE] < 0.8:
            misses.append(f"seed {seed}: ' | ' share {tuned[STYLE]:.3f} < 0.8")
        if tuned[TASK] < parent[TASK] - 0.1:
            misses.append(f"seed {seed}: task exact match fell {parent[TASK]:.3f} -> {tuned[TASK]:.3f}")
        if seconds > 360:
            misses.append(f"seed {seed}: the GRPO stage took {seconds:.0f} s, over 360 s (was the machine loaded?)")
    run = work / "runs" / f"quickstart-grpo-{args.seeds.split(',')[0]}"
    misses += eval_and_merge(run, work, "reward>=1.5")
    if misses:
        sys.exit("\n".join(misses))
    print(f"all figures within bounds; runs in {work}")


if __name__ == "__main__":
    main()
