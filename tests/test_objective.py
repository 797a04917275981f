"""The GRPO objective, checked against values computed by hand."""

import math

import pytest
import torch

from stages.objective import (group_advantages, grpo_loss, importance_log_ratio, k1_kl, k2_kl, k3_kl, loss_normaliser,
                              zero_std_groups)

EPS = 1e-4


def test_seed_worked_example_ranks_the_four_answers_to_one_plus_seven():
    # "<think>…</think><answer>8</answer>", "แปด" (informal eight), "12", a second right answer.
    rewards = torch.tensor([[1.0, 0.7, 0.0, 1.0]])
    a1, a2, a3, a4 = group_advantages(rewards)[0].tolist()
    assert a1 == pytest.approx(a4)
    assert a1 > a2 > 0 > a3


def test_group_scaling_divides_by_the_unbiased_std_of_the_group():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    std = math.sqrt(4 * 0.25 / 3)  # unbiased: divide by G - 1
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0] * 4])
    expected[0] /= std + EPS
    torch.testing.assert_close(group_advantages(rewards, "group"), expected)


def test_batch_scaling_divides_by_the_std_of_the_whole_batch():
    rewards = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    batch_std = 0.5  # values 1, 0, 1, 1: mean 0.75, unbiased variance 0.75 / 3
    expected = torch.tensor([[0.5, -0.5], [0.0, 0.0]]) / (batch_std + EPS)
    torch.testing.assert_close(group_advantages(rewards, "batch"), expected)


def test_no_scaling_only_centres_each_group():
    rewards = torch.tensor([[3.0, 1.0], [0.0, 4.0]])
    torch.testing.assert_close(group_advantages(rewards, "none"), torch.tensor([[1.0, -1.0], [-2.0, 2.0]]))


def test_a_group_with_equal_rewards_has_zero_advantage_and_is_counted():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    advantages = group_advantages(rewards)
    assert torch.isfinite(advantages).all()
    assert advantages[0].abs().sum() == 0
    assert zero_std_groups(rewards).tolist() == [True, False]


def test_unknown_scaling_is_refused_by_name():
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.ones(1, 2), "median")


def test_k3_kl_is_zero_at_the_reference_and_positive_elsewhere():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    assert torch.equal(k3_kl(logp, logp), torch.zeros(3))
    ref = torch.tensor([-2.0, -1.0, -0.7])
    kl = k3_kl(logp, ref)
    assert (kl > 0).all()
    assert kl[0].item() == pytest.approx(math.exp(-1) + 1 - 1)  # log ratio -1: e^-1 - (-1) - 1


# Two completions, 2 and 1 tokens long (the third column is padding), ratio 1, no KL.
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
ADVANTAGES = torch.tensor([2.0, 1.0])


@pytest.mark.parametrize("loss_agg, expected", [
    ("grpo", (-2.0 + -1.0) / 2),  # mean per completion (-2, -1), then over completions
    ("bnpo", (-2.0 - 2.0 - 1.0) / 3),  # every token alike
    ("dapo", (-2.0 - 2.0 - 1.0) / 3),  # the same when these rows are the whole iteration
    ("dr_grpo", (-2.0 - 2.0 - 1.0) / (2 * 4)),  # constant length: completions * max_new_tokens
])
def test_each_aggregation_matches_its_hand_computed_value(loss_agg, expected):
    logp = torch.full((2, 3), -1.0)
    loss, _ = grpo_loss(logp, logp, None, ADVANTAGES, MASK, beta=0.0, loss_agg=loss_agg, max_new_tokens=4)
    assert loss.item() == pytest.approx(expected)


def test_padding_never_contributes():
    logp = torch.full((2, 3), -1.0)
    garbage = logp.clone()
    garbage[0, 2] = garbage[1, 1:] = 50.0  # only padding positions change
    for agg in ("grpo", "bnpo", "dapo", "dr_grpo"):
        clean, _ = grpo_loss(logp, logp, logp, ADVANTAGES, MASK, loss_agg=agg, max_new_tokens=4)
        noisy, _ = grpo_loss(garbage, logp, logp, ADVANTAGES, MASK, loss_agg=agg, max_new_tokens=4)
        assert noisy.item() == pytest.approx(clean.item())


def test_kl_term_adds_beta_times_k3_per_token():
    logp = torch.full((2, 3), -1.0)
    ref = torch.full((2, 3), -2.0)
    plain, _ = grpo_loss(logp, logp, None, ADVANTAGES, MASK, beta=0.0, loss_agg="dapo")
    penalised, stats = grpo_loss(logp, logp, ref, ADVANTAGES, MASK, beta=0.5, loss_agg="dapo")
    assert penalised.item() == pytest.approx(plain.item() + 0.5 * math.exp(-1))
    assert stats["kl"] == pytest.approx(math.exp(-1))


def test_reference_is_optional_only_without_kl():
    logp = torch.zeros(2, 3)
    grpo_loss(logp, logp, None, ADVANTAGES, MASK, beta=0.0)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, logp, None, ADVANTAGES, MASK, beta=0.04)


def _gradient(log_ratio: float, advantage: float, eps_low=0.2, eps_high=0.2) -> float:
    old = torch.zeros(1, 1)
    logp = torch.full((1, 1), log_ratio, requires_grad=True)
    loss, _ = grpo_loss(logp, old, None, torch.tensor([advantage]), torch.ones(1, 1),
                        eps_low=eps_low, eps_high=eps_high, beta=0.0)
    loss.backward()
    return logp.grad.item()


@pytest.mark.parametrize("ratio, advantage, clipped", [
    (1.5, +1.0, True),  # already more likely than 1 + eps_high allows: stop pushing up
    (0.5, +1.0, False),  # less likely than before: the pessimistic bound still pushes up
    (0.5, -1.0, True),  # already less likely than 1 - eps_low allows: stop pushing down
    (1.5, -1.0, False),  # more likely than before: still pushed down
    (1.1, +1.0, False),  # inside the trust region: plain policy gradient
])
def test_clip_stops_the_gradient_only_outside_the_trust_region_in_the_advantage_direction(ratio, advantage, clipped):
    gradient = _gradient(math.log(ratio), advantage)
    if clipped:
        assert gradient == 0.0
    else:
        assert gradient == pytest.approx(-advantage * ratio)  # d(-ratio * A)/d logp


def test_asymmetric_clip_uses_eps_high_above_and_eps_low_below():
    assert _gradient(math.log(1.25), +1.0, eps_low=0.2, eps_high=0.28) != 0.0
    assert _gradient(math.log(1.3), +1.0, eps_low=0.2, eps_high=0.28) == 0.0
    assert _gradient(math.log(0.85), -1.0, eps_low=0.1, eps_high=0.28) == 0.0


def test_clip_fractions_count_low_and_high_separately():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 1.0, 0.5, 1.0]]))
    _, stats = grpo_loss(logp, old, None, torch.tensor([1.0]), torch.ones(1, 4), beta=0.0)
    assert stats["clip_ratio/high"] == pytest.approx(0.25)
    assert stats["clip_ratio/low"] == 0.0  # 0.5 with a positive advantage is not clipped


def test_on_policy_the_ratio_is_one_and_the_gradient_is_the_plain_policy_gradient():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, requires_grad=True)
    mask = torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    advantages = torch.tensor([0.7, -1.2, 0.4])
    logp = torch.nn.functional.logsigmoid(logits)  # any differentiable per-token log-prob

    loss, stats = grpo_loss(logp, logp.detach(), None, advantages, mask, beta=0.0, loss_agg="grpo")
    (grpo_grad,) = torch.autograd.grad(loss, logits, retain_graph=True)
    reinforce = -((advantages[:, None] * logp * mask).sum(-1) / mask.sum(-1)).mean()
    (pg_grad,) = torch.autograd.grad(reinforce, logits)

    torch.testing.assert_close(grpo_grad, pg_grad)
    assert stats["clip_ratio"] == 0.0


# --- the 2025-26 variants -----------------------------------------------------------------


def _step(log_ratio: list[float], advantage: float, loss_agg: str = "bnpo",
          **variant) -> tuple[float, list[float], dict]:
    """One completion whose tokens have these log ratios to the sampling policy: loss, d loss / d logp, stats."""
    old = torch.zeros(1, len(log_ratio))
    logp = torch.tensor([log_ratio], requires_grad=True)
    loss, stats = grpo_loss(logp, old, None, torch.tensor([advantage]), torch.ones(1, len(log_ratio)),
                            beta=0.0, loss_agg=loss_agg, **variant)
    loss.backward()
    return loss.item(), logp.grad[0].tolist(), stats


@pytest.mark.parametrize("estimator, expected", [
    ("k1", [1.0, -1.0]),  # logp - ref: negative where the policy is less likely than the reference
    ("k2", [0.5, 0.5]),  # (logp - ref)^2 / 2
    ("k3", [math.exp(-1), math.e - 2]),  # e^(ref - logp) - (ref - logp) - 1
])
def test_each_kl_estimator_matches_its_hand_computed_value_and_is_what_beta_weighs(estimator, expected):
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0])
    function = {"k1": k1_kl, "k2": k2_kl, "k3": k3_kl}[estimator]
    torch.testing.assert_close(function(logp, ref), torch.tensor(expected))

    row = torch.full((2, 3), -1.0)
    plain, _ = grpo_loss(row, row, None, ADVANTAGES, MASK, beta=0.0, loss_agg="bnpo")
    penalised, stats = grpo_loss(row, row, row - 1.0, ADVANTAGES, MASK, beta=0.5, loss_agg="bnpo",
                                 kl_estimator=estimator)
    per_token = expected[0]  # every token has logp - ref = 1, as the first above
    assert stats["kl"] == pytest.approx(per_token)
    assert penalised.item() == pytest.approx(plain.item() + 0.5 * per_token)


def test_an_unknown_kl_estimator_is_refused_by_name():
    with pytest.raises(ValueError, match="kl_estimator"):
        grpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), ADVANTAGES, MASK, kl_estimator="k4")


def test_the_dual_clip_caps_a_negative_advantages_loss_at_minus_a_times_c_where_it_binds():
    # A = -1, ratio 4: PPO's pessimistic bound is -A * max(4, 1 - eps_low) = 4, and pushes down.
    assert _step([math.log(4.0)], -1.0)[:2] == (pytest.approx(4.0), [pytest.approx(4.0)])
    # With clip_ratio_c = 3 the loss is 3, a constant: no gradient, and the token counts as bound.
    loss, gradient, stats = _step([math.log(4.0)], -1.0, clip_ratio_c=3.0)
    assert (loss, gradient, stats["clip_ratio/dual"]) == (pytest.approx(3.0), [0.0], 1.0)
    # Ratio 2: the loss 2 is below the cap: untouched, and the plain gradient -A * ratio.
    loss, gradient, stats = _step([math.log(2.0)], -1.0, clip_ratio_c=3.0)
    assert (loss, gradient, stats["clip_ratio/dual"]) == (pytest.approx(2.0), [pytest.approx(2.0)], 0.0)
    # A positive advantage is never dual-clipped: PPO's clip already bounds it (min(4, 1.2) * A).
    loss, gradient, stats = _step([math.log(4.0)], +1.0, clip_ratio_c=3.0)
    assert (loss, gradient, stats["clip_ratio/dual"]) == (pytest.approx(-1.2), [0.0], 0.0)
    assert "clip_ratio/dual" not in _step([0.0], -1.0)[2]  # off: no such statistic


def test_delta_caps_the_unclipped_ratio_as_trl_does():
    # A < 0, ratio 4, delta 3: -min(min(4, 3) * A, clip(4) * A) = 3, no gradient (as the dual clip at 3).
    assert _step([math.log(4.0)], -1.0, delta=3.0)[:2] == (pytest.approx(3.0), [0.0])
    assert _step([math.log(4.0)], -1.0, delta=3.0)[:2] == _step([math.log(4.0)], -1.0, clip_ratio_c=3.0)[:2]
    # Below delta nothing changes: loss 2, gradient -A * ratio.
    assert _step([math.log(2.0)], -1.0, delta=3.0)[:2] == (pytest.approx(2.0), [pytest.approx(2.0)])
    # TRL caps the unclipped term for either sign: a delta under 1 + eps_high bounds positive advantages too.
    assert _step([math.log(1.15)], +1.0)[:2] == (pytest.approx(-1.15), [pytest.approx(-1.15)])
    assert _step([math.log(1.15)], +1.0, delta=1.1)[:2] == (pytest.approx(-1.1), [0.0])


def test_the_sequence_ratio_is_the_geometric_mean_of_its_tokens_ratios_for_every_token_of_it():
    # Token ratios 0.5 and 8 (then padding), and 1.1: sequence ratios sqrt(0.5 * 8) = 2 and 1.1.
    old = torch.zeros(2, 3)
    logp = torch.log(torch.tensor([[0.5, 8.0, 99.0], [1.1, 99.0, 99.0]]))
    ratio = torch.exp(importance_log_ratio(logp, old, MASK, "sequence"))
    assert ratio.shape == (2, 1)  # one ratio per completion, the same for each of its tokens
    torch.testing.assert_close(ratio, torch.tensor([[2.0], [1.1]]))
    advantages = torch.tensor([1.0, 1.0])
    loss, stats = grpo_loss(logp, old, None, advantages, MASK, beta=0.0, importance_level="sequence")
    assert loss.item() == pytest.approx((-1.2 - 1.1) / 2)  # min(2, 1 + eps_high) and 1.1 per completion
    assert stats["clip_ratio/high"] == pytest.approx(2 / 3)  # both tokens of the first completion clipped
    _, per_token = grpo_loss(logp, old, None, advantages, MASK, beta=0.0)
    assert per_token["clip_ratio/high"] == pytest.approx(1 / 3)  # per token: only ratio 8 is


def test_an_unknown_importance_level_is_refused_by_name():
    with pytest.raises(ValueError, match="importance_level"):
        importance_log_ratio(torch.zeros(2, 3), torch.zeros(2, 3), MASK, "prompt")


@pytest.mark.parametrize("loss_agg", ["grpo", "bnpo", "dr_grpo"])
def test_the_sequence_ratios_gradient_is_that_of_the_stop_gradient_token_form(loss_agg):
    """TRL's exp(mean log ratio), one per completion, and verl's (GSPO-token) per-token
    `exp(sg(mean) + logp - sg(logp))`: the same loss and the same gradient."""
    torch.manual_seed(0)
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.float64)
    logp = (-torch.rand(3, 4, dtype=torch.float64) * 2).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(3, 4, dtype=torch.float64)
    advantages = torch.tensor([0.7, -1.2, 0.4], dtype=torch.float64)
    loss, _ = grpo_loss(logp, old, None, advantages, mask, beta=0.0, loss_agg=loss_agg, max_new_tokens=4,
                        importance_level="sequence")
    (gradient,) = torch.autograd.grad(loss, logp)

    mean = ((logp - old) * mask).sum(-1) / mask.sum(-1)
    token_form = torch.exp(logp - logp.detach() + mean.detach()[:, None])
    adv = advantages[:, None]
    per_token = -torch.minimum(token_form * adv, torch.clamp(token_form, 0.8, 1.2) * adv)
    expected = {"grpo": ((per_token * mask).sum(-1) / mask.sum(-1)).sum() / 3,
                "bnpo": (per_token * mask).sum() / mask.sum(), "dr_grpo": (per_token * mask).sum() / (3 * 4)}[loss_agg]
    (expected_gradient,) = torch.autograd.grad(expected, logp)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(gradient, expected_gradient)
    assert gradient.abs().sum() > 0


def test_cispo_weighs_a_times_logp_by_the_clipped_ratio_and_its_gradient_flows_only_through_logp():
    # Ratios 0.5, 1.1, 2 (eps 0.2): weights 0.8, 1.1, 1.2; A = 2; bnpo over 3 tokens.
    logp = torch.tensor([[-2.0, -1.0, -0.5]], requires_grad=True)
    old = logp.detach() - torch.log(torch.tensor([[0.5, 1.1, 2.0]]))
    loss, stats = grpo_loss(logp, old, None, torch.tensor([2.0]), torch.ones(1, 3), beta=0.0, loss_agg="bnpo",
                            policy_loss="cispo")
    assert loss.item() == pytest.approx(-(0.8 * 2 * -2.0 + 1.1 * 2 * -1.0 + 1.2 * 2 * -0.5) / 3)  # 2.2
    loss.backward()
    # d/d logp of -sg(w) * A * logp / 3: -w * A / 3 for every token, clipped or not (PPO's would be 0
    # at ratio 2). Were the weight not detached, the middle token's would be -(w + w * logp) * A / 3 = 0.
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.8 * 2, -1.1 * 2, -1.2 * 2]]) / 3)
    assert (stats["clip_ratio/low"], stats["clip_ratio/high"]) == (pytest.approx(1 / 3), pytest.approx(1 / 3))


def test_cispo_refuses_the_ppo_only_bounds():
    with pytest.raises(ValueError, match="clip_ratio_c"):
        grpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), None, ADVANTAGES, MASK, beta=0.0, policy_loss="cispo",
                  clip_ratio_c=3.0)
    with pytest.raises(ValueError, match="policy_loss"):
        grpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), None, ADVANTAGES, MASK, beta=0.0, policy_loss="reinforce")


def test_bnpo_divides_by_each_minibatchs_tokens_and_dapo_by_the_iterations_tokens_per_minibatch():
    # An iteration of 4 completions, 2, 4, 1 and 1 tokens long, cut into two minibatches of 2.
    iteration = torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 0, 0, 0]])
    first, second = iteration[:2], iteration[2:]
    assert loss_normaliser("bnpo", first) == 6.0 and loss_normaliser("bnpo", second) == 2.0
    # TRL: num_items_in_batch (8 tokens) * gradient_accumulation_steps (1) / steps_per_generation (2).
    assert loss_normaliser("dapo", first, iteration_mask=iteration) == 4.0
    assert loss_normaliser("dapo", second, iteration_mask=iteration) == 4.0
    # So under dapo every token of the iteration weighs 1/4 in its step; under bnpo 1/6 or 1/2.
    logp = torch.zeros(2, 4)
    for rows, bnpo_count in ((first, 6.0), (second, 2.0)):
        advantages = torch.ones(2)
        dapo, _ = grpo_loss(logp, logp, None, advantages, rows, beta=0.0, loss_agg="dapo", iteration_mask=iteration)
        bnpo, _ = grpo_loss(logp, logp, None, advantages, rows, beta=0.0, loss_agg="bnpo")
        assert dapo.item() == pytest.approx(-rows.sum().item() / 4)
        assert bnpo.item() == pytest.approx(-rows.sum().item() / bnpo_count)


def test_a_masked_truncated_completion_contributes_nothing_and_leaves_the_token_count():
    truncated = torch.tensor([True, False])  # the first ran out of tokens
    logp = torch.full((2, 3), -1.0)
    kept, _ = grpo_loss(logp, logp, None, ADVANTAGES, MASK, beta=0.0, loss_agg="bnpo", truncated=truncated)
    assert kept.item() == pytest.approx(-1.0)  # the second's one token alone, not (-2 - 2 - 1) / 3
    garbage, reference = logp.clone(), logp.clone()
    garbage[0], reference[0] = 50.0, 47.0  # whatever the truncated completion's log-probs, and its reference's
    noisy, _ = grpo_loss(garbage, logp, reference, ADVANTAGES, MASK, beta=0.5, loss_agg="bnpo", truncated=truncated)
    assert noisy.item() == pytest.approx(kept.item())
    # grpo still averages over both completions (as TRL: the masked one counts as a zero).
    per_sequence, _ = grpo_loss(logp, logp, None, ADVANTAGES, MASK, beta=0.0, loss_agg="grpo", truncated=truncated)
    assert per_sequence.item() == pytest.approx((0.0 - 1.0) / 2)


def test_truncated_importance_weights_are_the_capped_ratio_and_scale_the_policy_term_only():
    from stages.objective import logprob_gap, truncated_is_weights

    trainer = torch.tensor([[-1.0, -2.0, -0.5]])
    engine = torch.tensor([[-1.5, -1.0, -0.5]])  # ratios e^0.5 = 1.65, e^-1 = 0.37, 1
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    weights = truncated_is_weights(trainer, engine, cap=1.5)
    torch.testing.assert_close(weights, torch.tensor([[1.5, math.exp(-1.0), 1.0]]))
    assert logprob_gap(trainer, engine, mask) == {"mean": 0.75, "max": 1.0}  # the masked token's 0 is not counted

    logp, old, ref = torch.tensor([[-1.0, -1.0, -1.0]]), torch.tensor([[-1.0, -1.0, -1.0]]), torch.tensor([[-1.2] * 3])
    advantages = torch.tensor([2.0])
    plain, _ = grpo_loss(logp, old, ref, advantages, mask, beta=0.0)
    weighted, _ = grpo_loss(logp, old, ref, advantages, mask, beta=0.0, is_weights=weights)
    # on-policy the surrogate is A per token: the weights scale it token by token, then the mean
    assert plain.item() == pytest.approx(-2.0)
    assert weighted.item() == pytest.approx(-2.0 * (1.5 + math.exp(-1.0)) / 2)
    with_kl, _ = grpo_loss(logp, old, ref, advantages, mask, beta=0.5, is_weights=weights)
    kl_only, _ = grpo_loss(logp, old, ref, torch.tensor([0.0]), mask, beta=0.5)
    assert with_kl.item() == pytest.approx(weighted.item() + kl_only.item())  # the KL is not weighted
