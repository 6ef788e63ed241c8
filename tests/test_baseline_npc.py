"""NPC (baselines/npc.py): the Taylor importance and its normalisation by hand, the current task's
moving average and the consolidation at task switches on both scripts' learners, that a neuron
with high importance moves less than one with none (exactly its scale times the plain SAC step),
that only a loss's own networks collect importance, that NPC is not plain SAC 1,000 updates into
the second task (the first task's important neurons stay protected), and end-to-end runs of both
scripts through a killed stage and a resume."""

import json
import os
from functools import partial

import pytest
import torch

import conftest
import skill_neurons as sn
from baselines.npc import normalise_per_layer, taylor_importance
from conftest import atari_batch, evaluated, load, metaworld_batch, seeded

metaworld_learner = partial(conftest.metaworld_learner, "npc", hidden=[8, 8], batch_size=8)
atari_learner = partial(conftest.atari_learner, "npc", conv_channels=[4, 8, 8], hidden=[16], batch_size=4)
LEARNERS = [(metaworld_learner, metaworld_batch), (atari_learner, atari_batch)]


# --------------------------------------------------------------------------------------------
# The importance, by hand
# --------------------------------------------------------------------------------------------
def test_taylor_importance_by_hand():
    activation = torch.tensor([[1.0, 2.0, 0.0], [3.0, -1.0, 4.0]])
    grad = torch.tensor([[0.5, -1.0, 7.0], [-2.0, 1.0, 0.25]])
    # |a g| per sample: [0.5, 2, 0] and [6, 1, 1]; batch means
    torch.testing.assert_close(taylor_importance(activation, grad), torch.tensor([3.25, 1.5, 0.5]))


def test_taylor_importance_of_a_channel_sums_its_positions_before_the_absolute_value():
    activation = torch.tensor([[[[1.0, 2.0]], [[1.0, 1.0]]], [[[3.0, 1.0]], [[0.0, 2.0]]]])  # [B=2, C=2, 1, 2]
    grad = torch.tensor([[[[1.0, -1.0]], [[2.0, 2.0]]], [[[1.0, 1.0]], [[5.0, -0.5]]]])
    # channel 0: sample 1 sums 1 - 2 = -1, sample 2 sums 3 + 1 = 4 -> (1 + 4) / 2
    # channel 1: sample 1 sums 2 + 2 = 4, sample 2 sums 0 - 1 = -1 -> (4 + 1) / 2
    torch.testing.assert_close(taylor_importance(activation, grad), torch.tensor([2.5, 2.5]))


def test_taylor_importance_of_an_ensemble_member():
    activation = torch.tensor([[[1.0, 1.0]], [[2.0, -3.0]]])  # [E=2, B=1, N=2]
    grad = torch.tensor([[[9.0, 9.0]], [[0.5, 1.0]]])
    torch.testing.assert_close(taylor_importance(activation, grad, member=1), torch.tensor([1.0, 3.0]))


def test_normalisation_divides_by_the_layer_mean():
    torch.testing.assert_close(normalise_per_layer(torch.tensor([1.0, 2.0, 3.0])), torch.tensor([0.5, 1.0, 1.5]))
    torch.testing.assert_close(normalise_per_layer(torch.zeros(3)), torch.zeros(3))  # a dead layer stays at zero


# --------------------------------------------------------------------------------------------
# Moving average and step scales on the real learners
# --------------------------------------------------------------------------------------------
class TaylorProbe:
    """Independent record of a * dL/da on the activation modules of the given hidden layers."""

    def __init__(self, layers):
        self.outputs = []
        self.handles = [layer.activation.register_forward_hook(self.keep(i, layer)) for i, layer in enumerate(layers)]

    def keep(self, index, layer):
        def hook(_module, _inputs, output):
            if output.requires_grad:
                output.retain_grad()
                self.outputs.append((index, layer.member, output))
        return hook

    def importance(self, index):
        (member, output), = [(m, o) for i, m, o in self.outputs if i == index]
        product = (output * output.grad).detach()
        if member is not None:
            product = product[member]
        if product.dim() > 2:
            product = product.flatten(2).sum(-1)
        return product.abs().mean(0)


@pytest.mark.parametrize("make, batch", LEARNERS, ids=["metaworld", "atari"])
def test_one_critic_step_sets_the_task_average_and_the_switch_consolidates_it(make, batch):
    learner, method = make(npc_decay=0.9, npc_scale=2.0)
    method.begin_stage(0, "task")
    hidden = {name: [layer.hidden for layer in layers] for name, layers in learner.neuron_layers().items()}
    probes = {name: TaylorProbe(hidden[name]) for name in ("qf1", "qf2")}
    learner.critic_step(*batch(seeded(0)), update_target=False)
    for name in ("qf1", "qf2"):
        for index, layer in enumerate(hidden[name]):
            batch_importance = probes[name].importance(index)
            expected = 0.1 * batch_importance / batch_importance.mean()  # T = 0.9 * 0 + 0.1 * normalised
            torch.testing.assert_close(method.task_importance[name][index], expected)
            assert torch.all(method.neuron_scales[name][index] == 1)  # the first task trains at full step
    assert all(c.abs().sum() == 0 for c in method.task_importance["actor"])  # the critic loss leaves the actor alone
    assert len(hidden["qf1"]) == (2 if make is metaworld_learner else 4)  # Atari: 3 conv layers (channels) + 1 linear
    method.end_stage(0, "task", None)  # the task switch: C = T / mean(T), the scales follow
    for name in ("qf1", "qf2"):
        for index in range(len(hidden[name])):
            batch_importance = probes[name].importance(index)
            consolidated = batch_importance / batch_importance.mean()
            torch.testing.assert_close(method.consolidated[name][index], consolidated)
            torch.testing.assert_close(method.neuron_scales[name][index], 1 / (1 + 2.0 * consolidated))
    method.begin_stage(1, "next")  # the next task's average restarts; the consolidation stays
    assert all(c.abs().sum() == 0 for values in method.task_importance.values() for c in values)
    assert all(c.abs().sum() > 0 for name in ("qf1", "qf2") for c in method.consolidated[name])


def test_consolidation_keeps_the_maximum_over_finished_tasks():
    learner, method = metaworld_learner()
    first = [torch.tensor([3.0, 1.0, 0.0, 0.0, 2.0, 1.0, 1.0, 0.0]), torch.ones(8)]
    second = [torch.tensor([0.0, 2.0, 4.0, 0.0, 1.0, 1.0, 0.0, 0.0]), torch.ones(8)]
    for stage, values in enumerate((first, second, first)):  # A, B, A: a task seen again does not stack
        method.begin_stage(stage, "AB"[stage % 2])
        for name in ("actor", "qf1", "qf2"):
            for importance, value in zip(method.task_importance[name], values):
                importance.copy_(0.5 * value)  # the switch normalises by the layer mean: 0.5 cancels
        method.end_stage(stage, "AB"[stage % 2], None)
    expected = torch.tensor([3.0, 2.0, 4.0, 0.0, 2.0, 1.0, 1.0, 0.0])  # each layer mean 1: max of the two tasks
    for name in ("actor", "qf1", "qf2"):
        torch.testing.assert_close(method.consolidated[name][0], expected)
        torch.testing.assert_close(method.neuron_scales[name][0], 1 / (1 + expected))


@pytest.mark.parametrize("make, batch", LEARNERS, ids=["metaworld", "atari"])
def test_the_actor_loss_feeds_only_the_actor(make, batch):
    learner, method = make()
    method.begin_stage(0, "task")
    obs = batch(seeded(0))[0]
    learner.actor_step(obs)  # Meta-World: gradients reach the critics' activations, which must not count
    assert all(c.abs().sum() > 0 for c in method.task_importance["actor"])
    assert all(c.abs().sum() == 0 for name in ("qf1", "qf2") for c in method.task_importance[name])
    with torch.no_grad():  # passes without gradients (targets, rollouts) record nothing
        learner.actor(obs)
    assert method.batch_importance == {}


@pytest.mark.parametrize("make, batch", LEARNERS, ids=["metaworld", "atari"])
def test_an_important_neuron_moves_less_than_one_with_none(make, batch):
    learner, method = make(npc_scale=1.0)
    method.begin_stage(0, "task")
    plain = learner.plain_copy()
    data = batch(seeded(0))
    with sn.ActivationRecorder([learner.neuron_layers()["qf2"][-1].hidden]) as recorder, torch.no_grad():
        learner.q_values(data[0], data[1])
    important, unimportant = torch.nonzero(recorder.activations()[0].abs().sum(0))[:2, 0]  # two live neurons
    state = method.state_dict()
    state["consolidated"]["qf2"][-1][important] = 100.0  # the others, and `unimportant`, have no importance yet
    method.load_state_dict(state)

    def rows(l):  # incoming weights of the last hidden layer of the second critic, a row per neuron
        return l.neuron_layers()["qf2"][-1].hidden.incoming_weight().clone()

    before_npc, before_plain = rows(learner), rows(plain)
    torch.testing.assert_close(before_npc, before_plain)
    torch.manual_seed(1)
    learner.critic_step(*data, update_target=False)
    torch.manual_seed(1)
    plain.critic_step(*data, update_target=False)
    moved_npc, moved_plain = rows(learner) - before_npc, rows(plain) - before_plain
    scale = method.neuron_scales["qf2"][-1]
    assert scale[important] < 0.011 and scale[unimportant] > 0.5
    # every neuron's step is its scale times the plain SAC (Adam) step
    torch.testing.assert_close(moved_npc, scale[:, None] * moved_plain)
    assert 0 < moved_npc[important].abs().max() < 0.05 * moved_npc[unimportant].abs().max()


def test_state_round_trip_restores_importance_and_scales():
    learner, method = metaworld_learner()
    method.begin_stage(0, "task")
    for _ in range(3):
        learner.update(metaworld_batch(seeded(0)), True, False)
    method.end_stage(0, "task", None)
    state = method.state_dict()
    other_learner, other = metaworld_learner()
    other.load_state_dict(state)
    for name in ("actor", "qf1", "qf2"):
        for a, b in zip(method.consolidated[name], other.consolidated[name], strict=True):
            assert torch.equal(a, b) and a.abs().sum() > 0
        for a, b in zip(method.neuron_scales[name], other.neuron_scales[name], strict=True):
            assert torch.equal(a, b)
    # the scales act through the learner's optimizers after a stage starts (also after a resume)
    other_learner.q_mask.set({})
    other.begin_stage(1, "task")
    assert any(m.min() < 1 for m in other_learner.q_mask.masks)


# --------------------------------------------------------------------------------------------
# Not plain SAC: 1,000 updates into the second task, its first task's neurons are still protected
# --------------------------------------------------------------------------------------------
def task_batches(shift, count, seed, n=8):
    """Meta-World-shaped batches of a task of their own: observations and rewards around `shift`."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(count):
        obs = torch.randn(n, 39, generator=generator) + shift
        yield (obs, torch.rand(n, 4, generator=generator) * 2 - 1, torch.randn(n, 1, generator=generator) + shift,
               obs + 0.1 * torch.randn(n, 39, generator=generator), torch.zeros(n, 1))


def test_npc_is_not_plain_sac(side_by_side):
    """After 100 updates of a first task and its switch, NPC and plain SAC (the same weights and Adam
    moments: NPC resets none) train 1,000 updates of a second task on the same batches. Neurons of
    above-average importance to the first task (C >= 1.5, step scale <= 0.4) move less than half
    as much, relative to plain SAC, as the neurons the first task hardly used (C < 0.5), which
    move about as much as under plain SAC: over the whole 1,000 updates and still over the last
    100. A single moving average through the switch (the decay 0.99 has a memory of about 100
    updates) fails this: its ratios over the 1,000 updates were 0.59 and 0.56."""
    learner, method = metaworld_learner(hidden=[16, 16])
    method.begin_stage(0, "first")
    side_by_side(learner, None, task_batches(0.0, 100, seed=1))
    method.end_stage(0, "first", None)
    method.begin_stage(1, "second")
    plain = learner.plain_copy()
    second = list(task_batches(-2.0, 1000, seed=2))

    def rows(each):  # every hidden neuron's incoming weights, per network and layer
        return {name: [layer.hidden.incoming_weight().detach().clone() for layer in layers]
                for name, layers in each.neuron_layers().items()}

    def moved_relative_to_plain(before, after, selected):
        """Per group of neurons, NPC's total movement over plain SAC's (dead neurons, which plain SAC
        does not move either, left out)."""
        npc_total = plain_total = 0.0
        for name, layers in method.consolidated.items():
            for index, consolidated in enumerate(layers):
                npc = (after[0][name][index] - before[0][name][index]).norm(dim=1)
                sac = (after[1][name][index] - before[1][name][index]).norm(dim=1)
                keep = selected(consolidated) & (sac > 0)
                npc_total, plain_total = npc_total + npc[keep].sum(), plain_total + sac[keep].sum()
        assert plain_total > 0
        return float(npc_total / plain_total)

    start = (rows(learner), rows(plain))
    side_by_side(learner, plain, second[:900])
    window = (rows(learner), rows(plain))
    side_by_side(learner, plain, second[900:], start=900)
    end = (rows(learner), rows(plain))
    important, unused = (lambda c: c >= 1.5), (lambda c: c < 0.5)
    assert sum(int(important(c).sum()) for layers in method.consolidated.values() for c in layers) >= 4
    for before in (start, window):  # the whole 1,000 updates, and the last 100 of them
        protected, free = moved_relative_to_plain(before, end, important), moved_relative_to_plain(before, end, unused)
        assert protected < 0.5 * free and free > 0.7, (protected, free)  # measured: 0.43 and 1.06, 0.39 and 0.92


# --------------------------------------------------------------------------------------------
# End to end: the shared tiny runs of both scripts, killed after stage 1 and resumed
# (tests/test_methods.py checks that the resume is exact)
# --------------------------------------------------------------------------------------------
@pytest.mark.e2e
@pytest.mark.parametrize("name, sizes", [("metaworld", {"actor": [8, 8], "qf1": [8, 8], "qf2": [8, 8]}),
                                         ("atari", {network: [4, 8, 8, 16] for network in ("actor", "qf1", "qf2")})],
                         ids=["metaworld", "atari"])
def test_end_to_end_consolidation(name, sizes, method_runs):
    runs = method_runs(name, "npc")
    metrics, after_stage_1 = runs.resumed_metrics, runs.killed_checkpoint
    with open(os.path.join(runs.resumed_dir, "metrics.json")) as f:
        assert json.load(f) == metrics
    assert metrics["complete"] and len(metrics["sr"]) == 2
    assert evaluated(metrics, 0) and metrics["sr"][0][1] is None and evaluated(metrics, 1)
    final = load(os.path.join(runs.resumed_dir, "checkpoint.pt"))
    for checkpoint in (after_stage_1, final):
        consolidated = checkpoint["method"]["consolidated"]
        assert {network: [len(c) for c in values] for network, values in consolidated.items()} == sizes
        assert all(c.sum() > 0 for values in consolidated.values() for c in values)  # the first task's, at its switch
    for network, values in final["method"]["consolidated"].items():  # no switch after the last stage: kept as it was
        assert all(torch.equal(a, b) for a, b in zip(values, after_stage_1["method"]["consolidated"][network], strict=True))
