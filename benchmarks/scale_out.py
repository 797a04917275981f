"""Scale-out on this machine, side by side in one run: (trainers, rollout_workers, max_lag) in
{(1,1,0), (1,1,1), (2,1,0), (1,2,1)} on the default pipeline's reference and prompts.

    python benchmarks/scale_out.py --iterations 40

Each point is `grpo train` from the same prepared project (one SFT), then `grpo evaluate`:
seconds per iteration (median, after the first two), where an iteration's time goes (the
controller waiting for its rollouts, the update on the trainers), held-out accuracy after the
iterations, and accuracy gained per wall-clock second of training. Threads are split so the
processes of a point share the machine's cores. Writes benchmarks/results/scale_out.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
POINTS = [(1, 1, 0), (1, 1, 1), (2, 1, 0), (1, 2, 1)]


def grpo(root: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "flows.cli", *args, "--root", str(root), "--params",
                    str(root / "params.yaml")], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=40)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="grpo-scale-out-"))
    shutil.copy(ROOT / "params.yaml", base / "params.yaml")
    for stage in ("prepare", "reference"):
        grpo(base, stage)
    results = []
    for trainers, workers, lag in POINTS:
        root = base.parent / f"{base.name}-{trainers}{workers}{lag}"
        shutil.copytree(base, root, ignore=shutil.ignore_patterns("runs", "metrics"))
        settings = [f"grpo.iterations={args.iterations}", "rollout.dynamic_sampling.filter=none",
                    f"distributed.trainers={trainers}",
                    f"distributed.rollout_workers={workers}", f"rollout.max_lag={lag}"]
        overrides = [part for s in settings for part in ("--set", s)]
        started = time.perf_counter()
        grpo(root, "train", *overrides)
        seconds = time.perf_counter() - started
        grpo(root, "evaluate", *overrides)
        table = pd.read_csv(root / "metrics" / "iterations.csv").iloc[2:]
        scores = json.loads((root / "metrics" / "eval.json").read_text())
        accuracy, start_accuracy = scores["policy_accuracy"], scores["reference_accuracy"]
        column = lambda name: float(table[name].median()) if name in table else None  # noqa: E731
        point = {"trainers": trainers, "rollout_workers": workers, "max_lag": lag, "train_seconds": seconds,
                 "seconds_per_iteration": column("seconds/iteration"),
                 "rollout_wait": column("seconds/rollout_wait"), "rollout_generate": column("seconds/rollout"),
                 "update": column("seconds/update"), "reward": column("seconds/reward"),
                 "reference_accuracy": start_accuracy, "accuracy": accuracy, "accuracy_gain_per_second": (accuracy - start_accuracy) / seconds}
        results.append(point)
        print(point, flush=True)
    out = ROOT / "benchmarks" / "results" / "scale_out.json"
    out.write_text(json.dumps({"iterations": args.iterations, "cores": os.cpu_count(),
                               "points": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
