"""Determinism at the default params, and what it costs.

    python benchmarks/determinism.py                  # ~15 min on 2 cores
    python benchmarks/determinism.py --iterations 60  # a shorter check
    python benchmarks/determinism.py --no-cost --iterations 30 --set distributed.rollout_workers=2 \
        --set threads=1 --output benchmarks/results/determinism_workers2.json   # another layout

1. **Cost**: one update minibatch of the default shape (hidden 128, 4 layers, 32 shuffled
   completions of 16 prompts), forward and backward through `shared_prompt_logprobs`, with
   each row's prompt KV selected by `index_select` (now) and by indexing (before), interleaved
   in one process; medians of the step time, and how many of the steps gave the first
   step's gradient bit for bit.
2. **Two uninterrupted runs**: `dvc repro` of the default params (`threads: 0`, one per core)
   in two copies of one repository after `prepare` and `reference`: the final weights'
   digests, which must be equal.
3. **A run killed mid-way under `dvc repro`**: SIGKILL to the train stage's process (its pid
   is in runs/.lock) halfway through, then `dvc repro` again: its final weights must equal
   the uninterrupted runs'.

Writes benchmarks/results/determinism.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent


def kv_selection_cost(steps: int) -> dict:
    import torch
    from transformers.cache_utils import DynamicLayer

    import stages.model.generation as generation
    from stages.model.batching import CompletionBatch
    from stages.params import load_params
    from stages.model.modeling import build_tiny_model, build_tokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    shape = load_params(ROOT / "params.yaml").model.tiny
    tokenizer = build_tokenizer()
    model = build_tiny_model(shape, tokenizer, seed=0)
    draw = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 100, (int(torch.randint(12, 18, (1,), generator=draw)),), generator=draw).tolist()
               for _ in range(16)]
    completions = [torch.randint(4, 100, (int(torch.randint(5, 30, (1,), generator=draw)),), generator=draw).tolist()
                   for _ in range(32)]
    rows = torch.randperm(128, generator=draw)[:32].tolist()
    batch = CompletionBatch.from_lists([prompts[row // 8] for row in rows], completions, tokenizer.pad_token_id)

    def indexing(cache, selected):  # what transformers' batch_select_indices does
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[selected, ...], layer.values[selected, ...]

    arms = {"index_select (now)": generation.select_rows, "indexing (before)": indexing}
    times: dict[str, list[float]] = {name: [] for name in arms}
    gradients: dict[str, list[bytes]] = {name: [] for name in arms}
    for _ in range(steps):
        for name, select in arms.items():
            generation.select_rows = select
            model.zero_grad()
            started = time.perf_counter()
            logp, _ = generation.shared_prompt_logprobs(model, *batch.as_inputs(), with_entropy=True)
            (logp * batch.completion_mask).sum().backward()
            times[name].append(time.perf_counter() - started)
            gradients[name].append(b"".join(p.grad.numpy().tobytes() for p in model.parameters()))
    generation.select_rows = arms["index_select (now)"]
    return {name: {"median_seconds": statistics.median(times[name]),
                   "steps_equal_to_the_first": sum(g == gradients[name][0] for g in gradients[name]),
                   "steps": steps} for name in arms} | {"threads": torch.get_num_threads()}


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def prepared_repository(parent: Path, iterations: int, env: dict[str, str], overrides: list[str] = ()) -> Path:
    """This project's files in a git + DVC repository, default params (and `overrides`), prepare and
    reference done."""
    from stages.config import set_key

    repo = parent / "repo"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, repo / name)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["grpo"]["iterations"] = iterations
    for override in overrides:
        key, _, value = override.partition("=")
        set_key(params, key, yaml.safe_load(value))
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for command in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "default"],
                    ["dvc", "repro", "reference"]):
        _run(command, repo, env)
    return repo


def outcome(copy: Path) -> dict:
    """The final weights' digest, the held-out accuracy, and the median iteration's seconds."""
    import pandas as pd

    from stages.records.artifacts import file_digest

    evaluation = json.loads((copy / "metrics" / "eval.json").read_text())
    iterations = pd.read_csv(copy / "metrics" / "iterations.csv")
    return {"policy": file_digest(copy / "models" / "policy" / "model.safetensors"),
            "reference_accuracy": evaluation["reference_accuracy"], "policy_accuracy": evaluation["policy_accuracy"],
            "median_seconds_per_iteration": float(iterations["seconds/iteration"].median())}


def full_run(repo: Path, name: str, env: dict[str, str], kill_at: int | None = None) -> dict:
    copy = repo.parent / name
    shutil.copytree(repo, copy, symlinks=True)
    started = time.monotonic()
    if kill_at is None:
        _run(["dvc", "repro"], copy, env)
        return {**outcome(copy), "seconds": time.monotonic() - started}
    dvc = subprocess.Popen(["dvc", "repro"], cwd=copy, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = copy / "runs" / "iterations" / f"{kill_at:04d}" / "manifest.json"
    while not manifest.is_file():
        if dvc.poll() is not None:
            raise SystemExit("dvc repro ended before the kill")
        time.sleep(0.05)
    holder = json.loads((copy / "runs" / ".lock").read_text())["pid"]  # the train stage's process
    os.kill(holder, signal.SIGKILL)
    killed_code = dvc.wait()
    resumed = _run(["dvc", "repro"], copy, env)
    return {**outcome(copy), "killed_after": kill_at,
            "dvc_exit_code_when_killed": killed_code, "resumed": "resuming after iteration" in resumed.stderr,
            "seconds": time.monotonic() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=220)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "determinism.json")
    parser.add_argument("--set", action="append", default=[], help="a params override, e.g. rollout.max_lag=1")
    parser.add_argument("--no-cost", action="store_true", help="skip part 1, the KV selection's cost")
    args = parser.parse_args()

    result = {} if args.no_cost else {"kv_selection": kv_selection_cost(args.steps)}
    print(json.dumps(result, indent=2), flush=True)
    with tempfile.TemporaryDirectory(prefix="grpo-determinism-") as scratch:
        env = {**{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))},
               "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "1",
               "PREFECT_HOME": f"{scratch}/prefect", "MLFLOW_TRACKING_URI": f"sqlite:///{scratch}/mlflow.db",
               "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@example.com",
               "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@example.com"}
        repo = prepared_repository(Path(scratch), args.iterations, env, args.set)
        runs = {"first": full_run(repo, "first", env), "second": full_run(repo, "second", env),
                "killed_and_resumed": full_run(repo, "killed", env, kill_at=args.iterations // 2)}
    result |= {"iterations": args.iterations, "overrides": args.set, "cpu_count": os.cpu_count(), "runs": runs,
               "all_equal": len({run["policy"] for run in runs.values()}) == 1}
    print(json.dumps(result, indent=2))
    args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
