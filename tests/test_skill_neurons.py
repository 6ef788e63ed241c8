"""Unit tests of skill_neurons.py: scoring (Alg. 1, Eq. 1-4), selection (Eq. 5), masks (Eq. 7),
activation recording, parameter masks, and the two ways of applying a mask under Adam (SPEC §3).

Expected values are worked out by hand; the arithmetic is in the comments."""

import pytest
import torch
from torch import nn

import fast_adam
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


# An imbalanced window: 16 steps of successful episodes, then 4 of failed ones (mean 0.8).
IMBALANCED_GOAL = [1.0] * 16 + [0.0] * 4
IMBALANCED = torch.stack([
    torch.zeros(20),  # dead: never above its mean
    t([1.0] * 12 + [0.0] * 4 + [0.0] * 4),  # informative: fires in 12 of 16 success steps, in no failure step
    t([1.0] * 8 + [0.0] * 8 + [1.0] * 2 + [0.0] * 2),  # unrelated: fires in half of each class
    t([1.0] + [0.0] * 19),  # sparse: fires once, in a success step
], 1)


def test_goal_scores_paper_is_ruled_by_class_balance():
    scores = sn.goal_scores(IMBALANCED, t(IMBALANCED_GOAL))
    # dead: agrees only on the 4 failure steps, R = 4/20 -> 0.8
    # informative: mean 12/20 = 0.6, above = its 12 firing steps: agrees on 12 + 4 = 16 -> 0.8, tied with dead
    # unrelated: mean 10/20, above = firing: agrees on 8 success + 2 failure steps -> 0.5
    # sparse: agrees on 1 + 4 = 5 steps -> R = 0.25 -> 0.75, above the unrelated neuron
    torch.testing.assert_close(scores, t([0.8, 0.8, 0.5, 0.75]))
    assert sn.select_top(scores, 0.25).tolist() == [True, False, False, False]  # the dead unit wins the tie


def test_goal_scores_balanced_hand_computed():
    scores = sn.goal_scores(IMBALANCED, t(IMBALANCED_GOAL), "balanced")
    # R = 1/2 [P(a > mean | success) + P(a <= mean | failure)]
    # dead: 1/2 (0/16 + 4/4) = 0.5; informative: 1/2 (12/16 + 4/4) = 0.875
    # unrelated: 1/2 (8/16 + 2/4) = 0.5; sparse: 1/2 (1/16 + 4/4) = 0.53125
    torch.testing.assert_close(scores, t([0.5, 0.875, 0.5, 0.53125]))
    assert sn.select_top(scores, 0.25).tolist() == [False, True, False, False]


def test_goal_scores_balanced_equals_paper_on_a_balanced_window():
    generator = torch.Generator().manual_seed(0)
    activations = torch.randn(30, 16, generator=generator)
    goal = t([1.0, 0.0] * 15)
    torch.testing.assert_close(sn.goal_scores(activations, goal, "balanced"), sn.goal_scores(activations, goal))


def test_goal_scores_balanced_constant_goal_carries_no_information():
    torch.testing.assert_close(sn.goal_scores(t([[3.0, 1.0], [0.0, 1.0]]), t([1.0, 1.0]), "balanced"), t([0.5, 0.5]))
    with pytest.raises(ValueError, match="valid: paper, balanced"):
        sn.goal_scores(t([[1.0]]), t([1.0]), "other")


@pytest.mark.parametrize("act_shape, goal_shape", [((6,), (6,)), ((6, 3), (5,)), ((6, 3), (6, 1)), ((2, 6, 3), (6,))])
def test_goal_scores_wrong_shapes_raise(act_shape, goal_shape):
    with pytest.raises(ValueError, match=r"expected activations \[T, N\] and goal \[T\], got "):
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
    with pytest.raises(ValueError, match=rf"skill ratio must be in \(0, 1\], got {ratio}$"):
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
    with pytest.raises(ValueError, match="valid: min, latest"):
        sn.combine_masks(previous, new, "max")


@pytest.mark.parametrize("previous", [None, [t([0.5])]])
def test_combine_masks_rejects_a_bad_rule_even_on_the_first_stage(previous):
    with pytest.raises(ValueError, match="unknown mask combination 'max'"):
        sn.combine_masks(previous, [t([0.7])], "max")


# --------------------------------------------------------------------------------------------
# Other identification rules (Table 3)
# --------------------------------------------------------------------------------------------
def test_rank_matched():
    # ranking [0.1, 0.9, 0.5] orders the neurons 1, 2, 0; values sorted [0.8, 0.7, 0.6] go to them in that order
    torch.testing.assert_close(sn.rank_matched(t([0.1, 0.9, 0.5]), t([0.6, 0.7, 0.8])), t([0.6, 0.8, 0.7]))
    # ties of the ranking: earlier neurons first, as select_top
    torch.testing.assert_close(sn.rank_matched(t([1.0, 1.0, 0.0]), t([0.5, 0.9, 0.7])), t([0.9, 0.7, 0.5]))


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


def test_identify_network_each_rule():
    model, layers = two_layer_mlp()
    activations = [t([[1.0, -2.0], [3.0, 0.0], [-2.0, 1.0]]), t([[4.0], [4.0], [1.0]])]
    goal = t([1.0, 1.0, 0.0])
    # goal scores, Eq. 1-4 on the concatenated [3, 3] matrix:
    # goal mean 2/3 -> above [T, T, F]; c0 mean 2/3 -> [T, T, F] R = 1; c1 mean -1/3 -> [F, T, T] R = 1/3
    # -> 2/3; c2 mean 3 -> [T, T, F] R = 1
    goal_scores = t([1.0, 2.0 / 3.0, 1.0])

    # ratio 0.4 of 3 neurons: round(1.2) = 1 selected
    found = sn.identify_network(layers, "goal", activations, goal, 0.4)
    torch.testing.assert_close(found.mask_scores, goal_scores)
    torch.testing.assert_close(found.goal_scores, goal_scores)
    assert found.selected.tolist() == [True, False, False]  # tie of c0 and c2 at 1.0: the earlier one

    # activation: mean |a| = [2, 1, 3] picks c2; the neuron picked first gets the best goal score, 1.0,
    # the others the rest in order of their activation: c0 (2) gets 1.0, c1 (1) gets 2/3
    found = sn.identify_network(layers, "activation", activations, goal, 0.4)
    assert found.selected.tolist() == [False, False, True]
    torch.testing.assert_close(found.mask_scores, t([1.0, 2.0 / 3.0, 1.0]))
    torch.testing.assert_close(found.goal_scores, goal_scores)

    # weight: mean |w| per row = [(1+2+3)/3, (4+0+2)/3 | (3+3)/2] = [2, 2, 3] -> c2 first, then c0, c1
    with torch.no_grad():
        model[0].weight.copy_(t([[1.0, -2.0, 3.0], [4.0, 0.0, -2.0]]))
        model[2].weight.copy_(t([[-3.0, 3.0]]))
    found = sn.identify_network(layers, "weight", activations, goal, 2 / 3)  # round(2.0) = 2 selected
    assert found.selected.tolist() == [True, False, True]
    torch.testing.assert_close(found.mask_scores, t([1.0, 2.0 / 3.0, 1.0]))

    # random: the generator's uniform ranking
    ranking = torch.rand(3, generator=torch.Generator().manual_seed(7))
    found = sn.identify_network(layers, "random", activations, goal, 0.4, generator=torch.Generator().manual_seed(7))
    assert found.selected.tolist() == sn.select_top(ranking, 0.4).tolist()
    torch.testing.assert_close(found.mask_scores, sn.rank_matched(ranking, goal_scores))

    with pytest.raises(ValueError, match="valid: goal, activation, weight, random"):
        sn.identify_network(layers, "magic", activations, goal, 0.4)
    with pytest.raises(ValueError, match="'random' needs a generator"):  # never torch's global RNG
        sn.identify_network(layers, "random", activations, goal, 0.4)


def test_rank_matched_masks_of_other_rules_equal_the_goal_rules_mask_values():
    """Table 3 compares rules by which neurons they pick, not by how hard they mask: the i-th
    neuron a rule picks gets the Eq. 7 mask of the i-th best goal score of the same window."""
    generator = torch.Generator().manual_seed(0)
    activations = [torch.randn(40, 12, generator=generator).relu(), torch.randn(40, 8, generator=generator).relu()]
    goal = (torch.arange(40) % 3 == 0).float()
    layers = [sn.HiddenLayer(nn.ReLU(), nn.Parameter(torch.randn(n, 4, generator=generator)), None, 0) for n in (12, 8)]
    goal_rule = sn.identify_network(layers, "goal", activations, goal, 0.25)
    goal_masks = sn.neuron_mask(goal_rule.mask_scores, goal_rule.selected, 0.2)
    for rule in ("activation", "weight", "random"):
        found = sn.identify_network(layers, rule, activations, goal, 0.25, generator=torch.Generator().manual_seed(3))
        masks = sn.neuron_mask(found.mask_scores, found.selected, 0.2)
        assert int(found.selected.sum()) == 5
        torch.testing.assert_close(masks[found.selected].sort().values, goal_masks[goal_rule.selected].sort().values)
        assert not torch.equal(found.selected, goal_rule.selected), rule  # they pick other neurons


def test_selection_stats_hand_computed():
    # 4 steps, 4 neurons: n0 dead (constant 2), n1 informative, n2 dead (0), n3 noise
    activations = [t([[2.0, 1.0, 0.0, 0.0], [2.0, 1.0, 0.0, 3.0], [2.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 1.0]])]
    found = sn.Identification(selected=torch.tensor([True, True, False, False]), mask_scores=t([0.9, 0.7, 0.6, 0.5]),
                              goal_scores=t([0.8, 1.0, 0.5, 0.6]))
    combined = t([0.02, 0.06, 0.1, 1.0])  # n2 protected by an earlier stage
    stats = sn.selection_stats(activations, found, combined)
    assert stats["selected_dead"] == 1 and stats["dead"] == 2  # n0 selected and dead; n2 dead
    assert stats["selected_score_mean"] == pytest.approx((0.8 + 1.0) / 2)  # goal scores of n0, n1
    assert stats["other_score_mean"] == pytest.approx((0.5 + 0.6) / 2)
    assert stats["protected"] == 3 and stats["protected_mask_mean"] == pytest.approx((0.02 + 0.06 + 0.1) / 3)
    assert stats["selected_dead_share"] == 0.5  # n0 of n0, n1
    assert stats["selected_live_mask_mean"] == pytest.approx(0.06)  # n1 alone: n0's 0.02 falls on a dead unit
    all_dead = sn.Identification(torch.tensor([True, False, True, False]), t([0.9, 0.5, 0.8, 0.5]), t([0.9, 0.5, 0.8, 0.5]))
    stats = sn.selection_stats(activations, all_dead, combined)
    assert stats["selected_dead_share"] == 1.0 and stats["selected_live_mask_mean"] is None  # n0, n2: both dead
    everything = sn.Identification(torch.ones(4, dtype=torch.bool), t([1.0] * 4), t([1.0] * 4))
    assert sn.selection_stats(activations, everything, torch.ones(4))["other_score_mean"] is None
    assert sn.selection_stats(activations, everything, torch.ones(4))["protected_mask_mean"] is None


# --------------------------------------------------------------------------------------------
# Identification window: widening and the goal metric's fallback
# --------------------------------------------------------------------------------------------
def test_widen_window():
    # last 2 of [1, 1, 1, 0, 1, 1] are constant: widened back to the failure at index 3
    assert sn.widen_window([1, 1, 1, 0, 1, 1], 2) == 3
    assert sn.widen_window([1, 0, 1, 0], 2) == 2  # both outcomes already in the last 2
    assert sn.widen_window([1, 1, 1], 2) == 0  # one outcome in the whole stage
    assert sn.widen_window([0, 1], 5) == 0  # fewer episodes than the window


def episode_tags(successes, returns):
    return [{"id": 100 * k, "success": s, "return": r} for k, (s, r) in enumerate(zip(successes, returns))]


def test_identification_window_widens_then_falls_back_to_return():
    episodes = episode_tags([False, True, False, True, True, True], [1.0, 9.0, 2.0, 8.0, 7.0, 9.5])
    window, metric, widened = sn.identification_window(episodes, 3, ("success", "return"))
    # last 3 all succeeded: widened back to the failure at index 2
    assert [e["id"] for e in window] == [200, 300, 400, 500] and metric == "success" and widened

    window, metric, widened = sn.identification_window(episodes, 4, ("success", "return"))
    assert [e["id"] for e in window] == [200, 300, 400, 500] and metric == "success" and not widened

    # one outcome in the whole stage: the last 3 episodes, scored by their return
    episodes = episode_tags([True] * 5, [5.0, 6.0, 7.0, 8.0, 9.0])
    window, metric, widened = sn.identification_window(episodes, 3, ("success", "return"))
    assert [e["id"] for e in window] == [200, 300, 400] and metric == "return" and not widened

    # Atari: the return only; constant over the last 2, widened back to the first other return
    episodes = episode_tags([False] * 4, [-21.0, -20.0, -21.0, -21.0])
    window, metric, widened = sn.identification_window(episodes, 2, ("return",))
    assert [e["id"] for e in window] == [100, 200, 300] and metric == "return" and widened

    # every metric constant: the last episodes, the last metric (the caller warns)
    episodes = episode_tags([False] * 3, [-21.0] * 3)
    window, metric, widened = sn.identification_window(episodes, 2, ("success", "return"))
    assert [e["id"] for e in window] == [100, 200] and metric == "return" and not widened


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
    fast_adam.mask_update_([p], [old], [t([0.5, 0.25])])
    # old + m * (p - old): 0 + 0.5 * (1 - 0) = 0.5; 4 + 0.25 * (2 - 4) = 3.5
    torch.testing.assert_close(p.detach(), t([0.5, 3.5]))

    q = nn.Parameter(t([0.0, 0.0]))
    q.grad = t([2.0, -4.0])
    fast_adam.mask_gradients_([q], [t([0.5, 0.25])])
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
            fast_adam.mask_gradients_([p], [mask])
        optimizer.step()
        if masked and mode == "update":
            fast_adam.mask_update_([p], [old.clone()], [mask])
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


def test_compiled_adam_step_equals_torch_adam():
    """`adam_step_` under torch.compile (no graph break) is torch.optim.Adam's step, on Adam's own
    state, to float32 rounding; eager, it is Adam.step itself."""
    torch.manual_seed(0)
    nets = [nn.Linear(5, 3), nn.Linear(5, 3)]
    nets[1].load_state_dict(nets[0].state_dict())
    optimizers = [torch.optim.Adam(net.parameters(), lr=1e-2, eps=1e-4, foreach=True) for net in nets]
    x = torch.randn(8, 5)

    def step(net, optimizer):
        loss = net(x).pow(2).mean()
        fast_adam.zero_grad_(optimizer)  # after the forward, as in the learners (see zero_grad_)
        loss.backward()
        fast_adam.adam_step_(optimizer)

    torch._dynamo.reset()
    torch._dynamo.config.trace_autograd_ops = True
    compiled = torch.compile(step, fullgraph=True)  # fullgraph: a graph break is an error
    for _ in range(5):
        step(nets[0], optimizers[0])
        fast_adam.prepare_graph_optimizer_(optimizers[1])
        compiled(nets[1], optimizers[1])
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    for state, compiled_state in zip(optimizers[0].state.values(), optimizers[1].state.values()):
        assert state.keys() == compiled_state.keys() and compiled_state["step"] == state["step"] == 5
        torch.testing.assert_close(compiled_state["exp_avg_sq"], state["exp_avg_sq"])
