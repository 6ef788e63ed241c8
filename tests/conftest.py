"""Shared test fixtures."""

import os

import pytest
import torch

import protocol

def evaluated(metrics: dict, stage: int) -> bool:
    """Whether the evaluation after `stage` (0-based) scored every task seen so far, counting an
    Atari game that finished no evaluation game (listed in the stage's `eval_unscored`) as scored."""
    unscored = metrics["stages"][stage].get("eval_unscored", [])
    return all(value is not None or metrics["stage_tasks"][j] in unscored
               for j, value in enumerate(metrics["sr"][stage][: stage + 1]))


@pytest.fixture
def kill_after_stage_1(monkeypatch):
    """A function that runs `script.main(args)` until stage 1's checkpoint and metrics.json are
    written, then stops it as a kill would, and returns the run folder (for `--resume` tests)."""

    def run(script, args):
        written = []
        original = protocol.atomic_write_json

        def killed_after_first_metrics(path, data):
            original(path, data)
            if path.endswith("metrics.json"):
                written.append(path)
                raise KeyboardInterrupt

        monkeypatch.setattr(protocol, "atomic_write_json", killed_after_first_metrics)
        with pytest.raises(KeyboardInterrupt):
            script.main(args)
        monkeypatch.setattr(protocol, "atomic_write_json", original)
        run_dir = os.path.dirname(written[0])
        protocol.release_run_folder(run_dir)  # a killed process holds no lock
        return run_dir

    return run


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
