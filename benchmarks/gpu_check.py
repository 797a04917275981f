"""A GPU check over the stage functions: a few iterations at the realistic shape in bf16.

    python benchmarks/gpu_check.py [--iterations 4] [--hidden 256 --layers 4] [--device cuda]

No Prefect, MLflow or DVC (a GPU machine may lack them): `prepare` and `reference` build the
inputs (benchmarks/workload.py: vocabulary 151,936, ChatML, GSM8K-style prompts), then each
iteration runs rollout → reward → advantage → update as the train flow does, with
`precision: auto` (bf16 autocast over fp32 master weights on CUDA). Prints, per iteration
and as medians after the first: seconds, rollout tokens per second, peak GPU memory, and the
update's achieved FLOP/s (6 × parameters × positions processed / update seconds: the forward
and backward of every position the update feeds, the head's recomputation not counted).

On the lent GPU machine (no Prefect, MLflow, DVC, pydantic or math-verify there), carry the
missing wheels, downloaded here into an ignored folder:

    pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \\
        -d .wheels "pydantic>=2.7,<3" "math-verify>=0.7,<0.10"
    # on the machine:
    pip install --no-index --no-deps .wheels/*.whl && python benchmarks/gpu_check.py --out $OUT

With `--set rollout.engine=vllm` the rollouts come from a vLLM server (bf16 on CUDA) started
from `.venv-vllm`, and each iteration reports the gap between its log-probs and the trainer's.
That needs vLLM on the machine: its CUDA wheel (~400 MB with its kernels) is far over what a
lent machine can be carried (64 MiB), so it runs where vLLM is installed (`make vllm`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SHAPE = ["rollout.prompts_per_iteration=8", "rollout.group_size=8", "rollout.max_new_tokens=256",
         "grpo.minibatch_size=32", "grpo.mu=1", "grpo.beta=0.04", "eval.max_new_tokens=16"]


def positions_fed(layout, iteration: int) -> int:
    """Prompt and completion positions of one pass over the iteration's rows (each distinct prompt once)."""
    import pandas as pd

    rollouts = pd.read_parquet(layout.iteration(iteration) / "rollouts.parquet", columns=["prompt_id", "prompt_ids",
                                                                                          "completion_ids"])
    prompts = rollouts.drop_duplicates("prompt_id")["prompt_ids"].map(len).sum()
    return int(prompts + rollouts["completion_ids"].map(len).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--vocabulary", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--work", type=Path, default=Path("/tmp/grpo-gpu-check"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, help="a folder for gpu_check.json")
    args = parser.parse_args()

    import shutil

    import torch

    from memory import inputs_for
    from stages.records.artifacts import Layout
    from stages.params import load_params
    from stages.model.modeling import dtype_for, load_model, load_tokenizer, resolve_device
    from stages.update import TrainState, make_optimizer
    from stages.model.vllm_server import vllm_engine

    overrides = [*SHAPE, f"device={args.device}", f"grpo.iterations={args.iterations}", *args.set]
    inputs = inputs_for(args.work / f"v{args.vocabulary}-h{args.hidden}-l{args.layers}", args.vocabulary, overrides,
                        hidden=args.hidden, layers=args.layers)
    params = load_params(ROOT / "params.yaml", [*overrides, f"model.path={inputs / 'user-model'}",
                                                f"data.source={inputs / 'prompts.jsonl'}"])
    layout = Layout(args.work / "run")
    shutil.rmtree(layout.root, ignore_errors=True)
    shutil.copytree(Layout(inputs).prompts, layout.prompts)
    shutil.copytree(Layout(inputs).reference, layout.reference)

    device = resolve_device(params)
    model = load_model(layout.reference, params.model, device, dtype=torch.float32).eval()
    state = TrainState(model, load_tokenizer(layout.reference), make_optimizer(model, params))
    frozen = load_model(layout.reference, params.model, device, dtype=dtype_for(device, params.precision)).eval()
    parameters = sum(p.numel() for p in model.parameters())
    cuda = device.type == "cuda"
    rows = []
    with ExitStack() as stack:
        engine = stack.enter_context(vllm_engine(params, layout)) if params.rollout.engine == "vllm" else None
        for iteration in range(1, args.iterations + 1):
            rows.append(one_iteration(params, layout, iteration, state, frozen, engine, parameters, cuda))
            print(json.dumps(rows[-1]), flush=True)
    steady = rows[1:] or rows
    summary = {key: statistics.median(row[key] for row in steady) for key in rows[0]
               if key != "iteration" and rows[0][key] is not None}
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "parameters": parameters, "vocabulary": args.vocabulary, "shape": overrides, "iterations": rows,
              "median_after_the_first": summary}
    print(json.dumps(result["median_after_the_first"]))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")


def one_iteration(params, layout, iteration: int, state, frozen, engine, parameters: int, cuda: bool) -> dict:
    import torch

    from stages.advantage import advantage
    from stages.reward import reward
    from stages.rollout import rollout
    from stages.update import update

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    rolled = rollout(params, layout, iteration, state.model, state.tokenizer, engine=engine)
    reward(params.reward, layout, iteration)
    advantage(params.grpo, params.rollout.group_size, layout, iteration)
    updated = update(params, layout, iteration, state, frozen)
    if cuda:
        torch.cuda.synchronize()
    update_seconds = updated["seconds/update"] - updated["seconds/reference"]
    return {
        "iteration": iteration, "seconds": time.perf_counter() - started,
        "seconds/rollout": rolled["seconds/rollout"], "seconds/reference": updated["seconds/reference"],
        "seconds/update": update_seconds, "rollout_tokens_per_second": rolled["rollout/tokens_per_second"],
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "update_flops_per_second": 6 * parameters * positions_fed(layout, iteration) * params.grpo.mu / update_seconds,
        # rollout.engine: vllm: its sampling log-probs beside the trainer's (bf16 on both sides on a GPU)
        **{key: updated[key] for key in ("rollout/logprob_diff_mean", "rollout/logprob_diff_max") if key in updated},
    }


if __name__ == "__main__":
    main()
