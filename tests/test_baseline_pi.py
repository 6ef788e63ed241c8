"""Plasticity injection (baselines/pi.py): the outputs of the actor, the critics and the critic
targets are identical right before and after an injection (BASELINES.md), only the injected heads
learn, the targets stay lined up with their critics, and the injected structure survives a resume,
through the method's state alone and through both training scripts."""

import io
import os

import numpy as np
import pytest
import torch
from torch import nn

import nbsp_sac_atari as atari
import nbsp_sac_metaworld as mw
from baselines import make_method
from baselines.pi import InjectedHead

CPU = torch.device("cpu")
OBS_DIM, ACT_DIM, NUM_ACTIONS = 39, 4, 18  # Meta-World v3; Atari's full action space


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def saved_and_loaded(state):
    """`state` after a checkpoint's round trip (torch.save, then torch.load with weights_only)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# --------------------------------------------------------------------------------------------
# Small learners of both scripts with the PI method, and batches for them
# --------------------------------------------------------------------------------------------
def metaworld_learner():
    args = mw.Args(method="pi", hidden=[8, 8], batch_size=8, cuda=False)
    method = make_method(args)
    learner = mw.SACLearner(OBS_DIM, ACT_DIM, -np.ones(ACT_DIM, np.float32), np.ones(ACT_DIM, np.float32), args, CPU,
                            method=method)
    method.setup(learner)
    return learner, method


def atari_learner():
    args = atari.Args(method="pi", conv_channels=[4, 8, 8], hidden=[16], batch_size=4, cuda=False)
    method = make_method(args)
    learner = atari.SACLearner(NUM_ACTIONS, args, CPU, method=method)
    method.setup(learner)
    return learner, method


def metaworld_batch(n=8):
    obs, next_obs = torch.randn(n, OBS_DIM), torch.randn(n, OBS_DIM)
    return obs, torch.rand(n, ACT_DIM) * 2 - 1, torch.randn(n, 1), next_obs, torch.zeros(n, 1)


def atari_batch(n=4):
    frames = torch.randint(0, 256, (2, n, 4, 84, 84), dtype=torch.uint8)
    return frames[0], torch.randint(0, NUM_ACTIONS, (n,)), torch.randn(n), frames[1], torch.zeros(n)


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


def injected_heads(learner):
    """[(name, InjectedHead)] of the actor and the critics (not the targets)."""
    targets = {id(t) for t in learner.critic_targets}
    return [(f"{type(net).__name__}.{name}", getattr(net, name)) for net, name in learner.heads() if id(net) not in targets]


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
    head = InjectedHead(linear([[1.0, 2.0]], [0.5]), linear([[3.0, -1.0]], [1.0]), linear([[2.0, 0.0]], [0.5]))
    x = torch.tensor([[1.0, 1.0]])
    # frozen 1 + 2 + 0.5 = 3.5; trainable 3 - 1 + 1 = 3; trainable_init 2 + 0 + 0.5 = 2.5 -> 3.5 + (3 - 2.5) = 4
    assert head(x).item() == 4.0
    assert [p.requires_grad for p in head.parameters()] == [False, False, True, True, False, False]
    head.fold_()  # frozen <- frozen + trainable - trainable_init = [[2, 1]], [1]: the same output
    assert head.frozen.weight.tolist() == [[2.0, 1.0]] and head.frozen.bias.tolist() == [1.0]
    assert head(x).item() == 2.0 + 1.0 + 1.0 + (3.0 - 2.5)  # the change is counted twice until restart_
    head.restart_(linear([[7.0, 7.0]], [7.0]))
    assert head.trainable.weight.tolist() == head.trainable_init.weight.tolist() == [[7.0, 7.0]]
    assert head(x).item() == 4.0
    head(x).sum().backward()  # only the trainable head gets gradients
    assert head.trainable.weight.grad.tolist() == [[1.0, 1.0]]
    assert head.frozen.weight.grad is None and head.trainable_init.weight.grad is None


# --------------------------------------------------------------------------------------------
# BASELINES.md: outputs identical right before and after injection
# --------------------------------------------------------------------------------------------
def test_outputs_identical_before_and_after_injection(script):
    make_learner, make_batch, outputs = script
    torch.manual_seed(0)
    learner, method = make_learner()
    probe = make_batch()
    train(learner, make_batch)
    before = outputs(learner, probe)
    method.end_stage(0, "first", None)
    after = outputs(learner, probe)
    for name in before:  # bit for bit: the injected change is exactly zero
        assert torch.equal(before[name], after[name]), name
    assert all(isinstance(head, InjectedHead) for _, head in injected_heads(learner))

    train(learner, make_batch)  # the injected heads learn a non-zero change
    before = outputs(learner, probe)
    method.end_stage(1, "second", None)
    after = outputs(learner, probe)
    for name in before:  # the change folded into the frozen head: equal up to float rounding
        torch.testing.assert_close(after[name], before[name], rtol=1e-5, atol=1e-5, msg=name)
    assert method.injections == 2


def test_fresh_heads_are_initialised_like_the_scripts_heads(script):
    make_learner, _, _ = script
    torch.manual_seed(0)
    learner, method = make_learner()
    method.end_stage(0, "first", None)
    for name, head in injected_heads(learner):
        assert type(head.trainable) is type(head.frozen), name
        assert not torch.equal(head.trainable.weight, head.frozen.weight), name
        assert torch.equal(head.trainable.weight, head.trainable_init.weight), name
        fan_in = head.frozen.weight.shape[1]  # nn.Linear [out, in]; EnsembleLinear [E, in, out]
        if learner.discrete:  # nbsp_sac_atari.layer_init: Kaiming normal weights, zero bias
            assert torch.all(head.trainable.bias == 0), name
            assert 0.5 < head.trainable.weight.std().item() * np.sqrt(fan_in / 2) < 1.5, name
        else:  # nn.Linear's and EnsembleLinear's default: uniform within 1 / sqrt(fan_in)
            bound = 1 / np.sqrt(fan_in)
            assert head.trainable.weight.abs().max().item() <= bound and head.trainable.bias.abs().max().item() <= bound


# --------------------------------------------------------------------------------------------
# Optimizers: the new heads learn, the frozen ones do not
# --------------------------------------------------------------------------------------------
def test_only_the_injected_heads_learn(script):
    make_learner, make_batch, _ = script
    torch.manual_seed(0)
    learner, method = make_learner()
    original = {name: list(head.parameters()) for name, head in injected_heads(learner)}
    train(learner, make_batch)
    method.end_stage(0, "first", None)
    heads = dict(injected_heads(learner))
    # the trainable heads form one new group of the actor's and one of the critics' Adam
    actor_heads = [p for name in learner.actor.head_names for p in getattr(learner.actor, name).trainable.parameters()]
    critic_heads = [p for qf in learner.critics for name in qf.head_names for p in getattr(qf, name).trainable.parameters()]
    for optimizer, expected in ((learner.actor_optimizer.optimizer, actor_heads), (learner.q_optimizer.optimizer, critic_heads)):
        assert len(optimizer.param_groups) == 2
        assert [id(p) for p in optimizer.param_groups[1]["params"]] == [id(p) for p in expected]
    for name, head in heads.items():
        assert [id(p) for p in head.frozen.parameters()] == [id(p) for p in original[name]]  # the old head itself
        assert all(p.requires_grad for p in head.trainable.parameters())
        assert not any(p.requires_grad for p in [*head.frozen.parameters(), *head.trainable_init.parameters()])

    snapshot = {name: [p.detach().clone() for p in head.parameters()] for name, head in heads.items()}
    train(learner, make_batch)
    for name, head in heads.items():
        frozen, trainable, trainable_init = snapshot[name][:2], snapshot[name][2:4], snapshot[name][4:]
        assert all(torch.equal(a, b) for a, b in zip(frozen, head.frozen.parameters())), name
        assert all(torch.equal(a, b) for a, b in zip(trainable_init, head.trainable_init.parameters())), name
        assert not torch.equal(trainable[0], head.trainable.weight), name

    # a second injection restarts the trainable heads: fresh values, no Adam moments
    method.end_stage(1, "second", None)
    for optimizer in (learner.actor_optimizer.optimizer, learner.q_optimizer.optimizer):
        assert len(optimizer.param_groups) == 2
        assert all(p not in optimizer.state for p in optimizer.param_groups[1]["params"])
        assert all(p in optimizer.state for p in optimizer.param_groups[0]["params"] if p.requires_grad)


def test_targets_line_up_with_their_critics(script):
    make_learner, make_batch, _ = script
    torch.manual_seed(0)
    learner, method = make_learner()
    train(learner, make_batch)
    method.end_stage(0, "first", None)
    for qf, target in zip(learner.critics, learner.critic_targets):
        critic_params, target_params = dict(qf.named_parameters()), dict(target.named_parameters())
        assert list(critic_params) == list(target_params)  # _foreach_lerp_/_copy_ over parameters() pair these
        assert all(critic_params[n].shape == target_params[n].shape for n in critic_params)
        for name in qf.head_names:
            head, target_head = getattr(qf, name), getattr(target, name)
            for part in ("trainable", "trainable_init"):  # theta'_0 of the target is the critic's
                for a, b in zip(getattr(head, part).parameters(), getattr(target_head, part).parameters()):
                    assert torch.equal(a, b)
    # one update with a target step: every target tensor follows its own critic tensor
    target_before = [[p.detach().clone() for p in t.parameters()] for t in learner.critic_targets]
    train(learner, make_batch, updates=1)
    tau = learner.args.tau
    for qf, target, before in zip(learner.critics, learner.critic_targets, target_before):
        for critic_p, target_p, old in zip(qf.parameters(), target.parameters(), before):
            torch.testing.assert_close(target_p, torch.lerp(old, critic_p.detach(), tau), rtol=0, atol=1e-7)
        for name in qf.head_names:  # trainable_init is equal on both sides, so it stays put
            assert torch.equal(getattr(target, name).trainable_init.weight, getattr(qf, name).trainable_init.weight)


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
        groups = [getattr(model, optimizer).optimizer.param_groups for model in (learner, resumed)]
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
    assert not any(isinstance(getattr(net, name), InjectedHead) for net, name in learner.heads())
    assert len(learner.actor_optimizer.optimizer.param_groups) == 1


# --------------------------------------------------------------------------------------------
# End to end through both scripts: a task switch injects, and a run killed after stage 1
# resumes to exactly the uninterrupted run
# --------------------------------------------------------------------------------------------
MW_TINY = dict(tasks=["reach", "drawer-close"], cycles=1, hidden=[8, 8], batch_size=8, steps_per_task=150,
               learning_starts=50, eval_every=0, eval_episodes=1, buffer_size=1000, cuda=False)
ATARI_TINY = dict(games=["Pong", "Bowling"], cycles=1, steps_per_task=200, learning_starts=100, batch_size=8,
                  conv_channels=[4, 8, 8], hidden=[16], buffer_size=1000, eval_steps=100, eval_envs=2,
                  eval_every=0, target_network_frequency=40, cuda=False)
RUNS = {"metaworld": (mw, MW_TINY, ("actor", "qf", "qf_target")),
        "atari": (atari, ATARI_TINY, ("actor", "qf1", "qf2", "qf1_target", "qf2_target"))}


class SimulatedKill(Exception):
    pass


@pytest.mark.parametrize("name", list(RUNS))
def test_end_to_end_injection_and_resume(name, tmp_path, monkeypatch):
    script, tiny, networks = RUNS[name]
    metrics = script.main(script.Args(**tiny, method="pi", runs_dir=str(tmp_path / "a")))
    run_a = tmp_path / "a" / metrics["run_name"]
    saved = load(run_a / "checkpoint.pt")
    assert os.path.isfile(run_a / "metrics.json")
    assert [len(row) for row in metrics["sr"]] == [2, 2] and metrics["sr"][0][1] is None
    assert all(value is not None for value in [metrics["sr"][0][0], *metrics["sr"][1]])
    assert saved["method"] == {"injections": 1}  # one task switch
    head = "fc_mean" if script is mw else "fc_logits"
    assert {f"{head}.{part}.weight" for part in ("frozen", "trainable", "trainable_init")} <= set(saved["actor"])
    assert [len(g["params"]) for g in saved["actor_optimizer"]["param_groups"]][1:] == [4 if script is mw else 2]

    real_make_env = script.make_env

    def make_env_killed_at_stage_2(game, seed, *rest):
        if seed == script.Args().seed + 2000:  # the training env of stage 2
            raise SimulatedKill
        return real_make_env(game, seed, *rest)

    monkeypatch.setattr(script, "make_env", make_env_killed_at_stage_2)
    with pytest.raises(SimulatedKill):
        script.main(script.Args(**tiny, method="pi", runs_dir=str(tmp_path / "b")))
    monkeypatch.undo()
    (run_b,) = (tmp_path / "b").iterdir()
    assert load(run_b / "checkpoint.pt")["method"] == {"injections": 1}  # saved after the injection
    resumed = script.main(script.Args(resume=str(run_b), cuda=False))
    assert resumed["sr"] == metrics["sr"]
    final_a, final_b = saved, load(run_b / "checkpoint.pt")
    for key in networks:
        for tensor_name, tensor in final_a[key].items():
            assert torch.equal(tensor, final_b[key][tensor_name]), f"{key}.{tensor_name}"
    assert final_b["method"] == {"injections": 1}
