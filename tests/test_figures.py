"""Tests of scripts/figures.py: seed alignment and averaging by hand, settings grouping, and
every figure written as non-empty PNG and PDF, from synthetic run folders (TensorBoard events,
config.json, metrics.json written here) and, for the activation histogram, from a tiny real run
of nbsp_sac_metaworld.py (`tiny_run`, also used by test_neuron_analysis.py)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

import figures
import run_folders

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TASKS = ["reach", "drawer-close"]
STAGE_TASKS = TASKS * 2
BUDGET, EVAL_EVERY = 1000, 250
TINY_RUN = ["--tasks", "reach", "drawer-close", "--cycles", "1", "--hidden", "8", "8", "--batch-size", "8",
            "--steps-per-task", "300", "--learning-starts", "100", "--eval-every", "0", "--eval-episodes", "2",
            "--identify-episodes", "2", "--buffer-size", "1000", "--dpre-per-task", "100", "--no-cuda"]


def write_json(path, data):
    with open(path, "w") as f:
        json.dump(data, f)


def success_curve(method, task, stage_task, progress, seed):
    """A plausible curve: the trained task rises; SAC forgets the other task, NBSP keeps it."""
    if task == stage_task:
        return min(1.0, progress + 0.05 * seed)
    return 0.1 if method == "sac" else 0.8


def write_run(runs_dir, method, seed, stage_lengths=(BUDGET,) * 4, skill_ratio=0.2, asr=None, complete=True, tasks=TASKS):
    """A run folder as the training script writes it: events with eval/{task}/success_rate every
    EVAL_EVERY steps and at each stage end (the same step twice where they coincide), config.json
    and metrics.json; two cycles of `tasks`."""
    stage_tasks = list(tasks) * 2
    run_name = f"{'+'.join(tasks)}__{method}_r{skill_ratio}__{seed}"
    run_dir = os.path.join(runs_dir, run_name)
    os.makedirs(run_dir)
    args = {"seed": seed, "exp_name": f"{method}_r{skill_ratio}", "runs_dir": str(runs_dir), "cuda": False,
            "tasks": list(tasks), "cycles": 2, "steps_per_task": BUDGET, "eval_every": EVAL_EVERY, "hidden": [8, 8],
            "method": method, "skill_ratio": skill_ratio, "dormant_threshold": 0.025}
    write_json(os.path.join(run_dir, "config.json"), {"run_name": run_name, "args": args, "stage_tasks": stage_tasks})
    writer = SummaryWriter(run_dir)
    step, stages = 0, []
    for stage, (stage_task, length) in enumerate(zip(stage_tasks, stage_lengths)):
        start = step
        for step in range(start + 1, start + length + 1):
            if step % EVAL_EVERY == 0 or step == start + length:
                for task in tasks:
                    value = success_curve(method, task, stage_task, (step - start) / length, seed)
                    writer.add_scalar(f"eval/{task}/success_rate", value, step)
        for net in ("actor", "qf1", "qf2"):  # the diagnostics at the stage end
            writer.add_scalar(f"plasticity/{net}/dormant_ratio", 0.25 + 0.01 * stage, start + length)
        stages.append({"stage": stage + 1, "task": stage_task, "env_steps": length, "budget_steps": BUDGET,
                       "early_stopped": length < BUDGET, "wall_seconds": 1.0,
                       "plasticity": {net: {"dormant_ratio": 0.25, "feature_rank": 3, "weight_magnitude": 0.1}
                                      for net in ("actor", "qf1", "qf2")}})
    writer.close()
    metrics = {"run_name": run_name, "stage_tasks": stage_tasks, "complete": complete, "sr": [], "stages": stages,
               "ASR": asr if asr is not None else (0.6 if method == "sac" else 0.85), "FM": 0.1, "FWT": 0.9}
    write_json(os.path.join(run_dir, "metrics.json"), metrics)
    return run_dir


@pytest.fixture(scope="module")
def synthetic_runs(tmp_path_factory):
    """Two settings: sac (seeds 1, 2) and nbsp (seeds 1, 2, 3; seed 3 stops stage 1 early)."""
    base = tmp_path_factory.mktemp("curves")
    for seed in (1, 2):
        write_run(base / "sac", "sac", seed)
    for seed in (1, 2):
        write_run(base / "nbsp", "nbsp", seed)
    write_run(base / "nbsp", "nbsp", 3, stage_lengths=(600, BUDGET, BUDGET, BUDGET))
    return base


def make_tiny_run(runs_dir) -> str:
    """A real two-stage NBSP run (reach -> drawer-close) with tiny networks and budgets (~15 s)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, os.path.join(ROOT, "nbsp_sac_metaworld.py"), *TINY_RUN, "--runs-dir", str(runs_dir)],
                   check=True, env=env, cwd=ROOT, capture_output=True, text=True)
    (name,) = os.listdir(runs_dir)
    return os.path.join(runs_dir, name)


_TINY_RUNS = {}  # one tiny run per pytest session, shared with test_neuron_analysis.py (read only)


def shared_tiny_run(tmp_path_factory) -> str:
    if "run" not in _TINY_RUNS:
        _TINY_RUNS["run"] = make_tiny_run(tmp_path_factory.mktemp("tiny_runs"))
    return _TINY_RUNS["run"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return shared_tiny_run(tmp_path_factory)


def assert_figures(paths):
    assert [os.path.splitext(p)[1] for p in paths] == [".png", ".pdf"]
    for path, magic in zip(paths, (b"\x89PNG", b"%PDF")):
        assert os.path.getsize(path) > 1000
        with open(path, "rb") as f:
            assert f.read(4) == magic


# --------------------------------------------------------------------------------------------
# Helpers, by hand
# --------------------------------------------------------------------------------------------
def test_to_stage_coordinates_hand_computed():
    # stages of 1000, 600 and 1000 steps end at global steps 1000, 1600 and 2600
    x = figures.to_stage_coordinates([0, 500, 1000, 1300, 1600, 2100, 2600], [1000, 600, 1000])
    np.testing.assert_allclose(x, [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0])


def test_mean_and_se_hand_computed():
    # seed a: 0 -> 1 linearly over x in [0, 2]; seed b: 1 everywhere on [0, 2]; seed c: only [1, 2]
    grid, mean, se, count = figures.mean_and_se([
        (np.array([0.0, 2.0]), np.array([0.0, 1.0])),
        (np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 1.0])),
        (np.array([1.0, 2.0]), np.array([0.0, 0.0])),
    ])
    np.testing.assert_allclose(grid, [0, 1, 2])
    np.testing.assert_array_equal(count, [2, 3, 3])
    # x=0: {0, 1}; x=1: {0.5, 1, 0}; x=2: {1, 1, 0}
    np.testing.assert_allclose(mean, [0.5, 0.5, 2 / 3])
    np.testing.assert_allclose(se, [np.std([0, 1], ddof=1) / np.sqrt(2), np.std([0.5, 1, 0], ddof=1) / np.sqrt(3),
                                    np.std([1, 1, 0], ddof=1) / np.sqrt(3)])
    _, _, se_one, _ = figures.mean_and_se([(np.array([0.0, 1.0]), np.array([0.2, 0.4]))])
    np.testing.assert_array_equal(se_one, [0, 0])  # one seed: no band


def test_read_eval_curves_one_value_per_step(synthetic_runs):
    run_dir = os.path.join(synthetic_runs, "nbsp", os.listdir(synthetic_runs / "nbsp")[0])
    curves = figures.read_eval_curves(run_dir)
    assert sorted(curves) == sorted(TASKS)
    steps, values = curves["reach"]
    # every 250 steps over 4 stages of 1000; stage ends coincide with evaluations: logged twice, kept once
    np.testing.assert_array_equal(steps, np.arange(250, 4001, 250))
    assert values.min() >= 0 and values.max() <= 1


def test_runs_grouped_into_settings_by_args_minus_seed(synthetic_runs):
    runs = run_folders.find([synthetic_runs / "sac", synthetic_runs / "nbsp"])
    groups = figures.group_runs(runs)
    labels = figures.setting_labels(groups)
    assert sorted(labels.values()) == ["nbsp", "sac"]
    sizes = {labels[k]: [r.args["seed"] for r in v] for k, v in groups.items()}
    assert sizes == {"nbsp": [1, 2, 3], "sac": [1, 2]}
    early = next(r for r in runs if r.args["method"] == "nbsp" and r.args["seed"] == 3)
    assert early.boundaries() == [600, 1600, 2600, 3600]
    # settings that differ in more than the method are labelled by every differing arg
    two = figures.setting_labels([json.dumps({"method": "nbsp", "skill_ratio": 0.1}),
                                  json.dumps({"method": "sac", "skill_ratio": 0.2})])
    assert sorted(two.values()) == ["method=nbsp, skill-ratio=0.1", "method=sac, skill-ratio=0.2"]


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("align", ["step", "stage"])
def test_curves_written(synthetic_runs, tmp_path, align):
    paths = figures.plot_curves([synthetic_runs / "sac", synthetic_runs / "nbsp"], str(tmp_path / f"curves_{align}"), align=align)
    assert_figures(paths)


def test_curves_command_line(synthetic_runs, tmp_path):
    out = tmp_path / "figs" / "curves.png"  # an extension is dropped: both files are written
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "figures.py"), "curves", str(synthetic_runs / "sac"),
                             str(synthetic_runs / "nbsp"), "--out", str(out)], check=False, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert_figures(result.stdout.split())
    assert result.stdout.split() == [str(tmp_path / "figs" / "curves.png"), str(tmp_path / "figs" / "curves.pdf")]


def test_bad_input_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        figures.main(["curves", str(tmp_path / "missing"), "--out", str(tmp_path / "x")])
    assert exit.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "missing" in lines[0]


@pytest.fixture(scope="module")
def two_sequences(tmp_path_factory):
    """Runs of two task sequences in one folder: reach → drawer-close with sac and nbsp;
    window-open → window-close with sac and nbsp at two skill ratios (seeds 1, 2 each)."""
    base = tmp_path_factory.mktemp("sequences")
    for seed in (1, 2):
        write_run(base, "sac", seed)
        write_run(base, "nbsp", seed)
        for method, ratio in (("sac", 0.2), ("nbsp", 0.2), ("nbsp", 0.1)):
            write_run(base, method, seed, skill_ratio=ratio, tasks=["window-open", "window-close"])
    return base


def overlapping_ticks(ax) -> bool:
    """Whether two of the x tick labels of a drawn axis overlap."""
    boxes = sorted((t.get_window_extent() for t in ax.get_xticklabels() if t.get_text() and t.get_visible()), key=lambda b: b.x0)
    return any(left.x1 > right.x0 for left, right in zip(boxes, boxes[1:]))


def drawn_figures(monkeypatch) -> list[dict]:
    """What figures.save is given, one dict per figure: title, legend entries, panel titles."""
    drawn, save = [], figures.save

    def recording_save(fig, out):
        fig.canvas.draw()
        drawn.append({"title": fig._suptitle.get_text() if fig._suptitle else None,
                      "legend": [t.get_text() for t in fig.legends[0].get_texts()] if fig.legends else None,
                      "panels": [ax.get_title() for ax in fig.axes if ax.get_visible()], "out": out,
                      "overlapping_ticks": [ax.get_title() for ax in fig.axes if ax.get_visible() and overlapping_ticks(ax)]})
        return save(fig, out)

    monkeypatch.setattr(figures, "save", recording_save)
    return drawn


def test_curves_one_figure_per_sequence_labelled_by_what_differs(two_sequences, tmp_path, monkeypatch):
    drawn = drawn_figures(monkeypatch)
    paths = figures.plot_curves([two_sequences], str(tmp_path / "curves"))
    assert [os.path.basename(p) for p in paths] == ["curves-reach+drawer-close.png", "curves-reach+drawer-close.pdf",
                                                    "curves-window-open+window-close.png",
                                                    "curves-window-open+window-close.pdf"]
    first, second = drawn
    assert first["overlapping_ticks"] == second["overlapping_ticks"] == []
    assert first["title"] == "reach → drawer-close, 2 cycles: evaluation success (mean ± s.e. over seeds)"
    assert first["panels"] == ["reach", "drawer-close"]  # no panel of the other sequence
    assert first["legend"][:2] == ["nbsp (n=2)", "sac (n=2)"]
    assert second["title"].startswith("window-open → window-close, 2 cycles")
    assert second["panels"] == ["window-open", "window-close"]
    assert second["legend"][:3] == ["method=nbsp, skill-ratio=0.1 (n=2)", "method=nbsp, skill-ratio=0.2 (n=2)",
                                    "method=sac, skill-ratio=0.2 (n=2)"]
    from PIL import Image

    for png in paths[::2]:  # two panels of 4.6 in at 150 dpi, plus margins: the legend does not widen the image
        assert Image.open(png).size[0] < 1500


def test_plasticity_one_figure_per_sequence(two_sequences, tmp_path, monkeypatch):
    drawn = drawn_figures(monkeypatch)
    paths = figures.plot_plasticity([two_sequences], str(tmp_path / "plasticity"), title="diagnostics")
    assert len(paths) == 4 and [d["title"] for d in drawn] == ["diagnostics: reach → drawer-close, 2 cycles",
                                                                "diagnostics: window-open → window-close, 2 cycles"]
    assert drawn[0]["legend"][:2] == ["nbsp (n=2)", "sac (n=2)"] and len(drawn[1]["legend"]) == 4


def test_long_setting_labels_are_wrapped():
    label = figures.legend_label("method=nbsp, skill-ratio=0.1, steps-per-task=50000, dpre-per-task=1000", [None] * 3)
    assert max(map(len, label.splitlines())) <= figures.LEGEND_WIDTH and label.endswith("(n=3)")


def test_histogram_default_stage_has_both_outcomes(tmp_path, monkeypatch):
    run_dir = write_run(tmp_path, "nbsp", 1)
    os.makedirs(os.path.join(run_dir, "checkpoints"))
    for stage in (1, 2, 3):  # stage 4 has no checkpoint
        open(os.path.join(run_dir, "checkpoints", f"stage_{stage}.pt"), "wb").close()
    path = os.path.join(run_dir, "metrics.json")
    with open(path) as f:
        metrics = json.load(f)
    for record, share in zip(metrics["stages"], (1.0, 0.0, 0.4, 0.5)):
        record["identify_success_share"] = share
    write_json(path, metrics)
    assert figures.candidate_stages(run_dir) == [3, 1, 2]  # identified on both outcomes first

    episodes = {1: [1.0, 0.0], 2: [1.0, 1.0], 3: [0.0, 0.0]}  # what each stage's episodes give here
    tried = []

    def fake_activations(run_dir, stage, **options):
        tried.append(stage)
        return {"stage": stage, "episode_success": np.array(episodes[stage])}

    monkeypatch.setattr(figures, "neuron_activations", fake_activations)
    assert figures.activations_with_both_outcomes(run_dir)["stage"] == 1 and tried == [3, 1]
    episodes[1] = [1.0, 1.0]
    with pytest.raises(figures.FigureError, match=r"no stage .* both successful and failed episodes "
                                                   r"\(successes: stage 3: 0/2, stage 1: 2/2, stage 2: 2/2\)"):
        figures.activations_with_both_outcomes(run_dir)


def test_skill_ratio_written(tmp_path, capsys):
    base = tmp_path / "ratio"
    for ratio, asr in ((0.1, 0.7), (0.2, 0.9), (0.4, 0.8)):
        for seed in (1, 2):
            write_run(base, "nbsp", seed, skill_ratio=ratio, asr=asr + 0.02 * seed)
    write_run(base, "sac", 1)
    write_run(base, "sac", 2)
    write_run(base, "nbsp", 3, skill_ratio=0.8, complete=False)  # unfinished: left out with a note
    runs = run_folders.find(base)
    groups = figures.group_runs([r for r in runs if r.metrics["complete"]], ignore=("skill_ratio",))
    assert sorted(len(v) for v in groups.values()) == [2, 6]  # sac; nbsp over three ratios
    assert_figures(figures.plot_skill_ratio([base], str(tmp_path / "skill_ratio")))
    assert "left out" in capsys.readouterr().err


@pytest.mark.e2e
def test_histogram_from_tiny_run(tiny_run, tmp_path, monkeypatch):
    drawn = drawn_figures(monkeypatch)
    checkpoint = torch.load(os.path.join(tiny_run, "checkpoints", "stage_1.pt"), weights_only=True)
    data = figures.neuron_activations(tiny_run, stage=1)
    top = int(torch.argmax(checkpoint["scores"]["actor"]))
    assert data["neuron"] == top and data["selected"] and data["score"] == pytest.approx(float(checkpoint["scores"]["actor"][top]))
    assert data["task"] == "reach" and (data["layer"], data["unit"]) == divmod(top, 8)
    assert data["activation"].shape == data["success"].shape == (2 * 500,)  # 2 identification episodes of 500 steps
    assert (data["activation"] >= 0).all()  # post-ReLU
    # a chosen critic neuron on the other task
    assert_figures(figures.plot_histogram(tiny_run, str(tmp_path / "hist"), stage=2, network="qf1", neuron=3, task="reach"))
    assert drawn[0]["overlapping_ticks"] == []


def test_a_resumed_runs_events_read_without_the_purge_warning(tmp_path, caplog):
    """A resumed run's writer restarts at its checkpoint's step (purge_step): the values logged after
    it by the stopped process are dropped, and TensorBoard's purge warning is not shown."""
    first = SummaryWriter(str(tmp_path))
    for step in range(1, 11):
        first.add_scalar("eval/reach/success_rate", 0.0, step)
    first.close()
    # TensorBoard reads a folder's event files in name order, and a name starts with the writer's start
    # time in seconds: a resumed run, a later process, sorts after the stopped one. Two writers of one
    # process in one second sort by a counter compared as text (".10" before ".9"), so the stopped
    # run's file is dated a minute back, as a real stop would have it.
    (stopped,) = os.listdir(tmp_path)
    started = stopped.split(".")[3]
    os.rename(tmp_path / stopped, tmp_path / stopped.replace(f".{started}.", f".{int(started) - 60:010d}.", 1))
    resumed = SummaryWriter(str(tmp_path), purge_step=6)
    for step in range(6, 9):
        resumed.add_scalar("eval/reach/success_rate", 1.0, step)
    resumed.close()
    with caplog.at_level("WARNING"):
        steps, values = figures.read_eval_curves(str(tmp_path))["reach"]
    assert list(steps) == [1, 2, 3, 4, 5, 6, 7, 8] and list(values) == [0.0] * 5 + [1.0] * 3
    assert not [r for r in caplog.records if "out of order" in r.getMessage()]


def test_a_saved_pdf_carries_no_creation_date(tmp_path):
    """A regenerated report's figures change in git only where the runs do."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    png, pdf = figures.save(fig, str(tmp_path / "curve.png"))
    assert os.path.getsize(png) > 0
    with open(pdf, "rb") as f:
        assert b"/CreationDate" not in f.read()
