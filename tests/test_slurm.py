"""Tests of the Slurm path: the job-array script of `scripts/sweep.py --slurm`, `slurm.py`'s
launcher and requeue, and (marked e2e) the script run by a real single-node Slurm started in a
temporary folder: munged, slurmctld and slurmd as root, without systemd or cgroups.

The e2e tests need Debian's `slurmctld slurmd slurm-client munge` (`.ci/run --install-slurm`) and
root; elsewhere they are skipped with the reason, and with NBSP_REQUIRE_SLURM=1 (CI) they fail."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = os.path.join(ROOT, "scripts", "sweep.py")

import slurm  # noqa: E402
from conftest import checkpoint_tensors  # noqa: E402


# one short Meta-World stage per task (gradient updates, identification, evaluation)
TINY = ["--cycles", "1", "--hidden", "8", "8", "--batch-size", "8", "--steps-per-task", "300",
        "--learning-starts", "100", "--eval-every", "0", "--eval-episodes", "2", "--identify-episodes", "2",
        "--buffer-size", "1000", "--dpre-per-task", "100", "--no-cuda"]


def run_sweep(*argv, cwd=None):
    return subprocess.run([sys.executable, SWEEP, *argv], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def write_run(runs_dir, name, checkpoint=False, complete=None, tasks=("reach",), exp_name="nbsp", seed=1):
    """A run folder as the training scripts leave it (config.json; checkpoint.pt and metrics.json as asked)."""
    folder = os.path.join(runs_dir, name)
    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"run_name": name, "args": {"tasks": list(tasks), "exp_name": exp_name, "seed": seed}}, f)
    if checkpoint:
        open(os.path.join(folder, "checkpoint.pt"), "wb").close()
    if complete is not None:
        with open(os.path.join(folder, "metrics.json"), "w") as f:
            json.dump({"complete": complete}, f)
    return folder


# ---------------------------------------------------------------------------------------------
# the job-array script
# ---------------------------------------------------------------------------------------------
def test_script_requeues_signals_and_execs(tmp_path):
    out_sh, runs_dir = str(tmp_path / "a.sh"), str(tmp_path / "runs")
    res = run_sweep("--sequences", "reach", "--settings", "nbsp", "sac", "--seeds", "1", "--runs-dir", runs_dir,
                    "--slurm", out_sh, "--slurm-gpus", "0", "--", *TINY)
    assert res.returncode == 0, res.stderr
    text = open(out_sh).read()
    for line in ["#SBATCH --requeue", "#SBATCH --open-mode=append", "#SBATCH --signal=B:USR1@300",
                 "trap '' USR1", f"export {slurm.MAX_REQUEUES_ENV}=5",
                 'exec "${LAUNCH[@]}" "${LABELS[$i]}" "$RUNS_DIR" -- "${RUN[@]}"']:
        assert line + "\n" in text
    assert "LABELS=(\n  reach__nbsp__1\n  reach__sac__1\n)" in text  # index -> the run's fixed label
    # the trap comes before anything that could take time, the SBATCH lines before any command
    assert text.index("#SBATCH --signal") < text.index("trap '' USR1") < text.index("set -euo pipefail")
    run_sweep("--sequences", "reach", "--seeds", "1", "--runs-dir", runs_dir, "--slurm", out_sh, "--slurm-gpus", "0",
              "--slurm-signal-grace", "90", "--slurm-max-requeues", "2", "--", *TINY)
    text = open(out_sh).read()
    assert "#SBATCH --signal=B:USR1@90\n" in text and f"export {slurm.MAX_REQUEUES_ENV}=2\n" in text


def test_script_again_lists_only_unfinished_runs(tmp_path):
    out_sh, runs_dir = str(tmp_path / "a.sh"), str(tmp_path / "runs")
    grid = ["--sequences", "reach", "--settings", "nbsp", "sac", "--seeds", "1", "--runs-dir", runs_dir,
            "--slurm", out_sh, "--slurm-gpus", "0", "--", *TINY]
    write_run(runs_dir, "reach__nbsp__1__100", checkpoint=True, complete=True)
    res = run_sweep(*grid)
    assert res.returncode == 0 and "1 array tasks (1 complete runs left out)" in res.stdout, res.stdout + res.stderr
    text = open(out_sh).read()
    assert "#SBATCH --array=0-0\n" in text and "LABELS=(\n  reach__sac__1\n)" in text
    write_run(runs_dir, "reach__sac__1__200", checkpoint=True, complete=True, exp_name="sac")
    os.remove(out_sh)
    res = run_sweep(*grid)
    assert res.returncode == 0 and "nothing to do" in res.stdout and not os.path.exists(out_sh)


@pytest.mark.parametrize("flag,value", [
    ("--slurm-job-name", "nbsp\nscancel -u root"), ("--slurm-partition", "gpu\n#SBATCH --mem=1"),
    ("--slurm-account", "a b"), ("--slurm-time", "1:00\r"), ("--slurm-mem", ""), ("--slurm-signal-grace", "0"),
    ("--slurm-max-requeues", "-1"), ("--log-dir", "logs\nrm -rf x"),
])
def test_script_refuses_values_that_break_a_line(tmp_path, flag, value):
    out_sh = str(tmp_path / "a.sh")
    res = run_sweep("--sequences", "reach", "--seeds", "1", "--runs-dir", str(tmp_path / "runs"), "--slurm", out_sh,
                    flag, value)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: " + flag), res.stderr
    assert not os.path.exists(out_sh)


def test_script_comments_keep_newlines_out(tmp_path):
    # a newline in a value that only reaches a comment (here the --tag, in every label) stays in it
    out_sh = str(tmp_path / "a.sh")
    res = run_sweep("--sequences", "reach", "--seeds", "1", "--tag", "x\ntouch injected", "--runs-dir", "runs",
                    "--slurm", out_sh, "--slurm-gpus", "0", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "# written by: python scripts/sweep.py --sequences reach --seeds 1 --tag 'x\\ntouch injected'" in open(out_sh).read()
    dry = subprocess.run(["bash", out_sh], capture_output=True, text=True, cwd=tmp_path,
                         env=dict(os.environ, SLURM_ARRAY_TASK_ID="0", SWEEP_DRY_RUN="1"))
    assert dry.returncode == 0 and "--exp-name 'nbsp_x\ntouch injected'" in dry.stdout
    assert not os.path.exists(tmp_path / "injected")


# ---------------------------------------------------------------------------------------------
# slurm.py: the launcher and the requeue
# ---------------------------------------------------------------------------------------------
COMMAND = ["python", "nbsp_sac_metaworld.py", "--tasks", "reach", "--exp-name", "nbsp", "--seed", "1",
           "--runs-dir", "R", "--hidden", "8", "8", "--no-cuda", "--compile", "--progress-every", "30"]


def test_launch_plan(tmp_path):
    runs_dir = str(tmp_path)
    assert slurm.plan("reach__nbsp__1", runs_dir, COMMAND) == ("new", COMMAND)
    write_run(runs_dir, "reach__nbsp__1__100", checkpoint=True)
    newest = write_run(runs_dir, "reach__nbsp__1__200", checkpoint=True, complete=False)
    write_run(runs_dir, "reach__nbsp__1__300")  # never finished a stage: nothing to resume
    write_run(runs_dir, "reach__nbsp__10__400", checkpoint=True, seed=10)  # another label
    write_run(runs_dir, "reach__nbsp__1__copy", checkpoint=True)  # not a run name
    assert slurm.plan("reach__nbsp__1", runs_dir, COMMAND) == (
        "resume", ["python", "nbsp_sac_metaworld.py", "--resume", newest, "--no-cuda", "--progress-every", "30"])  # --compile: the run's own
    write_run(runs_dir, "reach__nbsp__1__50", checkpoint=True, complete=True)
    assert slurm.plan("reach__nbsp__1", runs_dir, COMMAND) == ("complete", None)


def launch(runs_dir, *command, env=None):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "slurm.py"), "launch", "reach__nbsp__1", runs_dir,
                             "--", *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, **(env or {})))


def test_launch_execs_and_holds_the_label(tmp_path):
    runs_dir = str(tmp_path)
    # the command replaces the launcher (same process) and keeps the label's lock while it runs
    first = launch(runs_dir, sys.executable, "-c", "import os, time; print(os.getpid(), flush=True); time.sleep(60)",
                   env={"SLURM_JOB_ID": "41"})
    try:
        assert first.stdout.readline().strip() == "slurm: reach__nbsp__1: new (job 41, restart 0): " + " ".join(
            [sys.executable, "-c", "import os, time; print(os.getpid(), flush=True); time.sleep(60)"])
        assert int(first.stdout.readline()) == first.pid
        second = launch(runs_dir, "true")
        _, err = second.communicate(timeout=60)
        assert second.returncode == slurm.LOCKED_EXIT
        assert err.strip() == (f"slurm: reach__nbsp__1 is running elsewhere (pid {first.pid} on {os.uname().nodename}, "
                               f"slurm job 41); this task stops (exit {slurm.LOCKED_EXIT})")
    finally:
        first.kill()
        first.communicate()
    third = launch(runs_dir, "true")  # the lock died with its holder
    third.communicate(timeout=60)
    assert third.returncode == 0


def test_launch_ends_a_complete_run(tmp_path):
    write_run(str(tmp_path), "reach__nbsp__1__100", checkpoint=True, complete=True)
    done = launch(str(tmp_path), "false")
    out, _ = done.communicate(timeout=60)
    assert done.returncode == 0 and out.strip() == f"slurm: reach__nbsp__1 is complete in {tmp_path}; nothing to do"


def test_launch_bad_usage():
    res = subprocess.run([sys.executable, os.path.join(ROOT, "slurm.py"), "launch", "a/b", "runs", "--", "true"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and res.stderr.startswith("error: usage:")


@pytest.fixture
def fake_scontrol(tmp_path, monkeypatch):
    """`scontrol` on PATH that records its arguments; its exit status is the file `status`'s."""
    (tmp_path / "status").write_text("0")
    path = tmp_path / "scontrol"
    path.write_text(f'#!/bin/bash\necho "$*" >> {tmp_path}/calls\necho "refused" >&2\n'
                    f'exit $(cat {tmp_path}/status)\n')
    path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    for name in ("SLURM_JOB_ID", slurm.MAX_REQUEUES_ENV, "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def test_requeue_self(fake_scontrol, monkeypatch, capsys):
    calls = fake_scontrol / "calls"
    assert not slurm.requeue_self()  # not under Slurm
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    assert not slurm.requeue_self()  # no limit: the job script did not ask for it
    monkeypatch.setenv(slurm.MAX_REQUEUES_ENV, "2")
    assert slurm.requeue_self() and calls.read_text() == "requeue 123\n"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert slurm.requeue_self()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert not slurm.requeue_self() and calls.read_text().count("\n") == 2
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    (fake_scontrol / "status").write_text("1")
    assert not slurm.requeue_self()
    err = capsys.readouterr().err.splitlines()
    assert err == ["slurm: job 123 requeued (restart 1 of at most 2)",
                   "slurm: job 123 requeued (restart 2 of at most 2)",
                   f"slurm: job 123 not requeued: it has restarted 2 times ({slurm.MAX_REQUEUES_ENV}=2)",
                   "slurm: job 123 not requeued: refused"]


# ---------------------------------------------------------------------------------------------
# a real single-node Slurm
# ---------------------------------------------------------------------------------------------
def slurm_missing() -> str | None:
    missing = [p for p in ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol") if not shutil.which(p)]
    if missing:
        return f"Slurm is not installed (no {', '.join(missing)}; .ci/run --install-slurm installs it)"
    if os.geteuid() != 0:
        return "the test's Slurm daemons run as root"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# states a job does not leave (a preempted job of a --requeue script is requeued; SIGNALING, as a
# time-limit warning is delivered, and REQUEUED pass)
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


class Cluster:
    """munged, slurmctld and slurmd in `folder`; clients reach them through SLURM_CONF."""

    def __init__(self, folder):
        self.folder, self.procs = str(folder), []
        self.env = dict(os.environ, SLURM_CONF=os.path.join(self.folder, "slurm.conf"), OMP_NUM_THREADS="1")
        node = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
        self.node = node.split()[0].split("=")[1]
        munge_socket = os.path.join(self.folder, "munge.socket")
        key = os.path.join(self.folder, "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        for sub in ("state", "spool"):
            os.makedirs(os.path.join(self.folder, sub))
        with open(self.env["SLURM_CONF"], "w") as f:
            f.write("\n".join([
                "ClusterName=nbsptest", f"SlurmctldHost={self.node}(127.0.0.1)",
                f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}", "SlurmUser=root", "SlurmdUser=root",
                "AuthType=auth/munge", "CredType=cred/munge",
                # a requeued job waits for its credential to expire: 10 s instead of 120
                f"AuthInfo=socket={munge_socket},cred_expire=10",
                f"StateSaveLocation={self.folder}/state", f"SlurmdSpoolDir={self.folder}/spool",
                f"SlurmctldPidFile={self.folder}/slurmctld.pid", f"SlurmdPidFile={self.folder}/slurmd.pid",
                f"SlurmctldLogFile={self.folder}/slurmctld.log", f"SlurmdLogFile={self.folder}/slurmd.log",
                # no systemd, no cgroups
                "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none", "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core", "MpiDefault=none", "ReturnToService=2", "KillWait=10",
                "MinJobAge=600",  # finished jobs stay visible to scontrol
                f"{node.replace(f'NodeName={self.node}', f'NodeName={self.node} NodeAddr=127.0.0.1')} State=UNKNOWN",
                "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""]))
        self.start(["munged", "-F", "--force", f"--key-file={key}", f"--socket={munge_socket}",
                    f"--pid-file={self.folder}/munged.pid", f"--log-file={self.folder}/munged.log",
                    f"--seed-file={self.folder}/munged.seed"], "munged")
        self.wait_for(lambda: os.path.exists(munge_socket), "munged's socket")
        self.start(["slurmctld", "-D", "-i", "-f", self.env["SLURM_CONF"]], "slurmctld")
        self.start(["slurmd", "-D", "-f", self.env["SLURM_CONF"], "-N", self.node], "slurmd")
        self.wait_for(lambda: "idle" in self.run("sinfo", "-h", "-o", "%t").stdout, "an idle node")

    def start(self, command, name):
        log = open(os.path.join(self.folder, name + ".out"), "w")
        self.procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env))

    def run(self, *command):
        return subprocess.run(command, capture_output=True, text=True, env=self.env, timeout=60)

    def wait_for(self, ready, what, timeout=60):
        end = time.time() + timeout
        while not ready():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.time() > end:
                logs = {n: open(os.path.join(self.folder, n)).read()[-1500:] for n in os.listdir(self.folder)
                        if n.endswith((".log", ".out"))}
                raise AssertionError(f"waiting for {what}: {'died: ' + ' '.join(dead) if dead else 'timed out'}; {logs}")
            time.sleep(0.2)

    def submit(self, script, **env):
        res = subprocess.run(["sbatch", "--parsable", script], capture_output=True, text=True, timeout=60,
                             env=dict(self.env, **env))
        assert res.returncode == 0, res.stderr
        return res.stdout.strip().split(";")[0]

    def jobs(self, array_id):
        """{array index: (job id, state, restarts)} of an array job."""
        out = self.run("scontrol", "-o", "show", "job", array_id).stdout
        jobs = {}
        for line in out.splitlines():
            fields = dict(word.split("=", 1) for word in line.split() if "=" in word)
            for part in fields["ArrayTaskId"].split("%")[0].split(","):  # pending tasks: one line, `0-3%2`
                first, _, last = part.partition("-")
                for index in range(int(first), int(last or first) + 1):
                    jobs[index] = (fields["JobId"], fields["JobState"], int(fields["Restarts"]))
        return jobs

    def wait_done(self, array_id, tasks, timeout):
        def done():
            jobs = self.jobs(array_id)
            return len(jobs) == tasks and all(state in FINAL_STATES for _, state, _ in jobs.values())
        self.wait_for(done, f"array job {array_id}", timeout)
        return self.jobs(array_id)

    def stop(self):
        self.run("scancel", "--user=root")  # the jobs of this cluster only (its SLURM_CONF)
        for proc in reversed(self.procs):  # by PID: slurmd, slurmctld, munged
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = slurm_missing()
    if why:
        if os.environ.get("NBSP_REQUIRE_SLURM") == "1":
            pytest.fail(f"NBSP_REQUIRE_SLURM=1 but {why}")
        pytest.skip(why)
    started = Cluster(tmp_path_factory.mktemp("slurm"))
    yield started
    started.stop()


def sweep_script(tmp_path, runs_dir, grid, *slurm_flags, extra=TINY, python=sys.executable):
    out_sh = str(tmp_path / f"job{len(os.listdir(tmp_path))}.sh")
    res = run_sweep(*grid, "--runs-dir", runs_dir, "--python", python, "--slurm", out_sh, "--slurm-gpus", "0",
                    "--slurm-cpus", "1", "--slurm-time", "10:00", *slurm_flags, "--", *extra)
    assert res.returncode == 0, res.stderr
    return out_sh


def folders(runs_dir):
    return sorted(d for d in os.listdir(runs_dir) if os.path.isfile(os.path.join(runs_dir, d, "config.json")))


def metrics(runs_dir, name):
    with open(os.path.join(runs_dir, name, "metrics.json")) as f:
        return json.load(f)


def stage_1_written(runs_dir):
    """The one run in `runs_dir` has written its first stage (metrics.json follows checkpoint.pt)."""
    names = folders(runs_dir) if os.path.isdir(runs_dir) else []
    return bool(names) and os.path.isfile(os.path.join(runs_dir, names[0], "metrics.json"))


@pytest.mark.e2e
def test_every_task_completes(cluster, tmp_path):
    runs_dir = str(tmp_path / "runs")
    grid = ["--sequences", "reach", "--settings", "nbsp", "sac", "--seeds", "1"]
    array_id = cluster.submit(sweep_script(tmp_path, runs_dir, grid))
    jobs = cluster.wait_done(array_id, 2, timeout=600)
    assert {state for _, state, _ in jobs.values()} == {"COMPLETED"}, jobs
    assert [name.rsplit("__", 1)[0] for name in folders(runs_dir)] == ["reach__nbsp__1", "reach__sac__1"]
    assert all(metrics(runs_dir, name)["complete"] for name in folders(runs_dir))
    assert "nothing to do" in run_sweep(*grid, "--runs-dir", runs_dir, "--slurm", str(tmp_path / "again.sh"),
                                        "--slurm-gpus", "0", "--", *TINY).stdout


@pytest.mark.e2e
def test_requeued_task_resumes_its_folder(cluster, tmp_path):
    # one two-stage run requeued while in stage 2, and its uninterrupted twin in another folder
    grid = ["--sequences", "reach,push", "--seeds", "1"]
    extra = [*TINY, "--steps-per-task", "3000"]  # stage 2 lasts long enough for the requeue to land inside it
    requeued, twin = str(tmp_path / "requeued"), str(tmp_path / "twin")
    array_id = cluster.submit(sweep_script(tmp_path, requeued, grid, extra=extra))
    twin_id = cluster.submit(sweep_script(tmp_path, twin, grid, extra=extra))

    cluster.wait_for(lambda: stage_1_written(requeued), "stage 1 of the run to be requeued", timeout=600)
    job_id = cluster.jobs(array_id)[0][0]
    assert cluster.run("scontrol", "requeue", job_id).returncode == 0
    jobs = cluster.wait_done(array_id, 1, timeout=600)
    cluster.wait_done(twin_id, 1, timeout=600)
    assert jobs[0][1:] == ("COMPLETED", 1), jobs  # done after one restart
    [name], [twin_name] = folders(requeued), folders(twin)  # the requeued task continued its own folder
    log = open(os.path.join(requeued, "sweep_logs", "reach+push__nbsp__1.log")).read()
    first, resumed = log.split("restart 1: ", 1)
    assert "stage 1/2 reach" in first and "slurm: reach+push__nbsp__1: resume" in resumed
    # stopped by the requeue's SIGTERM within stage 2 (docs/slurm.md), resumed at that step
    assert "stopped at stage 2, step" in first and f"resuming {os.path.join(requeued, name)} at stage 2, step" in resumed
    done, expected = metrics(requeued, name), metrics(twin, twin_name)
    assert done["complete"] and done["sr"] == expected["sr"]
    got, want = checkpoint_tensors(os.path.join(requeued, name)), checkpoint_tensors(os.path.join(twin, twin_name))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


PROBE = """#!{python}
# an 'interpreter' for the sweep's --python: runs slurm.py's launcher as the real one, and for the
# training command records how SIGUSR1 was set when it started and when it came
import os, signal, sys, time
if sys.argv[1].endswith("slurm.py"):
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
start = time.time()
record = open(os.environ["PROBE_RECORD"], "a")
record.write(f"start ignored={{signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN}} pid={{os.getpid()}}\\n")
record.flush()
def warned(signum, frame):
    record.write(f"USR1 after {{time.time() - start:.0f}}\\n")
    record.flush()
    sys.exit(0)
signal.signal(signal.SIGUSR1, warned)
time.sleep(600)
"""


@pytest.mark.e2e
def test_time_limit_warns_the_training_process(cluster, tmp_path):
    # Slurm checks time limits every ~30 s: with --time=2:00 and a 60 s warning, SIGUSR1 comes 60-90 s
    # after the start, before the limit, to the exec'ed process at the end of the script's chain
    probe = tmp_path / "probe"
    probe.write_text(PROBE.format(python=sys.executable))
    probe.chmod(0o755)
    record = tmp_path / "record"
    out_sh = sweep_script(tmp_path, str(tmp_path / "runs"), ["--sequences", "reach", "--seeds", "1"],
                          "--slurm-time", "2:00", "--slurm-signal-grace", "60", python=str(probe))
    array_id = cluster.submit(out_sh, PROBE_RECORD=str(record))
    jobs = cluster.wait_done(array_id, 1, timeout=300)
    lines = record.read_text().splitlines()
    assert lines[0].startswith("start ignored=True ")  # the script's trap: an early warning kills nothing
    assert len(lines) == 2 and lines[1].startswith("USR1 after "), lines
    assert 30 <= int(lines[1].split()[-1]) < 120 and jobs[0][1] == "COMPLETED", (lines, jobs)


@pytest.mark.e2e
def test_warned_run_requeues_itself_and_resumes(cluster, tmp_path):
    # Slurm's time-limit warning (SIGUSR1 to the batch process), sent as Slurm sends it once stage 1 is
    # written, so that it lands inside stage 2 however fast the machine: the run checkpoints its step,
    # requeues its own job, the restart resumes the same folder, and it ends as its uninterrupted twin.
    # (That Slurm itself sends the warning before the limit: test_time_limit_warns_the_training_process.)
    grid = ["--sequences", "reach,push", "--seeds", "1"]
    extra = [*TINY, "--steps-per-task", "3000"]
    stopped, twin = str(tmp_path / "stopped"), str(tmp_path / "twin")
    array_id = cluster.submit(sweep_script(tmp_path, stopped, grid, "--slurm-max-requeues", "1", extra=extra))
    twin_id = cluster.submit(sweep_script(tmp_path, twin, grid, extra=extra))
    cluster.wait_for(lambda: stage_1_written(stopped), "stage 1 of the run to be warned", timeout=600)
    job_id = cluster.jobs(array_id)[0][0]
    assert cluster.run("scancel", "--batch", "--signal=USR1", job_id).returncode == 0
    jobs = cluster.wait_done(array_id, 1, timeout=600)
    cluster.wait_done(twin_id, 1, timeout=600)
    assert jobs[0][1:] == ("COMPLETED", 1), jobs  # requeued by itself, once
    [name], [twin_name] = folders(stopped), folders(twin)
    log = open(os.path.join(stopped, "sweep_logs", "reach+push__nbsp__1.log")).read()
    first, resumed = log.split("restart 1: ", 1)
    assert f"slurm: job {job_id} requeued (restart 1 of at most 1)" in first
    assert "stopped at stage 2, step" in first and f"resuming {os.path.join(stopped, name)} at stage 2, step" in resumed
    assert metrics(stopped, name)["sr"] == metrics(twin, twin_name)["sr"]
    got, want = checkpoint_tensors(os.path.join(stopped, name)), checkpoint_tensors(os.path.join(twin, twin_name))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
