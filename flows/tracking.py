"""MLflow: one run per pipeline run, in one store at the project root.

Every way of running (`dvc repro`, `dvc exp run --temp`, a Prefect deployment) logs into
the same sqlite store at the repo root, even when DVC runs the stage in a temporary copy
under `.dvc/tmp/exps/`, so all runs can be compared side by side.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pandas as pd

from flows.paths import project_root
from stages.artifacts import Layout, read_json, write_json
from stages.config import Params, flatten

EXPERIMENT = os.environ.get("GRPO_MLFLOW_EXPERIMENT", "grpo")
TRACKING_FILE = "tracking.json"  # under runs/: which MLflow run and Prefect flow run this is


def tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root(root) / 'mlflow.db'}"


def _git_commit(root: Path) -> str | None:
    baseline = os.environ.get("DVC_EXP_BASELINE_REV")
    if baseline:
        return baseline
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def run_tags(root: Path, prefect_flow_run_id: str | None) -> dict[str, str]:
    tags = {
        "git_commit": _git_commit(root),
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME"),
        "dvc_stage": os.environ.get("DVC_STAGE"),
        "prefect_flow_run_id": prefect_flow_run_id,
        "prefect_parent_flow_run_id": os.environ.get("GRPO_PARENT_FLOW_RUN_ID"),
    }
    return {key: value for key, value in tags.items() if value}


def _mlflow(root: Path):
    import mlflow  # imported late: it takes seconds, and stages never need it

    mlflow.set_tracking_uri(tracking_uri(root))
    mlflow.set_experiment(EXPERIMENT)
    return mlflow


class Tracker:
    """The MLflow run of one training run: params once, metrics per iteration, samples, model."""

    def __init__(self, params: Params, layout: Layout, prefect_flow_run_id: str | None = None,
                 run_name: str | None = None) -> None:
        from mlflow.entities import Param

        self.layout = layout
        self.mlflow = _mlflow(layout.root)
        self.client = self.mlflow.MlflowClient()
        name = run_name or os.environ.get("GRPO_RUN_NAME") or os.environ.get("DVC_EXP_NAME")
        experiment = self.mlflow.get_experiment_by_name(EXPERIMENT)
        run = self.client.create_run(experiment.experiment_id, run_name=name,
                                     tags=run_tags(layout.root, prefect_flow_run_id))
        self.run_id = run.info.run_id
        self.client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in flatten(params).items()])
        write_json(layout.runs / TRACKING_FILE, {"mlflow_run_id": self.run_id, "prefect_flow_run_id": prefect_flow_run_id})

    def log_iteration(self, iteration: int, metrics: dict[str, Any], samples: pd.DataFrame | None) -> None:
        from mlflow.entities import Metric

        stamp = int(pd.Timestamp.now().timestamp() * 1000)
        # TRL's metric names ("rewards/accuracy") are valid MLflow names as they are.
        batch = [Metric(k, float(v), stamp, iteration) for k, v in metrics.items()
                 if isinstance(v, (int, float))]
        self.client.log_batch(self.run_id, metrics=batch)
        if samples is not None and len(samples):
            # Not log_table: it indexes every table in one run tag, which overflows MLflow's
            # 8000-character tag limit after ~130 iterations.
            self.client.log_text(self.run_id, samples.to_json(orient="records", indent=1, force_ascii=False),
                                 f"samples/iteration_{iteration:04d}.json")

    def finish(self, status: str = "FINISHED") -> None:
        if status == "FINISHED" and self.layout.policy.is_dir():
            self.client.log_artifacts(self.run_id, str(self.layout.policy), artifact_path="policy")
        self.client.set_terminated(self.run_id, status=status)


def log_evaluation(layout: Layout, metrics: dict[str, float]) -> str | None:
    """Add the held-out metrics to the training run that produced this policy."""
    tracking = layout.runs / TRACKING_FILE
    if not tracking.is_file():
        return None
    run_id = read_json(tracking)["mlflow_run_id"]
    mlflow = _mlflow(layout.root)
    client = mlflow.MlflowClient()
    from mlflow.entities import Metric

    stamp = int(pd.Timestamp.now().timestamp() * 1000)
    client.log_batch(run_id, metrics=[Metric(f"eval/{k}", float(v), stamp, 0) for k, v in metrics.items()])
    return run_id


def sample_table(layout: Layout, iteration: int, count: int) -> pd.DataFrame:
    """The first `count` completions of an iteration, with their rewards and advantage."""
    folder = layout.iteration(iteration)
    rollouts = pd.read_parquet(folder / "rollouts.parquet", columns=["prompt_id", "sample", "prompt", "completion"])
    table = rollouts.head(count).merge(pd.read_parquet(folder / "rewards.parquet"), on=["prompt_id", "sample"])
    table = table.merge(pd.read_parquet(folder / "advantages.parquet", columns=["prompt_id", "sample", "advantage"]),
                        on=["prompt_id", "sample"])
    table.insert(0, "iteration", iteration)
    return table
