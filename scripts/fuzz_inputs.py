"""The long run of the bad-input properties of tests/recipe/test_fuzz.py, with figures for docs/measurements/reliability.md.

    python scripts/fuzz_inputs.py [--examples 5000] [--cli 20]

Mutates the valid recipe and valid data rows of tests/support/mutations.py (Hypothesis drives the choices,
and shrinks any failure to its smallest case) and checks each in-process: a must-fail input refused
with a location at the mutation, valid inputs accepted unchanged, every skipped row counted, no
other exception. `--cli N` also runs N must-fail recipes through `finetune validate` and N broken
data files through `finetune data` (exit 2, location, no traceback). Prints one JSON summary:
inputs tried, refused, accepted, and failures (with the first failing case of each property).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "support"))

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from mutations import (  # noqa: E402
    RECIPE,
    VALID,
    check_hostile,
    check_recipe,
    check_rows,
    emit,
    hostile_recipes,
    mutate_recipe,
    mutate_rows,
)
from recipes_broken import make_workspace  # noqa: E402

from finetune.recipe.load import load_recipe  # noqa: E402


def run_property(name: str, body, examples: int, tally: Counter) -> dict:
    """Run one property for `examples` inputs; a failure is recorded (shrunk) instead of stopping the run."""
    tried = Counter()

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(rng=st.randoms(use_true_random=False), ending=st.sampled_from([b"\n", b"\r\n", b"\r"]))
    def prop(rng, ending):
        outcome = body(rng, ending)
        tried[outcome] += 1

    started = time.time()
    failure = None
    try:
        prop()
    except Exception as e:  # the shrunk failing case: the finding this script exists for
        failure = f"{type(e).__name__}: {e}"[:2000]
    tally.update(tried)
    return {"property": name, "tried": sum(tried.values()), **tried, "failure": failure,
            "seconds": round(time.time() - started, 1)}  # fmt: skip


def hostile_checks(workspace: Path, tally: Counter) -> dict:
    """Every hostile value at every schema field (an exhaustive list, not a sample), and an alias bomb."""
    started, failures, cases = time.time(), [], hostile_recipes()
    for case in cases:
        try:
            tally[check_hostile(case, workspace)] += 1
        except Exception as e:
            failures.append(f"{case.note}: {type(e).__name__}: {e}"[:500])
    return {"property": "hostile recipes", "tried": len(cases), "failure": failures[0] if failures else None,
            "failures": len(failures), "seconds": round(time.time() - started, 1)}  # fmt: skip


def cli_checks(workspace: Path, n: int) -> dict:
    """Must-fail recipes through `finetune validate`, broken data through `finetune data`: exit 2, located."""
    rng, results = random.Random(1), Counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    failures = []
    for _ in range(n):
        case = mutate_recipe(rng)
        while case.must_fail is not True or not case.line:
            case = mutate_recipe(rng)
        (workspace / RECIPE).write_bytes(case.text)
        r = subprocess.run([sys.executable, "-m", "finetune.cli", "validate", RECIPE], cwd=workspace,
                           capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
        ok = r.returncode == 2 and f"{RECIPE}:{case.line}:" in r.stderr and "Traceback" not in r.stderr
        results["recipe ok" if ok else "recipe FAIL"] += 1
        if not ok:
            failures.append((case.note, r.returncode, r.stderr[-500:]))
    return {"cli": dict(results), "cli_failures": failures[:3]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=5000, help="inputs per property (default 5000)")
    parser.add_argument("--cli", type=int, default=10, help="must-fail recipes run through the CLI (default 10)")
    args = parser.parse_args()
    workspace = Path(tempfile.mkdtemp(prefix="finetune-fuzz-"))
    make_workspace(workspace)
    os.chdir(workspace)
    (workspace / RECIPE).write_text(emit(VALID)[0])
    baseline = load_recipe(RECIPE)
    tally: Counter = Counter()
    began = time.time()
    properties = [
        run_property("recipes", lambda rng, _: check_recipe(mutate_recipe(rng), workspace, baseline),
                     args.examples, tally),
        run_property("data rows", lambda rng, ending: check_rows(mutate_rows(rng), workspace, ending),
                     args.examples, tally),
        hostile_checks(workspace, tally),
    ]  # fmt: skip
    summary = {
        "inputs_tried": sum(p["tried"] for p in properties),
        "refused_with_location": tally["refused"],
        "accepted_valid": tally["accepted"],
        "failures": sum(p["failure"] is not None for p in properties),
        "properties": properties,
        **(cli_checks(workspace, args.cli) if args.cli else {}),
        "minutes": round((time.time() - began) / 60, 1),
    }
    print(json.dumps(summary, indent=2))
    return 0 if summary["failures"] == 0 and not summary.get("cli_failures") else 1


if __name__ == "__main__":
    sys.exit(main())
