"""Our GRPO iteration against TRL's `GRPOTrainer` on the same model, prompts and settings.

    python benchmarks/vs_trl.py --iterations 30 --warmup 3 --repeats 2

Needs the bench extra (`pip install -e '.[bench]'`: TRL 1.16). Both arms start from the same
reference model and see the same prompts in the same order: ours through the stage functions
(`rollout → reward → advantage → update`, artefacts written as in a real run), TRL through
`GRPOTrainer.train()` with every setting matched to params.yaml (see `trl_config`; what cannot
be matched exactly is listed in the results under `matching`). Each arm runs in its own
process (so peak RSS is its own); both processes are started together and held between
iterations, which alternate one by one (ours 1, TRL 1, TRL 2, ours 2, ...), so load from
elsewhere hits both alike; repeat r uses seed + r. One TRL "iteration" is one generation batch:
prompts_per_iteration * G completions, then mu passes of (completions / minibatch) optimizer
steps, the same work as one of our iterations.

Per arm: median seconds per iteration after the warm-up, its split into generation /
scoring / reference log-probs / update, rollout tokens per second, peak RSS, mean reward and
accuracy per iteration, and the update's achieved FLOP/s (6 * parameters * tokens / s)
against this machine's fp32 matmul peak; and the work-skipping bound: the speedup over TRL
that doing only our work at TRL's cost per position would give. Writes
benchmarks/results/vs_trl.{json,png}. `--set compile=true --trl-torch-compile` compiles both.
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
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
# Our loss_agg → TRL loss_type with the same normaliser per optimizer step (the same names: our
# bnpo divides by the step's tokens, our dapo by the iteration's tokens per step, as TRL's do).
TRL_LOSS_TYPE = {"grpo": "grpo", "bnpo": "bnpo", "dapo": "dapo", "dr_grpo": "dr_grpo"}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def matmul_peak_flops(threads: int, size: int = 2048, repeats: int = 5) -> float:
    """Best fp32 FLOP/s of a square torch.mm at `threads` intra-op threads: the ceiling the update can reach."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm-up: allocations, thread pool
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    torch.set_num_threads(previous)
    return 2 * size**3 / best


# --- inputs -----------------------------------------------------------------------------


def prepare_inputs(params_file: Path, overrides: list[str], work: Path,
                   reference: Path | None, prompts: Path | None) -> Path:
    """A root holding data/prompts/ and models/reference/: the given ones, or made by the pipeline's stages.

    Made ones are kept in `work`, keyed by the params that shape them, and reused.
    """
    from stages.records.artifacts import Layout, value_digest
    from stages.params import load_params

    if reference is not None or prompts is not None:
        if reference is None or prompts is None:
            raise SystemExit("--reference and --prompts go together")
        layout = Layout(work / "inputs-given")
        for target, source in ((layout.prompts, prompts), (layout.reference, reference)):
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source, target)
        return layout.root
    params = load_params(params_file, overrides)
    shaping = {key: params.model_dump(mode="json")[key] for key in ("seed", "data", "model", "sft")}
    layout = Layout(work / f"inputs-{value_digest(shaping)[:12]}")
    if (layout.reference / "config.json").is_file() and layout.prompt_split("train").is_file():
        print(f"reusing {layout.root} (prompts and reference)")
        return layout.root
    from stages.prepare import prepare
    from stages.reference import reference as make_reference

    print("prepare:", prepare(params, layout))
    print("reference:", make_reference(params, layout))
    return layout.root


def arm_params(args: argparse.Namespace):
    from stages.params import load_params

    return load_params(args.params, [*args.set, f"seed={args.seed}", f"grpo.iterations={args.iterations}"])


def iteration_prompts(params, inputs: Path):
    """The prompts of iterations 1..N in the order our rollout stage draws them."""
    import pandas as pd

    from stages.records.artifacts import Layout
    from stages.rollout import choose_prompts

    train = pd.read_parquet(Layout(inputs).prompt_split("train"))
    frames = [choose_prompts(train, params.rollout.prompts_per_iteration, params.seed, i)
              for i in range(1, params.grpo.iterations + 1)]
    return pd.concat(frames, ignore_index=True)


# --- lockstep: the arms' iterations alternate one by one ----------------------------------
# Each arm waits for a "go" line on stdin before every iteration and reports "@done" on
# stdout after it, so a burst of load from elsewhere lands on an iteration of each arm alike.


def wait_for_go() -> None:
    sys.stdin.readline()


def wait_for_the_end() -> None:
    """Hold until the driver closes stdin: an arm that exits (writes its results, tears down)
    while another runs its last iteration would slow that iteration."""
    while sys.stdin.readline():
        pass


def report_done(arm: str, iteration: int, row: dict) -> None:
    print(f"@done {arm} {iteration:3d}: {row['seconds']:.3f}s reward {row['reward']:.3f} "
          f"accuracy {row['accuracy']:.3f}", flush=True)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


# --- arm: our stages --------------------------------------------------------------------


def our_iterations(params, inputs: Path, root: Path, *, ready=lambda: None, before=lambda i: None,
                   after=lambda i, row: None) -> dict:
    """`params.grpo.iterations` iterations of our stages from `inputs`' prompts and reference, in `root`."""
    import pandas as pd
    import torch

    import stages.update as update_module
    from stages.advantage import advantage
    from stages.records.artifacts import Layout
    from stages.model.modeling import compile_forward, configure_threads, load_model, load_tokenizer, resolve_device
    from stages.reward import reward
    from stages.rollout import rollout
    from stages.update import TrainState, make_optimizer, update

    configure_threads(params)
    rss_after_imports = peak_rss_mib()
    source, layout = Layout(inputs), Layout(root)
    # Copies, not links: a Layout refuses directories that resolve outside its root.
    shutil.copytree(source.prompts, layout.prompts)
    shutil.copytree(source.reference, layout.reference)

    device = resolve_device(params)
    model = load_model(layout.reference, params.model, device, dtype=torch.float32).eval()
    state = TrainState(model, load_tokenizer(layout.reference), make_optimizer(model, params))
    reference = load_model(layout.reference, params.model, device).eval() if params.grpo.beta else None
    if params.compile:  # as flows/train.py does
        for compiled in (model, reference):
            if compiled is not None:
                compile_forward(compiled)

    # Measured on the side: the checkpoint write (part of our update stage) and the tokens the
    # update's forward passes really process (each distinct prompt once per minibatch).
    checkpoint_seconds: list[float] = []
    processed = [0, 0]  # the update's positions, the reference's
    save, logprobs = update_module.save_checkpoint, update_module.shared_prompt_logprobs

    def timed_save(*a, **k):
        started = time.perf_counter()
        save(*a, **k)
        checkpoint_seconds.append(time.perf_counter() - started)

    def counted_logprobs(model_, prompt_ids, prompt_mask, completion_ids, completion_mask, *a, **k):
        # Positions fed, padding included, as for TRL: the update's (under grad) and the reference's.
        prompts = len(torch.unique(torch.cat([prompt_ids, prompt_mask], 1), dim=0))
        rows, width = completion_ids.shape
        shared = prompts < rows
        processed[0 if torch.is_grad_enabled() else 1] += (
            (prompts if shared else rows) * prompt_ids.shape[1] + rows * (width - shared))
        return logprobs(model_, prompt_ids, prompt_mask, completion_ids, completion_mask, *a, **k)

    update_module.save_checkpoint, update_module.shared_prompt_logprobs = timed_save, counted_logprobs

    iterations = []
    ready()
    for iteration in range(1, params.grpo.iterations + 1):
        before(iteration)
        processed[:] = [0, 0]
        t0 = time.perf_counter()
        rolled = rollout(params, layout, iteration, state.model, state.tokenizer)
        t1 = time.perf_counter()
        rewarded = reward(params.reward, layout, iteration)
        advantage(params.grpo, params.rollout.group_size, layout, iteration)
        t2 = time.perf_counter()
        updated = update(params, layout, iteration, state, reference)
        t3 = time.perf_counter()
        rollouts = pd.read_parquet(layout.iteration(iteration) / "rollouts.parquet",
                                   columns=["prompt_ids", "completion_length"])
        completion_tokens = int(rollouts["completion_length"].sum())
        iterations.append({
            "seconds": t3 - t0,
            "generation": t1 - t0,
            "scoring": t2 - t1,
            "reference": updated["seconds/reference"],
            "old_logprobs": 0.0,  # kept from generation, never recomputed
            "prep": 0.0,
            "update": (t3 - t2) - updated["seconds/reference"],
            "checkpoint": checkpoint_seconds[-1],
            "completion_tokens": completion_tokens,
            "update_tokens": params.grpo.mu * (completion_tokens + int(rollouts["prompt_ids"].map(len).sum())),
            "update_tokens_processed": processed[0],
            "reference_tokens_processed": processed[1],
            "rollout_tokens_per_second": completion_tokens / (t1 - t0),
            "reward": rewarded["reward"],
            "accuracy": rewarded["rewards/accuracy"],
            "mean_length": rolled["completions/mean_length"],
            "kl": updated.get("kl"),
        })
        after(iteration, iterations[-1])
    return {"arm": "ours", "parameters": count_parameters(model), "threads": torch.get_num_threads(),
            "rss_after_imports_mib": rss_after_imports, "peak_rss_mib": peak_rss_mib(), "iterations": iterations}


def run_ours(args: argparse.Namespace) -> dict:
    return our_iterations(arm_params(args), Path(args.inputs), Path(args.scratch), ready=lambda: print("@ready", flush=True),
                          before=lambda i: wait_for_go(), after=lambda i, row: report_done("ours", i, row))


# --- arm: TRL ---------------------------------------------------------------------------


def trl_config(params, output_dir: str, torch_compile: bool = False) -> tuple[dict, dict]:
    """GRPOConfig keyword arguments matched to our params, and how each was matched."""
    cfg, rollout = params.grpo, params.rollout
    completions = rollout.prompts_per_iteration * rollout.group_size
    steps_per_generation = completions // cfg.minibatch_size
    kwargs = dict(
        output_dir=output_dir,
        num_generations=rollout.group_size,
        per_device_train_batch_size=cfg.minibatch_size,
        gradient_accumulation_steps=1,
        steps_per_generation=steps_per_generation,
        num_iterations=cfg.mu,
        max_completion_length=rollout.max_new_tokens,
        temperature=rollout.temperature,
        top_p=rollout.top_p,
        top_k=0,
        learning_rate=cfg.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        beta=cfg.beta,
        epsilon=cfg.eps_low,
        epsilon_high=cfg.eps_high,
        loss_type=TRL_LOSS_TYPE[cfg.loss_agg],
        scale_rewards=cfg.scale_rewards,
        reward_weights=[params.reward.weights[name] for name in params.reward.weights],
        max_steps=cfg.iterations * steps_per_generation * cfg.mu,
        seed=params.seed,
        shuffle_dataset=False,
        bf16=False,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        mask_truncated_completions=cfg.mask_truncated_completions,
        logging_steps=steps_per_generation * cfg.mu,  # once per generation
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        torch_compile=torch_compile,
    )
    matching = {
        "G": f"num_generations={rollout.group_size}",
        "prompts per iteration": (f"generation_batch_size = per_device_train_batch_size ({cfg.minibatch_size}) x "
                                  f"steps_per_generation ({steps_per_generation}) = {completions} completions "
                                  f"= {rollout.prompts_per_iteration} prompts x G"),
        "minibatch": (f"per_device_train_batch_size={cfg.minibatch_size}, gradient_accumulation_steps=1: one "
                      "optimizer step per minibatch, as ours"),
        "mu": (f"num_iterations={cfg.mu}; one TRL iteration = steps_per_generation x num_iterations = "
               f"{steps_per_generation * cfg.mu} optimizer steps, as ours"),
        "minibatch order": (
            "not matched: TRL shuffles a generation batch's completions once and reuses those minibatches for "
            "every pass; ours " + (
                "keeps each prompt's G completions in one minibatch and shuffles the groups afresh each pass "
                "(grpo.minibatches=groups, verl's layout), so each prompt's forward is shared by all its completions"
                if cfg.minibatches == "groups" else
                "shuffles the completions afresh each pass (grpo.minibatches=completions)"
            ) + ". Either way every completion is seen once per pass, in the same number of optimizer steps"),
        "logp_old": ("TRL recomputes it with a forward pass of the policy before the first step "
                     "(gradient_accumulation_steps % (steps_per_generation * num_iterations) != 0); ours keeps "
                     "the sampler's log-probs from generation. Same values (tests/test_generation.py: 1e-5)"),
        "max_new_tokens": f"max_completion_length={rollout.max_new_tokens}",
        "sampling": (f"temperature={rollout.temperature}, top_p={rollout.top_p}, top_k=0 (no top-k), no "
                     "repetition penalty; the same eos ids (tokenizer eos + generation_config eos). Random draws "
                     "differ: HF generate samples from the global torch RNG (seeded by `seed`), ours from a "
                     "per-iteration generator"),
        "prompts": ("the same prompts in the same order: the dataset is our rollout stage's draws for "
                    "iterations 1..N concatenated, shuffle_dataset=False; prompt text = our prompt_text() "
                    "(prompt + newline, no chat template), so both tokenize identically"),
        "lr": f"learning_rate={cfg.lr}, lr_scheduler_type=constant, warmup_steps=0",
        "optimizer": (f"fused torch.optim.AdamW(lr={cfg.lr}, weight_decay={cfg.weight_decay}, betas 0.9/0.999, "
                      "eps 1e-8) built by our make_optimizer and passed as `optimizers=`: the very same optimizer "
                      "in both arms, and what TRL builds by default (optim=adamw_torch_fused) except that TRL "
                      "would exempt biases and norms from weight decay; max_grad_norm="
                      f"{cfg.max_grad_norm} in both"),
        "beta": f"beta={cfg.beta} (TRL also skips its reference model at 0)",
        "eps": f"epsilon={cfg.eps_low}, epsilon_high={cfg.eps_high}",
        "loss aggregation": (f"loss_agg={cfg.loss_agg} -> loss_type={TRL_LOSS_TYPE[cfg.loss_agg]} (same "
                             "normalisation per optimizer step)"),
        "scale_rewards": f"scale_rewards={cfg.scale_rewards} (std eps 1e-4 in both)",
        "rewards": ("our registry's functions (accuracy, format, language) passed as reward_funcs with "
                    "reward_weights from params.yaml; TRL's calling convention, unchanged"),
        "precision": "fp32 in both: bf16=False, fp16=False, use_cpu=True",
        "memory savers": ("gradient_checkpointing=False: TRL's default is True, which recomputes the forward in "
                          "the backward; ours never checkpoints, so both do the same work"),
        "seed": f"seed={params.seed} (+ repeat index)",
        "compile": (f"ours compile={params.compile} (the policy's and reference's forward through torch.compile); "
                    f"TRL torch_compile={torch_compile} (--trl-torch-compile: the Trainer compiles the model it "
                    "trains)"),
        "threads": ("torch.set_num_threads as our configure_threads (params.threads; 0 = one per core) in both "
                    "arms, which inherit this process's environment (OMP_WAIT_POLICY included)"),
        "iterations interleaved": ("both arms run at once in their own processes, held between iterations: "
                                   "ours 1, TRL 1, TRL 2, ours 2, ... so load from elsewhere hits both alike"),
        "logging": "logging_steps = one per iteration, report_to none, no checkpoints (save_strategy=no)",
        "artefacts": ("ours writes every iteration's parquet files, update.json and a checkpoint (model + "
                      "optimizer) to disk as the pipeline does, inside the timed iteration; TRL writes nothing"),
    }
    return kwargs, matching


def run_trl(args: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from stages.records.artifacts import Layout
    from stages.model.modeling import configure_threads, load_model, load_tokenizer, prompt_text, resolve_device
    from stages.rewards.rules import resolve
    from stages.update import make_optimizer

    params = arm_params(args)
    configure_threads(params)
    rss_after_imports = peak_rss_mib()
    inputs = Layout(Path(args.inputs))
    tokenizer = load_tokenizer(inputs.reference)
    model = load_model(inputs.reference, params.model, resolve_device(params), dtype=torch.float32)
    prompts = iteration_prompts(params, inputs.root)
    dataset = Dataset.from_dict({
        "prompt": [prompt_text(tokenizer, p) for p in prompts["prompt"]],
        "answer": prompts["answer"].tolist(),
        "prompt_id": prompts["prompt_id"].tolist(),
        "target_language": [params.reward.target_language] * len(prompts),
    })
    rewards = resolve(params.reward.weights, params.reward.custom)
    kwargs, _ = trl_config(params, args.scratch, args.trl_torch_compile)
    config = GRPOConfig(**kwargs)
    steps_per_iteration = config.steps_per_generation * config.num_iterations

    clock: dict[str, float] = {}
    record: list[dict] = []

    def timed(name: str, fn, after=None):
        def wrapper(*a, **k):
            started = time.perf_counter()
            out = fn(*a, **k)
            clock[name] = clock.get(name, 0.0) + time.perf_counter() - started
            if after is not None:
                after(out)
            return out
        return wrapper

    class IterationClock(TrainerCallback):
        """Times each iteration (steps_per_iteration optimizer steps) and holds the next until told to go."""

        def on_train_begin(self, *_, **__):
            print("@ready", flush=True)
            wait_for_go()
            self.started = time.perf_counter()

        def on_step_end(self, _args, state, *_, **__):
            if state.global_step % steps_per_iteration:
                return
            record.append({"seconds": time.perf_counter() - self.started, **clock})
            clock.clear()
            report_done("trl", len(record), record[-1])
            if state.global_step < state.max_steps:
                wait_for_go()
            self.started = time.perf_counter()

    trainer = GRPOTrainer(model=model, reward_funcs=list(rewards.values()), args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[IterationClock()],
                          optimizers=(make_optimizer(model, params), None))
    torch.set_num_threads(torch.get_num_threads())  # accelerate leaves it alone; stated for the reader

    def count_tokens(out):
        _, completion_ids, *_ = out
        clock["completion_tokens"] = clock.get("completion_tokens", 0) + sum(len(c) for c in completion_ids)

    def keep_rewards(rewards_per_func):
        weights = torch.tensor(config.reward_weights)
        clock["reward"] = float((rewards_per_func.nan_to_num(0.0) * weights).sum(-1).mean())
        clock["accuracy"] = float(rewards_per_func[:, list(rewards).index("accuracy")].nanmean())

    def per_token_logps(fn):
        def wrapper(model_, input_ids, attention_mask, logits_to_keep, *a, **k):
            started = time.perf_counter()
            out = fn(model_, input_ids, attention_mask, logits_to_keep, *a, **k)
            if torch.is_grad_enabled():  # the loss's forward: part of the update
                return out
            name = "reference" if model_ is trainer.ref_model else "old_logprobs"
            clock[name] = clock.get(name, 0.0) + time.perf_counter() - started
            return out
        return wrapper

    def count_update_tokens(out):
        tokens = int(out["prompt_mask"].sum() + out["completion_mask"].sum())
        clock["update_tokens"] = clock.get("update_tokens", 0) + tokens * config.num_iterations
        # What its forward passes process: every row at the generation batch's full width.
        width = out["prompt_ids"].shape[1] + out["completion_ids"].shape[1]
        clock["update_tokens_processed"] = len(out["prompt_ids"]) * width * config.num_iterations
        clock["reference_tokens_processed"] = len(out["prompt_ids"]) * width if trainer.ref_model is not None else 0

    trainer._generate = timed("generation", trainer._generate, after=count_tokens)
    trainer._calculate_rewards = timed("scoring", trainer._calculate_rewards, after=keep_rewards)
    trainer._get_per_token_logps_and_entropies = per_token_logps(trainer._get_per_token_logps_and_entropies)
    trainer._generate_and_score_completions = timed("generate_and_score", trainer._generate_and_score_completions,
                                                    after=count_update_tokens)
    trainer.train()

    iterations = []
    for i, r in enumerate(record, start=1):
        inside = r["generation"] + r["scoring"] + r.get("reference", 0.0) + r.get("old_logprobs", 0.0)
        row = {
            "seconds": r["seconds"],
            "generation": r["generation"],
            "scoring": r["scoring"],
            "reference": r.get("reference", 0.0),
            "old_logprobs": r.get("old_logprobs", 0.0),
            "prep": r["generate_and_score"] - inside,  # padding, advantages, metrics inside TRL's rollout step
            "update": r["seconds"] - r["generate_and_score"],
            "checkpoint": 0.0,
            "completion_tokens": r["completion_tokens"],
            "update_tokens": r["update_tokens"],
            "update_tokens_processed": r["update_tokens_processed"],
            "reference_tokens_processed": r["reference_tokens_processed"],
            "rollout_tokens_per_second": r["completion_tokens"] / r["generation"],
            "reward": r["reward"],
            "accuracy": r["accuracy"],
            "mean_length": r["completion_tokens"] / (params.rollout.prompts_per_iteration * params.rollout.group_size),
        }
        iterations.append(row)
    return {"arm": "trl", "parameters": count_parameters(model), "threads": torch.get_num_threads(),
            "rss_after_imports_mib": rss_after_imports, "peak_rss_mib": peak_rss_mib(), "iterations": iterations}


# --- the side-by-side run ---------------------------------------------------------------

SPLIT = ["generation", "scoring", "reference", "old_logprobs", "prep", "update"]


def summarise(runs: list[dict], warmup: int, peak: float) -> dict:
    rows = [row for run in runs for row in run["iterations"][warmup:]]
    median = lambda key: statistics.median(row[key] for row in rows)  # noqa: E731
    parameters = runs[0]["parameters"]
    update_seconds = median("update") - statistics.median(row["checkpoint"] for row in rows)
    update_tokens = median("update_tokens")
    achieved = 6 * parameters * median("update_tokens_processed") / update_seconds
    count = len(runs[0]["iterations"])
    curve = lambda key: [statistics.fmean(run["iterations"][i][key] for run in runs) for i in range(count)]  # noqa: E731
    return {
        "median_seconds_per_iteration": median("seconds"),
        "seconds_per_iteration_per_repeat": [statistics.median(r["seconds"] for r in run["iterations"][warmup:])
                                             for run in runs],
        "median_split_seconds": {key: median(key) for key in [*SPLIT, "checkpoint"]},
        "rollout_tokens_per_second": median("rollout_tokens_per_second"),
        "peak_rss_mib": max(run["peak_rss_mib"] for run in runs),
        "rss_after_imports_mib": max(run["rss_after_imports_mib"] for run in runs),
        "parameters": parameters,
        "threads": runs[0]["threads"],
        "update_flops_per_second": achieved,
        "update_fraction_of_matmul_peak": achieved / peak,
        "update_effective_flops_per_second": 6 * parameters * update_tokens / update_seconds,
        "update_tokens_per_iteration": update_tokens,
        "update_tokens_processed_per_iteration": median("update_tokens_processed"),
        "reference_tokens_processed_per_iteration": median("reference_tokens_processed"),
        "reward_per_iteration": curve("reward"),
        "accuracy_per_iteration": curve("accuracy"),
        "mean_reward": statistics.fmean(curve("reward")),
        "mean_accuracy": statistics.fmean(curve("accuracy")),
        "seconds_per_iteration_all": [[row["seconds"] for row in run["iterations"]] for run in runs],
    }


def work_skipping_bound(ours: dict, trl: dict) -> dict:
    """The most that skipping work can buy: TRL's iteration with only the work ours does left in it.

    Each phase at TRL's own measured cost per position: the `logp_old` forward dropped, the
    update and the reference scaled by the positions ours feeds over those TRL feeds (each
    prompt once per minibatch, no padding past the minibatch's longest completion), and the
    faster of the two arms' generation and scoring. `speedup` = TRL's time over that: the ratio
    an implementation would reach whose forward and backward cost TRL's per position and which
    wrote no artefacts. Beyond it, only cheaper positions (fused kernels) or other maths go.
    """
    t, o = trl["median_split_seconds"], ours["median_split_seconds"]

    def scaled(seconds: float, key: str) -> float:
        theirs = trl[f"{key}_tokens_processed_per_iteration"]
        return seconds * ours[f"{key}_tokens_processed_per_iteration"] / theirs if theirs else 0.0

    phases = {"generation": min(t["generation"], o["generation"]),
              "scoring": min(t["scoring"] + t["prep"], o["scoring"]),
              "reference": scaled(t["reference"], "reference"),
              "old_logprobs": 0.0,
              "update": scaled(t["update"], "update")}
    seconds = sum(phases.values())
    return {"phases": phases, "seconds": seconds, "speedup": sum(t[key] for key in SPLIT) / seconds}


def plot(result: dict, target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = result["arms"]
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(12, 4.5))
    for arm, colour in (("ours", "tab:blue"), ("trl", "tab:orange")):
        x = range(1, len(arms[arm]["reward_per_iteration"]) + 1)
        curves.plot(x, arms[arm]["reward_per_iteration"], color=colour, label=f"{arm}: reward")
        curves.plot(x, arms[arm]["accuracy_per_iteration"], color=colour, linestyle="--", label=f"{arm}: accuracy")
    curves.set_xlabel("iteration")
    curves.set_title(f"mean over {result['repeats']} repeat(s)")
    curves.legend()
    splits = [arms["ours"]["median_split_seconds"], arms["trl"]["median_split_seconds"]]
    names = ["ours", "TRL GRPOTrainer"]
    bound = result.get("work_skipping_bound")
    if bound:  # older results have none
        splits.append(bound["phases"])
        names.append("TRL, only our work\n(bound)")
    bottom = [0.0] * len(splits)
    for key in SPLIT:
        heights = [split.get(key, 0.0) for split in splits]
        bars.bar(names, heights, bottom=bottom, label=key)
        bottom = [b + h for b, h in zip(bottom, heights)]
    bars.set_ylabel("median seconds per iteration")
    title = f"TRL / ours = {result['speedup']:.2f}x"
    bars.set_title(title + (f"; bound {bound['speedup']:.2f}x" if bound else ""))
    bars.legend()
    fig.tight_layout()
    fig.savefig(target, dpi=110)


def arm_environment() -> dict[str, str]:
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false"}


def warn_if_busy() -> list[float]:
    """The load averages; a warning when other work is running (timings will not be clean)."""
    load = list(os.getloadavg())
    if load[0] > 0.5:
        print(f"warning: load average {load[0]:.1f} on {os.cpu_count()} cores: timings will be noisy. With more "
              "than one thread, OpenMP's spin-waiting threads can make each arm many times slower while other "
              "processes hold the cores; OMP_WAIT_POLICY=PASSIVE avoids that at some cost on a quiet machine.",
              flush=True)
    return load


class Arm:
    """One arm in its own process, driven an iteration at a time."""

    def __init__(self, name: str, command: list[str], log: Path):
        self.name, self.log = name, log
        self.process = subprocess.Popen(command, env=arm_environment(), stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=log.open("w"), text=True, bufsize=1)

    def until(self, marker: str) -> str:
        for line in self.process.stdout:
            if line.startswith(marker):
                return line.rstrip()
        self.process.wait()
        raise SystemExit(f"the {self.name} arm exited ({self.process.returncode}) before '{marker}'; "
                         f"its log: {self.log}\n" + self.log.read_text()[-3000:])

    def iteration(self) -> None:
        self.process.stdin.write("go\n")
        self.process.stdin.flush()
        print(self.until("@done")[len("@done "):], flush=True)

    def finish(self) -> None:
        self.process.stdin.close()
        for _ in self.process.stdout:  # drain, so a chatty exit cannot block on a full pipe
            pass
        if self.process.wait():
            raise SystemExit(f"the {self.name} arm failed ({self.process.returncode}); its log: {self.log}\n"
                             + self.log.read_text()[-3000:])


def run_lockstep(commands: dict[str, list[str]], iterations: int, work: Path) -> None:
    """Start every arm, then take their iterations in turn (the order reversed every other round)."""
    arms = {name: Arm(name, command, work / f"{name}.log") for name, command in commands.items()}
    for arm in arms.values():
        arm.until("@ready")
    names = list(arms)
    for iteration in range(iterations):
        for name in (names if iteration % 2 == 0 else names[::-1]):
            arms[name].iteration()
    for arm in arms.values():
        arm.finish()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params override")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3, help="iterations left out of the medians")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", type=Path, help="where the prompts and reference are made (kept for reuse)")
    parser.add_argument("--reference", type=Path, help="a reference model directory made by the pipeline")
    parser.add_argument("--prompts", type=Path, help="its data/prompts directory")
    parser.add_argument("--output", type=Path, default=RESULTS / "vs_trl.json")
    parser.add_argument("--trl-torch-compile", action="store_true",
                        help="TRL with torch_compile=True (the Trainer compiles the model it trains)")
    # One arm in this process (how main runs each arm)
    parser.add_argument("--arm", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.arm:
        result = (run_ours if args.arm == "ours" else run_trl)(args)
        wait_for_the_end()
        Path(args.out).write_text(json.dumps(result))
        return

    from stages.params import load_params

    params = load_params(args.params, args.set)
    print("command: python benchmarks/vs_trl.py", " ".join(sys.argv[1:]), flush=True)
    load_before = warn_if_busy()
    work = args.work or Path(tempfile.gettempdir()) / "grpo-vs-trl"
    work.mkdir(parents=True, exist_ok=True)
    inputs = prepare_inputs(args.params, args.set, work, args.reference, args.prompts)

    runs: dict[str, list[dict]] = {"ours": [], "trl": []}
    peaks: list[float] = []
    for repeat in range(args.repeats):
        scratch = Path(tempfile.mkdtemp(prefix=f"repeat{repeat}-", dir=work))
        commands = {}
        for arm in (["ours", "trl"] if repeat % 2 == 0 else ["trl", "ours"]):
            (scratch / arm).mkdir()
            commands[arm] = [sys.executable, __file__, "--arm", arm, "--params", str(args.params),
                             "--inputs", str(inputs), "--scratch", str(scratch / arm), "--seed", str(params.seed + repeat),
                             "--iterations", str(args.iterations), "--out", str(scratch / f"{arm}.json"),
                             *[f"--set={kv}" for kv in args.set],
                             *(["--trl-torch-compile"] if args.trl_torch_compile else [])]
        run_lockstep(commands, args.iterations, scratch)
        for arm in commands:
            runs[arm].append(json.loads((scratch / f"{arm}.json").read_text()))
        shutil.rmtree(scratch, ignore_errors=True)
        peaks.append(matmul_peak_flops(runs["ours"][0]["threads"]))  # once per repeat: the best is the ceiling

    peak = max(peaks)
    arms = {arm: summarise(values, args.warmup, peak) for arm, values in runs.items()}
    # Same prompts at the same iteration in both arms: compare the curves iteration by iteration.
    curves = {}
    for key in ("reward", "accuracy"):
        diffs = [o[key] - t[key] for ours_run, trl_run in zip(runs["ours"], runs["trl"])
                 for o, t in zip(ours_run["iterations"], trl_run["iterations"])]
        error = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
        curves[key] = {"mean_ours_minus_trl": statistics.fmean(diffs), "standard_error": error,
                       "pairs": len(diffs)}
    _, matching = trl_config(params.model_copy(update={"grpo": params.grpo.model_copy(
        update={"iterations": args.iterations})}), "-", args.trl_torch_compile)
    import trl

    result = {
        "command": " ".join(["python", "benchmarks/vs_trl.py", *sys.argv[1:]]),
        "trl_version": trl.__version__,
        "iterations": args.iterations, "warmup": args.warmup, "repeats": args.repeats,
        "config": {"group_size": params.rollout.group_size, "prompts_per_iteration": params.rollout.prompts_per_iteration,
                   "max_new_tokens": params.rollout.max_new_tokens, "beta": params.grpo.beta, "mu": params.grpo.mu,
                   "minibatch_size": params.grpo.minibatch_size, "minibatches": params.grpo.minibatches,
                   "loss_agg": params.grpo.loss_agg, "compile": params.compile,
                   "trl_torch_compile": args.trl_torch_compile,
                   "overrides": args.set},
        "load_average_before_after": [load_before, list(os.getloadavg())],
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "matmul_peak_flops_per_second": peak,
        "matmul_peak_measurements": peaks,
        "ratio_ours_over_trl": arms["ours"]["median_seconds_per_iteration"] / arms["trl"]["median_seconds_per_iteration"],
        "speedup": arms["trl"]["median_seconds_per_iteration"] / arms["ours"]["median_seconds_per_iteration"],
        "curves_ours_minus_trl": curves,
        "work_skipping_bound": work_skipping_bound(arms["ours"], arms["trl"]),
        "arms": arms,
        "matching": matching,
        "split_definitions": {
            "generation": "ours: the rollout stage (tokenize, sample, decode, write rollouts.parquet); TRL: _generate "
                          "(tokenize, HF generate, decode)",
            "scoring": "ours: reward + advantage stages (with their parquet files); TRL: _calculate_rewards",
            "reference": "the frozen reference's log-probs (no grad)",
            "old_logprobs": "a no-grad policy forward for logp_old (TRL only; ours keeps them from generation)",
            "prep": "TRL only: the rest of _generate_and_score_completions (padding, advantages, metrics)",
            "update": "the rest of the iteration: mu passes of forward + backward + AdamW steps (ours: plus "
                      "update.json and the checkpoint write, also reported alone as `checkpoint`; TRL: plus the "
                      "Trainer loop and its logging)",
            "how TRL is timed": "GRPOTrainer's own methods wrapped on the instance (_generate, _calculate_rewards, "
                                "_get_per_token_logps_and_entropies under no_grad, _generate_and_score_completions); "
                                "iteration boundaries from a TrainerCallback at every steps_per_generation * "
                                "num_iterations optimizer steps",
            "update FLOP/s": "6 * parameters * tokens processed by the update's forward passes / (median update "
                             "seconds, less the checkpoint write). Tokens processed: TRL every row at the generation "
                             "batch's padded width, mu times; ours each distinct prompt once per minibatch plus the "
                             "completion tokens fed (padded to the minibatch's longest), mu times. "
                             "`update_effective_flops_per_second` counts instead the same work for both (prompt + "
                             "completion tokens of every completion, no padding, mu times): a rate of useful work",
            "work_skipping_bound": ("TRL's iteration with only the work ours does left in it, each phase at TRL's "
                                    "own cost per position (see work_skipping_bound): the most that skipping "
                                    "work can buy at matched maths"),
        },
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.output.with_suffix(".png"))
    for arm in ("ours", "trl"):
        a = arms[arm]
        split = ", ".join(f"{k} {v:.3f}" for k, v in a["median_split_seconds"].items())
        print(f"{arm:5s} median {a['median_seconds_per_iteration']:.3f} s/iteration ({split}); "
              f"{a['rollout_tokens_per_second']:.0f} rollout tokens/s; peak RSS {a['peak_rss_mib']:.0f} MiB; "
              f"update {a['update_flops_per_second'] / 1e9:.2f} GFLOP/s = {100 * a['update_fraction_of_matmul_peak']:.1f}% "
              f"of the {peak / 1e9:.1f} GFLOP/s matmul peak; mean reward {a['mean_reward']:.3f} "
              f"accuracy {a['mean_accuracy']:.3f}")
    for key, c in curves.items():
        print(f"{key}: ours - TRL = {c['mean_ours_minus_trl']:+.3f} +- {c['standard_error']:.3f} (mean over "
              f"{c['pairs']} iterations with the same prompts, +- one standard error)")
    bound = result["work_skipping_bound"]
    print(f"skipping work alone, at TRL's cost per position and with no artefacts written, reaches at most "
          f"{bound['speedup']:.2f}x ({bound['seconds']:.3f} s/iteration)")
    print(f"ours / TRL = {result['ratio_ours_over_trl']:.3f} (TRL is {result['speedup']:.2f}x slower); "
          f"wrote {args.output} and {args.output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
