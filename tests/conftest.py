"""Shared test helpers: tiny run configurations, small learners and batches of both scripts, a run
killed after a stage, and the end-to-end runs of every method (made once per session)."""

import dataclasses
import functools
import io
import json
import os

import metaworld
import numpy as np
import pytest
import torch

import baselines
import nbsp_sac_atari as atari
import nbsp_sac_metaworld as mw
import protocol

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.environ.get("PYTEST_XDIST_WORKER"):  # `-n N`: N test processes share the cores, one thread each
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # and the training runs they start

# Meta-World's MT1(task, seed) draws a task's 50 goal configurations by resetting a fresh env 50
# times, about half a second of CPU at every make_env; it depends on (task, seed) alone and leaves
# NumPy's global RNG as it found it (test_metaworld checks both), so a test process draws each once.
metaworld.MT1 = functools.lru_cache(maxsize=None)(metaworld.MT1)

# Two-stage runs of a few seconds; a test overrides what it needs ({**MW_TINY, "cycles": 2}).
MW_TINY = dict(tasks=["reach", "drawer-close"], cycles=1, hidden=[8, 8], batch_size=8, steps_per_task=150,
               learning_starts=50, eval_every=0, eval_episodes=1, buffer_size=1000, cuda=False)
ATARI_TINY = dict(games=["Pong", "Bowling"], cycles=1, steps_per_task=240, learning_starts=100, batch_size=8,
                  conv_channels=[4, 8, 8], hidden=[16], buffer_size=1000, eval_steps=100, eval_envs=2,
                  eval_every=0, target_network_frequency=40, cuda=False)
SCRIPTS = {"metaworld": (mw, MW_TINY), "atari": (atari, ATARI_TINY)}
CPU = torch.device("cpu")


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_tensors(run_dir) -> dict:
    """Every tensor of a run's checkpoint.pt, by its path in the checkpoint."""
    def tensors(value, prefix):
        if isinstance(value, torch.Tensor):
            return {prefix: value}
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else []
        return {k: v for key, item in items for k, v in tensors(item, f"{prefix}/{key}").items()}
    return tensors(load(os.path.join(run_dir, "checkpoint.pt")), "")


def evaluated(metrics: dict, stage: int) -> bool:
    """Whether the evaluation after `stage` (0-based) scored every task seen so far, counting an
    Atari game that finished no evaluation game (listed in the stage's `eval_unscored`) as scored."""
    unscored = metrics["stages"][stage].get("eval_unscored", [])
    return all(value is not None or metrics["stage_tasks"][j] in unscored
               for j, value in enumerate(metrics["sr"][stage][: stage + 1]))


# --------------------------------------------------------------------------------------------
# Small learners of both scripts, set up with their method as the scripts do, and batches for them
# --------------------------------------------------------------------------------------------
def metaworld_learner(method: str, obs_dim=39, act_dim=4, **flags):
    """A Meta-World `SACLearner` with `method` (actions in [-1, 1]) and the method set up on it."""
    args = mw.Args(**{"method": method, "cuda": False, **flags})
    hooks = baselines.make_method(args)
    learner = mw.SACLearner(obs_dim, act_dim, -np.ones(act_dim, np.float32), np.ones(act_dim, np.float32), args, CPU,
                            method=hooks)
    hooks.setup(learner)
    return learner, hooks


def atari_learner(method: str, num_actions=6, **flags):
    """An Atari `SACLearner` with `method` and the method set up on it."""
    args = atari.Args(**{"method": method, "cuda": False, **flags})
    hooks = baselines.make_method(args)
    learner = atari.SACLearner(num_actions, args, CPU, method=hooks)
    hooks.setup(learner)
    return learner, hooks


def metaworld_batch(generator=None, n=8, obs_dim=39, act_dim=4):
    """(obs, actions, rewards, next_obs, dones) of `n` random transitions; `generator` None draws
    from torch's global generator."""
    return (torch.randn(n, obs_dim, generator=generator), torch.rand(n, act_dim, generator=generator) * 2 - 1,
            torch.randn(n, 1, generator=generator), torch.randn(n, obs_dim, generator=generator), torch.zeros(n, 1))


def atari_batch(generator=None, n=4, num_actions=6):
    """(obs, actions, rewards, next_obs, dones) of `n` random transitions of 4 stacked 84 x 84 frames."""
    frames = torch.randint(0, 256, (2, n, 4, 84, 84), dtype=torch.uint8, generator=generator)
    return frames[0], torch.randint(0, num_actions, (n,), generator=generator), torch.randn(n, generator=generator), \
        frames[1], torch.zeros(n)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class FixedBuffer:
    """A replay buffer whose `sample` hands out prepared batches in order."""

    def __init__(self, batches):
        self.batches = list(batches)

    def sample(self, n):
        return self.batches.pop(0)


def saved_and_loaded(state):
    """`state` after a checkpoint's round trip (torch.save, then torch.load with weights_only)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_penalty_restored(make_learner, learner, method) -> dict:
    """A fresh learner and method, loaded from `learner` and `method`'s checkpointed state, give the
    same penalty on both networks (EWC's and ANCL's `extra_loss`); returns the saved method state."""
    state = saved_and_loaded(method.state_dict())
    fresh_learner, fresh = make_learner()
    fresh.load_state_dict(state)
    fresh_learner.load_state_dict(learner.state_dict())
    for network in ("actor", "critic"):
        assert torch.equal(fresh.extra_loss(network), method.extra_loss(network))
    return state


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------
def kill_after_stage(script, args, stage: int) -> str:
    """Runs `script.main(args)` until stage `stage`'s checkpoint and metrics.json are written, stops
    it there as a kill would, and returns the run folder (for `--resume` tests)."""
    written = []
    original = protocol.atomic_write_json

    def killed_after_the_stage(path, data):
        original(path, data)
        if path.endswith("metrics.json") and len(data["stages"]) >= stage:
            written.append(path)
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(protocol, "atomic_write_json", killed_after_the_stage)
        with pytest.raises(KeyboardInterrupt):
            script.main(args)
    run_dir = os.path.dirname(written[0])
    protocol.release_run_folder(run_dir)  # a killed process holds no lock
    return run_dir


@pytest.fixture
def side_by_side():
    """A function that trains a method's learner and, when given, a plain SAC learner (taken with
    `learner.plain_copy()` at the same point) on the same batches with the same random draws, on
    the Meta-World schedule (a policy update every `policy_frequency`-th update, the target every
    update); the method's `after_update` runs after each of its learner's updates, as in the
    scripts. `start` continues the count of an earlier call."""

    def train(learner, plain, batches, start=0):
        for index, data in enumerate(batches, start):
            update_policy = index % learner.args.policy_frequency == 0
            for each in (learner,) if plain is None else (learner, plain):
                torch.manual_seed(10_000 + index)
                each.update(data, update_policy, True)
            learner.method.after_update(data, update_policy, True)

    return train


# Flags under which each method acts within a tiny run (ANCL's auxiliary Fisher interval is set below).
METHOD_FLAGS = {
    "nbsp": dict(identify_episodes=1, dpre_per_task=100),
    "ewc": dict(fisher_batches=2, fisher_critic=True),
    "ancl": dict(fisher_batches=2, fisher_critic=True),
    "cbp": dict(cbp_maturity_threshold=20, cbp_replacement_rate=0.05),
    "cotasp": dict(hidden=[32, 32], cotasp_weight_steps=40, cotasp_prompt_steps=10),
}
SCRIPT_METHOD_FLAGS = {  # CoTASP's Atari layers and CReLU's halving are tested on two hidden layers
    ("atari", "nbsp"): dict(identify_max_steps=200),
    ("atari", "cotasp"): dict(conv_channels=[8, 16, 16]),
    ("atari", "crelu"): dict(hidden=[16, 16], crelu_halve_width=True),
}
ANCL_AUX_FISHER_INTERVAL = 10  # stage 2 has 100 (Meta-World) or 35 (Atari) updates


@dataclasses.dataclass
class MethodRuns:
    """One method's tiny two-stage run of one script, uninterrupted (`metrics`, `run_dir`), and the
    same run killed after stage 1 (`killed_*`) then resumed (`resumed_*`)."""

    script: object
    args: object  # the uninterrupted run's
    metrics: dict
    run_dir: str
    method: object  # the uninterrupted run's Method, as it ended
    killed_metrics: dict  # metrics.json as the kill left it
    killed_checkpoint: dict  # checkpoint.pt as the kill left it
    resumed_metrics: dict
    resumed_dir: str


@pytest.fixture(scope="session")
def method_runs(tmp_path_factory):
    """`method_runs(name, method)`: that method's `MethodRuns` on script `name` ("metaworld" or
    "atari"), trained on the first call and shared by every later one."""
    made = {}

    def runs(name: str, method: str) -> MethodRuns:
        if (name, method) in made:
            return made[name, method]
        script, tiny = SCRIPTS[name]
        folder = tmp_path_factory.mktemp(f"{name}-{method}")
        flags = {**tiny, **METHOD_FLAGS.get(method, {}), **SCRIPT_METHOD_FLAGS.get((name, method), {}), "method": method}
        args = script.Args(**flags, runs_dir=str(folder / "full"))
        methods = []

        def recorded_make_method(method_args):
            methods.append(make_method(method_args))
            return methods[-1]

        make_method = baselines.make_method
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(baselines.METHODS["ancl"], "aux_fisher_interval", ANCL_AUX_FISHER_INTERVAL)
            with pytest.MonkeyPatch.context() as recording:
                recording.setattr(baselines, "make_method", recorded_make_method)
                metrics = script.main(args)
            killed = kill_after_stage(script, dataclasses.replace(args, runs_dir=str(folder / "killed")), 1)
            with open(os.path.join(killed, "metrics.json")) as f:
                killed_metrics = json.load(f)
            killed_checkpoint = load(os.path.join(killed, "checkpoint.pt"))
            resumed = script.main(script.Args(resume=killed, cuda=False))
        made[name, method] = MethodRuns(script, args, metrics, os.path.join(folder, "full", metrics["run_name"]),
                                        methods[-1], killed_metrics, killed_checkpoint, resumed, killed)
        return made[name, method]

    return runs
