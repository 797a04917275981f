"""Orchestration overhead: the same GRPO iterations run through the stages directly and
through the product (`dvc repro` → Prefect flow and tasks → MLflow).

    python benchmarks/orchestration.py --iterations 220 --repeats 3   # the default config

Both arms start from the same prepared prompts and reference model, each in a fresh
process (so both pay Python, torch and transformers imports). The direct arm is a plain
script calling the stage functions; the orchestrated arm is `dvc repro` of the train stage,
which adds DVC, the Prefect flow (and its temporary server), manifests, MLflow and the
metric files. Writes benchmarks/results/orchestration.json.

The arms run time-sliced: both are started, and only one process group runs at a time,
the other held with SIGSTOP, swapping every `--slice` seconds until both have finished. An
arm's time is the sum of its running slices. On a shared machine whose speed drifts by 15%
over minutes, this pairs the arms second by second, where running them one after the other
compared a quiet machine's run with a busy one's.
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


def direct_iterations(params_file: Path, root: Path) -> None:
    """The iterations as plain function calls: no Prefect, no MLflow, no DVC."""
    from stages.records.artifacts import Layout
    from stages.params import load_params
    from stages.model.modeling import configure_threads, load_model, load_tokenizer, resolve_device
    from stages.advantage import advantage
    from stages.reward import reward
    from stages.rollout import rollout
    from stages.update import TrainState, make_optimizer, update
    import torch

    params, layout = load_params(params_file), Layout(root)
    configure_threads(params)
    device = resolve_device(params)
    model = load_model(layout.reference, params.model, device, dtype=torch.float32).eval()
    state = TrainState(model, load_tokenizer(layout.reference), make_optimizer(model, params))
    reference = load_model(layout.reference, params.model, device).eval() if params.grpo.beta else None
    for iteration in range(1, params.grpo.iterations + 1):
        rollout(params, layout, iteration, state.model, state.tokenizer)
        reward(params.reward, layout, iteration)
        advantage(params.grpo, params.rollout.group_size, layout, iteration)
        update(params, layout, iteration, state, reference)


class Arm:
    """One arm's process group, started on its first slice and held stopped between slices."""

    def __init__(self, name: str, command: list[str], cwd: Path, env: dict[str, str], log: Path) -> None:
        self.name, self.command, self.cwd, self.env, self.log = name, command, cwd, env, log
        self.process: subprocess.Popen | None = None
        self.seconds = 0.0
        self.slices: list[tuple[float, float]] = []  # (start, end) of each running slice, time.time()

    @property
    def finished(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def run_for(self, seconds: float) -> None:
        """Let the arm run for `seconds` (or until it exits), then stop its whole process group."""
        started, wall_start = time.perf_counter(), time.time()
        if self.process is None:  # its own session: DVC, the flow and the Prefect server share one group
            with open(self.log, "w") as log:
                self.process = subprocess.Popen(self.command, cwd=self.cwd, env=self.env, start_new_session=True,
                                                stdout=log, stderr=subprocess.STDOUT)
        else:
            os.killpg(self.process.pid, signal.SIGCONT)
        try:
            self.process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGSTOP)
        self.seconds += time.perf_counter() - started
        self.slices.append((wall_start, time.time()))
        if self.finished and self.process.returncode:
            raise SystemExit(f"the {self.name} arm failed with code {self.process.returncode}; its output: {self.log}")

    def running_seconds_at(self, moment: float) -> float:
        """How long the arm had been running (stopped time left out) at wall-clock `moment`."""
        return sum(max(0.0, min(end, moment) - start) for start, end in self.slices)

    def phases(self, done_markers: list[Path]) -> dict[str, float]:
        """Running seconds before the first iteration ended, over the rest, and after the last.

        `done_markers` are files each iteration writes last (their mtimes mark its end)."""
        ends = sorted(self.running_seconds_at(path.stat().st_mtime) for path in done_markers)
        return {"to_first_iteration": ends[0], "later_iterations": ends[-1] - ends[0],
                "after_last_iteration": self.seconds - ends[-1]}


def run_time_sliced(arms: list[Arm], slice_seconds: float) -> None:
    try:
        while not all(arm.finished for arm in arms):
            for arm in arms:
                if not arm.finished:
                    arm.run_for(slice_seconds)
    finally:
        for arm in arms:
            if arm.process is not None and not arm.finished:
                os.killpg(arm.process.pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slice", type=float, default=2.0, help="seconds each arm runs before the other's turn")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "orchestration.json",
                        help="where the JSON goes (--iterations 1 measures the fixed cost per run)")
    parser.add_argument("--direct", nargs=2, metavar=("PARAMS", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.direct:  # the child process of the direct arm
        direct_iterations(Path(args.direct[0]), Path(args.direct[1]))
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
    times: dict[str, list[float]] = {"direct": [], "orchestrated": []}
    phases: dict[str, list[dict[str, float]]] = {"direct": [], "orchestrated": []}
    for repeat in range(args.repeats):
        for root in (direct_root, repo):
            shutil.rmtree(root / "runs", ignore_errors=True)
        direct = Arm("direct", [sys.executable, __file__, "--direct", str(repo / "params.yaml"), str(direct_root)],
                     ROOT, env, work / "direct.log")
        orchestrated = Arm("orchestrated", ["dvc", "repro", "--force", "--single-item", "train"], repo, env,
                           work / "orchestrated.log")
        run_time_sliced([direct, orchestrated] if repeat % 2 == 0 else [orchestrated, direct], args.slice)
        times["direct"].append(direct.seconds)
        times["orchestrated"].append(orchestrated.seconds)
        # An iteration's last file: update.json in the plain loop, the manifest in the flow.
        phases["direct"].append(direct.phases(list((direct_root / "runs/iterations").glob("*/update.json"))))
        phases["orchestrated"].append(orchestrated.phases(list((repo / "runs/iterations").glob("*/manifest.json"))))
        print(f"repeat {repeat + 1}: direct {direct.seconds:.1f}s  orchestrated {orchestrated.seconds:.1f}s  "
              f"ratio {orchestrated.seconds / direct.seconds:.3f}", flush=True)
        for arm in times:
            print("   ", f"{arm:12s}", "  ".join(f"{k} {v:.2f}s" for k, v in phases[arm][-1].items()), flush=True)

    medians = {arm: statistics.median(values) for arm, values in times.items()}
    result = {
        "iterations": args.iterations, "repeats": args.repeats, "slice_seconds": args.slice, "seconds": times,
        "ratios": [o / d for o, d in zip(times["orchestrated"], times["direct"])],
        "median_seconds": medians,
        "overhead_ratio": medians["orchestrated"] / medians["direct"],
        "overhead_seconds_per_iteration": (medians["orchestrated"] - medians["direct"]) / args.iterations,
        # Running seconds per phase: where the extra time is (fixed at either end, or per iteration).
        "phases": phases,
        "median_phases": {arm: {k: statistics.median(p[k] for p in runs) for k in runs[0]}
                          for arm, runs in phases.items()},
    }
    if args.iterations > 1:
        later = result["median_phases"]
        result["overhead_seconds_per_later_iteration"] = (
            (later["orchestrated"]["later_iterations"] - later["direct"]["later_iterations"]) / (args.iterations - 1))
    target = args.output
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
