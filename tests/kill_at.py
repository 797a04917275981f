"""`grpo train`, killed with SIGKILL at one chosen point of one iteration: a crash on demand.

    python tests/kill_at.py <point> <iteration> train --params ... --root ...

Points (each a real `kill -9` of this process, no cleanup runs):
  rollout     completions generated, rollouts.parquet not yet written
  update      the optimizer has stepped once in memory, nothing of the update saved
  checkpoint  the checkpoint is written, the iteration's manifest is not
  reload      rollout.engine vllm: the server has loaded the checkpoint this iteration samples
              with, the run has not yet reset its prefix cache nor recorded the reload
And faults that are not this process's death:
  server      rollout.engine vllm: the vLLM server the run started is SIGKILLed (its whole
              process group) as the iteration's rollout begins
And one that is not a kill:
  fsize       the process's file-size limit (`ulimit -f`) drops to 1 kB as the checkpoint is saved
  memory      the address space (`ulimit -v`) is capped at what is mapped while the
              reference log-probs are computed: a real failed allocation

The product has no fault hooks; this wraps its functions from outside, like a debugger would.
"""

import os
import resource
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flows.train  # noqa: E402
import stages.rollout  # noqa: E402
import stages.update  # noqa: E402
import stages.model.vllm_engine  # noqa: E402
from flows.cli import main  # noqa: E402


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def wrap(module, name: str, before=None, after=None) -> None:
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        if before:
            before(*args, **kwargs)
        result = original(*args, **kwargs)
        if after:
            after(*args, **kwargs)
        return result

    setattr(module, name, wrapper)


def arm(point: str, iteration: int) -> None:
    if point == "rollout":
        target = f"iterations/{iteration:04d}/rollouts.parquet"
        wrap(stages.rollout, "write_parquet", before=lambda path, *_: target in str(path) and die())
    elif point == "update":
        current = {}
        wrap(flows.train, "update", before=lambda params, layout, i, *_: current.update(iteration=i))
        wrap(stages.update, "policy_step", after=lambda *_, **__: current.get("iteration") == iteration and die())
    elif point == "checkpoint":
        wrap(flows.train, "write_manifest", before=lambda layout, i, *_: i == iteration and die())
    elif point == "reload":
        def post(client, url, *args, original=stages.model.vllm_engine.httpx.Client.post, **kwargs):
            response = original(client, url, *args, **kwargs)
            body = kwargs.get("json") or {}
            if url.endswith("/collective_rpc") and body.get("kwargs", {}).get("path", "").endswith(f"{iteration - 1:04d}"):
                die()
            return response
        stages.model.vllm_engine.httpx.Client.post = post
    elif point == "server":
        def kill_server(engine, prompt_ids, seeds, *args, where="", **kwargs):
            if where.endswith(f"iteration {iteration}"):
                for server in engine.servers:
                    os.killpg(server.pid, signal.SIGKILL)
        wrap(stages.model.vllm_engine.VllmEngine, "sample", before=kill_server)
    elif point == "fsize":
        def limit(model, tokenizer, optimizer, target, *_):
            if target.name == f"{iteration:04d}":
                resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.RLIM_INFINITY))
        wrap(stages.update, "save_checkpoint", before=limit)
    elif point == "memory":
        original = stages.update.reference_logprobs

        def starved(*args, **kwargs):  # only this call runs short of memory; the run's exit does not
            limits = resource.getrlimit(resource.RLIMIT_AS)
            if current_iteration.get("value") == iteration:
                with open("/proc/self/statm") as statm:
                    mapped = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
                resource.setrlimit(resource.RLIMIT_AS, (mapped, limits[1]))
            try:
                return original(*args, **kwargs)
            finally:
                resource.setrlimit(resource.RLIMIT_AS, limits)

        current_iteration = {}
        wrap(flows.train, "update", before=lambda params, layout, i, *_: current_iteration.update(value=i))
        stages.update.reference_logprobs = starved
    else:
        raise SystemExit(f"unknown point {point!r}")


if __name__ == "__main__":
    arm(sys.argv[1], int(sys.argv[2]))
    sys.argv = [sys.argv[0], *sys.argv[3:]]
    main()
