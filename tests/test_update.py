"""The update stage: its fast path (each prompt's forward shared by its completions, the
reference in chunks) steps the policy as the plain loop over DESIGN.md's objective does.

The comparisons step with SGD: Adam divides each gradient by its own running scale, which
turns float-order noise in near-zero gradients (embedding rows of unused tokens) into
differences of order lr; SGD keeps the weights a faithful picture of the gradients.
"""

import copy
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from stages.records.artifacts import Layout, write_parquet
from stages.config import TinyModel
from stages.params import load_params
from stages.errors import GroupError
from stages.model.generation import completion_logprobs, sample
from stages.model.modeling import build_tiny_model, build_tokenizer, encode_prompts
from stages.objective import drop_truncated, grpo_loss
from stages.rollout import iteration_seed
from stages.update import TrainState, load_update_batch, make_optimizer, pass_order, update

from conftest import ROOT, TINY

PROMPTS = ["What is 12 + 34?", "What is 99 - 10?", "What is 7 + 8?"]  # two prompt lengths: left padding
G = 4
LR = 0.5


@pytest.fixture(scope="module")
def iteration_files(tmp_path_factory):
    """One iteration's rollouts.parquet and advantages.parquet, sampled from a tiny model."""
    return make_iteration_files(tmp_path_factory, num_layers=2)


def make_iteration_files(tmp_path_factory, num_layers: int):
    tokenizer = build_tokenizer()
    shape = TinyModel(hidden_size=32, num_layers=num_layers, num_heads=2, intermediate_size=64,
                      max_position_embeddings=64)
    model = build_tiny_model(shape, tokenizer, seed=5).eval()
    ids = encode_prompts(tokenizer, PROMPTS)
    out = sample(model, ids, group_size=G, max_new_tokens=10, eos_ids=[tokenizer.eos_token_id],
                 pad_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(0))
    lengths = out.lengths.tolist()
    rows = len(PROMPTS) * G
    layout = Layout(tmp_path_factory.mktemp("run"))
    folder = layout.iteration(1)
    write_parquet(folder / "rollouts.parquet", pd.DataFrame({
        "prompt_id": np.repeat(np.arange(len(PROMPTS)), G), "sample": np.tile(np.arange(G), len(PROMPTS)),
        "prompt_ids": [ids[i // G] for i in range(rows)],
        "completion_ids": [row[:n] for row, n in zip(out.completion_ids.tolist(), lengths)],
        "logprobs": [row[:n] for row, n in zip(out.logprobs.tolist(), lengths)],
        "finish_reason": np.where(out.stopped.numpy(), "stop", "length"),
    }))
    advantages = torch.randn(rows, generator=torch.Generator().manual_seed(1)).numpy()
    write_parquet(folder / "advantages.parquet", pd.DataFrame({
        "prompt_id": np.repeat(np.arange(len(PROMPTS)), G), "sample": np.tile(np.arange(G), len(PROMPTS)),
        "advantage": advantages}))
    return layout, model, tokenizer


def params_for(loss_agg: str, beta: float, minibatches: str = "groups", extra: tuple[str, ...] = ()):
    # Minibatches of 6 with G = 4: under `groups`, a minibatch holds one whole group and half of another.
    return load_params(ROOT / "params.yaml", [*TINY, f"rollout.prompts_per_iteration={len(PROMPTS)}",
                                              f"rollout.group_size={G}", "rollout.max_new_tokens=10",
                                              "grpo.minibatch_size=6", "grpo.mu=2", f"grpo.minibatches={minibatches}",
                                              f"grpo.beta={beta}", f"grpo.loss_agg={loss_agg}", *extra])


def plain_update(params, layout: Layout, model, tokenizer, reference, old_logp=None,
                 is_weights=None) -> list[torch.Tensor]:
    """The objective as DESIGN.md states it: every row's full forward, minibatch by minibatch.
    `old_logp`, `is_weights` [rows, T]: pi_old instead of the file's, and per-token IS weights."""
    cfg = params.grpo
    batch = load_update_batch(layout, 1, tokenizer.pad_token_id)
    if old_logp is not None:
        batch.old_logp = old_logp
    batch.is_weights = is_weights
    truncated = batch.truncated if cfg.mask_truncated_completions else None
    iteration_mask = drop_truncated(batch.inputs.completion_mask.float(), truncated)  # dapo counts the iteration's
    if cfg.beta:
        with torch.no_grad():
            batch.ref_logp, _ = completion_logprobs(reference, *batch.inputs.as_inputs())
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    generator = torch.Generator().manual_seed(iteration_seed(params.seed, 1, 2))
    model.train()
    for _ in range(cfg.mu):
        for rows in pass_order(batch.groups, cfg.minibatches, generator).split(cfg.minibatch_size):
            minibatch = batch.rows(rows)
            logp, _ = completion_logprobs(model, *minibatch.inputs.as_inputs())
            loss, _ = grpo_loss(logp, minibatch.old_logp, minibatch.ref_logp, minibatch.advantages,
                                minibatch.inputs.completion_mask.float(), eps_low=cfg.eps_low,
                                eps_high=cfg.eps_high, beta=cfg.beta, loss_agg=cfg.loss_agg,
                                max_new_tokens=params.rollout.max_new_tokens, kl_estimator=cfg.kl_estimator,
                                clip_ratio_c=cfg.clip_ratio_c, delta=cfg.delta,
                                importance_level=cfg.importance_level, policy_loss=cfg.policy_loss,
                                truncated=None if truncated is None else minibatch.truncated,
                                iteration_mask=iteration_mask, is_weights=minibatch.is_weights)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
    return [p.detach() for p in model.parameters()]


# The objective's variants (tests/test_objective.py checks each by hand) wired through the update.
# delta 1.1 < 1 + eps_high caps positive advantages' ratios; clip_ratio_c 1.05 negative ones'.
VARIANTS = ("grpo.kl_estimator=k2", "grpo.clip_ratio_c=1.05", "grpo.delta=1.1")
GSPO = ("grpo.importance_level=sequence",)
# 11 of the 12 sampled completions run out of tokens: masked, one completion carries all the loss.
CISPO_MASKED = ("grpo.policy_loss=cispo", "grpo.kl_estimator=k1", "grpo.mask_truncated_completions=true")


@pytest.mark.parametrize(("loss_agg", "minibatches", "extra"),
                         [("grpo", "groups", ()), ("bnpo", "groups", ()), ("dapo", "groups", ()),
                          ("dr_grpo", "groups", ()), ("grpo", "completions", ()), ("dapo", "completions", VARIANTS),
                          ("grpo", "completions", GSPO), ("dapo", "groups", CISPO_MASKED)])
def test_the_update_steps_the_policy_as_the_plain_loop_does(iteration_files, loss_agg, minibatches, extra):
    layout, model, tokenizer = iteration_files
    params = params_for(loss_agg, beta=0.1, minibatches=minibatches, extra=extra)
    policy = copy.deepcopy(model)
    optimizer = torch.optim.SGD(policy.parameters(), lr=LR)
    metrics = update(params, layout, 1, TrainState(policy, tokenizer, optimizer), model)
    expected = plain_update(params, layout, copy.deepcopy(model), tokenizer, model)
    assert metrics["optimizer_steps"] == 4
    assert ("clip_ratio/dual" in metrics) == ("grpo.clip_ratio_c=1.05" in extra)
    if "clip_ratio/dual" in metrics:
        assert metrics["clip_ratio/dual"] > 0  # the dual clip bound some tokens: it is wired, not just accepted
    for got, want in zip(policy.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, atol=1e-5, rtol=0)
    # The steps moved the policy: the comparison above is not between two untouched models.
    assert max((got - start).abs().max() for got, start in zip(expected, model.parameters())) > 1e-3


def stepped_policy(iteration_files, params) -> list[torch.Tensor]:
    layout, model, tokenizer = iteration_files
    policy = copy.deepcopy(model)
    update(params, layout, 1, TrainState(policy, tokenizer, torch.optim.SGD(policy.parameters(), lr=LR)), model)
    return [p.detach() for p in policy.parameters()]


@pytest.mark.parametrize("minibatches", ["groups", "completions"])
@pytest.mark.parametrize("loss_agg", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_a_micro_batched_step_is_the_whole_minibatchs_step(iteration_files, loss_agg, minibatches, tmp_path):
    """Micro-batches of 2 and 3 rows of a 6-row minibatch, their gradients accumulated, step the
    policy as the whole minibatch does: each part's loss is divided by the whole minibatch's
    count (its tokens for bnpo, the iteration's per minibatch for dapo, its completions for
    grpo), not its own. No gradient clipping, which would hide a gradient of the wrong scale."""
    def stepped(micro_batch_size: int) -> list[torch.Tensor]:
        params = load_params(ROOT / "params.yaml", [
            *TINY, f"rollout.prompts_per_iteration={len(PROMPTS)}", f"rollout.group_size={G}",
            "rollout.max_new_tokens=10", "grpo.minibatch_size=6", "grpo.mu=2", f"grpo.minibatches={minibatches}",
            "grpo.beta=0.1", f"grpo.loss_agg={loss_agg}", "grpo.max_grad_norm=1e9",
            f"grpo.micro_batch_size={micro_batch_size}"])
        return stepped_policy(iteration_files, params)

    whole = stepped(0)
    for micro_batch_size in (2, 3):
        for got, want in zip(stepped(micro_batch_size), whole, strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_gradient_checkpointing_steps_the_policy_as_without(iteration_files):
    """The model's own checkpointing drops the KV cache the shared-prompt forward reads: each row
    then runs whole, with the same gradients."""
    from stages.model.modeling import enable_gradient_checkpointing

    layout, model, tokenizer = iteration_files
    params = params_for("grpo", beta=0.1)
    expected = stepped_policy(iteration_files, params)
    policy = copy.deepcopy(model)
    enable_gradient_checkpointing(policy)
    assert any(getattr(module, "gradient_checkpointing", False) for module in policy.modules())
    update(params, layout, 1, TrainState(policy, tokenizer, torch.optim.SGD(policy.parameters(), lr=LR)), model)
    for got, want in zip(policy.parameters(), expected, strict=True):
        torch.testing.assert_close(got.detach(), want, atol=1e-5, rtol=0)


def shuffled_groups(prompts: int, group_size: int) -> torch.Tensor:
    """The prompt of each row, rows not in prompt order (a file need not list them so)."""
    groups = torch.arange(prompts).repeat_interleave(group_size)
    return groups[torch.randperm(len(groups), generator=torch.Generator().manual_seed(3))]


def test_a_groups_pass_keeps_each_prompts_completions_in_one_minibatch_and_shuffles_the_groups():
    groups = shuffled_groups(prompts=6, group_size=4)
    generator = torch.Generator().manual_seed(0)
    orders = [pass_order(groups, "groups", generator) for _ in range(10)]
    for order in orders:
        assert sorted(order.tolist()) == list(range(len(groups)))  # every completion once per pass
        for minibatch in order.split(8):
            assert set(torch.bincount(groups[minibatch], minlength=6).tolist()) <= {0, 4}  # whole groups only
    assert len({tuple(groups[order].tolist()) for order in orders}) > 1  # the groups' order changes between passes


def test_a_completions_pass_shuffles_completions_one_by_one():
    groups = shuffled_groups(prompts=6, group_size=4)
    generator = torch.Generator().manual_seed(0)
    orders = [pass_order(groups, "completions", generator) for _ in range(10)]
    for order in orders:
        assert sorted(order.tolist()) == list(range(len(groups)))
    assert any(set(torch.bincount(groups[minibatch], minlength=6).tolist()) - {0, 4}
               for order in orders for minibatch in order.split(8))  # groups get split


def test_the_optimizer_is_adamw_with_the_configured_lr_and_weight_decay(iteration_files):
    _, model, _ = iteration_files
    params = params_for("grpo", beta=0.1)
    optimizer = make_optimizer(copy.deepcopy(model), params)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["lr"] == params.grpo.lr
    assert optimizer.defaults["weight_decay"] == params.grpo.weight_decay


def test_with_beta_zero_the_reference_is_never_run(iteration_files):
    layout, model, tokenizer = iteration_files
    params = params_for("grpo", beta=0.0)
    policy = copy.deepcopy(model)
    metrics = update(params, layout, 1, TrainState(policy, tokenizer, torch.optim.SGD(policy.parameters(), lr=LR)),
                     None)
    assert "kl" not in metrics
    expected = plain_update(params, layout, copy.deepcopy(model), tokenizer, None)
    for got, want in zip(policy.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, atol=1e-5, rtol=0)


def test_advantages_are_matched_to_completions_by_prompt_and_sample_in_any_row_order(iteration_files, tmp_path):
    layout, _, tokenizer = iteration_files
    in_order = load_update_batch(layout, 1, tokenizer.pad_token_id)
    shuffled = Layout(tmp_path)
    shutil.copytree(layout.iteration(1), shuffled.iteration(1))
    advantages = pd.read_parquet(shuffled.iteration(1) / "advantages.parquet")
    write_parquet(shuffled.iteration(1) / "advantages.parquet", advantages.sample(frac=1.0, random_state=0))
    assert torch.equal(load_update_batch(shuffled, 1, tokenizer.pad_token_id).advantages, in_order.advantages)

    write_parquet(shuffled.iteration(1) / "advantages.parquet", advantages.iloc[:-1])
    with pytest.raises(GroupError, match=f"iteration 1 has no advantage for prompt_id={len(PROMPTS) - 1} sample={G - 1}"):
        load_update_batch(shuffled, 1, tokenizer.pad_token_id)


@pytest.mark.parametrize("correction", ["engine", "trainer", "tis"])
def test_an_engines_log_probs_are_measured_against_the_trainers_and_corrected_as_asked(iteration_files, tmp_path,
                                                                                        correction):
    """rollout.engine vllm: the sampling log-probs in rollouts.parquet are the engine's. The update
    measures their gap to the trainer's own before any step: on the first minibatch's tokens (its
    forward is the first step's), or with logprobs: trainer on all of them, stepping as the plain
    loop does from the trainer's pi_old; with tis_cap also weighing each token's policy-gradient
    term by min(pi_trainer / pi_engine, cap)."""
    source, model, tokenizer = iteration_files
    layout = Layout(tmp_path)
    shutil.copytree(source.iteration(1), layout.iteration(1))
    rollouts = pd.read_parquet(layout.iteration(1) / "rollouts.parquet")
    noise = np.random.default_rng(0)
    rollouts["logprobs"] = [np.asarray(row) + noise.normal(0, 0.3, len(row)) for row in rollouts["logprobs"]]
    write_parquet(layout.iteration(1) / "rollouts.parquet", rollouts)  # an engine far off the trainer

    extra = {"engine": (), "trainer": ("rollout.vllm.logprobs=trainer",),
             "tis": ("rollout.vllm.logprobs=trainer", "rollout.vllm.tis_cap=1.5")}[correction]
    params = params_for("grpo", beta=0.1, extra=("rollout.engine=vllm", *extra))
    policy = copy.deepcopy(model)
    metrics = update(params, layout, 1, TrainState(policy, tokenizer, torch.optim.SGD(policy.parameters(), lr=LR)),
                     model)

    batch = load_update_batch(layout, 1, tokenizer.pad_token_id)
    with torch.no_grad():
        trainer, _ = completion_logprobs(model, *batch.inputs.as_inputs())
    on = batch.inputs.completion_mask.bool()
    if correction == "engine":  # measured for free on the first step's minibatch, the policy before any step
        generator = torch.Generator().manual_seed(iteration_seed(params.seed, 1, 2))
        first = pass_order(batch.groups, params.grpo.minibatches, generator)[:params.grpo.minibatch_size]
        on = torch.zeros_like(on).index_fill_(0, first, True) & on
    gap = (trainer - batch.old_logp).abs()[on]
    assert metrics["rollout/logprob_diff_max"] == pytest.approx(float(gap.max()), abs=1e-5)
    assert metrics["rollout/logprob_diff_mean"] == pytest.approx(float(gap.mean()), abs=1e-5)
    assert metrics["rollout/logprob_diff_max"] > 0.5
    weights = torch.exp(trainer - batch.old_logp).clamp(max=1.5) if correction == "tis" else None
    if correction == "tis":
        assert 0 < metrics["rollout/tis_capped"] < 1
    expected = plain_update(params, layout, copy.deepcopy(model), tokenizer, model,
                            old_logp=None if correction == "engine" else trainer, is_weights=weights)
    for got, want in zip(policy.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, atol=1e-5, rtol=0)
