"""Orchestration overhead: the same GRPO iterations run through the stages directly and
through the product (`dvc repro` → Prefect flow and tasks → MLflow).

    python benchmarks/orchestration.py --iterations 220 --repeats 2   # the default config

Both arms start from the same prepared prompts and reference model, each in a fresh
process (so both pay Python, torch and transformers imports), and run in alternation so
machine noise hits both alike. The direct arm is a plain script calling the stage
functions; the orchestrated arm is `dvc repro` of the train stage, which adds DVC, the
Prefect flow (and its temporary server), manifests, MLflow and the metric files.
Writes benchmarks/results/orchestration.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def direct_iterations(params_file: Path, root: Path) -> float:
    """The iterations as plain function calls: no Prefect, no MLflow, no DVC."""
    from stages.artifacts import Layout
    from stages.config import load_params
    from stages.modeling import configure_threads, load_model, load_tokenizer, resolve_device
    from stages.advantage import advantage
    from stages.reward import reward
    from stages.rollout import rollout
    from stages.update import TrainState, make_optimizer, update
    import torch

    params, layout = load_params(params_file), Layout(root)
    configure_threads(params)
    started = time.perf_counter()
    device = resolve_device(params)
    model = load_model(layout.reference, params.model, device, dtype=torch.float32).eval()
    state = TrainState(model, load_tokenizer(layout.reference), make_optimizer(model, params))
    reference = load_model(layout.reference, params.model, device).eval() if params.grpo.beta else None
    for iteration in range(1, params.grpo.iterations + 1):
        rollout(params, layout, iteration, state.model, state.tokenizer)
        reward(params.reward, layout, iteration)
        advantage(params.grpo, params.rollout.group_size, layout, iteration)
        update(params, layout, iteration, state, reference)
    return time.perf_counter() - started


def direct(params_file: Path, root: Path, env: dict[str, str]) -> tuple[float, float]:
    """A fresh process running the plain iterations: (process wall seconds, iteration seconds)."""
    shutil.rmtree(root / "runs", ignore_errors=True)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, __file__, "--direct", str(params_file), str(root)], env=env, check=True,
                            capture_output=True, text=True)
    return time.perf_counter() - started, float(result.stdout.strip().splitlines()[-1])


def orchestrated(repo: Path, env: dict[str, str]) -> float:
    """`dvc repro` of the train stage: a fresh process, the Prefect flow, MLflow tracking."""
    shutil.rmtree(repo / "runs", ignore_errors=True)
    started = time.perf_counter()
    subprocess.run(["dvc", "repro", "--force", "--single-item", "train"], cwd=repo, env=env, check=True,
                   capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "orchestration.json",
                        help="where the JSON goes (--iterations 1 measures the fixed cost per run)")
    parser.add_argument("--direct", nargs=2, metavar=("PARAMS", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.direct:  # the child process of the direct arm
        print(direct_iterations(Path(args.direct[0]), Path(args.direct[1])))
        return

    work = Path(tempfile.mkdtemp(prefix="grpo-bench-"))
    repo = work / "repo"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["grpo"]["iterations"] = args.iterations
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PREFECT_HOME": str(work / "prefect"), "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
           "DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    for command in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "bench"],
                    ["dvc", "repro", "reference"]):
        subprocess.run(command, cwd=repo, env=env, check=True, capture_output=True)

    direct_root = work / "direct"
    shutil.copytree(repo / "data", direct_root / "data")
    shutil.copytree(repo / "models", direct_root / "models")
    times: dict[str, list[float]] = {"direct": [], "orchestrated": [], "direct_iterations_only": []}
    for repeat in range(args.repeats):
        wall, iterations = direct(repo / "params.yaml", direct_root, env)
        times["direct"].append(wall)
        times["direct_iterations_only"].append(iterations)
        times["orchestrated"].append(orchestrated(repo, env))
        print(f"repeat {repeat + 1}: direct {wall:.1f}s (iterations {iterations:.1f}s)  "
              f"orchestrated {times['orchestrated'][-1]:.1f}s", flush=True)

    medians = {arm: statistics.median(values) for arm, values in times.items()}
    result = {
        "iterations": args.iterations, "repeats": args.repeats, "seconds": times,
        "median_seconds": medians,
        "overhead_ratio": medians["orchestrated"] / medians["direct"],
        "overhead_ratio_vs_iterations_only": medians["orchestrated"] / medians["direct_iterations_only"],
        "overhead_seconds_per_iteration": (medians["orchestrated"] - medians["direct"]) / args.iterations,
    }
    target = args.output
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
