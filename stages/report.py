"""The run's metric files: metrics/iterations.csv (one row per iteration) and metrics/train.json."""

from __future__ import annotations

from typing import Any

import pandas as pd

from stages.artifacts import Layout, atomic_path, write_json


def iterations_table(manifests: list[dict[str, Any]]) -> pd.DataFrame:
    rows = [{"iteration": m["iteration"], **m["metrics"]} for m in manifests]
    return pd.DataFrame(rows)


def write_training_metrics(layout: Layout, manifests: list[dict[str, Any]]) -> dict[str, Any]:
    """Rewrite both files from the manifests, so they always describe exactly the done iterations."""
    table = iterations_table(manifests)
    with atomic_path(layout.metrics / "iterations.csv") as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    last = table.iloc[-1].to_dict() if len(table) else {"iteration": 0}
    summary = {key: (int(value) if key == "iteration" else float(value)) for key, value in last.items()}
    write_json(layout.metrics / "train.json", summary)
    return summary
