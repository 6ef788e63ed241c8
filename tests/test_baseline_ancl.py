"""ANCL, A-EWC form (baselines/ancl.py): lambda_a = 0 reduces exactly to EWC (BASELINES.md; what
is equal is stated in each test), the penalty and its gradient by hand, the authors' Fisher merge,
the auxiliary learner trained alongside on the main learner's batches with a refreshed Fisher, the
state round trip, that ANCL is not plain SAC after a task switch (pulled towards the old anchor,
weighted by the Fisher), and both scripts end to end (the exact resume, with the auxiliary learner rebuilt at the stage
start and so not checkpointed: tests/test_methods.py)."""

import os
from functools import partial

import pytest
import torch

import conftest
import nbsp_sac_metaworld as mw
from baselines import Method, make_method
from baselines.ancl import ANCL
from baselines.ewc import estimate_fisher, snapshot
from conftest import MW_TINY, SCRIPTS, FixedBuffer, atari_batch, load
from test_baseline_ewc import pulled_towards_the_anchor

metaworld_learner = partial(conftest.metaworld_learner, "ancl", obs_dim=5, act_dim=2, hidden=[4, 4], batch_size=8,
                            fisher_critic=True, fisher_batches=2)
atari_learner = partial(conftest.atari_learner, "ancl", conv_channels=[2, 2, 2], hidden=[4], batch_size=4,
                        fisher_critic=True, fisher_batches=2)
metaworld_batch = partial(conftest.metaworld_batch, obs_dim=5, act_dim=2)
LEARNERS = {"metaworld": (metaworld_learner, metaworld_batch), "atari": (atari_learner, atari_batch)}


def perturb(learner, generator, scale=0.05):
    with torch.no_grad():
        for p in [p for net in [learner.actor, *learner.critics] for p in net.parameters()]:
            p.add_(scale * torch.randn(p.shape, generator=generator))


def penalties_and_grads(learner, method):
    """extra_loss and the gradients it gives, for the actor and the critics."""
    result = {}
    for network, module in (("actor", learner.actor), ("critic", None)):
        params = list(learner.actor.parameters()) if module else [p for c in learner.critics for p in c.parameters()]
        loss = method.extra_loss(network)
        result[network] = (loss.detach(), torch.autograd.grad(loss, params))
    return result


# --------------------------------------------------------------------------------------------
# lambda_a = 0 reduces exactly to EWC (BASELINES.md)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", list(LEARNERS))
def test_aux_lambda_zero_is_ewc_at_the_first_switch(script):
    """At the first task switch both methods estimate the same Fisher F_1 (same estimator, same
    batches) and anchor the same parameters. EWC's penalty is lambda_e sum F_1 d^2 and ANCL's,
    with lambda_a = 0, lambda/2 sum (1 - a) F_1 d^2: equal values and gradients for
    lambda_e = lambda (1 - a) / 2 (a = 0.5), and bit for bit for a = 0, lambda_e = lambda / 2.
    Later switches differ by design: EWC sums the Fishers, ANCL merges them with a."""
    make_learner, make_batch = LEARNERS[script]
    for a, exact in ((0.5, False), (0.0, True)):
        learner, ancl = make_learner(ancl_aux_lambda=0.0, ancl_a=a)
        ewc = make_method(type(learner.args)(**{**vars(learner.args), "method": "ewc", "ancl_a": 0.5,
                                                "ancl_aux_lambda": 10.0, "ewc_lambda": 1e4 * (1 - a) / 2}))
        ewc.setup(learner)
        generator = torch.Generator().manual_seed(0)
        batches = [make_batch(generator) for _ in range(2)]
        ewc.end_stage(0, "task", FixedBuffer(batches))
        ancl.end_stage(0, "task", FixedBuffer(batches))
        ancl.begin_stage(1, "next")
        assert ancl.aux is None  # no auxiliary learner: nothing would use it
        for _ in range(2):
            perturb(learner, generator)
            ancl.after_update(batches[0], True, True)
            got, expected = penalties_and_grads(learner, ancl), penalties_and_grads(learner, ewc)
            for network in ("actor", "critic"):
                (loss_a, grads_a), (loss_e, grads_e) = got[network], expected[network]
                assert loss_e > 0
                if exact:
                    assert torch.equal(loss_a, loss_e) and all(map(torch.equal, grads_a, grads_e))
                else:
                    torch.testing.assert_close(loss_a, loss_e, rtol=1e-6, atol=0)
                    for ga, ge in zip(grads_a, grads_e, strict=True):
                        torch.testing.assert_close(ga, ge, rtol=1e-6, atol=1e-12)


def test_ancl_is_not_plain_sac(side_by_side):
    """After a first task and its switch (F_old = (1 - a) F_1, theta_old), ANCL and plain SAC train
    200 updates of the next task from the same weights and Adam moments (ANCL resets none) on the
    same batches, the auxiliary learner alongside. At the defaults the old-task pull is
    lambda/2 (1 - a) F_1 = 2,500 F_1 (the authors' code; EWC's is 10^4 F_1), and F_aux is still 0
    (first estimate after 10,000 updates): ANCL's actor stays near theta_old where plain SAC's
    leaves it (Fisher-weighted squared distance under 5% of plain SAC's; measured 0.6%), the more
    the higher the Fisher (top 10% under a quarter of the bottom half's relative movement; measured
    0.037 against 0.75)."""
    learner, method = metaworld_learner(hidden=[8, 8], fisher_critic=False)
    generator = torch.Generator().manual_seed(8)
    method.begin_stage(0, "first")
    side_by_side(learner, None, [metaworld_batch(generator) for _ in range(50)])
    method.end_stage(0, "first", FixedBuffer(metaworld_batch(generator) for _ in range(2)))
    method.begin_stage(1, "second")
    assert method.aux is not None
    plain = learner.plain_copy()
    side_by_side(learner, plain, [metaworld_batch(generator) for _ in range(200)])
    weighted, high, low = pulled_towards_the_anchor(learner, plain, method.old_fisher["actor"], method.old_anchor["actor"])
    assert weighted < 0.05 and high < 0.25 * low, (weighted, high, low)
    assert method.updates == 200 and not torch.equal(method.aux.actor.fc_mean.weight, learner.actor.fc_mean.weight)


MW_EWC = dict(MW_TINY, fisher_batches=2, fisher_critic=True)


@pytest.mark.e2e
def test_aux_lambda_zero_trains_exactly_as_ewc(tmp_path, monkeypatch):
    """Two tasks (one switch), a = 0 and lambda = 2 lambda_e: the same run, bit for bit."""
    ancl = mw.main(mw.Args(**MW_EWC, method="ancl", ancl_aux_lambda=0.0, ancl_a=0.0, ancl_lambda=1e4,
                           runs_dir=str(tmp_path / "ancl")))
    ewc = mw.main(mw.Args(**MW_EWC, method="ewc", ewc_lambda=5e3, runs_dir=str(tmp_path / "ewc")))
    assert ancl["sr"] == ewc["sr"]
    a = load(tmp_path / "ancl" / ancl["run_name"] / "checkpoint.pt")
    b = load(tmp_path / "ewc" / ewc["run_name"] / "checkpoint.pt")
    for key in ("actor", "qf", "qf_target"):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), f"{key}.{name}"
    for network in ("actor", "critic"):
        for name, value in a["method"]["old_fisher"][network].items():
            assert torch.equal(value, b["method"]["fisher"][network][name])


# --------------------------------------------------------------------------------------------
# The penalty, the merge, the auxiliary learner
# --------------------------------------------------------------------------------------------
def test_no_penalty_and_no_aux_learner_during_the_first_task():
    _, method = metaworld_learner()
    method.begin_stage(0, "reach")
    method.after_update(metaworld_batch(torch.Generator().manual_seed(0)), True, True)
    assert method.aux is None and method.extra_loss("actor") is None and method.extra_loss("critic") is None


def test_unit_fisher_penalty_and_gradient_by_hand():
    """F_old = F_aux = 1: penalty lambda/2 |theta - theta_old|^2 + lambda_a/2 |theta - theta_aux|^2,
    gradient lambda (theta - theta_old) + lambda_a (theta - theta_aux); theta_aux gets none."""
    learner, method = metaworld_learner()
    method.end_stage(0, "reach", FixedBuffer(metaworld_batch(torch.Generator().manual_seed(1)) for _ in range(2)))
    method.begin_stage(1, "drawer-close")
    generator = torch.Generator().manual_seed(2)
    perturb(method.aux, generator)
    perturb(learner, generator)
    lam, lam_a = method.args.ancl_lambda, method.args.ancl_aux_lambda
    for network in ("actor", "critic"):
        params, aux_params = method.targets[network].params, method.aux_targets[network].params
        method.old_fisher[network] = {n: torch.ones_like(p) for n, p in params.items()}
        method.aux_fisher[network] = {n: torch.ones_like(p) for n, p in params.items()}
        loss = method.extra_loss(network)
        grads = torch.autograd.grad(loss, list(params.values()) + list(aux_params.values()), allow_unused=True)
        old = {n: (p - method.old_anchor[network][n]).detach().double() for n, p in params.items()}
        aux = {n: (p - aux_params[n]).detach().double() for n, p in params.items()}
        expected = (lam / 2 * sum((d**2).sum() for d in old.values())
                    + lam_a / 2 * sum((d**2).sum() for d in aux.values()))
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
        for n, g in zip(params, grads[: len(params)], strict=True):
            torch.testing.assert_close(g.double(), lam * old[n] + lam_a * aux[n], rtol=1e-4, atol=1e-3)
        assert all(g is None for g in grads[len(params) :])


def test_fisher_merge_of_the_authors_and_latest_anchor():
    """F_old starts at 0: after one task (1 - a) F_1, after two a (1 - a) F_1 + (1 - a) F_2."""
    learner, method = metaworld_learner(ancl_a=0.25)
    generator = torch.Generator().manual_seed(3)
    batches = [metaworld_batch(generator) for _ in range(4)]
    first = estimate_fisher(method.targets, batches[:2])
    method.end_stage(0, "reach", FixedBuffer(batches[:2]))
    perturb(learner, generator)
    second = estimate_fisher(method.targets, batches[2:])
    method.end_stage(1, "drawer-close", FixedBuffer(batches[2:]))
    for network in ("actor", "critic"):
        for name, p in method.targets[network].params.items():
            expected = 0.25 * 0.75 * first[network][name] + 0.75 * second[network][name]
            torch.testing.assert_close(method.old_fisher[network][name], expected)
            assert torch.equal(method.old_anchor[network][name], p.detach())


def test_aux_learner_is_a_plain_sac_copy_trained_on_the_main_batches_with_a_refreshed_fisher(monkeypatch):
    """begin_stage copies the main learner; every after_update runs a plain SAC update of the copy
    on the same batch (as a copy updated by hand, same random stream); every interval-th update
    re-estimates F_aux from the last fisher_batches batches; the main learner is left alone."""
    monkeypatch.setattr(ANCL, "aux_fisher_interval", 3)
    learner, method = metaworld_learner()
    generator = torch.Generator().manual_seed(4)
    method.end_stage(0, "reach", FixedBuffer(metaworld_batch(generator) for _ in range(2)))
    method.begin_stage(1, "drawer-close")
    aux = method.aux
    assert type(aux.method) is Method  # no regulariser for the auxiliary learner
    for p, q in zip(learner.actor.parameters(), aux.actor.parameters(), strict=True):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr()
    reference = learner.plain_copy()
    main_before = snapshot(dict(learner.actor.named_parameters()))

    batches = [metaworld_batch(generator) for _ in range(4)]
    for i, data in enumerate(batches):
        torch.manual_seed(i)
        reference.update(data, update_policy=i % 2 == 0, update_target=True)
        torch.manual_seed(i)
        method.after_update(data, update_policy=i % 2 == 0, update_target=True)
        if i < 2:
            assert method.aux_fisher == {} and "aux_actor" not in method.penalties
        if i == 2:  # the third update: F_aux from batches 2 and 3 (fisher_batches = 2), at theta_aux now
            expected = estimate_fisher(method.aux_targets, batches[1:3])
            for network in ("actor", "critic"):
                for name, value in expected[network].items():
                    torch.testing.assert_close(method.aux_fisher[network][name], value)
    for a, b in zip(aux.state_dict()["actor"].values(), reference.state_dict()["actor"].values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(aux.qf.parameters(), reference.qf.parameters(), strict=True):
        assert torch.equal(a, b)
    for name, p in learner.actor.named_parameters():
        assert torch.equal(p, main_before[name])
    method.extra_loss("actor")
    assert set(method.penalties) == {"old_actor", "aux_actor"}


@pytest.mark.parametrize("script", list(LEARNERS))
def test_state_round_trip_restores_the_old_task_penalty(script):
    make_learner, make_batch = LEARNERS[script]
    learner, method = make_learner()
    generator = torch.Generator().manual_seed(5)
    method.end_stage(0, "task", FixedBuffer(make_batch(generator) for _ in range(2)))
    perturb(learner, generator)
    state = conftest.assert_penalty_restored(make_learner, learner, method)
    assert set(state) == {"old_fisher", "old_anchor"}


# --------------------------------------------------------------------------------------------
# Both scripts end to end, with an exact resume
# --------------------------------------------------------------------------------------------
@pytest.mark.e2e
@pytest.mark.parametrize("name", list(SCRIPTS))
def test_end_to_end_aux_learner(name, method_runs):
    """ANCL's state in the shared tiny runs (tests/test_methods.py checks that they resume exactly;
    there the auxiliary Fisher is re-estimated every 10 updates: stage 2 has 100 or 35)."""
    runs = method_runs(name, "ancl")
    method = runs.method
    assert method.aux is not None and set(method.aux_fisher) == {"actor", "critic"}  # stage 2's auxiliary term ran
    assert set(method.penalties) == {"old_actor", "aux_actor", "old_critic", "aux_critic"}
    checkpoint = load(os.path.join(runs.run_dir, "checkpoint.pt"))
    stage_1 = load(os.path.join(runs.run_dir, "checkpoints", "stage_1.pt"))
    assert set(runs.killed_checkpoint["method"]) == {"old_fisher", "old_anchor"}  # stage 1's end: no stage state
    # the last stage has no task switch: its checkpoint keeps the stage's state
    assert set(checkpoint["method"]) == {"old_fisher", "old_anchor", "aux", "aux_fisher", "aux_window", "updates", "penalties"}
    for key, value in checkpoint["method"]["old_anchor"]["actor"].items():
        assert torch.equal(value, stage_1["actor"][key])
