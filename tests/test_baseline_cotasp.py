"""CoTASP (baselines/cotasp.py): the maths of its prompts and dictionaries, the BASELINES.md row
(masks of two tasks differ; frozen units of task 1 do not change while training task 2, where plain
SAC from the same state changes them), the
straight-through gradient, the weight/prompt alternation, evaluation under `acting(task)`, the
method state, and end-to-end runs of both scripts killed after their first stage and resumed."""

import hashlib
import json
import os
from functools import partial

import numpy as np
import pytest
import torch

import conftest
import nbsp_sac_atari as atari
from baselines import cotasp
from baselines.cotasp import CoTASP, sparse_code, task_embedding
from conftest import evaluated, load, metaworld_batch

MW_LAYERS, MW_HEADS, MW_BLOCKS = ["trunk.0", "trunk.2"], ["fc_mean", "fc_logstd"], [1, 1]
ATARI_LAYERS, ATARI_HEADS = ["trunk.0", "trunk.2", "trunk.4", "trunk.7", "trunk.9"], ["fc_logits"]
ATARI_BLOCKS = [1, 1, atari.CONV_OUT ** 2, 1, 1]  # the last conv channel feeds 7 x 7 inputs of the first linear


metaworld_learner = partial(conftest.metaworld_learner, "cotasp", hidden=[16, 16])
atari_learner = partial(conftest.atari_learner, "cotasp", num_actions=18, conv_channels=[8, 16, 16], hidden=[32, 32])
atari_batch = partial(conftest.atari_batch, num_actions=18)


def used_units(prompts):
    return [(p.detach() > 0) for p in prompts]


def frozen_entries(actor_state, layers, heads, blocks, used):
    """What CoTASP must keep of a task whose units are `used`: weights whose unit and input unit are
    both used (all first-layer inputs count), biases of used units, the heads' weights reading used
    last-layer units, and the heads' biases."""
    entries, inputs = {}, None
    for name, rows, block in zip(layers, used, blocks):
        weight = actor_state[f"{name}.weight"]
        columns = torch.ones(weight.shape[1], dtype=torch.bool) if inputs is None else inputs
        entries[f"{name}.weight"] = weight[rows][:, columns]
        entries[f"{name}.bias"] = actor_state[f"{name}.bias"][rows]
        inputs = rows.repeat_interleave(block)
    for name in heads:
        entries[f"{name}.weight"] = actor_state[f"{name}.weight"][:, inputs]
        entries[f"{name}.bias"] = actor_state[f"{name}.bias"]
    return entries


def snapshot(module):
    return {name: p.detach().clone() for name, p in module.state_dict().items()}


# ------------------------------------------------------------------------------------------
# Maths
# ------------------------------------------------------------------------------------------
def test_task_embedding_is_fixed_unit_length_and_distinct_per_name():
    reach = task_embedding("reach")
    assert reach.shape == (384,) and torch.equal(reach, task_embedding("reach"))
    assert float(reach.norm()) == pytest.approx(1.0, abs=1e-12)
    # seeded by the SHA-256 of the name through torch's CPU generator: the same on every machine
    seed = int.from_bytes(hashlib.sha256(b"reach").digest()[:8], "little")
    raw = torch.randn(384, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assert torch.equal(reach, raw / raw.norm())
    assert abs(float(reach @ task_embedding("drawer-close"))) < 0.25  # distinct names: nearly orthogonal


def test_sparse_code_soft_thresholds_against_an_orthonormal_dictionary():
    # D = I: argmin 1/2 ||e - a||^2 + lambda ||a||_1 is the soft threshold of e by lambda
    e = torch.tensor([0.5, -0.0005, -0.2, 0.001], dtype=torch.float64)
    code = sparse_code(e, torch.eye(4, dtype=torch.float64), 1e-3)
    assert torch.allclose(code, torch.tensor([0.499, 0.0, -0.199, 0.0], dtype=torch.float64), atol=1e-15)


def test_sparse_code_meets_the_lasso_optimality_conditions_on_an_overcomplete_dictionary():
    generator = torch.Generator().manual_seed(0)
    dictionary = torch.randn(96, 48, generator=generator, dtype=torch.float64)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    e = torch.randn(48, generator=generator, dtype=torch.float64)
    e /= e.norm()
    lasso = 1e-3
    code = sparse_code(e, dictionary, lasso)
    correlation = dictionary @ (e - dictionary.T @ code)
    support = code != 0
    assert 0 < int(support.sum()) <= 48
    assert torch.allclose(correlation[support], lasso * code[support].sign(), atol=1e-12)
    assert (correlation[~support].abs() <= lasso * (1 + 1e-9)).all()
    assert cotasp.exact_on_support(e, dictionary, lasso, -code) is None  # a wrong sign guess is refused
    assert cotasp.exact_on_support(e, dictionary, lasso, torch.ones(96, dtype=torch.float64)) is None  # 96 atoms > 48 features


def test_dictionary_update_is_one_block_coordinate_descent_pass():
    # one task, code (0.5, 0), embedding (0.6, 0.8): A = [[0.25, 0], [0, 0]], B = e a^T
    dictionary = torch.eye(2, dtype=torch.float64)
    codes = torch.tensor([[0.5, 0.0]], dtype=torch.float64)
    e = torch.tensor([0.6, 0.8], dtype=torch.float64)
    updated = cotasp.update_dictionary(dictionary, codes, e[None], e, torch.Generator().manual_seed(3))
    # atom 0: (1, 0) + (B[:, 0] - A[0] @ D) / A[0, 0] = (1, 0) + ((0.3, 0.4) - (0.25, 0)) / 0.25 = (1.2, 1.6),
    # projected on the unit ball: (0.6, 0.8)
    assert torch.allclose(updated[0], torch.tensor([0.6, 0.8], dtype=torch.float64), atol=1e-15)
    # atom 1 is unused (A[1, 1] = 0): e plus noise of e's standard deviation (0.1), projected
    noise = torch.randn(2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = e + 0.1 * noise
    assert torch.allclose(updated[1], expected / expected.norm().clamp(min=1.0), atol=1e-15)
    assert torch.equal(dictionary, torch.eye(2, dtype=torch.float64))  # the input is left alone


def test_straight_through_mask_is_heaviside_with_gradient_inside_zero_one():
    prompt = torch.tensor([-0.5, 0.0, 0.3, 0.99, 1.0, 2.0], requires_grad=True)
    mask = cotasp.straight_through_mask(prompt)
    assert mask.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    weights = torch.arange(1.0, 7.0)
    (mask * weights).sum().backward()
    assert prompt.grad.tolist() == [0.0, 0.0, 3.0, 4.0, 0.0, 0.0]


# ------------------------------------------------------------------------------------------
# The BASELINES.md row and the method's rules
# ------------------------------------------------------------------------------------------
def test_masks_of_two_tasks_differ():
    _, method = metaworld_learner()
    method.begin_stage(0, "reach")
    reach = [m.clone() for m in method.active_masks]
    method.begin_stage(1, "drawer-close")
    drawer = method.active_masks
    assert all(m.sum() > 0 for m in reach + drawer)
    assert any(not torch.equal(a, b) for a, b in zip(reach, drawer))
    # the masks are Heaviside of each task's prompt, the sparse code of its embedding
    for mask, prompt, dictionary in zip(reach, method.prompts["reach"], method.dictionaries):
        code = sparse_code(task_embedding("reach"), dictionary, 1e-3).float()
        assert torch.equal(prompt.detach(), code) and torch.equal(mask, (code > 0).float())


@pytest.mark.parametrize("kind", ["metaworld", "atari"])
def test_frozen_units_of_task_1_do_not_change_while_training_task_2(kind):
    make, batch, layers, heads, blocks = {
        "metaworld": (metaworld_learner, metaworld_batch, MW_LAYERS, MW_HEADS, MW_BLOCKS),
        "atari": (atari_learner, atari_batch, ATARI_LAYERS, ATARI_HEADS, ATARI_BLOCKS)}[kind]
    first, second = ("reach", "drawer-close") if kind == "metaworld" else ("Pong", "Bowling")
    learner, method = make(batch_size=4, cotasp_weight_steps=3, cotasp_prompt_steps=2)
    generator = torch.Generator().manual_seed(0)
    probe = batch(generator)[0]
    method.begin_stage(0, first)
    for _ in range(6):
        learner.update(batch(generator), True, True)
    method.end_stage(0, first, None)
    before = snapshot(learner.actor)
    with method.acting(first), torch.no_grad():
        policy_before = learner.actor(probe)
    method.begin_stage(1, second)
    for _ in range(12):  # weight and prompt updates of task 2
        learner.update(batch(generator), True, True)
    after = snapshot(learner.actor)
    used = used_units(method.prompts[first])
    kept_before = frozen_entries(before, layers, heads, blocks, used)
    kept_after = frozen_entries(after, layers, heads, blocks, used)
    assert sum(v.numel() for v in kept_before.values()) > 0
    for name in kept_before:
        assert torch.equal(kept_before[name], kept_after[name]), name  # bit-identical
    assert any(not torch.equal(before[name], after[name]) for name in before)  # task 2 did learn
    with method.acting(first), torch.no_grad():
        policy_after = learner.actor(probe)
    for old, new in zip(policy_before if isinstance(policy_before, tuple) else [policy_before],
                        policy_after if isinstance(policy_after, tuple) else [policy_after]):
        assert torch.equal(old, new)  # task 1's policy is exactly preserved


def test_cotasp_is_not_plain_sac(side_by_side):
    """After the first task's switch (critics and temperature reset, the actor's Adam moments
    cleared), CoTASP and plain SAC train 12 updates of the second task from that same state (the
    same weights and fresh moments) on the same batches: every weight CoTASP froze for the first
    task is bit-identical afterwards, while plain SAC moved nearly all of them (93%)."""
    learner, method = metaworld_learner(batch_size=4, cotasp_weight_steps=3, cotasp_prompt_steps=2)
    generator = torch.Generator().manual_seed(0)
    method.begin_stage(0, "reach")
    side_by_side(learner, None, [metaworld_batch(generator) for _ in range(6)])
    method.end_stage(0, "reach", None)
    method.begin_stage(1, "drawer-close")
    plain = learner.plain_copy()
    assert learner.actor_optimizer.state == {} and plain.actor_optimizer.state == {}
    before = snapshot(learner.actor)
    side_by_side(learner, plain, [metaworld_batch(generator) for _ in range(12)])
    used = used_units(method.prompts["reach"])
    kept, cotasp_after, plain_after = (frozen_entries(state, MW_LAYERS, MW_HEADS, MW_BLOCKS, used)
                                       for state in (before, snapshot(learner.actor), snapshot(plain.actor)))
    assert sum(v.numel() for v in kept.values()) > 0
    assert all(torch.equal(kept[name], cotasp_after[name]) for name in kept)
    moved = torch.cat([(plain_after[name] - kept[name]).abs().flatten() > 1e-6 for name in kept])
    assert moved.float().mean() > 0.8  # measured 0.93: weights reading inactive units get no gradient


def test_step_masks_free_what_task_1_does_not_use():
    learner, method = metaworld_learner()
    method.begin_stage(0, "reach")
    method.end_stage(0, "reach", None)
    method.begin_stage(1, "drawer-close")
    used = [u.float() for u in used_units(method.prompts["reach"])]
    masks = dict(zip(learner.actor_mask.params, learner.actor_mask.masks))
    trunk0, trunk2 = learner.actor.trunk[0], learner.actor.trunk[2]
    assert torch.equal(masks[trunk0.weight], (1 - used[0])[:, None].expand(16, 39))
    assert torch.equal(masks[trunk0.bias], 1 - used[0])
    assert torch.equal(masks[trunk2.weight], 1 - used[1][:, None] * used[0][None, :])
    for head in (learner.actor.fc_mean, learner.actor.fc_logstd):
        assert torch.equal(masks[head.weight], (1 - used[1])[None, :].expand(4, 16))
        assert torch.equal(masks[head.bias], torch.zeros(4))
    assert method.frozen_fraction == pytest.approx(float(torch.cat(used).mean()))


def test_first_task_trains_everything_and_a_revisited_task_reuses_its_prompt():
    learner, method = metaworld_learner(batch_size=4)
    generator = torch.Generator().manual_seed(1)
    method.begin_stage(0, "reach")
    assert learner.actor_mask.params == []  # nothing to protect yet
    learner.update(metaworld_batch(generator, 4), True, True)
    method.end_stage(0, "reach", None)
    method.begin_stage(1, "drawer-close")
    method.end_stage(1, "drawer-close", None)
    reach_prompt = [p.detach().clone() for p in method.prompts["reach"]]
    method.begin_stage(2, "reach")
    assert all(torch.equal(a, b) for a, b in zip(method.prompts["reach"], reach_prompt))
    assert method.trained == ["reach", "drawer-close"]
    # protected: the units of the OTHER task only; reach's own units train again
    masks = dict(zip(learner.actor_mask.params, learner.actor_mask.masks))
    drawer = [u.float() for u in used_units(method.prompts["drawer-close"])]
    assert torch.equal(masks[learner.actor.trunk[0].bias], 1 - drawer[0])
    own_only = used_units(reach_prompt)[0] & ~drawer[0].bool()
    assert own_only.any() and (masks[learner.actor.trunk[0].bias][own_only] == 1).all()


def test_straight_through_gradient_reaches_the_prompt():
    learner, method = metaworld_learner()
    method.begin_stage(0, "reach")
    obs = torch.randn(8, 39, generator=torch.Generator().manual_seed(2))
    # reference: the same forward with the masks as leaf tensors, whose gradients we read
    method.active_masks = [m.clone().requires_grad_(True) for m in method.active_masks]
    mean, log_std = learner.actor(obs)
    (mean.sum() + log_std.sum()).backward()
    mask_grads = [m.grad for m in method.active_masks]
    method.active_masks = method.masks_of("reach")
    method.actor_updates = method.args.cotasp_weight_steps  # the prompt phase
    assert method.prompt_phase
    mean, log_std = learner.actor(obs)
    (mean.sum() + log_std.sum()).backward()
    for prompt, grad in zip(method.prompts["reach"], mask_grads):
        gate = ((prompt > 0) & (prompt < 1)).float()
        assert gate.sum() > 0 and grad[gate.bool()].abs().sum() > 0
        assert torch.allclose(prompt.grad, grad * gate, rtol=1e-6, atol=1e-8)


def test_alternation_is_weight_steps_then_prompt_steps():
    learner, method = metaworld_learner(cotasp_weight_steps=3, cotasp_prompt_steps=2)
    method.begin_stage(0, "reach")
    obs = torch.randn(16, 39, generator=torch.Generator().manual_seed(3))
    phases = []
    for _ in range(10):
        weights, prompts = snapshot(learner.actor), [p.detach().clone() for p in method.prompts["reach"]]
        learner.actor_step(obs)
        weights_moved = any(not torch.equal(weights[k], v) for k, v in snapshot(learner.actor).items())
        prompts_moved = any(not torch.equal(a, b.detach()) for a, b in zip(prompts, method.prompts["reach"]))
        assert weights_moved != prompts_moved
        phases.append("W" if weights_moved else "P")
    assert "".join(phases) == "WWWPPWWWPP"
    # the actor's Adam took only the weight updates
    assert all(int(state["step"]) == 6 for state in learner.actor_optimizer.state.values())
    assert method.actor_updates == 10 and not method.prompt_phase


def test_prompt_update_shrinks_codes_without_actor_gradient_by_the_lasso_step():
    learner, method = metaworld_learner(cotasp_weight_steps=1, cotasp_prompt_steps=1)
    method.begin_stage(0, "reach")
    values = [torch.tensor([-0.5, 0.0, 2.0, 1.5] * 4) for _ in method.prompts["reach"]]  # all outside (0, 1)
    with torch.no_grad():
        for prompt, v in zip(method.prompts["reach"], values):
            prompt.copy_(v)
    method.active_masks = method.masks_of("reach")
    method.actor_updates = 1  # the prompt phase
    learner.actor_step(torch.randn(8, 39))
    shrink = torch.tensor(3e-4 * 1e-3)
    for prompt, v in zip(method.prompts["reach"], values):
        expected = v.sign() * (v.abs() - shrink).clamp(min=0)
        assert torch.equal(prompt.detach(), expected)  # no sign change, zero stays zero


def test_acting_uses_the_evaluated_tasks_mask_and_restores_the_training_one():
    learner, method = metaworld_learner()
    method.begin_stage(0, "reach")
    method.end_stage(0, "reach", None)
    method.begin_stage(1, "drawer-close")
    obs = torch.randn(5, 39, generator=torch.Generator().manual_seed(4))

    def masked_mean(masks):  # the actor's mean by hand, with explicit masks
        x = obs
        for linear, mask in zip(learner.actor.trunk[0::2], masks):
            x = torch.relu(linear(x)) * mask
        return learner.actor.fc_mean(x)

    training = method.active_masks
    with torch.no_grad():
        for task in ("reach", "drawer-close", "window-open"):  # trained, training, never seen
            masks = [(p.detach() > 0).float() for p in method.prompt_of(task)]
            with method.acting(task):
                assert torch.equal(learner.actor(obs)[0], masked_mean(masks))
            assert method.active_masks is training
    assert "window-open" not in method.prompts  # an unseen task's code is not a trained prompt
    unseen = [sparse_code(task_embedding("window-open"), d, 1e-3).float() for d in method.dictionaries]
    assert all(torch.equal(a, b) for a, b in zip(method.prompt_of("window-open"), unseen))


def test_end_stage_resets_critics_and_temperature_and_updates_the_dictionaries():
    learner, method = metaworld_learner(batch_size=4)
    method.begin_stage(0, "reach")
    generator = torch.Generator().manual_seed(5)
    for _ in range(3):
        learner.update(metaworld_batch(generator, 4), True, True)
    critic, dictionaries = snapshot(learner.qf), [d.clone() for d in method.dictionaries]
    method.end_stage(0, "reach", None)
    assert not torch.equal(critic["head.weight"], learner.qf.state_dict()["head.weight"])
    assert torch.equal(learner.qf.state_dict()["head.weight"], learner.qf_target.state_dict()["head.weight"])
    assert float(learner.log_alpha.detach()) == pytest.approx(np.log(learner.args.alpha))
    assert not learner.q_optimizer.state and not learner.actor_optimizer.state
    codes = [method.prompts["reach"][i].detach().double()[None] for i in range(2)]
    for index, (old, new, code) in enumerate(zip(dictionaries, method.dictionaries, codes)):
        expected = cotasp.update_dictionary(old, code, task_embedding("reach")[None], task_embedding("reach"),
                                     torch.Generator().manual_seed(learner.args.seed + 1000 + index))
        assert torch.equal(new, expected) and not torch.equal(new, old)


def test_state_dict_round_trips_through_a_checkpoint(tmp_path):
    learner, method = metaworld_learner(cotasp_weight_steps=3, cotasp_prompt_steps=2)
    method.begin_stage(0, "reach")
    for _ in range(4):
        learner.actor_step(torch.randn(8, 39))
    method.end_stage(0, "reach", None)
    method.begin_stage(1, "drawer-close")
    for _ in range(4):
        learner.actor_step(torch.randn(8, 39))
    torch.save(method.state_dict(), tmp_path / "method.pt")
    _, fresh = metaworld_learner(cotasp_weight_steps=3, cotasp_prompt_steps=2)
    fresh.load_state_dict(load(tmp_path / "method.pt"))
    state, restored = method.state_dict(), fresh.state_dict()
    assert restored["trained"] == ["reach"] and restored["actor_updates"] == 4 and fresh.prompt_phase
    assert set(restored["prompts"]) == {"reach", "drawer-close"}
    for task in state["prompts"]:
        assert all(torch.equal(a, b) for a, b in zip(state["prompts"][task], restored["prompts"][task]))
    assert all(torch.equal(a, b) for a, b in zip(state["dictionaries"], restored["dictionaries"]))
    # the protected units (from the trained tasks' prompts) come back with them
    assert all(torch.equal(a, b) for a, b in zip(method.used_by_others("drawer-close"), fresh.used_by_others("drawer-close")))


# ------------------------------------------------------------------------------------------
# End to end: each script killed after its first stage, then resumed
# ------------------------------------------------------------------------------------------
@pytest.mark.e2e
@pytest.mark.parametrize("kind", ["metaworld", "atari"])
def test_end_to_end_run_killed_after_stage_1_resumes_with_task_1_frozen(kind, method_runs):
    """The shared tiny runs (tests/test_methods.py checks that the resume is exact)."""
    runs = method_runs(kind, "cotasp")
    layers, heads, blocks = (MW_LAYERS, MW_HEADS, MW_BLOCKS) if kind == "metaworld" else \
        (ATARI_LAYERS, ATARI_HEADS, ATARI_BLOCKS)
    tasks = runs.metrics["stage_tasks"]
    stage_1 = runs.killed_checkpoint
    assert stage_1["stage"] == 1 and stage_1["method"]["trained"] == [tasks[0]]

    with open(os.path.join(runs.resumed_dir, "metrics.json")) as f:
        sr = json.load(f)["sr"]
    assert len(sr) == 2 and len(sr[0]) == 2 and sr[0][1] is None and evaluated(runs.resumed_metrics, 1)
    assert runs.resumed_metrics["sr"] == sr
    final = load(os.path.join(runs.resumed_dir, "checkpoint.pt"))
    state = final["method"]
    assert final["stage"] == 2 and set(state["prompts"]) == set(tasks) and state["trained"] == [tasks[0]]
    assert len(state["dictionaries"]) == len(layers)
    # task 1's prompt and its units' weights came through stage 2 unchanged
    assert all(torch.equal(a, b) for a, b in zip(state["prompts"][tasks[0]], stage_1["method"]["prompts"][tasks[0]]))
    used = used_units(state["prompts"][tasks[0]])
    kept = frozen_entries(stage_1["actor"], layers, heads, blocks, used)
    for name, values in frozen_entries(final["actor"], layers, heads, blocks, used).items():
        assert torch.equal(values, kept[name]), name
    assert any(not torch.equal(final["actor"][k], v) for k, v in stage_1["actor"].items())


def test_module_exposes_the_method():
    assert cotasp.METHOD is CoTASP and CoTASP.name == "cotasp"
