"""scripts/run_folders.py on hand-made run folders: finding them, what a run says about itself,
and the training scripts' flag defaults read from their source (equal to their real Args)."""

import dataclasses
import json
import os

import pytest

import run_folders
from run_folders import RunFolder, RunFolderError


def write_folder(path, args, metrics=None, stage_tasks=None):
    """A run folder: config.json with `args` and, when given, metrics.json."""
    os.makedirs(path)
    config = {"run_name": os.path.basename(path), "args": args}
    if stage_tasks is not None:
        config["stage_tasks"] = stage_tasks
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    if metrics is not None:
        with open(os.path.join(path, "metrics.json"), "w") as f:
            json.dump(metrics, f)
    return str(path)


def test_what_a_run_says_about_itself(tmp_path):
    world = RunFolder.read(write_folder(
        tmp_path / "mw", {"tasks": ["window-open-v3", "window-close"], "cycles": 2, "steps_per_task": 100},
        {"complete": False, "stage_tasks": ["window-open", "window-close"] * 2,
         "stages": [{"env_steps": 60}, {"env_steps": 100}]}))
    assert world.benchmark() == "metaworld" and world.tasks() == ("window-open", "window-close")
    assert world.sequence() == ("window-open", "window-close")  # one cycle of the stages
    assert world.boundaries() == [60, 160] and world.inner_boundaries() == [60, 160]
    assert world.stage_lengths() == [60, 100, 100, 100] and not world.complete
    atari = RunFolder.read(write_folder(tmp_path / "atari", {"games": ["Pong", "Bowling"]},
                                        {"complete": True, "AR": 0.5}))
    assert atari.benchmark() == "atari" and atari.complete
    assert atari.sequence() == ("Pong", "Bowling")  # no stages recorded: the flag's list
    # one cycle by the script's default when the args do not name it (Atari: 2)
    assert RunFolder("x", {"args": {"games": ["Pong"]}, "stage_tasks": ["Pong", "Alien"] * 2}, None).sequence() \
        == ("Pong", "Alien")
    assert RunFolder.read(write_folder(tmp_path / "new", {"tasks": ["reach"]})).metrics is None


def test_find_and_complete_runs(tmp_path):
    done = write_folder(tmp_path / "runs" / "b", {"tasks": ["reach"]}, {"complete": True})
    killed = write_folder(tmp_path / "runs" / "a", {"tasks": ["reach"]}, {"complete": False})
    os.makedirs(tmp_path / "runs" / "not-a-run")
    assert [r.path for r in run_folders.find(tmp_path / "runs")] == [killed, done]  # by name
    assert [r.path for r in run_folders.find([done, tmp_path / "runs"])] == [done, killed]  # each once
    assert [r.path for r in run_folders.complete_runs([tmp_path / "runs"])] == [done]
    with pytest.raises(RunFolderError, match="does not exist"):
        run_folders.find([tmp_path / "missing"])
    with pytest.raises(RunFolderError, match="no run folders"):
        run_folders.find([tmp_path / "runs" / "not-a-run"])


def test_runs_in_skips_what_is_not_a_run(tmp_path):
    runs = tmp_path / "runs"
    good = write_folder(runs / "a", {"tasks": ["reach"], "seed": 1}, {"complete": True})
    write_folder(runs / "b", {"tasks": ["reach"], "seed": 2})
    (runs / "b" / "metrics.json").write_text("{")  # half written: counts as no metrics
    os.makedirs(runs / "c")
    (runs / "c" / "config.json").write_text("[]")  # not a run's config
    found = run_folders.runs_in(str(runs))
    assert [(r.path, r.complete, r.metrics) for r in found] == [(good, True, {"complete": True}),
                                                               (str(runs / "b"), False, None)]
    assert run_folders.runs_in(str(tmp_path / "missing")) == []


def test_metrics_files_recursive(tmp_path):
    deep = write_folder(tmp_path / "runs" / "grid" / "a", {"tasks": ["reach"]}, {"complete": True})
    metrics = os.path.join(deep, "metrics.json")
    assert run_folders.metrics_files([tmp_path / "runs", metrics]) == [metrics]
    os.makedirs(tmp_path / "empty")
    with pytest.raises(RunFolderError, match="no metrics.json under"):
        run_folders.metrics_files([tmp_path / "empty"])
    with pytest.raises(RunFolderError, match="no such folder"):
        run_folders.metrics_files(tmp_path / "missing")


@pytest.mark.parametrize("script, module", [("metaworld", "nbsp_sac_metaworld"), ("atari", "nbsp_sac_atari")])
def test_script_defaults_are_the_real_args_defaults(script, module):
    """Read from the source, equal (values, types and order) to `asdict(Args())` of the script."""
    real = dataclasses.asdict(__import__(module).Args())
    read = run_folders.script_defaults(script)
    assert read == real and list(read) == list(real)
    assert all(type(read[k]) is type(real[k]) for k in real)
