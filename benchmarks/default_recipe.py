"""Held-out accuracy and time of the default pipeline under alternative recipes, over seeds.

Each arm is params.yaml plus overrides; each seed's prepare and SFT reference are made once
and shared by every arm (they do not depend on the GRPO keys). The iterations are plain
function calls (what `grpo train` runs, without Prefect, MLflow or DVC, whose cost is the
same for every arm), then `evaluate`. Arms run one after another for each seed, so they
meet the same machine; one process each, `--threads` threads.

    python benchmarks/default_recipe.py --seeds 0 1 2 \
        --arm today= --arm dyn=rollout.dynamic_sampling.filter=zero_std,grpo.beta=0
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prepared(work: Path, seed: int, threads: int) -> Path:
    """data/ and models/reference/ of one seed, made once."""
    base = work / f"seed{seed}"
    if (base / "models" / "reference" / "config.json").is_file():
        return base
    base.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "params.yaml", base / "params.yaml")
    overrides = ["-S", f"seed={seed}", "-S", f"threads={threads}"]
    for stage in ("prepare", "reference"):
        subprocess.run([sys.executable, "-m", "flows.cli", stage, "--root", str(base), "-p", str(base / "params.yaml"),
                        *overrides], check=True, cwd=ROOT)
    return base


def run_arm(base: Path, arm: str, overrides: list[str], seed: int, threads: int) -> dict:
    """One arm's iterations and evaluation in a child process (a clean torch state)."""
    root = base.parent / f"seed{seed}-{arm}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    shutil.copytree(base / "data", root / "data")
    shutil.copytree(base / "models", root / "models")
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")  # this checkout's keys; the seed is an override
    code = f"""
import json, sys, time
sys.path.insert(0, {str(ROOT)!r})
from benchmarks.default_recipe import train_and_evaluate
print(json.dumps(train_and_evaluate({str(root)!r}, {overrides!r})))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"arm {arm} (seed {seed}) failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def scoring_cpu() -> float:
    """CPU seconds of this process's live children: the reward scoring process (started by the first iteration)."""
    import psutil

    return sum(sum(child.cpu_times()[:2]) for child in psutil.Process().children(recursive=True))


def train_and_evaluate(root: str, overrides: list[str]) -> dict:
    import torch

    from stages.model.adapters import save_policy
    from stages.advantage import advantage
    from stages.records.artifacts import Layout
    from stages.params import load_params
    from stages.evaluate import evaluate
    from stages.model.modeling import configure_threads
    from stages.policy import load_reference, load_train_state
    from stages.reward import reward
    from stages.rollout import rollout
    from stages.update import update
    from stages.model.vllm_server import vllm_engine

    params, layout = load_params(Path(root) / "params.yaml", overrides), Layout(Path(root))
    configure_threads(params)
    started, cpu_started = time.perf_counter(), time.process_time()
    state = load_train_state(params, layout, 0)
    reference = load_reference(params, layout, state)
    seen = []
    with vllm_engine(params, layout) if params.rollout.engine == "vllm" else nullcontext() as engine:
        started, cpu_started = time.perf_counter(), time.process_time()  # a vLLM server's start-up left out
        for iteration in range(1, params.grpo.iterations + 1):
            metrics = rollout(params, layout, iteration, state.model, state.tokenizer, engine=engine)
            metrics |= reward(params.reward, layout, iteration, params.rollout.group_size)
            metrics |= advantage(params.grpo, params.rollout.group_size, layout, iteration)
            metrics |= update(params, layout, iteration, state, reference)
            seen.append(metrics)
    save_policy(state.model, state.tokenizer, layout.policy)
    # CPU seconds as well as wall: with one thread per process, the work an arm costs whatever
    # runs beside it (arms of one seed run concurrently in separate processes).
    train_seconds, train_cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started + scoring_cpu()
    del state, reference
    torch.manual_seed(0)
    scores = evaluate(params, layout)
    last = seen[-20:]
    return {"train_seconds": train_seconds, "train_cpu_seconds": train_cpu_seconds, "policy_accuracy": scores["policy_accuracy"],
            "reference_accuracy": scores["reference_accuracy"], **{k: v for k, v in scores.items() if "language" in k},
            "last20_reward": sum(m["reward"] for m in last) / len(last),
            "prompts_consumed": sum(m.get("rollout/prompts_consumed", params.rollout.prompts_per_iteration)
                                    for m in seen),
            # vLLM's sampling log-probs against the trainer's, per iteration (rollout.engine: vllm)
            **({"logprob_diff_mean": [m["rollout/logprob_diff_mean"] for m in seen],
                "logprob_diff_max": [m["rollout/logprob_diff_max"] for m in seen]}
               if params.rollout.engine == "vllm" else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arm", action="append", required=True, help="name=key=value,key=value (empty: params.yaml)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/default_recipe"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "default_recipe.json")
    args = parser.parse_args()
    arms = {}
    for spec in args.arm:
        name, _, rest = spec.partition("=")
        arms[name] = [f"threads={args.threads}"] + [item for item in rest.split(",") if item]
    results = []
    for seed in args.seeds:
        base = prepared(args.work, seed, args.threads)
        for name, overrides in arms.items():
            outcome = run_arm(base, name, [f"seed={seed}", *overrides], seed, args.threads)
            results.append({"arm": name, "seed": seed, "overrides": overrides, **outcome})
            print(json.dumps(results[-1]), flush=True)
    summary = {}
    for name in arms:
        rows = [r for r in results if r["arm"] == name]
        summary[name] = {"mean_accuracy": sum(r["policy_accuracy"] for r in rows) / len(rows),
                         "accuracy_by_seed": [r["policy_accuracy"] for r in rows],
                         "mean_train_seconds": sum(r["train_seconds"] for r in rows) / len(rows),
                         "mean_train_cpu_seconds": sum(r["train_cpu_seconds"] for r in rows) / len(rows)}
    print(json.dumps(summary, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": results, "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
