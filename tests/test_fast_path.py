"""The project's fast SAC update equals CleanRL's eager update, with NBSP's masks on and batches
from two buffers.

Both paths start from the same weights, see the same batches (every 10th from a second buffer,
as Dpre's would be) and the same random draws; the reference applies the masks to each parameter
in a plain loop. Over 60 updates losses and parameters agree to float32 rounding (rtol 1e-4,
atol 1e-5). The same holds for --compile, whose update is one graph (Adam's bias corrections in
float32 tensors there).
"""

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

import nbsp_sac_metaworld as mw
import skill_neurons as sn
from cleanrl_reference import CleanRLSAC

HIDDEN, BATCH, UPDATES, REPLAY_INTERVAL = [32, 24], 16, 60, 10
RTOL, ATOL = 1e-4, 1e-5


def random_eq7_masks(layers, generator):
    masks = []
    for layer in layers:
        scores = 0.5 + 0.5 * torch.rand(layer.num_neurons, generator=generator)
        masks.append(sn.neuron_mask(scores, sn.select_top(scores, 0.3), alpha=0.2))
    return masks


def build_pair(compile=False):
    torch.manual_seed(0)
    args = mw.Args(hidden=HIDDEN, batch_size=BATCH)
    fast = mw.SACLearner(39, 4, -np.ones(4), np.ones(4), args, "cpu", compile=compile)
    # the scripts start alpha at 0.2 (paper Table 6), CleanRL at 1.0: the reference is given the scripts' value
    ref = CleanRLSAC(39, 4, HIDDEN, "cpu", q_lr=args.q_lr, policy_lr=args.policy_lr, alpha=args.alpha)

    # same weights: the ensemble stores member m's Linear weight transposed, as [in, out]
    with torch.no_grad():
        fast_linears = [m for m in fast.actor.trunk if isinstance(m, torch.nn.Linear)]
        for ref_fc, fc in zip(ref.actor.fcs, fast_linears):
            ref_fc.weight.copy_(fc.weight), ref_fc.bias.copy_(fc.bias)
        ref.actor.fc_mean.load_state_dict(fast.actor.fc_mean.state_dict())
        ref.actor.fc_logstd.load_state_dict(fast.actor.fc_logstd.state_dict())
        for member, (ref_q, ref_target) in enumerate([(ref.qf1, ref.qf1_target), (ref.qf2, ref.qf2_target)]):
            ensemble = [m for m in fast.qf.trunk if isinstance(m, mw.EnsembleLinear)] + [fast.qf.head]
            for ref_fc, layer in zip(list(ref_q.fcs) + [ref_q.out], ensemble):
                ref_fc.weight.copy_(layer.weight[member].T), ref_fc.bias.copy_(layer.bias[member, 0])
            ref_target.load_state_dict(ref_q.state_dict())

    # the same Eq. 7 masks on both, the reference masking each parameter in a loop
    generator = torch.Generator().manual_seed(1)
    actor_layers = fast.actor.hidden_layers()
    critic_layers = fast.qf.hidden_layers(0) + fast.qf.hidden_layers(1)
    actor_masks = sn.parameter_masks(actor_layers, random_eq7_masks(actor_layers, generator))
    critic_masks = sn.parameter_masks(critic_layers, random_eq7_masks(critic_layers, generator))
    fast.actor_mask.set(actor_masks)
    fast.q_mask.set(critic_masks)

    ref_actor_masks = {}
    for ref_fc, fc in zip(ref.actor.fcs, fast_linears):
        ref_actor_masks[ref_fc.weight] = actor_masks[fc.weight]
        ref_actor_masks[ref_fc.bias] = actor_masks[fc.bias]
    ref_critic_masks = {}
    ensemble_trunk = [m for m in fast.qf.trunk if isinstance(m, mw.EnsembleLinear)]
    for member, ref_q in enumerate([ref.qf1, ref.qf2]):
        for ref_fc, layer in zip(ref_q.fcs, ensemble_trunk):
            ref_critic_masks[ref_fc.weight] = critic_masks[layer.weight][member].T
            ref_critic_masks[ref_fc.bias] = critic_masks[layer.bias][member, 0]
    mask_each_parameter(ref.actor_optimizer, ref_actor_masks)
    mask_each_parameter(ref.q_optimizer, ref_critic_masks)
    return fast, ref, (actor_masks, critic_masks)


def mask_each_parameter(optimizer, masks):
    plain_step = optimizer.step

    def step():
        before = {p: p.detach().clone() for p in masks}
        plain_step()
        with torch.no_grad():
            for p, m in masks.items():
                p.copy_(before[p] + m * (p - before[p]))

    optimizer.step = step


def run_side_by_side(fast, ref):
    generator = torch.Generator().manual_seed(2)
    d = torch.randn(500, 2 * 39 + 4 + 2, generator=generator)
    dpre = torch.randn(200, 2 * 39 + 4 + 2, generator=generator)
    d[:, -1] = (d[:, -1] > 1.5).float()  # a few terminal transitions
    history = []
    for i in range(UPDATES):
        source = dpre if i % REPLAY_INTERVAL == 0 else d
        rows = source[torch.randint(0, len(source), (BATCH,), generator=generator)]
        batch = rows.split([39, 4, 1, 39, 1], dim=1)
        torch.manual_seed(100 + i)
        fast_logs = fast.update(batch, update_policy=i % 2 == 0, update_target=True)
        torch.manual_seed(100 + i)
        ref_logs = ref.update(i, *batch)
        history.append((fast_logs, ref_logs))
    return history


def assert_same_learning(fast, ref, history):
    for fast_logs, ref_logs in history:
        for key in ("qf1_loss", "qf2_loss", "actor_loss"):
            if key in ref_logs:
                assert fast_logs[key].item() == pytest.approx(ref_logs[key], rel=RTOL, abs=ATOL)
    fast_linears = [m for m in fast.actor.trunk if isinstance(m, torch.nn.Linear)]
    for ref_fc, fc in zip(ref.actor.fcs, fast_linears):
        torch.testing.assert_close(fc.weight, ref_fc.weight, rtol=RTOL, atol=ATOL)
    ensemble = [m for m in fast.qf.trunk if isinstance(m, mw.EnsembleLinear)] + [fast.qf.head]
    for member, ref_q in enumerate([ref.qf1, ref.qf2]):
        for ref_fc, layer in zip(list(ref_q.fcs) + [ref_q.out], ensemble):
            torch.testing.assert_close(layer.weight[member].T, ref_fc.weight, rtol=RTOL, atol=ATOL)
    ens_target = [m for m in fast.qf_target.trunk if isinstance(m, mw.EnsembleLinear)]
    for ref_fc, layer in zip(ref.qf2_target.fcs, ens_target):
        torch.testing.assert_close(layer.weight[1].T, ref_fc.weight, rtol=RTOL, atol=ATOL)
    assert fast.log_alpha.item() == pytest.approx(ref.log_alpha.item(), rel=RTOL, abs=ATOL)


def test_fast_update_equals_cleanrl_with_masks_and_two_buffers():
    fast, ref, (actor_masks, _) = build_pair()
    start = {p: p.detach().clone() for p in actor_masks}
    history = run_side_by_side(fast, ref)
    assert_same_learning(fast, ref, history)
    # the masks really acted: a protected row moved less than its unprotected neighbours
    weight = next(iter(actor_masks))
    mask = actor_masks[weight][:, 0]
    moved = (weight.detach() - start[weight]).abs().mean(1)
    assert moved[mask < 1].mean() < 0.5 * moved[mask == 1].mean()


def test_comparison_detects_a_wrong_mask():
    """The side-by-side check is sharp: a different mask on the reference breaks agreement."""
    fast, ref, _ = build_pair()
    fast.q_mask.masks = [torch.ones_like(m) for m in fast.q_mask.masks]
    history = run_side_by_side(fast, ref)
    with pytest.raises(AssertionError):
        assert_same_learning(fast, ref, history)


@pytest.fixture(scope="module")
def compiled_run():
    """60 compiled and 60 eager updates side by side; the compiled side's graph counters."""
    torch._dynamo.reset()
    counters.clear()
    eager, ref, _ = build_pair()
    compiled, ref_for_compiled, _ = build_pair(compile=True)
    history_eager = run_side_by_side(eager, ref)
    history_compiled = run_side_by_side(compiled, ref_for_compiled)
    graphs = {"breaks": sum(counters["graph_break"].values()), "graphs": counters["stats"]["unique_graphs"]}
    return eager, compiled, history_eager, history_compiled, graphs


def test_compiled_update_equals_eager(compiled_run):
    """--compile keeps the eager random stream (inductor fallback_random); the whole update is one
    graph, Adam included, so it agrees to float32 rounding (rtol 1e-4, atol 1e-5)."""
    eager, compiled, history_eager, history_compiled, _ = compiled_run
    for (e, _), (c, _) in zip(history_eager, history_compiled, strict=True):
        for key in e:
            assert c[key].item() == pytest.approx(e[key].item(), rel=RTOL, abs=ATOL)
    for module in ("actor", "qf", "qf_target"):
        for p_e, p_c in zip(getattr(eager, module).parameters(), getattr(compiled, module).parameters()):
            torch.testing.assert_close(p_c, p_e, rtol=RTOL, atol=ATOL)
    for opt_e, opt_c in ((eager.q_optimizer, compiled.q_optimizer), (eager.a_optimizer, compiled.a_optimizer)):
        for s_e, s_c in zip(opt_e.state_dict()["state"].values(), opt_c.state_dict()["state"].values(), strict=True):
            assert s_c.keys() == s_e.keys() and s_c["step"] == s_e["step"]  # Adam's own state: checkpoints load either way
            torch.testing.assert_close(s_c["exp_avg_sq"], s_e["exp_avg_sq"], rtol=RTOL, atol=ATOL)


def test_compiled_update_is_one_graph_without_breaks(compiled_run):
    """The hot path has no graph break: one graph with actor steps, one without (target update
    every step), and no new graph when the actor's batches come from Dpre (`actor_obs`)."""
    _, compiled, _, _, graphs = compiled_run
    assert graphs == {"breaks": 0, "graphs": 2}
    batch = torch.randn(BATCH, 2 * 39 + 4 + 2).split([39, 4, 1, 39, 1], dim=1)  # as ReplayBuffer.sample
    compiled.update(batch, update_policy=True, update_target=True, actor_obs=[batch[0], torch.randn(BATCH, 39)])
    compiled.update(batch, update_policy=True, update_target=True, actor_obs=[torch.randn(BATCH, 39)] * 2)
    assert sum(counters["graph_break"].values()) == 0 and counters["stats"]["unique_graphs"] == 2


def test_compiled_update_stays_exact_when_a_new_stage_recompiles_it():
    """A stage's new masks change the update's graph: the recompiled graph still trains every
    parameter and the temperature as the eager update does (in torch 2.13 a recompiled graph
    holds log_alpha as a graph attribute, and a backward() that finds its own leaves skipped it:
    the temperature then moved only by Adam's decaying momentum)."""
    torch._dynamo.reset()
    counters.clear()
    args = mw.Args(hidden=HIDDEN, batch_size=BATCH)
    learners = []
    for compile in (False, True):
        torch.manual_seed(0)
        learners.append(mw.SACLearner(39, 4, -np.ones(4), np.ones(4), args, "cpu", compile=compile))
    eager, compiled = learners
    generator = torch.Generator().manual_seed(2)
    d = torch.randn(500, 2 * 39 + 4 + 2, generator=generator)
    for stage in range(2):
        if stage == 1:  # NBSP's second stage: masks on both steps, so a new graph
            for learner in learners:
                scores = torch.Generator().manual_seed(1)  # the same masks on both
                actor_layers = learner.actor.hidden_layers()
                critic_layers = learner.qf.hidden_layers(0) + learner.qf.hidden_layers(1)
                learner.actor_mask.set(sn.parameter_masks(actor_layers, random_eq7_masks(actor_layers, scores)))
                learner.q_mask.set(sn.parameter_masks(critic_layers, random_eq7_masks(critic_layers, scores)))
        for i in range(20):
            batch = d[torch.randint(0, len(d), (BATCH,), generator=generator)].split([39, 4, 1, 39, 1], dim=1)
            for learner in learners:
                torch.manual_seed(100 * stage + i)
                learner.update(batch, update_policy=i % 2 == 0, update_target=True)
        if stage == 0:
            alpha_after_stage_1 = eager.log_alpha.item()
    assert counters["stats"]["unique_graphs"] == 4  # with and without actor steps, in each stage
    assert abs(eager.log_alpha.item() - alpha_after_stage_1) > 1e-4  # stage 2 trains the temperature
    assert compiled.log_alpha.item() == pytest.approx(eager.log_alpha.item(), rel=RTOL, abs=ATOL)
    torch.testing.assert_close(compiled.a_optimizer.state[compiled.log_alpha]["exp_avg"],
                               eager.a_optimizer.state[eager.log_alpha]["exp_avg"], rtol=RTOL, atol=ATOL)
    for module in ("actor", "qf", "qf_target"):
        for p_e, p_c in zip(getattr(eager, module).parameters(), getattr(compiled, module).parameters(), strict=True):
            torch.testing.assert_close(p_c, p_e, rtol=RTOL, atol=ATOL)
