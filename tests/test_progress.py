"""Runs that report themselves: plain progress lines when the output is a file, an ETA from the
measured rate, the final success matrix, and the plasticity diagnostics (hand-computed values,
every network and method, per stage in metrics.json)."""

import io
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import nbsp_sac_metaworld as mw
import plasticity
import protocol
import skill_neurons as sn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.e2e
def test_progress_lines_in_a_log_file(tmp_path):
    """Output to a file (no terminal): a start line with the folder and the TensorBoard command,
    plain progress lines at the cadence, and the success matrix at the end."""
    log = tmp_path / "log"
    with open(log, "w") as out:
        result = subprocess.run(
            [sys.executable, os.path.join(ROOT, "nbsp_sac_metaworld.py"), "--tasks", "reach", "--cycles", "1",
             "--steps-per-task", "1200", "--learning-starts", "100", "--hidden", "8", "8", "--batch-size", "8",
             "--buffer-size", "2000", "--eval-every", "0", "--eval-episodes", "1", "--identify-episodes", "1",
             "--no-cuda", "--runs-dir", str(tmp_path / "runs"), "--progress-every", "0.2"],
            stdout=out, stderr=subprocess.STDOUT, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = log.read_text().splitlines()
    assert result.returncode == 0, lines[-5:]
    assert lines[0].startswith(f"run folder {tmp_path / 'runs'}") and lines[0].endswith(": building the environments, networks and replay buffers")
    assert lines[1].startswith("training on cpu (") and lines[1].endswith(f"tensorboard --logdir {tmp_path / 'runs'}")
    stage_end = next(i for i, line in enumerate(lines) if line.startswith("stage 1/1 reach:"))
    progress = [line for line in lines[:stage_end] if " ETA=" in line]
    assert len(progress) >= 2 and all("stage 1/1 reach step=" in line and "SPS=" in line for line in progress)
    assert all(line.count("ETA=") == 1 for line in progress)
    assert any("ETA=<=" in line for line in progress)  # early stopping can end the stage sooner: an upper bound
    assert lines[-3].split() == ["reach"] and lines[-2].split()[:3] == ["after", "1:", "reach"]
    assert lines[-1].startswith("ASR=")


def test_eta_from_a_made_up_rate():
    assert protocol.eta_seconds(1000, 50.0) == 20.0 and protocol.eta_seconds(1000, None) is None
    assert protocol.format_duration(20) == "0m20s" and protocol.format_duration(3 * 3600 + 125) == "3h02m"
    progress = protocol.Progress(total_steps=10_000, done_steps=1500, every=0, upper_bound=False)
    progress.begin_stage("stage 1/2 a")
    assert progress.eta() == "n/a"  # no rate before the first update
    progress.rate_start = (time.time() - 10.0, 1000)  # learning started 10 s and 1000 steps ago
    progress.advance(500, stage_step=2000, global_step=2000)
    assert progress.done == 2000 and progress.rate == pytest.approx(100.0, rel=0.02)
    progress.rate = 100.0  # 8000 steps left at 100 steps/s
    assert progress.eta() == "1m20s"
    progress.upper_bound = True
    assert progress.eta() == "<=1m20s"


class FakeClock:
    """time.time() that moves only when told: 1000 s at the start (exact in binary, as are the
    1/64 s and 1/32 s steps below, so every rate comes out exact)."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class FakeWriter:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))


def drive_stage(run, stage, steps, seconds_per_step, learning_starts, clock, first_step=0):
    """A stage's steps as a script takes them: an update (and every 100th a log) from
    learning_starts on, then the progress after the step."""
    run.begin_stage(stage)
    for step in range(first_step, steps):
        clock.now += seconds_per_step
        run.global_step += 1
        if step >= learning_starts and (step - learning_starts) % 100 == 0:
            run.log_method_and_sps(SimpleNamespace(logs=dict), step)
        run.advance(step, learning_starts, dict)


def made_up_run(checkpoint=None):
    """A Run with only what its progress and SPS read: 2 stages of 1000 steps, learning starts at 100."""
    run = protocol.Run.__new__(protocol.Run)
    run.args = SimpleNamespace(seed=1, torch_deterministic=True, steps_per_task=1000)
    run.stage_tasks, run.checkpoint, run.global_step, run.last_eval = ["a", "b"], checkpoint, 0, "n/a"
    run.writer = FakeWriter()
    return run


def test_sps_and_eta_are_each_stages_own(monkeypatch, capsys):
    """Stage 1 runs at 64 steps/s, stage 2 at 32: stage 2's lines show no rate until its own is
    measured (from its first update, step 100), then 32 and the ETA at 32; TensorBoard's SPS the same."""
    clock = FakeClock()
    monkeypatch.setattr(protocol.time, "time", clock)
    run = made_up_run()
    run.progress = protocol.Progress(total_steps=2000, done_steps=0, every=1.0, upper_bound=False)
    drive_stage(run, 0, 1000, 1 / 64, 100, clock)
    drive_stage(run, 1, 1000, 1 / 32, 100, clock)
    lines = capsys.readouterr().out.splitlines()  # one line per 100 steps: 1.5625 s and 3.125 s apart, every 1 s
    assert len(lines) == 20 and all(line.count("ETA=") == 1 for line in lines)
    fields = [dict(field.split("=") for field in line.split()[5:7]) for line in lines]
    # stage 1: measured from step 100 on; at step 199, 1800 of 2000 steps left at 64/s: 28.1 s
    assert lines[1].split()[1:4] == ["stage", "1/2", "a"] and fields[1] == {"SPS": "64", "ETA": "0m28s"}
    assert fields[0] == {"SPS": "n/a", "ETA": "n/a"} and {f["SPS"] for f in fields[1:10]} == {"64"}
    # stage 2's first line (step 99) shows no rate, not stage 1's 64; at step 199: 800 left at 32/s
    assert lines[10].split()[1:4] == ["stage", "2/2", "b"] and fields[10] == {"SPS": "n/a", "ETA": "n/a"}
    assert fields[11] == {"SPS": "32", "ETA": "0m25s"} and {f["SPS"] for f in fields[11:]} == {"32"}
    # TensorBoard: none at a stage's first update (nothing measured yet), then 100 steps per window
    sps = [(value, step) for tag, value, step in run.writer.scalars if tag == "charts/SPS"]
    assert sps == [(64, 100 * k + 101) for k in range(1, 9)] + [(32, 1000 + 100 * k + 101) for k in range(1, 9)]


def test_sps_after_a_mid_stage_resume_is_measured_from_its_first_step(monkeypatch, capsys):
    """Resumed at stage 2, step 500 (past learning starts): the rate is measured from there, at once."""
    clock = FakeClock()
    monkeypatch.setattr(protocol.time, "time", clock)
    run = made_up_run(checkpoint={"stage": 1, "mid_stage": {"step": 500}})
    run.global_step = 1500
    run.progress = protocol.Progress(total_steps=2000, done_steps=1500, every=1.0, upper_bound=False)
    drive_stage(run, 1, 1000, 1 / 32, 100, clock, first_step=500)
    lines = capsys.readouterr().out.splitlines()
    # step 599 (measured over steps 500..599), then step 699: 300 of 2000 steps left at 32/s, 9.4 s
    assert len(lines) == 5 and all("SPS=32 " in line for line in lines) and "SPS=32 ETA=0m09s" in lines[1]
    sps = [(value, step) for tag, value, step in run.writer.scalars if tag == "charts/SPS"]
    assert sps == [(32, 1000 + 100 * k + 101) for k in range(5, 9)]


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_the_bar_shows_one_eta(monkeypatch):
    """On a terminal: the stage, the count, the elapsed time and the project's figures; neither
    tqdm's remaining time nor its rate, which would contradict the ETA."""
    terminal = Terminal()
    monkeypatch.setattr(protocol.sys, "stderr", terminal)
    progress = protocol.Progress(total_steps=10_000, done_steps=0, every=0, upper_bound=False)
    progress.begin_stage("stage 1/2 a")
    progress.rate_start = (time.time() - 10.0, 1000)
    progress.advance(2000, stage_step=2000, global_step=2000, eval="0.50/0.00")
    progress.bar.refresh()
    bar = terminal.getvalue().split("\r")[-1]
    progress.close()
    assert bar.startswith("stage 1/2 a:  20%|") and "| 2000/10000 [00:" in bar
    assert bar.count("ETA=") == 1 and "<" not in bar and "it/s" not in bar, bar
    assert f"SPS={progress.fields['SPS']}, ETA={progress.fields['ETA']}, eval=0.50/0.00]" in bar


@pytest.mark.e2e
def test_a_stage_end_is_evaluated_once(tmp_path):
    """--steps-per-task a multiple of --eval-every: the stage's end has one evaluation (its own,
    which makes sr's row), one TensorBoard point per task, and the run is the one without
    periodic evaluations (eval-every 0), point for point."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    flags = dict(tasks=["reach", "drawer-close"], cycles=1, steps_per_task=300, learning_starts=100, hidden=[8, 8],
                 batch_size=8, buffer_size=1000, eval_episodes=1, identify_episodes=1, dpre_per_task=100, cuda=False)
    runs = {}
    for eval_every in (300, 0):
        metrics = mw.main(mw.Args(**flags, eval_every=eval_every, runs_dir=str(tmp_path / str(eval_every))))
        events = EventAccumulator(str(tmp_path / str(eval_every) / metrics["run_name"]), size_guidance={"scalars": 0})
        events.Reload()
        runs[eval_every] = ({k: v for k, v in metrics.items() if k not in ("run_name", "stages")},
                            [{k: v for k, v in stage.items() if k != "wall_seconds"} for stage in metrics["stages"]],
                            {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
                             if tag.startswith(("eval/", "plasticity/"))})
    every_stage, none = runs[300], runs[0]
    for task in ("reach", "drawer-close"):
        assert [step for step, _ in every_stage[2][f"eval/{task}/success_rate"]] == [300, 600]
    assert [step for step, _ in every_stage[2]["plasticity/qf1/dormant_ratio"]] == [300, 600]
    assert every_stage == none


def test_dormant_ratio_by_hand():
    # mean |a| per unit: 0, 2, 4 -> layer mean 2 -> scores 0, 1, 2: only the unit that never fires is dormant
    layer = torch.tensor([[0.0, 1.0, 4.0], [0.0, 3.0, 4.0]])
    assert plasticity.dormant_ratio([layer], 0.025) == pytest.approx(1 / 3)
    assert plasticity.dormant_ratio([layer], 0.5) == pytest.approx(1 / 3)
    assert plasticity.dormant_ratio([layer], 1.0) == pytest.approx(2 / 3)  # s <= tau
    assert plasticity.dormant_ratio([layer, torch.ones(2, 2)], 0.025) == pytest.approx(1 / 5)  # per layer, over all units


def test_a_unit_that_never_fires_is_dormant_in_a_network():
    linear, relu = nn.Linear(2, 3), nn.ReLU()
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
        linear.bias.copy_(torch.tensor([0.0, 0.0, -1.0]))  # unit 2: pre-activation -1, never fires
    layers = [sn.HiddenLayer(relu, linear.weight, linear.bias, neuron_dim=0)]
    with sn.ActivationRecorder(layers) as recorder, torch.no_grad():
        relu(linear(torch.tensor([[1.0, 2.0], [3.0, 1.0]])))
    stats = plasticity.plasticity_stats(layers, recorder.activations(), 0.025)
    assert stats["dormant_ratio"] == pytest.approx(1 / 3)
    assert stats["weight_magnitude"] == pytest.approx(2 / 6)
    assert stats["feature_rank"] == 2  # features [[1, 2, 0], [3, 1, 0]]: rank 2


def test_feature_rank_by_hand():
    # singular values 3, 1, 0.02: cumulative shares 0.745, 0.995, 1 -> 2 reach 1 - 0.01
    features = torch.diag(torch.tensor([3.0, 1.0, 0.02]))
    assert plasticity.feature_rank(features, 0.01) == 2
    assert plasticity.feature_rank(features, 0.001) == 3
    assert plasticity.feature_rank(torch.zeros(4, 3)) == 0


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["nbsp", "pi"])
def test_plasticity_per_stage_for_every_network(method, tmp_path):
    """metrics.json has each stage's diagnostics for the actor and both critics, and TensorBoard
    has them at every evaluation; PI (which rebuilds the heads at the task switch) included."""
    args = dict(tasks=["reach", "drawer-close"], cycles=1, steps_per_task=300, learning_starts=100, hidden=[8, 8],
                batch_size=8, buffer_size=1000, eval_every=150, eval_episodes=1, cuda=False, method=method)
    if method == "nbsp":
        args |= dict(identify_episodes=1, dpre_per_task=100)
    metrics = mw.main(mw.Args(**args, runs_dir=str(tmp_path)))
    for stage in metrics["stages"]:
        assert set(stage["plasticity"]) == {"actor", "qf1", "qf2"}
        for values in stage["plasticity"].values():
            assert 0.0 <= values["dormant_ratio"] <= 1.0 and 1 <= values["feature_rank"] <= 8
            assert values["weight_magnitude"] > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(tmp_path, metrics["run_name"]))
    events.Reload()
    # every 150 steps, the stage ends (300, 600) once: their own evaluation, not a periodic one as well
    assert [e.step for e in events.Scalars("plasticity/qf2/dormant_ratio")] == [150, 300, 450, 600]
    saved = json.load(open(os.path.join(tmp_path, metrics["run_name"], "metrics.json")))
    assert saved["stages"][1]["plasticity"] == metrics["stages"][1]["plasticity"]
