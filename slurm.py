"""Runs under Slurm: each job-array task of `scripts/sweep.py --slurm` is bound to one run (its
label, `<tasks>__<exp_name>__<seed>`: the run folder's name without its start time), so that a
requeued or resubmitted task continues that run's folder instead of starting a new one.

    python slurm.py launch <label> <runs_dir> -- <python> <training script> <flags of a new run>

holds the label's lock in RUNS_DIR/.slurm/ (a second task of the same label stops with exit
status 75 while the first one lives), ends with status 0 if the label's run is complete, resumes
the newest of its folders that holds a checkpoint (`--resume <folder>`, with the device and
tracking flags of the command), and otherwise starts the command as given. It replaces itself
with the training process (exec), so that Slurm's signals reach Python directly.

`requeue_self()` is the training scripts' half: a run stopped by Slurm's warning signal
(`#SBATCH --signal=B:USR1@...`) writes its checkpoint, then puts its own job back into the queue.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys

from protocol import resume_flags

LOCKED_EXIT = 75  # EX_TEMPFAIL: the label's run is in progress in another task
MAX_REQUEUES_ENV = "NBSP_SLURM_MAX_REQUEUES"  # exported by the sweep's job script
LOCK_FOLDER = ".slurm"  # inside --runs-dir; holds no config.json, so it is never taken for a run


def requeue_self() -> bool:
    """Put this Slurm job back into the queue (`scontrol requeue $SLURM_JOB_ID`) when it runs under
    Slurm, NBSP_SLURM_MAX_REQUEUES is set and the job has been restarted fewer times than that
    (SLURM_RESTART_COUNT). Returns whether it requeued; says why not in one line otherwise. Slurm
    then ends this job (SIGTERM, then SIGKILL after KillWait): call it after the checkpoint is
    written, and exit."""
    job_id, limit = os.environ.get("SLURM_JOB_ID"), os.environ.get(MAX_REQUEUES_ENV)
    if not job_id or limit is None:
        return False
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    if restarts >= int(limit):
        print(f"slurm: job {job_id} not requeued: it has restarted {restarts} times ({MAX_REQUEUES_ENV}={limit})",
              file=sys.stderr, flush=True)
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"slurm: job {job_id} not requeued: scontrol failed ({e})", file=sys.stderr, flush=True)
        return False
    if result.returncode != 0:
        why = " ".join(result.stderr.split()) or f"exit {result.returncode}"
        print(f"slurm: job {job_id} not requeued: {why}", file=sys.stderr, flush=True)
        return False
    print(f"slurm: job {job_id} requeued (restart {restarts + 1} of at most {limit})", file=sys.stderr, flush=True)
    return True


def label_folders(runs_dir: str, label: str) -> list[str]:
    """The label's run folders, oldest first: `<label>__<start time>` as the training scripts name them."""
    pattern = re.compile(re.escape(label) + r"__(\d+)")
    found = []
    for name in os.listdir(runs_dir) if os.path.isdir(runs_dir) else []:
        match = pattern.fullmatch(name)
        if match and os.path.isdir(os.path.join(runs_dir, name)):
            found.append((int(match.group(1)), name))
    return [os.path.join(runs_dir, name) for _, name in sorted(found)]


def is_complete(run_dir: str) -> bool:
    try:
        with open(os.path.join(run_dir, "metrics.json")) as f:
            return json.load(f).get("complete") is True
    except (OSError, ValueError, AttributeError):
        return False


def resume_command(command: list[str], run_dir: str) -> list[str]:
    """`<python> <script> --resume <run_dir>` with the flags of `command` that a resume accepts
    (device and tracking: protocol.RESUME_OVERRIDABLE); a resumed run keeps its own config.json."""
    return [*command[:2], "--resume", run_dir, *resume_flags(command[2:])]


def plan(label: str, runs_dir: str, command: list[str]) -> tuple[str, list[str] | None]:
    """What a task does: ("complete", None), ("resume", command) or ("new", command)."""
    folders = label_folders(runs_dir, label)
    if any(is_complete(folder) for folder in folders):
        return "complete", None
    resumable = [folder for folder in folders if os.path.isfile(os.path.join(folder, "checkpoint.pt"))]
    if resumable:
        return "resume", resume_command(command, resumable[-1])
    return "new", command


def hold_label(runs_dir: str, label: str):
    """Lock RUNS_DIR/.slurm/<label>.lock for the life of this process and of the process it execs
    (the descriptor is inherited; a POSIX lock dies with its last holder, however it ends).
    Returns None when another live process holds it, after saying which."""
    folder = os.path.join(runs_dir, LOCK_FOLDER)
    os.makedirs(folder, exist_ok=True)
    lock = open(os.path.join(folder, label + ".lock"), "a+")
    try:
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        print(f"slurm: {label} is running elsewhere ({lock.read().strip() or 'unknown holder'}); "
              f"this task stops (exit {LOCKED_EXIT})", file=sys.stderr, flush=True)
        return None
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {os.uname().nodename}, slurm job {os.environ.get('SLURM_JOB_ID', '-')}\n")
    lock.flush()
    os.set_inheritable(lock.fileno(), True)
    return lock


def launch(label: str, runs_dir: str, command: list[str]) -> int:
    """The job-array task's command: see the module's docstring. Returns only when nothing is run."""
    lock = hold_label(runs_dir, label)  # kept open (referenced) until exec, then by the training process
    if lock is None:
        return LOCKED_EXIT
    action, run = plan(label, runs_dir, command)
    restarts = os.environ.get("SLURM_RESTART_COUNT") or 0
    if action == "complete":
        print(f"slurm: {label} is complete in {runs_dir}; nothing to do", flush=True)
        return 0
    print(f"slurm: {label}: {action} (job {os.environ.get('SLURM_JOB_ID', '-')}, restart {restarts}): "
          f"{' '.join(run)}", flush=True)
    os.execvp(run[0], run)


def main(argv: list[str]) -> int:
    if len(argv) < 5 or argv[0] != "launch" or argv[3] != "--" or not re.fullmatch(r"[^/\s]+", argv[1]):
        print("error: usage: python slurm.py launch <label> <runs_dir> -- <command...> "
              "(a label is a run folder's name without its start time)", file=sys.stderr)
        return 2
    return launch(argv[1], argv[2], argv[4:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
