"""Compare MLflow runs (any number, or a sweep's): the params that differ, final and best metrics,
and one figure of their reward, training accuracy and held-out accuracy curves."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd

from flows.tracking import EXPERIMENT, _mlflow
from stages.config import SWEEP_NAME

CURVES = ["reward", "rewards/accuracy", "eval/accuracy"]  # the last: held-out, with eval.every
SUMMARY = ["reward", "rewards/accuracy", "kl", "entropy", "completions/mean_length", "seconds/iteration",
           "eval/accuracy", "eval/reference_accuracy", "eval/policy_accuracy", "eval/policy_format_rate"]


def _lower_is_better(metric: str) -> bool:
    return any(word in metric for word in ("kl", "loss", "seconds", "length"))


def resolve_runs(root: Path, refs: list[str], sweep: str | None = None) -> list[Any]:
    """Runs by id or name, then those tagged `sweep` (in start order); with neither, the two most recent."""
    mlflow = _mlflow(root)
    client = mlflow.MlflowClient()
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        raise ValueError(f"no MLflow experiment {EXPERIMENT!r} in this store: run the pipeline first")
    if sweep is not None:
        if not re.match(SWEEP_NAME, sweep):
            raise ValueError(f"compare: {sweep!r} is not a sweep name (letters, digits and . : @ + = / - _)")
        swept = client.search_runs([experiment.experiment_id], filter_string=f"tags.sweep = '{sweep}'",
                                   order_by=["attributes.start_time ASC"])
        if not swept:
            raise ValueError(f"compare: no run tagged sweep {sweep!r} (params.yaml tracking.sweep)")
        return resolve_runs(root, refs) + swept if refs else swept
    if not refs:
        runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=2)
        if len(runs) < 2:
            raise ValueError(f"compare needs two runs; the store has {len(runs)}")
        return list(reversed(runs))
    resolved = []
    for ref in refs:
        found = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{ref}'",
                                   order_by=["attributes.start_time DESC"], max_results=1)
        if not found:
            try:
                found = [client.get_run(ref)]
            except Exception:
                raise ValueError(f"compare: no run with id or name {ref!r}") from None
        resolved.append(found[0])
    return resolved


def label(run: Any) -> str:
    return run.info.run_name or run.info.run_id[:8]


def differing_params(runs: list[Any]) -> pd.DataFrame:
    keys = sorted(set().union(*(run.data.params for run in runs)))
    rows = {key: [run.data.params.get(key, "—") for run in runs] for key in keys}
    table = pd.DataFrame(rows, index=[label(r) for r in runs]).T
    return table[table.nunique(axis=1) > 1]


def metric_summary(root: Path, runs: list[Any]) -> pd.DataFrame:
    """Per metric, each run's final and best value (its final only, for more than two runs)."""
    client = _mlflow(root).MlflowClient()
    rows = []
    for metric in SUMMARY:
        row: dict[str, Any] = {"metric": metric}
        for run in runs:
            history = client.get_metric_history(run.info.run_id, metric)
            if not history:
                continue
            values = [m.value for m in sorted(history, key=lambda m: m.step)]
            best = min(values) if _lower_is_better(metric) else max(values)
            if len(runs) > 2:  # a sweep: one column per run, so that the table fits a terminal
                row[label(run)] = values[-1]
            else:
                row[f"{label(run)} final"] = values[-1]
                row[f"{label(run)} best"] = best
        if len(row) > 1:
            rows.append(row)
    return pd.DataFrame(rows).set_index("metric") if rows else pd.DataFrame()


def plot_curves(root: Path, runs: list[Any], target: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display: write the PNG only
    import matplotlib.pyplot as plt

    client = _mlflow(root).MlflowClient()
    differing = differing_params(runs)
    # Each line says what its run changed: "boozy-volt: beta=0.0, lr=0.003".
    legend = [label(run) + (": " + ", ".join(f"{key.rsplit('.', 1)[-1]}={differing.iloc[row, column]}"
                                             for row, key in enumerate(differing.index)) if len(differing) else "")
              for column, run in enumerate(runs)]
    histories = {metric: [sorted(client.get_metric_history(run.info.run_id, metric), key=lambda m: m.step)
                          for run in runs] for metric in CURVES}
    shown = [metric for metric in CURVES if any(histories[metric])] or CURVES[:2]  # eval/accuracy: with eval.every
    figure, axes = plt.subplots(1, len(shown), figsize=(6 * len(shown), 4), squeeze=False)
    for axis, metric in zip(axes[0], shown):
        for line, history in zip(legend, histories[metric]):
            # Held-out points are eval.every iterations apart: markers show where they were measured.
            axis.plot([m.step for m in history], [m.value for m in history], label=line,
                      marker="o" if metric.startswith("eval/") else None, markersize=3)
        axis.set(title="held-out accuracy (greedy)" if metric == "eval/accuracy" else metric, xlabel="iteration")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=100)
    plt.close(figure)
    return target
