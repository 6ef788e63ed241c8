"""Tests of scripts/neuron_analysis.py (paper Appendix C.5, Table 8): the zeroing hook by hand,
the neuron sets, and the analysis of a tiny real two-task run (`shared_tiny_run` of test_figures.py,
made once per session)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

import neuron_analysis as na
import skill_neurons as sn
from test_figures import shared_tiny_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return shared_tiny_run(tmp_path_factory)


# --------------------------------------------------------------------------------------------
# The zeroing hook, by hand
# --------------------------------------------------------------------------------------------
def hand_net():
    """x -> ReLU(W1 x) -> W2 h with W1 = [[1,0],[0,1],[1,1]], W2 = [[1, 10, 100]], no biases:
    x = (1, 2) gives h = (1, 2, 3) and output 1 + 20 + 300 = 321."""
    net = nn.Sequential(nn.Linear(2, 3, bias=False), nn.ReLU(), nn.Linear(3, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        net[2].weight.copy_(torch.tensor([[1.0, 10.0, 100.0]]))
    return net, [sn.HiddenLayer(net[1], net[0].weight, None, neuron_dim=0)]


def test_zero_hook_hand_computed():
    net, layers = hand_net()
    x = torch.tensor([[1.0, 2.0]])
    assert net(x).item() == 321.0
    with na.zero_neurons(layers, [1]):
        assert net(x).item() == 301.0  # h = (1, 0, 3)
    with na.zero_neurons(layers, [0, 2]):
        assert net(x).item() == 20.0  # h = (0, 2, 0)
    with na.zero_neurons(layers, []):
        assert net(x).item() == 321.0
    assert net(x).item() == 321.0  # hooks removed on exit
    with pytest.raises(ValueError, match=r"must be in \[0, 3\), got \[3\]"), na.zero_neurons(layers, [3]):
        pass


def test_zero_hook_indices_span_layers():
    # two hidden layers of 2 neurons, identity weights: index 2 is the second layer's first neuron
    net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 2, bias=False), nn.ReLU(),
                        nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(2))
        net[2].weight.copy_(torch.eye(2))
        net[4].weight.copy_(torch.tensor([[1.0, 10.0]]))
    layers = [sn.HiddenLayer(net[1], net[0].weight, None, 0), sn.HiddenLayer(net[3], net[2].weight, None, 0)]
    x = torch.tensor([[3.0, 5.0]])
    assert net(x).item() == 53.0
    with na.zero_neurons(layers, [2]):
        assert net(x).item() == 50.0
    with na.zero_neurons(layers, [1]):  # first layer: the 5 never reaches the second layer
        assert net(x).item() == 3.0


def test_zero_hook_ensemble_member_only():
    # an ensemble activation [E=2, B=1, N=3]: member 1's neuron 2 only
    relu = nn.ReLU()
    layer = sn.HiddenLayer(relu, nn.Parameter(torch.zeros(2, 4, 3)), None, neuron_dim=2, member=1)
    with na.zero_neurons([layer], [2]):
        out = relu(torch.ones(2, 1, 3))
    assert out.tolist() == [[[1.0, 1.0, 1.0]], [[1.0, 1.0, 0.0]]]


def test_neuron_sets():
    a = torch.tensor([1, 1, 0, 0, 1], dtype=torch.bool)
    b = torch.tensor([0, 1, 1, 0, 1], dtype=torch.bool)
    sets = na.neuron_sets(a, b)
    assert sets["intersection"].tolist() == [1, 4]
    assert sets["A_minus_B"].tolist() == [0]
    assert sets["B_minus_A"].tolist() == [2]
    assert sets["none"].tolist() == []


# --------------------------------------------------------------------------------------------
# On a real run
# --------------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_analysis_of_tiny_run(tiny_run, tmp_path, capsys, monkeypatch):
    zeroed, real_zero_neurons = [], na.zero_neurons

    def zero_neurons(layers, indices):
        zeroed.append((sum(layer.num_neurons for layer in layers), indices.tolist()))
        return real_zero_neurons(layers, indices)

    monkeypatch.setattr(na, "zero_neurons", zero_neurons)
    result = na.main([tiny_run, "--json", str(tmp_path / "table8.json")])
    with open(tmp_path / "table8.json") as f:
        assert json.load(f) == json.loads(json.dumps(result))
    assert result["tasks"] == {"A": "reach", "B": "drawer-close"} and result["skill_stages"] == {"A": 1, "B": 2}
    assert result["stage"] == 2 and result["network"] == "actor" and result["episodes"] == 2
    sizes, stage_1, stage_2 = result["sizes"], na.load_stage(tiny_run, 1), na.load_stage(tiny_run, 2)
    assert sizes["A"] == int(stage_1["selected"]["actor"].sum()) == round(0.2 * 16)  # 20% of 8 + 8 neurons
    assert sizes["B"] == int(stage_2["selected"]["actor"].sum())
    assert sizes["intersection"] + sizes["A_minus_B"] == sizes["A"]
    assert sizes["intersection"] + sizes["B_minus_A"] == sizes["B"]
    assert set(result["neurons"]["intersection"]).isdisjoint(result["neurons"]["A_minus_B"])
    for task in ("reach", "drawer-close"):
        assert set(result["success"][task]) == {"intersection", "A_minus_B", "B_minus_A", "none"}
        assert all(0.0 <= v <= 1.0 for v in result["success"][task].values())
    # each task's success under each condition zeroed exactly that set of the actor's 16 neurons
    neurons = result["neurons"] | {"none": []}
    assert zeroed == [(16, neurons[condition]) for _ in ("reach", "drawer-close") for condition in na.CONDITIONS]
    # nothing zeroed is the training script's own final evaluation, reproduced
    with open(os.path.join(tiny_run, "metrics.json")) as f:
        assert {t: result["success"][t]["none"] for t in ("reach", "drawer-close")} == json.load(f)["task_success"][-1]

    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert len(rows) == 4  # header, separator, one row per task
    assert [len(row.strip("|").split("|")) for row in rows] == [5] * 4  # task + four columns
    assert "zero A∩B" in rows[0] and "zero A−B" in rows[0] and "zero B−A" in rows[0] and "none" in rows[0]
    assert rows[2].startswith("| reach |") and rows[3].startswith("| drawer-close |")
    for row in rows[2:]:
        assert all(0.0 <= float(v) <= 1.0 for v in row.strip("|").split("|")[1:])


@pytest.mark.e2e
def test_run_without_skill_neurons_fails_with_one_line(tiny_run, tmp_path):
    """A baseline run's checkpoints carry no `selected`: one error line, exit status 2."""
    run_dir = tmp_path / "baseline_run"
    os.makedirs(run_dir / "checkpoints")
    shutil.copy(os.path.join(tiny_run, "config.json"), run_dir)
    for stage in (1, 2):
        checkpoint = na.load_stage(tiny_run, stage) | {"scores": {}, "selected": {}}
        torch.save(checkpoint, run_dir / "checkpoints" / f"stage_{stage}.pt")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "neuron_analysis.py"), str(run_dir)],
                            check=False, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "no skill neurons" in lines[0], result.stderr
