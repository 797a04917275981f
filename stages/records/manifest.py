"""Iteration manifests: what makes an iteration done, and where a re-run picks up.

An iteration's manifest is written last, after all its outputs. It records digests of the
iteration's inputs (the params that shape it, the reference, the prompts, the checkpoint it
started from) and of its outputs. An iteration counts as done only if its manifest exists,
its inputs match the current run and its outputs still hash to what was recorded; a re-run
keeps the longest such prefix and redoes everything after it.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from stages.records.artifacts import Layout, read_json, tree_digest, value_digest, write_json
from stages.config import Params
from stages.errors import ReplayError

OUTPUTS = ("rollouts.parquet", "rewards.parquet", "advantages.parquet", "update.json")


def training_fingerprint(params: Params, layout: Layout) -> dict[str, str]:
    """Everything an iteration's result depends on, except the checkpoint it starts from.

    `grpo.iterations` is left out (a longer run extends a shorter one), and so are eval (unless
    `eval.every` puts held-out points in the iterations' records: then a run with another curve
    is another run, trained to the same weights, so that no curve has holes), checkpoint retention, the reward timeout and workers, the trainers and the micro-batch size,
    which do not change what an iteration computes (a micro-batched step rounds differently, within float error).
    """
    shaping = params.model_dump(mode="json", include={"seed", "device", "precision", "rollout", "reward", "grpo"})
    shaping["lora"] = params.model.lora.model_dump(mode="json")  # what is trained
    shaping["system_prompt"] = params.data.system_prompt  # part of every prompt the policy sees
    shaping["grpo"].pop("iterations")
    shaping["reward"].pop("timeout_seconds")  # how long a reward may take, not what it computes
    shaping["reward"].pop("workers")  # where rewards are computed, not what they are
    # The draws are seeded per rollout worker's share; the trainers' count and strategy only
    # change how a step's sums are split (within float error), like the micro-batch size.
    shaping["rollout_workers"] = params.distributed.rollout_workers
    shaping["grpo"].pop("micro_batch_size")  # how a step's rows are cut for memory: the same step
    # Where the vLLM servers run and with what resources, not what they sample: a request's draws
    # are seeded per prompt, so how many servers share an iteration changes nothing either.
    # The native engine's runs keep the fingerprint they had before there was another engine.
    vllm = shaping["rollout"].pop("vllm")
    if shaping["rollout"].pop("engine") == "vllm":
        shaping["rollout"]["engine"] = "vllm"
        shaping["rollout"]["vllm"] = {key: vllm[key] for key in ("logprobs", "tis_cap")}
    # Reward and judge models: their settings and, for a local directory, its files (a retrained
    # model at the same path scores differently). A run without them keeps its fingerprint.
    scorers = {}
    for section in ("models", "judges"):
        specs = shaping["reward"].pop(section)
        if specs:
            shaping["reward"][section] = specs
        for name, spec in specs.items():
            if spec.get("path") or spec.get("model"):
                scorers[f"reward.{section}.{name}"] = tree_digest(Path(spec.get("path") or spec["model"]).expanduser())
    held_out = {}
    if params.eval.every:  # the iterations' records hold the held-out curve: it is their output too
        shaping["eval"] = params.eval.model_dump(mode="json", include={"every", "samples", "max_new_tokens",
                                                                       "batch_size"})
        held_out = {"test_prompts": tree_digest(layout.prompt_split("test"))}
    return {
        "params": value_digest(shaping),
        "reference": tree_digest(layout.reference),
        "train_prompts": tree_digest(layout.prompt_split("train")),
        **held_out,
        **scorers,
    }


def write_manifest(layout: Layout, iteration: int, fingerprint: dict[str, str], started_from: str,
                   metrics: dict[str, Any], before: dict[str, Any] | None = None) -> None:
    """`before`: the held-out metrics of the policy the run starts from (eval.every; iteration 1 only)."""
    folder = layout.iteration(iteration)
    write_json(folder / "manifest.json", {
        "iteration": iteration,
        "inputs": {**fingerprint, "checkpoint": started_from},
        "outputs": {name: tree_digest(folder / name) for name in OUTPUTS},
        "checkpoint": tree_digest(layout.checkpoint(iteration)),
        "metrics": metrics,
        **({"before": before} if before else {}),
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


def _set_aside(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.previous")


@contextmanager
def redoing(layout: Layout, iteration: int) -> Iterator[None]:
    """Redo `iteration` without losing what its folders held until the new ones are complete.

    Its folder and checkpoint may hold another run's iteration (the params changed since) or
    the partial files of a crashed try. They are renamed aside first, and deleted once the new
    manifest is written. If the iteration does not get that far (a reward that raises, a full
    disk, Ctrl-C, kill -9), they stay aside, the new partial files stay in place for a look,
    and the next run puts the old ones back before anything else (`recover_set_aside`): a
    failed run costs the previous run nothing, and reverting the params resumes it.
    """
    folders = [layout.iteration(iteration), layout.checkpoint(iteration)]
    for folder in folders:
        if folder.exists():
            folder.rename(_set_aside(folder))
    yield
    for folder in folders:
        if _set_aside(folder).exists():
            shutil.rmtree(_set_aside(folder))


def _put_back(folder: Path) -> None:
    if _set_aside(folder).exists():
        if folder.exists():
            shutil.rmtree(folder)
        _set_aside(folder).rename(folder)


def recover_set_aside(layout: Layout) -> None:
    """What `redoing` set aside in a run that did not finish: put back, unless the new iteration completed."""
    for aside in sorted(layout.runs.glob("iterations/.[0-9][0-9][0-9][0-9].previous")):
        iteration = int(aside.name[1:5])
        folders = [layout.iteration(iteration), layout.checkpoint(iteration)]
        if (folders[0] / "manifest.json").is_file():  # the new iteration is complete: the old files go
            for folder in folders:
                if _set_aside(folder).exists():
                    shutil.rmtree(_set_aside(folder))
        else:
            for folder in folders:
                _put_back(folder)
    for aside in layout.runs.glob("checkpoints/.[0-9][0-9][0-9][0-9].previous"):  # its iteration had no folder
        iteration = int(aside.name[1:5])
        if (layout.iteration(iteration) / "manifest.json").is_file():
            shutil.rmtree(aside)
        else:
            _put_back(layout.checkpoint(iteration))


def discard_after(layout: Layout, iteration: int) -> None:
    """Iterations and checkpoints past `iteration` (of a longer or an earlier run): removed at a run's end."""
    for folder in (layout.runs / "iterations", layout.runs / "checkpoints"):
        for path in folder.glob("[0-9]" * 4):
            if int(path.name) > iteration:
                shutil.rmtree(path)


def recorded_iteration(params: Params, layout: Layout, iteration: int) -> dict[str, Any]:
    """The manifest of a done iteration whose files are as it wrote them and whose settings are
    `params`'s, for reading it again (`grpo replay`, `grpo rescore`); else one line saying why not."""
    folder = layout.iteration(iteration)
    manifest = read_manifest(layout, iteration)
    if manifest is None:
        done = sorted(int(p.parent.name) for p in (layout.runs / "iterations").glob("*/manifest.json"))
        have = f"done: {done[0]}..{done[-1]}" if done else "no iteration is done"
        raise ReplayError(f"iteration {iteration}: {folder / 'manifest.json'} does not exist ({have})")
    for name, digest in manifest["outputs"].items():
        path = folder / name
        if not path.is_file() or tree_digest(path) != digest:
            raise ReplayError(f"{path} does not match its digest in manifest.json: it changed after iteration "
                              f"{iteration} was done; `grpo train` redoes the iteration")
    recorded, current = manifest["inputs"], training_fingerprint(params, layout)
    culprits = {"params": "the params (--params, before --set)", "reference": str(layout.reference),
                "train_prompts": str(layout.prompt_split("train"))}
    for key, culprit in culprits.items():
        if recorded.get(key) != current[key]:
            raise ReplayError(f"iteration {iteration} ran with other inputs: {culprit} differ from what its "
                              f"manifest.json recorded; pass the run's params file and change keys with --set")
    return manifest
