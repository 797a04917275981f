"""Crash and re-run: a run killed with SIGKILL anywhere, then re-run with the same command,
ends exactly where an uninterrupted run does; two runs are bit-identical; damaged artefacts
from an earlier run are detected by digest and redone, never trusted.

Every run here is the real `grpo train` command in its own process (Prefect flow reporting
to a real server, MLflow tracking), with four iterations, on two threads and a model wide
enough for torch to run its kernels on both (PARALLEL).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import (ROOT, dvc_project, outcome, prepare_tiny_project, train,
                      without_timings)
from stages.records.artifacts import Layout, file_digest

ITERATIONS = 4
# Where torch splits kernels over two threads: the default width, and minibatches of 32 shuffled
# completions, so each layer's shared-prompt keys (~60,000 elements) pass torch's 32,768-element
# grain. On the suite's usual one-layer, 32-wide model every kernel ran on one thread, and two
# threads' rounding differences went unseen (see test_generation's bit-identity test).
PARALLEL = ["threads=2", "model.tiny.hidden_size=128", "model.tiny.num_heads=4", "model.tiny.intermediate_size=256",
            "rollout.prompts_per_iteration=8", "rollout.group_size=8", "grpo.minibatch_size=32",
            # Dynamic sampling on: its rounds are part of what every crash must resume through.
            "rollout.dynamic_sampling.filter=zero_std", "rollout.dynamic_sampling.max_rounds=3"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Prompts, reference model and params.yaml: what `train` starts from."""
    return prepare_tiny_project(tmp_path_factory.mktemp("prepared"), ITERATIONS, PARALLEL)


def workspace(prepared: Path, tmp_path: Path, name: str) -> Path:
    root = tmp_path / name
    shutil.copytree(prepared, root)
    return root


def artefacts_so_far(root: Path) -> dict:
    """The files of the iterations a stopped run has done, by content."""
    layout, found = Layout(root), {}
    for folder in sorted((layout.runs / "iterations").iterdir()):
        if (folder / "manifest.json").is_file():
            i = int(folder.name)
            for name in ("rollouts.parquet", "rewards.parquet", "advantages.parquet"):
                found[f"{i}/{name}"] = file_digest(folder / name)
            found[f"{i}/update.json"] = without_timings(json.loads((folder / "update.json").read_text()))
    return found


def artefacts(root: Path) -> dict:
    """Every artefact of every iteration, by content."""
    layout = Layout(root)
    found = {**outcome(root), **artefacts_so_far(root)}
    assert len(found) == 2 + 4 * ITERATIONS  # every iteration done
    for checkpoint in sorted((layout.runs / "checkpoints").iterdir()):
        for name in ("model.safetensors", "optimizer.pt"):
            found[f"checkpoint/{checkpoint.name}/{name}"] = file_digest(checkpoint / name)
    return found


@pytest.fixture(scope="module")
def uninterrupted(prepared, env, tmp_path_factory):
    root = workspace(prepared, tmp_path_factory.mktemp("runs"), "uninterrupted")
    result = train(root, env)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def test_two_identical_runs_leave_bit_identical_artefacts(uninterrupted, prepared, env, tmp_path):
    again = workspace(prepared, tmp_path, "again")
    assert train(again, env).returncode == 0
    assert artefacts(again) == artefacts(uninterrupted)


def written_before_the_kill(root: Path, point: str, iteration: int) -> None:
    """The crash hit the window it was aimed at."""
    folder, checkpoint = Layout(root).iteration(iteration), Layout(root).checkpoint(iteration)
    assert not (folder / "manifest.json").exists()
    assert (folder / "rollouts.parquet").exists() == (point != "rollout")
    assert (folder / "update.json").exists() == (point == "checkpoint")
    assert checkpoint.is_dir() == (point == "checkpoint")


@pytest.mark.parametrize("point", ["rollout", "update", "checkpoint"])
def test_a_run_killed_mid_iteration_resumes_to_the_uninterrupted_result(point, uninterrupted, prepared, env, tmp_path):
    root = workspace(prepared, tmp_path, point)
    killed = train(root, env, kill_at=(point, 3))
    assert killed.returncode == -9, killed.stderr[-3000:]
    written_before_the_kill(root, point, 3)

    resumed = train(root, env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after iteration 2" in resumed.stdout + resumed.stderr
    assert outcome(root) == outcome(uninterrupted)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, target, redone_from", [
    (truncate, "runs/iterations/0003/rewards.parquet", 0),  # the checkpoints before it are pruned: start over
    (flip_a_byte, "runs/checkpoints/0004/model.safetensors", 3),
    (truncate, "runs/checkpoints/0004/optimizer.pt", 3),
], ids=["truncated-parquet", "corrupted-weights", "truncated-optimizer-state"])
def test_damaged_artefacts_are_detected_by_digest_and_redone(damage, target, redone_from, uninterrupted, tmp_path, env):
    root = tmp_path / "damaged"
    shutil.copytree(uninterrupted, root)
    damage(root / target)

    rerun = train(root, env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = rerun.stdout + rerun.stderr
    assert (f"resuming after iteration {redone_from}" in log) if redone_from else ("resuming" not in log)
    assert artefacts(root) == artefacts(uninterrupted)




@pytest.fixture(scope="module")
def prepared_one_thread_shape(tmp_path_factory):
    """The suite's usual tiny shape: compiling is most of the compiled test's time, and a wider
    model compiles longer (104 -> 147 s) to show nothing more (compiled runs are not bit-reproducible)."""
    return prepare_tiny_project(tmp_path_factory.mktemp("prepared-tiny"), ITERATIONS)


def test_a_killed_compiled_run_resumes_after_its_last_done_iteration(prepared_one_thread_shape, env, tmp_path):
    """`compile: true` resumes as an eager run does: the done iterations are kept untouched and
    the run finishes. Compiled runs are reproducible in distribution, not bit for bit: inductor
    picks its kernels by the shapes it sees first, so two compiled runs can round differently."""
    root = workspace(prepared_one_thread_shape, tmp_path, "compiled")
    params = root / "params.yaml"
    params.write_text(params.read_text().replace("compile: false", "compile: true"))
    killed = train(root, env, kill_at=("update", 3))
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert "compiling the forward of the policy and the reference" in killed.stdout + killed.stderr
    done = {k: v for k, v in artefacts_so_far(root).items() if k[:2] in ("1/", "2/")}
    assert len(done) == 8

    resumed = train(root, env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after iteration 2" in resumed.stdout + resumed.stderr
    assert {k: v for k, v in artefacts(root).items() if k in done} == done
    assert len(pd.read_csv(Layout(root).metrics / "iterations.csv")) == ITERATIONS


def test_a_run_killed_under_dvc_repro_resumes_to_the_uninterrupted_weights(uninterrupted, env, tmp_path):
    """The same params through `dvc repro` in a git + DVC project: prepare and reference redone
    there (they are reproducible too), the train stage's process SIGKILLed after iteration 2 (its
    pid is in runs/.lock), then `dvc repro` again."""
    repo = tmp_path / "repo"
    dvc_env = dvc_project(repo, uninterrupted / "params.yaml", env)

    dvc = subprocess.Popen(["dvc", "repro"], cwd=repo, env=dvc_env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    manifest = Layout(repo).iteration(2) / "manifest.json"
    deadline = time.monotonic() + 300
    while not manifest.is_file():
        assert dvc.poll() is None and time.monotonic() < deadline, "dvc repro ended before iteration 2"
        time.sleep(0.05)
    os.kill(json.loads((repo / "runs" / ".lock").read_text())["pid"], signal.SIGKILL)
    assert dvc.wait(timeout=120) != 0

    resumed = subprocess.run(["dvc", "repro"], cwd=repo, env=dvc_env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "resuming after iteration" in resumed.stderr
    assert outcome(repo)["policy"] == outcome(uninterrupted)["policy"]
