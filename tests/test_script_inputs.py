"""The command line of every script in scripts/. Bad input: one `error:` line on stderr naming what
is valid, exit status 2, and nothing written (the files under the test's folder are the same
before and after); each case is a row of CASES: the script, its command line, what the line must
say, and how the input is made bad. `--help`: a description and examples first, the flags under
topics, every flag explained and every default shown."""

import json
import math
import os

import pytest
import torch

import export_results
import figures
import mini_report
import neuron_analysis
import paper_tables
import record_video
import sweep
from test_figures import write_json, write_run

ROOT_USER = os.geteuid() == 0  # root writes into a read-only (mode 555) folder: no error is due there
MAINS = {"paper_tables": paper_tables.main, "figures": figures.main, "mini_report": mini_report.main,
         "sweep": sweep.run, "neuron_analysis": neuron_analysis.main}


def edit_json(path, change):
    with open(path) as f:
        data = json.load(f)
    write_json(path, change(data))


def wrong_shape(file, change):
    """Make the run's config.json or metrics.json valid JSON of the wrong shape."""
    def setup(tmp):
        (run,) = (tmp / "runs").iterdir()
        edit_json(run / file, change)
    return setup


def read_only(tmp):
    (tmp / "locked").mkdir()
    os.chmod(tmp / "locked", 0o555)


def a_file(tmp):
    (tmp / "file").write_text("not a folder")


def a_folder_named_x_md(tmp):
    (tmp / "x.md").mkdir()


def checkpoint_of_stage_1(tmp):
    (run,) = (tmp / "runs").iterdir()
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "stage_1.pt").write_bytes(b"")  # never loaded: the stage is refused first


SHAPES = [
    ("metrics-list", "metrics.json", lambda m: [], "metrics.json: the file must be an object"),
    ("diverged-true", "metrics.json", lambda m: m | {"diverged": True}, '"diverged" must be null or an object'),
    ("args-list", "config.json", lambda c: c | {"args": ["--seed", "1"]}, '"args" must be an object'),
    ("asr-text", "metrics.json", lambda m: m | {"ASR": "high"}, '"ASR" must be a finite number or null, got "high"'),
    ("asr-nan", "metrics.json", lambda m: m | {"ASR": math.nan}, '"ASR" must be a finite number or null, got NaN'),
    ("cycles-text", "config.json", lambda c: c | {"args": c["args"] | {"cycles": "two"}},
     'args "cycles" must be an integer >= 1, got "two"'),
]
GRID = ["--sequences", "reach", "--seeds", "1", "--runs-dir", "{tmp}/runs"]

# (id, script, command line ({tmp}: the test's folder, holding runs/<one run>), what the error says, setup)
CASES = [
    *[(f"paper_tables-{name}", "paper_tables", ["{tmp}/runs"], expected, wrong_shape(file, change))
      for name, file, change, expected in SHAPES],
    *[(f"figures-curves-{name}", "figures", ["curves", "{tmp}/runs", "--out", "{tmp}/figs/c"], expected, wrong_shape(file, change))
      for name, file, change, expected in SHAPES],
    *[(f"mini_report-{name}", "mini_report", ["--runs", "{tmp}/runs", "--out", "{tmp}/docs/r.md"], expected,
       wrong_shape(file, change)) for name, file, change, expected in SHAPES],
    ("paper_tables-out-is-folder", "paper_tables", ["{tmp}/runs", "--out", "{tmp}/x.md"], "is a folder; give a file path",
     a_folder_named_x_md),
    ("paper_tables-out-under-file", "paper_tables", ["{tmp}/runs", "--out", "{tmp}/file/x.md"], "is a file, not a folder", a_file),
    ("paper_tables-out-read-only", "paper_tables", ["{tmp}/runs", "--out", "{tmp}/locked/x.md"], "is not writable", read_only),
    ("figures-no-figure", "figures", [], "give the figure to draw: curves, plasticity, skill-ratio, histogram", None),
    ("figures-bins-text", "figures", ["histogram", "{tmp}/runs/run", "--bins", "x"], "--bins: invalid int value: 'x'", None),
    ("figures-stage-0", "figures", ["histogram", "{tmp}/runs/run", "--stage", "0"], "--stage must be a positive integer", None),
    ("figures-device-banana", "figures", ["histogram", "{tmp}/runs/run", "--device", "banana"],
     "--device must be cpu, cuda or cuda:N, got 'banana'", None),
    ("figures-out-under-file", "figures", ["curves", "{tmp}/runs", "--out", "{tmp}/file/c"], "is a file, not a folder", a_file),
    ("figures-out-read-only", "figures", ["curves", "{tmp}/runs", "--out", "{tmp}/locked/c"], "is not writable", read_only),
    ("figures-runs-is-file", "figures", ["curves", "{tmp}/file"], "is a file; give a run folder", a_file),
    ("mini_report-pilot-is-file", "mini_report", ["--runs", "{tmp}/runs", "--pilot", "{tmp}/file", "--out", "{tmp}/docs/r.md"],
     "--pilot", a_file),
    ("mini_report-out-under-file", "mini_report", ["--runs", "{tmp}/runs", "--out", "{tmp}/file/r.md"],
     "is a file, not a folder", a_file),
    ("mini_report-out-read-only", "mini_report", ["--runs", "{tmp}/runs", "--out", "{tmp}/locked/r.md"],
     "is not writable", read_only),
    ("neuron_analysis-stage-99", "neuron_analysis", ["{tmp}/runs/run", "--stage", "99"],
     "--stage must be a finished stage of the run: 1; got 99", checkpoint_of_stage_1),
    ("neuron_analysis-device-banana", "neuron_analysis", ["{tmp}/runs/run", "--device", "banana"],
     "--device must be cpu, cuda or cuda:N", None),
    ("neuron_analysis-network-qf1", "neuron_analysis", ["{tmp}/runs/run", "--network", "qf1"],
     "invalid choice: 'qf1' (choose from 'actor')", None),
    ("neuron_analysis-json-under-file", "neuron_analysis", ["{tmp}/runs/run", "--json", "{tmp}/file/t.json"],
     "is a file, not a folder", a_file),
    ("neuron_analysis-json-read-only", "neuron_analysis", ["{tmp}/runs/run", "--json", "{tmp}/locked/t.json"],
     "is not writable", read_only),
    ("sweep-log-dir-is-file", "sweep", [*GRID, "--log-dir", "{tmp}/file"], "--log-dir", a_file),
    ("sweep-python-missing", "sweep", [*GRID, "--python", "/nonexistent"], "--python '/nonexistent' is not an executable", None),
    ("sweep-runs-dir-read-only", "sweep", [*GRID[:-1], "{tmp}/locked/runs"], "is not writable", read_only),
    ("sweep-slurm-under-file", "sweep", [*GRID, "--slurm", "{tmp}/file/x.sh"], "is a file, not a folder", a_file),
    ("sweep-resume-after-dashes", "sweep", [*GRID, "--dry-run", "--", "--resume", "x"],
     "--resume (after `--`) is set by the sweep for every run; leave it out", None),
    ("sweep-seed-in-set", "sweep", ["--sequences", "reach", "--seeds", "1", "2", "--set", "seed=5", "--dry-run"],
     "--seed (--set) is set by the sweep for every run; give seeds with --seeds", None),
]
if not torch.cuda.is_available():
    CASES += [("neuron_analysis-cuda-on-cpu", "neuron_analysis", ["{tmp}/runs/run", "--device", "cuda"],
               "--device cuda: this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device", None),
              ("figures-cuda-on-cpu", "figures", ["histogram", "{tmp}/runs/run", "--device", "cuda"], "--device cuda", None)]


def tree(root) -> set:
    return {os.path.relpath(os.path.join(folder, name), root)
            for folder, folders, files in os.walk(root) for name in folders + files}


@pytest.mark.parametrize("script, argv, expected, setup", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_one_error_line_exit_2_nothing_written(script, argv, expected, setup, tmp_path, monkeypatch, capsys):
    if setup is read_only and ROOT_USER:
        pytest.skip("root writes into a read-only folder")
    run = write_run(tmp_path / "runs", "nbsp", 1)
    os.rename(run, tmp_path / "runs" / "run")
    if setup is not None:
        setup(tmp_path)
    monkeypatch.chdir(tmp_path)  # default outputs (figs/, docs/) land here too
    before = tree(tmp_path)
    capsys.readouterr()
    try:
        code = MAINS[script]([a.replace("{tmp}", str(tmp_path)) for a in argv])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert expected in err[0]
    assert tree(tmp_path) == before


# --------------------------------------------------------------------------------------------
# --help: a description and examples first, flags under topics, every flag explained, every default shown
# --------------------------------------------------------------------------------------------
def parsers(parser):
    """The parser and those of its subcommands."""
    yield parser
    for action in parser._actions:
        for sub in getattr(action, "choices", None) or {}:
            if isinstance(action.choices, dict):
                yield from parsers(action.choices[sub])


@pytest.mark.parametrize("module", [paper_tables, figures, mini_report, sweep, neuron_analysis, record_video, export_results],
                         ids=lambda m: m.__name__)
def test_help_reads_by_topic(module, capsys):
    top = module.make_parser()
    with pytest.raises(SystemExit) as exit:
        top.parse_args(["--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    assert "\nexamples:\n  python scripts/" in text and text.index("examples:") < text.index("options:")
    for parser in parsers(top):
        flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
        assert all(a.help for a in parser._actions if a.dest != "help"), parser.prog  # every flag explained
        if module is not figures or parser is not top:
            assert len(parser._action_groups) > 2 or len(flags) <= 2, parser.prog  # topics besides the defaults
        for action in flags:
            if action.default is not None and action.default is not False and action.default not in ("", []):
                assert "(default:" in " ".join(parser._get_formatter()._get_help_string(action).split()), action.dest


def test_benchmark_help_reads_by_topic():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "..", "scripts", "benchmark.py"), "--help"],
                            capture_output=True, text=True, timeout=120, env=dict(os.environ, COLUMNS="120"))
    assert result.returncode == 0 and "examples:" in result.stdout
    for topic in ("measurement", "paper-size-update", "size-table", "end-to-end", "atari-update", "method-cost"):
        assert f"{topic} options" in result.stdout
    assert "--widths" in result.stdout and "--e2e-batch" in result.stdout  # the flags keep their names
