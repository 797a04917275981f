"""The run's metric files: metrics/iterations.csv (one row per iteration) and metrics/train.json."""

from __future__ import annotations

import csv
import io
from typing import Any

from stages.records.artifacts import Layout, write_json, write_text


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def metric_rows(manifests: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """(iteration, metrics) of the done iterations, after a row 0 with the held-out metrics of the
    policy before the first update when the run measured them (eval.every)."""
    rows = [(0, manifests[0]["before"])] if manifests and manifests[0].get("before") else []
    return rows + [(m["iteration"], m["metrics"]) for m in manifests]


def iterations_csv(manifests: list[dict[str, Any]]) -> str:
    """One row per iteration; the columns are every metric any iteration reported, in first-seen order
    (iteration 0, when there is one, holds only the eval/* metrics of the policy before training).

    The csv module rather than pandas: the file is rewritten after every iteration, and at a
    few hundred rows pandas takes ~10 ms of the training loop for it.
    """
    rows = [{"iteration": iteration, **metrics} for iteration, metrics in metric_rows(manifests)]
    columns = list(dict.fromkeys(["iteration", *(key for m in manifests for key in m["metrics"]),
                                  *(key for row in rows for key in row)]))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([_cell(row.get(key)) for key in columns] for row in rows)
    return out.getvalue()


def write_training_metrics(layout: Layout, manifests: list[dict[str, Any]]) -> dict[str, Any]:
    """Rewrite both files from the manifests, so they always describe exactly the done iterations."""
    write_text(layout.metrics / "iterations.csv", iterations_csv(manifests))
    last = {"iteration": manifests[-1]["iteration"], **manifests[-1]["metrics"]} if manifests else {"iteration": 0}
    summary = {key: (int(value) if key == "iteration" else float(value)) for key, value in last.items()}
    write_json(layout.metrics / "train.json", summary)
    return summary
