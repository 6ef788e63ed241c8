"""Plasticity injection (baselines/pi.py). The head (Meta-World: the last hidden layer and the
output layers; Atari: the fully connected layers after the conv encoder) is injected at every task
switch: the outputs of the actor, the critics and the critic targets are identical right before
and after an injection, the first and the later ones (BASELINES.md); training after an injection
is not plain SAC (with an affine-only head it would be, to float rounding: the test shows both);
only the injected heads and the encoders learn, the targets stay lined up with their critics, and
the injected structure survives a resume, through the method's state alone and through both
training scripts."""

import contextlib
import os
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

import conftest
import nbsp_sac_atari as atari
import nbsp_sac_metaworld as mw
from baselines.pi import InjectedLayer, PerPiece
from conftest import load, saved_and_loaded

OBS_DIM, ACT_DIM, NUM_ACTIONS = 39, 4, 18  # Meta-World v3; Atari's full action space


@contextlib.contextmanager
def default_dtype(dtype):
    """Networks, fresh heads, temperature and batches built in `dtype` (float64: no rounding noise)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


# --------------------------------------------------------------------------------------------
# Small learners of both scripts, and batches for them
# --------------------------------------------------------------------------------------------
metaworld_learner = partial(conftest.metaworld_learner, method="pi", obs_dim=OBS_DIM, act_dim=ACT_DIM, hidden=[8, 8],
                            batch_size=8)
# two fully connected layers: the head's second hidden layer reads one tensor per piece
atari_learner = partial(conftest.atari_learner, method="pi", num_actions=NUM_ACTIONS, conv_channels=[4, 8, 8],
                        hidden=[16, 12], batch_size=4)
metaworld_batch = partial(conftest.metaworld_batch, obs_dim=OBS_DIM, act_dim=ACT_DIM)
atari_batch = partial(conftest.atari_batch, num_actions=NUM_ACTIONS)


def metaworld_outputs(learner, batch):
    """Actor mean and log_std, the Q values of both critics and of both targets."""
    obs, actions = batch[0], batch[1]
    with torch.no_grad():
        mean, log_std = learner.actor(obs)
        return {"mean": mean, "log_std": log_std, "q": learner.qf(obs, actions), "q_target": learner.qf_target(obs, actions)}


def atari_outputs(learner, batch):
    obs = batch[0]
    with torch.no_grad():
        return {"logits": learner.actor(obs), "q1": learner.qf1(obs), "q2": learner.qf2(obs),
                "q1_target": learner.qf1_target(obs), "q2_target": learner.qf2_target(obs)}


SCRIPTS = {"metaworld": (metaworld_learner, metaworld_batch, metaworld_outputs),
           "atari": (atari_learner, atari_batch, atari_outputs)}


@pytest.fixture(params=list(SCRIPTS))
def script(request):
    return SCRIPTS[request.param]


def train(learner, make_batch, updates=3):
    for _ in range(updates):
        learner.update(make_batch(), update_policy=True, update_target=True)


def trained_networks(learner):
    """[(network, head start, output layers)] of the actor and the critics (not the targets)."""
    targets = {id(t) for t in learner.critic_targets}
    return [(net, start, outputs) for net, start, outputs in learner.heads() if id(net) not in targets]


def weighted_head_layers(net, start, outputs):
    """The layers of `net`'s head that have parameters, in order (the activations left out)."""
    layers = [*net.trunk[start:], *(getattr(net, name) for name in outputs)]
    return [layer for layer in layers if not isinstance(layer, (nn.ReLU, PerPiece))]


def injected_layers(learner):
    """{name: InjectedLayer} of every weighted head layer of the actor and the critics."""
    return {f"{type(net).__name__}{i}.{j}": layer for i, (net, start, outputs) in enumerate(trained_networks(learner))
            for j, layer in enumerate(weighted_head_layers(net, start, outputs))}


def pieces_params(learner, piece, networks=None):
    """Parameters of piece `piece` of every injected layer of `networks` (default: the actor and the
    critics), network by network, in module order."""
    chosen = {id(net) for net in networks} if networks is not None else None
    return [p for net, start, outputs in trained_networks(learner) if chosen is None or id(net) in chosen
            for layer in weighted_head_layers(net, start, outputs) for p in layer.pieces[piece].parameters()]


# --------------------------------------------------------------------------------------------
# The injected head, by hand
# --------------------------------------------------------------------------------------------
def linear(weight, bias):
    layer = nn.Linear(len(weight[0]), len(weight))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))
    return layer


def test_injected_head_by_hand():
    # head = hidden Linear(1 -> 2) + ReLU, then output Linear(2 -> 1); the encoder output z is given
    hidden = InjectedLayer(linear([[1.0], [-1.0]], [0.0, 0.0]), sums=False)
    output = InjectedLayer(linear([[1.0, 2.0]], [0.5]), sums=True)
    relu = PerPiece(nn.ReLU())

    def head(z):
        return output(relu(hidden(z)))

    z = torch.tensor([[2.0]], requires_grad=True)
    assert head(z).item() == 2.5  # relu([2, -2]) = [2, 0]; 1 * 2 + 2 * 0 + 0.5
    # an injection: a trainable piece theta' and its copy theta'_0
    hidden.pieces.extend([linear([[1.0], [1.0]], [0.0, -1.0]), linear([[1.0], [1.0]], [0.0, -1.0])])
    output.pieces.extend([linear([[1.0, -1.0]], [0.0]), linear([[1.0, -1.0]], [0.0])])
    assert head(z).item() == 2.5  # theta' = theta'_0: relu([2, 1]) = [2, 1] -> 1 on both, a zero change
    # theta' learns: its second hidden unit's bias -1 -> -3
    with torch.no_grad():
        hidden.pieces[1].bias[1] = -3.0
    y = head(z)
    assert y.item() == 2.5 + (2.0 - 1.0)  # theta': relu([2, -1]) = [2, 0] -> 2; theta'_0 still 1
    # the encoder gets the gradient through all three heads: d/dz = 1 (theta) + 1 (theta') - 0 (theta'_0)
    # (theta: units [on, off], outgoing [1, 2]; theta': [on, off], [1, -1]; theta'_0: [on, on], [1, -1])
    y.backward()
    assert z.grad.item() == 1.0 + 1.0 - 0.0

    # the learned change h_theta' - h_theta'_0 is not affine in z: 1 at z = 2, 0 at z = 0 and at z = -2
    # (theta' at z = 0: relu([0, -3]) -> 0, theta'_0: relu([0, -1]) -> 0; at z = -2 both relu to [0, 0])
    def change(value):
        x = torch.tensor([[value]])
        with torch.no_grad():  # the whole head minus the frozen head h_theta alone
            return head(x).item() - output.pieces[0](torch.relu(hidden.pieces[0](x))).item()

    assert [change(v) for v in (2.0, 0.0, -2.0)] == [1.0, 0.0, 0.0]  # an affine map would give 0.5 at z = 0


# --------------------------------------------------------------------------------------------
# Where the head is
# --------------------------------------------------------------------------------------------
def test_the_head_is_the_last_hidden_layer_and_the_outputs():
    torch.manual_seed(0)
    learner, method = metaworld_learner(hidden=[8, 8, 8])  # trunk: Linear ReLU Linear ReLU Linear ReLU
    assert learner.heads() == [(learner.actor, 4, ("fc_mean", "fc_logstd")), (learner.qf, 4, ("head",)),
                               (learner.qf_target, 4, ("head",))]
    method.end_stage(0, "first", None)
    for net in (learner.actor, learner.qf, learner.qf_target):
        kind = nn.Linear if net is learner.actor else mw.EnsembleLinear
        assert [type(m) for m in net.trunk[:4]] == [kind, nn.ReLU, kind, nn.ReLU]  # the encoder: untouched
        assert isinstance(net.trunk[4], InjectedLayer) and not net.trunk[4].sums
        assert [type(m) for m in net.trunk[4].pieces] == [kind] * 3
        assert isinstance(net.trunk[5], PerPiece) and isinstance(net.trunk[5].layer, nn.ReLU)
        for name in net.head_names:
            assert getattr(net, name).sums and [type(m) for m in getattr(net, name).pieces] == [kind] * 3


def test_the_atari_head_is_every_fully_connected_layer():
    torch.manual_seed(0)
    learner, method = atari_learner()  # conv ReLU conv ReLU conv ReLU Flatten Linear ReLU Linear ReLU
    nets = [learner.actor, *learner.critics, *learner.critic_targets]
    assert learner.heads() == [(net, 7, net.head_names) for net in nets]
    method.end_stage(0, "first", None)
    for net in nets:
        assert [type(m) for m in net.trunk[:7]] == [nn.Conv2d, nn.ReLU] * 3 + [nn.Flatten]
        assert [type(m) for m in net.trunk[7:]] == [InjectedLayer, PerPiece] * 2
        assert all(type(p) is nn.Linear and len(layer.pieces) == 3 for layer in net.trunk[7::2] for p in layer.pieces)
        assert getattr(net, net.head_names[0]).sums and not any(layer.sums for layer in net.trunk[7::2])


# --------------------------------------------------------------------------------------------
# BASELINES.md: outputs identical right before and after injection
# --------------------------------------------------------------------------------------------
def test_outputs_identical_before_and_after_injection(script):
    make_learner, make_batch, outputs = script
    torch.manual_seed(0)
    learner, method = make_learner()
    probe = make_batch()
    for stage in range(3):  # the first injection and two later ones
        train(learner, make_batch)  # the injected heads learn a non-zero change
        before = outputs(learner, probe)
        method.end_stage(stage, "task", None)
        after = outputs(learner, probe)
        for name in before:  # bit for bit: the new pair's change is exactly zero
            assert torch.equal(before[name], after[name]), (stage, name)
        assert all(len(layer.pieces) == 3 + 2 * stage for layer in injected_layers(learner).values())
    assert method.injections == 3
    # and the injected heads did learn: every pair's change is non-zero after training
    train(learner, make_batch)
    for name, layer in injected_layers(learner).items():
        for trainable, initial in zip(layer.pieces[1::2], layer.pieces[2::2]):
            assert not torch.equal(trainable.weight, initial.weight), name


def test_fresh_heads_are_initialised_like_the_scripts_heads(script):
    make_learner, _, _ = script
    torch.manual_seed(0)
    learner, method = make_learner()
    method.end_stage(0, "first", None)
    for name, layer in injected_layers(learner).items():
        original, trainable, initial = layer.pieces
        assert type(trainable) is type(original), name
        assert not torch.equal(trainable.weight, original.weight), name
        assert torch.equal(trainable.weight, initial.weight) and torch.equal(trainable.bias, initial.bias), name
        fan_in = original.weight.shape[1]  # nn.Linear [out, in]; EnsembleLinear [E, in, out]
        if learner.discrete:  # nbsp_sac_atari.layer_init: Kaiming normal weights, zero bias
            assert torch.all(trainable.bias == 0), name
            assert 0.5 < trainable.weight.std().item() * np.sqrt(fan_in / 2) < 1.5, name
        else:  # nn.Linear's and EnsembleLinear's default: uniform within 1 / sqrt(fan_in)
            bound = 1 / np.sqrt(fan_in)
            assert trainable.weight.abs().max().item() <= bound and trainable.bias.abs().max().item() <= bound


# --------------------------------------------------------------------------------------------
# THE test: training after an injection is not plain SAC, which it would be with an affine head
# --------------------------------------------------------------------------------------------
def affine_only(learner):
    """Make `learner.heads()` name the output layers alone (the design this module replaced)."""
    heads = learner.heads
    learner.heads = lambda: [(net, len(net.trunk), outputs) for net, _, outputs in heads()]


def head_change(net, start, output, z):
    """h_theta'(z) - h_theta'_0(z) of the latest injection at output layer `output`, on the head's input z."""
    def piece(i):
        x = z
        for layer in net.trunk[start:]:
            x = layer.pieces[i](x) if isinstance(layer, InjectedLayer) else layer.layer(x)
        return getattr(net, output).pieces[i](x)

    return piece(-2) - piece(-1)


def pi_against_plain_sac(make_learner, make_batch, outputs, affine, updates=20):
    """PI and plain SAC (`--method sac`) from the same weights and Adam moments, a task switch (PI
    injects; plain SAC's head gets fresh Adam moments too, as the injected head has), then the
    same batches and random draws for both. Returns both learners, PI's head specs, the probe's
    outputs of both, and the plain head's parameters at the switch."""
    torch.manual_seed(0)
    pi, method = make_learner(method="pi")
    sac, _ = make_learner(method="sac")
    if affine:
        affine_only(pi)
        affine_only(sac)
    train(pi, make_batch)  # a first stage: Adam moments everywhere
    sac.load_state_dict(saved_and_loaded(pi.state_dict()))  # a copy: Adam's load would share the moment tensors
    heads = trained_networks(pi)
    method.end_stage(0, "first", None)
    plain_heads = [[p for layer in weighted_head_layers(net, start, names) for p in layer.parameters()]
                   for net, start, names in trained_networks(sac)]
    for params, optimizer in zip(plain_heads, [sac.actor_optimizer, *[sac.q_optimizer] * len(sac.critics)]):
        for p in params:
            optimizer.state.pop(p)  # fresh moments (and step count) for the plain head, as for the injected one
    at_switch = [[p.detach().clone() for p in params] for params in plain_heads]
    batches, probe = [make_batch() for _ in range(updates)], make_batch()
    for learner in (pi, sac):
        for i, batch in enumerate(batches):
            torch.manual_seed(100 + i)
            learner.update(batch, update_policy=True, update_target=True)
    return pi, sac, heads, plain_heads, at_switch, outputs(pi, probe), outputs(sac, probe)


def max_difference(a, b):
    return max((a[name] - b[name]).abs().max().item() for name in a)


def test_injection_is_not_plain_sac_metaworld_float64():
    with default_dtype(torch.float64):
        # the old design, output layers only: exactly plain SAC with the head's Adam moments restarted
        pi, sac, heads, plain_heads, at_switch, out_pi, out_sac = pi_against_plain_sac(
            metaworld_learner, metaworld_batch, metaworld_outputs, affine=True)
        assert out_pi["mean"].dtype == torch.float64
        assert max_difference(out_pi, out_sac) < 1e-10
        # ... because the injected change is an affine map, the one plain SAC's output layer learned
        z = pi.actor.trunk(metaworld_batch()[0])
        with torch.no_grad():
            change = head_change(pi.actor, len(pi.actor.trunk), "fc_mean", z)
            plain_w, plain_b = sac.actor.fc_mean.weight, sac.actor.fc_mean.bias
            w0, b0 = at_switch[0][0], at_switch[0][1]  # actor's fc_mean weight and bias at the switch
            torch.testing.assert_close(change, z @ (plain_w - w0).T + (plain_b - b0), rtol=0, atol=1e-10)
            a, b = (pi.actor.trunk(metaworld_batch(n=64)[0]) for _ in range(2))
            middle = head_change(pi.actor, len(pi.actor.trunk), "fc_mean", (a + b) / 2)
            mean = (head_change(pi.actor, len(pi.actor.trunk), "fc_mean", a)
                    + head_change(pi.actor, len(pi.actor.trunk), "fc_mean", b)) / 2
            assert (middle - mean).abs().max() < 1e-12  # affine: the midpoint test below is 0 to rounding

        # this module's head, last hidden layer + output layers: not plain SAC
        pi, sac, heads, plain_heads, at_switch, out_pi, out_sac = pi_against_plain_sac(
            metaworld_learner, metaworld_batch, metaworld_outputs, affine=False)
        assert max_difference(out_pi, out_sac) > 1e-4  # 10^6 times the affine head's difference or more
        for name in out_pi:
            assert (out_pi[name] - out_sac[name]).abs().max() > 1e-5, name
        # in the way the method intends: the old head is frozen while plain SAC moved it ...
        for (net, start, names), params, before in zip(heads, plain_heads, at_switch):
            frozen = [p for layer in weighted_head_layers(net, start, names) for p in layer.pieces[0].parameters()]
            assert all(torch.equal(p, b) for p, b in zip(frozen, before))
            assert not any(torch.equal(p, b) for p, b in zip(params, before))
        # ... the injected head's hidden layer learned (theta' moved away from theta'_0) ...
        for net, start, _ in heads:
            assert not torch.equal(net.trunk[start].pieces[1].weight, net.trunk[start].pieces[2].weight)
        # ... and the injected head learned a change that is not affine in the head's input (an
        # affine map f has f((a + b) / 2) = (f(a) + f(b)) / 2), so no change of an output layer gives it
        with torch.no_grad():
            for net, start, names in heads:
                if net is pi.actor:
                    a, b = (net.trunk[:start](metaworld_batch(n=64)[0]) for _ in range(2))
                else:
                    obs_act = [torch.cat(metaworld_batch(n=64)[:2], 1).expand(2, -1, -1) for _ in range(2)]
                    a, b = (net.trunk[:start](x) for x in obs_act)
                for name in names:
                    middle = head_change(net, start, name, (a + b) / 2)
                    mean = (head_change(net, start, name, a) + head_change(net, start, name, b)) / 2
                    assert (middle - mean).abs().max() > 1e-6, name


def test_injection_is_not_plain_sac_atari():
    # Atari's frames enter as float32 (x.float() / 255): this comparison is in float32, with
    # tolerances well apart from its rounding noise
    pi, sac, *_, out_pi, out_sac = pi_against_plain_sac(atari_learner, atari_batch, atari_outputs, affine=True)
    affine_difference = max_difference(out_pi, out_sac)
    assert affine_difference < 1e-5
    pi, sac, *_, out_pi, out_sac = pi_against_plain_sac(atari_learner, atari_batch, atari_outputs, affine=False)
    assert max_difference(out_pi, out_sac) > 100 * max(affine_difference, 1e-6)


# --------------------------------------------------------------------------------------------
# Optimizers: the new heads and the encoders learn, the frozen pieces do not
# --------------------------------------------------------------------------------------------
def test_only_the_injected_heads_and_the_encoders_learn(script):
    make_learner, make_batch, _ = script
    torch.manual_seed(0)
    learner, method = make_learner()
    original = [[id(p) for p in layer.parameters()]
                for net, start, outputs in trained_networks(learner) for layer in weighted_head_layers(net, start, outputs)]
    train(learner, make_batch)
    method.end_stage(0, "first", None)
    layers = injected_layers(learner)
    assert all(isinstance(layer, InjectedLayer) for layer in layers.values())
    # the old layers themselves are the frozen pieces 0
    assert original == [[id(p) for p in layer.pieces[0].parameters()] for layer in layers.values()]
    # the trainable pieces form one new group of the actor's and one of the critics' Adam
    actor_heads, critic_heads = pieces_params(learner, 1, [learner.actor]), pieces_params(learner, 1, learner.critics)
    optimizers = learner.actor_optimizer, learner.q_optimizer
    for optimizer, expected in zip(optimizers, (actor_heads, critic_heads)):
        assert len(optimizer.param_groups) == 2
        assert [id(p) for p in optimizer.param_groups[1]["params"]] == [id(p) for p in expected]
        assert not any(p in optimizer.state for p in pieces_params(learner, 0))  # moments of the frozen head dropped
    for name, layer in layers.items():
        assert all(p.requires_grad for p in layer.pieces[1].parameters()), name
        assert not any(p.requires_grad for p in [*layer.pieces[0].parameters(), *layer.pieces[2].parameters()]), name

    snapshot = {name: [[p.detach().clone() for p in piece.parameters()] for piece in layer.pieces]
                for name, layer in layers.items()}
    encoders = [p.detach().clone() for net, start, _ in trained_networks(learner) for p in net.trunk[:start].parameters()]
    train(learner, make_batch)
    for name, layer in layers.items():
        frozen, trainable, initial = snapshot[name]
        assert all(torch.equal(a, b) for a, b in zip(frozen, layer.pieces[0].parameters())), name
        assert all(torch.equal(a, b) for a, b in zip(initial, layer.pieces[2].parameters())), name
        assert not torch.equal(trainable[0], layer.pieces[1].weight), name
    after = [p for net, start, _ in trained_networks(learner) for p in net.trunk[:start].parameters()]
    assert all(not torch.equal(a, b) for a, b in zip(encoders, after))  # the encoders keep learning

    # a second injection: a new trainable pair replaces group 1; the last one is frozen without moments
    method.end_stage(1, "second", None)
    for optimizer in optimizers:
        assert len(optimizer.param_groups) == 2
        assert all(p not in optimizer.state and p.requires_grad for p in optimizer.param_groups[1]["params"])
        assert all(p in optimizer.state for p in optimizer.param_groups[0]["params"] if p.requires_grad)
    assert [id(p) for p in pieces_params(learner, 3)] == [id(p) for o in optimizers for p in o.param_groups[1]["params"]]
    for piece in (0, 1, 2, 4):
        frozen = pieces_params(learner, piece)
        assert not any(p.requires_grad or p in optimizers[0].state or p in optimizers[1].state for p in frozen), piece


def test_targets_line_up_with_their_critics(script):
    make_learner, make_batch, _ = script
    torch.manual_seed(0)
    learner, method = make_learner()
    for stage in range(2):
        train(learner, make_batch)
        method.end_stage(stage, "task", None)
        for qf, target in zip(learner.critics, learner.critic_targets):
            critic_params, target_params = dict(qf.named_parameters()), dict(target.named_parameters())
            assert list(critic_params) == list(target_params)  # _foreach_lerp_/_copy_ over parameters() pair these
            assert all(critic_params[n].shape == target_params[n].shape for n in critic_params)
            start = qf.head_start()
            for layer, target_layer in zip(weighted_head_layers(qf, start, qf.head_names),
                                           weighted_head_layers(target, start, qf.head_names)):
                for piece in (-2, -1):  # the new pair of the target is the critic's
                    for a, b in zip(layer.pieces[piece].parameters(), target_layer.pieces[piece].parameters()):
                        assert torch.equal(a, b)
    # one update with a target step: every target tensor follows its own critic tensor
    target_before = [[p.detach().clone() for p in t.parameters()] for t in learner.critic_targets]
    train(learner, make_batch, updates=1)
    tau = learner.args.tau
    for qf, target, before in zip(learner.critics, learner.critic_targets, target_before):
        for critic_p, target_p, old in zip(qf.parameters(), target.parameters(), before):
            torch.testing.assert_close(target_p, torch.lerp(old, critic_p.detach(), tau), rtol=0, atol=1e-7)


# --------------------------------------------------------------------------------------------
# Resume: the method's state rebuilds the structure before the learner loads its own
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("injections", [1, 2])
def test_resume_round_trip(script, injections):
    make_learner, make_batch, outputs = script
    torch.manual_seed(0)
    learner, method = make_learner()
    for stage in range(injections):
        train(learner, make_batch)
        method.end_stage(stage, "task", None)
    train(learner, make_batch)  # Adam moments for the injected heads
    method_state, learner_state = saved_and_loaded(method.state_dict()), saved_and_loaded(learner.state_dict())
    assert method_state == {"injections": injections}

    resumed, resumed_method = make_learner()
    resumed_method.load_state_dict(method_state)
    resumed.load_state_dict(learner_state)
    assert resumed_method.injections == injections
    for a, b in zip(learner.actor.parameters(), resumed.actor.parameters()):
        assert a.requires_grad == b.requires_grad
    probe = make_batch()
    expected, restored = outputs(learner, probe), outputs(resumed, probe)
    for name in expected:
        assert torch.equal(expected[name], restored[name]), name
    # the same next update on both: the Adam states sit on the right parameters
    batch = make_batch()
    for model in (learner, resumed):
        torch.manual_seed(1)
        model.update(batch, update_policy=True, update_target=True)
    assert_same_networks(learner, resumed)
    # and the next injection gives both the same structure, values and parameter groups
    for model_method in (method, resumed_method):
        torch.manual_seed(2)
        model_method.end_stage(injections, "task", None)
    assert_same_networks(learner, resumed)
    for optimizer in ("actor_optimizer", "q_optimizer"):
        groups = [getattr(model, optimizer).param_groups for model in (learner, resumed)]
        assert [[p.shape for p in g["params"]] for g in groups[0]] == [[p.shape for p in g["params"]] for g in groups[1]]


def assert_same_networks(a, b):
    for net_a, net_b in zip([a.actor, *a.critics, *a.critic_targets], [b.actor, *b.critics, *b.critic_targets]):
        params_a, params_b = dict(net_a.named_parameters()), dict(net_b.named_parameters())
        assert list(params_a) == list(params_b)
        for name, tensor in params_a.items():
            assert torch.equal(tensor, params_b[name]), name


def test_no_injection_leaves_the_networks_alone(script):
    make_learner, _, _ = script
    learner, method = make_learner()
    method.load_state_dict({"injections": 0})
    assert not any(isinstance(m, (InjectedLayer, PerPiece)) for net, _, _ in learner.heads() for m in net.modules())
    assert len(learner.actor_optimizer.param_groups) == 1


# --------------------------------------------------------------------------------------------
# Plasticity diagnostics: the summed head's features, one row per probe sample
# --------------------------------------------------------------------------------------------
def actor_last_hidden_by_pieces(learner, obs):
    """The actor's last hidden features h_0 + sum_i (h_{2i-1} - h_{2i}), each piece's run by hand
    through the head's hidden layers (Linear then ReLU; on Atari piece i reads piece i)."""
    actor = learner.actor
    start = actor.head_start()
    with torch.no_grad():
        z = actor.trunk[:start](obs if obs.is_floating_point() else obs.float() / 255.0)
        linears = [layer.pieces if isinstance(layer, InjectedLayer) else [layer]
                   for layer in weighted_head_layers(actor, start, ())]
        pieces = []
        for k in range(len(linears[0])):
            h = z
            for layer in linears:
                h = torch.relu(layer[k](h))
            pieces.append(h)
    return pieces[0] + sum(pieces[i] - pieces[i + 1] for i in range(1, len(pieces), 2))


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_plasticity_diagnostics_measure_the_summed_head(name, monkeypatch):
    make_learner, make_batch, _ = SCRIPTS[name]
    script = mw if name == "metaworld" else atari
    torch.manual_seed(0)
    learner, method = make_learner(batch_size=32)
    batch = make_batch(n=32)
    probe = {"obs": batch[0], "actions": batch[1]} if name == "metaworld" else batch[0]
    networks = {net: [layer.hidden for layer in layers] for net, layers in learner.neuron_layers().items()}
    recorded = []
    stats = script.plasticity.plasticity_stats
    monkeypatch.setattr(script.plasticity, "plasticity_stats",
                        lambda layers, activations, threshold: recorded.append(activations) or stats(layers, activations, threshold))

    def measure():
        """Each network's recorded hidden features on the probe batch, and the actor's weight magnitude."""
        recorded.clear()
        diagnostics = script.measure_plasticity(learner, networks, probe, 0.025)
        assert 0 <= diagnostics["actor"]["dormant_ratio"] <= 1
        return dict(zip(["actor", "qf1", "qf2"], recorded)), diagnostics["actor"]["weight_magnitude"]

    def actor_weights(piece):
        """Mean |w| of the actor's hidden layers, a head layer's weights taken from its piece `piece`."""
        head = {id(m.pieces[0].weight): m.pieces for m in learner.actor.modules() if isinstance(m, InjectedLayer)}
        weights = [head[id(layer.weight)][piece].weight if id(layer.weight) in head else layer.weight
                   for layer in networks["actor"]]
        return float(torch.cat([w.detach().abs().flatten() for w in weights]).mean())

    for injections in range(3):
        train(learner, make_batch)  # the injected pieces learn apart from their frozen copies
        before, magnitude = measure()
        assert magnitude == pytest.approx(actor_weights(-2 if injections else 0), rel=1e-6)  # the weights that train
        for features in before.values():
            assert [len(layer) for layer in features] == [32] * len(features)  # batch-many rows, not 32 (2k + 1)
        torch.testing.assert_close(before["actor"][-1], actor_last_hidden_by_pieces(learner, batch[0]), rtol=0, atol=1e-6)
        method.end_stage(injections, "task", None)
        after, magnitude = measure()  # right after the injection: the same features, bit for bit
        assert magnitude == pytest.approx(actor_weights(-2), rel=1e-6) and magnitude != pytest.approx(actor_weights(0), rel=1e-3)
        for net in before:
            assert all(torch.equal(a, b) for a, b in zip(before[net], after[net])), (injections, net)
    assert len(learner.actor.trunk[-2].pieces) == 7  # three injections: 2 x 3 + 1 pieces were measured


# --------------------------------------------------------------------------------------------
# End to end through both scripts: a task switch injects, and a run killed after stage 1
# resumes to exactly the uninterrupted run
# --------------------------------------------------------------------------------------------
@pytest.mark.e2e
@pytest.mark.parametrize("name, hidden_head, actor_group", [("metaworld", "trunk.2", 6), ("atari", "trunk.7", 4)],
                         ids=["metaworld", "atari"])
def test_end_to_end_injection(name, hidden_head, actor_group, method_runs):
    """The shared tiny runs (tests/test_methods.py checks that the one killed after stage 1
    resumes to exactly the uninterrupted one)."""
    runs = method_runs(name, "pi")
    saved = load(os.path.join(runs.run_dir, "checkpoint.pt"))
    assert saved["method"] == {"injections": 1}  # one task switch
    output = "fc_mean" if name == "metaworld" else "fc_logits"
    assert {f"{layer}.pieces.{i}.weight" for layer in (hidden_head, output) for i in range(3)} <= set(saved["actor"])
    assert [len(g["params"]) for g in saved["actor_optimizer"]["param_groups"]][1:] == [actor_group]
    assert runs.killed_checkpoint["method"] == {"injections": 1}  # saved after the injection
    assert load(os.path.join(runs.resumed_dir, "checkpoint.pt"))["method"] == {"injections": 1}
