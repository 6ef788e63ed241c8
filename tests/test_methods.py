"""The `--method` plumbing shared by every baseline: every method runs both scripts end to end and
resumes exactly, `sac` is NBSP with its mask and replay off, flags of other methods are refused,
and the hooks run at the documented points of both scripts. Each baseline's own behaviour is
tested in tests/test_baseline_<method>.py."""

import json
import os
import shutil
import subprocess
import sys
import typing

import pytest
import torch

import baselines
import nbsp_sac_atari as atari
import nbsp_sac_metaworld as mw
from baselines import METHOD_NAMES, Method
from conftest import ATARI_TINY, MW_TINY, SCRIPTS, evaluated, load


@pytest.mark.e2e
@pytest.mark.parametrize("name, method", [(name, method) for name in SCRIPTS for method in METHOD_NAMES],
                         ids=lambda value: value)
def test_every_method_runs_end_to_end_and_resumes_exactly(name, method, method_runs, capsys):
    """A tiny two-stage run, and the same run killed after stage 1 then resumed: the resumed run
    ends exactly as the uninterrupted one. Each method's own checks of these runs are in
    tests/test_baseline_<method>.py."""
    runs = method_runs(name, method)
    metrics, script = runs.metrics, runs.script
    with open(os.path.join(runs.run_dir, "metrics.json")) as f:
        assert json.load(f) == metrics
    assert metrics["complete"] and [len(row) for row in metrics["sr"]] == [2, 2] and metrics["sr"][0][1] is None
    assert evaluated(metrics, 0) and evaluated(metrics, 1)

    assert len(runs.killed_metrics["stages"]) == 1 and runs.killed_metrics["sr"][1] == [None, None]  # no stage 2
    assert runs.killed_checkpoint["stage"] == 1
    with open(os.path.join(runs.resumed_dir, "metrics.json")) as f:
        assert json.load(f) == runs.resumed_metrics
    assert runs.resumed_metrics["complete"] and runs.resumed_metrics["sr"] == metrics["sr"]
    full = load(os.path.join(runs.run_dir, "checkpoint.pt"))
    resumed = load(os.path.join(runs.resumed_dir, "checkpoint.pt"))
    assert set(full) == set(resumed)
    for key in full.keys() - {"run_name"}:
        assert_same(full[key], resumed[key], key)

    again = script.main(script.Args(resume=runs.run_dir, cuda=False))  # a finished run: nothing to redo
    assert "nothing to resume" in capsys.readouterr().out
    assert again["sr"] == metrics["sr"]


def assert_same(a, b, where):
    """`a` and `b` hold the same values, tensors bit for bit, in the same order of keys (a stage's
    wall time aside)."""
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a.keys() - {"wall_seconds"}:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{index}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


def test_method_choices_match_the_scripts():
    for script in (mw, atari):
        assert typing.get_type_hints(script.Args)["method"].__args__ == METHOD_NAMES


@pytest.mark.e2e
@pytest.mark.parametrize("name", list(SCRIPTS))
def test_sac_is_nbsp_without_mask_and_replay(name, tmp_path, method_runs):
    script, tiny = SCRIPTS[name]
    runs = method_runs(name, "sac")  # a run of `tiny` with --method sac
    sac = runs.metrics
    off = script.main(script.Args(**tiny, mask=False, replay=False, runs_dir=str(tmp_path / "off")))
    metric = "ASR" if script is mw else "AR"
    assert sac["sr"] == off["sr"] and sac[metric] == off[metric]
    a = load(os.path.join(runs.run_dir, "checkpoint.pt"))
    b = load(tmp_path / "off" / off["run_name"] / "checkpoint.pt")
    for tensor_name, tensor in a["actor"].items():
        assert torch.equal(tensor, b["actor"][tensor_name]), tensor_name
    assert a["neuron_masks"] == {}
    assert all("skill_neurons" not in stage for stage in sac["stages"])  # no identification for sac


class Recorder(Method):
    """Counts every hook call, and adds a zero extra loss so that path runs too."""

    calls: list = []

    def setup(self, learner):
        super().setup(learner)
        self.calls.append(("setup", type(learner).__module__))

    def begin_stage(self, stage, task):
        self.calls.append(("begin_stage", stage, task))

    def acting(self, task):
        self.calls.append(("acting", task))
        return super().acting(task)

    def extra_loss(self, network):
        self.calls.append(("extra_loss", network))
        return torch.zeros(())

    def after_backward(self, network):
        self.calls.append(("after_backward", network))

    def after_step(self, network):
        self.calls.append(("after_step", network))

    def after_update(self, data, update_policy, update_target):
        self.calls.append(("after_update", len(data)))

    def end_stage(self, stage, task, rb):
        self.calls.append(("end_stage", stage, task, rb.size))

    def state_dict(self):
        return {"count": torch.tensor(len(self.calls))}


@pytest.mark.e2e
@pytest.mark.parametrize("script, tiny", [(mw, MW_TINY), (atari, ATARI_TINY)], ids=["metaworld", "atari"])
def test_hooks_run_at_their_points(script, tiny, tmp_path, monkeypatch):
    Recorder.calls = []
    monkeypatch.setattr(baselines, "make_method", Recorder)
    metrics = script.main(script.Args(**tiny, method="sac", runs_dir=str(tmp_path)))
    calls = Recorder.calls
    tasks = tiny.get("tasks") or tiny["games"]
    assert calls[0] == ("setup", script.__name__)
    assert [c for c in calls if c[0] == "begin_stage"] == [("begin_stage", 0, tasks[0]), ("begin_stage", 1, tasks[1])]
    # end_stage only at the task switch, with the finished stage's buffer
    ends = [c for c in calls if c[0] == "end_stage"]
    assert len(ends) == 1 and ends[0][1:3] == (0, tasks[0]) and ends[0][3] > 0
    # evaluation after each stage acts on every task of the run
    assert [c[1] for c in calls if c[0] == "acting"] == tasks * 2
    # every update: critic then actor hooks in order, then after_update with the 5-part batch
    updates = [c for c in calls if c[0] == "after_update"]
    assert updates and all(c[1] == 5 for c in updates)
    first = calls.index(("extra_loss", "critic"))
    assert calls[first : first + 3] == [("extra_loss", "critic"), ("after_backward", "critic"), ("after_step", "critic")]
    assert ("after_step", "actor") in calls
    checkpoint = load(tmp_path / metrics["run_name"] / "checkpoint.pt")
    assert int(checkpoint["method"]["count"]) > 0


@pytest.mark.parametrize("script, tiny", [(mw, MW_TINY), (atari, ATARI_TINY)], ids=["metaworld", "atari"])
@pytest.mark.parametrize("overrides, named", [
    ({"method": "sac", "hard_mask": True}, "--hard-mask applies to --method nbsp, not sac"),
    ({"method": "ewc", "skill_ratio": 0.1}, "--skill-ratio applies to --method nbsp, not ewc"),
    ({"method": "sac", "goal_score": "balanced"}, "--goal-score applies to --method nbsp, not sac"),
    ({"method": "cbp", "identify_window": "rollout"}, "--identify-window applies to --method nbsp, not cbp"),
    ({"method": "nbsp", "ewc_lambda": 1.0}, "--ewc-lambda applies to --method ewc, not nbsp"),
    ({"method": "cbp", "fisher_batches": 3}, "--fisher-batches applies to --method ewc or ancl, not cbp"),
    ({"method": "npc", "cbp_decay": 0.5}, "--cbp-decay applies to --method cbp, not npc"),
    ({"method": "ewc", "compile": True}, "--compile and --cudagraphs support --method nbsp and sac"),
    ({"method": "cbp", "cbp_replacement_rate": 1.5}, "--cbp-replacement-rate must be in [0, 1]"),
    ({"method": "ancl", "ancl_a": -0.1}, "--ancl-a must be in [0, 1]"),
    ({"method": "npc", "npc_decay": 1.0}, "--npc-decay must be in [0, 1)"),
    ({"method": "cotasp", "cotasp_prompt_steps": 0}, "--cotasp-prompt-steps must be a positive integer"),
    ({"method": "bogus"}, "--method must be one of nbsp, sac, ewc"),
])
def test_method_flags_are_checked(script, tiny, overrides, named, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        script.main(script.Args(**tiny, **overrides, runs_dir=str(tmp_path / "runs")))
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], lines
    assert os.listdir(tmp_path) == []


@pytest.mark.e2e
def test_config_records_the_method(method_runs):
    with open(os.path.join(method_runs("metaworld", "sac").run_dir, "config.json")) as f:
        assert json.load(f)["args"]["method"] == "sac"


THROWAWAY_METHOD = '''"""A throw-away method (tests/test_methods.py): SAC with a squared-weight penalty on the actor."""

from baselines.method import NON_NEGATIVE, Flag, Method


class WeightPenalty(Method):
    name = "wpen"
    label = "WPen"
    flags = (Flag("wpen_strength", 0.0, "wpen: weight of the penalty on the actor's squared weights", NON_NEGATIVE),)
    compiles = False

    def extra_loss(self, network):
        if network != "actor" or not self.args.wpen_strength:
            return None
        return self.args.wpen_strength * sum((p**2).sum() for p in self.learner.actor.parameters())


METHOD = WeightPenalty
'''


@pytest.mark.e2e
def test_an_eighth_method_is_one_module_and_one_line(tmp_path):
    """Adding a method touches two places: its module in baselines/ and its name in
    BASELINE_MODULES. Both scripts' --method choices and flags, the flag checks, a real run,
    scripts/sweep.py and scripts/paper_tables.py then know it, in a copy of the repository."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    repo = tmp_path / "repo"
    shutil.copytree(root, repo, ignore=shutil.ignore_patterns(".git", "runs", "__pycache__", "tests"))
    (repo / "baselines" / "wpen.py").write_text(THROWAWAY_METHOD)
    registry = (repo / "baselines" / "__init__.py").read_text()
    line = 'BASELINE_MODULES = ("ewc", "npc", "ancl", "cotasp", "crelu", "cbp", "pi")'
    assert registry.count(line) == 1
    (repo / "baselines" / "__init__.py").write_text(registry.replace(line, line[:-1] + ', "wpen")'))

    def run(*argv):  # the copy's root modules first, before an installed checkout's
        return subprocess.run([sys.executable, *argv], cwd=repo, capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(repo)))

    for script in ("nbsp_sac_metaworld.py", "nbsp_sac_atari.py"):
        help_text = run(script, "--help").stdout
        assert "wpen}" in help_text and "--wpen-strength" in help_text, script
    refused = run("nbsp_sac_metaworld.py", "--method", "ewc", "--wpen-strength", "1")
    assert refused.returncode == 2 and "--wpen-strength applies to --method wpen, not ewc" in refused.stderr
    bad = run("nbsp_sac_metaworld.py", "--method", "wpen", "--wpen-strength", "-1")
    assert bad.returncode == 2 and "--wpen-strength must be a finite number >= 0, got -1.0" in bad.stderr
    tiny = ["--tasks", "reach", "--cycles", "1", "--hidden", "8", "8", "--batch-size", "8", "--steps-per-task", "200",
            "--learning-starts", "100", "--eval-every", "0", "--eval-episodes", "1", "--buffer-size", "1000", "--no-cuda",
            "--runs-dir", "runs", "--exp-name", "wpen", "--method", "wpen", "--wpen-strength", "0.5"]
    trained = run("nbsp_sac_metaworld.py", *tiny)
    assert trained.returncode == 0, trained.stderr[-2000:]
    dry = run("scripts/sweep.py", "--dry-run", "--runs-dir", "planned", "--sequences", "reach", "--settings", "wpen", "--seeds", "1",
              "--", "--wpen-strength", "0.5", "--skill-ratio", "0.1")
    assert dry.returncode == 0, dry.stderr
    assert "--method wpen" in dry.stdout and "--wpen-strength 0.5" in dry.stdout and "--skill-ratio" not in dry.stdout
    table = run("scripts/paper_tables.py", "runs", "--table", "all")
    assert table.returncode == 0 and "| WPen |" in table.stdout, table.stdout + table.stderr
