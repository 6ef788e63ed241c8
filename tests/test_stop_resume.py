"""Stopping a run with a signal and resuming it: the stop flag, the stop's checkpoint and line,
--checkpoint-every, and runs stopped at several moments that end exactly as their uninterrupted twins."""

import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import baselines
import nbsp_sac_atari
import nbsp_sac_metaworld
import protocol
from conftest import ANCL_AUX_FISHER_INTERVAL, checkpoint_tensors

MW = dict(tasks=["reach", "drawer-close"], cycles=1, hidden=[8, 8], batch_size=8, steps_per_task=300,
          learning_starts=100, eval_every=200, eval_episodes=1, identify_episodes=1, buffer_size=1000,
          dpre_per_task=50, replay_interval=2, cuda=False)
ATARI = dict(games=["Pong", "Bowling"], cycles=1, steps_per_task=200, learning_starts=60, batch_size=8,
             conv_channels=[4, 8, 8], hidden=[16], buffer_size=1000, dpre_per_task=100, eval_steps=60, eval_envs=1,
             eval_every=150, identify_episodes=1, identify_max_steps=200, target_network_frequency=40, cuda=False)
BASELINE_MW = {k: v for k, v in MW.items() if k not in ("identify_episodes", "dpre_per_task", "replay_interval")}  # NBSP's own flags
CASES = {  # name: script, flags, global step at whose end SIGTERM arrives
    "nbsp-learning-starts": (nbsp_sac_metaworld, MW, 50),
    "nbsp-stage-2": (nbsp_sac_metaworld, MW, 450),  # after stage 1's masks and Dpre exist
    "nbsp-keep-buffer": (nbsp_sac_metaworld, MW | dict(keep_buffer=True, buffer_size=400), 450),  # D has wrapped
    "sac": (nbsp_sac_metaworld, BASELINE_MW | dict(method="sac"), 250),
    "ewc-stage-2": (nbsp_sac_metaworld, BASELINE_MW | dict(method="ewc", fisher_batches=2), 420),
    "npc-stage-2": (nbsp_sac_metaworld, BASELINE_MW | dict(method="npc"), 450),  # the stage's importance average is under way
    # stage 2's 109th update: the auxiliary learner has trained, F_aux was estimated at the 100th, its window holds one batch
    "ancl-stage-2": (nbsp_sac_metaworld, BASELINE_MW | dict(method="ancl", fisher_batches=2, fisher_critic=True), 509),
    # inside the third round's prompt phase: the prompt's Adam has moments and the round's clock runs
    "cotasp-stage-2": (nbsp_sac_metaworld, BASELINE_MW | dict(method="cotasp", hidden=[32, 32], cotasp_weight_steps=40,
                                                              cotasp_prompt_steps=10), 545),
    "atari-stage-2": (nbsp_sac_atari, ATARI, 300),
}


def scalars(run_dir):
    """TensorBoard's scalars as TensorBoard reads them (a resumed run's purge applied), SPS aside."""
    events = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"] if tag != "charts/SPS"}


def test_stop_signals_note_the_first_signal_only():
    stop, previous = protocol.StopSignals(), signal.getsignal(signal.SIGINT)
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGINT)  # a second signal while stopping: ignored, no KeyboardInterrupt
        assert stop.received == signal.SIGUSR1
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGINT) is previous


def stop_at(monkeypatch, global_step, signum=signal.SIGTERM):
    original = protocol.Run.end_step

    def end_step(self, step, stage_state):
        if self.global_step == global_step:
            os.kill(os.getpid(), signum)
        return original(self, step, stage_state)

    monkeypatch.setattr(protocol.Run, "end_step", end_step)


@pytest.mark.e2e
@pytest.mark.parametrize("case", CASES)
def test_stopped_run_resumes_exactly(case, tmp_path, monkeypatch, capsys):
    script, flags, global_step = CASES[case]
    monkeypatch.setattr(baselines.METHODS["ancl"], "aux_fisher_interval", ANCL_AUX_FISHER_INTERVAL)  # estimates within a tiny stage
    twin = script.main(script.Args(runs_dir=str(tmp_path / "twin"), **flags))
    [twin_dir] = glob.glob(str(tmp_path / "twin" / "*"))
    with monkeypatch.context() as patch:
        stop_at(patch, global_step)
        with pytest.raises(SystemExit) as stopped:
            script.main(script.Args(runs_dir=str(tmp_path / "stopped"), **flags))
    assert stopped.value.code == protocol.STOPPED_EXIT
    [run_dir] = glob.glob(str(tmp_path / "stopped" / "*"))
    stage, step = divmod(global_step, flags["steps_per_task"])
    line = (f"stopped at stage {stage + 1}, step {step}; resume with: python {os.path.relpath(script.__file__)} "
            f"--resume {run_dir}")
    assert capsys.readouterr().out.splitlines()[-1] == line
    assert torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)["mid_stage"]["step"] == step
    with open(os.path.join(run_dir, "run.lock")) as lock:  # a stopped run leaves it, naming its last holder
        assert lock.read().startswith(f"pid {os.getpid()} on ")
    resumed = script.main(script.Args(resume=run_dir))
    assert not os.path.exists(os.path.join(run_dir, "run.lock")) and not os.path.exists(os.path.join(twin_dir, "run.lock"))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("run folder ") and lines[1] == f"resuming {run_dir} at stage {stage + 1}, step {step}"
    assert resumed["sr"] == twin["sr"]
    got, want = (checkpoint_tensors(d) for d in (run_dir, twin_dir))
    assert got.keys() == want.keys() and [k for k in want if not torch.equal(got[k], want[k])] == []
    assert scalars(run_dir) == scalars(twin_dir)


@pytest.mark.e2e
def test_a_resumed_stage_counts_its_time_before_the_stop(tmp_path, monkeypatch):
    """A stage's wall_seconds: the time before the stop (in the checkpoint) plus the resumed part,
    not the time between the stop and the resume."""
    with monkeypatch.context() as patch:
        stop_at(patch, 450)  # stage 2, step 150
        original = protocol.Run.end_step

        def slow_step(self, step, stage_state):  # the stage's part before the stop takes 5 s more
            if self.global_step == 449:
                time.sleep(5.0)
            return original(self, step, stage_state)

        patch.setattr(protocol.Run, "end_step", slow_step)
        with pytest.raises(SystemExit):
            nbsp_sac_metaworld.main(nbsp_sac_metaworld.Args(runs_dir=str(tmp_path), **MW))
    [run_dir] = glob.glob(str(tmp_path / "*"))
    before = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)["mid_stage"]["stage_seconds"]
    assert before > 5.0
    time.sleep(2.0)
    start = time.time()
    metrics = nbsp_sac_metaworld.main(nbsp_sac_metaworld.Args(resume=run_dir))
    took = time.time() - start
    assert 0 < before <= metrics["stages"][1]["wall_seconds"] <= before + took + 0.01


@pytest.mark.e2e
def test_stop_during_a_stage_end_stops_before_the_next_stage(tmp_path, monkeypatch, capsys):
    # the signal comes during stage 1's evaluation: the stage ends and checkpoints, then the run stops
    flags = dict(MW, eval_every=0)
    original = protocol.Run.evaluate_stage

    def evaluate_stage(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(protocol.Run, "evaluate_stage", evaluate_stage)
    with pytest.raises(SystemExit) as stopped:
        nbsp_sac_metaworld.main(nbsp_sac_metaworld.Args(runs_dir=str(tmp_path), **flags))
    assert stopped.value.code == protocol.STOPPED_EXIT
    [run_dir] = glob.glob(str(tmp_path / "*"))
    assert capsys.readouterr().out.splitlines()[-1].startswith("stopped at stage 2, step 0; resume with: ")
    assert "mid_stage" not in torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)


@pytest.mark.e2e
def test_checkpoint_every_writes_mid_stage_checkpoints(tmp_path, monkeypatch):
    written = []
    original = protocol.atomic_torch_save

    def save(path, data):
        written.append((os.path.basename(path), data.get("mid_stage", {}).get("step")))
        original(path, data)

    monkeypatch.setattr(protocol, "atomic_torch_save", save)
    flags = dict(MW, tasks=["reach"], steps_per_task=150, learning_starts=50, eval_every=0)
    nbsp_sac_metaworld.main(nbsp_sac_metaworld.Args(runs_dir=str(tmp_path), checkpoint_every=1e-9, **flags))
    mid = [step for name, step in written if name == "checkpoint.pt" and step is not None]
    assert mid == list(range(1, 150))  # every step but the last (the stage's end checkpoints it)
    assert written[-1] == ("checkpoint.pt", None)


# A compiled run's parts run in their own processes, as a user's do: each compiles its own graphs
# (stage 2's graph is a recompile in the uninterrupted run, a first compile in the resumed one).
COMPILED_PART = """
import os, signal, sys
import protocol, nbsp_sac_metaworld
stop_at_global_step = int(sys.argv[2])
original = protocol.Run.end_step
def end_step(self, step, stage_state):
    if self.global_step == stop_at_global_step:
        os.kill(os.getpid(), signal.SIGTERM)
    return original(self, step, stage_state)
protocol.Run.end_step = end_step
nbsp_sac_metaworld.main(nbsp_sac_metaworld.Args(runs_dir=sys.argv[1], compile=True, **{flags!r}))
"""


@pytest.mark.e2e
def test_compiled_run_stopped_in_stage_2_resumes_exactly(tmp_path):
    """--compile: NBSP stopped mid-stage 2 (masks and Dpre on) and resumed with the command its
    stop line prints ends with every checkpoint tensor of its uninterrupted twin."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def run(*argv):
        return subprocess.run([sys.executable, *argv], cwd=root, env=env, capture_output=True, text=True, timeout=600)

    part = COMPILED_PART.format(flags=MW)
    twin = run("-c", part, str(tmp_path / "twin"), "-1")
    stopped = run("-c", part, str(tmp_path / "stopped"), "450")
    assert (twin.returncode, stopped.returncode) == (0, protocol.STOPPED_EXIT), twin.stderr + stopped.stderr
    [twin_dir], [run_dir] = (glob.glob(str(tmp_path / name / "*")) for name in ("twin", "stopped"))
    assert stopped.stdout.splitlines()[-1] == f"stopped at stage 2, step 150; resume with: python nbsp_sac_metaworld.py --resume {run_dir}"
    resumed = run("nbsp_sac_metaworld.py", "--resume", run_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.splitlines()[1] == f"resuming {run_dir} at stage 2, step 150"
    got, want = (checkpoint_tensors(d) for d in (run_dir, twin_dir))
    assert got.keys() == want.keys() and [k for k in want if not torch.equal(got[k], want[k])] == []
    assert scalars(run_dir) == scalars(twin_dir)
