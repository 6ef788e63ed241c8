"""EWC (baselines/ewc.py): the penalty and its gradient (BASELINES.md: with F = 1 the gradient is
2 lambda (theta - theta*), and the penalty is 0 at the anchor), the Fishers by hand (tanh-Gaussian
actor, categorical actor, critics), torch.func's per-sample gradients against a loop of autograd
calls, the sum of Fishers across tasks, the state round trip, that EWC is not plain SAC after a
task switch (its actor is pulled towards the anchor, the more the higher the Fisher), and both
scripts end to end (the exact resume: tests/test_methods.py)."""

import os
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import nbsp_sac_metaworld as mw
import conftest
from baselines.ewc import ACTOR_FISHER_FLOOR, estimate_fisher, fisher_targets, snapshot
from conftest import SCRIPTS, FixedBuffer, atari_batch, load

CPU = torch.device("cpu")
LAMBDA = 1e4
metaworld_learner = partial(conftest.metaworld_learner, "ewc", obs_dim=5, act_dim=2, hidden=[4], batch_size=8,
                            fisher_critic=True, fisher_batches=2)
atari_learner = partial(conftest.atari_learner, "ewc", conv_channels=[2, 2, 2], hidden=[4], batch_size=4,
                        fisher_critic=True, fisher_batches=2)
metaworld_batch = partial(conftest.metaworld_batch, obs_dim=5, act_dim=2)


# --------------------------------------------------------------------------------------------
# The penalty (BASELINES.md)
# --------------------------------------------------------------------------------------------
def test_no_penalty_before_the_first_task_switch():
    _, method = metaworld_learner()
    assert method.extra_loss("actor") is None and method.extra_loss("critic") is None
    assert method.state_dict() == {"fisher": {}, "anchor": {}}


@pytest.mark.parametrize("network", ["actor", "critic"])
def test_unit_fisher_penalty_is_zero_at_the_anchor_and_its_gradient_is_2_lambda_delta(network):
    _, method = metaworld_learner()
    params = method.targets[network].params
    method.fisher[network] = {n: torch.ones_like(p) for n, p in params.items()}
    method.anchor[network] = snapshot(params)

    penalty = method.extra_loss(network)
    penalty.backward()
    assert penalty.item() == 0.0
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in params.values())

    generator = torch.Generator().manual_seed(0)
    deltas = {n: torch.randn(p.shape, generator=generator) for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.add_(deltas[n])
            p.grad = None
    penalty = method.extra_loss(network)
    penalty.backward()
    expected = LAMBDA * sum((d.double() ** 2).sum() for d in deltas.values())
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-5)
    for n, p in params.items():
        torch.testing.assert_close(p.grad, 2 * LAMBDA * deltas[n], rtol=1e-5, atol=1e-3)


def test_critic_is_left_alone_without_fisher_critic():
    _, method = metaworld_learner(fisher_critic=False)
    generator = torch.Generator().manual_seed(1)
    method.end_stage(0, "reach", FixedBuffer(metaworld_batch(generator) for _ in range(2)))
    assert set(method.fisher) == set(method.anchor) == {"actor"}
    assert method.extra_loss("critic") is None and method.extra_loss("actor") is not None


# --------------------------------------------------------------------------------------------
# Fishers by hand
# --------------------------------------------------------------------------------------------
def test_gaussian_actor_and_critic_fisher_of_linear_networks_by_hand():
    """No hidden layer: mu = W_m x + b_m, z = W_s x + b_s, log sigma = -5 + 3.5 (tanh z + 1), so
    d mu_k / d W_m[k, i] = x_i and d sigma_k / d W_s[k, i] = 3.5 sigma_k (1 - tanh^2 z_k) x_i.
    Every sample has x_0 = 0: the actor Fisher of W[:, 0] is the clip floor, the critic's is 0."""
    obs_dim, act_dim = 3, 2
    learner, method = metaworld_learner(obs_dim=obs_dim, act_dim=act_dim, hidden=[])
    generator = torch.Generator().manual_seed(2)
    obs = torch.randn(6, obs_dim, generator=generator)
    obs[:, 0] = 0.0
    actions = torch.rand(6, act_dim, generator=generator) * 2 - 1
    fisher = estimate_fisher(method.targets, [(obs[:4], actions[:4]), (obs[4:], actions[4:])])

    actor = learner.actor
    with torch.no_grad():
        x = obs.double()
        z = x @ actor.fc_logstd.weight.double().T + actor.fc_logstd.bias.double()
        sigma = torch.exp(-5 + 3.5 * (torch.tanh(z) + 1))
        inverse_variance = 1 / (sigma**2 + 1e-6)  # [samples, k]
        dsigma_dz = 3.5 * sigma * (1 - torch.tanh(z) ** 2)
        floor = ACTOR_FISHER_FLOOR
        expected_actor = {
            "fc_mean.weight": (inverse_variance[:, :, None] * x[:, None, :] ** 2).clamp_min(floor).mean(0),
            "fc_mean.bias": inverse_variance.clamp_min(floor).mean(0),
            "fc_logstd.weight": (2 * inverse_variance[:, :, None] * dsigma_dz[:, :, None] ** 2 * x[:, None, :] ** 2)
            .clamp_min(floor).mean(0),
            "fc_logstd.bias": (2 * inverse_variance * dsigma_dz**2).clamp_min(floor).mean(0),
        }
    assert set(fisher["actor"]) == set(expected_actor)
    for name, value in expected_actor.items():
        torch.testing.assert_close(fisher["actor"][name], value.float(), rtol=1e-4, atol=0)
    assert torch.all(fisher["actor"]["fc_mean.weight"][:, 0] == floor)

    # critics: Q_m = [x, a] . W[m, :, 0] + b[m]; both members see the same inputs
    inputs = torch.cat([obs, actions], 1)
    expected_weight = (inputs**2).mean(0)[None, :, None].expand(2, -1, 1)
    torch.testing.assert_close(fisher["critic"]["critics.0.head.weight"], expected_weight)
    torch.testing.assert_close(fisher["critic"]["critics.0.head.bias"], torch.ones(2, 1, 1))
    assert torch.all(fisher["critic"]["critics.0.head.weight"][:, 0] == 0)  # the critic Fisher is not clipped


def test_categorical_fisher_of_a_linear_policy_by_hand():
    """logits = W x + b: sum_a pi_a (d log pi_a / d W[c, i])^2 = sum_a pi_a (1[a=c] - pi_c)^2 x_i^2
    = pi_c (1 - pi_c) x_i^2."""
    actor = nn.Linear(3, 4)
    targets = fisher_targets(SimpleNamespace(actor=actor, discrete=True), include_critics=False)
    generator = torch.Generator().manual_seed(3)
    obs = torch.randn(5, 3, generator=generator)
    obs[:, 2] = 1e-4  # pi (1 - pi) x^2 < 1e-5: clipped per sample
    fisher = estimate_fisher(targets, [(obs, None)])["actor"]
    with torch.no_grad():
        pi = torch.softmax(actor(obs), 1)
        spread = pi * (1 - pi)
    floor = ACTOR_FISHER_FLOOR
    torch.testing.assert_close(fisher["weight"], (spread[:, :, None] * obs[:, None, :] ** 2).clamp_min(floor).mean(0))
    torch.testing.assert_close(fisher["bias"], spread.clamp_min(floor).mean(0))
    assert torch.all(fisher["weight"][:, 2] == floor)


def loop_fisher(module_outputs, params, samples, floor):
    """The Fisher definitions with one autograd call per sample and output row."""
    total = [torch.zeros_like(p) for p in params]
    for sample in samples:
        rows, weights = module_outputs(sample)
        per_sample = [torch.zeros_like(p) for p in params]
        for row, weight in zip(rows, weights, strict=True):
            grads = torch.autograd.grad(row, params, retain_graph=True, allow_unused=True)
            for acc, g in zip(per_sample, grads, strict=True):
                if g is not None:
                    acc += weight * g**2
        for acc, f in zip(total, per_sample, strict=True):
            acc += f.clamp_min(floor)
    return [f / len(samples) for f in total]


def test_atari_per_sample_fisher_matches_a_loop_of_autograd_calls():
    """Conv trunk, uint8 frames, both critics through `q_values`: torch.func's vmap of jacrev
    gives what one autograd call per sample and output does."""
    learner, method = atari_learner()
    obs, actions, *_ = atari_batch(torch.Generator().manual_seed(4))
    fisher = estimate_fisher(method.targets, [(obs, actions)])

    actor_params = list(learner.actor.parameters())

    def actor_rows(sample):
        log_pi = torch.log_softmax(learner.actor(obs[sample : sample + 1])[0], 0)
        return log_pi, log_pi.exp().detach()  # sum_a pi_a (d log pi_a)^2

    expected = loop_fisher(actor_rows, actor_params, range(len(obs)), ACTOR_FISHER_FLOOR)
    for (name, _), value in zip(learner.actor.named_parameters(), expected, strict=True):
        torch.testing.assert_close(fisher["actor"][name], value, rtol=1e-4, atol=1e-9)

    critic_params = list(learner.qf1.parameters()) + list(learner.qf2.parameters())

    def critic_rows(sample):
        q = learner.q_values(obs[sample : sample + 1], actions[sample : sample + 1])[:, 0]
        return q, torch.ones(2)  # (dQ1)^2 + (dQ2)^2, each critic's parameters see their own

    expected = loop_fisher(critic_rows, critic_params, range(len(obs)), 0.0)
    names = [f"critics.{i}.{n}" for i, qf in enumerate(learner.critics) for n, _ in qf.named_parameters()]
    for name, value in zip(names, expected, strict=True):
        torch.testing.assert_close(fisher["critic"][name], value, rtol=1e-4, atol=1e-9)


def test_metaworld_per_sample_fisher_matches_a_loop_of_autograd_calls():
    learner, method = metaworld_learner(hidden=[4, 4])
    obs, actions, *_ = metaworld_batch(torch.Generator().manual_seed(5), n=5)
    fisher = estimate_fisher(method.targets, [(obs, actions)])

    def actor_rows(sample):
        mean, log_std = learner.actor(obs[sample : sample + 1])
        std = log_std.exp()[0]
        weight = (1 / (std**2 + 1e-6)).detach()
        return torch.cat([mean[0], std]), torch.cat([weight, 2 * weight])

    expected = loop_fisher(actor_rows, list(learner.actor.parameters()), range(len(obs)), ACTOR_FISHER_FLOOR)
    for (name, _), value in zip(learner.actor.named_parameters(), expected, strict=True):
        torch.testing.assert_close(fisher["actor"][name], value, rtol=1e-4, atol=1e-9)


# --------------------------------------------------------------------------------------------
# Task switches and state
# --------------------------------------------------------------------------------------------
def test_fishers_sum_across_tasks_and_the_anchor_is_the_latest_task_end():
    learner, method = metaworld_learner()
    generator = torch.Generator().manual_seed(6)
    batches = [metaworld_batch(generator) for _ in range(4)]
    first = estimate_fisher(method.targets, batches[:2])
    method.end_stage(0, "reach", FixedBuffer(batches[:2]))
    with torch.no_grad():
        for p in list(learner.actor.parameters()) + list(learner.qf.parameters()):
            p.add_(0.1)
    second = estimate_fisher(method.targets, batches[2:])
    method.end_stage(1, "drawer-close", FixedBuffer(batches[2:]))
    for network in ("actor", "critic"):
        params = method.targets[network].params
        for name, p in params.items():
            torch.testing.assert_close(method.fisher[network][name], first[network][name] + second[network][name])
            assert torch.equal(method.anchor[network][name], p.detach())
            assert method.anchor[network][name].data_ptr() != p.data_ptr()  # a copy, not the live tensor


@pytest.mark.parametrize("make_learner, make_batch", [(metaworld_learner, metaworld_batch),
                                                      (atari_learner, atari_batch)], ids=["metaworld", "atari"])
def test_state_round_trip_restores_the_penalty(make_learner, make_batch):
    learner, method = make_learner()
    generator = torch.Generator().manual_seed(7)
    method.end_stage(0, "task", FixedBuffer(make_batch(generator) for _ in range(2)))
    with torch.no_grad():
        for p in learner.actor.parameters():
            p.add_(0.01)
    conftest.assert_penalty_restored(make_learner, learner, method)


# --------------------------------------------------------------------------------------------
# Both scripts end to end
# --------------------------------------------------------------------------------------------
@pytest.mark.e2e
@pytest.mark.parametrize("name", list(SCRIPTS))
def test_end_to_end_fisher_and_anchor(name, method_runs):
    """EWC's state in the shared tiny runs (tests/test_methods.py checks that they resume exactly)."""
    runs = method_runs(name, "ewc")
    checkpoint = load(os.path.join(runs.run_dir, "checkpoint.pt"))
    stage_1 = load(os.path.join(runs.run_dir, "checkpoints", "stage_1.pt"))
    state = checkpoint["method"]
    assert set(state) == {"fisher", "anchor"} and set(state["fisher"]) == {"actor", "critic"}
    # one Fisher per regularised tensor: the whole actor (heads included), every critic
    assert set(state["fisher"]["actor"]) == set(dict(stage_1["actor"]).keys() - {"action_scale", "action_bias"})
    assert all(f.min() >= ACTOR_FISHER_FLOOR for f in state["fisher"]["actor"].values())
    critic_weights = {"critics.0." + k: v for k, v in stage_1["qf"].items()} if runs.script is mw else \
        {f"critics.{i}.{k}": v for i, qf in enumerate(("qf1", "qf2")) for k, v in stage_1[qf].items()}
    assert set(state["fisher"]["critic"]) == set(critic_weights)
    # the anchor is the end of stage 1; stage 2 trained away from it under the penalty
    for name_, value in state["anchor"]["actor"].items():
        assert torch.equal(value, stage_1["actor"][name_])
    for name_, value in state["anchor"]["critic"].items():
        assert torch.equal(value, critic_weights[name_])
    assert not torch.equal(checkpoint["actor"]["trunk.0.weight"], stage_1["actor"]["trunk.0.weight"])
    assert runs.killed_checkpoint["method"]["fisher"]  # saved at the task switch


# --------------------------------------------------------------------------------------------
# Not plain SAC
# --------------------------------------------------------------------------------------------
def pulled_towards_the_anchor(learner, plain, fisher, anchor):
    """(Fisher-weighted squared distance to the anchor of the method's actor over plain SAC's,
    mean |theta - theta*| of the method over plain SAC's for the actor parameters of the top 10%
    Fisher, the same for those of the bottom half)."""
    method_params, plain_params = dict(learner.actor.named_parameters()), dict(plain.actor.named_parameters())

    def weighted(params):
        return sum((fisher[n] * (params[n].detach() - anchor[n]) ** 2).sum() for n in fisher)

    f = torch.cat([fisher[n].flatten() for n in fisher])
    moved, moved_plain = ((torch.cat([(p[n].detach() - anchor[n]).flatten() for n in fisher]).abs())
                          for p in (method_params, plain_params))
    high, low = f >= f.quantile(0.9), f <= f.quantile(0.5)
    return (float(weighted(method_params) / weighted(plain_params)),
            float(moved[high].mean() / moved_plain[high].mean()), float(moved[low].mean() / moved_plain[low].mean()))


def test_ewc_is_not_plain_sac(side_by_side):
    """After a first task and its switch (Fisher on 2 batches, anchor), EWC and plain SAC train 200
    updates of the next task from the same weights and Adam moments (EWC resets none) on the same
    batches. EWC's actor stays near the anchor where plain SAC's leaves it: its Fisher-weighted
    squared distance is under 5% of plain SAC's (measured 0.3%), and the pull follows the Fisher:
    parameters of the top 10% Fisher keep under a quarter of the relative movement of those of
    the bottom half (measured 0.012 against 0.65)."""
    learner, method = metaworld_learner(hidden=[8, 8], fisher_critic=False)
    generator = torch.Generator().manual_seed(8)
    method.begin_stage(0, "first")
    side_by_side(learner, None, [metaworld_batch(generator) for _ in range(50)])
    method.end_stage(0, "first", FixedBuffer(metaworld_batch(generator) for _ in range(2)))
    method.begin_stage(1, "second")
    plain = learner.plain_copy()
    side_by_side(learner, plain, [metaworld_batch(generator) for _ in range(200)])
    weighted, high, low = pulled_towards_the_anchor(learner, plain, method.fisher["actor"], method.anchor["actor"])
    assert weighted < 0.05 and high < 0.25 * low, (weighted, high, low)
