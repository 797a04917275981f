"""A triggered run after `make run`: which stages DVC runs, and for how long, when the workspace's
dvc.lock does not reach the experiment (before `core.autostage`) and when it does (now).

    python benchmarks/triggered_run.py                       # -S eval.every=10, the default params
    python benchmarks/triggered_run.py --change grpo.beta=0.0 --set grpo.iterations=20
    python benchmarks/triggered_run.py --workspace /tmp/grpo-triggered-x/repo   # reuse step 1

1. A clone of this repository's HEAD with the default params (and `threads: 1`): `dvc repro`,
   timed stage by stage. This is the workspace a user has after `make run`.
2. Two `dvc exp run --temp -S CHANGE`, what a triggered deployment runs, one after the other:
   after: dvc.lock staged, as `dvc repro` leaves it now;
   before: dvc.lock unstaged, as every workspace was before `core.autostage` (DVC builds the
   temporary copy from git and the staged/modified files, so the copy has no lock).
   Each arm's wall time and the stages DVC ran, each stage timed. Not side by side: two
   experiments at once in one repository finish one after the other (DVC collects each into
   the repository under its lock; measured: the second waited ~400 s for the first).
3. The after arm's MLflow run (the default change, `eval.every=10`, gives it a held-out curve):
   its eval/accuracy per iteration, and what the evaluations cost beside the training.

Writes benchmarks/results/triggered_run.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RUNNING = re.compile(r"Running stage '([^']+)'")


class Timed:
    """A command whose output is read as it comes: each DVC stage's start time, and the end."""

    def __init__(self, command: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.started = time.perf_counter()
        self.stages: list[tuple[str, float]] = []  # (stage, seconds after start when it began)
        self.tail: list[str] = []
        self.process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, bufsize=1)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if match := RUNNING.search(line):
                self.stages.append((match.group(1), time.perf_counter() - self.started))
            self.tail = (self.tail + [line.rstrip()])[-40:]

    def wait(self) -> dict:
        code = self.process.wait()
        self.reader.join()
        seconds = time.perf_counter() - self.started
        if code:
            raise SystemExit(f"{self.process.args} failed ({code}):\n" + "\n".join(self.tail))
        ends = [start for _, start in self.stages[1:]] + [seconds]
        return {"seconds": round(seconds, 1), "stages_run": [stage for stage, _ in self.stages],
                "stage_seconds": {stage: round(end - start, 1) for (stage, start), end in zip(self.stages, ends)}}


def run(command: list[str], cwd: Path, env: dict[str, str]) -> str:
    return subprocess.run(command, cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


def curve(repo: Path, name: str) -> dict:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("grpo")
    (found,) = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{name}'")

    def history(metric: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in sorted(client.get_metric_history(found.info.run_id, metric),
                                                   key=lambda m: m.step)]

    evaluations, iterations = history("seconds/eval"), history("seconds/iteration")
    return {"mlflow_run_id": found.info.run_id,
            "eval_accuracy": history("eval/accuracy"),
            "eval_points": len(evaluations),
            "seconds_eval_total": round(sum(v for _, v in evaluations), 1),
            "seconds_eval_median": round(sorted(v for _, v in evaluations)[len(evaluations) // 2], 2)
            if evaluations else None,
            "seconds_training_total": round(sum(v for _, v in iterations), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--change", default="eval.every=10", help="the triggered run's override (-S)")
    parser.add_argument("--set", action="append", default=[], help="params for the workspace, e.g. grpo.iterations=20")
    parser.add_argument("--workspace", type=Path, help="a clone where step 1 ran already (its dvc.lock staged)")
    args = parser.parse_args()

    from stages.config import set_key

    work = Path(tempfile.mkdtemp(prefix="grpo-triggered-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "DVC_"))}
    env.update({"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
                "DO_NOT_TRACK": "1", "PREFECT_HOME": str(work / "prefect"),
                "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@example.com", "GIT_COMMITTER_NAME": "b",
                "GIT_COMMITTER_EMAIL": "b@example.com"})
    workspace: dict = {}
    if args.workspace:
        repo = args.workspace.resolve()
    else:
        repo = work / "repo"
        run(["git", "clone", "-q", str(ROOT), str(repo)], work, env)
        raw = yaml.safe_load((repo / "params.yaml").read_text())
        for override in ["threads=1", *args.set]:
            key, _, value = override.partition("=")
            set_key(raw, key, yaml.safe_load(value))
        (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        run(["git", "commit", "-qam", "benchmark params"], repo, env)
        print("dvc repro (the workspace after `make run`) ...", flush=True)
        workspace = Timed(["dvc", "repro"], repo, env).wait()
    staged = run(["git", "diff", "--cached", "--name-only"], repo, env).split()
    print(f"  {workspace}\n  staged by dvc repro: {staged}", flush=True)
    assert "dvc.lock" in staged, "the workspace's dvc.lock is not staged: run step 1 (dvc repro) there"

    results = {"after": Timed(["dvc", "exp", "run", "--temp", "--name", "after", "-S", args.change], repo, env).wait()}
    print(results, flush=True)
    run(["git", "reset", "-q"], repo, env)  # as before core.autostage: dvc.lock untracked
    try:
        results["before"] = Timed(["dvc", "exp", "run", "--temp", "--name", "before", "-S", args.change], repo,
                                  env).wait()
    finally:
        run(["git", "add", *staged], repo, env)  # as `dvc repro` leaves it
    print(json.dumps(results, indent=1), flush=True)

    out = {
        "note": "default params with threads 1; the two triggered arms one after the other (after, then before)",
        "change": args.change, "params": args.set, "cpu": platform_cpu(),
        "workspace_dvc_repro": workspace, "staged_by_dvc_repro": staged, **results,
        "after_over_before": round(results["after"]["seconds"] / results["before"]["seconds"], 3),
        "after_mlflow": curve(repo, "after"),
    }
    target = ROOT / "benchmarks" / "results" / "triggered_run.json"
    target.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {target}")


def platform_cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
