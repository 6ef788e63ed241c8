"""CReLU (baselines/crelu.py): the activation doubles the width and sends each sign of its input to
one half (BASELINES.md), the hook builds both scripts' networks with the hand-computed parameter
counts in both width modes, CReLU is not plain SAC (a unit that ReLU leaves dead still represents
and learns), and both scripts train, switch tasks and resume with it."""

import os

import numpy as np
import pytest
import torch
from torch import nn

import nbsp_sac_atari as atari
import nbsp_sac_metaworld as mw
from baselines import make_method
from baselines.crelu import CReLU
from conftest import load, metaworld_learner


def count(module):
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------
# BASELINES.md: output width doubles; each input sign reaches one half
# --------------------------------------------------------------------------------------------
def test_crelu_by_hand():
    x = torch.tensor([[1.5, -2.0, 0.0, 3.0]])
    assert CReLU()(x).tolist() == [[1.5, 0.0, 0.0, 3.0, 0.0, 2.0, 0.0, 0.0]]


@pytest.mark.parametrize("shape", [(5, 6), (2, 5, 6)], ids=["plain [B, W]", "ensemble [E, B, W]"])
def test_output_width_doubles_and_each_sign_reaches_one_half(shape):
    x = torch.randn(shape)
    y = CReLU()(x)
    width = shape[-1]
    assert y.shape == (*shape[:-1], 2 * width)
    first, second = y[..., :width], y[..., width:]
    positive, negative = x > 0, x < 0
    assert torch.equal(first[positive], x[positive]) and torch.all(second[positive] == 0)
    assert torch.equal(second[negative], -x[negative]) and torch.all(first[negative] == 0)


def test_a_negative_input_still_gets_a_gradient():
    x = torch.tensor([[-2.0, 3.0]], requires_grad=True)
    weights = torch.tensor([[1.0, 2.0, 3.0, 4.0]])  # read the 4 outputs with distinct weights
    (CReLU()(x) * weights).sum().backward()
    # x0 < 0 reaches output 2 as -x0 (weight 3): gradient -3; x1 > 0 reaches output 1 (weight 2)
    assert x.grad.tolist() == [[-3.0, 2.0]]
    relu_x = x.detach().clone().requires_grad_(True)
    (torch.relu(relu_x) * weights[:, :2]).sum().backward()
    assert relu_x.grad.tolist() == [[0.0, 2.0]]  # with ReLU the negative unit is dead


# --------------------------------------------------------------------------------------------
# The hook: widths in both modes, odd widths refused when halving
# --------------------------------------------------------------------------------------------
def crelu_method(halve=False, hidden=(8, 8)):
    return make_method(mw.Args(method="crelu", crelu_halve_width=halve, hidden=list(hidden)))


def test_hidden_activation_widths():
    linear_width, activation, output_width = crelu_method().hidden_activation(8)
    assert (linear_width, output_width) == (8, 16) and isinstance(activation, CReLU)
    linear_width, activation, output_width = crelu_method(halve=True).hidden_activation(8)
    assert (linear_width, output_width) == (4, 8) and isinstance(activation, CReLU)
    assert crelu_method(hidden=(7,)).hidden_activation(7)[::2] == (7, 14)  # odd widths are fine when kept


def test_halving_refuses_odd_widths():
    with pytest.raises(ValueError, match="--crelu-halve-width needs even hidden widths"):
        crelu_method(halve=True, hidden=(8, 7))


# --------------------------------------------------------------------------------------------
# Parameter counts of both scripts' networks, by hand (ReLU, keep width, halve width)
# --------------------------------------------------------------------------------------------
OBS, ACT = 39, 4  # Meta-World: actor 39 -> 8 -> 8 -> (mean 4, log_std 4); critics 43 -> 8 -> 8 -> 1, two of them
MW_COUNTS = {
    "relu": {"actor": (39 * 8 + 8) + (8 * 8 + 8) + 2 * (8 * 4 + 4),                     # 464
             "critic": 2 * ((43 * 8 + 8) + (8 * 8 + 8) + (8 * 1 + 1))},                # 866
    "keep": {"actor": (39 * 8 + 8) + (16 * 8 + 8) + 2 * (16 * 4 + 4),                   # 592: next fan-in doubles
             "critic": 2 * ((43 * 8 + 8) + (16 * 8 + 8) + (16 * 1 + 1))},              # 1010
    "halve": {"actor": (39 * 4 + 4) + (8 * 4 + 4) + 2 * (8 * 4 + 4),                    # 268: 4 units, 8 features
              "critic": 2 * ((43 * 4 + 4) + (8 * 4 + 4) + (8 * 1 + 1))},               # 442
}
# Atari, channels 8 16 16 (convs keep ReLU: 4*8*8*8+8 + 8*16*4*4+16 + 16*16*3*3+16 = 6440), flattened
# 16 * 7 * 7 = 784 -> 32 -> 32 -> 18 actions (actor logits, or Q values of each critic)
CONV = (4 * 8 * 8 * 8 + 8) + (8 * 16 * 4 * 4 + 16) + (16 * 16 * 3 * 3 + 16)
ATARI_COUNTS = {
    "relu": CONV + (784 * 32 + 32) + (32 * 32 + 32) + (32 * 18 + 18),   # 33210
    "keep": CONV + (784 * 32 + 32) + (64 * 32 + 32) + (64 * 18 + 18),   # 34810
    "halve": CONV + (784 * 16 + 16) + (32 * 16 + 16) + (32 * 18 + 18),  # 20122
}


def activation_of(mode):
    if mode == "relu":
        return mw.relu_layer
    return crelu_method(halve=mode == "halve").hidden_activation


@pytest.mark.parametrize("mode", ["relu", "keep", "halve"])
def test_metaworld_parameter_counts(mode):
    activation = activation_of(mode)
    actor = mw.Actor(OBS, ACT, [8, 8], -np.ones(ACT), np.ones(ACT), activation)
    critics = mw.TwinQNetwork(OBS, ACT, [8, 8], hidden_activation=activation)
    assert count(actor) == MW_COUNTS[mode]["actor"]
    assert count(critics) == MW_COUNTS[mode]["critic"]
    mean, log_std = actor(torch.randn(3, OBS))
    assert mean.shape == log_std.shape == (3, ACT)
    assert critics(torch.randn(3, OBS), torch.randn(3, ACT)).shape == (2, 3)  # the [E, B, W] layers


@pytest.mark.parametrize("mode", ["relu", "keep", "halve"])
def test_atari_parameter_counts(mode):
    activation = activation_of(mode)
    actor = atari.Actor(18, [8, 16, 16], [32, 32], activation)
    critic = atari.SoftQNetwork(18, [8, 16, 16], [32, 32], activation)
    assert count(actor) == count(critic) == ATARI_COUNTS[mode]
    obs = torch.randint(0, 256, (2, 4, 84, 84), dtype=torch.uint8)
    assert actor(obs).shape == critic(obs).shape == (2, 18)
    # the conv layers keep ReLU; CReLU only after the fully connected layers
    activations = [m for m in actor.trunk if not isinstance(m, (nn.Conv2d, nn.Linear, nn.Flatten))]
    assert [type(m) for m in activations] == [nn.ReLU] * 3 + [nn.ReLU if mode == "relu" else CReLU] * 2


# --------------------------------------------------------------------------------------------
# Not plain SAC: the architecture differs, so the representational property is compared
# --------------------------------------------------------------------------------------------
def test_crelu_is_not_plain_sac():
    """Plain SAC and CReLU learners built from the same seed share their first actor layer (39 -> 8
    in both; CReLU doubles only what the next layer reads). With unit 0 of that layer negative on
    the whole batch, ReLU outputs exactly the positive halves of CReLU, and unit 0 is dead: plain
    SAC's update leaves its incoming weights exactly where they are (no gradient, Adam's step is
    0). CReLU passes -x through its second half, so the same unit carries the input and learns."""
    obs = torch.randn(8, OBS, generator=torch.Generator().manual_seed(0))
    batch = (obs, torch.rand(8, ACT) * 2 - 1, torch.randn(8, 1), obs + 0.1, torch.zeros(8, 1))
    features, moved = {}, {}
    for name in ("sac", "crelu"):
        torch.manual_seed(0)
        learner, _ = metaworld_learner(name, obs_dim=OBS, act_dim=ACT, hidden=[8, 8], batch_size=8)
        first = learner.actor.trunk[0]
        with torch.no_grad():
            first.bias[0] = -100.0  # unit 0: a pre-activation of about -100 for every sample
            features[name] = learner.actor.trunk[1](first(obs))
        before = first.weight[0].detach().clone()
        torch.manual_seed(1)
        learner.update(batch, True, True)
        moved[name] = (first.weight[0].detach() - before).abs().max()
    relu, crelu = features["sac"], features["crelu"]
    assert relu.shape == (8, 8) and crelu.shape == (8, 16)
    assert torch.equal(crelu[:, :8], relu)  # the positive halves are ReLU's features
    assert torch.all(relu[:, 0] == 0) and torch.all(crelu[:, 8] > 50)  # dead under ReLU, carried by CReLU
    assert moved["sac"] == 0 and moved["crelu"] > 1e-5


# --------------------------------------------------------------------------------------------
# End to end through both scripts: the shared tiny runs, where the Meta-World run keeps the width
# (default) and the Atari run halves it (tests/test_methods.py: training, a task switch, a resume)
# --------------------------------------------------------------------------------------------
@pytest.mark.e2e
@pytest.mark.parametrize("name, shapes", [
    ("metaworld", {"actor": {"trunk.2.weight": (8, 16), "fc_mean.weight": (4, 16)},
                   "qf": {"trunk.2.weight": (2, 16, 8), "head.weight": (2, 16, 1)}}),
    ("atari", {"actor": {"trunk.9.weight": (8, 16), "fc_logits.weight": (18, 16)},
               "qf1": {"trunk.9.weight": (8, 16), "fc_q.weight": (18, 16)}}),
], ids=["metaworld", "atari"])
def test_end_to_end_network_shapes(name, shapes, method_runs):
    runs = method_runs(name, "crelu")
    assert runs.args.crelu_halve_width == (name == "atari")
    checkpoint = load(os.path.join(runs.run_dir, "checkpoint.pt"))
    assert checkpoint["method"] == {}  # an architecture change: nothing to save
    for network, expected in shapes.items():
        for tensor, shape in expected.items():
            assert tuple(checkpoint[network][tensor].shape) == shape, f"{network}.{tensor}"
