"""How the cost of one GRPO iteration grows: seconds per iteration and peak memory as G,
max_new_tokens and the model size grow, one factor at a time from the default config.

    python benchmarks/scaling.py --iterations 8 --warmup 2

Three sweeps, each point its own process (so peak RSS is its own), our stages end to end
(rollout → reward → advantage → update, artefacts on disk) as in benchmarks/vs_trl.py. All
points are started together and held between iterations, which go round-robin (one of each
point, then again, the order reversed every other round), so a slow minute on this shared
machine lands on every point alike instead of on whichever ran then:
- G (rollout.group_size) 4, 8, 16 on the pipeline's SFT reference (the default prompts and
  model): completions stop where the model ends them, as in a real run.
- max_new_tokens 32, 64, 128 and the model size (the default tiny shape, 4x and 16x its
  parameters: width x2, then also depth x4) on untrained models of those shapes whose
  completions are made to run to the budget (eos ignored), so the cost of the tokens and
  of the parameters is measured rather than how soon a model stops. The shared point
  (default shape, 32 tokens) is run once.
Also reports the update's achieved FLOP/s (6 * parameters * tokens processed / seconds)
against this machine's fp32 matmul peak. Writes benchmarks/results/scaling.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from vs_trl import (ROOT, RESULTS, matmul_peak_flops, our_iterations, prepare_inputs, report_done,  # noqa: E402
                    run_lockstep, wait_for_go, wait_for_the_end, warn_if_busy)

G_VALUES = [4, 8, 16]
TOKEN_VALUES = [32, 64, 128]
# name -> (hidden x, intermediate x, layers x); heads grow with the width (head size kept)
SIZES = {"1x": (1, 1, 1), "4x": (2, 2, 1), "16x": (2, 2, 4)}


def points(base) -> list[dict]:
    """Every run of the three sweeps: its overrides, model source and whether eos is ignored."""
    tiny = base.model.tiny
    out = [{"sweep": "group_size", "value": g, "model": "sft", "overrides": [f"rollout.group_size={g}"]}
           for g in G_VALUES]
    for name, (width, ffn, depth) in SIZES.items():
        shape = {"hidden_size": tiny.hidden_size * width, "intermediate_size": tiny.intermediate_size * ffn,
                 "num_layers": tiny.num_layers * depth, "num_heads": tiny.num_heads * width,
                 "max_position_embeddings": 256}
        for tokens in (TOKEN_VALUES if name == "1x" else [TOKEN_VALUES[0]]):
            out.append({"sweep": "size+tokens", "value": {"size": name, "max_new_tokens": tokens},
                        "model": name, "shape": shape,
                        "overrides": [f"rollout.max_new_tokens={tokens}",
                                      *[f"model.tiny.{k}={v}" for k, v in shape.items()]]})
    return out


def untrained_inputs(work: Path, inputs: Path, shape: dict, name: str, seed: int) -> Path:
    """The default prompts with an untrained tiny model of `shape` as the reference."""
    from stages.records.artifacts import Layout, value_digest
    from stages.config import TinyModel
    from stages.model.modeling import build_tiny_model, build_tokenizer, save_model

    layout = Layout(work / f"untrained-{name}-{value_digest([shape, seed, str(inputs)])[:12]}")
    if (layout.reference / "config.json").is_file():
        return layout.root
    shutil.copytree(Layout(inputs).prompts, layout.prompts, dirs_exist_ok=True)
    tokenizer = build_tokenizer()
    save_model(build_tiny_model(TinyModel(**shape), tokenizer, seed), tokenizer, layout.reference)
    return layout.root


def run_point(args: argparse.Namespace) -> dict:
    """One point, in this process: `args.iterations` iterations of our stages."""
    from stages.params import load_params

    if args.ignore_eos:  # completions run to the budget: measure the tokens, not the model's habits
        import stages.rollout

        stages.rollout.eos_token_ids = lambda model, tokenizer: []
    params = load_params(args.params, [*args.set, f"grpo.iterations={args.iterations}"])
    return our_iterations(params, Path(args.inputs), Path(args.scratch), ready=lambda: print("@ready", flush=True),
                          before=lambda i: wait_for_go(), after=lambda i, row: report_done(args.label, i, row))


def label(point: dict) -> str:
    value = point["value"]
    return f"G={value}" if point["sweep"] == "group_size" else f"{value['size']}-{value['max_new_tokens']}tok"


def summarise(run: dict, warmup: int, peak: float) -> dict:
    rows = run["iterations"][warmup:]
    median = lambda key: statistics.median(row[key] for row in rows)  # noqa: E731
    update_seconds = median("update") - median("checkpoint")
    flops = 6 * run["parameters"] * median("update_tokens_processed") / update_seconds
    return {
        "seconds_per_iteration": median("seconds"),
        "split_seconds": {key: median(key) for key in ("generation", "scoring", "reference", "update", "checkpoint")},
        "peak_rss_mib": run["peak_rss_mib"],
        "rss_after_imports_mib": run["rss_after_imports_mib"],
        "parameters": run["parameters"],
        "mean_completion_length": median("mean_length"),
        "rollout_tokens_per_second": median("rollout_tokens_per_second"),
        "update_flops_per_second": flops,
        "update_fraction_of_matmul_peak": flops / peak,
        "seconds_per_iteration_all": [row["seconds"] for row in run["iterations"]],
    }


def plot(result: dict, target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = [
        ("G (SFT reference)", [p for p in result["points"] if p["sweep"] == "group_size"], lambda p: p["value"]),
        ("max_new_tokens (untrained, full budget)",
         [p for p in result["points"] if p["sweep"] == "size+tokens" and p["value"]["size"] == "1x"],
         lambda p: p["value"]["max_new_tokens"]),
        ("parameters (untrained, 32 tokens)",
         [p for p in result["points"] if p["sweep"] == "size+tokens" and p["value"]["max_new_tokens"] == 32],
         lambda p: f"{p['value']['size']} ({p['parameters'] / 1e6:.1f}M)"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    for column, (title, chosen, x_of) in enumerate(sweeps):
        x = [x_of(p) for p in chosen]
        bottom = [0.0] * len(chosen)
        for key in ("generation", "scoring", "reference", "update"):
            heights = [p["split_seconds"][key] for p in chosen]
            axes[0][column].bar([str(v) for v in x], heights, bottom=bottom, label=key)
            bottom = [b + h for b, h in zip(bottom, heights)]
        axes[0][column].set_title(title)
        axes[0][column].set_ylabel("median s / iteration")
        axes[1][column].plot([str(v) for v in x], [p["peak_rss_mib"] for p in chosen], marker="o")
        axes[1][column].set_ylabel("peak RSS (MiB)")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(target, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params override")
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="iterations left out of the medians")
    parser.add_argument("--work", type=Path, help="where prompts and models are made (kept for reuse)")
    parser.add_argument("--output", type=Path, default=RESULTS / "scaling.json")
    parser.add_argument("--point", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    parser.add_argument("--ignore-eos", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--label", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.point:
        result = run_point(args)
        wait_for_the_end()
        Path(args.out).write_text(json.dumps(result))
        return

    from stages.params import load_params

    print("command: python benchmarks/scaling.py", " ".join(sys.argv[1:]), flush=True)
    load_before = warn_if_busy()
    started = time.perf_counter()
    base = load_params(args.params, args.set)
    work = args.work or Path(tempfile.gettempdir()) / "grpo-vs-trl"  # shares vs_trl.py's prompts and reference
    work.mkdir(parents=True, exist_ok=True)
    inputs = prepare_inputs(args.params, args.set, work, None, None)
    threads = base.threads or os.cpu_count() or 1  # configure_threads' choice
    peak = matmul_peak_flops(threads)

    scratch = Path(tempfile.mkdtemp(prefix="scale-", dir=work))
    commands = {}
    for point in points(base):
        untrained = point["model"] != "sft"
        source = untrained_inputs(work, inputs, point["shape"], point["model"], base.seed) if untrained else inputs
        name = label(point)
        (scratch / name).mkdir()
        commands[name] = [sys.executable, __file__, "--point", "--label", name, "--params", str(args.params),
                          "--inputs", str(source), "--scratch", str(scratch / name), "--iterations",
                          str(args.iterations), "--out", str(scratch / f"{name}.json"),
                          *(["--ignore-eos"] if untrained else []),
                          *[f"--set={kv}" for kv in [*args.set, *point["overrides"]]]]
    run_lockstep(commands, args.iterations, scratch)
    peak = max(peak, matmul_peak_flops(threads))  # measured twice: a busy moment understates the ceiling

    results = []
    for point, name in zip(points(base), commands):
        results.append({**point, **summarise(json.loads((scratch / f"{name}.json").read_text()), args.warmup, peak)})
        r = results[-1]
        print(f"{name}: {r['seconds_per_iteration']:.3f} s/iteration, peak RSS {r['peak_rss_mib']:.0f} MiB, "
              f"{r['parameters']:,} parameters, update {r['update_flops_per_second'] / 1e9:.1f} GFLOP/s "
              f"({100 * r['update_fraction_of_matmul_peak']:.0f}% of peak)", flush=True)
    shutil.rmtree(scratch, ignore_errors=True)

    result = {
        "command": " ".join(["python", "benchmarks/scaling.py", *sys.argv[1:]]),
        "iterations": args.iterations, "warmup": args.warmup,
        "matmul_peak_flops_per_second": peak,
        "threads": base.threads or os.cpu_count(),
        "load_average_before_after": [load_before, list(os.getloadavg())],
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "notes": ("G sweep: the pipeline's SFT reference, completions end when the model ends them. Token and "
                  "size sweeps: untrained models of each shape (max_position_embeddings 256) with eos ignored, so "
                  "every completion uses the whole max_new_tokens budget. Sizes: 4x = hidden, intermediate and "
                  "heads x2; 16x = that and layers x4. Medians over the iterations after the warm-up. Update "
                  "FLOP/s: 6 * parameters * tokens its forward passes process (each distinct prompt once per "
                  "minibatch, completions padded to the minibatch's longest), mu times, per update second "
                  "(checkpoint write excluded)."),
        "points": results,
        "seconds_total": time.perf_counter() - started,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.output.with_suffix(".png"))
    print(f"wrote {args.output} and {args.output.with_suffix('.png')} in {result['seconds_total']:.0f} s")


if __name__ == "__main__":
    main()
