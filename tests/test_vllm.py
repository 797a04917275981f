"""`rollout.engine: vllm`: rollouts from a real vLLM server (the project's `.venv-vllm`, `make
vllm`) on 127.0.0.1, weights reloaded from each checkpoint, as reproducible as the native loop.

One server, started once for the module through the pipeline's own launcher, serves the tied
tiny model to every run that names it in `rollout.vllm.urls`; the runs that start their own
server (the default) use an untied model with a chat template. vLLM's CPU attention takes head
sizes 32, 64, ...: the suite's 32-wide model has one head here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest
import torch
import yaml

from conftest import ROOT, dvc_project, outcome, prepare_tiny_project, train
from stages.records.artifacts import Layout, file_digest
from stages.params import load_params
from stages.model.generation import completion_logprobs, left_pad, pad_rows
from stages.model.modeling import encode_prompts, eos_token_ids, load_model, load_tokenizer
from stages.model.vllm_engine import Server, VllmEngine, request_seed
from stages.model.vllm_server import started_server

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
ITERATIONS = 3
VLLM = ["model.tiny.num_heads=1", "rollout.engine=vllm", f"rollout.vllm.python={VLLM_PYTHON}",
        "rollout.vllm.kv_cache_gib=1"]
# fp32 on both sides: vLLM's kernels and ours round differently, by ~1e-6 per token here.
GAP = 1e-4

pytestmark = pytest.mark.skipif(not VLLM_PYTHON.exists() and not os.environ.get("CI"),
                                reason="no .venv-vllm: `make vllm` (CI always builds it)")


def params_with(root: Path, overrides: list[str]) -> Path:
    raw = yaml.safe_load((root / "params.yaml").read_text())
    from stages.config import set_key
    for override in overrides:
        key, _, value = override.partition("=")
        set_key(raw, key, yaml.safe_load(value))
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return root / "params.yaml"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_tiny_project(tmp_path_factory.mktemp("prepared"), ITERATIONS, VLLM)


@pytest.fixture(scope="module")
def server(prepared):
    """A vLLM server serving the tied tiny model, with a context of 64 tokens, adapters enabled (a
    server started for a LoRA run: it serves full-weight runs as well)."""
    params = load_params(prepared / "params.yaml", ["rollout.vllm.max_model_len=64", "model.lora.r=8"])
    with started_server(params, Layout(prepared)) as running:
        yield running


def workspace(prepared: Path, tmp_path: Path, name: str, overrides: list[str] = ()) -> Path:
    root = tmp_path / name
    shutil.copytree(prepared, root, ignore=shutil.ignore_patterns(".vllm"))
    params_with(root, list(overrides))
    return root


def rollouts(root: Path) -> dict[str, str]:
    layout = Layout(root)
    return {f"{i}": file_digest(layout.iteration(i) / "rollouts.parquet") for i in range(1, ITERATIONS + 1)}


def gaps(root: Path) -> list[float]:
    frame = pd.read_csv(Layout(root).metrics / "iterations.csv")
    return frame["rollout/logprob_diff_max"].tolist()


def vllm_processes(root: Path) -> list[str]:
    """The vLLM servers (and their engine processes) serving `root`'s model."""
    found = subprocess.run(["pgrep", "-af", "stages.model.vllm_worker"], capture_output=True, text=True).stdout
    servers = [line.split()[0] for line in found.splitlines() if str(root) in line]
    groups = {str(os.getpgid(int(pid))) for pid in servers if Path(f"/proc/{pid}").exists()}
    members = subprocess.run(["ps", "-eo", "pid=,pgid="], capture_output=True, text=True).stdout.split("\n")
    return servers + [line for line in members if line.split() and line.split()[1] in groups]


# --- the engine, called directly -------------------------------------------------------------


def trainer_logprobs(model, prompt_ids: list[list[int]], samples, group: int) -> torch.Tensor:
    rows = [prompt_ids[i // group] for i in range(len(samples.lengths))]
    prompts, prompt_mask = left_pad(rows, 0)
    completions = [row[:n] for row, n in zip(samples.completion_ids.tolist(), samples.lengths.tolist())]
    ids, mask = pad_rows(completions, samples.completion_ids.shape[1], 0)
    with torch.no_grad():
        logp, _ = completion_logprobs(model, prompts, prompt_mask, ids, mask)
    return ((logp - samples.logprobs).abs() * mask).max()


def test_vllm_samples_with_the_log_probs_the_trainer_computes_before_and_after_a_reload(prepared, server, tmp_path):
    params = load_params(prepared / "params.yaml")
    layout = Layout(prepared)
    tokenizer = load_tokenizer(layout.reference)
    model = load_model(layout.reference, params.model, torch.device("cpu"), dtype=torch.float32).eval()
    prompts = pd.read_parquet(layout.prompt_split("train"))[:6]
    prompt_ids = encode_prompts(tokenizer, prompts["prompt"].tolist())
    seeds = [request_seed(0, 1, pid) for pid in prompts["prompt_id"]]
    engine = VllmEngine([Server(server.url)]).connect()
    draw = dict(group_size=4, max_new_tokens=24, eos_ids=eos_token_ids(model, tokenizer), temperature=1.0, top_p=1.0,
                where="a test")
    engine.load_checkpoint(0, layout.reference)
    first = engine.sample(prompt_ids, seeds, **draw)
    assert trainer_logprobs(model, prompt_ids, first, 4) < GAP

    # A seed per prompt: the same draws again, and a prompt's draws do not depend on its batch.
    again = engine.sample(prompt_ids, seeds, **draw)
    alone = engine.sample(prompt_ids[2:3], seeds[2:3], **draw)
    assert torch.equal(first.completion_ids, again.completion_ids) and torch.equal(first.logprobs, again.logprobs)
    width = int(alone.lengths.max())
    assert torch.equal(first.completion_ids[8:12, :width], alone.completion_ids)

    # More prompt tokens than one engine step prefills (8,192): whole prefills over several steps
    # (a prefill split in two rewinds the seeded generator, which kills vLLM's engine on CPU).
    many = pd.read_parquet(layout.prompt_split("train"))[:80]
    many_ids = encode_prompts(tokenizer, many["prompt"].tolist())
    crowd = engine.sample(many_ids, [request_seed(0, 1, pid) for pid in many["prompt_id"]],
                          **{**draw, "group_size": 8, "max_new_tokens": 4})
    assert sum(map(len, many_ids)) * 8 > 8192 and len(crowd.lengths) == 80 * 8

    # A new policy through its checkpoint directory: the tied head follows the new embedding.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter, generator=torch.Generator().manual_seed(1)) * 0.05)
    model.save_pretrained(tmp_path / "checkpoint")
    engine.load_checkpoint(1, tmp_path / "checkpoint")
    assert trainer_logprobs(model, prompt_ids, engine.sample(prompt_ids, seeds, **draw), 4) < GAP

    # What the repair in stages.model.vllm_worker is for: vLLM's own reload keeps a stale packed head.
    engine.load_checkpoint(0, layout.reference)
    httpx.post(f"{server.url}/collective_rpc", json={"method": "reload_weights",
                                                     "kwargs": {"weights_path": str(tmp_path / "checkpoint")}})
    httpx.post(f"{server.url}/reset_prefix_cache")
    assert trainer_logprobs(model, prompt_ids, engine.sample(prompt_ids, seeds, **draw), 4) > 100 * GAP
    engine.close()


def test_the_servers_engine_processes_wait_for_each_other_without_spinning(server):
    """The project's vLLM plugin (pyproject.toml, registered in `.venv-vllm` by `make vllm`) runs in
    the engine core and the worker: neither takes a core from the other while it waits."""
    said = [line.split()[0] for line in server.log.read_text().splitlines()
            if "message queues wait without spinning" in line]
    assert any(who.startswith("(EngineCore") for who in said), said
    assert any("Worker" in who for who in said), said


def test_the_servers_hold_the_checkpoint_the_schedule_names_and_reload_only_when_it_changes(prepared, server,
                                                                                           tmp_path):
    from stages.rollout import load_sampling_weights

    layout = Layout(tmp_path)
    for target in (layout.reference, layout.checkpoint(1), layout.checkpoint(2)):
        shutil.copytree(Layout(prepared).reference, target)
    params = load_params(prepared / "params.yaml", ["rollout.max_lag=1"])
    engine = VllmEngine([Server(server.url)]).connect()
    reloads = {iteration: load_sampling_weights(params, layout, iteration, engine) for iteration in (1, 2, 3, 4)}
    assert [bool(reloads[i]) for i in (1, 2, 3, 4)] == [True, False, True, True]  # checkpoints 0, 0, 1, 2
    assert engine.holds == 2
    engine.close()


# --- runs ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(prepared, server, env, tmp_path_factory):
    root = workspace(prepared, tmp_path_factory.mktemp("runs"), "uninterrupted", [f"rollout.vllm.urls=['{server.url}']"])
    result = train(root, env)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def test_a_vllm_run_trains_on_what_the_server_sampled_within_float_error(uninterrupted):
    assert max(gaps(uninterrupted)) < GAP  # every iteration, each after a reload of the previous checkpoint
    update = json.loads((Layout(uninterrupted).iteration(2) / "update.json").read_text())
    assert update["optimizer_steps"] > 0 and update["rollout/logprob_diff_mean"] < GAP


def test_two_vllm_runs_are_identical_and_so_is_a_run_killed_in_a_rollout_or_a_reload(
        prepared, server, uninterrupted, env, tmp_path):
    urls = [f"rollout.vllm.urls=['{server.url}', '{server.url}']"]  # two servers' worth of shares: the same draws
    again = workspace(prepared, tmp_path, "again", urls)
    assert train(again, env).returncode == 0
    assert rollouts(again) == rollouts(uninterrupted)
    assert outcome(again) == outcome(uninterrupted)

    for point in ("rollout", "reload"):
        root = workspace(prepared, tmp_path, point, [f"rollout.vllm.urls=['{server.url}']"])
        killed = train(root, env, kill_at=(point, 2))
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        resumed = train(root, env)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "resuming after iteration 1" in resumed.stderr + resumed.stdout
        assert rollouts(root) == rollouts(uninterrupted), point
        assert outcome(root) == outcome(uninterrupted), point


def test_dvc_repro_with_the_vllm_engine_ends_at_the_same_policy(prepared, server, uninterrupted, env, tmp_path):
    repo = tmp_path / "repo"
    params = workspace(prepared, tmp_path, "params", [f"rollout.vllm.urls=['{server.url}']"]) / "params.yaml"
    dvc_env = dvc_project(repo, params, env)
    result = subprocess.run(["dvc", "repro"], cwd=repo, env=dvc_env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert rollouts(repo) == rollouts(uninterrupted)
    assert outcome(repo) == outcome(uninterrupted)


# --- faults and bad input --------------------------------------------------------------------


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def test_bad_vllm_settings_are_one_line_before_any_iteration(prepared, server, env, tmp_path):
    from stages.errors import EngineError
    from stages.model.vllm_server import vllm_engine

    layout = Layout(prepared)
    with pytest.raises(EngineError, match=r"no vLLM environment at .*; `make vllm` installs it"):
        with vllm_engine(load_params(prepared / "params.yaml", ["rollout.vllm.python=/nowhere/bin/python"]), layout):
            pass
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with pytest.raises(EngineError, match=rf"^the vLLM server at http://127.0.0.1:{port} does not answer .*; start "
                                          rf"it or remove it from rollout.vllm.urls$"):
        with vllm_engine(load_params(prepared / "params.yaml", [f"rollout.vllm.urls=['http://127.0.0.1:{port}']"]),
                         layout):
            pass

    # Through `grpo train`: a prompt and its completion that the server's context cannot hold.
    long = workspace(prepared, tmp_path, "long", [f"rollout.vllm.urls=['{server.url}']", "rollout.max_new_tokens=60",
                                                  "eval.max_new_tokens=60"])
    line = one_line_error(train(long, env))
    assert "rollout.max_new_tokens=60" in line and "(64 tokens, --max-model-len)" in line
    assert not (Layout(long).runs / "iterations" / "0001" / "manifest.json").exists()


def test_a_lora_run_sends_the_server_its_adapter_only(prepared, server, env, tmp_path):
    root = workspace(prepared, tmp_path, "lora", [f"rollout.vllm.urls=['{server.url}']", "model.lora.r=8",
                                                  "grpo.lr=0.05", "grpo.iterations=2"])
    result = train(root, env)
    assert result.returncode == 0, result.stderr[-3000:]
    layout = Layout(root)
    assert sorted(p.name for p in layout.checkpoint(1).glob("*.safetensors")) == ["adapter_model.safetensors"]
    assert max(gaps(root)) < GAP  # iteration 2 sampled by the reference plus checkpoint 1's adapter
    # ... which moved the policy: without the adapter the server's log-probs would be far off.
    params = load_params(root / "params.yaml")
    rows = pd.read_parquet(layout.iteration(2) / "rollouts.parquet")
    reference = load_model(layout.reference, params.model, torch.device("cpu"), dtype=torch.float32).eval()
    prompts, prompt_mask = left_pad(list(rows["prompt_ids"]), 0)
    ids, mask = pad_rows(list(rows["completion_ids"]), int(rows["completion_length"].max()), 0)
    with torch.no_grad():
        logp, _ = completion_logprobs(reference, prompts, prompt_mask, ids, mask)
    engine_logp, _ = pad_rows(list(rows["logprobs"]), ids.shape[1], 0.0, dtype=torch.float32)
    assert ((logp - engine_logp).abs() * mask).max() > 100 * GAP


def untied_chat_model(prepared: Path, target: Path) -> Path:
    """The tiny reference with its own LM head (not the embedding's) and a chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(Layout(prepared).reference, tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.copy_(model.model.embed_tokens.weight * 1.1)
    model.config.tie_word_embeddings = False
    model.save_pretrained(target)
    tokenizer = AutoTokenizer.from_pretrained(Layout(prepared).reference)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant:{% endif %}")
    tokenizer.save_pretrained(target)
    return target


def test_the_run_starts_its_own_server_and_leaves_none_behind_whatever_happens(prepared, env, tmp_path):
    model = untied_chat_model(prepared, tmp_path / "untied")
    # A system prompt past vLLM's 32-token cache blocks: a reload must not reuse cached prompt blocks.
    root = workspace(prepared, tmp_path, "own", [f"model.path={model}", "data.system_prompt='" + "solve " * 6 + "'",
                                                 "grpo.iterations=2"])
    from stages.reference import reference
    reference(load_params(root / "params.yaml"), Layout(root))

    # The server dies as iteration 2's rollout begins: one line, nothing left running; it resumes.
    line = one_line_error(train(root, env, kill_at=("server", 2)))
    assert "stopped answering during the rollout of iteration 2" in line and "resumes" in line
    assert not vllm_processes(root)

    # The pipeline is killed with -9 mid-rollout: its server goes with it.
    assert train(root, env, kill_at=("rollout", 2)).returncode == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while vllm_processes(root) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not vllm_processes(root)

    resumed = train(root, env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not vllm_processes(root)
    frame = pd.read_csv(Layout(root).metrics / "iterations.csv")
    assert len(frame) == 2 and frame["rollout/logprob_diff_max"].max() < GAP  # untied head, long prompts, reloads


STARTS_A_SERVER = """
import sys
from pathlib import Path
from stages.records.artifacts import Layout
from stages.params import load_params
from stages.model.vllm_server import started_server
with started_server(load_params(Path(sys.argv[1]) / "params.yaml"), Layout(Path(sys.argv[1]))):
    pass
"""


def test_a_pipeline_killed_while_its_server_starts_leaves_none_behind(prepared, tmp_path):
    """The launcher watches its parent before it imports vLLM (seconds of imports, then the engine's
    processes): a kill -9 in that window leaves nothing running either."""
    root = workspace(prepared, tmp_path, "starting")
    pipeline = subprocess.Popen([sys.executable, "-c", STARTS_A_SERVER, str(root)], cwd=ROOT)
    deadline = time.monotonic() + 120
    while not vllm_processes(root):
        assert pipeline.poll() is None and time.monotonic() < deadline, "no vLLM launcher started"
        time.sleep(0.05)
    pipeline.kill()
    pipeline.wait()
    deadline = time.monotonic() + 5  # the launcher polls its parent every 0.5 s; vLLM's imports take ~10 s
    while vllm_processes(root) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not vllm_processes(root)


def test_a_server_that_cannot_start_is_one_line_with_its_reason(prepared, tmp_path):
    from stages.errors import EngineError

    with socket.socket() as taken:  # a port another program holds
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        params = load_params(prepared / "params.yaml", [f"rollout.vllm.port={taken.getsockname()[1]}"])
        with pytest.raises(EngineError, match=r"did not start \(exit 1\): .*Address already in use \(log: "):
            with started_server(params, Layout(prepared)):
                pass

    layout = Layout(tmp_path)  # a model vLLM's CPU attention cannot run
    shutil.copytree(Layout(prepared).reference, layout.reference)
    config = json.loads((layout.reference / "config.json").read_text())
    config.update(num_attention_heads=2, num_key_value_heads=2, head_dim=16)  # the suite's usual tiny shape
    (layout.reference / "config.json").write_text(json.dumps(config))
    with pytest.raises(EngineError, match=r"did not start .*head size 16 .* \(32, 64"):
        with started_server(load_params(prepared / "params.yaml"), layout):
            pass
    assert not vllm_processes(layout.root)


def test_a_judge_behind_the_vllm_server_replies_as_the_same_model_loaded_locally(prepared, server):
    """`reward.judges` at an OpenAI-compatible URL: greedy replies, parsed, equal to the local judge's."""
    from model_rewards import examples
    from stages.config import RewardConfig
    from stages.reward import score_rollouts

    reference = Layout(prepared).reference
    VllmEngine([Server(server.url)]).connect().load_checkpoint(0, reference)  # whatever a test before left in it
    rows = examples(16, 3)
    completions = pd.DataFrame({"prompt_id": [f"p{n // 4}" for n in range(16)], "sample": [n % 4 for n in range(16)],
                                "prompt": [p for p, _, _ in rows], "answer": ["0"] * 16,
                                "completion": [c[:30] for _, c, _ in rows]})  # within the server's 64 tokens
    judge = {"template": "{prompt}\n{completion}\n", "chat": False, "max_new_tokens": 6, "unparsed": "abstain"}

    def scored(source: dict) -> pd.Series:
        cfg = RewardConfig(weights={"judge": 1.0}, target_language="en", custom=[], timeout_seconds=120, workers=0,
                           overlong_buffer=8, judges={"judge": {**judge, **source}})
        return score_rollouts(completions, cfg)["judge"]

    served = scored({"url": f"{server.url}/v1"})
    assert served.notna().sum() >= 4, served.tolist()  # the tiny policy replies with numbers often enough
    pd.testing.assert_series_equal(served, scored({"model": str(reference)}))
