"""Peak memory per stage at a user's first real shape, and how it grows with the vocabulary,
the completion length and the micro-batch size.

    python benchmarks/memory.py                 # ~15 min on 2 cores
    python benchmarks/memory.py --quick         # the 151,936 and 1,000 vocabularies only

The shape (benchmarks/workload.py): a Llama directory with hidden 256, 4 layers and a
vocabulary of 151,936 (Qwen2.5's), ChatML, GSM8K-style prompts of 150-300 tokens; 8 prompts x
G 8 per iteration, `rollout.max_new_tokens` 256 (an untrained model runs to the budget),
minibatch 32, mu 1, beta 0.04. Each point is one iteration of the stage functions (rollout,
reward, advantage, reference log-probs, update with its checkpoint) in a process of its own,
after `prepare` and `reference`; a thread samples the process's resident memory every 10 ms
and keeps the peak of each stage. Writes benchmarks/results/memory.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results"
SHAPE = ["rollout.prompts_per_iteration=8", "rollout.group_size=8", "grpo.minibatch_size=32", "grpo.mu=1",
         "grpo.beta=0.04", "grpo.iterations=1", "eval.max_new_tokens=16", "threads=2"]
POINTS = [  # (vocabulary, max_new_tokens, micro_batch_size)
    (151_936, 256, 0), (1_000, 256, 0), (32_000, 256, 0),
    (151_936, 64, 0), (151_936, 128, 0), (151_936, 256, 8),
]


class StagePeaks:
    """The resident memory's peak while each stage runs, sampled from /proc/self/statm."""

    def __init__(self, interval: float = 0.01) -> None:
        self.stage, self.peaks, self.seconds = "start", {}, {}
        self.page = os.sysconf("SC_PAGE_SIZE")
        self._started = time.perf_counter()
        threading.Thread(target=self._sample, args=(interval,), daemon=True).start()

    def rss_mib(self) -> float:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * self.page / 2**20

    def _sample(self, interval: float) -> None:
        while True:
            stage, rss = self.stage, self.rss_mib()
            self.peaks[stage] = max(self.peaks.get(stage, 0.0), rss)
            time.sleep(interval)

    def enter(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[self.stage] = self.seconds.get(self.stage, 0.0) + now - self._started
        self.peaks[self.stage] = max(self.peaks.get(self.stage, 0.0), self.rss_mib())
        self.stage, self._started = stage, now


def inputs_for(root: Path, vocabulary: int, overrides: list[str], hidden: int = 256, layers: int = 4) -> Path:
    """Prompts and reference for a model shape in `root`, through the real prepare and reference stages."""
    from stages.records.artifacts import Layout
    from stages.params import load_params
    from stages.prepare import prepare
    from stages.reference import reference
    from workload import gsm8k_style_prompts, model_directory

    if (Layout(root).reference / "config.json").is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    model = model_directory(root / "user-model", vocabulary, hidden=hidden, layers=layers)
    prompts = gsm8k_style_prompts(root / "prompts.jsonl")
    params = load_params(ROOT / "params.yaml", [*overrides, f"model.path={model}", f"data.source={prompts}"])
    prepare(params, Layout(root))
    reference(params, Layout(root))
    return root


def run_point(vocabulary: int, max_new_tokens: int, micro_batch_size: int, work: Path) -> dict:
    import shutil

    import torch

    import stages.update as update_module
    from stages.advantage import advantage
    from stages.records.artifacts import Layout
    from stages.params import load_params
    from stages.model.modeling import configure_threads, dtype_for, load_model, load_tokenizer
    from stages.reward import reward
    from stages.rollout import rollout
    from stages.update import TrainState, make_optimizer, update

    overrides = [*SHAPE, f"rollout.max_new_tokens={max_new_tokens}", f"grpo.micro_batch_size={micro_batch_size}"]
    inputs = inputs_for(work / f"v{vocabulary}", vocabulary, overrides)
    params = load_params(ROOT / "params.yaml", [*overrides, f"model.path={inputs / 'user-model'}",
                                                f"data.source={inputs / 'prompts.jsonl'}"])
    configure_threads(params)
    layout = Layout(work / f"run-{vocabulary}-{max_new_tokens}-{micro_batch_size}")
    shutil.rmtree(layout.root, ignore_errors=True)
    shutil.copytree(Layout(inputs).prompts, layout.prompts)
    shutil.copytree(Layout(inputs).reference, layout.reference)

    peaks = StagePeaks()
    peaks.enter("load")
    device = torch.device("cpu")
    model = load_model(layout.reference, params.model, device, dtype=torch.float32).eval()
    state = TrainState(model, load_tokenizer(layout.reference), make_optimizer(model, params))
    frozen = load_model(layout.reference, params.model, device, dtype=dtype_for(device)).eval()
    original = update_module.reference_logprobs

    def labelled_reference(*args, **kwargs):
        peaks.enter("reference")
        try:
            return original(*args, **kwargs)
        finally:
            peaks.enter("update")

    update_module.reference_logprobs = labelled_reference
    peaks.enter("rollout")
    rolled = rollout(params, layout, 1, state.model, state.tokenizer)
    peaks.enter("reward")
    reward(params.reward, layout, 1)
    peaks.enter("advantage")
    advantage(params.grpo, params.rollout.group_size, layout, 1)
    peaks.enter("update")
    update(params, layout, 1, state, frozen)
    peaks.enter("end")
    return {"vocabulary": vocabulary, "max_new_tokens": max_new_tokens, "micro_batch_size": micro_batch_size,
            "parameters": sum(p.numel() for p in model.parameters()),
            "mean_completion_length": float(rolled.get("completions/mean_length", float("nan"))),
            "peak_mib_by_stage": {k: round(v, 1) for k, v in peaks.peaks.items() if k not in ("start", "end")},
            "seconds_by_stage": {k: round(v, 2) for k, v in peaks.seconds.items() if k != "start"},
            "peak_mib": round(max(peaks.peaks.values()), 1)}


def plot(points: list[dict], target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = [("vocabulary (256 tokens)", [p for p in points if p["max_new_tokens"] == 256 and not p["micro_batch_size"]],
               "vocabulary"),
              ("max_new_tokens (151,936)", [p for p in points if p["vocabulary"] == 151_936 and not p["micro_batch_size"]],
               "max_new_tokens"),
              ("micro_batch_size (151,936, 256 tokens)",
               [p for p in points if p["vocabulary"] == 151_936 and p["max_new_tokens"] == 256], "micro_batch_size")]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for axis, (title, chosen, key) in zip(axes, sweeps):
        chosen = sorted(chosen, key=lambda p: p[key])
        for stage in ("load", "rollout", "reference", "update"):
            axis.plot([str(p[key]) for p in chosen], [p["peak_mib_by_stage"].get(stage, 0) / 1024 for p in chosen],
                      marker="o", label=stage)
        axis.set_title(title)
        axis.set_ylabel("peak RSS in the stage (GiB)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(target, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/grpo-memory"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", type=Path, default=RESULTS / "memory.json")
    parser.add_argument("--point", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        print("@result " + json.dumps(run_point(*args.point, args.work)), flush=True)
        return
    points = []
    for point in POINTS[:2] if args.quick else POINTS:
        result = subprocess.run([sys.executable, __file__, "--work", str(args.work), "--point", *map(str, point)],
                                capture_output=True, text=True)
        lines = [line for line in result.stdout.splitlines() if line.startswith("@result ")]
        if result.returncode or not lines:
            raise SystemExit(f"point {point} failed: {result.stderr[-3000:]}")
        points.append(json.loads(lines[0].removeprefix("@result ")))
        print(json.dumps(points[-1]), flush=True)
    by = {(p["vocabulary"], p["max_new_tokens"], p["micro_batch_size"]): p for p in points}
    summary = {"peak_151936_over_1000": by[(151_936, 256, 0)]["peak_mib"] / by[(1_000, 256, 0)]["peak_mib"]}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"shape": SHAPE, "points": points, **summary}, indent=2) + "\n")
    plot(points, args.output.with_suffix(".png"))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
