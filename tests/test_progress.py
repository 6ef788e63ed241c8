"""Runs that report themselves: plain progress lines when the output is a file, an ETA from the
measured rate, the final success matrix, and the plasticity diagnostics (hand-computed values,
every network and method, per stage in metrics.json)."""

import json
import os
import subprocess
import sys
import time

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
    assert {e.step for e in events.Scalars("plasticity/qf2/dormant_ratio")} == {150, 300, 450, 600}
    saved = json.load(open(os.path.join(tmp_path, metrics["run_name"], "metrics.json")))
    assert saved["stages"][1]["plasticity"] == metrics["stages"][1]["plasticity"]
