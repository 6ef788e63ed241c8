# Run a grid of training runs: the paper's tables as presets, or any custom grid, on this
# machine (N processes side by side) or as a Slurm job array. Examples: `--help` (DESCRIPTION).
#
# A run is: script x task sequence x setting (a method or an ablation, by name) x values of
# `--set` flags x seed. Its `--exp-name` names the setting and the `--set` values
# (`nbsp`, `only-replay`, `nbsp_ratio0.3`), so the tables can group runs by exp_name and tasks.
# The default NBSP setting is called `nbsp` in every preset, so the one NBSP run of a sequence
# and seed serves Tables 1-4 and Figure 4 alike (asking for several presets runs it once).
#
# Flags shared by a grid (a preset's sizes, the extras after `--`) reach only the methods that
# read them: `--dpre-per-task` goes to the NBSP runs, `--ewc-lambda` to the EWC ones, because the
# training scripts refuse another method's flags. A setting's own flags and `--set` are kept as given.
#
# Run the same command again after a crash or a failure: runs whose metrics.json says
# "complete" are skipped, killed runs continue with `--resume <run_dir>`.
import argparse
import contextlib
import importlib
import io
import itertools
import os
import shlex
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass

import baselines
import cli
import protocol
from cli import UsageError, check_folder, check_output
import run_folders
from protocol import RESUME_FLAGS, resume_flags
from run_folders import ROOT, SCRIPTS

SEQUENCE_FLAG = {"metaworld": "--tasks", "atari": "--games"}
DEFAULT_SEEDS = [1, 2, 3]  # the paper repeats every experiment with 3 seeds; a preset may ask for more

# ---------------------------------------------------------------------------------------------
# Settings: a name (it becomes the run's --exp-name) and the training-script flags it adds.
# ---------------------------------------------------------------------------------------------
BASELINES = list(baselines.BASELINES)
SETTINGS = {
    "nbsp": [],  # the paper's NBSP: every default of the training script
    "sac": ["--method", "sac"],  # vanilla SAC fine-tuning (Table 2, first column)
    **{name: ["--method", name] for name in BASELINES},  # Tables 1 and 5
    # Table 2 (and appendix Tables 9-10): NBSP's two parts, alone and with a hard mask
    "only-replay": ["--no-mask"],
    "only-mask": ["--no-replay"],
    "hard-mask": ["--hard-mask"],
    # Table 3: skill neurons found by another rule than the goal-oriented score
    "identify-activation": ["--identify", "activation"],
    "identify-weight": ["--identify", "weight"],
    "identify-random": ["--identify", "random"],
    # the balanced goal score (the goal rule's scores are 0.5 for a unit constant over the window)
    "goal-balanced": ["--goal-score", "balanced"],
    # Table 3's rules with the balanced score, whose Eq. 7 masks then fall on no dead unit either
    "identify-activation-balanced": ["--identify", "activation", "--goal-score", "balanced"],
    "identify-random-balanced": ["--identify", "random", "--goal-score", "balanced"],
    # Table 4: NBSP on one network only
    "actor-only": ["--apply-to", "actor"],
    "critic-only": ["--apply-to", "critic"],
    # Figure 4: proportion of skill neurons (0.2 is the default, i.e. `nbsp`)
    **{f"ratio{r}": ["--skill-ratio", str(r)] for r in (0.05, 0.1, 0.3, 0.4, 0.5)},
}

# ---------------------------------------------------------------------------------------------
# Presets: the paper's grids (plain data; edit freely). Sequences are comma-separated tasks of
# one cycle, spelled as in data/paper_results.json; every run cycles twice (the scripts' default).
# ---------------------------------------------------------------------------------------------
TWO_TASK = ["window-open,window-close", "drawer-open,drawer-close", "button-press-topdown,window-open"]
# the paper's regime at the smallest size where SAC learns the tasks (docs/results-regime.md)
REGIME_FLAGS = ["--hidden", "256", "256", "--batch-size", "128", "--steps-per-task", "150000",
                "--learning-starts", "5000", "--eval-every", "10000", "--eval-episodes", "10",
                "--buffer-size", "300000", "--no-cuda"]
PRESETS = {
    "table1": dict(  # Meta-World, all methods
        script="metaworld",
        sequences=TWO_TASK + ["window-open,window-close,drawer-open,drawer-close",
                              "button-press-topdown,window-close,door-open,drawer-close"],
        settings=BASELINES + ["nbsp"],
    ),
    "table2": dict(  # mask / replay ablation; the paper's Table 2 is button-press-topdown,window-open,
        script="metaworld",  # the appendix Tables 9 and 10 the two other two-task sequences
        sequences=TWO_TASK,
        settings=["sac", "only-replay", "only-mask", "hard-mask", "nbsp"],
    ),
    "table3": dict(  # identification rule; goal-oriented = nbsp
        script="metaworld",
        sequences=TWO_TASK,
        settings=["identify-activation", "identify-weight", "identify-random", "nbsp"],
    ),
    "table4": dict(  # actor / critic / both = nbsp
        script="metaworld",
        sequences=TWO_TASK,
        settings=["actor-only", "critic-only", "nbsp"],
    ),
    "table5": dict(  # Atari, all methods
        script="atari",
        sequences=["Pong,Bowling", "BankHeist,Alien"],
        settings=BASELINES + ["nbsp"],
        # Table 6 gives the Atari budget as "1.5e6, 3e6" for the two pairs; we read the larger
        # one as the harder pair's (the script's default is 1.5e6).
        sequence_flags={"BankHeist,Alien": ["--steps-per-task", "3000000"]},
    ),
    "figure4": dict(  # skill-neuron proportion on button-press-topdown,window-open; the paper
        script="metaworld",  # does not print its x-axis values, these bracket its best, 0.2
        sequences=["button-press-topdown,window-open"],
        settings=["ratio0.05", "ratio0.1", "nbsp", "ratio0.3", "ratio0.4", "ratio0.5"],
    ),
    "mini": dict(  # laptop scale (2-core CPU): the Table 2 and Table 3 settings on one pair; its committed runs
        # (docs/results-mini.md) used --compile before its recompiled update trained the temperature (docs/reliability.md)
        script="metaworld",
        # mini-pilot: single-task SAC reached 0.8 on drawer-close in 3 of 3 seeds, on button-press in 2 of 3;
        # drawer-close first, so every seed has a learned first task to forget (window-close first was
        # learned in 1 of 3 seeds: docs/mini-window-first; drawer-close -> window-close: docs/mini-drawer-first)
        sequences=["drawer-close,button-press"],
        settings=["sac", "only-replay", "only-mask", "hard-mask", "nbsp", "identify-random", "identify-activation",
                  "identify-weight", "goal-balanced"],
        flags=["--cycles", "2", "--hidden", "128", "128", "--batch-size", "128", "--steps-per-task", "30000",
               "--learning-starts", "2000", "--eval-every", "10000", "--buffer-size", "100000", "--dpre-per-task", "10000",
               "--identify-episodes", "10", "--eval-episodes", "10", "--no-cuda", "--compile"],
    ),
    "regime-pilot": dict(  # vanilla SAC on the paper's own pairs, one pass (A -> B): does SAC learn both
        script="metaworld",  # tasks within the stage budget and forget A while it learns B (docs/results-regime.md)?
        sequences=TWO_TASK,
        settings=["sac"],
        # as its committed runs (results/regime-pilot): 0.9 stopped window-open at eval 0.60, so a stage
        # stops only at 10 of 10
        flags=["--cycles", "1", *REGIME_FLAGS, "--early-stop-success", "1.0", "--compile"],
    ),
    "regime": dict(  # Table 2's settings (A -> B -> A -> B, as the paper's Table 2), NBSP and Table 3's random and
        script="metaworld",  # activation rules with the balanced score, at the size of `regime-pilot`
        sequences=["window-open,window-close"],  # chosen by regime-pilot (docs/results-regime.md)
        settings=["sac", "only-replay", "only-mask", "hard-mask", "nbsp", "goal-balanced",
                  "identify-random-balanced", "identify-activation-balanced"],
        # every stage to its budget: the early stop ended stages on evaluation dips (results/regime-pilot),
        # without it SAC learned both tasks and forgot the first in 4 of 5 seeds (results/regime-pilot-full)
        flags=["--cycles", "2", *REGIME_FLAGS, "--early-stop-success", "0", "--compile"],
        seeds=[1, 2, 3, 4, 5],  # the regime's evidence asks for at least 5 seeds per setting
    ),
    "mini-pilot": dict(  # single-task SAC learning curves of the tasks considered for `mini`
        script="metaworld",
        sequences=["drawer-close", "window-close", "window-open", "drawer-open", "button-press-topdown",
                   "handle-press", "button-press", "plate-slide", "reach"],
        settings=["sac"],
        flags=["--cycles", "1", "--hidden", "128", "128", "--batch-size", "128", "--steps-per-task", "30000",
               "--learning-starts", "2000", "--eval-every", "2500", "--eval-episodes", "10",
               "--buffer-size", "100000", "--no-cuda", "--compile"],
    ),
}

SHORT_NAMES = {"skill-ratio": "ratio", "steps-per-task": "steps", "mask-alpha": "alpha"}  # exp_name parts


class SweepError(Exception):
    """Bad input: reported as one `error:` line, exit code 2."""


@dataclass
class Run:
    script: str  # metaworld | atari
    tasks: list[str]
    exp_name: str
    seed: int
    flags: list[str]  # preset, sequence, setting and --set flags, then the pass-through extras

    @property
    def key(self):
        return (self.script, tuple(self.tasks), self.exp_name, self.seed)

    @property
    def label(self):
        return f"{'+'.join(self.tasks)}__{self.exp_name}__{self.seed}"


@dataclass
class Plan:
    run: Run
    action: str  # new | resume | skip
    run_dir: str | None  # the existing folder to resume or skip
    command: list[str]
    log: str


# ---------------------------------------------------------------------------------------------
# Grid expansion
# ---------------------------------------------------------------------------------------------
def parse_set(text: str) -> tuple[str, list[str]]:
    """`skill-ratio=0.1,0.3` -> ("skill-ratio", ["0.1", "0.3"])."""
    name, sep, values = text.partition("=")
    name = name.strip().removeprefix("--")
    values = [v.strip() for v in values.split(",")]
    if not sep or not name or any(not v for v in values):
        raise SweepError(f"--set needs FLAG=VALUE[,VALUE...] (e.g. --set skill-ratio=0.1,0.3), got {text!r}")
    return name, values


def set_flags(name: str, value: str) -> tuple[list[str], str]:
    """Flags and exp_name part of one `--set` value; true/false toggle a boolean flag."""
    if value.lower() in ("true", "false"):
        on = value.lower() == "true"
        return [f"--{name}" if on else f"--no-{name}"], name if on else f"no-{name}"
    short = SHORT_NAMES.get(name, name)
    return [f"--{name}", *value.split()], short + "-".join(value.split())


def for_method(tokens: list[str], method: str) -> list[str]:
    """Leave out the flags of other methods, which the training scripts refuse (baselines.flag_owners):
    shared flags such as a preset's --dpre-per-task then suit every method of the grid."""
    out = []
    for name, values in flag_groups(tokens):
        if name is None:
            out += values
            continue
        key = name.replace("-", "_")
        if not baselines.flag_owners(key) and key.startswith("no_"):
            key = key[3:]  # --no-keep-buffer is keep_buffer, --no-mask mask
        owners = baselines.flag_owners(key)
        if not owners or method in owners:
            out += [f"--{name}", *values]
    return out


def expand(spec: dict, seeds: list[int], sets: list[tuple[str, list[str]]], extra: list[str], tag: str) -> list[Run]:
    """All runs of one preset (or custom grid): seeds outermost, so seed 1 of every cell comes first."""
    unknown = [s for s in spec["settings"] if s not in SETTINGS]
    if unknown:
        raise SweepError(f"unknown setting {unknown[0]!r}; valid settings: {' '.join(SETTINGS)}")
    set_grid = list(itertools.product(*[[(name, v) for v in values] for name, values in sets]))
    runs = []
    for seed, sequence, setting, combo in itertools.product(seeds, spec["sequences"], spec["settings"], set_grid):
        tasks = [t for t in sequence.replace("+", ",").split(",") if t]
        if not tasks:
            raise SweepError(f"empty task sequence {sequence!r}; give tasks like window-open,window-close")
        own, name_parts = list(SETTINGS[setting]), [setting]  # this cell's flags: kept as they are
        for name, value in combo:
            more, part = set_flags(name, value)
            own += more
            name_parts.append(part)
        if tag:
            name_parts.append(tag)
        exp_name = "_".join(name_parts).replace("/", "-")  # the exp_name is part of a folder name
        # flags shared by the whole grid: the preset's, the sequence's, the extras after `--`
        seq_flags = {k.replace("+", ","): v for k, v in spec.get("sequence_flags", {}).items()}
        shared_head = spec.get("flags", []) + seq_flags.get(",".join(tasks), [])
        method = (dict(flag_groups(own)).get("method") or ["nbsp"])[-1]
        flags = for_method(shared_head, method) + own + for_method(extra, method)
        runs.append(Run(spec["script"], tasks, exp_name, seed, flags))
    return runs


# Training flags that the sweep sets for every run itself, and where a user sets them instead
SWEEP_FLAGS = {"seed": "give seeds with --seeds", "exp-name": "runs are named by --settings, --set and --tag",
               "runs-dir": "give --runs-dir to the sweep itself", "resume": "leave it out: the sweep resumes killed runs itself",
               "tasks": "give task sequences with --sequences", "games": "give task sequences with --sequences"}


def check_own_flags(sets: list[tuple[str, list[str]]], extra: list[str]) -> None:
    """Refuse a training flag that the sweep sets for every run (the runs would collide on one folder)."""
    given = [("--set", name) for name, _ in sets] + [("after `--`", name) for name, _ in flag_groups(extra) if name]
    for where, name in given:
        if name.replace("_", "-") in SWEEP_FLAGS:
            raise SweepError(f"--{name} ({where}) is set by the sweep for every run; {SWEEP_FLAGS[name.replace('_', '-')]}")


def build_runs(args, extra: list[str]) -> list[Run]:
    """Runs of every preset asked for, with command-line overrides; one run per key."""
    sets = [parse_set(s) for s in args.set]
    check_own_flags(sets, extra)
    if args.preset:
        specs = [dict(PRESETS[p]) for p in args.preset]
    elif args.sequences:
        specs = [dict(script=args.script or "metaworld", sequences=args.sequences, settings=["nbsp"])]
    else:
        raise SweepError(f"give --preset (one of {', '.join(PRESETS)}) or a custom grid with --sequences")
    runs = {}
    for spec in specs:
        for field in ("script", "sequences", "settings"):
            if getattr(args, field):
                spec[field] = getattr(args, field)
        for run in expand(spec, args.seeds or spec.get("seeds", DEFAULT_SEEDS), sets, extra, args.tag):
            if run.key in runs and runs[run.key].flags != run.flags:  # same name must mean same run
                raise SweepError(f"two settings named {run.label} have different flags: "
                                 f"{shlex.join(runs[run.key].flags)} vs {shlex.join(run.flags)}")
            runs.setdefault(run.key, run)
    return list(runs.values())


# ---------------------------------------------------------------------------------------------
# Existing run folders: skip complete runs, resume killed ones
# ---------------------------------------------------------------------------------------------
def scan_runs(runs_dir: str) -> dict:
    """key -> [(run_dir, args from config.json, complete)] for every run folder in runs_dir."""
    found = {}
    for run in run_folders.runs_in(runs_dir):
        key = (run.benchmark(), run.tasks(), run.args.get("exp_name"), run.args.get("seed"))
        found.setdefault(key, []).append((run.path, run.args, run.complete))
    return found


def flag_groups(tokens: list[str]) -> list[tuple[str, list[str]]]:
    """["--hidden", "8", "8", "--no-cuda"] -> [("hidden", ["8", "8"]), ("no-cuda", [])]."""
    groups = []
    for token in tokens:
        if token.startswith("--"):
            groups.append((token[2:], []))
        elif groups:
            groups[-1][1].append(token)
        else:  # a stray leading value: kept, so that the training script can refuse it
            groups.append((None, [token]))
    return groups


def config_differences(tokens: list[str], cargs: dict) -> list[str]:
    """Flags of this sweep's command whose value differs from the one in the run's config.json."""
    def same(a, b):
        try:
            return float(a) == float(b)
        except (TypeError, ValueError):
            return str(a) == str(b)

    asked = {}  # key -> (wanted, values); a flag given twice (a preset's, then an extra) counts as its last, as on the command line
    for name, values in flag_groups(tokens):
        if name is None:
            continue
        key, wanted = name.replace("-", "_"), (values if values else True)
        if key not in cargs and key.startswith("no_") and key[3:] in cargs and not values:
            key, wanted = key[3:], False
        if key not in cargs or name.removeprefix("no-") in RESUME_FLAGS:
            continue
        asked[key] = wanted, values
    diffs = []
    for key, (wanted, values) in asked.items():
        have = cargs[key]
        if isinstance(have, bool) or isinstance(wanted, bool):
            ok = have == wanted
        elif isinstance(have, list):
            ok = len(have) == len(values) and all(same(h, w) for h, w in zip(have, values))
        else:
            ok = len(values) == 1 and same(have, values[0])
        if not ok:
            diffs.append(f"{key}={have} (sweep: {' '.join(values) or wanted})")
    return diffs


def plan_runs(runs: list[Run], args) -> list[Plan]:
    """What to do with each run, from the run folders already in --runs-dir."""
    existing = scan_runs(args.runs_dir)
    plans = []
    for run in runs:
        script = os.path.join(ROOT, SCRIPTS[run.script])
        log = os.path.join(args.log_dir, run.label + ".log")
        folders = existing.get(run.key, [])
        done = [f for f in folders if f[2]]
        resumable = [f for f in folders if not f[2] and os.path.isfile(os.path.join(f[0], "checkpoint.pt"))]
        for run_dir, cargs, _ in (done or resumable)[-1:]:
            diffs = config_differences(run.flags, cargs)
            if diffs:
                print(f"warning: {run_dir} has other values than this sweep asks for: {'; '.join(diffs)}; "
                      f"it is {'skipped' if done else 'resumed with its own'} (use --tag or --runs-dir for a new set)",
                      file=sys.stderr)
        if not done and not resumable and folders:
            print(f"note: {', '.join(f[0] for f in folders)} stopped before its first checkpoint (no checkpoint.pt); "
                  f"{run.label} starts a new run in a new folder (delete the old one to keep it out of "
                  f"TensorBoard)", file=sys.stderr)
        if done:
            plans.append(Plan(run, "skip", done[-1][0], [], log))
        elif resumable:  # the newest killed run that finished a stage; the run name ends in its start time
            run_dir = resumable[-1][0]
            command = [args.python, script, "--resume", run_dir, *resume_flags(run.flags)]
            plans.append(Plan(run, "resume", run_dir, command, log))
        else:
            command = [args.python, script, SEQUENCE_FLAG[run.script], *run.tasks, "--exp-name", run.exp_name,
                       "--seed", str(run.seed), "--runs-dir", args.runs_dir, *run.flags]
            plans.append(Plan(run, "new", None, command, log))
    return plans


def check_new_runs(plans: list[Plan]) -> None:
    """Every new run's command line, parsed and checked by its own training script (the same parser
    and checks as on the command line), before anything runs or is written."""
    for plan in plans:
        if plan.action != "new":
            continue
        script = importlib.import_module(SCRIPTS[plan.run.script].removesuffix(".py"))
        captured = io.StringIO()
        try:
            with contextlib.redirect_stderr(captured):
                script.validate(protocol.parse_args(script.Args, script.__doc__, plan.command[2:]))
        except SystemExit:
            raise SweepError(f"run {plan.run.label}: {captured.getvalue().strip().removeprefix('error: ')}") from None


# ---------------------------------------------------------------------------------------------
# Local execution
# ---------------------------------------------------------------------------------------------
def fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def last_line(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f.read()[-4000:].splitlines() if line.strip()]
        return lines[-1] if lines else ""
    except OSError:
        return ""


def run_local(plans: list[Plan], jobs: int, threads: int, runs_dir: str) -> int:
    """Run the plans, `jobs` processes at a time; returns the number of failed runs."""
    todo = deque(p for p in plans if p.action != "skip")
    total, started, finished, ok, failed = len(todo), 0, 0, 0, []
    env = dict(os.environ, PYTHONUNBUFFERED="1",  # live logs
               # PyTorch starts one thread per core in every process: N processes on C cores then
               # fight over them (seen: >10x slower); give each process its share instead
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0, running, read_to = time.time(), {}, {}
    print(f"{total} runs to do ({len(plans) - total} complete, skipped), {jobs} at a time, "
          f"{threads} thread(s) each; logs in {os.path.dirname(plans[0].log) if plans else '-'}", flush=True)

    def stamp():
        return f"[{fmt_time(time.time() - t0):>6}]"

    try:
        while todo or running:
            while todo and len(running) < jobs:
                plan = todo.popleft()
                os.makedirs(os.path.dirname(plan.log), exist_ok=True)
                log = open(plan.log, "a")  # appends: a resumed run's log follows its first part
                log.write(f"\n# sweep {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(plan.command)}\n")
                log.flush()
                # own process group: stopping the sweep stops a run with all its children
                proc = subprocess.Popen(plan.command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
                running[proc] = (plan, time.time(), log)
                read_to[proc] = os.path.getsize(plan.log)
                started += 1
                what = f"resume {plan.run_dir}" if plan.action == "resume" else "new"
                print(f"{stamp()} started  {started}/{total} {plan.run.label} ({what}; log {plan.log})", flush=True)
            time.sleep(0.2)
            for proc, (plan, _, _) in running.items():  # the runs' progress lines, with their names
                with open(plan.log, "rb") as f:
                    f.seek(read_to[proc])
                    lines = f.readlines()
                complete = lines if not lines or lines[-1].endswith(b"\n") else lines[:-1]
                read_to[proc] += sum(map(len, complete))
                for line in (raw.decode(errors="replace") for raw in complete):
                    if line.startswith("[") and " ETA=" in line:
                        print(f"{stamp()} {plan.run.label} {line.split('] ', 1)[-1].rstrip()}", flush=True)
            for proc in [p for p in running if p.poll() is not None]:
                plan, start, log = running.pop(proc)
                log.close()
                finished += 1
                took = fmt_time(time.time() - start)
                rc = proc.returncode
                why = f"exit {rc}"
                if rc == 0 and not any(f[2] for f in scan_runs(runs_dir).get(plan.run.key, [])):
                    rc, why = 1, "exit 0 but metrics.json is not complete"
                if rc == protocol.STOPPED_EXIT:
                    why = f"stopped by a signal (exit {rc}); it resumes where it stopped"
                if rc == 0:
                    ok += 1
                    print(f"{stamp()} finished {finished}/{total} {plan.run.label} in {took}", flush=True)
                else:
                    failed.append((plan, why))
                    print(f"{stamp()} FAILED   {finished}/{total} {plan.run.label} in {took} "
                          f"({why}; log {plan.log})", flush=True)
    except KeyboardInterrupt:
        for proc in running:  # only the process groups this sweep started
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc, (plan, _, log) in running.items():
            proc.wait()
            log.close()
            failed.append((plan, "interrupted"))
        print(f"{stamp()} interrupted; run the same command again to resume", flush=True)

    print(f"\nsweep: {total} run(s) in {fmt_time(time.time() - t0)}: {ok} ok, "
          f"{len(failed)} failed, {len(plans) - total} skipped (already complete)")
    for plan, why in failed:
        print(f"  FAILED {plan.run.label} ({why}): {plan.log}")
        reason = last_line(plan.log)
        if reason:
            print(f"         {reason}")
    if failed:
        print("run the same sweep command again to retry them (killed runs resume from their last checkpoint, inside a stage too)")
    return len(failed)


# ---------------------------------------------------------------------------------------------
# Slurm
# ---------------------------------------------------------------------------------------------
SLURM_TEXT_FLAGS = ("slurm_job_name", "slurm_partition", "slurm_account", "slurm_time", "slurm_mem")


def check_slurm_args(args) -> None:
    """The --slurm-* values: numbers in range, and no value that could break its `#SBATCH` line
    (a space or a newline would end the option there, or start a command)."""
    for name, least in (("slurm_cpus", 1), ("slurm_gpus", 0), ("slurm_max_parallel", 1),
                        ("slurm_signal_grace", 1), ("slurm_max_requeues", 0)):
        if getattr(args, name) is not None and getattr(args, name) < least:
            raise SweepError(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(args, name)}")
    for name in SLURM_TEXT_FLAGS:
        value = getattr(args, name)
        if value is not None and (not value or any(c.isspace() or not c.isprintable() for c in value)):
            raise SweepError(f"--{name.replace('_', '-')} must be one word without spaces or control characters, "
                             f"got {value!r}")
    if args.slurm and any(c.isspace() or not c.isprintable() for c in os.path.abspath(args.log_dir)):
        raise SweepError(f"--log-dir {args.log_dir!r} has a space or a control character; "
                         f"#SBATCH --output cannot take it")


def check_paths(args) -> None:
    """The files and folders this sweep writes or runs, before anything is written: the Slurm script
    and its log folder, or the runs and logs of a local sweep and the interpreter that runs them."""
    try:
        if args.slurm:
            check_output("--slurm", args.slurm)
            check_folder("--log-dir", args.log_dir)
        elif not args.dry_run:
            check_folder("--runs-dir", args.runs_dir)
            check_folder("--log-dir", args.log_dir)
            if not (os.path.isfile(args.python) and os.access(args.python, os.X_OK)):
                raise UsageError(f"--python {args.python!r} is not an executable file; give a Python interpreter "
                                 f"(default: this one, {sys.executable})")
    except UsageError as e:
        raise SweepError(str(e)) from None


def comment(text: str) -> str:
    """Text for a `#` line of the script: a newline in it would end the comment and start a command."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def write_slurm(path: str, plans: list[Plan], args, argv: list[str]) -> int:
    """A job-array script, one index per run to do, each bound to its run's label (slurm.py);
    SWEEP_DRY_RUN=1 makes it print its command."""
    import slurm  # the launcher each task execs (repository root, on the path)

    todo = [p for p in plans if p.action != "skip"]
    if not todo:
        print(f"nothing to do: all {len(plans)} runs are complete; {path} not written")
        return 0
    throttle = f"%{args.slurm_max_parallel}" if args.slurm_max_parallel else ""
    log_dir = os.path.abspath(args.log_dir)
    lines = [
        "#!/bin/bash",
        comment(f"# written by: {shlex.join(['python', 'scripts/sweep.py', *argv])}"),
        f"# {len(todo)} runs ({len(plans) - len(todo)} complete ones left out); write it again for what is unfinished.",
        "# Each index is bound to one run (its label, see docs/slurm.md): a requeued or resubmitted task resumes",
        f"# that run's folder, a complete run ends at once, a run in progress elsewhere stops it (exit {slurm.LOCKED_EXIT}).",
        f"# {args.slurm_signal_grace} s before the time limit SIGUSR1 goes to the training process (exec'ed: nothing",
        f"# stands in front of it), which checkpoints and requeues itself, at most {args.slurm_max_requeues} times.",
        "# Test without Slurm: SLURM_ARRAY_TASK_ID=0 SWEEP_DRY_RUN=1 bash this.sh prints run 0's command.",
        f"#SBATCH --job-name={args.slurm_job_name}",
        f"#SBATCH --array=0-{len(todo) - 1}{throttle}",
        f"#SBATCH --cpus-per-task={args.slurm_cpus}",
        f"#SBATCH --time={args.slurm_time}",
        f"#SBATCH --output={log_dir}/slurm-%A_%a.out",
        "#SBATCH --open-mode=append",  # a requeued task adds to its output instead of replacing it
        "#SBATCH --requeue",  # node failure and preemption put the task back in the queue
        f"#SBATCH --signal=B:USR1@{args.slurm_signal_grace}",
    ]
    if args.slurm_gpus:
        lines.append(f"#SBATCH --gres=gpu:{args.slurm_gpus}")
    if args.slurm_mem:
        lines.append(f"#SBATCH --mem={args.slurm_mem}")
    if args.slurm_partition:
        lines.append(f"#SBATCH --partition={args.slurm_partition}")
    if args.slurm_account:
        lines.append(f"#SBATCH --account={args.slurm_account}")
    lines += [
        "# a warning that comes before the training process has started must not kill this shell; the",
        "# ignored signal stays ignored across exec until the training script installs its own handler",
        "trap '' USR1",
        "set -euo pipefail",
        f"cd {shlex.quote(os.getcwd())}  # relative --runs-dir as when written",
        "",
        "COMMANDS=(",
    ]
    for i, plan in enumerate(todo):
        lines += [comment(f"  # {i}: {plan.run.label} ({plan.action} when written)"),
                  f"  {shlex.quote(shlex.join(plan.command))}"]
    lines += [")", "LABELS=("] + [f"  {shlex.quote(p.run.label)}" for p in todo] + [")"]
    lines += ["LOGS=("] + [f"  {shlex.quote(os.path.abspath(p.log))}" for p in todo] + [")", ""]
    lines += [f"LAUNCH=({shlex.join([args.python, os.path.join(ROOT, 'slurm.py'), 'launch'])})",
              f"RUNS_DIR={shlex.quote(args.runs_dir)}", ""]
    lines += [
        'i="${SLURM_ARRAY_TASK_ID:?submit with sbatch, or set SLURM_ARRAY_TASK_ID}"',
        'CMD="${COMMANDS[$i]}"',
        'if [[ -n "${SWEEP_DRY_RUN:-}" ]]; then echo "$CMD"; exit 0; fi',
        "# one thread per allocated core (PyTorch would otherwise start one per core of the node)",
        'export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}" MKL_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}" PYTHONUNBUFFERED=1',
        f"export {slurm.MAX_REQUEUES_ENV}={args.slurm_max_requeues}",
        'mkdir -p "$(dirname "${LOGS[$i]}")"',
        'exec >> "${LOGS[$i]}" 2>&1',
        'echo "# slurm job ${SLURM_JOB_ID:-?} task $i, restart ${SLURM_RESTART_COUNT:-0}: $CMD"',
        'eval "RUN=($CMD)"  # the command\'s words',
        'exec "${LAUNCH[@]}" "${LABELS[$i]}" "$RUNS_DIR" -- "${RUN[@]}"',
    ]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    os.makedirs(log_dir, exist_ok=True)  # Slurm does not create the --output folder
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {path}: {len(todo)} array tasks ({len(plans) - len(todo)} complete runs left out); "
          f"submit with: sbatch {path}")
    return 0


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
class Parser(cli.Parser):
    def error(self, message):  # one line, like the training scripts, instead of usage + error
        raise SweepError(message)


DESCRIPTION = """Run a grid of NBSP training runs (script x task sequence x setting x --set values x seed) on
this machine, N processes side by side, or write it as a Slurm job array. The paper's tables are
presets. Training-script flags for every run go after `--`; flags of a method go only to the runs
of that method. Run the same command again after a crash: complete runs are skipped, killed ones
resumed.

examples:
  python scripts/sweep.py --list                          # presets and their run counts
  python scripts/sweep.py --preset mini --jobs 2          # laptop-scale ablation, 27 runs (78 min on 2 cores)
  python scripts/sweep.py --preset table1 --dry-run       # print the 120 command lines
  python scripts/sweep.py --preset table1 table2 --slurm table12.sh --slurm-partition gpu
  python scripts/sweep.py --script metaworld --sequences window-open,window-close \\
      --settings nbsp sac --set skill-ratio=0.1,0.3 --seeds 1 -- --steps-per-task 50000"""


def make_parser() -> argparse.ArgumentParser:
    p = Parser(description=DESCRIPTION)
    g = p.add_argument_group("grid")
    g.add_argument("--preset", nargs="+", choices=list(PRESETS), metavar="NAME",
                   help=f"one or more of the paper's grids: {', '.join(PRESETS)} (runs shared by several run once)")
    g.add_argument("--script", choices=list(SCRIPTS), help="training script (default: the preset's, else metaworld)")
    g.add_argument("--sequences", nargs="+", metavar="A,B",
                   help="task sequences of one cycle, comma-separated (default: the preset's)")
    g.add_argument("--settings", "--methods", nargs="+", metavar="NAME",
                   help=f"settings by name (default: the preset's, else nbsp): {' '.join(SETTINGS)}")
    g.add_argument("--set", "--grid", action="append", default=[], metavar="FLAG=V1,V2",
                   help="also sweep a training flag over values (repeatable; grids multiply); true/false toggle "
                        "a boolean flag; the values join the exp_name, e.g. nbsp_ratio0.1")
    g.add_argument("--seeds", nargs="+", type=int, default=None,
                   help=f"seeds of every cell (default: the preset's, else {' '.join(map(str, DEFAULT_SEEDS))}; the paper has 3)")
    g.add_argument("--tag", default="", help="appended to every exp_name (a variant of a grid, e.g. with other extras)")
    r = p.add_argument_group("running")
    r.add_argument("--runs-dir", default="runs", help="passed to every run; complete runs there are skipped")
    r.add_argument("--log-dir", default=None, help="one log per run (default: RUNS_DIR/sweep_logs)")
    r.add_argument("--jobs", type=int, default=1, help="runs side by side on this machine")
    r.add_argument("--threads", type=int, default=None,
                   help="OMP/MKL threads per run (default: max(1, cores // jobs))")
    r.add_argument("--python", default=sys.executable, help="interpreter of the runs (default: this one)")
    r.add_argument("--dry-run", action="store_true", help="print the command lines and what is skipped; run nothing")
    r.add_argument("--list", action="store_true", help="list the presets with their run counts and exit")
    s = p.add_argument_group("slurm (writes a job-array script instead of running)")
    s.add_argument("--slurm", metavar="OUT.sh", help="write the job-array script here")
    s.add_argument("--slurm-partition", default=None, help="#SBATCH --partition")
    s.add_argument("--slurm-account", default=None, help="#SBATCH --account")
    s.add_argument("--slurm-time", default="48:00:00", help="#SBATCH --time per run")
    s.add_argument("--slurm-cpus", type=int, default=4, help="#SBATCH --cpus-per-task, also the runs' thread count")
    s.add_argument("--slurm-gpus", type=int, default=1, help="#SBATCH --gres=gpu:N, 0 for none")
    s.add_argument("--slurm-mem", default=None, help="#SBATCH --mem, e.g. 32G")
    s.add_argument("--slurm-max-parallel", type=int, default=None, help="array throttle: at most this many at once")
    s.add_argument("--slurm-job-name", default="nbsp", help="#SBATCH --job-name")
    s.add_argument("--slurm-signal-grace", type=int, default=300, metavar="SECONDS",
                   help="#SBATCH --signal=B:USR1@SECONDS: the warning before the time limit, in which a run "
                        "checkpoints and requeues itself")
    s.add_argument("--slurm-max-requeues", type=int, default=5,
                   help="times a task may requeue itself after that warning")
    return p


def list_presets() -> None:
    print(f"{'preset':<9} {'script':<10} {'runs':>5}  sequences x settings x seeds ({len(DEFAULT_SEEDS)} unless the preset says)")
    for name, spec in PRESETS.items():
        n = len(spec["sequences"]) * len(spec["settings"]) * len(spec.get("seeds", DEFAULT_SEEDS))
        print(f"{name:<9} {spec['script']:<10} {n:>5}  {' | '.join(spec['sequences'])}  x  {' '.join(spec['settings'])}")


def main(argv: list[str]) -> int:
    # everything after `--` goes to the training script of every run, untouched
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = make_parser()
    args, unknown = parser.parse_known_args(own)
    if unknown:
        raise SweepError(f"unrecognized arguments: {' '.join(unknown)} (training-script flags go after `--`, "
                         f"e.g. -- --steps-per-task 5000)")
    if args.list:
        list_presets()
        return 0
    if args.jobs < 1 or (args.threads is not None and args.threads < 1):
        raise SweepError(f"--jobs and --threads must be >= 1, got {args.jobs} and {args.threads}")
    if args.log_dir is None:
        args.log_dir = os.path.join(args.runs_dir, "sweep_logs")

    check_slurm_args(args)
    check_paths(args)
    runs = build_runs(args, extra)
    plans = plan_runs(runs, args)
    check_new_runs(plans)
    counts = {a: sum(p.action == a for p in plans) for a in ("new", "resume", "skip")}
    summary = f"{len(plans)} runs: {counts['new']} new, {counts['resume']} to resume, {counts['skip']} complete (skipped)"
    if args.slurm:
        print(summary)
        return write_slurm(args.slurm, plans, args, argv)
    if args.dry_run:
        for plan in plans:
            print(f"# skip {plan.run.label}: complete in {plan.run_dir}" if plan.action == "skip"
                  else shlex.join(plan.command))
        print(f"# {summary}")
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = args.threads or max(1, cores // args.jobs)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops the runs too, like Ctrl-C
    return 1 if run_local(plans, args.jobs, threads, args.runs_dir) else 0


def run(argv: list[str]) -> int:
    """main, with bad input as one `error:` line and exit status 2."""
    try:
        return main(argv)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
