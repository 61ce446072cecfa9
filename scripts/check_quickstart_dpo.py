"""The DPO quickstart end to end, as a user runs it, with its figures checked (too slow for CI: ~3-4 min idle).

    python scripts/check_quickstart_dpo.py [--workdir DIR] [--reuse-sft]

1. `finetune train recipes/quickstart.yaml` (skipped with --reuse-sft when WORKDIR/runs/quickstart is completed);
2. `finetune train recipes/quickstart-dpo.yaml`, continuing it; its held-out table must show
   - preference accuracy: the SFT reference 0.5 (chance by definition), the tuned model >= 0.9;
   - the ' | ' style in greedy answers: the reference <= 0.1, the tuned model >= 0.8;
   - the SFT task (correct reversal, either style): the tuned model >= 0.9;
   - the DPO stage within 180 s of wall time (on 2 idle cores);
3. `finetune eval` on the DPO run agrees and passes the gate; `finetune merge` verifies the merged model.
Exits 1 naming every figure that misses its bound.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from example_checks import completed, eval_and_merge, finetune, workdir

ROOT = Path(__file__).resolve().parent.parent
BOUNDS = {  # (model, metric, lower, upper)
    "reference accuracy": ("reference", "preference_accuracy", 0.5, 0.5),
    "tuned accuracy": ("tuned", "preference_accuracy", 0.9, 1.0),
    "reference ' | ' share": ("reference", "quickstart_style:preferred_style", 0.0, 0.1),
    "tuned ' | ' share": ("tuned", "quickstart_style:preferred_style", 0.8, 1.0),
    "tuned task exact match": ("tuned", "quickstart_style:task_exact_match", 0.9, 1.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--reuse-sft", action="store_true")
    args = parser.parse_args()
    work = workdir(args.workdir, "quickstart-dpo-")
    if not (args.reuse_sft and completed(work, "quickstart")):
        _, seconds = finetune("train", str(ROOT / "recipes" / "quickstart.yaml"), "--overwrite", cwd=work)
        print(f"sft: {seconds:.0f} s")
    trained, seconds = finetune("train", str(ROOT / "recipes" / "quickstart-dpo.yaml"), "--overwrite", "--json",
                                cwd=work)  # fmt: skip
    result = json.loads(trained.stdout)
    summary = result["eval"]
    print(f"dpo: {result['steps']} steps, {seconds:.0f} s wall ({result['seconds']:.0f} s in the stage)")
    for model in ("base", "reference", "tuned"):
        print(f"  {model:<9} " + "  ".join(f"{k.split(':')[-1]} {v:.3f}" for k, v in summary[model]["metrics"].items())
              + f"  logp chosen {summary[model]['logps']['chosen']:.2f} rejected {summary[model]['logps']['rejected']:.2f}")  # fmt: skip
    misses = []
    for label, (model, metric, low, high) in BOUNDS.items():
        value = summary[model]["metrics"][metric]
        if not low - 1e-9 <= value <= high + 1e-9:
            misses.append(f"{label} = {value:.3f}, outside [{low}, {high}]")
    if seconds > 180:
        misses.append(f"the DPO stage took {seconds:.0f} s, over 180 s (was the machine loaded?)")
    run = work / "runs" / "quickstart-dpo"
    misses += eval_and_merge(run, work, "preference_accuracy>=0.9")
    if misses:
        sys.exit("\n".join(misses))
    print(f"all figures within bounds; runs in {work}")


if __name__ == "__main__":
    main()
