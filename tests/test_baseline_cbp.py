"""CBP (baselines/cbp.py): the utility and its bias correction by hand, the layouts of both
scripts (heads, ensemble members, conv channels read by a conv or through the flatten) against the
authors' formulas, maturity and selection, that replacing a near-constant unit leaves the output
almost unchanged, that the replaced count matches the replacement rate on average, that CBP is not
plain SAC (its replacements, and ages that count each network's own optimizer steps), and
end-to-end runs of both scripts through a killed stage and a resume."""

import json
import math
import os
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import conftest
import skill_neurons as sn
from baselines import make_method
from skill_neurons import Consumer, NeuronLayer
from baselines.cbp import neuron_slices, outgoing
from conftest import atari_batch, evaluated, load, metaworld_batch, seeded


class TinyLearner:
    """An "actor" 2 -> width ReLU units -> 1 trained with Adam, and no critics: the smallest thing
    with the learner's interface that CBP uses."""

    def __init__(self, width=3, lr=0.0, **flags):
        torch.manual_seed(0)
        self.actor = nn.Sequential(nn.Linear(2, width), nn.ReLU(), nn.Linear(width, 1))
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=lr)
        self.q_optimizer = None
        self.method = make_method(SimpleNamespace(method="cbp", **flags))
        self.method.setup(self)

    def neuron_layers(self):
        first, relu, head = self.actor
        hidden = sn.HiddenLayer(relu, first.weight, first.bias, neuron_dim=0)
        return {"actor": [NeuronLayer(hidden, (Consumer(head.weight, head.bias, 1),))]}

    def train_step(self, x):
        self.actor_optimizer.zero_grad()
        self.actor(x).sum().backward()
        self.actor_optimizer.step()
        self.method.after_step("actor")


def tiny(width=3, lr=0.0, rr=1e-4, mt=10_000, decay=0.9):
    return TinyLearner(width, lr, cbp_replacement_rate=rr, cbp_maturity_threshold=mt, cbp_decay=decay)


def set_tiny_weights(learner):
    first, _, head = learner.actor
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        first.bias.zero_()
        head.weight.copy_(torch.tensor([[0.5, -2.0, 0.1]]))
        head.bias.zero_()


X = torch.tensor([[1.0, 2.0], [3.0, -1.0]])  # hidden activations [[1, 2, 3], [3, 0, 2]]: mean |h| = [2, 1, 2.5]


# --------------------------------------------------------------------------------------------
# Utility, bias correction, maturity and selection by hand
# --------------------------------------------------------------------------------------------
def test_utility_by_hand():
    learner = tiny(decay=0.9)
    set_tiny_weights(learner)
    units = learner.method.units["actor"][0]
    contribution = torch.tensor([0.5 * 2, 2.0 * 1, 0.1 * 2.5])  # |w_out| * mean |h| = [1, 2, 0.25]
    learner.train_step(X)  # lr 0: the weights stay as set
    torch.testing.assert_close(units.utility, 0.1 * contribution)
    torch.testing.assert_close(units.mean_activation, 0.1 * torch.tensor([[2.0], [1.0], [2.5]]))
    learner.train_step(X)
    torch.testing.assert_close(units.utility, 0.19 * contribution)  # 0.9 * 0.1 c + 0.1 c
    assert learner.method.steps["actor"] == 2 and learner.method.replaced["actor"] == 0


def test_replacement_ranks_by_bias_corrected_utility():
    # ages 2, 30, 30 with raw utilities (1 - 0.9^age) * [1, 0.5, 2]: corrected [1, 0.5, 2] picks unit 1;
    # the raw ones [0.19, 0.48, 1.92] would pick unit 0
    learner = tiny(mt=1, decay=0.9)
    set_tiny_weights(learner)
    learner.train_step(X)  # lr 0: Adam's moments exist, the weights stay as set
    first, _, head = learner.actor
    units = learner.method.units["actor"][0]
    learner.method.steps["actor"] = 30
    units.created.copy_(torch.tensor([28, 0, 0]))
    units.created_host = [0, 0, 28]
    units.utility.copy_(torch.tensor([(1 - 0.9**2) * 1.0, (1 - 0.9**30) * 0.5, (1 - 0.9**30) * 2.0]))
    learner.method._replace("actor", units, 1)
    assert torch.equal(head.weight, torch.tensor([[0.5, 0.0, 0.1]]))  # unit 1's outgoing weight zeroed, the others kept
    assert torch.equal(first.weight[[0, 2]], torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    assert not torch.equal(first.weight[1], torch.tensor([0.0, 1.0]))  # fresh incoming weights
    assert units.created.tolist() == [28, 30, 0] and units.utility[1] == 0


def test_mature_unit_of_lowest_utility_is_replaced():
    # rr = 1/3: once all 3 units are mature, exactly one replacement per step (floor(1 + U) = 1)
    learner = tiny(rr=1 / 3, mt=1, decay=0.9)
    set_tiny_weights(learner)
    first, _, head = learner.actor
    adam = learner.actor_optimizer.state
    learner.train_step(X)  # ages 1: none older than mt = 1
    assert learner.method.replaced["actor"] == 0
    outputs_before = learner.actor(X).detach()
    learner.train_step(X)  # ages 2: all eligible; unit 2 has the lowest utility (0.25 < 1 < 2)
    assert learner.method.replaced["actor"] == 1
    bound = math.sqrt(3 / 2)  # lecun uniform, fan-in 2
    assert torch.equal(first.weight[:2], torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert first.weight[2].abs().max() <= bound and not torch.equal(first.weight[2], torch.tensor([1.0, 1.0]))
    assert first.bias[2] == 0 and head.weight[0, 2] == 0
    torch.testing.assert_close(head.bias, torch.tensor([0.1 * 2.5]))  # old outgoing weight * mean activation
    for moment in ("exp_avg", "exp_avg_sq"):
        assert adam[first.weight][moment][2].abs().sum() == 0 and adam[first.bias][moment][2] == 0
        assert adam[head.weight][moment][0, 2] == 0
        assert adam[first.weight][moment][:2].abs().sum() > 0
    units = learner.method.units["actor"][0]
    assert units.utility[2] == 0 and units.mean_activation[2, 0] == 0
    assert units.created.tolist() == [0, 0, 2] and units.created_host == [0, 0, 2]
    # the unit was not constant (activations 3 and 2), so each output moves, but the batch mean does not
    torch.testing.assert_close(learner.actor(X).detach().mean(), outputs_before.mean())
    assert units.eligible(3, 1) == 2  # at the next step the new unit (age 1) is not eligible, the other two are


@pytest.mark.parametrize("rate_times_width", [0.3, 2.5])
def test_replaced_count_matches_the_rate_on_average(rate_times_width):
    width, steps = 16, 600
    learner = tiny(width=width, lr=1e-3, rr=rate_times_width / width, mt=0)  # mt 0: every unit eligible at every step
    x = torch.randn(32, 2)
    for _ in range(steps):
        learner.train_step(x)
    replaced, expected = learner.method.replaced["actor"], rate_times_width * steps
    fraction = rate_times_width % 1  # floor(x + U) is floor(x) + Bernoulli(fractional part of x)
    assert abs(replaced - expected) < 4 * math.sqrt(steps * fraction * (1 - fraction))
    units = learner.method.units["actor"][0]
    assert units.eligible(steps + 1, 0) == width  # the host's count agrees with the device's ages


# --------------------------------------------------------------------------------------------
# The scripts' layouts
# --------------------------------------------------------------------------------------------
metaworld_learner = partial(conftest.metaworld_learner, "cbp", hidden=[8, 8], batch_size=8)
atari_learner = partial(conftest.atari_learner, "cbp", conv_channels=[4, 8, 8], hidden=[16], batch_size=4)


class OutputProbe:
    """The last output with gradients of each given activation module."""

    def __init__(self, modules):
        self.outputs = {}
        for module in modules:
            module.register_forward_hook(self.keep)

    def keep(self, module, _inputs, output):
        if output.requires_grad:
            self.outputs[module] = output.detach()


def test_metaworld_utilities_follow_the_authors_formula():
    learner, method = metaworld_learner(cbp_decay=0.9)
    trunk, heads = learner.actor.trunk, (learner.actor.fc_mean, learner.actor.fc_logstd)
    probe = OutputProbe([trunk[1], trunk[3], learner.qf.trunk[1]])
    learner.actor_step(metaworld_batch(seeded(0))[0])
    h = probe.outputs[trunk[3]]  # last hidden layer: read by both heads
    w_out = torch.cat([head.weight for head in heads]).detach()
    torch.testing.assert_close(method.units["actor"][1].utility, 0.1 * w_out.abs().mean(0) * h.abs().mean(0))
    h = probe.outputs[trunk[1]]
    expected = 0.1 * trunk[2].weight.detach().abs().mean(0) * h.abs().mean(0)
    torch.testing.assert_close(method.units["actor"][0].utility, expected)
    assert all(u.utility.abs().sum() == 0 for u in method.units["qf1"])  # the actor's step leaves the critics alone
    learner.critic_step(*metaworld_batch(seeded(0)), update_target=False)
    h = probe.outputs[learner.qf.trunk[1]][1]  # member 1 of the ensemble: the second critic
    w_out = learner.qf.trunk[2].weight[1].detach()  # [in, out]
    torch.testing.assert_close(method.units["qf2"][0].utility, 0.1 * w_out.abs().mean(1) * h.abs().mean(0))
    assert method.steps == {"actor": 1, "qf1": 1, "qf2": 1}


def test_atari_channel_utilities_follow_the_authors_conv_formula():
    learner, method = atari_learner(cbp_decay=0.9)
    trunk = learner.qf1.trunk  # conv relu conv relu conv relu flatten linear relu
    probe = OutputProbe([trunk[1], trunk[5]])
    learner.critic_step(*atari_batch(seeded(0)), update_target=False)
    h = probe.outputs[trunk[1]]  # conv 1, read by conv 2: mean over output channels and kernel positions
    expected = trunk[2].weight.detach().abs().mean((0, 2, 3)) * h.abs().mean((0, 2, 3))
    torch.testing.assert_close(method.units["qf1"][0].utility, 0.1 * expected)
    h = probe.outputs[trunk[5]]  # conv 3, read through the flatten: 49 inputs per channel (convGnT.py)
    expected = (trunk[7].weight.detach().abs().mean(0) * h.flatten(1).abs().mean(0)).view(8, 49).mean(1)
    torch.testing.assert_close(method.units["qf1"][2].utility, 0.1 * expected)


def constant_unit_cases():
    """(learner maker, batch maker, network, layer index, unit): a linear unit read by two heads,
    a unit of the second critic's ensemble slice, a conv channel read by a conv and one read through the flatten."""
    return [(metaworld_learner, metaworld_batch, "actor", 1, 3), (metaworld_learner, metaworld_batch, "qf2", 0, 5),
            (atari_learner, atari_batch, "qf1", 0, 2), (atari_learner, atari_batch, "qf1", 2, 6),
            (atari_learner, atari_batch, "actor", 3, 1)]


@pytest.mark.parametrize("make, batch, name, index, unit", constant_unit_cases(),
                         ids=["mw-actor-heads", "mw-critic-member", "atari-conv-conv", "atari-conv-flatten", "atari-linear"])
def test_replacing_a_near_constant_unit_leaves_the_output_almost_unchanged(make, batch, name, index, unit):
    learner, method = make(cbp_decay=0.99)
    learner.update(batch(seeded(0)), True, True)  # Adam moments for every parameter
    units = method.units[name][index]
    hidden = units.layer.hidden
    with torch.no_grad():  # the unit ignores its input: relu(0.7) everywhere, up to 1e-4 noise of the incoming weights
        incoming = neuron_slices(hidden.weight, hidden.member, hidden.neuron_dim)
        incoming[unit] = 1e-4 * torch.randn_like(incoming[unit])
        neuron_slices(hidden.bias, hidden.member, hidden.neuron_dim)[unit] = 0.7
        units.utility[unit], units.mean_activation[unit], units.created[unit] = 0.0, 0.0, method.steps[name]  # born so
    def forward(seed):  # the actor's outputs (Meta-World: mean and log-std) or both critics' Q-values
        obs, actions = batch(seeded(seed))[:2]
        out = learner.actor(obs) if name == "actor" else learner.q_values(obs, actions)
        return torch.cat([o.flatten() for o in (out if isinstance(out, tuple) else (out,))])

    for seed in range(3):  # statistics of three training batches, no replacement (mt = 1e4)
        forward(seed)
        method.after_step("actor" if name == "actor" else "critic")

    def outputs():
        with torch.no_grad():
            return forward(seed=10)

    before = outputs()
    reads = sum(outgoing(c, c.weight, units.num_units)[unit].abs().sum() for c in units.layer.consumers)
    assert 0.7 * reads > 0.05  # dropping the unit without moving its mean into the biases would show
    others = torch.ones(units.num_units, dtype=torch.bool)
    others[unit] = False
    units.utility[others] = 1e9  # the unit of interest has the lowest utility
    method.args.cbp_maturity_threshold = 0
    method._replace(name, units, 1)
    after = outputs()
    torch.testing.assert_close(after, before, rtol=0, atol=2e-3 * before.abs().max().item())
    assert all(outgoing(c, c.weight, units.num_units)[unit].abs().sum() == 0 for c in units.layer.consumers)
    assert neuron_slices(hidden.bias, hidden.member, hidden.neuron_dim)[unit].abs().sum() == 0
    assert neuron_slices(hidden.weight, hidden.member, hidden.neuron_dim)[unit].abs().max() > 1e-3  # fresh weights


def test_state_round_trip():
    learner, method = metaworld_learner(cbp_maturity_threshold=3, cbp_replacement_rate=0.2)
    for seed in range(6):
        learner.update(metaworld_batch(seeded(seed)), True, True)
    assert method.replaced["qf1"] > 0
    state = method.state_dict()
    _, other = metaworld_learner(cbp_maturity_threshold=3, cbp_replacement_rate=0.2)
    other.load_state_dict(state)
    assert other.steps == method.steps and other.replaced == method.replaced
    for name in ("actor", "qf1", "qf2"):
        for a, b in zip(method.units[name], other.units[name], strict=True):
            for key in ("utility", "mean_activation", "created"):
                assert torch.equal(getattr(a, key), getattr(b, key))
            for step in range(method.steps[name], method.steps[name] + 5):  # eligible counts, host and device
                expected = int(((step - a.created) > 3).sum())
                assert a.eligible(step, 3) == b.eligible(step, 3) == expected
    assert other.logs() == method.logs()


# --------------------------------------------------------------------------------------------
# Not plain SAC
# --------------------------------------------------------------------------------------------
def test_cbp_is_not_plain_sac(side_by_side):
    """CBP and plain SAC from the same weights on the same batches (CBP acts at every step, not at
    task switches). Until the units mature (mt = 20 steps) CBP only keeps statistics: both learners
    stay bit-identical. Then units of low utility are replaced, which SAC never does: a replaced
    critic unit has exactly zero outgoing weights where plain SAC's has not, and fresh incoming
    weights far from plain SAC's. Ages count each network's own optimizer steps: after 101 updates
    on the Meta-World schedule, 101 critic steps and 102 actor steps (2 every 2nd update)."""
    learner, method = metaworld_learner(cbp_maturity_threshold=20, cbp_replacement_rate=0.05)
    plain = learner.plain_copy()
    batches = [metaworld_batch(seeded(seed)) for seed in range(101)]

    def parameters(each):
        return [p.detach().clone() for net in (each.actor, each.qf) for p in net.parameters()]

    side_by_side(learner, plain, batches[:20])
    assert all(map(torch.equal, parameters(learner), parameters(plain))) and sum(method.replaced.values()) == 0
    index = 20
    while method.replaced["qf1"] + method.replaced["qf2"] == 0:  # about 0.4 replacements per step and layer
        side_by_side(learner, plain, batches[index : index + 1], start=index)
        index += 1
    names, plain_params = {p: n for n, p in learner.qf.named_parameters()}, dict(plain.qf.named_parameters())
    checked = 0
    for name in ("qf1", "qf2"):
        for units in method.units[name]:
            new = torch.nonzero(units.created == method.steps[name])[:, 0]  # replaced at this very step
            for consumer in units.layer.consumers if len(new) else ():
                assert outgoing(consumer, consumer.weight, units.num_units)[new].abs().sum() == 0
                assert outgoing(consumer, plain_params[names[consumer.weight]], units.num_units)[new].abs().min() > 0
            hidden = units.layer.hidden
            fresh, plain_rows = (neuron_slices(w, hidden.member, hidden.neuron_dim)[new]
                                 for w in (hidden.weight, plain_params[names[hidden.weight]]))
            assert len(new) == 0 or (fresh - plain_rows).abs().max() > 0.01
            checked += len(new)
    assert checked > 0
    side_by_side(learner, plain, batches[index:], start=index)
    assert method.steps == {"actor": 102, "qf1": 101, "qf2": 101}


# --------------------------------------------------------------------------------------------
# End to end: the shared tiny runs of both scripts, killed after stage 1 and resumed
# (tests/test_methods.py checks that the resume is exact)
# --------------------------------------------------------------------------------------------
@pytest.mark.e2e
@pytest.mark.parametrize("name", ["metaworld", "atari"])
def test_end_to_end_replacements_and_ages(name, method_runs):
    runs = method_runs(name, "cbp")
    metrics, after_stage_1 = runs.resumed_metrics, runs.killed_checkpoint
    with open(os.path.join(runs.resumed_dir, "metrics.json")) as f:
        assert json.load(f) == metrics
    assert metrics["complete"] and len(metrics["sr"]) == 2
    assert evaluated(metrics, 0) and metrics["sr"][0][1] is None and evaluated(metrics, 1)
    if name == "metaworld":  # 100 updates per stage: 100 critic steps, 50 policy updates of 2 actor steps
        sizes = {"actor": [8, 8], "qf1": [8, 8], "qf2": [8, 8]}
        steps_per_stage = {"actor": 100, "qf1": 100, "qf2": 100}
    else:
        sizes = {network: [4, 8, 8, 16] for network in ("actor", "qf1", "qf2")}
        updates = (runs.args.steps_per_task - runs.args.learning_starts) // runs.args.update_frequency
        steps_per_stage = {network: updates for network in ("actor", "qf1", "qf2")}
    final = load(os.path.join(runs.resumed_dir, "checkpoint.pt"))
    for stage, checkpoint in enumerate((after_stage_1, final), 1):
        state = checkpoint["method"]
        assert {network: [len(u["utility"]) for u in layers] for network, layers in state["layers"].items()} == sizes
        assert state["steps"] == {network: stage * steps for network, steps in steps_per_stage.items()}
        assert all(count > 0 for count in state["replaced"].values())
        created = torch.cat([u["created"] for layers in state["layers"].values() for u in layers])
        assert 0 < created.max() <= max(state["steps"].values())
    assert all(final["method"]["replaced"][network] > after_stage_1["method"]["replaced"][network] for network in sizes)
