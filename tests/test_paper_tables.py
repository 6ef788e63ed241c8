"""scripts/paper_tables.py: paper tables, the generic settings table and rliable's IQM from run folders.

Every expected number is written out literally and computed by hand: mean and standard error
(sample std, ddof=1, over sqrt(n)) of the fixture values below, rounded to two decimals.
"""
import json
import os
import subprocess
import sys

import pytest

import paper_tables

SCRIPT = paper_tables.__file__

WINDOW = ["window-open", "window-close"]
STAMP = [1_700_000_000]


def write_run(root, seed, scores, tasks=WINDOW, exp_name="x", complete=True, env="metaworld", **args):
    """A run folder as the training scripts write it: config.json (args) and metrics.json."""
    STAMP[0] += 1
    key = "games" if env == "atari" else "tasks"
    run_name = f"{'+'.join(tasks)}__{exp_name}__{seed}__{STAMP[0]}"
    folder = os.path.join(root, run_name)
    os.makedirs(folder)
    cycles = args.pop("cycles", 2)
    stage_tasks = [t.removesuffix("-v3") for t in tasks] * cycles
    H = len(stage_tasks)
    config = {"run_name": run_name, "stage_tasks": stage_tasks,
              "args": {key: list(tasks), "cycles": cycles, "seed": seed, "exp_name": exp_name, "runs_dir": str(root),
                       **args}}
    done = H if complete else H // 2
    sr = [[0.5] * (i + 1) + [None] * (H - i - 1) for i in range(done)] + [[None] * H] * (H - done)
    metric_names = ("AR", "FM", "FWT") if env == "atari" else ("ASR", "FM", "FWT")
    metrics = {"run_name": run_name, "stage_tasks": stage_tasks, "complete": complete, "sr": sr,
               **dict(zip(metric_names, scores)), "stages": []}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        json.dump(metrics, f)
    return folder


# ASR, FM, FWT of 3 seeds of each setting
SAC = [(0.5, 0.9, 1.0), (0.6, 0.8, 1.0), (0.7, 0.7, 1.0)]   # 0.60 ± 0.06, 0.80 ± 0.06, 1.00 ± 0.00
NBSP = [(0.8, 0.1, 0.9), (0.9, 0.2, 1.0), (1.0, 0.3, 1.0)]  # 0.90 ± 0.06, 0.20 ± 0.06, 0.97 ± 0.03


@pytest.fixture
def runs_dir(tmp_path):
    root = tmp_path / "runs"
    for seed, s in enumerate(SAC, 1):
        write_run(root, seed, s, exp_name="nbsp", method="sac")  # a misleading exp_name: the args decide
    for seed, s in enumerate(NBSP, 1):
        write_run(root, seed, s, exp_name="sac", method="nbsp")
    return root


def lines_with(text, *needles):
    return [line for line in text.splitlines() if all(n in line for n in needles)]


def test_table9_means_standard_errors_and_paper_values(runs_dir):
    out = paper_tables.paper_table(paper_tables.load_runs([runs_dir]), 9)
    assert "Table 9" in out and "window-open → window-close" in out
    assert lines_with(out, "| vanilla SAC | 3 | 0.60 ± 0.06 | 0.63 ± 0.02 | 0.80 ± 0.06 | 0.91 ± 0.10 | "
                           "1.00 ± 0.00 | 0.97 ± 0.02 |")
    assert lines_with(out, "| NBSP | 3 | 0.90 ± 0.06 | 0.90 ± 0.04 | 0.20 ± 0.06 | 0.18 ± 0.01 | "
                           "0.97 ± 0.03 | 0.96 ± 0.02 |")
    assert "†" not in out


def test_table1_cells_show_paper_value_and_seeds(runs_dir):
    out = paper_tables.paper_table(paper_tables.load_runs([runs_dir]), "1")
    header = lines_with(out, "Cycling sequential tasks")[0]
    assert header.index("vanilla SAC") < header.index("NBSP")
    assert lines_with(out, "| window-open → window-close | ASR ↑ | 0.60 ± 0.06 (paper 0.63 ± 0.02) | "
                           "0.90 ± 0.06 (paper 0.90 ± 0.04) |")
    assert lines_with(out, "| FM ↓ | 0.80 ± 0.06 (paper 0.91 ± 0.10) | 0.20 ± 0.06 (paper 0.18 ± 0.01) |")
    assert lines_with(out, "|  | seeds | 3 | 3 |")
    # the paper tables without a matching run print nothing
    runs = paper_tables.load_runs([runs_dir])
    assert paper_tables.paper_table(runs, 2) is None and paper_tables.paper_table(runs, 5) is None


def test_missing_seed_is_marked_and_incomplete_run_excluded(tmp_path):
    root = tmp_path / "runs"
    for seed, s in enumerate(SAC, 1):
        write_run(root, seed, s, method="sac")
    write_run(root, 1, (0.8, 0.1, 1.0))
    write_run(root, 2, (0.9, 0.3, 1.0))
    killed = write_run(root, 3, (0.0, 0.0, 0.0), complete=False)   # would pull the mean down
    runs = paper_tables.load_runs([root])
    out = paper_tables.paper_table(runs, 9)
    # NBSP over seeds 1, 2 only: ASR 0.85 ± 0.05, FM 0.20 ± 0.10, FWT 1.00 ± 0.00
    assert lines_with(out, "| NBSP | 2† | 0.85 ± 0.05† | 0.90 ± 0.04 | 0.20 ± 0.10† | 0.18 ± 0.01 | "
                           "1.00 ± 0.00† |")
    assert lines_with(out, "† NBSP: 2 seeds (1, 2), not counted 3 (incomplete (2/4 stages)); "
                           "this table's most common count is 3")
    # a killed seed is marked even where no other setting of the table has more seeds
    t3 = paper_tables.paper_table(runs, 3)
    assert lines_with(t3, "| goal (NBSP) | 2† | 0.85 ± 0.05† |")
    assert lines_with(t3, "† window-open → window-close, goal (NBSP): 2 seeds (1, 2), not counted 3 (incomplete")
    assert lines_with(out, "| vanilla SAC | 3 | 0.60 ± 0.06 |")
    full = paper_tables.report(runs, ["9"])
    assert lines_with(full, os.path.basename(killed), "incomplete (2/4 stages)")
    assert "Not counted (1 run)" in full
    write_run(root, 3, (0.7, 0.7, 1.0), method="sac")   # a rerun of a counted seed is no missing seed
    out = paper_tables.paper_table(paper_tables.load_runs([root]), 9)
    assert lines_with(out, "| vanilla SAC | 3 | 0.60 ± 0.06 |") and "† vanilla SAC" not in out


def test_different_configs_are_not_averaged(runs_dir):
    for seed in (1, 2, 3):
        write_run(runs_dir, seed, (0.3, 0.5, 0.6), method="nbsp", steps_per_task=50_000)
    out = paper_tables.paper_table(paper_tables.load_runs([runs_dir]), 9)
    assert lines_with(out, "| NBSP [steps_per_task=1000000] | 3 | 0.90 ± 0.06 |")
    assert lines_with(out, "| NBSP [steps_per_task=50000] | 3 | 0.30 ± 0.00 |")
    assert lines_with(out, "| vanilla SAC [steps_per_task=1000000] | 3 | 0.60 ± 0.06 |")
    # Table 1 splits the task sequence into one block per differing general flag
    t1 = paper_tables.paper_table(paper_tables.load_runs([runs_dir]), 1)
    assert lines_with(t1, "| window-open → window-close [steps_per_task=50000] | ASR ↑ | "
                          "– (paper 0.63 ± 0.02) | 0.30 ± 0.00 (paper 0.90 ± 0.04) |")


def test_setting_from_args_not_exp_name(tmp_path):
    root = tmp_path / "runs"
    write_run(root, 1, (0.1, 0.2, 0.3), exp_name="nbsp", mask=False, replay=False)
    write_run(root, 1, (0.2, 0.2, 0.3), exp_name="nbsp", mask=False)
    write_run(root, 1, (0.3, 0.2, 0.3), exp_name="nbsp", replay=False)
    write_run(root, 1, (0.4, 0.2, 0.3), exp_name="nbsp", hard_mask=True)
    write_run(root, 1, (0.5, 0.2, 0.3), exp_name="sac")                      # no method: NBSP
    write_run(root, 1, (0.6, 0.2, 0.3), exp_name="ratio", skill_ratio=0.1)
    labels = {r.scores["ASR"]: r.label for r in paper_tables.load_runs([root])}
    assert labels == {0.1: "vanilla SAC", 0.2: "only experience replay", 0.3: "only gradient masking",
                      0.4: "NBSP with hard gradient masking", 0.5: "NBSP", 0.6: "NBSP (skill_ratio=0.1)"}
    out = paper_tables.paper_table(paper_tables.load_runs([root]), 9)
    rows = [line.split(" | ")[0].strip("| ") for line in out.splitlines()[4:9]]
    assert rows == ["vanilla SAC", "only experience replay", "only gradient masking",
                    "NBSP with hard gradient masking", "NBSP"]
    assert "± –" in out and "one seed, no standard error" in out


def test_vanilla_sac_two_ways_are_kept_apart(tmp_path):
    root = tmp_path / "runs"
    write_run(root, 1, (0.1, 0.2, 0.3), method="sac")
    write_run(root, 1, (0.2, 0.2, 0.3), mask=False, replay=False)
    out = paper_tables.paper_table(paper_tables.load_runs([root]), 9)
    assert lines_with(out, "| vanilla SAC [method=nbsp] | 1 | 0.20 ± – |")
    assert lines_with(out, "| vanilla SAC [method=sac] | 1 | 0.10 ± – |")


def test_tables_3_and_4_and_atari_table_5(tmp_path):
    root = tmp_path / "runs"
    write_run(root, 1, (0.7, 0.3, 0.9), identify="activation")
    write_run(root, 1, (0.8, 0.3, 0.9), tasks=["drawer-open", "drawer-close"], apply_to="critic")
    write_run(root, 1, (0.5, 0.4, 0.7), tasks=["Pong", "Bowling"], env="atari", method="ewc")
    runs = paper_tables.load_runs([root])
    t3 = paper_tables.paper_table(runs, 3)
    assert lines_with(t3, "| window-open → window-close | activation | 1 | 0.70 ± – | 0.65 ± 0.30 |")
    t4 = paper_tables.paper_table(runs, 4)
    assert lines_with(t4, "| drawer-open → drawer-close | critic | 1 | 0.80 ± – | 0.86 ± 0.02 |")
    t5 = paper_tables.paper_table(runs, 5)
    assert "Cycling sequential games" in t5
    assert lines_with(t5, "| Pong → Bowling | AR ↑ | 0.50 ± – (paper 0.66 ± 0.07) |")
    assert "ASR" not in t5


def test_generic_table_default_when_no_paper_table_matches(tmp_path):
    root = tmp_path / "runs"
    for seed, asr in enumerate((0.5, 0.6, 0.7), 1):
        write_run(root, seed, (asr, 0.3, 0.9), tasks=["reach", "drawer-close"], method="sac", hidden=[64, 64])
        write_run(root, seed, (asr + 0.2, 0.1, 0.9), tasks=["reach", "drawer-close"], hidden=[64, 64])
    runs = paper_tables.load_runs([root])
    out = paper_tables.report(runs)
    assert "All settings (Meta-World)" in out and "Table 1" not in out
    assert lines_with(out, "| reach → drawer-close | vanilla SAC | 3 | 0.60 ± 0.06 | 0.30 ± 0.00 | 0.90 ± 0.00 |")
    assert lines_with(out, "|  | NBSP | 3 | 0.80 ± 0.06 | 0.10 ± 0.00 | 0.90 ± 0.00 |")
    assert "paper" not in lines_with(out, "| Tasks |")[0]  # no paper number for this sequence
    assert "hidden=[64,64]" in out                        # flags not at the paper's defaults are listed
    assert paper_tables.settings_table(runs) in out


def test_generic_table_shows_paper_numbers_where_they_exist(runs_dir):
    out = paper_tables.settings_table(paper_tables.load_runs([runs_dir]))
    assert lines_with(out, "| window-open → window-close | vanilla SAC | 3 | 0.60 ± 0.06 | 0.63 ± 0.02 |")


def test_duplicate_seed_keeps_the_latest_run(runs_dir):
    rerun = write_run(runs_dir, 2, (0.6, 0.8, 1.0), method="sac")   # later than the first seed-2 run
    runs = paper_tables.load_runs([runs_dir])
    assert sum(not r.ok for r in runs) == 1 and any(r.path == rerun and r.ok for r in runs)
    assert "same config and seed 2" in paper_tables.skipped_list(runs)


def test_latex_is_well_formed(runs_dir):
    for seed in (1, 2, 3):
        write_run(runs_dir, seed, (0.3, 0.5, 0.6), method="nbsp", steps_per_task=50_000)
    tex = paper_tables.report(paper_tables.load_runs([runs_dir]), ["1", "9", "all"], fmt="latex")
    assert tex.count("\\begin{tabular}") == tex.count("\\end{tabular}") == 3
    assert tex.count("\\begin{table}") == tex.count("\\end{table}") == 3
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex
    assert "0.60 $\\pm$ 0.06 (paper 0.63 $\\pm$ 0.02)" in tex
    assert "steps\\_per\\_task=50000" in tex
    assert not any(ch in tex for ch in "±†→↑↓–√")
    # every row of a tabular has as many cells as its column spec
    for block in tex.split("\\begin{tabular}{")[1:]:
        spec, body = block.split("}", 1)
        body = body.split("\\end{tabular}")[0]
        rows = [r for r in body.splitlines() if r.endswith("\\\\")]
        assert rows and all(r.count(" & ") == len(spec) - 1 for r in rows)


def test_iqm_table(runs_dir):
    root = runs_dir.parent / "equal"
    for seed in (1, 2, 3):
        write_run(root, seed, (0.7, 0.2, 0.9))
    out = paper_tables.iqm_table(paper_tables.load_runs([root]), reps=200, seed=0)
    assert lines_with(out, "| window-open → window-close | NBSP | 3 | 0.70 [0.70, 0.70] | 0.20 [0.20, 0.20] | "
                           "0.90 [0.90, 0.90] |")
    out = paper_tables.iqm_table(paper_tables.load_runs([runs_dir]), reps=200, seed=0)
    row = lines_with(out, "| vanilla SAC | 3 | 0.60 [")[0]       # IQM of 3 runs = their mean
    lo, hi = (float(x) for x in row.split("| 0.60 [")[1].split("]")[0].split(", "))
    assert 0.5 <= lo <= 0.6 <= hi <= 0.7
    assert out == paper_tables.iqm_table(paper_tables.load_runs([runs_dir]), reps=200, seed=0)  # fixed seed: reproducible
    two = runs_dir.parent / "two"
    for seed in (1, 2):
        write_run(two, seed, (0.6 + 0.2 * seed, 0.2, 0.9))
    out = paper_tables.iqm_table(paper_tables.load_runs([two]), reps=200, seed=0)
    assert lines_with(out, "| NBSP | 2 | 0.90 [–] | 0.20 [–] | 0.90 [–] |")  # two runs: the mean, no interval
    assert "[–]: no interval from fewer than 3 runs." in out


def test_cli_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert paper_tables.main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no metrics.json under")
    write_run(tmp_path / "runs", 1, (0.5, 0.5, 0.5))
    assert paper_tables.main([str(tmp_path / "runs"), "--table", "7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: unknown table '7'; valid choices: 1, 2, 3, 4, 5, 9, 10, ablation, paper, all"]
    assert paper_tables.main([str(tmp_path / "runs"), "--format", "html"]) == 2
    assert capsys.readouterr().err.strip() == "error: unknown format 'html'; valid choices: markdown, latex"
    write_run(tmp_path / "killed", 1, (0.5, 0.5, 0.5), complete=False)
    assert paper_tables.main([str(tmp_path / "killed")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "incomplete (2/4 stages)" in err[-2] and err[-1].startswith("error: none of the 1 runs")


def test_cli_writes_both_formats(runs_dir, tmp_path):
    out = tmp_path / "docs" / "results.md"
    proc = subprocess.run([sys.executable, SCRIPT, str(runs_dir),
                           "--table", "9", "all", "--format", "markdown", "latex", "--out", str(out)],
                          check=False, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    md, tex = (tmp_path / "docs" / "results.md").read_text(), (tmp_path / "docs" / "results.tex").read_text()
    assert "| vanilla SAC | 3 | 0.60 ± 0.06 |" in md and "All settings (Meta-World)" in md
    assert "\\begin{tabular}" in tex and "0.60 $\\pm$ 0.06" in tex


def test_atari_game_unscored_before_it_is_trained_does_not_drop_the_run(tmp_path):
    """eval_unscored lists every unscored game of a stage's evaluation, unseen ones included: a run
    is dropped only when a metric is actually missing, and then the unscored games say why."""
    kept = write_run(tmp_path, 1, (0.3, 0.1, 0.4), tasks=["Pong", "Bowling"], env="atari", games=["Pong", "Bowling"])
    dropped = write_run(tmp_path, 2, (None, 0.1, None), tasks=["Pong", "Bowling"], env="atari", games=["Pong", "Bowling"])
    for folder, unscored in ((kept, ["Bowling"]), (dropped, ["Pong"])):
        path = os.path.join(folder, "metrics.json")
        metrics = json.load(open(path))
        metrics["stages"] = [{"eval_unscored": unscored}] + [{"eval_unscored": []}] * 3
        json.dump(metrics, open(path, "w"))
    runs = {run.seed: run for run in paper_tables.load_runs([str(tmp_path)])}
    assert runs[1].problem is None
    assert runs[2].problem == "AR missing: no Pong game finished within an evaluation (raise --eval-steps)"
