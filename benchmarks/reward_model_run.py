"""A run whose only reward is a reward model: does it move the policy where the model points?

    python benchmarks/reward_model_run.py [--iterations 60] [--every 20]

The default params on `data.source: builtin-th` (the README's settings for it: Thai target
language, 64 new tokens), whose reference reasons in English. The reward model, trained here
in seconds by tests/model_rewards.py on builtin-th's demonstrations, prefers reasoning worded
in Thai. `grpo train` with `reward.weights: {rm: 1.0}` and the rules weighed 0 (scored and
reported, not rewarded), `eval.every` and `eval.samples: 4`: the held-out prompts' sampled
completions are scored by the reward model and by the `language` rule before and during
training. Writes benchmarks/results/reward_model_run.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from model_rewards import build_thai_reward_model  # noqa: E402
from stages.config import set_key  # noqa: E402


def grpo(command: str, root: Path) -> None:
    subprocess.run([sys.executable, "-m", "flows.cli", command, "--params", str(root / "params.yaml"),
                    "--root", str(root)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--with-rules", action="store_true",
                        help="the README's builtin-th weights with the reward model in the language rule's place: "
                             "accuracy 1.0, format 0.2, rm 0.2")
    args = parser.parse_args()
    weights = {"rm": 0.2, "language": 0.0, "accuracy": 1.0, "format": 0.2} if args.with_rules else \
        {"rm": 1.0, "language": 0.0, "accuracy": 0.0, "format": 0.0}
    root = Path(tempfile.mkdtemp(prefix="rm-run-"))
    rm = build_thai_reward_model(root / "thai-rm")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in {"data.source": "builtin-th", "reward.target_language": "th", "rollout.max_new_tokens": 64,
                       "eval.max_new_tokens": 64, "reward.models": {"rm": str(rm)},
                       "reward.weights": weights,
                       "grpo.iterations": args.iterations, "eval.every": args.every, "eval.samples": 4}.items():
        set_key(raw, key, value)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    os.environ.pop("PREFECT_API_URL", None)  # a temporary Prefect server; MLflow under the run's root
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    started = time.perf_counter()
    for command in ("prepare", "reference", "train"):
        grpo(command, root)
    seconds = time.perf_counter() - started
    metrics = pd.read_csv(root / "metrics" / "iterations.csv")
    curve = metrics.dropna(subset=["eval/rewards/rm"])[
        ["iteration", "eval/rewards/rm", "eval/rewards/language", "eval/language", "eval/rewards/accuracy",
         "eval/accuracy"]]
    result = {"weights": weights, "iterations": args.iterations, "seconds": seconds, "held_out": curve.to_dict("records"),
              "training_rewards_rm": {"first": float(metrics["rewards/rm"].iloc[1]),
                                      "last": float(metrics["rewards/rm"].iloc[-1])},
              "seconds_per_reward_stage": float(metrics["seconds/reward"].median())}
    print(curve.to_string(index=False))
    out = ROOT / "benchmarks" / "results" / f"reward_model_run{'_with_rules' if args.with_rules else ''}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
