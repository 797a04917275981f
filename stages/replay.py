"""replay: an iteration's update recomputed from its files, under its own or changed objective settings.

    grpo replay 37                          every step of iteration 37 again, beside update.json
    grpo replay 37 --set grpo.loss_agg=dapo the same rollouts and advantages under another objective

Nothing is generated or scored: the iteration's rollouts.parquet and advantages.parquet (their
digests checked against its manifest), the checkpoint it started from (the policy and the
optimizer state; the reference for iteration 1) and the run's params (their digest checked
too) are all it reads, and it writes nothing. Under the recorded settings on the machine and
thread count the run used, every step comes out bit for bit as update.json recorded it (the
update's draws are seeded per iteration); under changed `grpo.*` settings it shows what that
objective would have made of the same data.
"""

from __future__ import annotations

from typing import Any

from stages.records.artifacts import Layout, read_json, tree_digest
from stages.config import Params
from stages.errors import ReplayError
from stages.records.manifest import checkpoint_path, recorded_iteration
from stages.model.modeling import configure_threads
from stages.policy import load_reference, load_train_state
from stages.update import update_steps

# The statistics shown side by side: the loss, its clip and KL terms, and the step's gradient norm.
SHOWN = ("loss", "kl", "clip_ratio", "clip_ratio/low", "clip_ratio/high", "clip_ratio/dual", "grad_norm",
         "entropy", "ratio_mean")


def starting_checkpoint(params: Params, layout: Layout, iteration: int, manifest: dict[str, Any]) -> int:
    """The iteration the replayed one started after (0: the reference), present and as recorded."""
    start = iteration - 1
    path = checkpoint_path(layout, start)
    if not path.is_dir():
        raise ReplayError(f"iteration {iteration} started from {path}, which is no longer kept "
                          f"(checkpoints.keep_last={params.checkpoints.keep_last} keeps the last ones): "
                          f"replay a later iteration, or keep more checkpoints in the next run")
    if tree_digest(path) != manifest["inputs"]["checkpoint"]:
        raise ReplayError(f"{path} is not the checkpoint iteration {iteration} started from (its digest "
                          f"differs from the one in manifest.json)")
    return start


def replay_steps(params: Params, layout: Layout, iteration: int, start: int) -> list[dict[str, float]]:
    """Every optimizer step of the iteration, from a fresh copy of the policy and optimizer it started with."""
    state = load_train_state(params, layout, start)
    return update_steps(params, layout, iteration, state, load_reference(params, layout, state))[0]


def summarise(steps: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """The first step's statistics and their mean over the steps (update.json's top level)."""
    keys = [key for key in SHOWN if key in steps[0]]
    return {"first_step": {key: steps[0][key] for key in keys},
            "mean": {key: sum(step[key] for step in steps) / len(steps) for key in keys}}


def replay(params: Params, layout: Layout, iteration: int, changed: Params | None = None) -> dict[str, Any]:
    """The recorded statistics, the replayed ones (`exact` when every recorded step is reproduced
    bit for bit) and, with `changed` settings, the same steps under them."""
    configure_threads(params)
    manifest = recorded_iteration(params, layout, iteration)
    start = starting_checkpoint(params, layout, iteration, manifest)
    recorded = read_json(layout.iteration(iteration) / "update.json")
    replayed = replay_steps(params, layout, iteration, start)
    # update.json kept only the mean of the steps before it kept every step: compare what there is.
    recorded_steps = recorded.get("steps")
    outcome: dict[str, Any] = {
        "iteration": iteration,
        "recorded": summarise(recorded_steps) if recorded_steps else
        {"mean": {key: recorded[key] for key in SHOWN if key in recorded}},
        "replayed": summarise(replayed),
        "exact": recorded_steps == [{key: step[key] for key in recorded_steps[0]} for step in replayed]
        if recorded_steps else None,
    }
    if changed is not None:
        outcome["changed"] = summarise(replay_steps(changed, layout, iteration, start))
    return outcome
