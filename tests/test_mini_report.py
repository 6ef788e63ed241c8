"""scripts/mini_report.py on synthetic run folders (the figures tests' fixture writer, and a
writer of any task sequence here): the document has the settings table with hand-checkable means,
every run, the notes, the pilot and the further try, and its figures exist; the regime report
has its pair pilot and what each selection protected, by hand."""

import json
import os
import shutil

import pytest

import mini_report
from test_figures import write_json, write_run
from torch.utils.tensorboard import SummaryWriter


def test_report_from_runs(tmp_path):
    for seed in (1, 2):
        write_run(tmp_path / "mini", "sac", seed, asr=0.5 + 0.1 * seed)  # ASR 0.6, 0.7
        write_run(tmp_path / "mini", "nbsp", seed)
    pilot = write_run(tmp_path / "pilot", "sac", 1)
    with open(os.path.join(pilot, "config.json")) as f:
        config = json.load(f)
    config["args"] |= {"batch_size": 8, "learning_starts": 100, "eval_episodes": 2}  # as every real config has
    with open(os.path.join(pilot, "config.json"), "w") as f:
        json.dump(config, f)
    write_run(tmp_path / "wide", "nbsp", 1)
    write_run(tmp_path / "more", "sac", 3, asr=0.9)  # pooled with the grid's sac seeds: ASR 0.6, 0.7, 0.9
    (tmp_path / "notes.md").write_text("Hand-written finding.")
    (tmp_path / "sweep.out").write_text("start line\nreal\t1m2.5s\nend line\n")
    out = tmp_path / "docs" / "results-mini.md"
    assert mini_report.main(["--runs", str(tmp_path / "mini"), "--pilot", str(tmp_path / "pilot"),
                             "--supplement", str(tmp_path / "wide"), "--supplement-command", "python wide.py",
                             "--more-seeds", str(tmp_path / "more"), "--more-seeds-command", "python more.py",
                             "--notes", str(tmp_path / "notes.md"), "--sweep-log", str(tmp_path / "sweep.out"),
                             "--out", str(out)]) == 0
    doc = out.read_text()
    assert "| vanilla SAC | 2 | 0.65 ± 0.05 |" in doc  # mean of 0.6, 0.7; s.e. 0.0707 / sqrt(2) = 0.05
    assert "| NBSP | 2 | 0.85 ± 0.00 |" in doc
    assert doc.count("| sac_r0.2 seed ") == 3 and doc.count("| nbsp_r0.2 seed ") == 3  # the further try and more seeds too
    more = doc.split("## More seeds for some settings")[1].split("\n## ")[0]
    assert "python more.py" in more and "(seeds 1, 2, 3)" in more
    assert "| vanilla SAC | 3 | 0.73 ± 0.09 |" in more and "NBSP" not in more  # mean 0.7333; s.e. 0.1528 / sqrt(3) = 0.088
    assert "| sac_r0.2 seed 3 |" in more
    assert "Hand-written finding." in doc and "python wide.py" in doc
    assert "Sweep wall time (`time`): 1m2.5s" in doc
    assert "python scripts/sweep.py --preset mini --jobs 2\n" in doc  # the default command of --runs
    assert "Settings: nbsp_r0.2, sac_r0.2. " in doc  # the settings that ran, not the whole preset
    assert f"python scripts/mini_report.py --runs {tmp_path / 'mini'} --pilot" in doc and f"--out {out}" in doc  # as run
    assert "## How the task pair was chosen" in doc and "| reach |" in doc
    assert "| vanilla SAC | 2 | 0.25 / 3.0 | 0.25 / 3.0 | 0.25 / 3.0 | 0.25 / 3.0 |" in doc  # the plasticity table
    for name in ("results-mini-curves", "results-mini-pilot", "results-mini-supplement-curves"):
        for ext in ("png", "pdf"):
            assert os.path.getsize(out.parent / f"{name}.{ext}") > 0


def test_report_names_the_command_that_made_its_runs(tmp_path):
    write_run(tmp_path / "runs", "nbsp", 1)
    out = tmp_path / "report.md"
    command = "python scripts/sweep.py --preset mini --settings nbsp --seeds 1 --jobs 1 --threads 1"
    assert mini_report.main(["--runs", str(tmp_path / "runs"), "--runs-command", command, "--out", str(out)]) == 0
    block = out.read_text().split("## Command")[1].split("## Machine")[0]
    assert command in block and "--jobs 2" not in block


def test_identification_table_by_hand():
    """Per setting: constant-goal windows, dead units among the selected, mean success share."""
    class Run:
        def __init__(self, name, stages):
            self.args, self.metrics = {"exp_name": name}, {"stages": stages}

    def stage(constant, dead, share):
        return {"goal_constant": constant, "identify_success_share": share, "skill_neurons": {"actor": 10, "qf1": 10},
                "selection": {"actor": {"selected_dead": dead}, "qf1": {"selected_dead": 0}}}

    runs = [Run("nbsp", [stage(True, 4, 0.0), stage(False, 0, 0.5)]), Run("nbsp", [stage(False, 2, 1.0)]),
            Run("sac", [{"env_steps": 5}])]  # no identification: no row
    lines = mini_report.identification_table(runs, lambda args: args["exp_name"])
    assert lines[2:] == ["| nbsp | 2 | 1 of 3 | 6 of 60 | 0.50 |"]


def test_plasticity_table_by_hand():
    """Per setting and stage: mean actor dormant share / mean qf1 feature rank over runs."""
    class Run:
        def __init__(self, name, measured):
            self.args = {"exp_name": name}
            self.metrics = {"stages": [{"plasticity": {"actor": {"dormant_ratio": d}, "qf1": {"feature_rank": r}}}
                                       for d, r in measured]}

    runs = [Run("sac", [(0.5, 2), (0.6, 3)]), Run("sac", [(0.3, 5), (0.2, 4)]), Run("nbsp", [(0.1, 9), (0.0, 8)])]
    lines = mini_report.plasticity_table(runs, lambda args: args["exp_name"])
    assert lines[0] == "| setting | runs | after stage 1 | after stage 2 |"
    assert lines[2:] == ["| nbsp | 1 | 0.10 / 9.0 | 0.00 / 8.0 |", "| sac | 2 | 0.40 / 3.5 | 0.40 / 3.5 |"]


@pytest.mark.parametrize("argv, expected", [
    (["--runs", "{tmp}/missing"], "--runs '{tmp}/missing' does not exist"),
    (["--runs", "{tmp}", "--more-seeds", "{tmp}/missing"], "--more-seeds '{tmp}/missing' does not exist"),
    (["--runs", "{tmp}", "--more-seeds-command", "python more.py"], "--more-seeds-command describes the runs of --more-seeds, which is not given"),
    (["--runs", "{tmp}", "--supplement-command", "python wide.py"], "--supplement-command describes the runs of --supplement"),
    (["--preset", "regime", "--pilot-only", "--pilot", "{tmp}", "--runs-command", "python sweep.py"],
     "--runs-command describes the runs of --runs, which is not given"),
    (["--runs", "{tmp}", "--pilot-command", "python pilot.py"], "--pilot-command describes the runs of --pilot, which is not given"),
    (["--preset", "regime", "--pilot-only", "--pilot", "{tmp}", "{tmp}/nowhere"], "--pilot '{tmp}/nowhere' does not exist"),
    (["--runs", "{tmp}", "--threshold", "1.5"], "--threshold must be in (0, 1], got 1.5"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--runs", "{tmp}"], "no metrics.json under '{tmp}'"),
])
def test_bad_input_stops_with_one_line_and_writes_nothing(argv, expected, tmp_path, capsys):
    out = tmp_path / "docs" / "results-mini.md"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert mini_report.main([*argv, "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected.replace("{tmp}", str(tmp_path)) in lines[0]
    assert not out.parent.exists()


# --------------------------------------------------------------------------------------------
# The regime report: any two-task sequence, a pilot of vanilla SAC on pairs
# --------------------------------------------------------------------------------------------
PAIR = ["window-open", "window-close"]
STAGE_STEPS, EVAL_EVERY = 1000, 250


def write_sequence_run(runs_dir, exp_name, seed, cycles, curves, sr, args=None, stage_records=None):
    """A run folder of `PAIR` x `cycles`: `curves[task]` holds its evaluation success at every
    EVAL_EVERY steps (4 per stage), `sr` its success matrix, `stage_records` extra keys per stage."""
    stage_tasks = PAIR * cycles
    run_name = f"{'+'.join(PAIR)}__{exp_name}__{seed}"
    run_dir = os.path.join(runs_dir, run_name)
    os.makedirs(run_dir)
    args = {"seed": seed, "exp_name": exp_name, "runs_dir": str(runs_dir), "cuda": False, "tasks": PAIR,
            "cycles": cycles, "steps_per_task": STAGE_STEPS, "eval_every": EVAL_EVERY, "eval_episodes": 10,
            "hidden": [256, 256], "batch_size": 128, "early_stop_success": 1.0, "method": "sac",
            "dormant_threshold": 0.025, **(args or {})}
    write_json(os.path.join(run_dir, "config.json"), {"run_name": run_name, "args": args, "stage_tasks": stage_tasks})
    writer = SummaryWriter(run_dir)
    for task, values in curves.items():
        for i, value in enumerate(values):
            writer.add_scalar(f"eval/{task}/success_rate", value, (i + 1) * EVAL_EVERY)
    writer.close()
    stages = [{"stage": k + 1, "task": task, "env_steps": STAGE_STEPS, "budget_steps": STAGE_STEPS,
               "early_stopped": False, "wall_seconds": 60.0,
               "plasticity": {net: {"dormant_ratio": 0.5, "feature_rank": 7, "weight_magnitude": 0.1}
                              for net in ("actor", "qf1", "qf2")}, **(stage_records or {})}
              for k, task in enumerate(stage_tasks)]
    final = sr[-1]
    write_json(os.path.join(run_dir, "metrics.json"),
               {"run_name": run_name, "stage_tasks": stage_tasks, "complete": True, "sr": sr, "stages": stages,
                "ASR": sum(final) / len(final), "FM": sr[0][0] - sr[1][0], "FWT": 0.9})
    return run_dir


def test_protection_table_by_hand():
    """Per run, the dead share of the selected units and their live units' mean mask (weighted by
    live units) over the selections whose masks acted, not the last stage's; then mean ± s.e."""
    class Run:
        def __init__(self, name, stages):
            self.args, self.metrics = {"exp_name": name}, {"stages": stages, "stage_tasks": ["a", "b"][:len(stages)]}

    stage = {"skill_neurons": {"actor": 10, "qf1": 10},
             "selection": {"actor": {"selected_dead": 4, "selected_live_mask_mean": 0.1},
                           "qf1": {"selected_dead": 2, "selected_live_mask_mean": 0.3}}}
    half_dead = {"skill_neurons": {"actor": 10, "qf1": 10},
                 "selection": {"actor": {"selected_dead": 0, "selected_live_mask_mean": 0.5},
                               "qf1": {"selected_dead": 10, "selected_live_mask_mean": None}}}
    last = {"skill_neurons": {"actor": 10}, "selection": {"actor": {"selected_dead": 10, "selected_live_mask_mean": None}}}
    old = {"skill_neurons": {"actor": 10}, "selection": {"actor": {"selected_dead": 1}}}  # before the statistic
    runs = [Run("random", [stage, last]), Run("random", [half_dead, last]), Run("goal", [old, last]),
            Run("sac", [{"env_steps": 5}, {"env_steps": 5}])]
    lines = mini_report.protection_table(runs, lambda args: args["exp_name"])
    # random: 6 of 20 dead, live 6 x 0.1 + 8 x 0.3 over 14 = 0.2143; 10 of 20 dead, live 0.5; the last
    # stage's selection not counted. Dead share (0.3 + 0.5) / 2 = 0.40, s.e. 0.1414 / sqrt(2) = 0.10;
    # mask (0.2143 + 0.5) / 2 = 0.357, s.e. 0.2020 / sqrt(2) = 0.143
    assert lines[2:] == ["| goal | 1 | 10 | 0.10 | n/a |", "| random | 2 | 40 | 0.40 ± 0.10 | 0.357 ± 0.143 |"]
    # a run whose acting picks were all dead counts in the dead share (0.3, 0.5, 1.0: 0.60, s.d. sqrt(0.13),
    # s.e. 0.21) but has no live mean: the mask's mean stays over the other two, and says so
    runs += [Run("random", [last, last]), Run("hard", [last, last])]
    lines = mini_report.protection_table(runs, lambda args: args["exp_name"])
    assert lines[2:] == ["| goal | 1 | 10 | 0.10 | n/a |", "| hard | 1 | 10 | 1.00 | no live pick |",
                         "| random | 3 | 50 | 0.60 ± 0.21 | 0.357 ± 0.143 (over 2 runs; the others' acting picks were all dead) |"]


def test_difference_table_by_hand():
    """A's mean minus B's with a percentile-bootstrap interval: with A's runs 0.2, 0.4, 0.6 and B's
    all 0.1, a resampled mean of A is 0.2 (three 0.2s) or 0.6 with probability 1/27 = 3.7% each, more
    than 2.5%: the interval is [0.2 - 0.1, 0.6 - 0.1]. Fewer than 3 runs a side: no interval; a pair
    with a setting that did not run: no row."""
    class Run:
        def __init__(self, name, value):
            self.args, self.metrics = {"exp_name": name, "method": "nbsp"}, {"FM": value, "FWT": 1.0}

    runs = [Run("a", 0.2), Run("a", 0.4), Run("a", 0.6), *(Run("b", 0.1) for _ in range(3)), Run("c", 0.5), Run("c", 0.7)]
    lines = mini_report.difference_table(runs, [("a", "b"), ("c", "b"), ("a", "missing")], ["FM", "FWT"])
    assert lines[0] == "| A − B | runs of A / B | FM difference [95% CI] | FWT difference [95% CI] |"
    assert lines[2:] == ["| NBSP − NBSP | 3 / 3 | +0.30 [+0.10, +0.50] | +0.00 [+0.00, +0.00] |",
                         "| NBSP − NBSP | 2 / 3 | +0.50 | +0.00 |"]
    assert mini_report.difference_table(runs, [("a", "missing")], ["FM"]) == []


def test_machine_lines_count_the_runs_of_each_machine():
    class Run:
        def __init__(self, config):
            self.config = config

    cpu = {"cpu": "AMD EPYC", "cores": 2, "cpu_capability": "AVX2", "threads": 1, "gpu": None, "os": "Linux"}
    gpu = {key: value for key, value in cpu.items() if key != "cpu_capability"} | {"cores": 16, "gpu": "NVIDIA H200"}
    versions = {"torch": "2.13.0"}
    runs = [Run({"machine": cpu, "versions": versions}), Run({"machine": cpu, "versions": versions}),
            Run({"machine": cpu, "resumes": [{"machine": gpu}], "versions": versions}), Run({"versions": versions})]
    lines = mini_report.machine_lines(runs)
    assert lines[0] == "- Machine: AMD EPYC (AVX2), 2 cores, 1 torch thread(s), no GPU (3 runs)"
    # a resume's machine, recorded before config.json had `cpu_capability`
    assert lines[1] == "- Machine: AMD EPYC, 16 cores, 1 torch thread(s), NVIDIA H200 (1 run)"
    assert lines[2].startswith("- Machine of 1 run(s): not recorded")
    assert lines[3] == "- Versions: torch 2.13.0 (4 runs)"


def test_regime_report_with_a_pair_pilot(tmp_path):
    sr = [[1.0, None], [0.2, 1.0], [1.0, 0.4], [0.0, 1.0]]  # ASR 0.5
    forgets = {"window-open": [0.5, 1, 1, 1, 0, 0, 0, 0] * 2, "window-close": [0, 0, 0, 0, 0.5, 1, 1, 1] * 2}
    selection = {"skill_neurons": {"actor": 10, "qf1": 10}, "goal_constant": False, "identify_success_share": 0.5,
                 "selection": {"actor": {"selected_dead": 4, "selected_live_mask_mean": 0.1},
                               "qf1": {"selected_dead": 2, "selected_live_mask_mean": 0.3}}}
    for seed in (1, 2):
        write_sequence_run(tmp_path / "regime", "sac", seed, 2, forgets, sr)
        write_sequence_run(tmp_path / "regime", "identify-random-balanced", seed, 2, forgets, sr,
                           {"method": "nbsp", "identify": "random", "goal_score": "balanced"}, selection)
    # pilot: seed 1 learns A at 750 steps and B 500 steps into stage 2, then A drops 1.0 -> 0.0;
    # seed 2 never reaches 0.9 on A in stage 1 (0.8), reaches B at 1000 and keeps A at 0.4 of 0.8
    write_sequence_run(tmp_path / "pilot", "sac", 1, 1, {"window-open": [0.2, 0.5, 0.9, 1.0, 0.6, 0.3, 0.1, 0.0],
                                                         "window-close": [0, 0, 0, 0, 0.3, 0.95, 1.0, 1.0]},
                       [[1.0, None], [0.0, 1.0]])
    write_sequence_run(tmp_path / "pilot", "sac", 2, 1, {"window-open": [0.1, 0.2, 0.5, 0.8, 0.8, 0.6, 0.5, 0.4],
                                                         "window-close": [0, 0, 0, 0, 0.1, 0.2, 0.5, 0.9]},
                       [[0.8, None], [0.4, 0.9]])
    (tmp_path / "notes.md").write_text("Findings from the numbers.")
    out = tmp_path / "docs" / "results-regime.md"
    assert mini_report.main(["--preset", "regime", "--runs", str(tmp_path / "regime"), "--pilot", str(tmp_path / "pilot"),
                             "--notes", str(tmp_path / "notes.md"), "--out", str(out)]) == 0
    doc = out.read_text()
    assert doc.startswith("# In the paper's regime") and "python scripts/sweep.py --preset regime --jobs 2" in doc
    assert "Sequence: window-open -> window-close, 2 cycles (4 stages)" in doc and "Seeds 1, 2." in doc
    assert "Settings: sac, identify-random-balanced. " in doc  # the preset's settings that ran, in its order
    assert "| vanilla SAC | 2 | 0.50 ± 0.00 |" in doc and "| NBSP (identify=random, goal_score=balanced) | 2 |" in doc
    assert "Interquartile mean with 95% stratified-bootstrap CIs" in doc
    assert "| sac seed 1 | 1.00; 0.20 1.00; 1.00 0.40; 0.00 1.00 | 0.500 | 0.800 |" in doc  # the success matrix
    assert "(`*`: the stage stopped early at 1.0 training success; held: " in doc
    assert "(4 identification windows per run)" in doc
    assert "| NBSP (identify=random, goal_score=balanced) | 2 | 0 of 8 | 48 of 160 | 0.50 |" in doc
    # 3 windows whose masks acted per run (the 4th is the last stage's), each as in the first run of the test above
    assert "| NBSP (identify=random, goal_score=balanced) | 2 | 120 | 0.30 ± 0.00 | 0.214 ± 0.000 |" in doc
    assert "| vanilla SAC | 2 | 0.50 / 7.0 | 0.50 / 7.0 | 0.50 / 7.0 | 0.50 / 7.0 |" in doc
    assert "Findings from the numbers." in doc and "## How the task pair was chosen" in doc
    assert "Pilot runs (seeds 1, 2; each pair's below), made by:\n\n```bash\npython scripts/sweep.py --preset regime-pilot\n```" in doc
    assert "evaluation success at least 0.9 within the task's own stage" in doc  # the regime's threshold
    assert "in at least 4 of 5 seeds, FWT at least 0.9 and FM at least 0.5" in doc  # and its bar
    # A learned in 1 of 2, B in 2 of 2; A after A (1.0 + 0.8) / 2, after B (0.0 + 0.4) / 2, FM (1.0 + 0.4) / 2
    assert "| window-open -> window-close | 1 | 2 | 1 of 2 | 2 of 2 | 0.90 | 0.20 | 0.70 | 0.90 |" in doc
    assert "| window-open -> window-close | 1 | 1 | 750 | 500 | 0.25k: 0.20, 0.5k: 0.50, 0.75k: 0.90, 1k: 1.00, 1.25k: 0.60," in doc
    assert "| window-open -> window-close | 1 | 2 | no | 1,000 |" in doc
    assert "![pilot](results-regime-pilot-window-open-window-close.png)" in doc
    for name in ("results-regime-curves", "results-regime-pilot-window-open-window-close"):
        for ext in ("png", "pdf"):
            assert os.path.getsize(out.parent / f"{name}.{ext}") > 0


def test_pilot_only_report_before_the_grid(tmp_path):
    # seed 1 complete (A learned, then forgotten); seed 2 still running: no metrics.json yet
    write_sequence_run(tmp_path / "pilot", "sac", 1, 1, {"window-open": [0.2, 0.5, 0.9, 1.0, 0.6, 0.3, 0.1, 0.0],
                                                         "window-close": [0, 0, 0, 0, 0.3, 0.95, 1.0, 1.0]},
                       [[1.0, None], [0.0, 1.0]])
    write_sequence_run(tmp_path / "more", "sac", 2, 1, {"window-open": [0.1] * 8, "window-close": [0.0] * 8},
                       [[0.1, None], [0.1, 0.0]])
    unfinished = next(p for p in (tmp_path / "more").iterdir() if "__sac__2" in p.name)
    os.remove(unfinished / "metrics.json")
    out = tmp_path / "docs" / "results-regime.md"
    assert mini_report.main(["--preset", "regime", "--pilot-only", "--pilot", str(tmp_path / "pilot"), str(tmp_path / "more"),
                             "--pilot-command", "python a.py", "--pilot-command", "python b.py", "--out", str(out)]) == 0
    doc = out.read_text()
    assert "Status: only the pilot has run; the grid (`python scripts/sweep.py --preset regime`) has not." in doc
    assert "## Results" not in doc and "Pilot runs (seeds 1; each pair's below), made by:\n\n```bash\npython a.py\npython b.py\n```" in doc
    assert "| window-open -> window-close | 1 | 1 | 1 of 1 | 1 of 1 | 1.00 | 0.00 | 1.00 |" in doc
    assert "(1 unfinished pilot run(s) left out.)" in doc


def test_pilot_runs_with_and_without_the_early_stop_are_told_apart(tmp_path):
    # the same pair with two protocols: a row, a curve row and a figure each, the early stop named
    curves = {"window-open": [0.2, 0.5, 0.9, 1.0, 0.6, 0.3, 0.1, 0.0], "window-close": [0, 0, 0, 0, 0.3, 0.95, 1.0, 1.0]}
    write_sequence_run(tmp_path / "pilot", "sac", 1, 1, curves, [[1.0, None], [0.0, 1.0]])
    write_sequence_run(tmp_path / "pilot", "sac_full-stage", 1, 1, curves, [[0.9, None], [0.2, 1.0]],
                       args={"early_stop_success": 0.0})
    out = tmp_path / "docs" / "results-regime.md"
    assert mini_report.main(["--preset", "regime", "--pilot-only", "--pilot", str(tmp_path / "pilot"), "--out", str(out)]) == 0
    doc = out.read_text()
    assert "| window-open -> window-close | 1 | 1 | 1 of 1 | 1 of 1 | 1.00 | 0.00 | 1.00 |" in doc
    assert "| window-open -> window-close | 0 | 1 | 1 of 1 | 1 of 1 | 0.90 | 0.20 | 0.70 |" in doc
    assert "| window-open -> window-close | 0 | 1 | 750 | 500 |" in doc
    for stop in ("1", "0"):
        assert f"results-regime-pilot-window-open-window-close-early-stop-{stop}.png" in doc


@pytest.mark.parametrize("extra", [[], ["--runs", "RUNS"], ["--seeds", "1", "2"]])
def test_pilot_only_needs_the_pilot_alone(tmp_path, capsys, extra):
    (tmp_path / "RUNS").mkdir()
    argv = ["--preset", "regime", "--pilot-only", "--out", str(tmp_path / "r.md")]
    argv += [str(tmp_path / a) if a == "RUNS" else a for a in extra]
    if extra:
        (tmp_path / "pilot").mkdir()
        argv += ["--pilot", str(tmp_path / "pilot")]
    assert mini_report.main(argv) == 2
    assert "--pilot-only reports the --pilot runs alone" in capsys.readouterr().err
    assert not (tmp_path / "r.md").exists()


def test_a_grid_still_running_says_what_is_complete(tmp_path):
    sr = [[1.0, None], [0.2, 1.0], [1.0, 0.4], [0.0, 1.0]]
    curves = {"window-open": [1.0] * 16, "window-close": [0.0] * 16}
    for seed in (2, 1):
        write_sequence_run(tmp_path / "regime", "sac", seed, 2, curves, sr, {"early_stop_success": 0.0})
    write_sequence_run(tmp_path / "regime", "nbsp", 1, 2, curves, sr, {"method": "nbsp", "early_stop_success": 0.0})
    halfway = write_sequence_run(tmp_path / "regime", "only-replay", 1, 2, curves, sr, {"method": "nbsp"})
    with open(os.path.join(halfway, "metrics.json")) as f:
        metrics = json.load(f)
    write_json(os.path.join(halfway, "metrics.json"), metrics | {"complete": False, "stages": metrics["stages"][:2]})
    started = write_sequence_run(tmp_path / "regime", "nbsp", 2, 2, curves, sr, {"method": "nbsp"})
    os.remove(os.path.join(started, "metrics.json"))  # before its first stage ended
    out = tmp_path / "report.md"
    assert mini_report.main(["--preset", "regime", "--runs", str(tmp_path / "regime"), "--out", str(out)]) == 0
    doc = out.read_text()
    assert ("**Not the whole grid.** 3 complete runs, the seeds of each setting: sac: 1, 2; nbsp: 1. "
            "No complete run yet: only-replay, only-mask, hard-mask, goal-balanced, identify-random-balanced, "
            "identify-activation-balanced. Unfinished in the folder: nbsp seed 2 (0 of 4 stages done); only-replay "
            "seed 1 (2 of 4 stages done). Every table and figure below counts the complete runs only.") in doc
    assert "| vanilla SAC | 2 |" in doc and "only-replay seed" not in doc.split("## Command")[1]
    assert "Every run (no early stop: every stage to its budget; held: " in doc
    # the sweep's seeds reach the status line through the command line
    assert mini_report.main(["--preset", "regime", "--runs", str(tmp_path / "regime"), "--seeds", "1", "2",
                             "--out", str(out)]) == 0
    assert "**Not the whole grid.** 3 of its 16 runs complete (8 settings x seeds 1, 2), the seeds of each " in out.read_text()


def test_a_finished_grid_has_no_status_line():
    runs = [type("Run", (), {"complete": True, "args": {"exp_name": name, "seed": seed}, "metrics": {}, "stage_tasks": []})
            for name in ("sac", "nbsp") for seed in (1, 2)]
    assert mini_report.grid_status(runs, ["sac", "nbsp"]) == []
    assert mini_report.grid_status(runs[:3], ["sac", "nbsp"])[0].startswith("**Not the whole grid.** 3 ")
    assert mini_report.grid_status(runs, ["sac", "nbsp"], [1, 2]) == []
    # equal seeds in every setting, but not the seeds the grid is meant to have
    assert mini_report.grid_status(runs, ["sac", "nbsp"], [1, 2, 3])[0].startswith(
        "**Not the whole grid.** 4 of its 6 runs complete (2 settings x seeds 1, 2, 3), the seeds of each "
        "setting: sac: 1, 2; nbsp: 1, 2. Every table")


def test_stage_one_is_compared_between_the_settings_of_each_seed(tmp_path):
    sr = [[1.0, None], [0.2, 1.0], [1.0, 0.4], [0.0, 1.0]]
    curves = {"window-open": [1.0] * 16, "window-close": [0.0] * 16}
    for seed, nbsp_magnitude in ((1, 0.1), (2, 0.10000001)):
        for name, magnitude in (("sac", 0.1), ("nbsp", nbsp_magnitude)):
            run_dir = write_sequence_run(tmp_path, name, seed, 2, curves, sr, {"method": "nbsp"})
            with open(os.path.join(run_dir, "metrics.json")) as f:
                metrics = json.load(f)
            metrics["stages"][0]["plasticity"]["qf2"]["weight_magnitude"] = magnitude
            metrics["stages"][1]["plasticity"]["qf2"]["weight_magnitude"] = 0.5 if name == "sac" else 0.7  # stage 2 differs
            write_json(os.path.join(run_dir, "metrics.json"), metrics)
    write_sequence_run(tmp_path, "sac", 3, 2, curves, sr)  # a seed with one setting: nothing to compare
    runs = mini_report.complete_runs([tmp_path])
    assert mini_report.stage_one_agreement(runs) == [
        "Stage 1 comes before any setting's masks or Dpre act. Its length, the success after it and the plasticity "
        "diagnostics at its end (every network's weight magnitude, dormant share and feature rank) compared between "
        "the settings of each seed: the same in every setting for seed 1; different for seed 2 (nbsp | sac) "
        "(groups of equal settings).", ""]
    assert mini_report.stage_one_agreement(runs[-1:]) == []


def test_retention_table_by_hand(tmp_path):
    """The tasks a stage does not train, averaged over its evaluations, then over runs."""
    sr = [[1.0, None], [0.2, 1.0], [1.0, 0.4], [0.0, 1.0]]
    # 4 evaluations per stage; window-open is off in stages 2 and 4, window-close in stage 3
    open_by_seed = {1: [1, 1, 1, 1] + [1, 0.5, 0.5, 0] + [1] * 4 + [0.2] * 4,
                    2: [1, 1, 1, 1] + [1, 1, 1, 1] + [1] * 4 + [0.0] * 4}
    close = [0] * 4 + [1] * 4 + [0.9, 0.5, 0.3, 0.1] + [1] * 4
    for seed in (1, 2):
        write_sequence_run(tmp_path, "sac", seed, 2, {"window-open": open_by_seed[seed], "window-close": close}, sr)
    lines = mini_report.retention_table(mini_report.complete_runs([tmp_path]), lambda args: args["exp_name"])
    assert lines[0] == "| setting | runs | during stage 2 (window-close) | during stage 3 (window-open) | during stage 4 (window-close) |"
    # stage 2: seeds 0.5 and 1.0 -> 0.75 ± 0.25; stage 3: 0.45 both -> 0.45 ± 0.00; stage 4: 0.2 and 0.0 -> 0.10 ± 0.10
    assert lines[2:] == ["| sac | 2 | 0.75 ± 0.25 | 0.45 ± 0.00 | 0.10 ± 0.10 |"]
    # each run's own values, in the per-run table
    rows = mini_report.per_run_table(mini_report.complete_runs([tmp_path]))
    assert [row.split(" | ")[5] for row in rows[2:]] == ["0.50 0.45 0.20", "1.00 0.45 0.00"]


def test_a_rerun_of_a_config_and_seed_counts_once_in_every_table(tmp_path):
    """Two complete runs of one config and seed (a rerun): the settings table keeps the later
    (paper_tables.load_runs), and so does every other table of the report."""
    first = write_run(tmp_path / "runs", "sac", 1)
    os.rename(first, first + "__1000")
    shutil.copytree(first + "__1000", first + "__2000")
    write_run(tmp_path / "runs", "nbsp", 1)
    assert [os.path.basename(run.path) for run in mini_report.counted_runs(str(tmp_path / "runs"))] == [
        "reach+drawer-close__nbsp_r0.2__1", "reach+drawer-close__sac_r0.2__1__2000"]
    out = tmp_path / "report.md"
    assert mini_report.main(["--runs", str(tmp_path / "runs"), "--out", str(out)]) == 0
    doc = out.read_text()
    assert doc.count("| sac_r0.2 seed 1 |") == 1  # the per-run table
    assert "| vanilla SAC | 1 | 0.25 / 3.0 |" in doc  # the plasticity table counts one run
    assert "for 2 complete runs" in doc  # the wall time
