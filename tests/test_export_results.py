"""scripts/export_results.py: the complete runs' small files with relative paths, their scalars in
scalars.json read back exactly as from the events, and a report rebuilt from the exported folder
alone equal to the one from the run folders."""

import json
import os
import shutil

import numpy as np
import pytest

import export_results
import figures
import mini_report
from test_figures import write_run


@pytest.fixture
def runs(tmp_path):
    runs_dir = tmp_path / "abs" / "runs"
    for seed in (1, 2):
        for method in ("sac", "nbsp"):
            write_run(runs_dir, method, seed)
    write_run(runs_dir, "nbsp", 3, complete=False)
    logs = runs_dir / "sweep_logs"
    logs.mkdir()
    (logs / "reach+drawer-close__sac_r0.2__1.log").write_text(
        f"/opt/venv/bin/python3.11 /home/me/nbsp/nbsp_sac_metaworld.py --runs-dir {runs_dir} --seed 1\n"
        f"resume with: python /home/me/nbsp/nbsp_sac_metaworld.py --resume {runs_dir}/reach+drawer-close__sac_r0.2__1\n")
    return runs_dir


def test_exports_complete_runs_with_relative_paths(runs, tmp_path, capsys):
    out = tmp_path / "results" / "grid"
    assert export_results.main([str(runs), str(out)]) == 0
    assert capsys.readouterr().out == (f"exported 4 complete runs to {out}; skipped 1 unfinished: "
                                       "reach+drawer-close__nbsp_r0.2__3\n")
    assert sorted(os.listdir(out)) == sorted(f"reach+drawer-close__{m}_r0.2__{s}" for m in ("sac", "nbsp") for s in (1, 2))
    sac = out / "reach+drawer-close__sac_r0.2__1"
    assert sorted(os.listdir(sac)) == ["config.json", "console.log", "metrics.json", "scalars.json"]
    assert json.loads((sac / "config.json").read_text())["args"]["runs_dir"] == "runs/grid"
    assert (sac / "console.log").read_text() == (
        "python nbsp_sac_metaworld.py --runs-dir runs/grid --seed 1\n"
        "resume with: python nbsp_sac_metaworld.py --resume runs/grid/reach+drawer-close__sac_r0.2__1\n")
    assert "console.log" not in os.listdir(out / "reach+drawer-close__sac_r0.2__2")  # no sweep log of it
    assert export_results.main([str(runs), str(out), "--runs-dir-as", "runs/x"]) == 0  # again: refreshed
    assert json.loads((sac / "config.json").read_text())["args"]["runs_dir"] == "runs/x"


def test_scalars_read_back_as_from_the_events(runs, tmp_path):
    out = tmp_path / "results" / "grid"
    export_results.main([str(runs), str(out)])
    name = "reach+drawer-close__nbsp_r0.2__2"
    exported = json.loads((out / name / "scalars.json").read_text())
    assert sorted(exported) == sorted([f"eval/{t}/success_rate" for t in ("reach", "drawer-close")]
                                      + [f"plasticity/{n}/dormant_ratio" for n in ("actor", "qf1", "qf2")])
    for pattern in (figures.EVAL_TAG, figures.PLASTICITY_TAG):
        original, copy = figures.read_eval_curves(str(runs / name), pattern), figures.read_eval_curves(str(out / name), pattern)
        assert original.keys() == copy.keys() and original
        for key in original:
            np.testing.assert_array_equal(original[key][0], copy[key][0])
            np.testing.assert_array_equal(original[key][1], copy[key][1])  # float32 values survive JSON exactly
    # 4 stages of 1000 steps, evaluated every 250 steps and at each stage end (the same step): 16 points
    assert len(exported["eval/reach/success_rate"]) == 16


def test_a_report_rebuilds_from_the_exported_runs_alone(runs, tmp_path):
    out = tmp_path / "results" / "grid"
    export_results.main([str(runs), str(out)])
    shutil.rmtree(runs / "reach+drawer-close__nbsp_r0.2__3")  # the unfinished run, which the export leaves out
    from_runs, from_export = tmp_path / "a" / "report.md", tmp_path / "b" / "report.md"
    assert mini_report.main(["--runs", str(runs), "--out", str(from_runs)]) == 0
    assert mini_report.main(["--runs", str(out), "--out", str(from_export)]) == 0
    body = [path.read_text().split("## Machine and time")[1] for path in (from_runs, from_export)]
    assert body[0] == body[1]  # every table; the commands above differ by the folder's name
    assert os.path.getsize(tmp_path / "b" / "report-curves.png") > 0


@pytest.mark.parametrize("argv, expected", [
    (["missing", "out"], "error: runs_dir 'missing' is not a folder\n"),
    (["RUNS", "RUNS/reach+drawer-close__sac_r0.2__1/config.json"], "is a file; give a folder\n"),
])
def test_bad_input_stops_with_one_line(runs, argv, expected, capsys):
    argv = [a.replace("RUNS", str(runs)) for a in argv]
    assert export_results.main(argv) == 2
    err = capsys.readouterr().err
    assert err.endswith(expected) and err.count("\n") == 1


def test_log_dir_names_where_the_sweep_logs_are(runs, tmp_path):
    logs = tmp_path / "elsewhere"
    (runs / "sweep_logs").rename(logs)
    out = tmp_path / "results" / "grid"
    assert export_results.main([str(runs), str(out)]) == 0
    assert "console.log" not in os.listdir(out / "reach+drawer-close__sac_r0.2__1")  # not in RUNS_DIR/sweep_logs
    assert export_results.main([str(runs), str(out), "--log-dir", str(logs)]) == 0
    assert (out / "reach+drawer-close__sac_r0.2__1" / "console.log").read_text().startswith("python nbsp_sac_metaworld.py")
