"""Tests of nbsp_sac_atari.py: the Atari-specific parts with hand-computed expectations, and
tiny end-to-end runs (two games, two cycles) that reach updates, identification, masking, Dpre
replay, evaluation and resume."""
import copy
import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import ale_py
import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import nbsp_sac_atari as atari
import protocol
import paper_tables
import skill_neurons as sn
from fast_adam import StepMask
from conftest import ATARI_TINY

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nbsp_sac_atari.py")


# ------------------------------------------------------------------------------------------
# Normalization and metrics
# ------------------------------------------------------------------------------------------
def test_normalized_score_uses_paper_table_7():
    scores = atari.parse_game_scores([])
    assert atari.normalized_score(-20.7, scores["Pong"]) == pytest.approx(0.0)
    assert atari.normalized_score(9.3, scores["Pong"]) == pytest.approx(1.0)
    assert atari.normalized_score(-5.7, scores["Pong"]) == pytest.approx(0.5)  # (-5.7 + 20.7) / 30
    assert atari.normalized_score(154.8, scores["Bowling"]) == pytest.approx(1.0)
    assert atari.normalized_score(14.2 + 72.02, scores["BankHeist"]) == pytest.approx(0.1)  # 72.02 / 720.2
    assert atari.normalized_score(227.5, scores["Alien"]) == pytest.approx(0.0)


def test_game_scores_flag_adds_games_and_keeps_table_7():
    scores = atari.parse_game_scores(["breakout=1.7,31.8"])
    assert scores["Breakout"] == (1.7, 31.8)
    assert scores["Pong"] == (-20.7, 9.3)
    assert atari.normalized_score(16.75, scores["Breakout"]) == pytest.approx(0.5)


def test_continual_metrics_average_return():
    sr = [[0.8], [0.2, 0.6], [0.5, 0.1, 0.9]]
    metrics = protocol.continual_metrics(sr, "AR")
    assert metrics["AR"] == pytest.approx((0.8 + (0.2 + 0.6) / 2 + (0.5 + 0.1 + 0.9) / 3) / 3)
    assert metrics["FWT"] == pytest.approx((0.8 + 0.6 + 0.9) / 3)
    # i=1: j=0: 0.8-0.2=0.6; i=2: j=0: max(0.8,0.2)-0.5=0.3, j=1: 0.6-0.1=0.5 -> (0.6 + 0.8/2) / 2
    assert metrics["FM"] == pytest.approx((0.6 + (0.3 + 0.5) / 2) / 2)


def test_continual_metrics_with_a_missing_score():
    """A missing entry (no game finished) makes every metric that reads it missing: the last
    diagonal entry is read by AR and FWT, not by FM; an earlier one by all three."""
    last_missing = protocol.continual_metrics([[0.8], [0.2, None]], "AR")
    assert last_missing["AR"] is None and last_missing["FWT"] is None
    assert last_missing["FM"] == pytest.approx(0.8 - 0.2)
    assert protocol.continual_metrics([[None], [0.2, 0.6]], "AR") == {"AR": None, "FM": None, "FWT": None}
    assert protocol.continual_metrics([[0.8], [None, 0.6]], "AR") == {"AR": None, "FM": None, "FWT": pytest.approx(0.7)}
    table = protocol.matrix_table(["Pong", "Bowling"], [[0.8], [0.2, None]])
    assert table.splitlines()[2].split()[-2:] == ["0.20", "n/a"]
    assert protocol.summary_line(last_missing, "AR", "m.json") == "AR=n/a FM=0.600 FWT=n/a -> m.json"


# ------------------------------------------------------------------------------------------
# Environments: preprocessing and the full-game goal metric under life-loss wrappers
# ------------------------------------------------------------------------------------------
def test_area_resize_averages_the_covered_pixels():
    rows = atari.area_resize_matrix(210, 84)
    assert rows.shape == (84, 210)
    np.testing.assert_allclose(rows.sum(1), 1.0, rtol=1e-6)
    # output row 0 covers input rows [0, 2.5): weights 0.4, 0.4, 0.2
    np.testing.assert_allclose(rows[0, :3], [0.4, 0.4, 0.2], rtol=1e-6)
    assert rows[0, 3:].sum() == 0
    frame = np.zeros((210, 160), np.uint8)
    frame[:5, :] = 200  # input rows 0-4 = output rows 0-1 exactly
    env = atari.ResizeFrame(FakeAtari())
    out = env.observation(frame)
    assert out.shape == (84, 84) and out.dtype == np.uint8
    assert (out[:2] == 200).all() and (out[2:] == 0).all()


def test_make_env_full_action_space_and_stacked_uint8_frames():
    env = atari.make_env("Bowling", 0, train=True)
    obs, _ = env.reset(seed=0)
    assert env.action_space == gym.spaces.Discrete(18)
    assert obs.shape == (4, 84, 84) and obs.dtype == np.uint8
    assert env.unwrapped.ale.getFloat("repeat_action_probability") == 0.0
    sticky = atari.make_env("Pong", 0, train=False, sticky_actions=True)
    assert sticky.unwrapped.ale.getFloat("repeat_action_probability") == pytest.approx(0.25)
    env.close()
    sticky.close()


class FakeALE:
    def __init__(self, env):
        self.env = env

    def lives(self):
        return self.env.lives

    def getMinimalActionSet(self):
        return [ale_py.Action.NOOP, ale_py.Action.FIRE, ale_py.Action.UP]


class FakeAtari(gym.Env):
    """A 3-life game: a life is lost every 40 frames; action 3 scores 7 points a frame in the
    first game and 5 in later ones. It keeps its own ledger of every game's true score."""

    observation_space = gym.spaces.Box(0, 255, (210, 160), np.uint8)
    action_space = gym.spaces.Discrete(18)

    def __init__(self):
        self.ale = FakeALE(self)
        self.games, self.life_scores = [], []
        self.lives = 3

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.lives, self.frame, self.score, self.life_score = 3, 0, 0.0, 0.0
        return self._obs(), {}

    def step(self, action):
        self.frame += 1
        reward = (7.0 if not self.games else 5.0) if action == 3 else 0.0
        self.score += reward
        self.life_score += reward
        if self.frame % 40 == 0:
            self.lives -= 1
            self.life_scores.append(self.life_score)
            self.life_score = 0.0
        terminated = self.lives == 0
        if terminated:
            self.games.append(self.score)
        return self._obs(), reward, terminated, False, {}

    def _obs(self):
        return np.full((210, 160), self.frame % 256, np.uint8)


def always_action_3(obs):
    return torch.full((len(obs),), 3)


def test_full_game_return_is_goal_metric_under_life_loss_wrappers():
    env = atari.wrap_atari(FakeAtari(), train=True)
    fake = env.unwrapped
    # the training wrappers: a life loss ends the episode, rewards are clipped
    env.reset(seed=0)
    _, reward, terminated, _, info = env.step(3)
    assert reward == 1.0  # sign(4 frames x 7)
    episode_ends = 0
    while "episode" not in info:
        _, _, terminated, truncated, info = env.step(3)
        if terminated and "episode" not in info:
            episode_ends += 1
            env.reset()
    assert episode_ends == 2  # two lives lost before the game over
    assert info["episode"]["r"] == fake.games[0]  # raw, unclipped, all lives

    fake.games.clear()
    fake.life_scores.clear()
    window = atari.rollout([env], always_action_3, seed=5, device="cpu", max_steps=10_000, max_games=2)
    assert window["finished"].all() and len(window["return"]) == 2
    np.testing.assert_allclose(window["return"], fake.games)  # the fake's own ledger of the true scores
    assert fake.games[0] != fake.games[1]  # 7 vs 5 points a frame: the two games are told apart
    assert max(fake.life_scores) < min(fake.games)  # a single life's return is not the goal metric
    goal = window["return"][window["game"]]
    assert len(goal) == window["steps"]
    # every step carries the full return of its own game: game 0's steps first, then game 1's
    switch = int(np.argmax(window["game"] == 1))
    assert (window["game"][:switch] == 0).all() and (window["game"][switch:] == 1).all()
    assert (goal[:switch] == fake.games[0]).all() and (goal[switch:] == fake.games[1]).all()


def test_rollout_budget_cuts_games_and_reports_their_return_so_far():
    envs = [atari.wrap_atari(FakeAtari(), train=False) for _ in range(2)]
    result = atari.rollout(envs, always_action_3, seed=0, device="cpu", max_steps=10)
    assert result["steps"] == 10 and not result["finished"].any()
    assert len(result["return"]) == 2
    # 5 policy steps each, 4 frames of 7 points: 140, plus nothing scored during reset frames
    np.testing.assert_allclose(result["return"], [140.0, 140.0])


def test_seeded_rollouts_repeat_even_after_a_game_was_cut_off():
    """A seeded reset starts a new game, also under the life-loss wrapper whose plain reset
    continues a cut-off game: evaluation and identification windows are reproducible."""
    envs = [atari.wrap_atari(FakeAtari(), train=True)]
    first = atari.rollout(envs, always_action_3, seed=0, device="cpu", max_steps=7)  # cut in the 1st life
    second = atari.rollout(envs, always_action_3, seed=0, device="cpu", max_steps=7)
    assert not first["finished"].any()
    np.testing.assert_array_equal(first["return"], second["return"])
    full = atari.rollout(envs, always_action_3, seed=0, device="cpu", max_steps=1000, max_games=1)
    assert full["finished"].all() and full["return"][0] == envs[0].unwrapped.games[-1]


# ------------------------------------------------------------------------------------------
# Networks: conv channels as neurons, masking of conv channels, discrete SAC update
# ------------------------------------------------------------------------------------------
def test_conv_channels_are_recorded_as_spatial_means():
    torch.manual_seed(0)
    actor = atari.Actor(18, [4, 6, 5], [7, 3])
    layers = actor.hidden_layers()
    assert [layer.num_neurons for layer in layers] == [4, 6, 5, 7, 3]
    x = torch.randint(0, 256, (3, 4, 84, 84), dtype=torch.uint8)
    with sn.ActivationRecorder(layers) as recorder, torch.no_grad():
        actor(x)
    recorded = recorder.activations()
    conv1, conv2, conv3, fc1, fc2 = (m for m in actor.trunk if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    with torch.no_grad():
        h1 = F.relu(F.conv2d(x.float() / 255.0, conv1.weight, conv1.bias, stride=4))
        h2 = F.relu(F.conv2d(h1, conv2.weight, conv2.bias, stride=2))
        h3 = F.relu(F.conv2d(h2, conv3.weight, conv3.bias, stride=1))
        f1 = F.relu(h3.flatten(1) @ fc1.weight.T + fc1.bias)
        f2 = F.relu(f1 @ fc2.weight.T + fc2.bias)
    assert h1.shape == (3, 4, 20, 20) and h3.shape == (3, 5, 7, 7)
    for got, expected in zip(recorded, [h1.mean((2, 3)), h2.mean((2, 3)), h3.mean((2, 3)), f1, f2]):
        torch.testing.assert_close(got, expected)


def test_masked_update_scales_the_step_of_conv_channels():
    torch.manual_seed(0)
    qf = atari.SoftQNetwork(18, [4, 6, 5], [7])
    reference = copy.deepcopy(qf)
    layers = qf.hidden_layers()
    neuron_masks = [torch.tensor([0.0, 0.5, 1.0, 1.0]), torch.ones(6), torch.tensor([1, 1, 1, 1, 0.25]), torch.ones(7)]
    optimizer, step_mask = torch.optim.Adam(qf.parameters(), lr=1e-2, eps=1e-4), StepMask("update")
    step_mask.set(sn.parameter_masks(layers, neuron_masks))
    reference_optimizer = torch.optim.Adam(reference.parameters(), lr=1e-2, eps=1e-4)
    x = torch.randint(0, 256, (5, 4, 84, 84), dtype=torch.uint8)
    before = copy.deepcopy(qf.state_dict())
    for net, opt in ((qf, optimizer), (reference, reference_optimizer)):
        opt.zero_grad()
        (net(x) ** 2).mean().backward()
        atari.SACLearner.masked_step(opt, step_mask) if opt is optimizer else opt.step()
    step = {k: qf.state_dict()[k] - before[k] for k in before}
    full = {k: reference.state_dict()[k] - before[k] for k in before}
    for name, channel_masks in (("trunk.0", [0.0, 0.5, 1.0, 1.0]), ("trunk.4", [1, 1, 1, 1, 0.25])):
        for param in ("weight", "bias"):
            key = f"{name}.{param}"
            assert (full[key].reshape(len(channel_masks), -1).abs().sum(1) > 0).all()  # every channel moves unmasked
            for channel, mask in enumerate(channel_masks):
                torch.testing.assert_close(step[key][channel], mask * full[key][channel])
    torch.testing.assert_close(step["trunk.2.weight"], full["trunk.2.weight"])
    torch.testing.assert_close(step["fc_q.weight"], full["fc_q.weight"])  # the head is never masked
    assert step["trunk.0.weight"][0].abs().max() == 0


def test_discrete_sac_update_and_hard_target_copy():
    args = atari.Args(conv_channels=[4, 4, 4], hidden=[8])
    sac = atari.SACLearner(18, args, torch.device("cpu"))
    assert sac.target_entropy == pytest.approx(0.89 * math.log(18))
    batch = 6
    data = (torch.randint(0, 256, (batch, 4, 84, 84), dtype=torch.uint8), torch.randint(0, 18, (batch,)),
            torch.randn(batch), torch.randint(0, 256, (batch, 4, 84, 84), dtype=torch.uint8), torch.zeros(batch))
    target_before = copy.deepcopy(sac.qf1_target.state_dict())
    actor_before = copy.deepcopy(sac.actor.state_dict())
    logs = sac.update(data, update_policy=True, update_target=False)
    assert all(torch.isfinite(v) for v in logs.values())
    for k, v in sac.qf1_target.state_dict().items():
        torch.testing.assert_close(v, target_before[k])
    assert not torch.equal(sac.qf1.state_dict()["fc_q.weight"], target_before["fc_q.weight"])
    assert not torch.equal(sac.actor.state_dict()["fc_logits.weight"], actor_before["fc_logits.weight"])
    assert sac.log_alpha.item() != pytest.approx(math.log(0.2))
    sac.update(data, update_policy=True, update_target=True)
    for online, target in ((sac.qf1, sac.qf1_target), (sac.qf2, sac.qf2_target)):
        for k, v in online.state_dict().items():
            assert torch.equal(v, target.state_dict()[k])  # tau = 1: a hard copy


def cleanrl_update(nets, optimizers, log_alpha, masks, data, args, update_target):
    """CleanRL's sac_atari.py update written out literally (plain Adam, alpha read back as a
    float, the target copy as a parameter loop), with NBSP's update masks applied per parameter."""
    actor, qf1, qf2, qf1_target, qf2_target = nets
    q_optimizer, actor_optimizer, a_optimizer = optimizers
    obs, actions, rewards, next_obs, dones = data
    alpha = log_alpha.exp().item()

    def masked_step(optimizer, params):
        old = [p.detach().clone() for p in params]
        optimizer.step()
        with torch.no_grad():
            for p, p_old in zip(params, old):
                if p in masks:
                    p.copy_(p_old + masks[p] * (p - p_old))

    with torch.no_grad():
        logits = actor(next_obs)
        next_state_log_pi = F.log_softmax(logits, dim=1)
        next_state_action_probs = next_state_log_pi.exp()
        min_qf_next_target = next_state_action_probs * (
            torch.min(qf1_target(next_obs), qf2_target(next_obs)) - alpha * next_state_log_pi)
        next_q_value = rewards.flatten() + (1 - dones.flatten()) * args.gamma * min_qf_next_target.sum(dim=1)
    qf1_a_values = qf1(obs).gather(1, actions.long().view(-1, 1)).view(-1)
    qf2_a_values = qf2(obs).gather(1, actions.long().view(-1, 1)).view(-1)
    qf1_loss, qf2_loss = F.mse_loss(qf1_a_values, next_q_value), F.mse_loss(qf2_a_values, next_q_value)
    q_optimizer.zero_grad()
    (qf1_loss + qf2_loss).backward()
    masked_step(q_optimizer, list(qf1.parameters()) + list(qf2.parameters()))
    log_pi = F.log_softmax(actor(obs), dim=1)
    action_probs = log_pi.exp()
    with torch.no_grad():
        min_qf_values = torch.min(qf1(obs), qf2(obs))
    actor_loss = (action_probs * ((alpha * log_pi) - min_qf_values)).mean()
    actor_optimizer.zero_grad()
    actor_loss.backward()
    masked_step(actor_optimizer, list(actor.parameters()))
    target_entropy = -args.target_entropy_scale * torch.log(1 / torch.tensor(18.0))
    alpha_loss = (action_probs.detach() * (-log_alpha.exp() * (log_pi + target_entropy).detach())).mean()
    a_optimizer.zero_grad()
    alpha_loss.backward()
    a_optimizer.step()
    if update_target:
        for q, q_target in ((qf1, qf1_target), (qf2, qf2_target)):
            for param, target_param in zip(q.parameters(), q_target.parameters()):
                target_param.data.copy_(args.tau * param.data + (1 - args.tau) * target_param.data)
    return {"qf1_loss": qf1_loss, "qf2_loss": qf2_loss, "actor_loss": actor_loss, "alpha_loss": alpha_loss}


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compile"])
def test_update_equals_cleanrl_sac_atari_with_masks_and_two_buffers(compile):
    """Every third batch from a second buffer, as Dpre's would be. Also under --compile: the whole
    update one graph without graph breaks (one graph with the target copy, one without), equal to
    float32 rounding."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    args = atari.Args(conv_channels=[4, 8, 8], hidden=[16, 12], batch_size=8)
    sac = atari.SACLearner(18, args, torch.device("cpu"), compile=compile)
    nets = [copy.deepcopy(n) for n in (sac.actor, sac.qf1, sac.qf2, sac.qf1_target, sac.qf2_target)]
    log_alpha = sac.log_alpha.detach().clone().requires_grad_(True)
    optimizers = (torch.optim.Adam(list(nets[1].parameters()) + list(nets[2].parameters()), lr=args.q_lr, eps=1e-4),
                  torch.optim.Adam(nets[0].parameters(), lr=args.policy_lr, eps=1e-4),
                  torch.optim.Adam([log_alpha], lr=args.q_lr, eps=1e-4))
    generator = torch.Generator().manual_seed(1)
    reference_masks = {}
    for step_mask, fast_nets, reference_nets in ((sac.actor_mask, [sac.actor], [nets[0]]),
                                                 (sac.q_mask, [sac.qf1, sac.qf2], nets[1:3])):
        layers = [layer for net in fast_nets for layer in net.hidden_layers()]
        neuron_masks = []
        for layer in layers:
            scores = 0.5 + 0.5 * torch.rand(layer.num_neurons, generator=generator)
            neuron_masks.append(sn.neuron_mask(scores, sn.select_top(scores, 0.3), alpha=0.2))
        masks = sn.parameter_masks(layers, neuron_masks)
        step_mask.set(masks)
        fast_params = [p for net in fast_nets for p in net.parameters()]
        reference_params = [p for net in reference_nets for p in net.parameters()]
        reference_masks |= {ref: masks[p] for p, ref in zip(fast_params, reference_params) if p in masks}
    d, dpre = atari.ReplayBuffer(200, "cpu"), atari.ReplayBuffer(200, "cpu")
    for buffer, seed in ((d, 0), (dpre, 1)):
        rng = np.random.default_rng(seed)
        stack = rng.integers(0, 256, (4, 84, 84), dtype=np.uint8)
        for i in range(60):
            next_stack = np.concatenate([stack[1:], rng.integers(0, 256, (1, 84, 84), dtype=np.uint8)])
            buffer.add(stack, rng.integers(18), rng.normal(), next_stack, i % 17 == 16)
            stack = next_stack
    for update in range(12):
        data = (dpre if update % 3 == 0 else d).sample(args.batch_size)
        update_target = update % 5 == 4
        fast = sac.update(data, update_policy=True, update_target=update_target)
        reference = cleanrl_update(nets, optimizers, log_alpha, reference_masks, data, args, update_target)
        for name, value in reference.items():
            torch.testing.assert_close(fast[name], value.detach(), rtol=1e-4, atol=1e-5)
    for fast_net, reference_net in zip((sac.actor, sac.qf1, sac.qf2, sac.qf1_target, sac.qf2_target), nets):
        for (name, p), q in zip(fast_net.named_parameters(), reference_net.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(sac.log_alpha, log_alpha, rtol=1e-4, atol=1e-5)
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] == (2 if compile else 0)


def test_compiled_update_stays_exact_when_a_new_stage_recompiles_it():
    """A stage's new masks recompile the update: the new graph still trains the temperature and
    every parameter as the eager update does (tests/test_fast_path.py has the Meta-World twin)."""
    torch._dynamo.reset()
    counters.clear()
    args = atari.Args(conv_channels=[4, 8, 8], hidden=[16, 12], batch_size=8)
    learners = []
    for compile in (False, True):
        torch.manual_seed(0)
        learners.append(atari.SACLearner(18, args, torch.device("cpu"), compile=compile))
    eager, compiled = learners
    d = atari.ReplayBuffer(200, "cpu")
    rng = np.random.default_rng(0)
    for i in range(60):
        d.add(rng.integers(0, 256, (4, 84, 84), dtype=np.uint8), rng.integers(18), rng.normal(),
              rng.integers(0, 256, (4, 84, 84), dtype=np.uint8), i % 17 == 16)
    for stage in range(2):
        if stage == 1:  # NBSP's second stage: masks on both steps, so a new graph
            for learner in learners:
                scores = torch.Generator().manual_seed(1)  # the same masks on both
                for step_mask, nets in ((learner.actor_mask, [learner.actor]), (learner.q_mask, [learner.qf1, learner.qf2])):
                    layers = [layer for net in nets for layer in net.hidden_layers()]
                    neuron_masks = [sn.neuron_mask(s, sn.select_top(s, 0.3), alpha=0.2) for s in
                                    (0.5 + 0.5 * torch.rand(layer.num_neurons, generator=scores) for layer in layers)]
                    step_mask.set(sn.parameter_masks(layers, neuron_masks))
        for update in range(8):
            data = d.sample(args.batch_size)
            for learner in learners:
                torch.manual_seed(100 * stage + update)
                learner.update(data, update_policy=True, update_target=True)
        if stage == 0:
            alpha_after_stage_1 = eager.log_alpha.item()
    assert counters["stats"]["unique_graphs"] == 2  # one per stage
    assert abs(eager.log_alpha.item() - alpha_after_stage_1) > 1e-4  # stage 2 trains the temperature
    torch.testing.assert_close(compiled.log_alpha, eager.log_alpha, rtol=1e-4, atol=1e-5)
    for name in ("actor", "qf1", "qf2", "qf1_target", "qf2_target"):
        for p_e, p_c in zip(getattr(eager, name).parameters(), getattr(compiled, name).parameters(), strict=True):
            torch.testing.assert_close(p_c, p_e, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------
# The memory-lean replay buffer
# ------------------------------------------------------------------------------------------
def frame(frame_id):
    f = np.zeros((84, 84), np.uint8)
    f[0, 0], f[0, 1] = frame_id % 256, frame_id // 256
    f[1:] = frame_id % 7  # some content besides the id
    return f


def make_episodes(lengths, starts=None):
    """Transitions as FrameStackObservation makes them, with unique frames: episode k starts from
    `starts[k]` (frame offsets of its first stack; default all equal: the reset padding) and ends
    terminated when k is even, truncated when odd. reward = transition index (its identity)."""
    transitions, next_id = [], 1
    for k, length in enumerate(lengths):
        offsets = (starts or {}).get(k, [0, 0, 0, 0])
        ids = [next_id + o for o in offsets]
        next_id += max(offsets) + 1
        stack = np.stack([frame(i) for i in ids])
        for t in range(length):
            next_stack = np.concatenate([stack[1:], frame(next_id)[None]])
            next_id += 1
            done = t == length - 1 and k % 2 == 0
            transitions.append((stack, len(transitions) % 18, float(len(transitions)), next_stack, done))
            stack = next_stack
    return transitions


def check_samples(buffer, transitions, expected_ids, samples=3000):
    obs, actions, rewards, next_obs, dones = buffer.sample(samples)
    assert obs.dtype == torch.uint8 and obs.shape == (samples, 4, 84, 84)
    seen = set()
    for i in range(samples):
        t = int(rewards[i])
        seen.add(t)
        o, a, _, n, d = transitions[t]
        assert np.array_equal(obs[i].numpy(), o), f"observation of transition {t}"
        assert np.array_equal(next_obs[i].numpy(), n), f"next observation of transition {t}"
        assert int(actions[i]) == a and float(dones[i]) == float(d)
    assert seen == set(expected_ids)


def test_replay_returns_the_right_next_observation_across_episode_ends():
    transitions = make_episodes([3, 1, 6, 2, 9, 1, 4], starts={2: [0, 0, 1, 2], 4: [0, 1, 2, 3]})
    buffer = atari.ReplayBuffer(100, "cpu")
    for t in transitions:
        buffer.add(*t)
    assert buffer.size == len(transitions) == 26
    # slots: one per observation, episodes' final ones included, leading repeats stored once
    assert buffer.slots_written == 26 + 7 + 2 + 3
    check_samples(buffer, transitions, range(len(transitions)))


def test_replay_ring_wraps_and_evicts_oldest_transitions():
    transitions = make_episodes([5, 2, 7, 1, 1, 1, 12, 3, 8, 2, 6])
    buffer = atari.ReplayBuffer(16, "cpu")  # 16 transitions, 16 + 1 + 4 = 21 slots
    assert buffer.num_slots == 21
    sizes = []
    for t in transitions:
        buffer.add(*t)
        sizes.append(buffer.size)
    assert max(sizes) <= 16 and buffer.size >= 12
    total = len(transitions)
    check_samples(buffer, transitions, range(total - buffer.size, total))


def test_replay_latest_extend_and_state_dict_keep_transitions_whole():
    transitions = make_episodes([4, 3, 9, 2, 5])
    d = atari.ReplayBuffer(30, "cpu")
    for t in transitions[:12]:
        d.add(*t)
    dpre = atari.ReplayBuffer(20, "cpu")  # 20 transitions, 25 slots
    dpre.extend(d.latest(5))  # transitions 7-11: their stacks reach into slots of earlier ones
    d.clear()
    for t in transitions[12:]:
        d.add(*t)
    dpre.extend(d.latest(9))  # the last 9 (stage 2's chunk)
    inserted = list(range(7, 12)) + list(range(14, 23))
    assert dpre.size == 14
    check_samples(dpre, transitions, inserted)
    for _ in range(2):  # over capacity: the oldest transitions leave first, whole
        dpre.extend(d.latest(11))
        inserted += list(range(12, 23))
    assert 11 <= dpre.size <= 20
    check_samples(dpre, transitions, inserted[-dpre.size :])
    restored = atari.ReplayBuffer(20, "cpu")
    restored.load_state_dict(dpre.state_dict())
    assert restored.size == dpre.size
    torch.manual_seed(3)
    a = dpre.sample(50)
    torch.manual_seed(3)
    b = restored.sample(50)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_replay_memory_is_one_uint8_frame_per_transition():
    capacity = 1600
    buffer = atari.ReplayBuffer(capacity, "cpu")
    tensors = [buffer.frames, buffer.history, buffer.obs_slot, buffer.actions, buffer.rewards, buffer.dones]
    total = sum(t.numel() * t.element_size() for t in tensors) + buffer.oldest.nbytes
    assert buffer.frames.dtype == torch.uint8
    per_transition = total / capacity
    assert 84 * 84 < per_transition < 84 * 84 * 1.08  # vs 2 x 4 x 84 x 84 for obs + next_obs stacks


@pytest.mark.parametrize("lengths, returns, window_ids, widened, mean_return", [
    # 64 transitions (72 slots) of 70 steps: game 1 keeps 13 of its 20 steps (the oldest leave first,
    # with the slots of their stacks); widening over the games D holds whole (21-58, all returning 1)
    # never meets another return, so the window stays the last two games. Over the stage's list it
    # would reach game 1 (return 9): window 1-58, widened, mean 2.6.
    ([20, 15, 12, 10, 9], [9, 1, 1, 1, 1], [48, 58], False, 1.0),
    # 68 steps, 74 slots: game 1 is gone whole (its last stack starts at slot 1 < 74 - 72) and game 6
    # is D's oldest game, whole (its first stack starts at slot 6): widening reaches it.
    ([5, 28, 12, 10, 9], [7, 9, 1, 1, 1], [6, 34, 46, 56], True, 3.0),
])
def test_training_window_widens_over_games_whole_in_the_buffer(lengths, returns, window_ids, widened, mean_return):
    unfinished = 4  # the game still running when the stage ends
    transitions = make_episodes(lengths + [unfinished])
    ids = [1 + sum(lengths[:k]) for k in range(len(lengths) + 1)]  # a game's id: its first global step
    tags = np.repeat(ids, lengths + [unfinished])
    buffer = atari.ReplayBuffer(64, "cpu")
    for t, tag in zip(transitions, tags):
        buffer.add(*t, episode=int(tag))
    games = [{"id": i, "return": float(r), "policy": True} for i, r in zip(ids, returns)]
    args = atari.Args(identify_episodes=2, identify_max_steps=1000)
    window = atari.training_window(None, (), buffer, games, args, "cpu")  # no masked network to probe
    assert window["episodes"] == len(window_ids) and window["widened"] is widened
    assert window["mean_return"] == pytest.approx(mean_return)
    by_id = dict(zip(ids, returns))
    expected_goal = np.concatenate([[by_id[i]] * lengths[ids.index(i)] for i in window_ids])
    np.testing.assert_array_equal(window["goal"].numpy(), expected_goal)  # every step of the window's games


# ------------------------------------------------------------------------------------------
# End to end: Pong -> Bowling, two cycles, tiny budgets
# ------------------------------------------------------------------------------------------
TINY = dict(ATARI_TINY, cycles=2, steps_per_task=300, batch_size=16, conv_channels=[8, 16, 16], hidden=[32, 32],
            dpre_per_task=150, eval_steps=120, eval_every=250, identify_episodes=2, identify_max_steps=400,
            replay_interval=3)
NEURONS = 8 + 16 + 16 + 32 + 32


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The run, its folder, and every transition stored in D: action, reward, done, game and the
    newest frame of the next observation (Dpre only takes chunks of D, never `add`s)."""
    runs_dir = str(tmp_path_factory.mktemp("runs"))
    stored, real_add = [], atari.ReplayBuffer.add

    def add(self, obs, action, reward, next_obs, terminated, episode=-1):
        stored.append((int(action), float(reward), float(terminated), episode, torch.from_numpy(np.array(next_obs[-1]))))
        return real_add(self, obs, action, reward, next_obs, terminated, episode)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(atari.ReplayBuffer, "add", add)
        metrics = atari.main(atari.Args(runs_dir=runs_dir, **TINY))
    return metrics, os.path.join(runs_dir, metrics["run_name"]), stored


@pytest.mark.e2e
def test_compile_run_has_no_graph_breaks_with_masks_and_dpre(tmp_path):
    """--compile over two stages, masks and Dpre on in the second: no graph break anywhere. Graphs:
    acting, the update with and without the target copy, and those two once more when the masks
    are installed."""
    torch._dynamo.reset()
    counters.clear()
    metrics = atari.main(atari.Args(**{**TINY, "games": ["Pong"], "eval_every": 0}, compile=True,
                                    runs_dir=str(tmp_path / "runs")))
    assert metrics["complete"] and len(metrics["stages"]) == 2
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] == 5


@pytest.mark.e2e
def test_end_to_end_metrics_without_a_finished_evaluation_game(tiny_run):
    """--eval-steps 120 over 2 envs finishes no Pong or Bowling game: no score is made up from
    the partial returns; every entry and metric is missing, and the stages say which games."""
    metrics, run_dir, _ = tiny_run
    assert metrics == json.load(open(os.path.join(run_dir, "metrics.json")))
    assert set(metrics) >= {"run_name", "stage_tasks", "complete", "sr", "AR", "FM", "FWT", "task_success", "stages"}
    assert metrics["complete"] and metrics["stage_tasks"] == ["Pong", "Bowling", "Pong", "Bowling"]
    assert metrics["sr"] == [[None] * 4] * 4
    assert metrics["task_return"] == metrics["task_success"] == [{"Pong": None, "Bowling": None}] * 4
    assert metrics["AR"] is None and metrics["FM"] is None and metrics["FWT"] is None
    assert [s["eval_unscored"] for s in metrics["stages"]] == [["Pong", "Bowling"]] * 4
    config = json.load(open(os.path.join(run_dir, "config.json")))
    assert config["normalization"] == {"Pong": [-20.7, 9.3], "Bowling": [23.1, 154.8]}
    run = paper_tables.load_runs([run_dir])[0]
    assert run.problem == "AR missing: no Bowling/Pong game finished within an evaluation (raise --eval-steps)"


@pytest.mark.e2e
def test_end_to_end_scores_only_finished_games(tmp_path, capsys):
    """Breakout's games finish within the budget, Pong's do not: Breakout is scored from its
    finished games' full returns, Pong is missing, and so are the metrics that read its score."""
    args = atari.Args(**{**TINY, "games": ["Breakout", "Pong"], "cycles": 1, "steps_per_task": 150, "eval_every": 0,
                         "eval_steps": 600, "game_scores": ["Breakout=1.7,31.8"]}, runs_dir=str(tmp_path))
    metrics = atari.main(args)
    out = capsys.readouterr().out
    sr, returns = metrics["sr"], metrics["task_return"]
    assert sr[0][0] == pytest.approx(atari.normalized_score(returns[0]["Breakout"], (1.7, 31.8)))
    assert sr[1][0] == pytest.approx(atari.normalized_score(returns[1]["Breakout"], (1.7, 31.8)))
    assert sr[0][1] is None and sr[1][1] is None and returns[1]["Pong"] is None
    assert [s["eval_unscored"] for s in metrics["stages"]] == [["Pong"], ["Pong"]]
    assert metrics["AR"] is None and metrics["FWT"] is None
    assert metrics["FM"] == pytest.approx(sr[0][0] - sr[1][0])  # FM does not read the last diagonal entry
    warning = "warning: no Pong game finished within --eval-steps 600 (2 envs): score missing"
    assert out.count(warning) == 2
    assert "AR=n/a FM=" in out and "FWT=n/a ->" in out

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(os.path.join(str(tmp_path), metrics["run_name"]), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"eval/Breakout/return", "eval/Breakout/normalized_return", "eval/Pong/finished_games"} <= tags
    assert "eval/Pong/return" not in tags and "eval/Pong/normalized_return" not in tags
    assert [e.value for e in events.Scalars("eval/Pong/finished_games")] == [0.0, 0.0]
    assert all(e.value >= 1 for e in events.Scalars("eval/Breakout/finished_games"))


@pytest.mark.e2e
def test_end_to_end_updates_identification_and_dpre(tiny_run):
    metrics, run_dir, stored = tiny_run
    stages = metrics["stages"]
    assert [s["task"] for s in stages] == ["Pong", "Bowling", "Pong", "Bowling"]
    for s in stages:
        assert s["env_steps"] == 300
        assert s["critic_updates"] == s["actor_updates"] == (300 - 100) // 4  # one update every 4 env steps
        assert s["skill_neurons"] == {name: round(0.2 * NEURONS) for name in ("actor", "qf1", "qf2")}
        # no Pong game played by the policy ends within 200 steps: post-stage games, announced and recorded
        assert s["identify_window"] == "rollout" and s["identify_fallback"] == "no policy game finished in the stage"
        assert 0 < s["identify_steps"] <= 400 + 2 and s["identify_episodes"] >= 2
        assert isinstance(s["goal_constant"], bool)
    assert stages[0]["critic_dpre_updates"] == stages[0]["actor_dpre_updates"] == 0  # Dpre is empty in stage 1
    for s in stages[1:]:
        # every 3rd update samples Dpre, for the critics and the actor alike
        assert s["critic_dpre_updates"] == s["actor_dpre_updates"] == len(range(0, 50, 3))
        assert set(s["overlap_with_previous"]) == {"actor", "qf1", "qf2"}
    assert [s.get("dpre_added") for s in stages] == [150, 150, 150, None]  # of the 200 policy steps, the last 150
    checkpoint = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    dpre = checkpoint["dpre"]
    assert len(dpre["obs_slot"]) == 3 * 150  # the last 150 transitions of stages 1-3
    # exactly those: D got 300 transitions a stage, Dpre holds transitions 150-299 of stages 1-3, in order
    assert len(stored) == 4 * 300
    last = [stored[300 * stage + k] for stage in range(3) for k in range(150, 300)]
    assert dpre["actions"].tolist() == [action for action, *_ in last]
    assert torch.equal(dpre["rewards"], torch.tensor([reward for _, reward, *_ in last]))
    assert dpre["dones"].tolist() == [done for _, _, done, *_ in last]
    assert dpre["episode"].tolist() == [game for *_, game, _ in last]
    assert torch.equal(dpre["frames"][dpre["obs_slot"] + 1], torch.stack([frame for *_, frame in last]))


@pytest.mark.e2e
def test_end_to_end_masks_protect_conv_and_fc_neurons(tiny_run):
    _, run_dir, _ = tiny_run
    protected = []
    for stage in range(1, 5):
        model = torch.load(os.path.join(run_dir, "checkpoints", f"stage_{stage}.pt"), weights_only=True)
        assert set(model["neuron_masks"]) == {"actor", "qf1", "qf2"}
        counts = {}
        for name, masks in model["neuron_masks"].items():
            assert [len(m) for m in masks] == [8, 16, 16, 32, 32]
            combined = torch.cat(masks)
            assert combined.min() >= 0 and combined.max() <= 1
            counts[name] = int((combined < 1).sum())
            assert counts[name] >= round(0.2 * NEURONS)
            assert torch.equal(combined < 1, combined <= 0.2)  # Eq. 7: alpha (1 - score) <= 0.2 * 0.5
        protected.append(counts)
    for earlier, later in zip(protected, protected[1:]):
        assert all(later[name] >= earlier[name] for name in later)  # min-combination accumulates
    first = torch.load(os.path.join(run_dir, "checkpoints", "stage_1.pt"), weights_only=True)
    last = torch.load(os.path.join(run_dir, "checkpoints", "stage_4.pt"), weights_only=True)
    assert not torch.equal(first["actor"]["trunk.0.weight"], last["actor"]["trunk.0.weight"])


@pytest.mark.e2e
def test_end_to_end_tensorboard_has_eval_and_losses(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir, _ = tiny_run
    events = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"eval/Pong/finished_games", "eval/Bowling/finished_games", "losses/qf1_loss",
            "losses/actor_loss", "losses/alpha", "charts/SPS", "neurons/actor/protected"} <= tags
    assert not {"eval/Pong/return", "eval/Bowling/normalized_return", "eval/AR"} & tags  # no game finished
    # periodic evaluation (every 250 steps) plus one after each of the 4 stages
    assert len(events.Scalars("eval/Pong/finished_games")) == 1200 // 250 + 4
    # 50 updates a stage, logged once: at the first update (step 100), and from stage 2 on at the
    # first that trains on D, 4 steps later (the 0th trains on Dpre, replay_interval 3)
    for tag in ("losses/qf1_loss", "losses/actor_loss"):
        assert [e.step for e in events.Scalars(tag)] == [101, 300 + 105, 600 + 105, 900 + 105]
    # SPS with them once the stage's rate is measured (from its first update on): not at stage 1's first update
    assert [e.step for e in events.Scalars("charts/SPS")] == [300 + 105, 600 + 105, 900 + 105]


@pytest.mark.e2e
def test_resume_continues_exactly(tiny_run, tmp_path, monkeypatch):
    """Killed after stage 2 and resumed: the same metrics and final weights as the uninterrupted
    run (CPU, same seed), with Dpre, masks and optimizer state restored from the checkpoint."""
    reference, reference_dir, _ = tiny_run
    writes = []
    original = protocol.atomic_write_json

    def killed_after_stage_2(path, data):
        original(path, data)
        if path.endswith("metrics.json"):
            writes.append(path)
            if len(writes) == 2:
                raise KeyboardInterrupt  # the run dies right after stage 2's checkpoint and metrics

    monkeypatch.setattr(protocol, "atomic_write_json", killed_after_stage_2)
    with pytest.raises(KeyboardInterrupt):
        atari.main(atari.Args(runs_dir=str(tmp_path), **TINY))
    monkeypatch.setattr(protocol, "atomic_write_json", original)
    run_dir = os.path.dirname(writes[0])
    partial = json.load(open(os.path.join(run_dir, "metrics.json")))
    assert not partial["complete"] and len(partial["stages"]) == 2 and partial["sr"][2] == [None] * 4

    resumed = atari.main(atari.Args(resume=run_dir, cuda=False))
    assert resumed["complete"]
    for key in ("sr", "AR", "FM", "FWT", "task_return"):
        assert resumed[key] == reference[key], key

    def without_wall_time(records):
        return [{k: v for k, v in r.items() if k != "wall_seconds"} for r in records]

    assert without_wall_time(resumed["stages"]) == without_wall_time(reference["stages"])
    final = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    expected = torch.load(os.path.join(reference_dir, "checkpoint.pt"), weights_only=True)
    assert final["global_step"] == expected["global_step"] == 4 * 300
    for network in ("actor", "qf1", "qf2", "qf1_target", "qf2_target"):
        for k, v in expected[network].items():
            assert torch.equal(final[network][k], v), f"{network}.{k}"
    for name, masks in expected["neuron_masks"].items():
        for a, b in zip(final["neuron_masks"][name], masks, strict=True):
            assert torch.equal(a, b)
    # once finished, resuming again changes nothing
    assert atari.main(atari.Args(resume=run_dir, cuda=False)) == json.load(open(os.path.join(run_dir, "metrics.json")))


@pytest.mark.e2e
def test_end_to_end_training_window_from_the_stages_own_games(tmp_path, monkeypatch):
    """Breakout games end within a few hundred steps: the window is the stage's last policy games,
    read from D (no extra env steps), and the goal metric of a step is its game's return."""
    windows = []
    real_episode_index = atari.ReplayBuffer.episode_index

    def episode_index(self, episodes):
        index, tags = real_episode_index(self, episodes)
        windows.append((list(episodes), tags))
        return index, tags

    monkeypatch.setattr(atari.ReplayBuffer, "episode_index", episode_index)
    args = atari.Args(**{**TINY, "games": ["Breakout"], "cycles": 1, "steps_per_task": 700, "learning_starts": 50,
                         "eval_every": 0, "game_scores": ["Breakout=1.7,31.8"]}, runs_dir=str(tmp_path))
    stage = atari.main(args)["stages"][0]
    assert stage["identify_window"] == "training" and stage["identify_fallback"] is None
    assert stage["goal_metric"] == "return" and stage["identify_unfinished_games"] == 0
    assert stage["goal_constant"] is False  # widened, if need be, until two games scored differently
    episodes, tags = windows[0]
    assert stage["identify_episodes"] == len(episodes) >= 2 and set(tags.tolist()) == set(episodes)
    assert all(episode > 50 for episode in episodes)  # games started by the policy (ids: their first global step)
    assert stage["identify_steps"] == min(len(tags), 400)  # capped at identify_max_steps (evenly spaced rows)
    assert stage["identify_widened"] == (len(episodes) > 2)
    for name in ("actor", "qf1", "qf2"):
        assert stage["selection"][name]["selected_dead"] <= stage["selection"][name]["dead"]


@pytest.mark.e2e
def test_end_to_end_goal_identification_on_finished_games(tmp_path):
    """Breakout (five lives, outside Table 7: scores given with --game-scores): random-policy games
    end within the window, so the goal metric is the finished games' full returns."""
    args = atari.Args(**{**TINY, "games": ["Breakout"], "cycles": 1, "steps_per_task": 150, "eval_every": 0,
                         "identify_max_steps": 2000, "game_scores": ["Breakout=1.7,31.8"],
                         "identify_window": "rollout"}, runs_dir=str(tmp_path))
    metrics = atari.main(args)
    stage = metrics["stages"][0]
    assert stage["identify_window"] == "rollout" and stage["identify_fallback"] is None
    assert stage["identify_episodes"] == 2 and stage["identify_unfinished_games"] == 0
    assert stage["goal_constant"] is False  # the two games scored differently
    assert metrics["FM"] is None and len(metrics["sr"]) == 1


# ------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit 2, nothing written
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (dict(games=["Pongg"]), "unknown game 'Pongg'; valid ALE games"),
    (dict(games=["Breakout"]), "--game-scores Breakout=RANDOM,HUMAN"),
    (dict(game_scores=["Breakout=31.8,1.7"]), "the human score must exceed the random score"),
    (dict(skill_ratio=0.0), "--skill-ratio must be in (0, 1]"),
    (dict(goal_score="bogus"), "--goal-score must be one of paper, balanced"),
    (dict(identify_window="bogus"), "--identify-window must be one of training, rollout"),
    (dict(conv_channels=[32, 64]), "--conv-channels needs three"),
    (dict(eval_steps=0), "--eval-steps must be a positive integer"),
    (dict(cudagraphs=True), "--cudagraphs needs a CUDA device"),
    (dict(resume="/nonexistent/run"), "does not exist"),
])
def test_bad_input_fails_with_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, overrides, message):
    monkeypatch.chdir(tmp_path)  # the default --runs-dir is runs/ here
    with pytest.raises(SystemExit) as exit_info:
        atari.main(replace(atari.Args(cuda=False), **overrides))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert message in err
    assert os.listdir(tmp_path) == []


def test_unknown_game_lists_valid_names_and_how_to_find_them(capsys):
    with pytest.raises(SystemExit):
        atari.validate(atari.Args(games=["Pongg"]))
    err = capsys.readouterr().err
    assert "get_all_rom_ids" in err
    for game in ("Alien", "BankHeist", "Bowling", "Pong", "Breakout", "MontezumaRevenge"):
        assert f" {game} " in err or err.rstrip().endswith(game)


def test_game_names_are_case_insensitive():
    assert atari.canonical_game("bankheist") == "BankHeist"
    assert atari.canonical_game("ALE/Pong-v5") == "Pong"
    assert atari.canonical_game("Pongg") is None


def test_command_line_bad_game(tmp_path):
    result = subprocess.run([sys.executable, SCRIPT, "--games", "Pong", "Chess",
                             "--runs-dir", str(tmp_path / "runs")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: unknown game 'Chess'") and result.stderr.count("\n") == 1
    assert not (tmp_path / "runs").exists()
