"""scripts/mini_report.py on synthetic run folders (the figures tests' fixture writer): the
document has the settings table with hand-checkable means, every run, the notes, the pilot and
the further try, and its figures exist."""

import json
import os

import pytest

import mini_report
from test_figures import write_run


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
    assert f"python scripts/mini_report.py --runs {tmp_path / 'mini'} --pilot" in doc and f"--out {out}" in doc  # as run
    assert "## How the task pair was chosen" in doc and "| reach |" in doc
    assert "| vanilla SAC | 2 | 0.25 / 3.0 | 0.25 / 3.0 | 0.25 / 3.0 | 0.25 / 3.0 |" in doc  # the plasticity table
    for name in ("results-mini-curves", "results-mini-pilot", "results-mini-supplement-curves"):
        for ext in ("png", "pdf"):
            assert os.path.getsize(out.parent / f"{name}.{ext}") > 0


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
