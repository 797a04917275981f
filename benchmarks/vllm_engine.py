"""The native decode loop and the vLLM engine side by side, at the tiny default and the realistic shape.

    python benchmarks/vllm_engine.py [--shapes tiny realistic] [--repeats 3] [--iterations 3]

Generation (each engine in a child process of its own, so memory is its own; the same prompts,
the same params): tokens per second, wall and CPU seconds (vLLM's: its server's processes and
the client's), median of `--repeats`; vLLM's start-up (to healthy and its first request) and
weight-reload time (median); peak resident memory (native: the process; vLLM: the server's
process group, sampled); the gap between vLLM's sampling log-probs and the trainer's for the
same tokens. Then, at the realistic shape, a whole iteration (weight reload → rollout → reward →
advantage → update, the stage functions `grpo train` runs) with each engine, `--iterations` times
from the same policy: their seconds, and the median after the first. fp32, `threads` = cores for
each engine (they never run at once).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SHAPES = {
    # params.yaml's own shape: 16 prompts x G 8, up to 32 new tokens, the tiny model
    "tiny": ["rollout.dynamic_sampling.filter=none"],
    # benchmarks/workload.py: vocabulary 151,936, hidden 256, 4 layers, GSM8K-style prompts
    "realistic": ["rollout.prompts_per_iteration=8", "rollout.group_size=8", "rollout.max_new_tokens=256",
                  "grpo.minibatch_size=32", "grpo.mu=1", "eval.max_new_tokens=16",
                  "rollout.dynamic_sampling.filter=none"],
}


def inputs(shape: str, work: Path) -> tuple[list[str], Path]:
    """Params overrides and a project directory holding prompts and the reference, made once per shape."""
    from stages.records.artifacts import Layout
    from stages.params import load_params
    from stages.prepare import prepare
    from stages.reference import reference

    root = work / shape
    overrides = list(SHAPES[shape])
    if shape == "realistic":
        from memory import inputs_for

        made = inputs_for(work / "realistic-inputs", 151_936, overrides)
        overrides += [f"model.path={made / 'user-model'}", f"data.source={made / 'prompts.jsonl'}"]
        if not Layout(root).reference.is_dir():
            shutil.copytree(Layout(made).prompts, Layout(root).prompts)
            shutil.copytree(Layout(made).reference, Layout(root).reference)
    elif not Layout(root).reference.is_dir():
        params = load_params(ROOT / "params.yaml", overrides)
        prepare(params, Layout(root))
        reference(params, Layout(root))
    return overrides, root


class GroupPeak:
    """Peak resident memory and CPU seconds of a process and its descendants, sampled every 50 ms."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.root, self.peak, self.stopped = psutil.Process(pid), 0, False
        threading.Thread(target=self._sample, daemon=True).start()

    def processes(self) -> list:
        return [self.root, *self.root.children(recursive=True)]

    def cpu_seconds(self) -> float:
        total = 0.0
        for process in self.processes():
            try:
                total += sum(process.cpu_times()[:2])
            except Exception:  # noqa: BLE001 - a process that just ended
                pass
        return total

    def _sample(self) -> None:
        while not self.stopped:
            rss = 0
            for process in self.processes():
                try:
                    rss += process.memory_info().rss
                except Exception:  # noqa: BLE001
                    pass
            self.peak = max(self.peak, rss)
            time.sleep(0.05)


def generation(shape: str, engine_name: str, work: Path, repeats: int) -> dict:
    """One engine's generation of the iteration-1 prompts, `repeats` times (in this process)."""
    import torch

    from stages.records.artifacts import Layout
    from stages.params import load_params
    from stages.model.generation import completion_logprobs, left_pad, pad_rows
    from stages.model.modeling import configure_threads, load_model, load_tokenizer
    from stages.rollout import generate_rollouts, iteration_prompts
    from stages.model.vllm_server import vllm_engine

    overrides, root = inputs(shape, work)
    params = load_params(ROOT / "params.yaml", [*overrides, f"rollout.engine={engine_name}"])
    layout = Layout(root)
    configure_threads(params)
    model = load_model(layout.reference, params.model, torch.device("cpu"), dtype=torch.float32).eval()
    tokenizer = load_tokenizer(layout.reference)
    prompts = iteration_prompts(params, layout, 1)
    result: dict = {"shape": shape, "engine": engine_name}
    starting = time.perf_counter()
    with (vllm_engine(params, layout) if engine_name == "vllm" else _Nothing()) as engine:
        if engine is not None:
            result["startup_seconds"] = time.perf_counter() - starting  # to healthy, and its first request
            group = GroupPeak(engine.servers[0].pid)
            reloads = [engine.load_checkpoint(0, layout.reference) for _ in range(repeats)]
            result["reload_seconds"] = statistics.median(reloads)
        seconds, cpu, tokens = [], [], []
        for _ in range(repeats):
            cpu_before = time.process_time() + (group.cpu_seconds() if engine is not None else 0.0)
            started = time.perf_counter()
            rows = generate_rollouts(model, tokenizer, prompts, params, 1, engine=engine)
            seconds.append(time.perf_counter() - started)
            cpu.append(time.process_time() + (group.cpu_seconds() if engine is not None else 0.0) - cpu_before)
            tokens.append(int(rows["completion_length"].sum()))
        result |= {"seconds": statistics.median(seconds), "cpu_seconds": statistics.median(cpu),
                   "tokens": statistics.median(tokens), "tokens_per_second": statistics.median(
                       t / s for t, s in zip(tokens, seconds))}
        if engine is not None:
            group.stopped = True
            result["peak_rss_gib"] = group.peak / 2**30
            prompt_rows, mask = left_pad(list(rows["prompt_ids"]), tokenizer.pad_token_id)
            width = int(rows["completion_length"].max())
            ids, completion_mask = pad_rows(list(rows["completion_ids"]), width, tokenizer.pad_token_id)
            engine_logp, _ = pad_rows(list(rows["logprobs"]), width, 0.0, dtype=torch.float32)
            gaps = []
            with torch.no_grad():
                for chunk in torch.arange(len(rows)).split(16):
                    logp, _ = completion_logprobs(model, prompt_rows[chunk], mask[chunk], ids[chunk],
                                                  completion_mask[chunk], params.rollout.temperature)
                    gaps.append(((logp - engine_logp[chunk]).abs())[completion_mask[chunk].bool()])
            gap = torch.cat(gaps)
            result |= {"logprob_diff_mean": float(gap.mean()), "logprob_diff_max": float(gap.max()),
                       "logprob_diff_p99": float(gap.quantile(0.99))}
        else:
            result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result


class _Nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def iterations(shape: str, engine_name: str, work: Path, count: int) -> dict:
    """Iteration 1 with one engine, `count` times from the same policy: weight reload (as every later
    iteration pays it) → rollout → reward → advantage → update, the stage functions `grpo train`
    runs (without Prefect and MLflow).

    Why iteration 1 again and not iterations 1..count: the engines draw different samples for one
    seed, so from iteration 2 on their runs train different policies, whose completions end at
    different lengths (a policy that learned to stop early generates and updates less). From one
    policy each repeat is the same work, and the two engines' work differs only by their draws
    (the completions' mean length is recorded beside the seconds).
    """
    import torch

    from stages.advantage import advantage
    from stages.records.artifacts import Layout
    from stages.params import load_params
    from stages.model.modeling import configure_threads
    from stages.policy import load_reference, load_train_state
    from stages.reward import reward
    from stages.rollout import rollout
    from stages.update import update
    from stages.model.vllm_server import vllm_engine

    overrides, prepared = inputs(shape, work)
    layout = Layout(work / f"{shape}-{engine_name}-run")
    shutil.rmtree(layout.root, ignore_errors=True)
    shutil.copytree(Layout(prepared).prompts, layout.prompts)
    shutil.copytree(Layout(prepared).reference, layout.reference)
    params = load_params(ROOT / "params.yaml", [*overrides, f"rollout.engine={engine_name}", "grpo.iterations=1"])
    configure_threads(params)
    state = load_train_state(params, layout, 0)
    reference = load_reference(params, layout, state)
    rows = []
    with (vllm_engine(params, layout) if engine_name == "vllm" else _Nothing()) as engine:
        for repeat in range(1, count + 1):
            shutil.rmtree(layout.iteration(1), ignore_errors=True)
            if repeat > 1:
                state = load_train_state(params, layout, 0)
            if engine is not None:
                engine.holds = None  # reload checkpoint 0, as each later iteration reloads its checkpoint
            started = time.perf_counter()
            metrics = rollout(params, layout, 1, state.model, state.tokenizer, engine=engine)
            metrics |= reward(params.reward, layout, 1, params.rollout.group_size,
                              max_new_tokens=params.rollout.max_new_tokens)
            metrics |= advantage(params.grpo, params.rollout.group_size, layout, 1)
            metrics |= update(params, layout, 1, state, reference)
            rows.append({"repeat": repeat, "seconds": time.perf_counter() - started,
                         **{key: metrics[key] for key in ("seconds/rollout", "seconds/reward", "seconds/update",
                                                          "seconds/weight_reload", "completions/mean_length",
                                                          "rollout/logprob_diff_mean", "rollout/logprob_diff_max")
                            if key in metrics}})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    del state, reference
    torch.manual_seed(0)
    steady = rows[1:] or rows  # the first pays the engine's warm-up
    return {"shape": shape, "engine": engine_name, "repeats": rows,
            "median_seconds_after_the_first": statistics.median(row["seconds"] for row in steady)}


def child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["tiny", "realistic"], choices=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=3, help="whole iterations (iteration 1 from the same "
                                                                   "policy) per engine at the realistic shape (0: none)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/grpo-vllm-bench"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "vllm_engine.json")
    parser.add_argument("--one", nargs=3, metavar=("KIND", "SHAPE", "ENGINE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        kind, shape, engine = args.one
        result = generation(shape, engine, args.work, args.repeats) if kind == "generation" else \
            iterations(shape, engine, args.work, args.iterations)
        print(json.dumps(result))
        return
    results: dict = {"cpu": _cpu(), "generation": [], "iteration": []}
    for shape in args.shapes:
        for engine in ("native", "vllm"):
            results["generation"].append(child(["--one", "generation", shape, engine, "--repeats", str(args.repeats),
                                                "--work", str(args.work)]))
            print(json.dumps(results["generation"][-1]), flush=True)
    if args.iterations and "realistic" in args.shapes:
        for engine in ("native", "vllm"):
            results["iteration"].append(child(["--one", "iteration", "realistic", engine, "--iterations",
                                               str(args.iterations), "--work", str(args.work)]))
            print(json.dumps(results["iteration"][-1]), flush=True)
        native, vllm = (row["median_seconds_after_the_first"] for row in results["iteration"])
        results["iteration_ratio_vllm_to_native"] = vllm / native
        print(f"iteration at the realistic shape: vLLM / native = {vllm / native:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} x {os.cpu_count()}"
    return f"{os.cpu_count()} cores"


if __name__ == "__main__":
    main()
