"""The GRPO objective, checked against values computed by hand."""

import math

import pytest
import torch

from stages.objective import group_advantages, grpo_loss, k3_kl, zero_std_groups

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
    ("dapo", (-2.0 - 2.0 - 1.0) / 3),  # every token alike
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
    for agg in ("grpo", "dapo", "dr_grpo"):
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
