"""update: mu epochs of clipped policy-gradient steps on one iteration's rollouts.

Reads rollouts.parquet (token ids, the sampling policy's log-probs) and advantages.parquet,
steps the policy in place, writes the checkpoint runs/checkpoints/NNNN/ and update.json.
The log-probs come from `shared_prompt_logprobs`: a minibatch holds several completions of
most prompts (all G of them with `grpo.minibatches: groups`), and each prompt's forward (and
backward) is done once for all of them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stages.model.adapters import as_reference
from stages.records.artifacts import Layout, write_json
from stages.model.batching import CompletionBatch, pad_to
from stages.model.checkpoints import save_checkpoint
from stages.config import Params
from stages.model.distributed import (LogprobReader, Rank, accumulating, all_sum, all_sum_tensor, full_optimizer_state,
                                full_state_dict, is_sharded, plain)
from stages.errors import GroupError, NumericsError
from stages.model.generation import shared_prompt_logprobs
from stages.model.memory import memory_named
from stages.model.modeling import autocast
from stages.objective import drop_truncated, grpo_loss, logprob_gap, loss_normaliser, truncated_is_weights
from stages.rollout import iteration_seed


@dataclass
class TrainState:
    """What the update mutates, held in memory across iterations.

    In a trainer group (`stages.model.distributed`) `reader` is the policy's read-out wrapped by DDP
    or FSDP2 and `rank` says which share of each minibatch is this process's.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    optimizer: torch.optim.Optimizer
    rank: Rank = field(default_factory=Rank)
    reader: torch.nn.Module | None = None

    def __post_init__(self) -> None:
        if self.reader is None:
            self.reader = LogprobReader(self.model)


def make_optimizer(model: PreTrainedModel, params: Params) -> torch.optim.Optimizer:
    # The fused kernel is AdamW's same update in one pass over all parameters (CPU and CUDA),
    # instead of a handful of small ops per parameter tensor; what TRL's Trainer uses too.
    fused = True if model.device.type in ("cpu", "cuda") else None  # None: torch's default elsewhere
    trainable = [p for p in model.parameters() if p.requires_grad]  # with LoRA: the adapters only
    return torch.optim.AdamW(trainable, lr=params.grpo.lr, weight_decay=params.grpo.weight_decay, fused=fused)


@dataclass
class UpdateBatch:
    """One iteration's completions as tensors, rows aligned with rollouts.parquet."""

    inputs: CompletionBatch
    old_logp: torch.Tensor
    advantages: torch.Tensor
    groups: torch.Tensor  # [rows] the row's prompt, numbered 0..prompts-1
    ref_logp: torch.Tensor | None = None  # filled only when beta != 0
    truncated: torch.Tensor | None = None  # [rows] finish_reason "length"; None: none (a batch made by hand)
    is_weights: torch.Tensor | None = None  # [rows, T] rollout.vllm.tis_cap's per-token weights; None: none

    def rows(self, index: torch.Tensor) -> UpdateBatch:
        inputs = CompletionBatch(*(t[index] for t in self.inputs.as_inputs()))
        # Trim to the longest completion of these rows: shorter minibatches cost less.
        width = int(inputs.completion_mask.sum(-1).max())
        inputs.completion_ids, inputs.completion_mask = inputs.completion_ids[:, :width], inputs.completion_mask[:, :width]
        ref_logp = None if self.ref_logp is None else self.ref_logp[index, :width]
        truncated = None if self.truncated is None else self.truncated[index]
        is_weights = None if self.is_weights is None else self.is_weights[index, :width]
        return UpdateBatch(inputs, self.old_logp[index, :width], self.advantages[index], self.groups[index], ref_logp,
                           truncated, is_weights)

    def loss_mask(self, mask_truncated: bool) -> torch.Tensor:
        """[rows, T] 1 on the tokens that carry loss: every completion token, less the truncated
        completions' with `grpo.mask_truncated_completions`."""
        mask = self.inputs.completion_mask.float()
        return drop_truncated(mask, self.truncated) if mask_truncated else mask


def aligned_advantages(rollouts: pd.DataFrame, advantages: pd.DataFrame, iteration: int) -> np.ndarray:
    """advantages.parquet's `advantage` for each row of rollouts.parquet, matched on (prompt_id, sample)."""
    keys = ["prompt_id", "sample"]
    if (len(rollouts) == len(advantages) and not rollouts.duplicated(keys).any()
            and all(np.array_equal(rollouts[k].to_numpy(), advantages[k].to_numpy()) for k in keys)):
        merged = advantages  # the usual case: both files list the completions in the same order
    else:
        merged = rollouts[keys].merge(advantages, on=keys, how="left", validate="one_to_one")
    missing = merged["advantage"].isna()
    if missing.any():
        prompt_id, sample = rollouts[keys].iloc[int(np.flatnonzero(missing.to_numpy())[0])].tolist()
        raise GroupError(f"advantages.parquet of iteration {iteration} has no advantage for "
                         f"prompt_id={prompt_id!r} sample={sample}")
    return merged["advantage"].to_numpy()


def load_update_batch(layout: Layout, iteration: int, pad_id: int) -> UpdateBatch:
    folder = layout.iteration(iteration)
    rollouts = pd.read_parquet(folder / "rollouts.parquet", columns=[
        "prompt_id", "sample", "prompt_ids", "completion_ids", "logprobs", "finish_reason"])
    advantages = pd.read_parquet(folder / "advantages.parquet", columns=["prompt_id", "sample", "advantage"])
    advantage = aligned_advantages(rollouts, advantages, iteration)
    inputs = CompletionBatch.from_lists(list(rollouts["prompt_ids"]), list(rollouts["completion_ids"]), pad_id)
    old_logp = pad_to(list(rollouts["logprobs"]), inputs.completion_ids.shape[1])
    groups = torch.from_numpy(pd.factorize(rollouts["prompt_id"])[0])
    truncated = torch.tensor((rollouts["finish_reason"] == "length").to_numpy(), dtype=torch.bool)
    return UpdateBatch(inputs, old_logp, torch.tensor(advantage, dtype=torch.float32), groups, truncated=truncated)


def pass_order(groups: torch.Tensor, minibatches: str, generator: torch.Generator) -> torch.Tensor:
    """The row order of one pass over an iteration's completions; minibatches are its consecutive slices.

    `completions`: a uniform random permutation of the rows. `groups`: the prompts in a uniform
    random order, each prompt's rows kept together, so a minibatch holds whole groups (or one
    group's share when G > minibatch_size). Both see every completion once per pass. `groups`
    runs each prompt's forward once per step for all its completions, but a step then sees
    fewer prompts and its gradient is noisier (benchmarks/README.md measures both).
    """
    if minibatches == "completions":
        return torch.randperm(len(groups), generator=generator)
    if minibatches == "groups":
        place = torch.randperm(int(groups.max()) + 1, generator=generator)  # each group's turn in this pass
        return torch.argsort(place[groups], stable=True)
    raise ValueError(f"grpo.minibatches: unknown {minibatches!r} (groups, completions)")


@torch.inference_mode()
def reference_logprobs(reference: PreTrainedModel, batch: UpdateBatch, chunk: int, temperature: float,
                       precision: str = "auto", rank: Rank = Rank()) -> torch.Tensor:
    """A frozen model's log-probs of every completion token, computed once per iteration: the
    reference's, or (`rollout.engine: vllm`) the policy's own before the update.

    In a trainer group each rank computes its share of the rows and the shares are summed
    into every rank's copy (adding the zeros elsewhere is exact)."""
    device = reference.device
    rows, width = len(batch.advantages), batch.inputs.completion_ids.shape[1]
    ref_logp = torch.zeros((rows, width))
    # Rows are grouped by prompt in rollouts.parquet, so a chunk shares few prompts among many rows.
    for chunk_rows in rank.share(torch.arange(rows)).split(chunk):
        inputs = batch.rows(chunk_rows).inputs.to(device)
        with autocast(device, precision):
            logp, _ = shared_prompt_logprobs(reference, *inputs.as_inputs(), temperature=temperature)
        ref_logp[chunk_rows, :logp.shape[1]] = logp.float().cpu()
    return all_sum_tensor(ref_logp, rank)


def correct_engine_logprobs(state: TrainState, batch: UpdateBatch, params: Params, chunk: int) -> dict[str, float]:
    """`rollout.vllm.logprobs: trainer`: the ratio's pi_old from the trainer (verl's recompute).

    The trainer's log-probs of the sampled tokens under the policy as it is before this update
    (one forward, no grad) replace the engine's; their gap over every token is the iteration's
    `rollout/logprob_diff_*` (verl's rollout_probs_diff, in log space), and `tis_cap` weighs each
    token by the capped pi_trainer / pi_engine.
    """
    cfg = params.rollout.vllm
    engine_logp = batch.old_logp
    trainer_logp = reference_logprobs(state.model, batch, chunk, params.rollout.temperature, params.precision,
                                      state.rank)
    gap = logprob_gap(trainer_logp, engine_logp, batch.inputs.completion_mask)
    metrics = {"rollout/logprob_diff_mean": gap["mean"], "rollout/logprob_diff_max": gap["max"]}
    if cfg.tis_cap is not None:
        batch.is_weights = truncated_is_weights(trainer_logp, engine_logp, cfg.tis_cap)
        capped = (trainer_logp - engine_logp).exp() > cfg.tis_cap
        metrics["rollout/tis_capped"] = float(capped[batch.inputs.completion_mask.bool()].float().mean())
    batch.old_logp = trainer_logp
    return metrics


def micro_step(state: TrainState, batch: UpdateBatch, params: Params, normaliser: float,
               measure_gap: bool = False) -> dict[str, float]:
    """Forward and backward of one micro-batch; its loss is its share of the minibatch's (`normaliser`).

    Returns the micro-batch's statistics and its token count, which weighs them in the step's;
    with `measure_gap`, also the sum and max of |logp - old_logp| over its tokens (`gap_sum`, `gap_max`).
    """
    cfg, device = params.grpo, state.model.device
    inputs = batch.inputs.to(device)
    with autocast(device, params.precision):
        logp, entropy = state.reader(*inputs.as_inputs(), temperature=params.rollout.temperature, with_entropy=True)
    mask = batch.loss_mask(cfg.mask_truncated_completions).to(device)  # truncated completions zeroed if masked
    ref_logp = None
    if batch.ref_logp is not None:
        # Padding holds no reference log-prob (0 where a chunk was narrower): make its KL exactly
        # 0 rather than exp(0 - logp), which can overflow to inf and turn the masked sum into NaN.
        ref_logp = torch.where(mask.bool(), batch.ref_logp.to(device), logp.detach().float())
    loss, stats = grpo_loss(
        logp.float(), batch.old_logp.to(device), ref_logp,
        batch.advantages.to(device), mask, eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=cfg.beta,
        loss_agg=cfg.loss_agg, max_new_tokens=params.rollout.max_new_tokens, normaliser=normaliser,
        kl_estimator=cfg.kl_estimator, clip_ratio_c=cfg.clip_ratio_c, delta=cfg.delta,
        importance_level=cfg.importance_level, policy_loss=cfg.policy_loss,
        is_weights=None if batch.is_weights is None else batch.is_weights.to(device),
    )
    # A non-finite loss is refused by the caller, before the optimizer steps. In a trainer group
    # every rank runs its backward regardless: the others wait for its gradients.
    if torch.isfinite(loss) or state.rank.world > 1:
        (loss * state.rank.gradient_scale).backward()
    ratio = torch.exp(logp.detach().float() - batch.old_logp.to(device))
    if measure_gap:
        gap = (logp.detach().float() - batch.old_logp.to(device)).abs() * mask
        stats = {**stats, "gap_sum": float(gap.sum()), "gap_max": float(gap.max())}
    # clamp: with mask_truncated_completions a micro-batch may hold no token with loss (its weight is 0)
    return {**stats, "loss": loss.item(), "entropy": float((entropy * mask).sum() / mask.sum().clamp(min=1)),
            "ratio_mean": float((ratio * mask).sum() / mask.sum().clamp(min=1)), "tokens": float(mask.sum())}


def policy_step(state: TrainState, batch: UpdateBatch, params: Params, iteration: int,
                iteration_mask: torch.Tensor | None = None, measure_gap: bool = False) -> dict[str, float]:
    """One optimizer step on a minibatch, in micro-batches of `grpo.micro_batch_size` rows whose
    gradients add up to the whole minibatch's (`loss_normaliser` is the minibatch's). In a
    trainer group this rank's micro-batches are cut from its share of the minibatch.
    `iteration_mask`: the loss mask of the whole iteration the minibatch is cut from, which
    `dapo`'s normaliser counts (every rank holds it); None: the minibatch is the iteration."""
    cfg = params.grpo
    mine = state.rank.share(torch.arange(len(batch.advantages)))
    normaliser = loss_normaliser(cfg.loss_agg, batch.loss_mask(cfg.mask_truncated_completions),
                                 params.rollout.max_new_tokens, iteration_mask)
    state.optimizer.zero_grad(set_to_none=True)
    pieces = mine.split(cfg.micro_batch_size or len(mine))
    parts = []
    for number, piece in enumerate(pieces):
        with accumulating(state.reader, last=number == len(pieces) - 1):
            parts.append(micro_step(state, batch.rows(piece), params, normaliser, measure_gap))
    gaps = [(part.pop("gap_sum"), part.pop("gap_max")) for part in parts] if measure_gap else []
    # Each statistic is a mean over tokens: weigh each micro-batch's (each rank's) by its tokens.
    keys = sorted(key for key in parts[0] if key not in ("loss", "tokens"))
    sums = all_sum([sum(part["loss"] for part in parts), sum(part["tokens"] for part in parts),
                    *(sum(part[key] * part["tokens"] for part in parts) for key in keys)], state.rank)
    loss, tokens = sums[0], sums[1]
    if not np.isfinite(loss):
        state.optimizer.zero_grad(set_to_none=True)
        raise NumericsError(f"iteration {iteration}: the loss is {loss}; the previous checkpoint is kept")
    grad_norm = plain(torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.max_grad_norm))
    if not torch.isfinite(grad_norm):
        raise NumericsError(f"iteration {iteration}: the gradient norm is {grad_norm.item()}; the previous checkpoint is kept")
    state.optimizer.step()
    stats = parts[0] if len(parts) == 1 and state.rank.world == 1 else {
        key: total / max(tokens, 1.0) for key, total in zip(keys, sums[2:])}
    if gaps:  # one process only (rollout.engine vllm): no other rank's tokens to add
        stats = {**stats, "rollout/logprob_diff_mean": sum(total for total, _ in gaps) / max(tokens, 1.0),
                 "rollout/logprob_diff_max": max(peak for _, peak in gaps)}
        keys = [*keys, "rollout/logprob_diff_mean", "rollout/logprob_diff_max"]
    return {**{key: stats[key] for key in keys}, "loss": loss, "grad_norm": grad_norm.item()}


def _memory_remedy(params: Params, with_grad: bool) -> str:
    now = params.grpo.micro_batch_size or params.grpo.minibatch_size
    remedy = f"lower grpo.micro_batch_size (now {now}; the same maths: the run resumes) or rollout.max_new_tokens"
    if with_grad and not params.model.gradient_checkpointing:
        remedy += ", or set model.gradient_checkpointing: true"
    return remedy


def update_steps(params: Params, layout: Layout, iteration: int, state: TrainState,
                 reference: PreTrainedModel | None) -> tuple[list[dict[str, float]], dict[str, float]]:
    """The mu passes of optimizer steps on one iteration's files: each step's statistics, and the
    iteration's own (the seconds the reference log-probs took; with the vLLM engine the gap between
    its log-probs and the trainer's). `update` writes what they leave; `stages.replay` does not."""
    started = time.perf_counter()
    cfg = params.grpo
    batch = load_update_batch(layout, iteration, state.tokenizer.pad_token_id)
    width = batch.inputs.completion_ids.shape[1]
    micro = cfg.micro_batch_size or cfg.minibatch_size
    shapes = (f"{micro} completions at a time of up to {width} tokens after prompts of up to "
              f"{batch.inputs.prompt_ids.shape[1]}, vocabulary {state.model.config.vocab_size}")
    if cfg.beta != 0.0:  # with beta = 0 the reference is never run
        with (memory_named(f"the reference log-probs of iteration {iteration}", shapes, _memory_remedy(params, False)),
              as_reference(reference) as frozen):  # with LoRA: the policy itself, adapters off
            batch.ref_logp = reference_logprobs(frozen, batch, micro, params.rollout.temperature, params.precision,
                                                state.rank)
    extras = {"seconds/reference": time.perf_counter() - started}
    vllm = params.rollout.vllm if params.rollout.engine == "vllm" else None
    if vllm is not None and vllm.logprobs == "trainer":
        with memory_named(f"the trainer's log-probs of iteration {iteration}'s rollouts", shapes,
                          _memory_remedy(params, False)):
            extras |= correct_engine_logprobs(state, batch, params, micro)
    # With the engine's log-probs as pi_old, the first step's forward (the policy before any step)
    # measures the gap for free, on that minibatch's tokens.
    measure_gap = vllm is not None and vllm.logprobs == "engine"

    # Dropout (the model's, LoRA's) draws from torch's global generator: seed it per iteration,
    # so a resumed iteration draws what the uninterrupted one did (in a trainer group each rank
    # draws for its own rows: the same distribution, other draws).
    torch.manual_seed(iteration_seed(params.seed, iteration, 3))
    state.model.train()
    generator = torch.Generator().manual_seed(iteration_seed(params.seed, iteration, 2))
    iteration_mask = batch.loss_mask(cfg.mask_truncated_completions)  # `dapo` counts the whole iteration's tokens
    steps: list[dict[str, float]] = []
    total = cfg.mu * (len(batch.advantages) // cfg.minibatch_size)
    with (memory_named(f"the update of iteration {iteration}", shapes, _memory_remedy(params, True)),
          tqdm(total=total, desc=f"update {iteration}", unit="step", disable=None, leave=False) as progress):
        for _ in range(cfg.mu):
            for rows in pass_order(batch.groups, cfg.minibatches, generator).split(cfg.minibatch_size):
                steps.append(policy_step(state, batch.rows(rows), params, iteration, iteration_mask,
                                         measure_gap=measure_gap and not steps))
                progress.update()
    state.model.eval()
    if measure_gap:
        extras |= {key: steps[0].pop(key) for key in ("rollout/logprob_diff_mean", "rollout/logprob_diff_max")}
    return steps, extras


def update(params: Params, layout: Layout, iteration: int, state: TrainState,
           reference: PreTrainedModel | None) -> dict[str, float]:
    started = time.perf_counter()
    steps, extras = update_steps(params, layout, iteration, state, reference)
    # Under FSDP2 gathering the whole weights and optimizer state is collective: every rank takes part.
    weights = full_state_dict(state.reader, state.model) if is_sharded(state.reader) else None
    optimizer_state = full_optimizer_state(state.reader, state.optimizer)
    metrics = {key: float(np.mean([s[key] for s in steps if key in s])) for key in steps[0]}
    if state.rank.rank == 0:  # one writer; with several machines, runs/ must be on a shared filesystem
        save_checkpoint(state.model, state.tokenizer, optimizer_state, layout.checkpoint(iteration), weights)
        metrics.update({"optimizer_steps": len(steps), **extras, "seconds/update": time.perf_counter() - started})
        # Every step's statistics too: `grpo replay` recomputes them from the iteration's files.
        write_json(layout.iteration(iteration) / "update.json", {**metrics, "steps": steps})
    return metrics
