"""Rewards from models, measured: a reward model and a judge scoring one default iteration's
completions (16 prompts x G 8), in process and on 2 `reward.workers`, side by side in one run.

    python benchmarks/reward_models.py --repeats 3

The reward model is a `LlamaForSequenceClassification` at the realistic workload's shape
(hidden 256, 4 layers, Qwen2.5's 151,936-entry vocabulary; random weights: speed and memory do
not depend on what it learned); the judge the same body as a causal LM, replying 8 tokens.
Reports completions/s (median of --repeats, arms interleaved), the scoring process's load time
and peak memory (VmHWM), and checks that both layouts give the same bits.
Writes benchmarks/results/reward_models.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from flows.cluster import ray_session, score_in_parallel  # noqa: E402
from model_rewards import JUDGE_TEMPLATE, examples  # noqa: E402
from stages.params import load_params  # noqa: E402
from stages.reward import score_rollouts  # noqa: E402
from stages.rewards.scoring import scoring_process  # noqa: E402
from workload import build_tokenizer  # noqa: E402


def model_dirs(folder: Path, vocabulary: int) -> tuple[Path, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    tokenizer = build_tokenizer(vocabulary)
    shape = dict(vocab_size=vocabulary, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, intermediate_size=1024, max_position_embeddings=1024,
                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    made = []
    for name, cls, extra in (("rm", LlamaForSequenceClassification, {"num_labels": 1}),
                             ("judge", LlamaForCausalLM, {})):
        target = folder / name
        cls(LlamaConfig(**shape, **extra)).save_pretrained(target)
        tokenizer.save_pretrained(target)
        made.append(target)
    return made[0], made[1]


def completions(prompts: int, group: int) -> pd.DataFrame:
    rows = examples(prompts * group, seed=5)
    return pd.DataFrame({"prompt_id": [f"p{n // group}" for n in range(len(rows))],
                         "sample": [n % group for n in range(len(rows))], "prompt": [p for p, _, _ in rows],
                         "answer": ["0"] * len(rows), "completion": [c for _, c, _ in rows]})


def peak_memory_gib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2 ** 20
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocabulary", type=int, default=151_936)
    args = parser.parse_args()
    torch.set_num_threads(2)  # the trainer's threads: the in-process scoring process takes as many
    rm, judge = model_dirs(Path(tempfile.mkdtemp()), args.vocabulary)
    frame = completions(16, 8)
    components = {
        "reward model": [f"reward.models.rm={{path: {rm}, batch_size: 8}}", "reward.weights={rm: 1.0}"],
        "judge": [f"reward.judges.judge={{model: {judge}, template: '{JUDGE_TEMPLATE}', chat: false, "
                  f"unparsed: abstain, batch_size: 16}}", "reward.weights={judge: 1.0}"],
    }
    results = {}
    for component, overrides in components.items():
        params = load_params(ROOT / "params.yaml", [*overrides, "reward.workers=2"])
        started = time.perf_counter()
        process = scoring_process(params.reward)  # starts it: imports, and loads the model
        load_seconds = time.perf_counter() - started
        with ray_session(params.distributed, cpus=2):
            score_in_parallel(2)(frame, params.reward, 8, "bench")  # start the scorers and load their models
            times: dict[str, list[float]] = {"in process": [], "2 workers": []}
            for _ in range(args.repeats):  # interleaved: a slow moment lands on both arms
                started = time.perf_counter()
                here = score_rollouts(frame, params.reward, 8, "bench")
                times["in process"].append(time.perf_counter() - started)
                started = time.perf_counter()
                spread = score_in_parallel(2)(frame, params.reward, 8, "bench")
                times["2 workers"].append(time.perf_counter() - started)
                assert here.equals(spread), "the layouts scored differently"
        medians = {arm: statistics.median(values) for arm, values in times.items()}
        results[component] = {
            "completions_per_second": {arm: len(frame) / seconds for arm, seconds in medians.items()},
            "seconds_per_iteration": medians,
            "load_seconds": load_seconds,
            "scoring_process_peak_gib": peak_memory_gib(process.process.pid),
            "layouts_equal": True,
        }
        print(component, json.dumps(results[component]), flush=True)
    out = ROOT / "benchmarks" / "results" / "reward_models.json"
    out.write_text(json.dumps({"completions": len(frame), "repeats": args.repeats, "vocabulary": args.vocabulary,
                               "shape": "hidden 256, 4 layers, fp32", "threads": "in process 2; 1 per worker",
                               "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
