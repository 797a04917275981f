"""Scale-out on Ray and torch.distributed, with real processes: a local Ray instance on
127.0.0.1, trainer ranks joined by gloo, rollout workers and reward scorers as Ray actors
and tasks, one thread each so that they share this machine's two cores."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch

from conftest import ROOT, dvc_project, outcome, prepare_tiny_project
from stages.advantage import advantage
from stages.records.artifacts import Layout, read_json
from stages.params import load_params
from stages.errors import ConfigError, RewardError
from stages.model.modeling import load_model
from stages.reward import reward, score_rollouts
from stages.rollout import rollout, sampling_checkpoint

ray = pytest.importorskip("ray")

from flows.cluster import Trainer, free_port, ray_session, score_in_parallel, wait  # noqa: E402
from stages.policy import load_reference, load_train_state  # noqa: E402
from stages.update import update  # noqa: E402

# Two prompts' groups per minibatch share of a rank, two micro-batches each: every reduction
# (ranks, micro-batches, passes) is exercised. beta > 0: the reference runs on the trainers too.
SHAPE = ["rollout.prompts_per_iteration=4", "rollout.group_size=4", "grpo.minibatch_size=8",
         "grpo.micro_batch_size=2", "grpo.mu=2", "grpo.beta=0.04", "threads=1"]


@pytest.fixture(scope="module")
def one_iteration(tmp_path_factory):
    """A prepared project whose iteration 1 has rollouts, rewards and advantages: an update's input."""
    root = prepare_tiny_project(tmp_path_factory.mktemp("scale-out"), 1, SHAPE)
    params, layout = load_params(root / "params.yaml"), Layout(root)
    torch.set_num_threads(1)
    state = load_train_state(params, layout, 0)
    rollout(params, layout, 1, state.model, state.tokenizer)
    reward(params.reward, layout, 1, params.rollout.group_size)
    advantage(params.grpo, params.rollout.group_size, layout, 1)
    return root


@pytest.fixture(scope="module")
def local_ray(one_iteration):
    params = load_params(one_iteration / "params.yaml")
    with ray_session(params.distributed, cpus=4):
        yield


def weights_after_update(root: Path, overrides: list[str]) -> dict[str, torch.Tensor]:
    params, layout = load_params(root / "params.yaml", overrides), Layout(root)
    if params.distributed.trainers == 1:  # today's single process, here
        state = load_train_state(params, layout, 0)
        update(params, layout, 1, state, load_reference(params, layout, state))
    else:
        port, world = free_port(), params.distributed.trainers
        trainers = [Trainer.remote(rank, world, "127.0.0.1", port, params, layout, 0, 1) for rank in range(world)]
        try:
            wait({f"trainer rank {rank}": t.update.remote(params, 1, False) for rank, t in enumerate(trainers)})
        finally:
            for trainer in trainers:
                ray.kill(trainer)
    return load_model(layout.checkpoint(1), params.model, torch.device("cpu")).state_dict()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("loss_agg", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_two_trainers_step_the_policy_as_one_process_does(one_iteration, local_ray, strategy, loss_agg):
    common = [f"grpo.loss_agg={loss_agg}", f"distributed.strategy={strategy}"]
    alone = weights_after_update(one_iteration, common)
    shared = weights_after_update(one_iteration, [*common, "distributed.trainers=2"])
    before = load_model(Layout(one_iteration).reference, load_params(one_iteration / "params.yaml").model,
                        torch.device("cpu")).state_dict()
    assert any(not torch.equal(alone[key], before[key]) for key in alone), "the update moved nothing"
    worst = max(float((alone[key] - shared[key]).abs().max()) for key in alone)
    assert worst <= 1e-6, f"{strategy} {loss_agg}: weights differ by {worst}"


@pytest.mark.parametrize("rewards", [[], ["reward.weights={accuracy: 1.0, format: 0.2, rm: 0.5}", "reward.models.rm={rm}"]],
                         ids=["rules", "with-a-reward-model"])
def test_reward_workers_score_as_in_process(one_iteration, local_ray, rewards, format_reward_model):
    params = load_params(one_iteration / "params.yaml", [r.replace("{rm}", str(format_reward_model)) for r in rewards])
    rollouts = pd.read_parquet(Layout(one_iteration).iteration(1) / "rollouts.parquet")
    here = score_rollouts(rollouts, params.reward, params.rollout.group_size, "rollouts.parquet")
    spread = score_in_parallel(2)(rollouts, params.reward, params.rollout.group_size, "rollouts.parquet")
    pd.testing.assert_frame_equal(here, spread)


def test_a_raising_reward_on_a_worker_is_named_with_its_completion(one_iteration, local_ray, monkeypatch):
    rollouts = pd.read_parquet(Layout(one_iteration).iteration(1) / "rollouts.parquet")
    last = rollouts["prompt_id"].iloc[-1]  # in the second worker's share
    (one_iteration / "my_scale_rewards.py").write_text(
        "def picky(prompts, completions, prompt_id, sample, **_):\n"
        f"    return [1 / 0 if (p, s) == ({last!r}, 2) else 0.0 for p, s in zip(prompt_id, sample)]\n")
    monkeypatch.syspath_prepend(str(one_iteration))
    monkeypatch.chdir(one_iteration)
    params = load_params(one_iteration / "params.yaml", ["reward.custom=[my_scale_rewards:picky]",
                                                         "reward.weights.picky=1"])
    with pytest.raises(RewardError, match=rf"reward 'picky' raised on prompt_id={last!r} "
                                          r"sample=2: ZeroDivisionError"):
        score_in_parallel(2)(rollouts, params.reward, params.rollout.group_size, "rollouts.parquet")


def test_the_schedule_names_the_sampling_checkpoint():
    assert [sampling_checkpoint(i, 0) for i in (1, 2, 3)] == [0, 1, 2]
    assert [sampling_checkpoint(i, 1) for i in (1, 2, 3, 4)] == [0, 0, 1, 2]


@pytest.mark.parametrize("override, message", [
    ("distributed.trainers=0", "distributed.trainers: Input should be greater than or equal to 1"),
    ("distributed.rollout_workers=0", "distributed.rollout_workers: Input should be greater than or equal to 1"),
    ("rollout.max_lag=-1", "rollout.max_lag: Input should be greater than or equal to 0"),
    ("rollout.max_lag=9", "rollout.max_lag=9 exceeds grpo.iterations=2"),
    ("distributed.rollout_workers=5", "distributed.rollout_workers=5 exceeds rollout.prompts_per_iteration=4"),
    ("distributed.trainers=3", "grpo.minibatch_size=8 must be divisible by distributed.trainers=3"),
    ("distributed.address=nowhere", "distributed.address: 'nowhere' is not an address"),
    ("distributed.strategy=zero3", "distributed.strategy: Input should be 'ddp' or 'fsdp'"),
    ("reward.workers=-1", "reward.workers: Input should be greater than or equal to 0"),
])
def test_bad_scale_out_settings_are_one_line(tiny_overrides, override, message):
    with pytest.raises(ConfigError, match="^params: " + message.replace("(", r"\(").replace(")", r"\)")):
        load_params(ROOT / "params.yaml", [*tiny_overrides, "rollout.prompts_per_iteration=4", override])


# --- through `grpo train`, as users run it -------------------------------------------------------

# Dynamic sampling on, as the default recipe has it: its extra rounds go to the workers too.
LAGGED = ["distributed.rollout_workers=2", "rollout.max_lag=1", "threads=1",
          "rollout.dynamic_sampling.filter=zero_std", "rollout.dynamic_sampling.max_rounds=3"]


@pytest.fixture(scope="module")
def lagged_project(tmp_path_factory):
    return prepare_tiny_project(tmp_path_factory.mktemp("lagged"), 4, LAGGED)


RUN_TAG = "GRPO_TEST_RUN"


def grpo_train(root: Path, env: dict[str, str], *extra: str) -> subprocess.Popen:
    """`grpo train` on `root`; its environment names `root`, and so does every Ray process it starts."""
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "train", "--params", str(root / "params.yaml"),
                             "--root", str(root), *extra], cwd=ROOT, env={**env, RUN_TAG: str(root)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def ray_processes(role: str, root: Path) -> list[psutil.Process]:
    """The Ray actors of `role` that `grpo_train(root)` started (the suite's other workers may be
    running Ray at the same time): Ray's workers inherit the environment of the run that started them."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if ((process.info["cmdline"] or [""])[0].startswith(f"ray::{role}")
                    and process.environ().get(RUN_TAG) == str(root)):
                found.append(process)
        except psutil.Error:  # ended, or not ours to read
            continue
    return found


@pytest.fixture(scope="module")
def lagged_whole(lagged_project, env, tmp_path_factory):
    """The lagged run, uninterrupted."""
    whole = tmp_path_factory.mktemp("lagged-whole") / "p"
    shutil.copytree(lagged_project, whole)
    run = grpo_train(whole, env)
    assert run.wait(timeout=600) == 0, run.stderr.read()
    return whole


def test_a_lagged_run_is_deterministic_names_a_killed_process_and_resumes_to_the_same_result(
        lagged_project, lagged_whole, env, tmp_path):
    whole, killed = lagged_whole, tmp_path / "killed"
    shutil.copytree(lagged_project, killed)
    layout = Layout(whole)
    manifests = [read_json(layout.iteration(i) / "manifest.json") for i in range(1, 5)]
    assert [m["metrics"]["rollout/sampled_by"] for m in manifests] == [0, 0, 1, 2]  # the schedule, on disk
    assert [m["metrics"]["rollout/lag"] for m in manifests] == [0, 1, 1, 1]
    # Dynamic sampling drew further rounds, generated by the workers after they had moved on.
    assert any(m["metrics"]["rollout/rounds"] > 1 for m in manifests[1:])

    # A rollout worker killed after iteration 1, then the trainer after iteration 2 of the resumed run.
    for role, after, message in (("RolloutWorker", 1, "error: rollout worker "), ("Trainer", 2, "error: trainer rank 0 died")):
        run = grpo_train(killed, env)
        done = Layout(killed).iteration(after) / "manifest.json"
        deadline, victims = time.time() + 300, []
        while not (done.exists() and victims) and run.poll() is None and time.time() < deadline:
            time.sleep(0.2)
            victims = ray_processes(role, killed)
        assert done.exists() and victims, run.stderr.read() if run.poll() is not None else victims
        victims[0].send_signal(signal.SIGKILL)
        killed_at = time.time()
        code = run.wait(timeout=120)
        seconds = time.time() - killed_at
        error = run.stderr.read().strip().splitlines()[-1]
        assert code == 1 and error.startswith(message) and " died " in error, error
        assert seconds < 60, f"the run noticed its dead {role} only after {seconds:.0f} s"
        assert not ray_processes("Trainer", killed) and not ray_processes("RolloutWorker", killed), \
            "processes outlived the run"

    resumed = grpo_train(killed, env)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    assert outcome(killed) == outcome(whole)
    for i in range(1, 5):
        for name in ("rollouts.parquet", "rewards.parquet", "advantages.parquet"):
            assert (Layout(killed).iteration(i) / name).read_bytes() == (layout.iteration(i) / name).read_bytes()


def test_dvc_repro_runs_the_lagged_run_to_the_same_policy(lagged_whole, env, tmp_path):
    """The same params through `dvc repro` in a git + DVC project (prepare and reference are
    reproducible, so the train stage on Ray must end where `grpo train` did)."""
    repo = tmp_path / "repo"
    dvc_env = dvc_project(repo, lagged_whole / "params.yaml", env)
    run = subprocess.run(["dvc", "repro"], cwd=repo, env=dvc_env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "on Ray: 1 trainer(s) (ddp), 2 rollout worker(s), max_lag 1" in run.stdout + run.stderr
    assert outcome(repo) == outcome(lagged_whole)


def test_a_cluster_address_that_does_not_answer_is_one_line_before_any_work(lagged_project, env, tmp_path):
    root = tmp_path / "p"
    shutil.copytree(lagged_project, root)
    port = free_port()
    run = grpo_train(root, env, "--set", f"distributed.address=127.0.0.1:{port}")
    assert run.wait(timeout=120) == 1
    error = run.stderr.read().strip().splitlines()[-1]
    assert error.startswith(f"error: distributed.address: the Ray cluster at '127.0.0.1:{port}' does not answer"), error
    assert not (Layout(root).runs / "iterations").exists()


def test_fsdp_on_a_model_without_transformer_blocks_to_shard_is_one_line(tiny_params):
    from stages.model.distributed import Rank, distribute
    from stages.errors import ModelError
    from stages.model.modeling import build_tiny_model, build_tokenizer

    model = build_tiny_model(tiny_params.model.tiny, build_tokenizer(), seed=0)
    model._no_split_modules = []  # as a custom architecture that names none
    with pytest.raises(ModelError, match=r"^distributed.strategy: fsdp cannot wrap LlamaForCausalLM: it names no "
                                         r"transformer block class \(_no_split_modules\) to shard; use "
                                         r"distributed.strategy: ddp$"):
        distribute(model, "fsdp", Rank(0, 2))
