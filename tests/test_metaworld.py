"""Tests of nbsp_sac_metaworld.py: the continual-learning metrics, the replay buffer, the masked
optimizer, and end-to-end runs with tiny budgets (NBSP, its ablation flags, resume, bad input).

The end-to-end runs create real Meta-World environments (about a second each), so they share
runs through module-scoped fixtures and keep every budget as small as the checks allow."""

import copy
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict

import gymnasium as gym
import metaworld
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch._dynamo.utils import counters
from torch.utils.tensorboard import SummaryWriter

import nbsp_sac_metaworld as mw
import protocol
import fast_adam
import skill_neurons as sn
from nbsp_sac_metaworld import Args, ReplayBuffer, SACLearner, main
from protocol import continual_metrics
from fast_adam import StepMask
from conftest import kill_after_stage, load

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nbsp_sac_metaworld.py")
OBS_DIM, ACT_DIM = 39, 4  # Meta-World v3
ROW = 2 * OBS_DIM + ACT_DIM + 2  # obs, action, reward, next_obs, done


def t(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def only_run_dir(runs_dir):
    runs = os.listdir(runs_dir)
    assert len(runs) == 1, runs
    return os.path.join(runs_dir, runs[0])


def read_json(path):
    with open(path) as f:
        return json.load(f)


def scalars(run_dir):
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 1, "tensors": 1})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def track_writers(mp):
    """Records the run's SummaryWriters. A run stopped by an exception (or one that returns early)
    leaves its writer open with events still queued; a real run killed minutes later would
    have flushed them (every 120 s), so the tests flush them before reading the events."""
    opened = []

    class TrackedWriter(SummaryWriter):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            opened.append(self)

    mp.setattr(protocol, "SummaryWriter", TrackedWriter)
    return opened


def folder_snapshot(path):
    snapshot = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                snapshot[os.path.relpath(full, path)] = f.read()
    return snapshot


def rows_of(sr):
    """The lower triangle of a metrics.json sr matrix (None above the diagonal dropped)."""
    return [row[: i + 1] for i, row in enumerate(sr)]


class Spy:
    """Wraps a skill_neurons function and counts the calls that had parameters to mask."""

    def __init__(self, fn):
        self.fn, self.calls, self.nonempty = fn, 0, 0

    def __call__(self, params, *rest):
        self.calls += 1
        self.nonempty += bool(len(params))
        return self.fn(params, *rest)


def spied_main(args):
    with pytest.MonkeyPatch.context() as mp:
        spies = {"update": Spy(fast_adam.mask_update_), "grad": Spy(fast_adam.mask_gradients_)}
        mp.setattr(fast_adam, "mask_update_", spies["update"])
        mp.setattr(fast_adam, "mask_gradients_", spies["grad"])
        metrics = main(args)
    return metrics, spies


# --------------------------------------------------------------------------------------------
# continual_metrics (paper Eq. 9-11)
# --------------------------------------------------------------------------------------------
SR = [
    [0.5],
    [0.9, 0.2],
    [0.3, 0.6, 0.4],
    [0.1, 0.7, 0.8, 0.0],
]


def test_continual_metrics_hand_computed():
    metrics = continual_metrics(SR)
    # ASR = 1/4 * (0.5/1 + (0.9+0.2)/2 + (0.3+0.6+0.4)/3 + (0.1+0.7+0.8+0.0)/4)
    #     = 1/4 * (0.5 + 0.55 + 0.433333 + 0.4) = 1.883333 / 4 = 0.4708333
    assert metrics["ASR"] == pytest.approx(0.4708333333, abs=1e-9)
    # FWT = (0.5 + 0.2 + 0.4 + 0.0) / 4 = 0.275
    assert metrics["FWT"] == pytest.approx(0.275, abs=1e-12)
    # FM, max over l in [j, i-1] of sr[l][j] - sr[i][j] (the paper's 1-based i, j, l):
    #   i=2: j=1: l=1: 0.5-0.9 = -0.4 (negative: task 1 improved)                     -> -0.4 / 1 = -0.4
    #   i=3: j=1: max(0.5-0.3, 0.9-0.3) = 0.6; j=2: 0.2-0.6 = -0.4                    -> 0.2 / 2 = 0.1
    #   i=4: j=1: max(0.5-0.1, 0.9-0.1, 0.3-0.1) = 0.8 (a middle l, not first/last);
    #        j=2: max(0.2-0.7, 0.6-0.7) = -0.1; j=3: 0.4-0.8 = -0.4                   -> 0.3 / 3 = 0.1
    #   FM = (-0.4 + 0.1 + 0.1) / 3 = -0.0666667
    assert metrics["FM"] == pytest.approx(-0.0666666667, abs=1e-9)


def test_continual_metrics_single_stage():
    assert continual_metrics([[0.7]]) == {"ASR": pytest.approx(0.7), "FM": None, "FWT": pytest.approx(0.7)}


def test_continual_metrics_two_stages():
    # ASR = (1.0 + (0.25 + 0.75) / 2) / 2 = 0.75; FWT = (1.0 + 0.75) / 2 = 0.875; FM = 1.0 - 0.25 = 0.75
    metrics = continual_metrics([[1.0], [0.25, 0.75]])
    assert metrics == {"ASR": pytest.approx(0.75), "FM": pytest.approx(0.75), "FWT": pytest.approx(0.875)}


# --------------------------------------------------------------------------------------------
# ReplayBuffer
# --------------------------------------------------------------------------------------------
def add_transition(rb, k):
    # transition k: obs [k, 10+k], action [20+k], reward 30+k, next_obs [40+k, 50+k], done k even
    rb.add(np.array([k, 10.0 + k]), np.array([20.0 + k]), 30.0 + k, np.array([40.0 + k, 50.0 + k]), k % 2 == 0)


def firsts(rows):
    return rows[:, 0].tolist()


def test_goal_lists_depend_on_task_and_seed_alone():
    """What conftest's memo of Meta-World's MT1 rests on: a task's goal configurations are a
    function of (task, seed) alone, and drawing them leaves NumPy's global RNG as it was."""
    draw = metaworld.MT1.__wrapped__  # the unmemoized class
    np.random.seed(0)
    before = np.random.get_state()
    first = draw("reach-v3", seed=5).train_tasks
    after = np.random.get_state()
    assert np.array_equal(after[1], before[1]) and after[2] == before[2]  # the key and the position in it
    np.random.rand(7)  # another global state
    again, other = draw("reach-v3", seed=5).train_tasks, draw("reach-v3", seed=6).train_tasks
    assert len(first) == 50 and [task.data for task in again] == [task.data for task in first]
    assert [task.data for task in other] != [task.data for task in first]


def test_replay_buffer_add_sample_columns():
    rb = ReplayBuffer(5, obs_dim=2, act_dim=1, device="cpu")
    add_transition(rb, 0)
    obs, actions, rewards, next_obs, dones = rb.sample(4)
    assert [tuple(x.shape) for x in (obs, actions, rewards, next_obs, dones)] == [(4, 2), (4, 1), (4, 1), (4, 2), (4, 1)]
    assert obs.dtype == torch.float32
    assert obs.tolist() == [[0.0, 10.0]] * 4
    assert actions.tolist() == [[20.0]] * 4
    assert rewards.tolist() == [[30.0]] * 4
    assert next_obs.tolist() == [[40.0, 50.0]] * 4
    assert dones.tolist() == [[1.0]] * 4
    add_transition(rb, 1)
    assert rb.size == 2
    sampled = rb.sample(200)
    assert set(sampled[0][:, 0].tolist()) == {0.0, 1.0}  # only stored rows are sampled
    odd = sampled[0][:, 0] == 1.0
    assert (sampled[4][odd] == 0.0).all() and (sampled[4][~odd] == 1.0).all()  # columns stay together


def test_replay_buffer_wraps_and_latest_in_insertion_order():
    rb = ReplayBuffer(5, obs_dim=2, act_dim=1, device="cpu")
    for k in range(7):  # 7 into capacity 5: 0 and 1 are overwritten
        add_transition(rb, k)
    assert rb.size == 5
    assert firsts(rb.latest(3)) == [4.0, 5.0, 6.0]
    assert firsts(rb.latest(5)) == [2.0, 3.0, 4.0, 5.0, 6.0]
    assert firsts(rb.latest(10)) == [2.0, 3.0, 4.0, 5.0, 6.0]
    assert set(rb.sample(300)[0][:, 0].tolist()) == {2.0, 3.0, 4.0, 5.0, 6.0}


def test_replay_buffer_extend_clear_state_dict(tmp_path):
    source = ReplayBuffer(5, obs_dim=2, act_dim=1, device="cpu")
    for k in range(7):
        add_transition(source, k)
    rows = source.latest(5)  # transitions 2..6

    small = ReplayBuffer(4, obs_dim=2, act_dim=1, device="cpu")
    add_transition(small, 0)
    add_transition(small, 1)
    small.extend(rows)  # 2 + 5 rows into capacity 4: the last 4 stay, in order
    assert small.size == 4
    assert firsts(small.latest(4)) == [3.0, 4.0, 5.0, 6.0]

    big = ReplayBuffer(10, obs_dim=2, act_dim=1, device="cpu")
    add_transition(big, 0)
    big.extend(rows[-3:])
    assert big.size == 4 and firsts(big.latest(4)) == [0.0, 4.0, 5.0, 6.0]
    torch.testing.assert_close(big.latest(1), rows[-1:])  # whole rows, every column

    torch.save(source.state_dict(), tmp_path / "rb.pt")
    restored = ReplayBuffer(5, obs_dim=2, act_dim=1, device="cpu")
    restored.load_state_dict(load(tmp_path / "rb.pt"))
    assert restored.size == 5
    assert torch.equal(restored.latest(5), source.latest(5))
    add_transition(restored, 7)  # continues like the original after a round trip
    add_transition(source, 7)
    assert torch.equal(restored.latest(5), source.latest(5))

    source.clear()
    assert source.size == 0 and source.state_dict()["rows"].shape == (0, 2 * 2 + 1 + 2)
    add_transition(source, 9)
    assert source.size == 1 and firsts(source.latest(5)) == [9.0]


# --------------------------------------------------------------------------------------------
# SACLearner.masked_step (StepMask) and SACLearner
# --------------------------------------------------------------------------------------------
NEURON_MASK = [1.0, 0.05, 0.0, 0.5]


def masked_pair(target, lr=0.1):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    ref = copy.deepcopy(net)
    adam, step_mask = torch.optim.Adam(net.parameters(), lr=lr), StepMask(target)
    layers = [sn.HiddenLayer(net[1], net[0].weight, net[0].bias, 0)]
    step_mask.set(sn.parameter_masks(layers, [t(NEURON_MASK)]))
    return net, ref, lambda: SACLearner.masked_step(adam, step_mask), torch.optim.Adam(ref.parameters(), lr=lr)


def set_grads(generator, *nets):
    grads = [torch.randn(p.shape, generator=generator) for p in nets[0].parameters()]
    for net in nets:
        for p, g in zip(net.parameters(), grads):
            p.grad = g.clone()


def test_masked_optimizer_update_first_step_hand_computed():
    net, _, masked_step, _ = masked_pair("update")
    before = [p.detach().clone() for p in net.parameters()]
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    masked_step()
    delta = [p.detach() - b for p, b in zip(net.parameters(), before)]
    # Adam's first step is -lr * g / (|g| + eps) = -0.1 for g = 1; the update mask scales it per row:
    # rows [1, 0.05, 0, 0.5] -> [-0.1, -0.005, 0, -0.05]
    expected_rows = t([-0.1, -0.005, 0.0, -0.05])
    torch.testing.assert_close(delta[0], expected_rows[:, None].expand(4, 3), rtol=0, atol=1e-6)
    torch.testing.assert_close(delta[1], expected_rows, rtol=0, atol=1e-6)
    # the head is not masked: plain -0.1
    torch.testing.assert_close(delta[2], torch.full((2, 4), -0.1), rtol=0, atol=1e-6)
    torch.testing.assert_close(delta[3], torch.full((2,), -0.1), rtol=0, atol=1e-6)


def test_masked_optimizer_grad_first_step_hand_computed():
    net, _, masked_step, _ = masked_pair("grad")
    before = [p.detach().clone() for p in net.parameters()]
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    masked_step()
    # the gradient itself is masked ...
    torch.testing.assert_close(net[0].bias.grad, t(NEURON_MASK))
    delta = [p.detach() - b for p, b in zip(net.parameters(), before)]
    # ... but Adam's first step -lr * (m g) / (|m g| + eps) is -0.1 for any m > 0 (0 for m = 0):
    # rows [1, 0.05, 0, 0.5] -> [-0.1, -0.1, 0, -0.1]
    expected_rows = t([-0.1, -0.1, 0.0, -0.1])
    torch.testing.assert_close(delta[0], expected_rows[:, None].expand(4, 3), rtol=0, atol=1e-5)
    torch.testing.assert_close(delta[1], expected_rows, rtol=0, atol=1e-5)


@pytest.mark.parametrize("target", ["update", "grad"])
def test_masked_optimizer_steps_versus_plain_adam(target):
    net, ref, masked_step, ref_optimizer = masked_pair(target, lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    mask_rows = t(NEURON_MASK)
    for _ in range(300):
        before = [p.detach().clone() for p in net.parameters()]
        ref_before = [p.detach().clone() for p in ref.parameters()]
        set_grads(generator, net, ref)
        masked_step()
        ref_optimizer.step()
        delta = [p.detach() - b for p, b in zip(net.parameters(), before)]
        ref_delta = [p.detach() - b for p, b in zip(ref.parameters(), ref_before)]
    # unmasked parameters (the head) take exactly the plain Adam step, every time
    assert torch.equal(net[2].weight, ref[2].weight) and torch.equal(net[2].bias, ref[2].bias)
    # rows with mask 1 are the plain Adam trajectory exactly; rows with mask 0 never move
    assert torch.equal(net[0].weight[0], ref[0].weight[0]) and torch.equal(net[0].bias[0], ref[0].bias[0])
    torch.testing.assert_close(delta[0][2], torch.zeros(3), rtol=0, atol=0)
    if target == "update":  # the last step of every row is mask * plain step
        torch.testing.assert_close(delta[0], mask_rows[:, None] * ref_delta[0], rtol=1e-4, atol=2e-7)
        torch.testing.assert_close(delta[1], mask_rows * ref_delta[1], rtol=1e-4, atol=2e-7)
    else:  # Adam undoes a constant gradient mask: rows 0.05 and 0.5 step like the plain rows
        torch.testing.assert_close(delta[0][[1, 3]], ref_delta[0][[1, 3]], rtol=1e-3, atol=2e-7)
        torch.testing.assert_close(delta[1][[1, 3]], ref_delta[1][[1, 3]], rtol=1e-3, atol=2e-7)


def test_masked_optimizer_without_masks_is_plain_adam():
    torch.manual_seed(0)
    for target in ("update", "grad"):
        net = nn.Linear(3, 2)
        ref = copy.deepcopy(net)
        adam, step_mask = torch.optim.Adam(net.parameters(), lr=0.01), StepMask(target)
        ref_optimizer = torch.optim.Adam(ref.parameters(), lr=0.01)
        step_mask.set({})
        generator = torch.Generator().manual_seed(2)
        for _ in range(20):
            set_grads(generator, net, ref)
            SACLearner.masked_step(adam, step_mask)
            ref_optimizer.step()
        assert torch.equal(net.weight, ref.weight) and torch.equal(net.bias, ref.bias)


def test_sac_learner_hard_masks_freeze_protected_rows_and_member_slices():
    torch.manual_seed(0)
    args = Args(hidden=[8, 8], batch_size=8)
    sac = SACLearner(5, 2, -np.ones(2), np.ones(2), args, "cpu")
    actor_masks = [t([0.0] + [1.0] * 7), torch.ones(8)]
    critic_masks = [torch.ones(8), torch.ones(8),  # qf1 (member 0): nothing protected
                    torch.ones(8), t([1.0] * 3 + [0.0] + [1.0] * 4)]  # qf2 (member 1), layer 2, neuron 3
    sac.actor_mask.set(sn.parameter_masks(sac.actor.hidden_layers(), actor_masks))
    sac.q_mask.set(sn.parameter_masks(sac.qf.hidden_layers(0) + sac.qf.hidden_layers(1), critic_masks))
    actor_w0, actor_b0 = sac.actor.trunk[0].weight.detach().clone(), sac.actor.trunk[0].bias.detach().clone()
    q_w1, q_b1 = sac.qf.trunk[2].weight.detach().clone(), sac.qf.trunk[2].bias.detach().clone()
    generator = torch.Generator().manual_seed(3)
    keys = set()
    for i in range(6):
        data = (torch.randn(8, 5, generator=generator), torch.rand(8, 2, generator=generator) * 2 - 1,
                torch.randn(8, 1, generator=generator), torch.randn(8, 5, generator=generator), torch.zeros(8, 1))
        logs = sac.update(data, update_policy=i % 2 == 0, update_target=True)
        keys |= set(logs)
        assert all(torch.isfinite(v).all() for v in logs.values())
    assert {"qf1_loss", "qf2_loss", "actor_loss", "alpha"} <= keys
    # actor neuron 0 of layer 1 is frozen (row of weight [out, in] and its bias); other rows moved
    assert torch.equal(sac.actor.trunk[0].weight[0], actor_w0[0]) and sac.actor.trunk[0].bias[0] == actor_b0[0]
    assert not torch.equal(sac.actor.trunk[0].weight[1:], actor_w0[1:])
    # critic: member 1's neuron 3 of layer 2 is the column weight[1, :, 3] and bias[1, 0, 3]
    assert torch.equal(sac.qf.trunk[2].weight[1, :, 3], q_w1[1, :, 3]) and sac.qf.trunk[2].bias[1, 0, 3] == q_b1[1, 0, 3]
    assert not torch.equal(sac.qf.trunk[2].weight[1, :, [0, 1, 2, 4, 5, 6, 7]], q_w1[1, :, [0, 1, 2, 4, 5, 6, 7]])
    assert not torch.equal(sac.qf.trunk[2].weight[0], q_w1[0])  # member 0 is not masked

    restored = SACLearner(5, 2, -np.ones(2), np.ones(2), args, "cpu")
    restored.load_state_dict(sac.state_dict())
    for a, b in zip(list(sac.actor.parameters()) + list(sac.qf.parameters()) + list(sac.qf_target.parameters()),
                    list(restored.actor.parameters()) + list(restored.qf.parameters()) + list(restored.qf_target.parameters())):
        assert torch.equal(a, b)
    assert torch.equal(sac.log_alpha, restored.log_alpha)


# --------------------------------------------------------------------------------------------
# End to end: one NBSP run shared by several tests
# --------------------------------------------------------------------------------------------
MAIN_ARGS = dict(tasks=["reach", "drawer-close"], cycles=2, hidden=[16, 16], batch_size=16, steps_per_task=500,
                 learning_starts=100, eval_episodes=2, identify_episodes=1, eval_every=700, dpre_per_task=50,
                 replay_interval=2, seed=1)
STAGE_TASKS = ["reach", "drawer-close", "reach", "drawer-close"]
H = 4
NETWORKS = ("actor", "qf1", "qf2")
SKILL = round(0.2 * 32)  # two hidden layers of 16 per network: round(6.4) = 6


@pytest.fixture(scope="module")
def nbsp_run(tmp_path_factory):
    runs_dir = tmp_path_factory.mktemp("nbsp_runs")
    args = Args(**MAIN_ARGS, runs_dir=str(runs_dir))
    metrics, spies = spied_main(args)
    run_dir = only_run_dir(runs_dir)
    return {"args": args, "metrics": metrics, "spies": spies, "run_dir": run_dir,
            "checkpoint": load(os.path.join(run_dir, "checkpoint.pt")),
            "stages": [load(os.path.join(run_dir, "checkpoints", f"stage_{k}.pt")) for k in range(1, H + 1)],
            "scalars": scalars(run_dir)}


@pytest.mark.e2e
def test_e2e_metrics_json(nbsp_run):
    metrics = read_json(os.path.join(nbsp_run["run_dir"], "metrics.json"))
    assert metrics == nbsp_run["metrics"]
    assert metrics["stage_tasks"] == STAGE_TASKS
    assert metrics["complete"] is True
    sr = metrics["sr"]
    assert len(sr) == H and all(len(row) == H for row in sr)
    for i in range(H):
        for j in range(H):
            if j > i:
                assert sr[i][j] is None
            else:
                assert isinstance(sr[i][j], float) and 0.0 <= sr[i][j] <= 1.0
                assert sr[i][j] * 2 == int(sr[i][j] * 2)  # a mean over eval_episodes = 2 episodes
                assert sr[i][j] == metrics["task_success"][i][STAGE_TASKS[j]]
    expected = continual_metrics(rows_of(sr))
    assert metrics["ASR"] == pytest.approx(expected["ASR"]) and metrics["FWT"] == pytest.approx(expected["FWT"])
    assert metrics["FM"] == pytest.approx(expected["FM"])
    assert len(metrics["stages"]) == H
    for k, stage in enumerate(metrics["stages"]):
        assert stage["stage"] == k + 1 and stage["task"] == STAGE_TASKS[k]
        assert stage["env_steps"] == 500  # no early stop: fewer than 10 policy episodes
        assert stage["early_stopped"] is False
        assert isinstance(stage["wall_seconds"], float | int) and stage["wall_seconds"] > 0
        assert isinstance(stage["goal_constant"], bool)
        assert stage["skill_neurons"] == {name: SKILL for name in NETWORKS}


@pytest.mark.e2e
def test_e2e_files_and_checkpoints(nbsp_run):
    run_dir, args = nbsp_run["run_dir"], nbsp_run["args"]
    config = read_json(os.path.join(run_dir, "config.json"))
    assert config["args"] == json.loads(json.dumps(asdict(args)))
    assert config["stage_tasks"] == STAGE_TASKS
    assert config["run_name"] == os.path.basename(run_dir) == nbsp_run["metrics"]["run_name"]
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == [f"stage_{k}.pt" for k in range(1, H + 1)]
    assert not [name for name in os.listdir(run_dir) if name.endswith(".tmp")]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run_dir))
    for k, stage in enumerate(nbsp_run["stages"]):
        assert stage["stage"] == k + 1 and stage["task"] == STAGE_TASKS[k]
    checkpoint = nbsp_run["checkpoint"]
    assert checkpoint["stage"] == H and checkpoint["global_step"] == H * 500
    assert checkpoint["sr"] == rows_of(nbsp_run["metrics"]["sr"])
    for key in ("actor", "qf"):  # the last stage's checkpoint holds the final networks
        for name, value in checkpoint[key].items():
            assert torch.equal(value, nbsp_run["stages"][-1][key][name])


@pytest.mark.e2e
def test_e2e_tensorboard(nbsp_run):
    tags = nbsp_run["scalars"]
    for tag in ("charts/episodic_return", "losses/qf1_loss", "losses/actor_loss", "charts/SPS",
                "eval/reach/success_rate", "eval/drawer-close/success_rate", "eval/ASR"):
        assert tag in tags and tags[tag], tag
    # one 500-step episode per stage
    assert [step for step, _ in tags["charts/episodic_return"]] == [500, 1000, 1500, 2000]
    # end-of-stage evaluations (500, 1000, 1500, 2000) plus the periodic ones (eval_every 700: 700, 1400)
    assert sorted({step for step, _ in tags["eval/reach/success_rate"]}) == [500, 700, 1000, 1400, 1500, 2000]
    # eval/ASR after each stage is ASR of the rows so far
    sr = rows_of(nbsp_run["metrics"]["sr"])
    assert [step for step, _ in tags["eval/ASR"]] == [500, 1000, 1500, 2000]
    for k, (_, value) in enumerate(tags["eval/ASR"]):
        assert value == pytest.approx(continual_metrics(sr[: k + 1])["ASR"], abs=1e-6)
    # losses every 100 updates from each stage's first (global step k * 500 + 101); from stage 2 on the
    # 0th, 100th, ... update trains on Dpre (replay_interval 2), so the critic's come from the next
    # update, on D, and the actor's stay with the policy update (the even ones: policy_frequency 2)
    firsts = [k * 500 + 101 for k in range(H)]
    assert [step for step, _ in tags["losses/actor_loss"]] == [f + j for f in firsts for j in (0, 100, 200, 300)]
    assert [step for step, _ in tags["losses/qf1_loss"]] == [f + j + (k > 0) for k, f in enumerate(firsts)
                                                               for j in (0, 100, 200, 300)]
    assert all(np.isfinite(value) for _, value in tags["losses/qf1_loss"] + tags["losses/actor_loss"])
    # the goal-constant flag of each stage is logged as it is recorded
    goal_constant = [bool(value) for _, value in tags["neurons/goal_constant"]]
    assert goal_constant == [stage["goal_constant"] for stage in nbsp_run["metrics"]["stages"]]


@pytest.mark.e2e
def test_e2e_updates_happened(nbsp_run):
    # the networks change within every stage after the first, and differ from a fresh initialisation
    stages = nbsp_run["stages"]
    for key in ("actor", "qf"):
        for before, after in zip(stages, stages[1:]):
            assert any(not torch.equal(before[key][n], after[key][n]) for n in before[key]), key
    actor = stages[0]["actor"]
    scale, bias = actor["action_scale"].numpy(), actor["action_bias"].numpy()
    protocol.seed_everything(MAIN_ARGS["seed"], True)
    fresh = SACLearner(OBS_DIM, ACT_DIM, bias - scale, bias + scale, nbsp_run["args"], "cpu")
    for name, value in fresh.actor.state_dict().items():
        if not name.startswith("action_"):  # action_scale / action_bias are constants
            assert not torch.equal(value, actor[name]), name
    assert all(torch.isfinite(v).all() for v in nbsp_run["checkpoint"]["actor"].values())
    # the masked update path was used once masks existed
    assert nbsp_run["spies"]["update"].nonempty > 0
    assert nbsp_run["spies"]["grad"].nonempty == 0


@pytest.mark.e2e
def test_e2e_masks_follow_eq7_and_accumulate_by_minimum(nbsp_run):
    stages, alpha = nbsp_run["stages"], 0.2
    previous = {}
    union = {}
    for k, stage in enumerate(stages):
        for name in NETWORKS:
            scores, selected = stage["scores"][name], stage["selected"][name]
            assert scores.shape == selected.shape == (32,)
            assert ((scores >= 0.5) & (scores <= 1.0)).all()  # goal scores: max(R, 1 - R)
            assert int(selected.sum()) == SKILL
            assert torch.equal(selected, sn.select_top(scores, 0.2))
            new = torch.where(selected, alpha * (1 - scores), torch.ones_like(scores))
            combined = torch.cat(stage["neuron_masks"][name])
            expected = new if name not in previous else torch.minimum(previous[name], new)
            torch.testing.assert_close(combined, expected)
            union[name] = selected | union.get(name, torch.zeros_like(selected))
            assert torch.equal(combined < 1, union[name])  # every protected neuron, and only those
            previous[name] = combined
            if k:
                overlap = int((selected & stages[k - 1]["selected"][name]).sum())
                assert nbsp_run["metrics"]["stages"][k]["overlap_with_previous"][name] == overlap
    final = nbsp_run["checkpoint"]["neuron_masks"]
    for name in NETWORKS:
        assert [m.shape for m in final[name]] == [(16,), (16,)]
        assert (torch.cat(final[name]) < 1).sum() >= SKILL


@pytest.mark.e2e
def test_e2e_dpre_holds_the_last_transitions_of_each_stage(nbsp_run):
    rows = nbsp_run["checkpoint"]["dpre"]["rows"]
    # dpre_per_task = 50 from each of the H - 1 = 3 stages before the last
    assert rows.shape == (3 * 50, ROW)
    assert rows.abs().sum() > 0
    obs, next_obs = rows[:, :OBS_DIM], rows[:, OBS_DIM + ACT_DIM + 1 : 2 * OBS_DIM + ACT_DIM + 1]
    for segment in range(3):  # transitions 450..499 of one episode, in order: next_obs[t] == obs[t + 1]
        start = 50 * segment
        assert torch.equal(next_obs[start : start + 49], obs[start + 1 : start + 50])
    assert (rows[:, -1] == 0).all()  # Meta-World never terminates


# --------------------------------------------------------------------------------------------
# End to end: ablation flags change behaviour
# --------------------------------------------------------------------------------------------
SMALL_ARGS = dict(tasks=["reach"], cycles=2, hidden=[16, 16], batch_size=16, steps_per_task=150, learning_starts=50,
                  eval_episodes=1, identify_episodes=1, eval_every=0, dpre_per_task=20, replay_interval=2)


def small_run(tmp_path, **overrides):
    args = Args(**{**SMALL_ARGS, **overrides}, runs_dir=str(tmp_path / "runs"))
    metrics, spies = spied_main(args)
    run_dir = only_run_dir(tmp_path / "runs")
    stages = [load(os.path.join(run_dir, "checkpoints", f"stage_{k + 1}.pt")) for k in range(len(metrics["stages"]))]
    return metrics, spies, run_dir, load(os.path.join(run_dir, "checkpoint.pt")), stages


def trunk_rows(state, key, layer):
    """[N, fan_in + 1] incoming weights and bias of each neuron of hidden layer `layer`."""
    if key == "actor":
        weight, bias = state["actor"][f"trunk.{2 * layer}.weight"], state["actor"][f"trunk.{2 * layer}.bias"]
        return torch.cat([weight, bias[:, None]], 1)
    member = {"qf1": 0, "qf2": 1}[key]
    weight, bias = state["qf"][f"trunk.{2 * layer}.weight"][member], state["qf"][f"trunk.{2 * layer}.bias"][member]
    return torch.cat([weight, bias], 0).T


@pytest.mark.e2e
def test_ablation_no_mask(tmp_path):
    # --keep-buffer: D's rows stay in the checkpoint, for the check of Dpre's rows below
    metrics, spies, run_dir, checkpoint, _ = small_run(tmp_path, mask=False, keep_buffer=True)
    assert all(not stage.get("skill_neurons") for stage in metrics["stages"])
    assert all(torch.all(m == 1) for masks in checkpoint["neuron_masks"].values() for m in masks)
    assert not checkpoint["scores"]
    assert spies["update"].nonempty == 0 and spies["grad"].nonempty == 0
    assert not [tag for tag in scalars(run_dir) if tag.startswith("neurons/")]
    # replay stays on: Dpre holds stage 1's last 20 transitions (of its 150 in D, the first 50 random), whole rows
    assert checkpoint["rb"]["rows"].shape == (300, ROW)
    assert torch.equal(checkpoint["dpre"]["rows"], checkpoint["rb"]["rows"][130:150])


@pytest.mark.e2e
def test_ablation_no_replay_hard_mask_actor_only_weight_rule(tmp_path):
    metrics, spies, _, checkpoint, stages = small_run(tmp_path, replay=False, hard_mask=True, apply_to="actor",
                                                      identify="weight")
    assert checkpoint["dpre"]["rows"].shape[0] == 0
    assert set(checkpoint["neuron_masks"]) == {"actor"}
    assert [stage["skill_neurons"] for stage in metrics["stages"]] == [{"actor": SKILL}] * 2
    first = stages[0]
    mask = torch.cat(first["neuron_masks"]["actor"])
    assert set(mask.tolist()) == {0.0, 1.0} and int((mask == 0).sum()) == SKILL
    # weight rule: ranked by the mean |incoming weight| of the stage-end actor; the scores are the
    # window's goal scores handed out in that order (rank-matched)
    raw = torch.cat([first["actor"][f"trunk.{2 * layer}.weight"].abs().mean(1) for layer in range(2)])
    assert torch.equal(first["selected"]["actor"], sn.select_top(raw, 0.2))
    assert torch.equal(first["scores"]["actor"], sn.rank_matched(raw, first["scores"]["actor"]))
    # stage 2 trains with the stage-1 hard mask on the update: the protected rows do not move at all
    protected = mask == 0
    rows_1 = [trunk_rows(first, "actor", layer) for layer in range(2)]
    rows_2 = [trunk_rows(stages[1], "actor", layer) for layer in range(2)]
    for layer in range(2):
        layer_protected = protected[16 * layer : 16 * (layer + 1)]
        assert torch.equal(rows_2[layer][layer_protected], rows_1[layer][layer_protected])
    moved = torch.cat([(rows_2[layer] != rows_1[layer]).any(1) for layer in range(2)])
    assert moved[~protected].any()
    for name in ("qf1", "qf2"):  # critics are not masked
        assert not torch.equal(trunk_rows(stages[1], name, 0), trunk_rows(first, name, 0))
    assert spies["update"].nonempty > 0


@pytest.mark.e2e
def test_ablation_grad_target_random_rule_latest_combine(tmp_path):
    metrics, spies, _, checkpoint, stages = small_run(tmp_path, mask_target="grad", identify="random", hard_mask=True,
                                                      mask_combine="latest")
    # the gradient path is taken, the update path never has anything to mask
    assert spies["grad"].nonempty > 0 and spies["update"].nonempty == 0
    for stage in stages:
        for name in NETWORKS:
            scores, selected = stage["scores"][name], stage["selected"][name]
            assert 0.5 <= scores.min().item() and scores.max().item() <= 1.0  # goal scores, handed out by rank
            assert scores[selected].min() >= scores[~selected].max()
            combined = torch.cat(stage["neuron_masks"][name])
            # latest: only this stage's hard mask, whatever the previous one protected
            assert torch.equal(combined == 0, stage["selected"][name]) and int((combined == 0).sum()) == SKILL
    assert not torch.equal(stages[0]["scores"]["actor"], stages[1]["scores"]["actor"])
    # masking the gradient does not freeze hard-masked neurons under Adam: its moments keep moving them
    moved = False
    for name in NETWORKS:
        protected = torch.cat(stages[0]["neuron_masks"][name]) == 0
        for layer in range(2):
            rows_1, rows_2 = trunk_rows(stages[0], name, layer), trunk_rows(stages[1], name, layer)
            moved |= bool((rows_1 != rows_2).any(1)[protected[16 * layer : 16 * (layer + 1)]].any())
    assert moved
    assert all(stage["skill_neurons"] == {name: SKILL for name in NETWORKS} for stage in metrics["stages"])


@pytest.mark.e2e
def test_ablation_activation_rule_critic_only_ratio_alpha(tmp_path):
    metrics, _, _, checkpoint, stages = small_run(tmp_path, cycles=1, identify="activation", apply_to="critic",
                                                  skill_ratio=0.5, mask_alpha=0.5)
    assert metrics["sr"][0][0] is not None and metrics["FM"] is None
    assert set(checkpoint["neuron_masks"]) == {"qf1", "qf2"}
    count = round(0.5 * 32)  # 16
    assert metrics["stages"][0]["skill_neurons"] == {"qf1": count, "qf2": count}
    assert checkpoint["dpre"]["rows"].shape[0] == 0  # H = 1: nothing to replay later
    for name in ("qf1", "qf2"):
        scores, selected = stages[0]["scores"][name], stages[0]["selected"][name]
        assert 0.5 <= scores.min().item() and scores[selected].min() >= scores[~selected].max()
        expected = torch.where(selected, 0.5 * (1 - scores), torch.ones_like(scores))  # Eq. 7, alpha 0.5
        torch.testing.assert_close(torch.cat(checkpoint["neuron_masks"][name]), expected)


# --------------------------------------------------------------------------------------------
# Identification from the stage's own training (--identify-window training), and Dpre's rate
# --------------------------------------------------------------------------------------------
class ScriptedEpisodes(gym.Wrapper):
    """A real Meta-World task cut into 50-step episodes whose success is scripted: `succeeds(k)`
    for the k-th episode (1-based). Reports `info["episode"]` as RecordEpisodeStatistics does."""

    LENGTH = 50

    def __init__(self, env, succeeds):
        super().__init__(env)
        self.succeeds, self.episodes, self.steps, self.total = succeeds, 0, 0, 0.0

    def reset(self, **kwargs):
        self.episodes, self.steps, self.total = self.episodes + 1, 0, 0.0
        return self.env.reset(**kwargs)

    def step(self, action):
        obs, reward, terminated, _, info = self.env.step(action)
        self.steps, self.total = self.steps + 1, self.total + reward
        info = dict(info, success=float(self.succeeds(self.episodes) and self.steps == self.LENGTH))
        truncated = self.steps == self.LENGTH
        if truncated:
            info["episode"] = {"r": self.total, "l": self.steps}
        return obs, reward, terminated, truncated, info


# stage 1: success alternates (even episodes); stage 2: only episode 3 succeeds; stage 3: never
SCRIPTS = {1000: lambda k: k % 2 == 0, 2000: lambda k: k == 3, 3000: lambda k: False}
WINDOW_ARGS = dict(tasks=["reach"], cycles=3, hidden=[16, 16], batch_size=16, steps_per_task=600, learning_starts=100,
                   eval_episodes=1, identify_episodes=4, eval_every=0, dpre_per_task=1000, seed=1)


@pytest.fixture(scope="module")
def window_run(tmp_path_factory):
    runs_dir = tmp_path_factory.mktemp("window")
    real_make_env, real_episode_rows = mw.make_env, ReplayBuffer.episode_rows
    windows = []

    def make_env(task, seed):  # the training envs of stages 1-3; evaluation envs stay as they are
        env = real_make_env(task, seed)
        return ScriptedEpisodes(env, SCRIPTS[seed - 1]) if seed - 1 in SCRIPTS else env

    def episode_rows(self, episodes):
        rows = real_episode_rows(self, episodes)
        windows.append(rows)
        return rows

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mw, "make_env", make_env)
        mp.setattr(ReplayBuffer, "episode_rows", episode_rows)
        metrics = main(Args(**WINDOW_ARGS, runs_dir=str(runs_dir)))
    run_dir = only_run_dir(runs_dir)
    return metrics, windows, load(os.path.join(run_dir, "checkpoint.pt")), scalars(run_dir), run_dir


@pytest.mark.e2e
def test_training_window_from_the_stages_own_episodes(window_run):
    metrics, windows, *_ = window_run
    stages = metrics["stages"]
    # 600 steps = 12 episodes of 50; episodes 3-12 start at or after step 100: the policy's
    for stage in stages:
        assert stage["identify_window"] == "training" and stage["identify_fallback"] is None
        assert stage["goal_constant"] is False
    # stage 1: the last 4 policy episodes (9-12) hold both outcomes; half their steps succeed
    first = stages[0]
    assert (first["goal_metric"], first["identify_episodes"], first["identify_widened"]) == ("success", 4, False)
    assert first["identify_steps"] == 200 and first["identify_success_share"] == 0.5
    obs, actions, tags = windows[0]
    assert sorted(set(tags.tolist())) == [401, 451, 501, 551]  # episode ids: the global step of their first step
    assert obs.shape == (200, OBS_DIM) and actions.shape == (200, ACT_DIM)
    # stage 2: episodes 9-12 all failed: widened back to episode 3, the stage's only success
    second = stages[1]
    assert (second["goal_metric"], second["identify_episodes"], second["identify_widened"]) == ("success", 10, True)
    assert second["identify_steps"] == 500 and second["identify_success_share"] == pytest.approx(0.1)
    assert min(windows[1][2]) == 600 + 101  # episode 3 of stage 2
    # stage 3: one outcome in the whole stage: the last 4 episodes with their return as the goal metric
    third = stages[2]
    assert (third["goal_metric"], third["identify_episodes"], third["identify_widened"]) == ("return", 4, False)
    assert third["identify_success_share"] == 0.0


@pytest.mark.e2e
def test_training_window_selection_is_recorded(window_run):
    metrics, windows, _, tags, run_dir = window_run
    for stage in metrics["stages"]:
        for name in NETWORKS:
            stats = stage["selection"][name]
            assert set(stats) == {"selected_dead", "dead", "selected_score_mean", "other_score_mean", "protected",
                                  "protected_mask_mean", "selected_dead_share", "selected_live_mask_mean"}
            assert 0 <= stats["selected_dead"] <= min(stats["dead"], SKILL)
            assert 0.0 <= stats["protected_mask_mean"] <= 0.2 * 0.5  # Eq. 7 with alpha 0.2, scores >= 0.5
    # stage 1's saved scores are Eq. 3-4 of the stage-end networks' activations over the window against
    # its goal: episodes 10 and 12 (ids 451 and 551) succeeded, 9 and 11 (401 and 501) did not
    stage_1 = load(os.path.join(run_dir, "checkpoints", "stage_1.pt"))
    obs, actions, window_tags = windows[0]
    assert window_tags.tolist() == [401] * 50 + [451] * 50 + [501] * 50 + [551] * 50
    goal = t([0.0] * 50 + [1.0] * 50 + [0.0] * 50 + [1.0] * 50)
    actor = mw.Actor(OBS_DIM, ACT_DIM, [16, 16], -np.ones(ACT_DIM), np.ones(ACT_DIM))
    qf = mw.TwinQNetwork(OBS_DIM, ACT_DIM, [16, 16])
    actor.load_state_dict(stage_1["actor"])
    qf.load_state_dict(stage_1["qf"])
    networks = {"actor": actor.hidden_layers(), "qf1": qf.hidden_layers(0), "qf2": qf.hidden_layers(1)}
    with sn.ActivationRecorder([layer for name in NETWORKS for layer in networks[name]]) as recorder, torch.no_grad():
        actor(obs)
        qf(obs, actions)  # the critics at the window's actions
    activations = sn.split_recorded(recorder.activations(), networks, NETWORKS)
    for name in NETWORKS:  # --goal-score paper, --identify goal: the saved scores are the goal scores
        torch.testing.assert_close(stage_1["scores"][name], sn.goal_scores(torch.cat(activations[name], 1), goal))
    steps = [600, 1200, 1800]
    assert [step for step, _ in tags["neurons/identify_success_share"]] == steps
    assert [value for _, value in tags["neurons/goal_metric_is_return"]] == [0.0, 0.0, 1.0]
    assert [value for _, value in tags["neurons/actor/selected_dead"]] == [
        stage["selection"]["actor"]["selected_dead"] for stage in metrics["stages"]]


@pytest.mark.e2e
def test_dpre_receives_only_policy_transitions(window_run):
    metrics, _, checkpoint, *_ = window_run
    # 600 steps, the first 100 random: 500 policy transitions join Dpre (dpre_per_task 1000 would take more)
    assert [stage.get("dpre_added") for stage in metrics["stages"]] == [500, 500, None]
    assert checkpoint["dpre"]["rows"].shape == (1000, ROW)


@pytest.mark.e2e
def test_training_window_resume_is_exact(tmp_path, monkeypatch):
    """Killed after stage 1 and resumed, a run identifying on its training episodes ends with the
    same weights and masks; with --keep-buffer, D's episode tags come back from the checkpoint."""
    real_make_env = mw.make_env
    monkeypatch.setattr(mw, "make_env", lambda task, seed: ScriptedEpisodes(real_make_env(task, seed), SCRIPTS[seed - 1])
                        if seed - 1 in SCRIPTS else real_make_env(task, seed))
    args = {**WINDOW_ARGS, "cycles": 2, "keep_buffer": True}
    full = main(Args(**args, runs_dir=str(tmp_path / "full")))
    killed = kill_after_stage(mw, Args(**args, runs_dir=str(tmp_path / "killed")), 1)
    resumed = main(Args(resume=killed))
    assert [s["identify_window"] for s in resumed["stages"]] == ["training", "training"]
    assert resumed["stages"][1]["identify_widened"] is True  # stage 2's window reaches back to episode 3
    for key in ("sr", "ASR", "FM", "FWT"):
        assert resumed[key] == full[key]
    assert [s["selection"] for s in resumed["stages"]] == [s["selection"] for s in full["stages"]]
    a = load(os.path.join(only_run_dir(tmp_path / "full"), "checkpoint.pt"))
    b = load(os.path.join(killed, "checkpoint.pt"))
    for key in ("actor", "qf"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    for name in NETWORKS:
        for x, y in zip(a["neuron_masks"][name], b["neuron_masks"][name], strict=True):
            assert torch.equal(x, y)
    assert torch.equal(a["rb"]["episode"], b["rb"]["episode"]) and len(a["rb"]["episode"]) == 1200


@pytest.mark.e2e
def test_dpre_rate_of_critic_and_actor(tmp_path):
    """Every replay_interval-th critic step and, counted on their own, every replay_interval-th
    actor step take their batch from Dpre: 100 and 100 of 1000 at interval 10 (policy frequency 2)."""
    samples, actor_obs, critic_batches = [], [], []
    real_sample, real_actor_step, real_update = ReplayBuffer.sample, SACLearner.actor_step, SACLearner.update

    def sample(self, batch_size):
        batch = real_sample(self, batch_size)
        samples.append((self.capacity == 1000, batch))  # Dpre's capacity: dpre_per_task * (H - 1)
        return batch

    def actor_step(self, obs):
        actor_obs.append(obs)
        return real_actor_step(self, obs)

    def update(self, data, *rest, **kwargs):
        critic_batches.append(data)
        return real_update(self, data, *rest, **kwargs)

    args = Args(tasks=["reach"], cycles=2, hidden=[16, 16], batch_size=16, steps_per_task=1050, learning_starts=50,
                eval_episodes=1, identify_episodes=1, eval_every=0, dpre_per_task=1000, replay_interval=10,
                buffer_size=5000, runs_dir=str(tmp_path))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ReplayBuffer, "sample", sample)
        mp.setattr(SACLearner, "actor_step", actor_step)
        mp.setattr(SACLearner, "update", update)
        metrics = main(args)
    second = metrics["stages"][1]
    assert second["critic_updates"] == 1000 and second["actor_updates"] == 1000
    assert second["critic_dpre_updates"] == 100 and second["actor_dpre_updates"] == 100
    # the critic's batch of each update, by the buffer that sampled it: stage 1 (Dpre empty) always D;
    # stage 2 Dpre exactly on its updates 0, 10, 20, ...
    source = {id(batch): from_dpre for from_dpre, batch in samples}
    assert len(critic_batches) == 2000
    assert [source[id(data)] for data in critic_batches] == [False] * 1000 + [k % 10 == 0 for k in range(1000)]
    # what the updates really consumed in stage 2 (the last 1000 actor steps)
    dpre_batches = [batch[0] for from_dpre, batch in samples if from_dpre]
    assert len(actor_obs) == 2000
    # by value: the learner stacks an update's actor batches into one tensor
    assert sum(any(torch.equal(obs, batch) for batch in dpre_batches) for obs in actor_obs[1000:]) == 100
    assert len(dpre_batches) == 100  # an actor step due on Dpre at a critic Dpre step reuses its batch


@pytest.mark.e2e
def test_identify_max_steps_subsamples_the_window(tmp_path):
    # the window (one 500-step rollout episode, see below) is cut to 100 evenly spaced steps
    metrics, *_ = small_run(tmp_path, cycles=1, identify_max_steps=100)
    assert metrics["stages"][0]["identify_episodes"] == 1 and metrics["stages"][0]["identify_steps"] == 100


@pytest.mark.e2e
def test_selected_dead_neurons_are_announced(tmp_path, capsys):
    # a constant window (one rollout episode, see below): Eq. 3 scores every dead unit 1.0, so the
    # selection falls on units that carry no signal; the run says so on the console and in metrics.json
    metrics, *_ = small_run(tmp_path, cycles=1)
    selection = metrics["stages"][0]["selection"]
    assert all(selection[name]["selected_dead"] > 0 for name in NETWORKS)
    err = capsys.readouterr().err
    expected = ", ".join(f"{selection[name]['selected_dead']} of {SKILL} ({name})" for name in NETWORKS)
    assert f"stage 1 (reach): selected skill neurons constant over the window: {expected}; Eq. 3" in err
    assert "--goal-score balanced gives it 0.5" in err


@pytest.mark.e2e
def test_balanced_score_on_a_constant_window_gives_no_neuron_a_hard_freeze(tmp_path):
    # 150 steps: no episode ends, so one post-stage rollout episode (announced): its success, and with one
    # episode its return too, is constant. Eq. 3 would give every dead unit 1.0 (mask 0); balanced gives 0.5.
    metrics, _, _, checkpoint, _ = small_run(tmp_path, cycles=1, goal_score="balanced")
    stage = metrics["stages"][0]
    assert stage["identify_window"] == "rollout" and stage["identify_fallback"] == "no policy episode finished in the stage"
    assert stage["goal_constant"] is True
    for name in NETWORKS:
        assert (checkpoint["scores"][name] == 0.5).all()
        masks = torch.cat(checkpoint["neuron_masks"][name])
        assert int((masks < 1).sum()) == SKILL and torch.allclose(masks[masks < 1], torch.tensor(0.2 * 0.5))


# --------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------
RESUME_ARGS = dict(tasks=["reach", "drawer-close"], cycles=1, hidden=[16, 16], batch_size=16, steps_per_task=150,
                   learning_starts=50, eval_episodes=1, identify_episodes=1, eval_every=100, dpre_per_task=20,
                   replay_interval=2, seed=3)


class SimulatedKill(Exception):
    pass


@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    main(Args(**RESUME_ARGS, runs_dir=str(base / "a")))
    run_a = only_run_dir(base / "a")
    scalars_a = scalars(run_a)

    real_make_env = mw.make_env

    def make_env_killed_at_stage_2(task, seed):
        if seed == RESUME_ARGS["seed"] + 2000:  # the training env of stage 2
            for writer in writers:
                writer.flush()
            raise SimulatedKill
        return real_make_env(task, seed)

    with pytest.MonkeyPatch.context() as mp:
        writers = track_writers(mp)
        mp.setattr(mw, "make_env", make_env_killed_at_stage_2)
        with pytest.raises(SimulatedKill):
            main(Args(**RESUME_ARGS, runs_dir=str(base / "b")))
    run_b = only_run_dir(base / "b")
    interrupted = read_json(os.path.join(run_b, "metrics.json"))
    resumed = main(Args(resume=run_b))
    return {"base": base, "run_a": run_a, "scalars_a": scalars_a, "run_b": run_b, "interrupted": interrupted,
            "resumed": resumed}


@pytest.mark.e2e
def test_resume_continues_exactly(resume_runs):
    interrupted = resume_runs["interrupted"]
    assert interrupted["complete"] is False and interrupted["sr"][1] == [None, None]
    metrics_a = read_json(os.path.join(resume_runs["run_a"], "metrics.json"))
    metrics_b = read_json(os.path.join(resume_runs["run_b"], "metrics.json"))
    assert metrics_b == resume_runs["resumed"]
    assert metrics_b["complete"] is True
    assert metrics_b["sr"] == metrics_a["sr"]
    for key in ("ASR", "FM", "FWT", "task_success"):
        assert metrics_b[key] == metrics_a[key]
    drop_time = [{k: v for k, v in stage.items() if k != "wall_seconds"} for stage in metrics_a["stages"]]
    assert [{k: v for k, v in stage.items() if k != "wall_seconds"} for stage in metrics_b["stages"]] == drop_time
    final_a = load(os.path.join(resume_runs["run_a"], "checkpoint.pt"))
    final_b = load(os.path.join(resume_runs["run_b"], "checkpoint.pt"))
    for key in ("actor", "qf", "qf_target"):
        for name in final_a[key]:
            assert torch.equal(final_a[key][name], final_b[key][name]), f"{key}.{name}"
    assert torch.equal(final_a["log_alpha"], final_b["log_alpha"])
    assert torch.equal(final_a["dpre"]["rows"], final_b["dpre"]["rows"])
    for name in final_a["neuron_masks"]:
        for ma, mb in zip(final_a["neuron_masks"][name], final_b["neuron_masks"][name]):
            assert torch.equal(ma, mb)


@pytest.mark.e2e
def test_resume_keeps_the_stage_boundary_in_tensorboard(resume_runs):
    # the interrupted run logged stage 1's evaluation at global step 150; after the resume the
    # run's TensorBoard view must show the same evaluation points as the uninterrupted run
    steps_a = [step for step, _ in resume_runs["scalars_a"]["eval/ASR"]]
    assert steps_a == [150, 300]
    steps_b = [step for step, _ in scalars(resume_runs["run_b"])["eval/ASR"]]
    assert steps_b == steps_a


@pytest.mark.e2e
def test_resume_of_finished_run_has_nothing_to_do(resume_runs, tmp_path, capsys):
    finished = str(tmp_path / "finished")
    shutil.copytree(resume_runs["run_a"], finished)
    before = folder_snapshot(finished)
    capsys.readouterr()
    metrics = main(Args(resume=finished))
    assert "nothing to resume" in capsys.readouterr().out
    assert metrics == read_json(os.path.join(finished, "metrics.json"))
    after = folder_snapshot(finished)
    for name in ("metrics.json", "config.json", "checkpoint.pt"):
        assert after[name] == before[name]


@pytest.mark.e2e
def test_resume_of_finished_run_keeps_tensorboard(resume_runs, tmp_path, monkeypatch):
    finished = str(tmp_path / "finished")
    shutil.copytree(resume_runs["run_a"], finished)
    writers = track_writers(monkeypatch)
    main(Args(resume=finished))
    for writer in writers:
        writer.flush()
    assert scalars(finished)["eval/ASR"] == resume_runs["scalars_a"]["eval/ASR"]


@pytest.mark.e2e
def test_resume_killed_before_final_metrics_write(resume_runs, tmp_path):
    # a kill between the last stage's checkpoint.pt and its metrics.json leaves the stage-(H-1)
    # metrics.json beside a finished checkpoint; the resume must complete metrics.json
    folder = str(tmp_path / "killed")
    shutil.copytree(resume_runs["run_a"], folder)
    final = read_json(os.path.join(folder, "metrics.json"))
    stale = {**final, "complete": False, "sr": [final["sr"][0], [None, None]], **continual_metrics([final["sr"][0][:1]]),
             "task_success": final["task_success"][:1], "stages": final["stages"][:1]}
    protocol.atomic_write_json(os.path.join(folder, "metrics.json"), stale)
    metrics = main(Args(resume=folder))
    assert metrics["complete"] is True and metrics["sr"] == final["sr"]
    assert read_json(os.path.join(folder, "metrics.json"))["complete"] is True


@pytest.mark.e2e
def test_resume_with_extra_flags_fails(resume_runs, capsys):
    before = folder_snapshot(resume_runs["run_a"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(Args(resume=resume_runs["run_a"], seed=5))
    assert exit_info.value.code not in (0, None)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "--seed" in lines[0]
    assert folder_snapshot(resume_runs["run_a"]) == before


# --------------------------------------------------------------------------------------------
# Bad input: one line on stderr, non-zero exit, nothing written
# --------------------------------------------------------------------------------------------
def expect_one_line_error(capsys, call):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        call()
    assert exit_info.value.code not in (0, None)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error:")
    return lines[0]


@pytest.mark.parametrize("overrides, named", [
    ({"tasks": ["not-a-task"]}, "window-open"),
    ({"tasks": ["reach", "reach-v9"]}, "drawer-close"),
    ({"skill_ratio": 0.0}, "skill-ratio"),
    ({"skill_ratio": 1.5}, "skill-ratio"),
    ({"mask_alpha": -0.1}, "mask-alpha"),
    ({"mask_alpha": 1.1}, "mask-alpha"),
    ({"steps_per_task": 0}, "steps-per-task"),
    ({"identify_max_steps": 0}, "identify-max-steps"),
])
def test_bad_input_stops_with_one_line(overrides, named, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = expect_one_line_error(capsys, lambda: main(Args(**{**SMALL_ARGS, **overrides}, runs_dir=str(tmp_path / "runs"))))
    assert named in line
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("overrides", [{"identify": "bogus"}, {"apply_to": "bogus"}, {"mask_target": "bogus"},
                                       {"mask_combine": "bogus"}, {"identify_window": "bogus"}, {"goal_score": "bogus"}])
def test_bad_choice_through_python_api_stops_with_one_line(overrides, tmp_path, capsys, monkeypatch):
    # tyro rejects these on the command line; main(Args(...)) must reject them too, before any work
    monkeypatch.chdir(tmp_path)
    args = Args(**{**SMALL_ARGS, "cycles": 1, "steps_per_task": 20, "learning_starts": 10, "hidden": [4],
                   "batch_size": 4, **overrides}, runs_dir=str(tmp_path / "runs"))
    line = expect_one_line_error(capsys, lambda: main(args))
    assert list(overrides)[0].replace("_", "-") in line
    assert os.listdir(tmp_path) == []


def test_missing_resume_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = expect_one_line_error(capsys, lambda: main(Args(resume=str(tmp_path / "no-such-run"))))
    assert "no-such-run" in line
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("config, checkpoint", [
    (b"{not json", b"not a torch file"),
    (json.dumps({"run_name": "x", "args": {}}).encode(), b"not a torch file"),
    (b"{not json", None),  # a real torch file, config garbage
    (json.dumps({"run_name": "x", "args": {}}).encode(), "other-run"),  # a checkpoint of another run
])
def test_corrupt_resume_folder(config, checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "corrupt"
    folder.mkdir()
    (folder / "config.json").write_bytes(config)
    if isinstance(checkpoint, bytes):
        (folder / "checkpoint.pt").write_bytes(checkpoint)
    else:
        torch.save({"run_name": checkpoint or "x", "stage": 1}, folder / "checkpoint.pt")
    before = folder_snapshot(folder)
    line = expect_one_line_error(capsys, lambda: main(Args(resume=str(folder))))
    assert "corrupt" in line
    assert folder_snapshot(folder) == before
    assert os.listdir(tmp_path) == ["corrupt"]


def test_cli_unknown_task_subprocess(tmp_path):
    result = subprocess.run([sys.executable, SCRIPT, "--tasks", "not-a-task"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and "not-a-task" in lines[0]
    for valid in ("reach", "window-open", "window-close", "drawer-close"):
        assert valid in lines[0]
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv, expected", [
    (["--identify", "bogus"], ["bogus", "goal", "activation", "weight", "random"]),
    (["--skill-ratio", "abc"], ["--skill-ratio", "abc"]),
])
def test_cli_parse_errors_are_one_line(tmp_path, argv, expected):
    result = subprocess.run([sys.executable, SCRIPT, *argv], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and all(word in lines[0] for word in expected)
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------
# Flags not covered above: --keep-buffer, --early-stop-success, --policy-frequency, --cudagraphs
# --------------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_keep_buffer_carries_d_across_stages(tmp_path):
    # D holds both stages' 150 transitions at the end instead of the last stage's only
    _, _, _, checkpoint, _ = small_run(tmp_path, keep_buffer=True)
    assert checkpoint["rb"]["rows"].shape == (2 * 150, ROW)
    _, _, _, fresh, _ = small_run(tmp_path / "fresh")
    assert fresh["rb"] == {}  # a fresh D per stage is not checkpointed


class AlwaysSucceeds(mw.gym.Wrapper):
    """Every step reports success and episodes last 20 steps, so early stopping can trigger."""

    def reset(self, **kwargs):
        self.steps = 0
        return self.env.reset(**kwargs)

    def step(self, action):
        obs, reward, terminated, _, info = self.env.step(action)
        self.steps += 1
        info = {**info, "success": 1.0, "episode": {"r": reward, "l": self.steps}}
        return obs, reward, terminated, self.steps >= 20, info


class SucceedsInFirstEpisode(mw.gym.Wrapper):
    """Reports success from the 5th step of its first episode on, never after; counts the steps."""

    def reset(self, **kwargs):
        self.episodes, self.steps_in_episode = getattr(self, "episodes", 0) + 1, 0
        return self.env.reset(**kwargs)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.steps_in_episode += 1
        self.total_steps = getattr(self, "total_steps", 0) + 1
        return obs, reward, terminated, truncated, {**info, "success": self.episodes == 1 and self.steps_in_episode >= 5}


def test_evaluation_rollout_ends_an_episode_at_its_first_success():
    def run(until_success):
        envs = [SucceedsInFirstEpisode(mw.make_env("reach", 0)) for _ in range(2)]
        result = mw.rollout(envs, 4, lambda obs: torch.zeros(len(obs), ACT_DIM), 0, torch.device("cpu"),
                            until_success=until_success)
        return result["success"].tolist(), sum(env.total_steps for env in envs)

    # waves of 2: episodes 0 and 1 are each env's first (success at step 5), episodes 2 and 3 fail
    assert run(until_success=False) == ([1.0, 1.0, 0.0, 0.0], 4 * 500)
    assert run(until_success=True) == ([1.0, 1.0, 0.0, 0.0], 5 + 5 + 500 + 500)


@pytest.mark.e2e
def test_early_stop_after_ten_successful_policy_episodes(tmp_path, monkeypatch):
    real_make_env = mw.make_env
    monkeypatch.setattr(mw, "make_env", lambda task, seed: AlwaysSucceeds(real_make_env(task, seed)))
    args = Args(**{**SMALL_ARGS, "cycles": 1, "steps_per_task": 1000, "learning_starts": 50},
                runs_dir=str(tmp_path / "runs"))
    metrics = main(args)
    stage = metrics["stages"][0]
    # random episodes end at steps 20, 40, 60 (started at 40 < 50: not counted); policy episodes
    # start at 60, 80, ..., so the tenth ends at step 260
    assert stage["early_stopped"] is True and stage["env_steps"] == 260
    no_stop = main(Args(**{**SMALL_ARGS, "cycles": 1, "steps_per_task": 300, "early_stop_success": 0.0},
                        runs_dir=str(tmp_path / "no_stop")))
    assert no_stop["stages"][0]["early_stopped"] is False and no_stop["stages"][0]["env_steps"] == 300


def test_an_early_stop_at_an_evaluation_step_is_evaluated_once(tmp_path, monkeypatch):
    """The tenth policy episode ends at step 260 (as above), a multiple of --eval-every 130: the
    stage stops there all the same, and its end is evaluated once, by the stage's own evaluation."""
    real_make_env = mw.make_env
    monkeypatch.setattr(mw, "make_env", lambda task, seed: AlwaysSucceeds(real_make_env(task, seed)))
    metrics = main(Args(**{**SMALL_ARGS, "cycles": 1, "steps_per_task": 1000, "learning_starts": 50, "eval_every": 130},
                        runs_dir=str(tmp_path)))
    assert metrics["stages"][0]["early_stopped"] is True and metrics["stages"][0]["env_steps"] == 260
    assert [step for step, _ in scalars(only_run_dir(tmp_path))["eval/reach/success_rate"]] == [130, 260]


def test_policy_frequency_sets_actor_updates(monkeypatch):
    calls = []
    learner = SACLearner(OBS_DIM, ACT_DIM, -np.ones(ACT_DIM), np.ones(ACT_DIM),
                         Args(hidden=[8], batch_size=4, policy_frequency=3), "cpu")
    monkeypatch.setattr(learner, "actor_step", lambda obs: calls.append(1) or {})
    buffer = ReplayBuffer(10, OBS_DIM, ACT_DIM, "cpu")
    buffer.extend(torch.randn(10, ROW))
    learner.update(buffer.sample(4), update_policy=True, update_target=True)
    learner.update(buffer.sample(4), update_policy=False, update_target=True)
    assert len(calls) == 3  # three actor steps when the policy is updated, none otherwise


@pytest.mark.e2e
def test_compile_run_has_no_graph_breaks_with_masks_and_dpre(tmp_path):
    """--compile over two stages, masks and Dpre (critic and actor batches) on in the second: no
    graph break anywhere. Graphs: acting, the update with and without actor steps, and those two
    once more when the masks are installed (then never again)."""
    torch._dynamo.reset()
    counters.clear()
    metrics = main(Args(**SMALL_ARGS, compile=True, runs_dir=str(tmp_path / "runs")))
    assert metrics["complete"] and metrics["stages"][1]["actor_dpre_updates"] > 0
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] == 5


def test_cudagraphs_without_cuda_stops_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main(Args(**SMALL_ARGS, cudagraphs=True, cuda=False, runs_dir=str(tmp_path / "runs")))
    assert exit.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --cudagraphs needs a CUDA device")
    assert not (tmp_path / "runs").exists()
