"""Tests of scripts/sweep.py: preset grids and exp_names, `--set` grids, bad input, the Slurm
job-array script (run with a fake SLURM_ARRAY_TASK_ID), threads per process, and real local runs
of nbsp_sac_metaworld.py with tiny budgets: two side by side, a failing one, skip and resume.

The real runs share one module-scoped sweep (two runs of a few seconds each on 2 cores)."""

import json
import os
import shlex
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = os.path.join(ROOT, "scripts", "sweep.py")

import baselines
import sweep

# one Meta-World stage that reaches gradient updates, identification and evaluation (episodes
# are 500 steps, so few of them)
TINY = ["--cycles", "1", "--hidden", "8", "8", "--batch-size", "8", "--steps-per-task", "300",
        "--learning-starts", "100", "--eval-every", "0", "--eval-episodes", "2", "--identify-episodes", "2",
        "--buffer-size", "1000", "--dpre-per-task", "100", "--no-cuda"]
TINY_GRID = ["--sequences", "reach", "--settings", "nbsp", "sac", "--seeds", "1"]


def run_sweep(*argv, env=None, cwd=None):
    return subprocess.run([sys.executable, SWEEP, *argv], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})), cwd=cwd)


def runs_of(argv, extra=()):
    args = sweep.make_parser().parse_args(argv)
    return sweep.build_runs(args, list(extra))


def run_folders(runs_dir):
    return sorted(d for d in os.listdir(runs_dir) if os.path.isfile(os.path.join(runs_dir, d, "config.json")))


# ---------------------------------------------------------------------------------------------
# grid expansion
# ---------------------------------------------------------------------------------------------
METHODS = {*baselines.BASELINES, "nbsp"}  # the registry's methods: Tables 1 and 5 run every one


@pytest.mark.parametrize("preset,n_seq,names", [
    ("table1", 5, METHODS),
    ("table2", 3, {"sac", "only-replay", "only-mask", "hard-mask", "nbsp"}),
    ("table3", 3, {"identify-activation", "identify-weight", "identify-random", "nbsp"}),
    ("table4", 3, {"actor-only", "critic-only", "nbsp"}),
    ("table5", 2, METHODS),
    ("figure4", 1, {"ratio0.05", "ratio0.1", "nbsp", "ratio0.3", "ratio0.4", "ratio0.5"}),
    ("mini", 1, {"sac", "only-replay", "only-mask", "hard-mask", "nbsp", "identify-random", "identify-activation",
                 "identify-weight", "goal-balanced"}),
    ("regime", 1, {"sac", "only-replay", "only-mask", "hard-mask", "nbsp", "goal-balanced", "identify-random-balanced",
                   "identify-activation-balanced"}),
])
def test_preset_grid(preset, n_seq, names):
    runs = runs_of(["--preset", preset])
    seeds = {1, 2, 3, 4, 5} if preset == "regime" else {1, 2, 3}  # the regime asks for 5 seeds, the paper has 3
    assert len(runs) == n_seq * len(names) * len(seeds)
    assert {r.exp_name for r in runs} == names
    assert {r.seed for r in runs} == seeds
    assert len({r.key for r in runs}) == len(runs)
    assert len({tuple(r.tasks) for r in runs}) == n_seq
    assert {r.script for r in runs} == {"atari" if preset == "table5" else "metaworld"}


def test_preset_flags_and_sequences():
    table1 = runs_of(["--preset", "table1", "--seeds", "7"])
    assert len(table1) == 40 and {r.seed for r in table1} == {7}
    assert ["button-press-topdown", "window-close", "door-open", "drawer-close"] in [r.tasks for r in table1]
    by_name = {r.exp_name: r.flags for r in table1 if r.tasks == ["window-open", "window-close"]}
    assert by_name["ewc"] == ["--method", "ewc"] and by_name["nbsp"] == []
    table2 = {r.exp_name: r.flags for r in runs_of(["--preset", "table2"])}
    assert table2 == {"sac": ["--method", "sac"], "only-replay": ["--no-mask"], "only-mask": ["--no-replay"],
                      "hard-mask": ["--hard-mask"], "nbsp": []}
    table5 = runs_of(["--preset", "table5", "--seeds", "1"])
    bank = [r for r in table5 if r.tasks == ["BankHeist", "Alien"]]
    assert all(r.flags[:2] == ["--steps-per-task", "3000000"] for r in bank)
    assert all("--steps-per-task" not in r.flags for r in table5 if r.tasks == ["Pong", "Bowling"])
    mini = runs_of(["--preset", "mini"], extra=["--steps-per-task", "5000"])
    mini_flags = mini[0].flags
    assert all(r.tasks == ["drawer-close", "button-press"] and "--no-cuda" in r.flags for r in mini)
    assert all(r.flags[-2:] == ["--steps-per-task", "5000"] for r in mini)  # extras last: they win
    pilot = {r.exp_name: r.flags for r in runs_of(["--preset", "regime-pilot", "--seeds", "1"])}
    regime = {r.exp_name: r.flags for r in runs_of(["--preset", "regime", "--seeds", "1"])}
    assert {r.seed for r in runs_of(["--preset", "regime", "--seeds", "7"])} == {7}  # --seeds overrides the preset's
    # the grid: the pilot's size, every stage to its budget
    assert pilot["sac"][:2] == ["--cycles", "1"] and pilot["sac"][-5:] == ["--early-stop-success", "1.0", "--compile",
                                                                           "--method", "sac"]
    assert regime["sac"] == ["--cycles", "2", *pilot["sac"][2:-5], "--early-stop-success", "0", "--compile", "--method", "sac"]
    assert all("--compile" in flags for flags in regime.values()) and "--compile" in mini_flags
    assert regime["identify-random-balanced"][-4:] == ["--identify", "random", "--goal-score", "balanced"]


def test_shared_flags_reach_only_their_method():
    # the training scripts refuse another method's flags: a grid's shared flags go where they apply
    mini = {r.exp_name: r.flags for r in runs_of(["--preset", "mini", "--seeds", "1"])}
    assert "--dpre-per-task" in mini["nbsp"] and "--dpre-per-task" in mini["only-mask"]
    assert "--dpre-per-task" not in mini["sac"] and "--identify-episodes" not in mini["sac"]
    assert "--hidden" in mini["sac"] and "--no-cuda" in mini["sac"]
    extra = ["--identify-episodes", "5", "--fisher-batches", "2", "--no-fisher-critic", "--cbp-decay", "0.9",
             "--no-keep-buffer", "--hidden", "64", "64"]
    table1 = {r.exp_name: r.flags for r in runs_of(["--preset", "table1", "--seeds", "1"], extra)
              if r.tasks == ["window-open", "window-close"]}
    assert table1["nbsp"] == ["--identify-episodes", "5", "--no-keep-buffer", "--hidden", "64", "64"]
    assert table1["ewc"] == ["--method", "ewc", "--fisher-batches", "2", "--no-fisher-critic",
                             "--no-keep-buffer", "--hidden", "64", "64"]
    assert table1["ancl"][-7:] == table1["ewc"][-7:]
    assert table1["cbp"] == ["--method", "cbp", "--cbp-decay", "0.9", "--no-keep-buffer", "--hidden", "64", "64"]
    assert table1["pi"] == ["--method", "pi", "--no-keep-buffer", "--hidden", "64", "64"]


def test_presets_share_the_nbsp_runs():
    # the NBSP run of a sequence and seed is the same run in Tables 1-4 and Figure 4
    runs = runs_of(["--preset", "table1", "table2", "table3", "table4", "figure4"])
    assert len(runs) == 120 + 45 + 36 + 27 + 18 - 3 * 9 - 3


def test_set_grid_names():
    runs = runs_of(["--sequences", "window-open,window-close", "--settings", "nbsp", "sac", "--seeds", "1",
                    "--set", "skill-ratio=0.1,0.3", "--set", "keep-buffer=true,false", "--tag", "v2"])
    assert len(runs) == 2 * 2 * 2
    names = {r.exp_name: r.flags for r in runs}
    assert names["nbsp_ratio0.1_keep-buffer_v2"] == ["--skill-ratio", "0.1", "--keep-buffer"]
    assert names["sac_ratio0.3_no-keep-buffer_v2"] == ["--method", "sac", "--skill-ratio", "0.3", "--no-keep-buffer"]
    assert {tuple(r.tasks) for r in runs} == {("window-open", "window-close")}


@pytest.mark.parametrize("argv,needle", [
    (["--preset", "table9"], "table1"),
    (["--preset", "mini", "--set", "skill-ratio"], "FLAG=VALUE"),
    (["--preset", "mini", "--set", "skill-ratio=0.1,"], "FLAG=VALUE"),
    (["--sequences", "reach", "--settings", "nbsp", "vanilla"], "only-replay"),
    (["--preset", "mini", "--steps-per-task", "5"], "after `--`"),
    ([], "table1"),
])
def test_bad_input(argv, needle, tmp_path):
    out = run_sweep(*argv, "--runs-dir", str(tmp_path))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], out.stderr
    assert not os.listdir(tmp_path)


# ---------------------------------------------------------------------------------------------
# Slurm
# ---------------------------------------------------------------------------------------------
def test_slurm_script(tmp_path):
    runs_dir, out_sh = str(tmp_path / "runs"), str(tmp_path / "table2.sh")
    common = ["--preset", "table2", "--runs-dir", runs_dir, "--", "--no-cuda"]
    dry = run_sweep(*common[:-2], "--dry-run", *common[-2:])
    commands = [line for line in dry.stdout.splitlines() if not line.startswith("#")]
    assert dry.returncode == 0 and len(commands) == 45
    res = run_sweep("--slurm", out_sh, "--slurm-partition", "gpu", "--slurm-time", "12:00:00", "--slurm-cpus", "6",
                    *common)
    assert res.returncode == 0, res.stderr
    text = open(out_sh).read()
    for line in ["#SBATCH --array=0-44", "#SBATCH --gres=gpu:1", "#SBATCH --partition=gpu",
                 "#SBATCH --time=12:00:00", "#SBATCH --cpus-per-task=6"]:
        assert line + "\n" in text
    assert all(shlex.quote(c) in text for c in commands)
    assert not os.path.exists(runs_dir) or not run_folders(runs_dir)  # nothing ran
    for k in (0, 17, 44):  # the array index selects the k-th command
        sel = subprocess.run(["bash", out_sh], capture_output=True, text=True,
                             env=dict(os.environ, SLURM_ARRAY_TASK_ID=str(k), SWEEP_DRY_RUN="1"))
        assert sel.returncode == 0 and sel.stdout.strip() == commands[k], sel.stderr


def fake_python(tmp_path):
    """An 'interpreter' that logs its arguments and thread settings instead of training."""
    path = tmp_path / "fake_python"
    path.write_text('#!/bin/bash\necho "threads=$OMP_NUM_THREADS,$MKL_NUM_THREADS args=$*"\n')
    path.chmod(0o755)
    return str(path)


def test_slurm_script_runs_its_command(tmp_path):
    # the real (non-dry) path of the array script, with a fake interpreter instead of training
    out_sh, log_dir = str(tmp_path / "a.sh"), tmp_path / "logs"
    res = run_sweep("--sequences", "reach", "--settings", "nbsp", "sac", "--seeds", "3", "--runs-dir",
                    str(tmp_path / "runs"), "--log-dir", str(log_dir), "--python", fake_python(tmp_path),
                    "--slurm", out_sh, "--slurm-gpus", "0", "--", "--hidden", "8", "8")
    assert res.returncode == 0 and "--gres" not in open(out_sh).read()
    sel = subprocess.run(["bash", out_sh], capture_output=True, text=True,
                         env=dict(os.environ, SLURM_ARRAY_TASK_ID="1", SLURM_CPUS_PER_TASK="3"))
    assert sel.returncode == 0, sel.stderr
    log = open(log_dir / "reach__sac__3.log").read()
    assert "threads=3,3 args=" in log and "--exp-name sac --seed 3" in log and "--hidden 8 8" in log


def test_local_threads_per_process(tmp_path):
    # two processes at a time on this machine: each gets max(1, cores // 2) threads; the fake
    # runs write no metrics.json, so they are also reported as failed
    res = run_sweep(*TINY_GRID, "--jobs", "2", "--runs-dir", str(tmp_path), "--python", fake_python(tmp_path))
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert res.returncode == 1 and "2 failed" in res.stdout
    for name in ("nbsp", "sac"):
        assert f"threads={threads},{threads} " in open(tmp_path / "sweep_logs" / f"reach__{name}__1.log").read()


# ---------------------------------------------------------------------------------------------
# real runs
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    runs_dir = str(tmp_path_factory.mktemp("sweep_runs"))
    res = run_sweep(*TINY_GRID, "--jobs", "2", "--runs-dir", runs_dir, "--", *TINY)
    return runs_dir, res


@pytest.mark.e2e
def test_local_sweep_runs_both(finished_sweep):
    runs_dir, res = finished_sweep
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("started") == 2 and res.stdout.count("finished") == 2
    assert "2 ok, 0 failed" in res.stdout
    folders = run_folders(runs_dir)
    assert len(folders) == 2
    names = set()
    for folder in folders:
        config = json.load(open(os.path.join(runs_dir, folder, "config.json")))
        metrics = json.load(open(os.path.join(runs_dir, folder, "metrics.json")))
        assert metrics["complete"] is True
        assert config["args"]["hidden"] == [8, 8] and config["args"]["tasks"] == ["reach"]
        names.add((config["args"]["exp_name"], config["args"]["method"]))
    assert names == {("nbsp", "nbsp"), ("sac", "sac")}
    assert os.path.isfile(os.path.join(runs_dir, "sweep_logs", "reach__nbsp__1.log"))


@pytest.mark.e2e
def test_second_invocation_skips_complete_runs(finished_sweep):
    runs_dir, _ = finished_sweep
    res = run_sweep(*TINY_GRID, "--jobs", "2", "--runs-dir", runs_dir, "--", *TINY)
    assert res.returncode == 0 and "0 runs to do (2 complete, skipped)" in res.stdout
    assert "started" not in res.stdout and len(run_folders(runs_dir)) == 2
    dry = run_sweep(*TINY_GRID, "--runs-dir", runs_dir, "--dry-run", "--", *TINY[:-1], "--steps-per-task", "400")
    assert dry.stdout.count("# skip") == 2
    assert "steps_per_task=300 (sweep: 400)" in dry.stderr  # a changed budget is pointed out


@pytest.mark.e2e
def test_killed_run_is_resumed(finished_sweep, tmp_path):
    runs_dir, _ = finished_sweep
    folder = next(f for f in run_folders(runs_dir) if "__nbsp__" in f)
    shutil.copytree(os.path.join(runs_dir, folder), tmp_path / folder)
    metrics_path = tmp_path / folder / "metrics.json"
    metrics = json.load(open(metrics_path))
    metrics["complete"] = False  # as if killed after its last checkpoint
    json.dump(metrics, open(metrics_path, "w"))
    os.makedirs(tmp_path / "reach__sac__1__1")  # killed before its first checkpoint: a new run
    json.dump({"run_name": "reach__sac__1__1", "args": {"tasks": ["reach"], "exp_name": "sac", "seed": 1}},
              open(tmp_path / "reach__sac__1__1" / "config.json", "w"))
    grid = ["--sequences", "reach", "--seeds", "1", "--runs-dir", str(tmp_path)]
    dry = run_sweep(*grid, "--settings", "nbsp", "sac", "--dry-run", "--", *TINY)
    resume, new = [line for line in dry.stdout.splitlines() if not line.startswith("#")]
    assert resume.endswith(f"--resume {tmp_path / folder} --no-cuda")  # only flags --resume accepts
    assert "--exp-name sac" in new and "stopped before its first checkpoint" in dry.stderr
    res = run_sweep(*grid, "--settings", "nbsp", "--", *TINY)  # the real resume (no work left: seconds)
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.load(open(metrics_path))["complete"] is True
    assert f"resume {tmp_path / folder}" in res.stdout


def test_failed_run_is_reported(tmp_path):
    # a command line the sweep's own check accepts (--skill-ratio 2 is refused before any run:
    # tests/test_reliability.py) but the run refuses once it knows the replay memory it needs
    # (2e9 rows of D: about 690 GB)
    res = run_sweep("--sequences", "reach", "--seeds", "1", "--runs-dir", str(tmp_path), "--",
                    *TINY, "--buffer-size", "2000000000")
    log = os.path.join(str(tmp_path), "sweep_logs", "reach__nbsp__1.log")
    assert res.returncode == 1
    assert "FAILED" in res.stdout and "0 ok, 1 failed" in res.stdout and f"exit 2): {log}" in res.stdout
    assert "error: D (--buffer-size 2000000000)" in res.stdout  # the log's last line, shown
    assert "error: D (--buffer-size" in open(log).read()


def test_stopping_the_sweep_stops_its_runs(tmp_path):
    sleeper = tmp_path / "sleeper"  # an 'interpreter' that records its pid and waits
    sleeper.write_text(f'#!/bin/bash\necho $$ >> {tmp_path}/pids\nexec sleep 60\n')
    sleeper.chmod(0o755)
    proc = subprocess.Popen([sys.executable, SWEEP, *TINY_GRID, "--jobs", "2", "--runs-dir", str(tmp_path / "runs"),
                             "--python", str(sleeper)], stdout=subprocess.PIPE, text=True)
    for _ in range(3000):  # both runs started (the sweep stops on SIGTERM from before it starts them)
        if os.path.exists(tmp_path / "pids") and len(open(tmp_path / "pids").read().split()) == 2:
            break
        time.sleep(0.1)
    proc.terminate()
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 1 and out.count("(interrupted)") == 2 and "run the same command again" in out
    for pid in open(tmp_path / "pids").read().split():
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid), 0)


def test_config_differences_read_a_flag_given_twice_as_its_last():
    """A preset's flag overridden by an extra after `--` (`-- --early-stop-success 0`) is compared
    with its last value, as the training script parses it; other flags as given."""
    tokens = ["--hidden", "256", "256", "--early-stop-success", "1.0", "--no-mask", "--early-stop-success", "0"]
    config = {"hidden": [256, 256], "early_stop_success": 0.0, "mask": False}
    assert sweep.config_differences(tokens, config) == []
    assert sweep.config_differences(tokens, config | {"early_stop_success": 1.0}) == ["early_stop_success=1.0 (sweep: 0)"]
    assert sweep.config_differences(tokens, config | {"hidden": [128, 128], "mask": True}) == [
        "hidden=[128, 128] (sweep: 256 256)", "mask=True (sweep: False)"]
