"""Iteration manifests: what makes an iteration done, and where a re-run picks up.

An iteration's manifest is written last, after all its outputs. It records digests of the
iteration's inputs (the params that shape it, the reference, the prompts, the checkpoint it
started from) and of its outputs. An iteration counts as done only if its manifest exists,
its inputs match the current run and its outputs still hash to what was recorded; a re-run
keeps the longest such prefix and redoes everything after it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stages.artifacts import Layout, read_json, tree_digest, value_digest, write_json
from stages.config import Params

OUTPUTS = ("rollouts.parquet", "rewards.parquet", "advantages.parquet", "update.json")


def training_fingerprint(params: Params, layout: Layout) -> dict[str, str]:
    """Everything an iteration's result depends on, except the checkpoint it starts from.

    `grpo.iterations` is left out (a longer run extends a shorter one), and so are eval and
    checkpoint retention, which do not change what an iteration computes.
    """
    shaping = params.model_dump(mode="json", include={"seed", "device", "rollout", "reward", "grpo"})
    shaping["grpo"].pop("iterations")
    return {
        "params": value_digest(shaping),
        "reference": tree_digest(layout.reference),
        "train_prompts": tree_digest(layout.prompt_split("train")),
    }


def write_manifest(layout: Layout, iteration: int, fingerprint: dict[str, str], started_from: str,
                   metrics: dict[str, Any]) -> None:
    folder = layout.iteration(iteration)
    write_json(folder / "manifest.json", {
        "iteration": iteration,
        "inputs": {**fingerprint, "checkpoint": started_from},
        "outputs": {name: tree_digest(folder / name) for name in OUTPUTS},
        "checkpoint": tree_digest(layout.checkpoint(iteration)),
        "metrics": metrics,
    })


def read_manifest(layout: Layout, iteration: int) -> dict[str, Any] | None:
    path = layout.iteration(iteration) / "manifest.json"
    try:
        return read_json(path)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _outputs_intact(layout: Layout, iteration: int, manifest: dict[str, Any]) -> bool:
    folder = layout.iteration(iteration)
    return all((folder / name).is_file() and tree_digest(folder / name) == digest
               for name, digest in manifest["outputs"].items())


def completed_iterations(layout: Layout, fingerprint: dict[str, str], last: int) -> list[dict[str, Any]]:
    """Manifests of the done iterations 1..k, the longest valid prefix of 1..last."""
    done: list[dict[str, Any]] = []
    started_from = fingerprint["reference"]  # iteration 1 starts from the reference
    for iteration in range(1, last + 1):
        manifest = read_manifest(layout, iteration)
        if (manifest is None or manifest["inputs"] != {**fingerprint, "checkpoint": started_from}
                or not _outputs_intact(layout, iteration, manifest)):
            break
        done.append(manifest)
        started_from = manifest["checkpoint"]
    return done


def resume_point(layout: Layout, done: list[dict[str, Any]]) -> int:
    """The newest done iteration whose checkpoint is on disk and intact (0: start from the reference)."""
    for manifest in reversed(done):
        checkpoint = layout.checkpoint(manifest["iteration"])
        if checkpoint.is_dir() and tree_digest(checkpoint) == manifest["checkpoint"]:
            return manifest["iteration"]
    return 0


def checkpoint_path(layout: Layout, iteration: int) -> Path:
    return layout.checkpoint(iteration) if iteration else layout.reference
