"""Unit tests of skill_neurons.py: scoring (Alg. 1, Eq. 1-4), selection (Eq. 5), masks (Eq. 7),
activation recording, parameter masks, and the two ways of applying a mask under Adam (SPEC §3).

Expected values are worked out by hand; the arithmetic is in the comments."""

import pytest
import torch
from torch import nn

import skill_neurons as sn
from nbsp_sac_metaworld import TwinQNetwork


def t(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


# --------------------------------------------------------------------------------------------
# goal_scores (Eq. 1-4)
# --------------------------------------------------------------------------------------------
# Goal metric over T = 6 steps: mean 3/6 = 0.5, so "goal above mean" = [T, T, T, F, F, F].
GOAL = [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
ACTIVATIONS = [  # columns: n0 .. n4
    # n0 positive  n1 anti  n2 uninformative  n3 constant  n4 ties at the mean
    [13.0, 0.0, 2.0, 1.0, 1.0],
    [12.0, 1.0, 0.0, 1.0, 1.0],
    [14.0, 0.0, 0.0, 1.0, 3.0],
    [10.0, 5.0, 2.0, 1.0, 0.0],
    [11.0, 4.0, 0.0, 1.0, 0.0],
    [10.0, 6.0, 0.0, 1.0, 1.0],
]


def test_goal_scores_hand_computed():
    scores = sn.goal_scores(t(ACTIVATIONS), t(GOAL))
    expected = [
        # n0: mean (13+12+14+10+11+10)/6 = 70/6 = 11.67 (its own column's mean, not the matrix's)
        #     above = [T,T,T,F,F,F] agrees 6/6 -> R = 1, score = max(1, 0) = 1
        1.0,
        # n1: mean 16/6 = 2.67, above = [F,F,F,T,T,T] agrees 0/6 -> R = 0, score = max(0, 1 - 0) = 1
        1.0,
        # n2: mean 4/6 = 0.67, above = [T,F,F,T,F,F]: agree at t0, t4, t5 -> R = 3/6, score 0.5
        0.5,
        # n3: constant 1 == its mean, strict > gives all F: agree at t3..t5 -> R = 3/6, score 0.5
        0.5,
        # n4: mean 6/6 = 1; the 1s at t0, t1, t5 equal the mean and are NOT above:
        #     above = [F,F,T,F,F,F], agree at t2..t5 -> R = 4/6, score 4/6 = 0.6667
        #     (with >= it would be [T,T,T,F,F,T], agree 5/6 -> 0.8333)
        4.0 / 6.0,
    ]
    torch.testing.assert_close(scores, t(expected))


def test_goal_scores_goal_side_ties_are_not_above():
    # goal q = [2, 1, 0, 1]: mean 4/4 = 1, strict > gives [T, F, F, F] (>= would give [T, T, F, T])
    goal = t([2.0, 1.0, 0.0, 1.0])
    activations = t([
        [5.0, 0.0],
        [0.0, 1.0],
        [0.0, 1.0],
        [0.0, 1.0],
    ])
    # c0: mean 5/4 = 1.25, above [T,F,F,F] agrees 4/4 -> R = 1 -> 1.0 (>= on the goal: 2/4 -> 0.5)
    # c1: mean 3/4 = 0.75, above [F,T,T,T] agrees 0/4 -> R = 0 -> max(0, 1) = 1.0
    torch.testing.assert_close(sn.goal_scores(activations, goal), t([1.0, 1.0]))


def test_goal_scores_constant_goal_still_applies_eq3():
    # constant goal: mean = 1, nothing above -> [F, F, F, F]; c0 above [T, F, F, F] (mean 0.75)
    # agrees at t1..t3 -> R = 3/4 -> 0.75
    scores = sn.goal_scores(t([[3.0], [0.0], [0.0], [0.0]]), t([1.0, 1.0, 1.0, 1.0]))
    torch.testing.assert_close(scores, t([0.75]))
    assert sn.goal_is_constant(t([1.0, 1.0, 1.0]))
    assert not sn.goal_is_constant(t([1.0, 0.0, 1.0]))


@pytest.mark.parametrize("act_shape, goal_shape", [((6,), (6,)), ((6, 3), (5,)), ((6, 3), (6, 1)), ((2, 6, 3), (6,))])
def test_goal_scores_wrong_shapes_raise(act_shape, goal_shape):
    with pytest.raises(ValueError):
        sn.goal_scores(torch.zeros(act_shape), torch.zeros(goal_shape))


# --------------------------------------------------------------------------------------------
# select_top (Eq. 5), neuron_mask (Eq. 7), combine_masks
# --------------------------------------------------------------------------------------------
def test_select_top_is_global_over_concatenated_layers():
    layer_a, layer_b = t([0.1, 0.2, 0.3]), t([0.9, 0.8, 0.7, 0.6])
    # N = 7, m = round(0.3 * 7) = round(2.1) = 2: both from layer b, none from layer a
    selected = sn.select_top(torch.cat([layer_a, layer_b]), 0.3)
    assert selected.tolist() == [False, False, False, True, True, False, False]


def test_select_top_count_and_ties():
    scores = t([0.6, 0.9, 0.7, 0.9, 0.5, 0.8, 0.6])
    # m = round(0.3 * 7) = 2: the two 0.9s (indices 1, 3)
    assert sn.select_top(scores, 0.3).nonzero().flatten().tolist() == [1, 3]
    # m = round(0.15 * 7) = round(1.05) = 1: tie 0.9 / 0.9 broken by position -> index 1
    assert sn.select_top(scores, 0.15).nonzero().flatten().tolist() == [1]
    # m = round(0.7 * 7) = round(4.9) = 5: 0.9(1), 0.9(3), 0.8(5), 0.7(2), then 0.6 at index 0 before 6
    assert sn.select_top(scores, 0.7).nonzero().flatten().tolist() == [0, 1, 2, 3, 5]
    # m = round(0.01 * 7) = round(0.07) = 0 -> at least 1
    assert sn.select_top(scores, 0.01).sum().item() == 1
    # m = round(0.2 * 32) = round(6.4) = 6
    assert sn.select_top(torch.linspace(0, 1, 32), 0.2).sum().item() == 6
    assert sn.select_top(scores, 1.0).all()
    assert sn.select_top(scores, 0.3).dtype == torch.bool


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_select_top_bad_ratio_raises(ratio):
    with pytest.raises(ValueError):
        sn.select_top(t([0.5, 0.6]), ratio)


def test_neuron_mask_eq7():
    scores = t([0.5, 0.75, 1.0, 0.9])
    selected = torch.tensor([False, True, True, False])
    # selected: 0.2 * (1 - 0.75) = 0.05, 0.2 * (1 - 1.0) = 0; unselected: 1
    torch.testing.assert_close(sn.neuron_mask(scores, selected, 0.2), t([1.0, 0.05, 0.0, 1.0]))
    # alpha 0.5: 0.5 * (1 - 0.75) = 0.125, 0.5 * 0 = 0
    torch.testing.assert_close(sn.neuron_mask(scores, selected, 0.5), t([1.0, 0.125, 0.0, 1.0]))
    # hard: 0 for selected, whatever the score
    torch.testing.assert_close(sn.neuron_mask(scores, selected, 0.2, hard=True), t([1.0, 0.0, 0.0, 1.0]))


def test_combine_masks():
    previous = [t([1.0, 0.05, 1.0]), t([0.5])]
    new = [t([0.1, 1.0, 1.0]), t([0.7])]
    combined = sn.combine_masks(previous, new, "min")
    torch.testing.assert_close(combined[0], t([0.1, 0.05, 1.0]))  # min(1, .1), min(.05, 1), min(1, 1)
    torch.testing.assert_close(combined[1], t([0.5]))  # min(.5, .7)
    latest = sn.combine_masks(previous, new, "latest")
    torch.testing.assert_close(latest[0], new[0])
    torch.testing.assert_close(latest[1], new[1])
    first = sn.combine_masks(None, new, "min")
    torch.testing.assert_close(first[0], new[0])
    with pytest.raises(ValueError):
        sn.combine_masks(previous, new, "max")


# --------------------------------------------------------------------------------------------
# Other identification rules (Table 3)
# --------------------------------------------------------------------------------------------
def test_to_goal_score_range():
    # low 2, high 6: 0.5 + 0.5 * (s - 2) / 4 -> 2: 0.5, 4: 0.75, 6: 1.0, 3: 0.625
    torch.testing.assert_close(sn.to_goal_score_range(t([2.0, 4.0, 6.0, 3.0])), t([0.5, 0.75, 1.0, 0.625]))
    constant = sn.to_goal_score_range(t([3.0, 3.0, 3.0]))
    assert constant.shape == (3,) and torch.isfinite(constant).all()
    assert (constant == constant[0]).all() and 0.5 <= constant[0].item() <= 1.0


def test_activation_scores():
    # mean |a| per column: (1 + 3 + 2) / 3 = 2, (2 + 0 + 1) / 3 = 1
    torch.testing.assert_close(sn.activation_scores(t([[1.0, -2.0], [3.0, 0.0], [-2.0, 1.0]])), t([2.0, 1.0]))


def test_weight_scores_linear_and_conv():
    linear = nn.Linear(3, 2)
    with torch.no_grad():
        linear.weight.copy_(t([[1.0, -2.0, 3.0], [0.0, 0.5, -1.0]]))
    # rows: (1 + 2 + 3) / 3 = 2, (0 + 0.5 + 1) / 3 = 0.5
    torch.testing.assert_close(sn.weight_scores(sn.HiddenLayer(nn.ReLU(), linear.weight, linear.bias, 0)), t([2.0, 0.5]))

    conv = nn.Conv2d(1, 2, 2)
    with torch.no_grad():
        conv.weight.copy_(t([[[[1.0, -1.0], [2.0, 0.0]]], [[[4.0, 4.0], [-4.0, 0.0]]]]))
    # channel 0: (1 + 1 + 2 + 0) / 4 = 1, channel 1: (4 + 4 + 4 + 0) / 4 = 3
    torch.testing.assert_close(sn.weight_scores(sn.HiddenLayer(nn.ReLU(), conv.weight, conv.bias, 0)), t([1.0, 3.0]))


def test_weight_scores_ensemble_member():
    qf = TwinQNetwork(obs_dim=2, act_dim=1, hidden=[2])
    first = qf.trunk[0]  # EnsembleLinear, weight [E=2, in=3, out=2]
    with torch.no_grad():
        first.weight[0] = t([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
        first.weight[1] = t([[0.0, -1.0], [0.0, -1.0], [3.0, -4.0]])
    # member 0: neuron 0's incoming weights are column 0 = [1, 3, 5] -> 9 / 3 = 3; neuron 1: [2, 4, 6] -> 4
    torch.testing.assert_close(sn.weight_scores(qf.hidden_layers(0)[0]), t([3.0, 4.0]))
    # member 1: [0, 0, 3] -> 1; [1, 1, 4] -> 2
    torch.testing.assert_close(sn.weight_scores(qf.hidden_layers(1)[0]), t([1.0, 2.0]))
    assert qf.hidden_layers(0)[0].num_neurons == 2


def test_random_scores_reproducible():
    a = sn.random_scores(10, torch.Generator().manual_seed(3))
    b = sn.random_scores(10, torch.Generator().manual_seed(3))
    c = sn.random_scores(10, torch.Generator().manual_seed(4))
    assert a.shape == (10,)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert ((a >= 0) & (a < 1)).all()


def two_layer_mlp():
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1), nn.ReLU(), nn.Linear(1, 1))
    layers = [sn.HiddenLayer(model[1], model[0].weight, model[0].bias, 0),
              sn.HiddenLayer(model[3], model[2].weight, model[2].bias, 0)]
    return model, layers


def test_score_network_each_rule():
    model, layers = two_layer_mlp()
    activations = [t([[1.0, -2.0], [3.0, 0.0], [-2.0, 1.0]]), t([[4.0], [4.0], [1.0]])]
    goal = t([1.0, 1.0, 0.0])

    # goal: Eq. 1-4 on the concatenated [3, 3] matrix, not rescaled
    # goal mean 2/3 -> above [T, T, F]; c0 mean 2/3 -> [T, T, F] R = 1; c1 mean -1/3 -> [F, T, T] R = 1/3
    # -> 2/3; c2 mean 3 -> [T, T, F] R = 1
    goal_result = sn.score_network(layers, "goal", activations, goal)
    torch.testing.assert_close(goal_result, t([1.0, 2.0 / 3.0, 1.0]))

    # activation: mean |a| = [2, 1, 3] -> [0.5 + 0.5 * 1/2, 0.5, 1.0] = [0.75, 0.5, 1.0]
    torch.testing.assert_close(sn.score_network(layers, "activation", activations, goal), t([0.75, 0.5, 1.0]))

    # weight: mean |w| per row = [(1+2+3)/3, (4+0+2)/3 | 3] = [2, 2, 3] (layer 2 has one neuron, fan-in 2:
    # (3 + 3) / 2 = 3) -> low 2, high 3 -> [0.5, 0.5, 1.0]
    with torch.no_grad():
        model[0].weight.copy_(t([[1.0, -2.0, 3.0], [4.0, 0.0, -2.0]]))
        model[2].weight.copy_(t([[-3.0, 3.0]]))
    torch.testing.assert_close(sn.score_network(layers, "weight"), t([0.5, 0.5, 1.0]))

    # random: uniform scores of the generator, rescaled to [0.5, 1]
    random_result = sn.score_network(layers, "random", generator=torch.Generator().manual_seed(7))
    expected = sn.to_goal_score_range(torch.rand(3, generator=torch.Generator().manual_seed(7)))
    torch.testing.assert_close(random_result, expected)
    assert random_result.min().item() == 0.5 and random_result.max().item() == 1.0

    with pytest.raises(ValueError):
        sn.score_network(layers, "magic", activations, goal)


def test_split_by_layer():
    _, layers = two_layer_mlp()
    parts = sn.split_by_layer(t([0.1, 0.2, 0.3]), layers)
    assert [p.tolist() for p in parts] == [pytest.approx([0.1, 0.2]), pytest.approx([0.3])]


# --------------------------------------------------------------------------------------------
# ActivationRecorder
# --------------------------------------------------------------------------------------------
def test_recorder_mlp_matches_manual_forward_and_removes_hooks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2))
    layers = [sn.HiddenLayer(model[1], model[0].weight, model[0].bias, 0),
              sn.HiddenLayer(model[3], model[2].weight, model[2].bias, 0)]
    x1, x2 = torch.randn(3, 4), torch.randn(2, 4)
    expected_out = model(torch.cat([x1, x2]))
    with sn.ActivationRecorder(layers) as recorder:
        out = torch.cat([model(x1), model(x2)])
    torch.testing.assert_close(out, expected_out)  # the recorder does not change the forward pass
    h1 = torch.relu(model[0](torch.cat([x1, x2])))
    h2 = torch.relu(model[2](h1))
    recorded = recorder.activations()
    assert [tuple(a.shape) for a in recorded] == [(5, 5), (5, 3)]
    torch.testing.assert_close(recorded[0], h1.detach())
    torch.testing.assert_close(recorded[1], h2.detach())
    assert not recorded[0].requires_grad
    # hooks removed: no module keeps a hook, and later forwards record nothing
    assert all(len(m._forward_hooks) == 0 for m in model)
    model(x1)
    assert recorder.activations()[0].shape == (5, 5)


def test_recorder_ensemble_members():
    torch.manual_seed(0)
    qf = TwinQNetwork(obs_dim=3, act_dim=2, hidden=[4, 3])
    layers = qf.hidden_layers(0) + qf.hidden_layers(1)
    obs, act = torch.randn(5, 3), torch.randn(5, 2)
    with sn.ActivationRecorder(layers) as recorder:
        qf(obs, act)
    x = torch.cat([obs, act], 1)
    recorded = recorder.activations()
    assert [tuple(a.shape) for a in recorded] == [(5, 4), (5, 3), (5, 4), (5, 3)]
    for member in (0, 1):
        l0, l1 = qf.trunk[0], qf.trunk[2]
        h1 = torch.relu(x @ l0.weight[member] + l0.bias[member])
        h2 = torch.relu(h1 @ l1.weight[member] + l1.bias[member])
        torch.testing.assert_close(recorded[2 * member], h1.detach())
        torch.testing.assert_close(recorded[2 * member + 1], h2.detach())
    assert not torch.allclose(recorded[0], recorded[2])  # the two members really are different slices


def test_recorder_conv_channel_is_spatial_mean():
    conv = nn.Conv2d(1, 2, 2)
    relu = nn.ReLU()
    layer = sn.HiddenLayer(relu, conv.weight, conv.bias, 0)
    x = t([[[[1.0, 2.0], [3.0, -4.0]], [[-1.0, -1.0], [4.0, 0.0]]]])  # [B=1, C=2, H=2, W=2]
    with sn.ActivationRecorder([layer]) as recorder:
        relu(x)
    # channel 0: relu -> [1, 2, 3, 0], mean 6/4 = 1.5; channel 1: [0, 0, 4, 0], mean 4/4 = 1.0
    torch.testing.assert_close(recorder.activations()[0], t([[1.5, 1.0]]))


# --------------------------------------------------------------------------------------------
# parameter_masks
# --------------------------------------------------------------------------------------------
def test_parameter_masks_linear_rows_and_bias():
    model, layers = two_layer_mlp()
    masks = sn.parameter_masks(layers, [t([1.0, 0.05]), t([0.0])])
    assert set(map(id, masks)) == {id(model[0].weight), id(model[0].bias), id(model[2].weight), id(model[2].bias)}
    # weight [out=2, in=3]: row 0 (neuron 0) all 1, row 1 (neuron 1) all 0.05
    torch.testing.assert_close(masks[model[0].weight], t([[1.0, 1.0, 1.0], [0.05, 0.05, 0.05]]))
    torch.testing.assert_close(masks[model[0].bias], t([1.0, 0.05]))
    torch.testing.assert_close(masks[model[2].weight], t([[0.0, 0.0]]))
    torch.testing.assert_close(masks[model[2].bias], t([0.0]))


def test_parameter_masks_ensemble_members_share_one_tensor():
    qf = TwinQNetwork(obs_dim=2, act_dim=1, hidden=[4])
    layer0, layer1 = qf.hidden_layers(0)[0], qf.hidden_layers(1)[0]
    masks = sn.parameter_masks([layer0, layer1], [t([0.1, 1.0, 1.0, 0.2]), t([1.0, 0.3, 1.0, 1.0])])
    weight, bias = qf.trunk[0].weight, qf.trunk[0].bias
    assert len(masks) == 2
    # weight [E=2, in=3, out=4]: neuron k of member e is the column weight[e, :, k]
    expected_weight = torch.ones(2, 3, 4)
    expected_weight[0, :, 0] = 0.1
    expected_weight[0, :, 3] = 0.2
    expected_weight[1, :, 1] = 0.3
    torch.testing.assert_close(masks[weight], expected_weight)
    # bias [E=2, 1, out=4]
    torch.testing.assert_close(masks[bias], t([[[0.1, 1.0, 1.0, 0.2]], [[1.0, 0.3, 1.0, 1.0]]]))

    # only member 1 masked: member 0's slice stays all ones
    only_1 = sn.parameter_masks([layer1], [t([0.5, 1.0, 1.0, 1.0])])
    assert (only_1[weight][0] == 1).all()
    assert (only_1[weight][1, :, 0] == 0.5).all() and (only_1[weight][1, :, 1:] == 1).all()
    torch.testing.assert_close(only_1[bias], t([[[1.0, 1.0, 1.0, 1.0]], [[0.5, 1.0, 1.0, 1.0]]]))


# --------------------------------------------------------------------------------------------
# mask_update_ and mask_gradients_, and why the update (not the gradient) is masked under Adam
# --------------------------------------------------------------------------------------------
def test_mask_update_and_mask_gradients_hand_computed():
    p = nn.Parameter(t([1.0, 2.0]))
    old = t([0.0, 4.0])
    sn.mask_update_([p], [old], [t([0.5, 0.25])])
    # old + m * (p - old): 0 + 0.5 * (1 - 0) = 0.5; 4 + 0.25 * (2 - 4) = 3.5
    torch.testing.assert_close(p.detach(), t([0.5, 3.5]))

    q = nn.Parameter(t([0.0, 0.0]))
    q.grad = t([2.0, -4.0])
    sn.mask_gradients_([q], [t([0.5, 0.25])])
    torch.testing.assert_close(q.grad, t([1.0, -1.0]))  # 2 * 0.5, -4 * 0.25


def adam_step_sizes(mode, mask_value, warmup, masked_steps, size=64):
    """Adam on one parameter with random gradients (independent of the parameter, identical
    across modes); the mask is applied from step `warmup` on. Returns every step p_new - p_old."""
    gen = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.zeros(size, dtype=torch.float64))
    optimizer = torch.optim.Adam([p], lr=1e-3)
    mask = torch.full((size,), mask_value, dtype=torch.float64)
    steps = []
    for step in range(warmup + masked_steps):
        p.grad = torch.randn(size, generator=gen, dtype=torch.float64)
        old = p.detach().clone()
        masked = step >= warmup
        if masked and mode == "grad":
            sn.mask_gradients_([p], [mask])
        optimizer.step()
        if masked and mode == "update":
            sn.mask_update_([p], [old.clone()], [mask])
        steps.append(p.detach() - old)
    return torch.stack(steps)


@pytest.mark.parametrize("warmup, masked_steps", [(0, 300), (100, 8000)])
def test_adam_undoes_gradient_masking_but_not_update_masking(warmup, masked_steps):
    """SPEC §3: a constant mask of 0.05 on the gradient leaves Adam's step unchanged once the
    moments adapt; masking the update scales the step by exactly 0.05.
    warmup 0: mask from the first step (Adam is scale invariant at once).
    warmup 100: unmasked training first, as for a mask installed after a stage; the moments
    need several thousand steps (beta2 = 0.999) to forget the unmasked gradients."""
    plain = adam_step_sizes("none", 0.05, warmup, masked_steps)
    grad = adam_step_sizes("grad", 0.05, warmup, masked_steps)
    update = adam_step_sizes("update", 0.05, warmup, masked_steps)

    last = slice(-100, None)
    grad_ratio = grad[last].abs().sum() / plain[last].abs().sum()
    update_ratio = update[last].abs().sum() / plain[last].abs().sum()
    assert 0.95 < grad_ratio.item() < 1.05, f"gradient masking should be undone by Adam, ratio {grad_ratio:.3f}"
    torch.testing.assert_close(grad[last], plain[last], rtol=0.05, atol=1e-6)
    assert update_ratio.item() == pytest.approx(0.05, rel=1e-6)
    # update masking: every masked step is exactly 0.05 times the plain one, unmasked steps equal
    torch.testing.assert_close(update[warmup:], 0.05 * plain[warmup:], rtol=1e-7, atol=1e-15)
    assert torch.equal(update[:warmup], plain[:warmup])
    if warmup:
        # right after the mask appears, gradient masking does shrink the step (transient)
        first = grad[warmup : warmup + 10].abs().sum() / plain[warmup : warmup + 10].abs().sum()
        assert first.item() < 0.7
