"""Runs that never lie: a diverged run stops and says so, bad numbers stop before any file is
written, resume is exact with a wrapped --keep-buffer D (both scripts), a run folder has one
writer at a time, an unwritable folder is found before training, and the README's commands run
from any working directory."""

import dataclasses
import glob
import json
import os
import shutil
import subprocess
import sys
import time

import mujoco
import numpy as np
import pytest
import torch

import conftest
import nbsp_sac_atari as atari
import nbsp_sac_metaworld as mw
import protocol
from conftest import kill_after_stage, load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MW_TINY = dict(conftest.MW_TINY, tasks=["drawer-close", "reach"], steps_per_task=300, learning_starts=100,
               hidden=[16, 16], batch_size=16, identify_episodes=1, dpre_per_task=100)
ATARI_TINY = dict(conftest.ATARI_TINY, dpre_per_task=100, identify_episodes=1, identify_max_steps=200)


def files_under(folder):
    return [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names]


# --------------------------------------------------------------------------------------------
# A diverged run
# --------------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_a_diverged_run_stops_and_says_so(tmp_path):
    """--q-lr 1e6 (the reliability pass's case: it used to exit 0 with ASR 0.667) stops at the next
    loss log with one line naming the stage, the step and the quantity; metrics.json is marked."""
    cmd = [sys.executable, os.path.join(ROOT, "nbsp_sac_metaworld.py"), "--tasks", "drawer-close", "reach",
           "--cycles", "2", "--steps-per-task", "600", "--learning-starts", "200", "--hidden", "32", "32",
           "--batch-size", "32", "--buffer-size", "5000", "--eval-episodes", "2", "--eval-every", "300",
           "--identify-episodes", "1", "--dpre-per-task", "300", "--no-cuda", "--q-lr", "1e6", "--runs-dir", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == protocol.DIVERGED_EXIT, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the run diverged: non-finite" in errors[0] and "stage 1 (drawer-close)" in errors[0]
    assert len((result.stdout + result.stderr).splitlines()) < 50  # no flood of simulator warnings
    metrics = json.load(open(glob.glob(str(tmp_path / "*" / "metrics.json"))[0]))
    assert metrics["complete"] is False and metrics["diverged"]["stage"] == 1
    assert metrics["diverged"]["global_step"] <= 600 and metrics["ASR"] is None


def test_first_non_finite_names_the_quantity():
    finite = {"w": torch.ones(3), "log_alpha": torch.zeros(1)}
    assert protocol.first_non_finite({"qf_loss": 1.0}, finite) is None
    assert protocol.first_non_finite({"qf_loss": float("nan")}, finite) == "qf_loss (nan)"
    assert protocol.first_non_finite({}, {**finite, "actor.fc.weight": torch.tensor([1.0, float("inf")])}) \
        == "actor.fc.weight (non-finite values)"


def test_mujoco_warnings_are_counted_not_printed(capfd):
    counter = mw.MujocoWarnings()
    env = mw.make_env("reach", 0)
    env.reset(seed=0)
    model, data = env.unwrapped.model, env.unwrapped.data
    data.qacc_warmstart[:] = np.nan  # what a NaN action does to the simulation
    data.qvel[:] = np.nan
    mujoco.mj_step(model, data)
    assert counter.take() >= 1 and counter.count == 0 and "Nan" in counter.last
    assert "WARNING" not in capfd.readouterr().out


# --------------------------------------------------------------------------------------------
# Bad numbers: one line, exit 2, nothing written
# --------------------------------------------------------------------------------------------
MW_BAD = {
    "alpha -1": dict(alpha=-1.0), "alpha 0": dict(alpha=0.0), "q-lr nan": dict(q_lr=float("nan")),
    "policy-lr -1": dict(policy_lr=-1.0), "seed -1": dict(seed=-1), "seed 99999999999": dict(seed=99999999999),
    "gamma nan": dict(gamma=float("nan")), "batch over buffer": dict(batch_size=5000),
    "buffer 1e12": dict(buffer_size=1_000_000_000_000), "dpre 1e12": dict(dpre_per_task=1_000_000_000_000),
    "exp-name escape": dict(exp_name="../../escape"),
    "ewc-lambda nan": dict(method="ewc", ewc_lambda=float("nan")), "ewc-lambda inf": dict(method="ewc", ewc_lambda=float("inf")),
    "npc-scale nan": dict(method="npc", npc_scale=float("nan")),
    "dormant-threshold -1": dict(dormant_threshold=-1.0), "progress-every nan": dict(progress_every=float("nan")),
}
NBSP_ONLY = ("identify_episodes", "dpre_per_task")


@pytest.mark.parametrize("case", list(MW_BAD))
def test_metaworld_bad_values_stop_before_writing(case, tmp_path, capsys):
    args = {**MW_TINY, **MW_BAD[case]}
    if args.get("method", "nbsp") != "nbsp":
        args = {k: v for k, v in args.items() if k not in NBSP_ONLY}
    with pytest.raises(SystemExit) as exit:
        mw.main(mw.Args(**args, runs_dir=str(tmp_path / "runs")))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert not os.path.exists(tmp_path / "runs")


ATARI_BAD = {"buffer 1e10 (75 TB)": dict(buffer_size=10_000_000_000), "q-lr -1": dict(q_lr=-1.0),
             "seed -3": dict(seed=-3), "game-scores inf": dict(games=["Breakout"], game_scores=["Breakout=0,inf"]),
             "eval-envs 10000": dict(eval_envs=10_000)}


@pytest.mark.parametrize("case", list(ATARI_BAD))
def test_atari_bad_values_stop_before_writing(case, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        atari.main(atari.Args(**{**ATARI_TINY, **ATARI_BAD[case]}, runs_dir=str(tmp_path / "runs")))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert not os.path.exists(tmp_path / "runs")


def test_runs_dir_that_is_a_file(tmp_path, capsys):
    a_file = tmp_path / "runs"
    a_file.write_text("")
    with pytest.raises(SystemExit):
        mw.main(mw.Args(**MW_TINY, runs_dir=str(a_file)))
    assert "is a file" in capsys.readouterr().err and a_file.read_text() == ""


@pytest.mark.e2e
def test_the_rollout_env_pool_is_capped(tmp_path, monkeypatch):
    """--eval-episodes 100000 used to build 100000 envs per task up front; the pool stops at
    MAX_ROLLOUT_ENVS and evaluation runs in waves over it."""
    built = []
    real_make_env = mw.make_env
    monkeypatch.setattr(mw, "make_env", lambda task, seed: built.append(seed) or real_make_env(task, seed))
    monkeypatch.setattr(mw, "evaluate_all", lambda *a: {"reach": 0.0})
    mw.main(mw.Args(**{**MW_TINY, "tasks": ["reach"], "eval_episodes": 100_000}, runs_dir=str(tmp_path)))
    assert len(built) == mw.MAX_ROLLOUT_ENVS + 1  # the pool and the training env


# --------------------------------------------------------------------------------------------
# Resume: exact with a wrapped D, the saved config checked, one process per run folder
# --------------------------------------------------------------------------------------------
@pytest.mark.e2e
@pytest.mark.parametrize("script", ["metaworld", "atari"])
def test_keep_buffer_resume_is_exact_once_d_wraps(script, tmp_path):
    """D of 200 transitions over 300-step stages wraps in stage 1; killed after stage 1 and
    resumed, the run ends with the uninterrupted run's weights and metrics."""
    module, tiny = (mw, MW_TINY) if script == "metaworld" else (atari, ATARI_TINY)
    args = dict(tiny, keep_buffer=True, buffer_size=200, batch_size=8)
    full = module.main(module.Args(**args, runs_dir=str(tmp_path / "full")))
    run_dir = kill_after_stage(module, module.Args(**args, runs_dir=str(tmp_path / "killed")), 1)
    saved = load(os.path.join(run_dir, "checkpoint.pt"))["rb"]
    assert (len(saved["rows"]) if script == "metaworld" else len(saved["actions"])) == 200  # D is full: it wrapped
    resumed = module.main(module.Args(resume=run_dir, cuda=False))
    assert resumed["sr"] == full["sr"]
    a = load(tmp_path / "full" / full["run_name"] / "checkpoint.pt")
    b = load(os.path.join(run_dir, "checkpoint.pt"))
    for name, tensor in a["actor"].items():
        assert torch.equal(tensor, b["actor"][name]), name


def killed_run(tmp_path):
    return kill_after_stage(mw, mw.Args(**MW_TINY, runs_dir=str(tmp_path)), 1)


@pytest.mark.e2e
@pytest.mark.parametrize("edit, expected", [
    (dict(skill_ratio=5.0), "its config.json: --skill-ratio must be in (0, 1], got 5.0"),
    (dict(tasks=["no-such-task", "reach"]), "its config.json: unknown task 'no-such-task'"),
    (dict(method="banana"), "its config.json: --method must be one of"),
    (dict(hidden=[32, 32]), "config.json differs from the config the run was started with (manifest.json) in --hidden"),
])
def test_resume_checks_what_it_reads(edit, expected, tmp_path, capsys):
    run_dir = killed_run(tmp_path)
    config_path = os.path.join(run_dir, "config.json")
    config = json.load(open(config_path))
    config["args"].update(edit)
    json.dump(config, open(config_path, "w"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        mw.main(mw.Args(resume=run_dir, cuda=False))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and len(err) == 1 and expected in err[0], err


@pytest.mark.e2e
def test_a_second_process_on_a_run_folder_stops(tmp_path, capsys):
    run_dir = killed_run(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", f"import sys, time; sys.path.insert(0, {ROOT!r}); import protocol; "
                               f"protocol.hold_run_folder({run_dir!r}); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit:
            mw.main(mw.Args(resume=run_dir, cuda=False))
        err = capsys.readouterr().err.strip().splitlines()
        assert exit.value.code == 2 and len(err) == 1 and f"is in use by another process (pid {holder.pid}" in err[0]
    finally:
        holder.kill()
        holder.wait()
    assert mw.main(mw.Args(resume=run_dir, cuda=False))["complete"]  # the lock died with its process


def make_unwritable(path):
    """chattr +i as root (permission bits do not bind root), chmod otherwise; None if neither works here."""
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", path]).returncode != 0:
            return None
        return lambda: subprocess.run(["chattr", "-i", path])
    os.chmod(path, 0o444)
    return lambda: os.chmod(path, 0o644)


@pytest.mark.e2e
def test_an_unwritable_checkpoint_is_found_before_training(tmp_path, capsys):
    run_dir = killed_run(tmp_path)
    checkpoint = os.path.join(run_dir, "checkpoint.pt")
    undo = make_unwritable(checkpoint)
    if undo is None:
        pytest.skip("this machine cannot make a file unwritable for its user")
    try:
        capsys.readouterr()
        started = time.time()
        with pytest.raises(SystemExit) as exit:
            mw.main(mw.Args(resume=run_dir, cuda=False))
        err = capsys.readouterr().err.strip().splitlines()
        assert exit.value.code == 2 and len(err) == 1 and f"cannot write {checkpoint!r}" in err[0]
        assert time.time() - started < 30 and not os.path.exists(checkpoint + ".tmp")
    finally:
        undo()


# --------------------------------------------------------------------------------------------
# The README's commands, from another working directory
# --------------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_readme_commands_run_from_any_folder(tmp_path):
    """The analysis commands of the README's *Reproducing the paper*, run as written (scripts/ by
    its path) from a folder that is not the repository, on a tiny two-task NBSP run."""
    def run(*argv):
        return subprocess.run([sys.executable, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))

    tiny = ["--tasks", "reach", "drawer-close", "--cycles", "1", "--steps-per-task", "300", "--learning-starts", "100",
            "--hidden", "16", "16", "--batch-size", "16", "--buffer-size", "1000", "--eval-episodes", "1",
            "--eval-every", "0", "--identify-episodes", "1", "--dpre-per-task", "100", "--no-cuda"]
    assert run(os.path.join(ROOT, "nbsp_sac_metaworld.py"), *tiny).returncode == 0
    run_dir = os.path.relpath(glob.glob(str(tmp_path / "runs" / "*"))[0], tmp_path)
    script = lambda name: os.path.join(ROOT, "scripts", name)  # noqa: E731
    commands = [
        [script("sweep.py"), "--list"],
        [script("paper_tables.py"), "runs/", "--iqm", "--format", "markdown", "latex", "--out", "results/tables"],
        [script("figures.py"), "curves", "runs/", "--out", "results/curves"],
        # a tiny run has no stage with both outcomes, which the default stage needs (test_figures)
        [script("figures.py"), "histogram", run_dir, "--stage", "1", "--out", "results/fig1"],
        [script("figures.py"), "plasticity", "runs/", "--out", "results/plasticity"],
        [script("neuron_analysis.py"), run_dir],
        [script("mini_report.py"), "--help"],
        [script("benchmark.py"), "--help"],
    ]
    for command in commands:
        result = run(*command)
        assert result.returncode == 0, (command, result.stderr[-1500:])
    for written in ("fig1.png", "fig1.pdf", "curves.png", "plasticity.png", "tables.md", "tables.tex"):
        assert os.path.isfile(tmp_path / "results" / written), written


@pytest.mark.parametrize("argv, expected", [
    (["figures.py", "histogram", "runs/x", "--bins", "0"], "--bins must be a positive integer"),
    (["figures.py", "histogram", "runs/x", "--device", "banana"], "--device must be"),
    (["paper_tables.py", "runs/", "--iqm", "--seed", "-1"], "--seed must be in [0, 2**32)"),
    (["paper_tables.py", "runs/", "--out", "{file}/x.md"], "is a file, not a folder"),
    (["sweep.py", "--dry-run", "--sequences", "no-such-task", "--seeds", "1"], "unknown task 'no-such-task'"),
    (["sweep.py", "--dry-run", "--sequences", "reach", "--seeds", "-1"], "--seed must be in [0,"),
    (["sweep.py", "--dry-run", "--sequences", "reach", "--seeds", "1", "--set", "no_such_flag=1"], "no_such_flag"),
    (["sweep.py", "--dry-run", "--sequences", "reach", "--seeds", "1", "--", "--skill-ratio", "nan"],
     "--skill-ratio must be in (0, 1], got nan"),
    (["sweep.py", "--sequences", "reach", "--slurm", "x.sh", "--slurm-cpus", "0"], "--slurm-cpus must be >= 1"),
])
def test_scripts_refuse_bad_input_in_one_line(argv, expected, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    argv = [a.replace("{file}", str(a_file)) for a in argv]
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", argv[0]), *argv[1:]], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], lines
    assert sorted(os.listdir(tmp_path)) == ["a_file"]


# --------------------------------------------------------------------------------------------
# The training scripts' --help: a description and an example, then the flags by topic
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", [mw, atari], ids=["metaworld", "atari"])
def test_training_help_reads_by_topic(script, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # one column of boxes (a wide terminal puts them side by side)
    topics = protocol.command_line_topics(script.Args)
    names = [f.name for _, cls in topics for f in dataclasses.fields(cls)]
    assert sorted(names) == sorted(f.name for f in dataclasses.fields(script.Args))  # each flag under one heading
    assert [name for name, _ in topics] == ["run", "video", "protocol", "sac", "nbsp", "method", "ewc", "npc", "ancl",
                                            "cotasp", "crelu", "cbp"]
    with pytest.raises(SystemExit) as exit:
        protocol.parse_args(script.Args, script.__doc__, ["--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip().endswith(" options") and line.strip() != "options"]
    sections = {lines[i].strip().removesuffix(" options"): "\n".join(lines[i:j])
                for i, j in zip(starts, [*starts[1:], len(lines)])}
    assert list(sections) == ["run", "video", "protocol", "sac", "nbsp", "method", "ewc", "npc", "ancl", "cotasp", "crelu", "cbp"]
    assert text.index("Example: python " + os.path.basename(script.__file__)) < text.index(lines[starts[0]])
    assert "--no-no-" not in text and "--mask, --no-mask" in text and "--replay, --no-replay" in text
    nbsp, ewc, ancl = (" ".join(sections[name].split()) for name in ("nbsp", "ewc", "ancl"))
    assert "--skill-ratio FLOAT" in nbsp and "--fisher-batches INT" in ewc and "--ewc-lambda FLOAT" in ewc
    assert "--fisher-batches INT" not in ancl and "--ancl-lambda FLOAT" in ancl
    assert "it also reads --fisher-batches, --fisher-critic" in ancl  # declared once, under EWC
    # the spellings users have in their scripts still parse, into the flat Args
    args = protocol.parse_args(script.Args, script.__doc__, ["--no-mask", "--no-replay", "--batch-size", "3",
                                                              "--method", "ewc", "--ewc-lambda", "5"])
    assert args == dataclasses.replace(script.Args(), mask=False, replay=False, batch_size=3, method="ewc", ewc_lambda=5.0)
