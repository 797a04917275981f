"""A slow user reward (50 ms a completion) scored in process and by `reward.workers` Ray tasks,
side by side in one run: seconds to score one default iteration (16 prompts x G 8).

    python benchmarks/reward_workers.py --repeats 3

Writes benchmarks/results/reward_workers.json. The reward sleeps, as a judge model's or a
sandbox's round trip does: the workers overlap the waits.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.cluster import ray_session, score_in_parallel  # noqa: E402
from stages.params import load_params  # noqa: E402
from stages.reward import score_rollouts  # noqa: E402

SLOW = "import time\n\ndef slow(prompts, completions, **_):\n    time.sleep(0.05 * len(completions))\n" \
       "    return [0.0] * len(completions)\n"


def rollouts(prompts: int, group: int) -> pd.DataFrame:
    rows = [(f"p{p}", s) for p in range(prompts) for s in range(group)]
    return pd.DataFrame({"prompt_id": [r[0] for r in rows], "sample": [r[1] for r in rows],
                         "prompt": "What is 2 + 3?", "answer": "5",
                         "completion": "<think>2 + 3 = 5</think><answer>5</answer>"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp())
    (folder / "slow_reward.py").write_text(SLOW)
    sys.path.insert(0, str(folder))
    import os
    os.chdir(folder)
    frame = rollouts(16, 8)
    results = {}
    for workers in (2, 4):
        params = load_params(ROOT / "params.yaml", ["reward.custom=[slow_reward:slow]", "reward.weights.slow=1",
                                                    f"reward.workers={workers}"])
        with ray_session(params.distributed, cpus=workers):
            score_in_parallel(workers)(frame, params.reward, 8, "bench")  # start the workers
            times = {"in process": [], f"{workers} workers": []}
            for _ in range(args.repeats):  # interleaved: a slow moment lands on both arms
                started = time.perf_counter()
                here = score_rollouts(frame, params.reward, 8, "bench")
                times["in process"].append(time.perf_counter() - started)
                started = time.perf_counter()
                spread = score_in_parallel(workers)(frame, params.reward, 8, "bench")
                times[f"{workers} workers"].append(time.perf_counter() - started)
                assert here.equals(spread)
        results[workers] = {arm: statistics.median(values) for arm, values in times.items()}
        results[workers]["ratio"] = results[workers][f"{workers} workers"] / results[workers]["in process"]
        print(workers, results[workers], flush=True)
    out = ROOT / "benchmarks" / "results" / "reward_workers.json"
    out.write_text(json.dumps({"completions": len(frame), "reward_seconds_per_completion": 0.05,
                               "repeats": args.repeats, "median_seconds": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
