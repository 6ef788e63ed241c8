"""Results that vouch for themselves: a resume checks that its files belong together (fingerprint,
checksums, the types of config.json's values) and records what it changed; no diverged or
unstable number is counted; bad input of the training scripts stops with one line before anything
is written, and a failed write (a full disk) leaves nothing half-made."""

import glob
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch

import baselines
import nbsp_sac_atari as atari
import nbsp_sac_metaworld as mw
import protocol

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MW_TINY = dict(tasks=["drawer-close", "reach"], cycles=1, steps_per_task=200, learning_starts=100, hidden=[16, 16],
               batch_size=16, buffer_size=1000, eval_episodes=1, eval_every=0, identify_episodes=1, dpre_per_task=100,
               cuda=False)
ATARI_TINY = dict(games=["Pong", "Bowling"], cycles=1, steps_per_task=240, learning_starts=100, batch_size=8,
                  conv_channels=[4, 8, 8], hidden=[16], buffer_size=1000, dpre_per_task=100, eval_steps=100,
                  eval_envs=2, eval_every=0, identify_episodes=1, identify_max_steps=200, target_network_frequency=40,
                  cuda=False)


def one_error_line(capsys, call, code=2) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        call()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == code and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture(scope="module")
def stage_1_run(tmp_path_factory):
    """A Meta-World run killed after stage 1 (checkpoint, metrics.json and manifest.json written)."""
    runs = tmp_path_factory.mktemp("stage_1_run")
    original = protocol.atomic_write_json

    def killed_after_first_metrics(path, data):
        original(path, data)
        if path.endswith("metrics.json"):
            raise KeyboardInterrupt(path)

    protocol.atomic_write_json = killed_after_first_metrics
    try:
        with pytest.raises(KeyboardInterrupt) as stop:
            mw.main(mw.Args(**MW_TINY, runs_dir=str(runs)))
    finally:
        protocol.atomic_write_json = original
    run_dir = os.path.dirname(str(stop.value.args[0]))
    protocol.release_run_folder(run_dir)  # a killed process holds no lock
    return run_dir


@pytest.fixture
def killed(stage_1_run, tmp_path):
    """A fresh copy of the killed run's folder."""
    copy = str(tmp_path / os.path.basename(stage_1_run))
    shutil.copytree(stage_1_run, copy)
    return copy


def edit_config(run_dir, **changes):
    path = os.path.join(run_dir, "config.json")
    config = json.load(open(path))
    config["args"].update(changes)
    json.dump(config, open(path, "w"), indent=2)


# --------------------------------------------------------------------------------------------
# 1. A resumed run is the run that was started
# --------------------------------------------------------------------------------------------
@pytest.mark.e2e
@pytest.mark.parametrize("edit, expected", [
    (dict(tasks=["reach", "drawer-close"]), "--tasks (now [\"reach\", \"drawer-close\"]"),  # a mislabelled matrix
    (dict(q_lr=0.01), "--q-lr (now 0.01, started with 0.001)"),
    (dict(seed=7), "--seed (now 7, started with 1)"),
    (dict(cycles=2), "--cycles (now 2, started with 1)"),
    (dict(steps_per_task=300), "--steps-per-task (now 300, started with 200)"),
    (dict(eval_episodes=3, q_lr=0.01), "--eval-episodes (now 3, started with 1), --q-lr"),
])
def test_resume_refuses_a_config_that_differs_from_its_fingerprint(edit, expected, killed, capsys):
    edit_config(killed, **edit)
    line = one_error_line(capsys, lambda: mw.main(mw.Args(resume=killed, cuda=False)))
    assert "config.json differs from the config the run was started with (manifest.json)" in line and expected in line


@pytest.mark.e2e
@pytest.mark.parametrize("edit, expected", [
    (dict(seed="7"), "--seed must be an integer, got \"7\""),
    (dict(seed=None), "--seed must be an integer, got null"),
    (dict(hidden="32"), "--hidden must be a list of integers, got \"32\""),
    (dict(hidden=[32.0, 32.0]), "--hidden must be a list of integers, got [32.0, 32.0]"),
    (dict(steps_per_task=800.5), "--steps-per-task must be an integer, got 800.5"),
    (dict(q_lr="0.001"), "--q-lr must be a number, got \"0.001\""),
    (dict(buffer_size=5000.0), "--buffer-size must be an integer, got 5000.0"),
    (dict(skill_ratio=None), "--skill-ratio must be a number, got null"),
    (dict(cycles=True), "--cycles must be an integer, got true"),  # used to finish a 4-stage run as a 2-stage one
])
def test_resume_refuses_wrong_types_in_config(edit, expected, killed, capsys):
    edit_config(killed, **edit)
    line = one_error_line(capsys, lambda: mw.main(mw.Args(resume=killed, cuda=False)))
    assert "its config.json: " + expected in line


@pytest.mark.e2e
def test_resume_refuses_a_checkpoint_that_fails_its_checksum(killed, capsys):
    """A changed weight (one entry of the actor's first layer) loads fine, but not its checksum."""
    path = os.path.join(killed, "checkpoint.pt")
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["actor"]["trunk.0.weight"][0, 0] += 1.0
    torch.save(checkpoint, path)
    line = one_error_line(capsys, lambda: mw.main(mw.Args(resume=killed, cuda=False)))
    assert "checkpoint.pt fails its checksum (manifest.json)" in line


@pytest.mark.e2e
def test_resume_refuses_a_config_that_fails_its_checksum(killed, capsys):
    path = os.path.join(killed, "config.json")
    config = json.load(open(path))
    config["stage_tasks"] = ["reach", "drawer-close"]  # outside the flags, still not the run's
    json.dump(config, open(path, "w"))
    line = one_error_line(capsys, lambda: mw.main(mw.Args(resume=killed, cuda=False)))
    assert "config.json fails its checksum" in line


@pytest.mark.e2e
def test_resume_refuses_compile_of_a_run_started_without_it(killed, capsys):
    """A compiled update is not bit-identical to the eager one: --compile is not a resume override."""
    line = one_error_line(capsys, lambda: mw.main(mw.Args(resume=killed, cuda=False, compile=True)))
    assert "--resume continues with the run's own config.json; drop --compile" in line


@pytest.mark.parametrize("last_ran_on, warned", [
    ({"cpu_capability": "AVX512", "gpu": None}, True),  # another instruction set: other CPU kernels
    ({"cpu_capability": "here", "gpu": "NVIDIA H100"}, True),  # another device
    ({"cpu_capability": "here", "gpu": None}, False),  # the same processor
    ({"gpu": None}, False),  # a record from before `cpu_capability`: nothing to compare
])
def test_resume_on_another_processor_is_announced_and_recorded(tmp_path, capsys, last_ran_on, warned):
    """One seed's CPU runs differed between two machines with one CPU model name (docs/reliability.md):
    a resume on another processor goes on, says so, and records where it ran."""
    here = torch.backends.cpu.get_cpu_capability()
    last_ran_on = {key: here if value == "here" else value for key, value in last_ran_on.items()}
    args = mw.Args(cuda=False)
    config = {"args": asdict(args), "machine": {"cpu_capability": here, "gpu": None},
              "resumes": [{"machine": last_ran_on, "changed": []}]}  # the latest resume is where it last ran
    (tmp_path / "config.json").write_text(json.dumps(config))
    protocol.record_resume(args, str(tmp_path), {"stage": 1}, torch.device("cpu"))
    out = capsys.readouterr().out
    assert ("warning: resumed on another processor" in out) == warned, out
    recorded = json.loads((tmp_path / "config.json").read_text())["resumes"][-1]["machine"]
    assert recorded["cpu_capability"] == here and recorded["gpu"] is None


@pytest.mark.e2e
def test_resume_records_and_announces_its_overrides(killed, capsys):
    metrics = mw.main(mw.Args(resume=killed, cuda=False, checkpoint_every=0.0, progress_every=5.0))
    assert metrics["complete"]
    out = capsys.readouterr().out
    assert "resumed with --progress-every 5.0 (was 60.0), --checkpoint-every 0.0 (was 10.0)" in out
    config = json.load(open(os.path.join(killed, "config.json")))
    [resume] = config["resumes"]
    assert resume["stage"] == 2 and resume["step"] == 0 and "T" in resume["time"]
    for machine in (config["machine"], resume["machine"]):  # what ran the run, and what resumed it
        assert machine["cores"] == os.cpu_count() and machine["threads"] == torch.get_num_threads()
        assert machine["gpu"] is None and machine["cpu"]
        assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()  # "AVX2", "AVX512", ...
    assert "resumed on another processor" not in out  # the same machine
    assert resume["changed"] == [{"flag": "progress_every", "from": 60.0, "to": 5.0},
                                 {"flag": "checkpoint_every", "from": 10.0, "to": 0.0}]
    assert config["args"]["checkpoint_every"] == 10.0  # what the run was started with stays
    manifest = json.load(open(os.path.join(killed, "manifest.json")))
    for name in ("config.json", "checkpoint.pt", "metrics.json", "checkpoints/stage_1.pt", "checkpoints/stage_2.pt"):
        assert manifest["files"][name] == protocol.sha256_of(os.path.join(killed, name)), name


def test_a_replaced_file_is_vouched_for_at_every_moment(tmp_path, monkeypatch):
    """While checkpoint.pt is replaced, manifest.json accepts the old and the new checksum: a kill
    between the manifest's write and the rename leaves a file it vouches for."""
    run_dir = str(tmp_path / "run")
    protocol.hold_run_folder(run_dir)
    try:
        path = os.path.join(run_dir, "checkpoint.pt")
        protocol.atomic_torch_save(path, {"x": torch.zeros(3)})
        old = protocol.sha256_of(path)
        seen = []
        real_replace = os.replace

        def replace(src, dst):
            if dst == path:
                seen.append(json.load(open(os.path.join(run_dir, "manifest.json")))["files"]["checkpoint.pt"])
            real_replace(src, dst)

        monkeypatch.setattr(protocol.os, "replace", replace)
        protocol.atomic_torch_save(path, {"x": torch.ones(3)})
        assert seen == [[old, protocol.sha256_of(path)]]
        assert json.load(open(os.path.join(run_dir, "manifest.json")))["files"]["checkpoint.pt"] == protocol.sha256_of(path)
    finally:
        protocol.release_run_folder(run_dir)


# --------------------------------------------------------------------------------------------
# 2. No diverged or unstable number is counted
# --------------------------------------------------------------------------------------------
def test_the_divergence_check_covers_optimizer_and_method_state():
    net = torch.nn.Linear(3, 2)
    learner = type("Learner", (), {})()
    learner.optimizer = torch.optim.Adam(net.parameters())
    net(torch.ones(1, 3)).sum().backward()
    learner.optimizer.step()
    assert protocol.first_non_finite({}, protocol.optimizer_tensors(learner)) is None
    learner.optimizer.state[net.weight]["exp_avg_sq"][0, 0] = float("inf")
    assert protocol.first_non_finite({}, protocol.optimizer_tensors(learner)) == "optimizer.exp_avg_sq[0] (non-finite values)"
    fisher = {"fisher": {"actor": [torch.ones(2), torch.tensor([1.0, float("nan")])]}, "steps": 3}
    assert protocol.first_non_finite({}, protocol.floating_tensors(fisher, "method")) == \
        "method.fisher.actor.1 (non-finite values)"


@pytest.mark.e2e
def test_ewc_with_a_huge_lambda_stops_as_diverged_with_null_metrics(tmp_path):
    """--ewc-lambda 1e30 --fisher-critic used to finish `complete` with Adam's exp_avg_sq inf on a
    third of the actor's first layer; it now stops in stage 2 and metrics.json has no result."""
    cmd = [sys.executable, os.path.join(ROOT, "nbsp_sac_metaworld.py"), "--tasks", "reach", "drawer-close",
           "--steps-per-task", "250", "--learning-starts", "100", "--hidden", "8", "8", "--batch-size", "8",
           "--buffer-size", "1000", "--eval-episodes", "1", "--eval-every", "0", "--no-cuda", "--method", "ewc",
           "--ewc-lambda", "1e30", "--fisher-critic", "--fisher-batches", "2", "--runs-dir", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == protocol.DIVERGED_EXIT, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the run diverged" in errors[0] and "stage 2" in errors[0], errors
    metrics = json.load(open(glob.glob(str(tmp_path / "*" / "metrics.json"))[0]))
    assert metrics["diverged"]["stage"] == 2 and metrics["complete"] is False
    assert metrics["ASR"] is None and metrics["FM"] is None and metrics["FWT"] is None
    assert metrics["sr"][0][0] is not None  # the stage-1 row stays, for inspection, but counts for nothing


def test_a_diverged_run_writes_null_metrics(tmp_path):
    metrics = protocol.metrics_of("r", ["a", "b"], [[1.0]], "AR", task_success=[[1.0]], stages=[])
    assert metrics["AR"] == 1.0
    with pytest.raises(SystemExit) as exit:
        protocol.stop_diverged(str(tmp_path), metrics, "AR", {"stage": 2, "task": "b", "global_step": 9}, "x (nan)")
    written = json.load(open(tmp_path / "metrics.json"))
    assert exit.value.code == protocol.DIVERGED_EXIT
    assert (written["AR"], written["FM"], written["FWT"], written["complete"]) == (None, None, None, False)


@pytest.fixture(scope="module")
def reach_envs():
    return [mw.make_env("reach", protocol.EVAL_SEED_OFFSET + i) for i in range(2)]


def test_an_unstable_evaluation_episode_is_a_failure(reach_envs, monkeypatch):
    """A MuJoCo warning during an episode (its simulation was reset), even where the env then
    reports a success, makes the episode a failure; evaluate_all counts it."""
    warnings = mw.MujocoWarnings()
    real_step = type(reach_envs[0]).step

    def unstable_step(env, action):
        obs, reward, terminated, truncated, info = real_step(env, action)
        if env is reach_envs[0]:
            warnings("Nan, Inf or huge value in QACC at DOF 0. The simulation is unstable.")
        return obs, reward, terminated, truncated, info | {"success": 1.0}

    monkeypatch.setattr(type(reach_envs[0]), "step", unstable_step)
    unstable = {}
    policy = type("Policy", (), {"deterministic_action": staticmethod(lambda obs: torch.zeros(len(obs), 4))})
    method = type("Method", (), {"acting": staticmethod(lambda task: __import__("contextlib").nullcontext())})
    rates = mw.evaluate_all({"reach": reach_envs}, policy, method, 2, 0, torch.device("cpu"), warnings, unstable)
    assert rates == {"reach": 0.5} and unstable == {"reach": 1}


def test_a_non_finite_action_ends_the_episode_as_a_failure(reach_envs):
    warnings = mw.MujocoWarnings()
    result = mw.rollout(reach_envs, 2, lambda obs: torch.full((len(obs), 4), float("nan")), 0, torch.device("cpu"),
                        mujoco_warnings=warnings)
    assert result["unstable"].tolist() == [True, True] and result["success"].tolist() == [0.0, 0.0]


@pytest.mark.e2e
def test_the_stage_record_counts_unstable_evaluation_episodes(tmp_path):
    metrics = mw.main(mw.Args(**{**MW_TINY, "tasks": ["reach"], "steps_per_task": 100}, runs_dir=str(tmp_path)))
    assert metrics["stages"][0]["eval_unstable_episodes"] == {"reach": 0}


# --------------------------------------------------------------------------------------------
# 3. Bad input of the training scripts: one line, nothing written
# --------------------------------------------------------------------------------------------
HUGE = 10**20


@pytest.mark.parametrize("script, flags, expected", [
    ("mw", dict(cycles=HUGE), "--tasks x --cycles must be at most 10000 stages"),
    ("mw", dict(hidden=[HUGE, 16]), "--hidden must be at most 2147483647"),
    ("mw", dict(policy_frequency=HUGE), "--policy-frequency must be at most 2147483647"),
    ("mw", dict(buffer_size=HUGE), "--buffer-size must be at most 2147483647"),
    ("mw", dict(tasks=["reach", "reach-v3"]), "--tasks lists reach more than once"),
    ("mw", dict(runs_dir=""), "--runs-dir must name a folder"),
    ("mw", dict(exp_name="x" * 300), "give a shorter --exp-name"),
    ("atari", dict(conv_channels=[HUGE, 8, 8]), "--conv-channels must be at most 2147483647"),
    ("atari", dict(cycles=HUGE), "--games x --cycles must be at most 10000 stages"),
    ("atari", dict(games=["Pong", "pong"]), "--games lists Pong more than once"),
    ("atari", dict(exp_name="x" * 300), "give a shorter --exp-name"),
])
def test_bad_input_stops_before_anything_is_written(script, flags, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module, tiny = (mw, MW_TINY) if script == "mw" else (atari, ATARI_TINY)
    runs = str(tmp_path / "runs")
    line = one_error_line(capsys, lambda: module.main(module.Args(**{**tiny, "runs_dir": runs, **flags})))
    assert expected in line and os.listdir(tmp_path) == []


@pytest.mark.e2e
@pytest.mark.parametrize("script, flags, expected", [
    ("nbsp_sac_metaworld.py", ["--cycles", str(HUGE)], "--tasks x --cycles must be at most"),
    ("nbsp_sac_metaworld.py", ["--hidden", str(HUGE)], "--hidden must be at most"),
    ("nbsp_sac_metaworld.py", ["--policy-frequency", str(HUGE)], "--policy-frequency must be at most"),
    ("nbsp_sac_atari.py", ["--conv-channels", str(HUGE), "8", "8"], "--conv-channels must be at most"),
    ("nbsp_sac_atari.py", ["--runs-dir", "a-file/runs"], "'a-file' is a file"),  # before ALE's banner
    ("nbsp_sac_metaworld.py", ["--runs-dir", ""], "--runs-dir must name a folder"),
    ("nbsp_sac_metaworld.py", ["--tasks", "reach", "reach"], "--tasks lists reach more than once"),
])
def test_cli_bad_input_is_one_line(script, flags, expected, tmp_path):
    (tmp_path / "a-file").write_text("")
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), *flags], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 2 and result.stdout == "", result.stdout[-500:]
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert os.listdir(tmp_path) == ["a-file"]


@pytest.mark.e2e
def test_track_without_a_wandb_login_leaves_nothing(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    cmd = [sys.executable, os.path.join(ROOT, "nbsp_sac_metaworld.py"), "--tasks", "reach", "--track", "--no-cuda",
           "--runs-dir", str(tmp_path / "runs")]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                            env=dict(env, OMP_NUM_THREADS="1", HOME=str(tmp_path), WANDB_MODE="online"))
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(errors) == 1 and "--track could not start Weights & Biases" in errors[0], errors
    assert not os.path.exists(tmp_path / "runs")


def no_space(*args, **kwargs):
    raise OSError(28, "No space left on device")


def test_a_full_disk_at_config_json_leaves_no_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(protocol.os, "fsync", no_space)
    runs = tmp_path / "runs"
    line = one_error_line(capsys, lambda: mw.main(mw.Args(**MW_TINY, runs_dir=str(runs))))
    assert "config.json" in line and "No space left on device" in line
    assert os.listdir(tmp_path) == []  # neither the run folder nor --runs-dir, which it made


@pytest.mark.e2e
def test_a_full_disk_at_a_checkpoint_leaves_no_temporary_file(tmp_path, capsys, monkeypatch):
    real_save = torch.save

    def save(data, f, *args, **kwargs):
        if "actor" in data:  # the stage's checkpoint: torch reports the failed write as a RuntimeError
            raise RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 4096 vs 0")
        real_save(data, f, *args, **kwargs)

    monkeypatch.setattr(protocol.torch, "save", save)
    sac_tiny = {k: v for k, v in MW_TINY.items() if k not in ("identify_episodes", "dpre_per_task")}
    sac_tiny |= dict(tasks=["reach"], steps_per_task=100, method="sac")
    line = one_error_line(capsys, lambda: mw.main(mw.Args(**sac_tiny, runs_dir=str(tmp_path))))
    assert "cannot write" in line and "stage_1.pt" in line and "unexpected pos" in line
    [run_dir] = glob.glob(str(tmp_path / "*"))
    assert not glob.glob(os.path.join(run_dir, "**", "*.tmp"), recursive=True)
    assert os.path.isfile(os.path.join(run_dir, "config.json"))
    protocol.release_run_folder(run_dir)


@pytest.mark.e2e
def test_deleting_run_lock_does_not_free_the_folder(killed, capsys):
    """The lock is on the run folder itself: run.lock only names the holder."""
    holder = subprocess.Popen([sys.executable, "-c", f"import sys, time; sys.path.insert(0, {ROOT!r}); import protocol; "
                               f"protocol.hold_run_folder({killed!r}); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        os.remove(os.path.join(killed, "run.lock"))
        line = one_error_line(capsys, lambda: mw.main(mw.Args(resume=killed, cuda=False)))
        assert "is in use by another process" in line
    finally:
        holder.kill()
        holder.wait()


class MemoryChecked(Exception):
    pass


@pytest.mark.parametrize("script,tiny,row_bytes", [
    (mw, MW_TINY, lambda: mw.ReplayBuffer.row_bytes(39, 4)),
    (atari, ATARI_TINY, None)])
def test_dpre_takes_memory_only_where_replay_runs(script, tiny, row_bytes, tmp_path, monkeypatch):
    """D and Dpre are preallocated and checked against the device's memory: a run without replay
    (another --method, --no-replay) holds no Dpre (paper-size Atari: 2.1 GiB of GPU memory)."""
    needed = {}

    def record(nbytes, device, what):
        needed[setting] = (nbytes, what)
        raise MemoryChecked

    monkeypatch.setattr(protocol, "check_memory", record)
    args = {**{k: v for k, v in tiny.items() if k not in baselines.NBSP.flag_names}, "buffer_size": 1000,
            "runs_dir": str(tmp_path)}  # NBSP's flags at their defaults: other methods refuse them
    nbsp = {k: v for k, v in tiny.items() if k in baselines.NBSP.flag_names}
    settings = {"nbsp": {**nbsp, "dpre_per_task": 300}, "no-replay": {**nbsp, "replay": False}, "sac": {"method": "sac"}}
    for setting, flags in settings.items():
        with pytest.raises(MemoryChecked):
            script.main(script.Args(**args, **flags))
    if row_bytes:  # Meta-World: one row per transition; 2 stages, so Dpre holds one stage's share
        assert needed["nbsp"][0] == (1000 + 300) * row_bytes()
        assert needed["sac"][0] == needed["no-replay"][0] == 1000 * row_bytes()
    else:
        assert needed["nbsp"][0] == atari.ReplayBuffer.nbytes(1000) + atari.ReplayBuffer.nbytes(300)
        assert needed["sac"][0] == needed["no-replay"][0] == atari.ReplayBuffer.nbytes(1000) + atari.ReplayBuffer.nbytes(0)
    assert "Dpre (--dpre-per-task 300 x 1)" in needed["nbsp"][1] and "Dpre" not in needed["sac"][1]


def test_an_ale_game_id_names_the_run_folder_by_its_game(tmp_path):
    """--games ALE/Pong-v5 is accepted as Pong: the run folder is runs/Pong__..., not a folder ALE/."""
    metrics = atari.main(atari.Args(**dict(ATARI_TINY, games=["ALE/Pong-v5"], runs_dir=str(tmp_path))))
    assert os.listdir(tmp_path) == [metrics["run_name"]] and metrics["run_name"].startswith("Pong__")
