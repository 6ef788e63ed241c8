"""The bookkeeping of the cycling protocol that both training scripts share and that is not the
algorithm: the command line and its checks, resuming a killed run, the run's lifecycle (`Run`:
logging, progress, the divergence stop, evaluations, stage records, checkpoints), the paper's
continual metrics (Eq. 9-11) and the run's files. SAC and Dpre stay in each script; the
skill-neuron scores and Eq. 7 masks are in skill_neurons.py."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import sys
import time
import types
import typing
from collections.abc import Callable
from typing import Annotated
from dataclasses import asdict, dataclass, field, fields, is_dataclass, make_dataclass

import numpy as np
import torch
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import baselines

# What a resumed run may change: where it runs and how it is tracked, never what it computes. Each
# change is recorded in config.json's `resumes`. --compile and --cudagraphs are not among them: a
# compiled update is not bit-identical to the eager one, so a resumed run keeps the run's own.
RESUME_OVERRIDABLE = ("resume", "cuda", "track", "wandb_project_name", "wandb_entity", "progress_every",
                      "checkpoint_every")
RESUME_FLAGS = {name.replace("_", "-") for name in RESUME_OVERRIDABLE if name != "resume"}  # as typed


def resume_flags(tokens: list[str]) -> list[str]:
    """The flags of a command line (with their values) that `--resume` accepts; a resumed run takes
    every other flag from its own config.json. Used by the sweep and the Slurm launcher."""
    kept, keep = [], False
    for token in tokens:
        if token.startswith("--"):
            keep = token[2:].removeprefix("no-") in RESUME_FLAGS
        if keep:
            kept.append(token)
    return kept


# evaluation env copy i of a run seeded s is built with seed s + EVAL_SEED_OFFSET + i (Meta-World: its
# MT1 benchmark; Atari: its action space); evaluation episode i resets with seed s + i (Atari: copy
# i's first game; its later games continue that generator)
EVAL_SEED_OFFSET = 10_000
MAX_SEED = 2**31 - 1  # numpy and gymnasium take seeds below 2**32, the stage and evaluation offsets included
MAX_INT = 2**31 - 1  # every integer flag (counts, sizes, widths, frequencies) stays below this
MAX_STAGES = 10_000  # tasks x cycles
VIDEO_SIZES = (16, 1024)  # --video-size: frame heights in pixels, even (the H.264 encoder halves them)
GIF_MAX_FPS = 25  # TensorBoard's videos are GIFs, which browsers slow down below 20 ms a frame: every k-th frame
MAX_NAME_BYTES = 255  # a run folder's name (NAME_MAX of Linux and macOS file systems)
MANIFEST = "manifest.json"  # the run's fingerprint and the sha256 of every file written into its folder
# Flags that do not change what a run learns: runs differing only in these are seeds of one setting.
BOOKKEEPING = ("seed", "exp_name", "runs_dir", "torch_deterministic", "dormant_threshold", "compile", "cudagraphs",
               "capture_video", "video_every_eval", "video_size", "video_steps", *RESUME_OVERRIDABLE)
DIVERGED_EXIT = 3  # exit status of a run stopped by a non-finite loss, parameter or temperature
STOPPED_EXIT = 75  # EX_TEMPFAIL: stopped by a signal after checkpointing its step; --resume continues it
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
error_context = ""  # prefixed to every `error:` line (set while a resumed run's saved config is checked)


def fail(message: str) -> typing.NoReturn:
    """Bad input: one line on stderr, non-zero exit, nothing written."""
    print("error: " + " ".join((error_context + message).split()), file=sys.stderr)
    sys.exit(2)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_args(args_class, description: str, argv: list[str] | None = None):
    """The training script's command line (`argv`, default sys.argv) as a flat `args_class`, with
    tyro's boxed parse errors folded into one `error:` line. `--help` shows `description`, then the
    flags by topic (command_line_topics)."""
    topics = command_line_topics(args_class)
    grouped = make_dataclass("Flags", [(name, Annotated[cls, tyro.conf.OmitArgPrefixes], field(default_factory=cls))
                                       for name, cls in topics])
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            parsed = tyro.cli(grouped, args=argv, description=description)
    except SystemExit as exit:
        if not exit.code:
            sys.stderr.write(captured.getvalue())
            raise
        lines = [re.sub(r"[│╭╮╰╯─]+", " ", line).strip() for line in captured.getvalue().splitlines()]
        fail(" ".join(line for line in lines if line and not line.startswith("For full helptext")))
    return args_class(**{f.name: getattr(getattr(parsed, name), f.name) for name, cls in topics for f in fields(cls)})


def command_line_topics(args_class) -> list[tuple[str, type]]:
    """The headings of --help, each a dataclass of the flags under it: the topic classes that a
    script's Args derives from (`RunArgs` -> run, `SACArgs` -> sac, ..., `MethodArgs` -> method),
    then each baseline's flags (added by baselines.with_method_flags) under the method that declares
    them. Every field of `args_class` is under exactly one heading."""
    topics = [(cls.__name__.removesuffix("Args").lower(), cls) for cls in reversed(args_class.__mro__)
              if is_dataclass(cls) and cls.__name__.endswith("Args") and cls.__name__ != "Args"]
    seen = {f.name for _, cls in topics for f in fields(cls)}
    by_method: dict[str, list] = {}
    for f in fields(args_class):
        if f.name not in seen:
            by_method.setdefault(baselines.flag_owners(f.name)[0], []).append(f)
    for method, declared in by_method.items():
        shared = [flag(f.name) for f in baselines.METHODS[method].flags if f.name not in (d.name for d in declared)]
        doc = f"--method {method} ({baselines.LABELS[method]})" + (f"; it also reads {', '.join(shared)}" if shared else "")
        flags = [(f.name, f.type, field(default=f.default)) for f in declared]
        topics.append((method, make_dataclass(f"{method.upper()}Args", flags, namespace={"__doc__": doc})))
    return topics


def check_args(args, positive: list[str], non_negative: list[str]) -> None:
    """The checks both scripts share: positive and non-negative integers, every Literal flag's
    choices, SAC's and NBSP's ranges, and the method's own flags (baselines.method_flags_error)."""
    if os.path.basename(args.exp_name) != args.exp_name or args.exp_name in ("", ".", ".."):
        fail(f"--exp-name must be a plain name (it names the run folder inside --runs-dir), got {args.exp_name!r}")
    if not args.runs_dir:
        fail("--runs-dir must name a folder (it is created if missing), got ''")
    if os.path.exists(args.runs_dir) and not os.path.isdir(args.runs_dir):
        fail(f"--runs-dir {args.runs_dir!r} is a file; give a folder (it is created if missing)")
    if not 0 <= args.seed <= MAX_SEED:
        fail(f"--seed must be in [0, {MAX_SEED}], got {args.seed}")
    for name, hint in typing.get_type_hints(type(args)).items():
        values = getattr(args, name) if hint == list[int] else [getattr(args, name)] if hint is int else []
        if any(abs(value) > MAX_INT for value in values):
            fail(f"{flag(name)} must be at most {MAX_INT}, got {getattr(args, name)}")
    for name in positive:
        if getattr(args, name) <= 0:
            fail(f"{flag(name)} must be a positive integer, got {getattr(args, name)}")
    for name in non_negative:
        if getattr(args, name) < 0:
            fail(f"{flag(name)} must be >= 0, got {getattr(args, name)}")
    if not (math.isfinite(args.dormant_threshold) and args.dormant_threshold >= 0):
        fail(f"--dormant-threshold must be a finite number >= 0, got {args.dormant_threshold}")
    if not (math.isfinite(args.progress_every) and args.progress_every >= 0):
        fail(f"--progress-every must be a finite number of seconds >= 0, got {args.progress_every}")
    if not (math.isfinite(args.checkpoint_every) and args.checkpoint_every >= 0):
        fail(f"--checkpoint-every must be a finite number of minutes >= 0, got {args.checkpoint_every}")
    for name in ("policy_lr", "q_lr", "alpha"):  # log(alpha) is the temperature's parameter
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) > 0):
            fail(f"{flag(name)} must be a finite number > 0, got {getattr(args, name)}")
    if args.batch_size > args.buffer_size:
        fail(f"--batch-size {args.batch_size} exceeds --buffer-size {args.buffer_size}: a batch is drawn from D")
    if not args.hidden or min(args.hidden) <= 0:
        fail(f"--hidden needs one or more positive widths, got {args.hidden}")
    if not 0.0 < args.skill_ratio <= 1.0:
        fail(f"--skill-ratio must be in (0, 1], got {args.skill_ratio}")
    if not 0.0 <= args.mask_alpha <= 1.0:
        fail(f"--mask-alpha must be in [0, 1], got {args.mask_alpha}")
    for name, hint in typing.get_type_hints(type(args)).items():
        if typing.get_origin(hint) is typing.Literal and getattr(args, name) not in typing.get_args(hint):
            fail(f"{flag(name)} must be one of {', '.join(typing.get_args(hint))}; got {getattr(args, name)!r}")
    if not 0.0 < args.tau <= 1.0 or not 0.0 <= args.gamma <= 1.0:
        fail(f"--tau must be in (0, 1] and --gamma in [0, 1], got {args.tau} and {args.gamma}")
    check_video_args(args)
    problem = baselines.method_flags_error(args)
    if problem:
        fail(problem)


def check_video_args(args) -> None:
    """--capture-video's flags: a video size the encoder takes, and no video flag without it."""
    if args.video_every_eval and not args.capture_video:
        fail("--video-every-eval records at the periodic evaluations of --capture-video; add --capture-video")
    if args.video_every_eval and not args.eval_every:
        fail("--video-every-eval records at the periodic evaluations, but --eval-every 0 turns them off")
    low, high = VIDEO_SIZES
    if not (low <= args.video_size <= high and args.video_size % 2 == 0):
        fail(f"--video-size must be an even number of pixels in [{low}, {high}], got {args.video_size}")
    if args.video_steps <= 0:
        fail(f"--video-steps must be a positive integer, got {args.video_steps}")


def check_memory(needed_bytes: int, device: torch.device, what: str) -> None:
    """Refuse a preallocation larger than the device's whole memory (host RAM on CPU)."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed_bytes > total:
        fail(f"{what}: {needed_bytes / 2**30:.1f} GiB needed on {device.type}, more than its {total / 2**30:.1f} GiB")


def load_resume(args, validate) -> tuple[object, dict | None]:
    """Config and latest checkpoint of the run folder `args.resume`; stops with one line if either
    is unusable, the saved config has a value of the wrong type or fails `validate` (the script's
    own checks of a command line), differs from the fingerprint the run was started with, or a file
    fails its checksum (manifest.json). Returns the saved Args (with this command line's
    RESUME_OVERRIDABLE flags) and the checkpoint; without --resume, `args` and None."""
    if not args.resume:
        return args, None
    args_class, run_dir = type(args), args.resume.rstrip("/")
    defaults = args_class()
    changed = [f.name for f in fields(args_class) if f.name not in RESUME_OVERRIDABLE
               and getattr(args, f.name) != getattr(defaults, f.name)]
    if changed:
        fail(f"--resume continues with the run's own config.json; drop {', '.join(flag(c) for c in changed)}")
    config_path, checkpoint_path = os.path.join(run_dir, "config.json"), os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isdir(run_dir):
        fail(f"resume folder {run_dir!r} does not exist; give a run folder such as runs/<run_name>")
    if not os.path.isfile(checkpoint_path):
        fail(f"resume folder {run_dir!r} has no checkpoint.pt; it needs config.json and checkpoint.pt from a finished stage")
    try:
        with open(config_path) as f:
            config = json.load(f)
        saved_args = dict(config["args"])
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        if checkpoint["run_name"] != config["run_name"]:
            raise ValueError("checkpoint belongs to another run")
    except Exception as e:  # any unreadable file is a corrupt folder
        fail(f"resume folder {run_dir!r} is corrupt ({type(e).__name__}: {e}); it needs readable config.json and checkpoint.pt")
    global error_context
    error_context = f"resume folder {run_dir!r}, its config.json: "
    try:
        hints = typing.get_type_hints(args_class)
        for name, value in saved_args.items():
            if name in hints and not json_value_fits(value, hints[name]):
                fail(f"{flag(name)} must be {describe_type(hints[name])}, got {json.dumps(value)}")
        try:
            saved = args_class(**{k: v for k, v in saved_args.items() if k not in RESUME_OVERRIDABLE})
        except TypeError as e:
            fail(f"corrupt ({e})")
        for name in RESUME_OVERRIDABLE:
            setattr(saved, name, getattr(args, name))
        saved.resume = run_dir
        validate(saved)
    finally:
        error_context = ""
    verify_run_files(run_dir, saved_args, ("config.json", "checkpoint.pt"))
    return saved, checkpoint


def json_value_fits(value, hint) -> bool:
    """Whether a value read from config.json has the type of its Args field (an int is a float too,
    never a bool an int)."""
    origin, inner = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return value in inner
    if origin in (typing.Union, types.UnionType):
        return any(value is None if option is type(None) else json_value_fits(value, option) for option in inner)
    if origin is list:
        return isinstance(value, list) and all(json_value_fits(item, inner[0]) for item in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def describe_type(hint) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    origin, inner = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(json.dumps, inner))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if option is type(None) else describe_type(option) for option in inner)
    if origin is list:
        return f"a list of {describe_type(inner[0]).removeprefix('a ').removeprefix('an ')}s"
    return names[hint]


def fingerprint(args) -> dict:
    """What a run computes: every flag but those a resume may change."""
    return {name: value for name, value in asdict(args).items() if name not in RESUME_OVERRIDABLE}


def verify_run_files(run_dir: str, saved_args: dict, names: tuple[str, ...]) -> None:
    """A resume's files belong together: config.json's flags are the fingerprint the run was
    started with, and each of `names` has the sha256 recorded when it was written. A folder
    written before manifest.json existed is resumed unverified, and says so."""
    try:
        with open(os.path.join(run_dir, MANIFEST)) as f:
            manifest = json.load(f)
        started, files = manifest["fingerprint"], manifest["files"]
    except FileNotFoundError:
        print(f"warning: {run_dir} has no {MANIFEST} (written before checksums were recorded): its files are not verified")
        return
    except Exception as e:
        fail(f"resume folder {run_dir!r}: {MANIFEST} is corrupt ({type(e).__name__}: {e})")
    saved = {name: value for name, value in saved_args.items() if name not in RESUME_OVERRIDABLE}
    differing = [name for name in sorted(set(saved) | set(started)) if saved.get(name) != started.get(name)]
    if differing:
        fail(f"resume folder {run_dir!r}: its config.json differs from the config the run was started with "
             f"({MANIFEST}) in " + ", ".join(f"{flag(name)} (now {json.dumps(saved.get(name))}, started with "
                                             f"{json.dumps(started.get(name))})" for name in differing)
             + "; put it back or start a new run")
    for name in names:
        recorded = files.get(name)
        accepted = recorded if isinstance(recorded, list) else [recorded]
        if sha256_of(os.path.join(run_dir, name)) not in accepted:
            fail(f"resume folder {run_dir!r}: {name} fails its checksum ({MANIFEST}): it changed after it was written")


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def restoring(run_dir: str):
    """Loading a checkpoint into networks and buffers built from its config.json: a mismatch
    (other widths, a buffer too small, a missing entry) stops with one line."""
    try:
        yield
    except (RuntimeError, KeyError, ValueError, IndexError, TypeError) as e:
        detail = (str(e).strip().splitlines() or [""])[0][:300]
        fail(f"resume folder {run_dir!r}: checkpoint.pt does not fit its config.json ({type(e).__name__}: {detail})")


_held_folders: dict[str, tuple[int, io.TextIOWrapper]] = {}  # run folder -> its locked descriptor and run.lock
_manifests: dict[str, dict] = {}  # held run folder -> its manifest.json, kept current by every atomic write into it


def hold_run_folder(run_dir: str) -> None:
    """Create (or reopen) the run folder and lock it for the rest of the run, so that a second
    process on the same folder stops with one line naming the holder. The lock is an flock of the
    folder itself (deleting run.lock, which only names the holder, does not release it; it dies
    with its process, however that ends); a finished run removes run.lock (Run.close), a stopped
    or crashed one leaves it naming its last holder. Also proves, before training, that every file
    the run will write or replace can be written, and loads the folder's manifest.json."""
    for held in [d for d in _held_folders if os.path.realpath(d) == os.path.realpath(run_dir)]:
        release_run_folder(held)  # as with POSIX locks, a process may take its own folder again
    try:
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
        folder = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        fail(f"cannot write the run folder {run_dir!r} ({e.strerror}); give a writable --runs-dir")
    try:
        fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(folder)
        holder = "unknown"
        with contextlib.suppress(OSError), open(os.path.join(run_dir, "run.lock")) as lock:
            holder = lock.read().strip() or holder
        fail(f"run folder {run_dir!r} is in use by another process ({holder}); wait for it to end or stop it")
    try:
        lock = open(os.path.join(run_dir, "run.lock"), "w")
        lock.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        lock.flush()
    except OSError as e:
        os.close(folder)
        fail(f"cannot write the run folder {run_dir!r} ({e.strerror}); give a writable --runs-dir")
    _held_folders[run_dir] = (folder, lock)
    try:
        with open(os.path.join(run_dir, MANIFEST)) as f:
            _manifests[run_dir] = json.load(f)
    except (OSError, ValueError):  # a new run, or one from before manifest.json
        _manifests[run_dir] = {"fingerprint": None, "files": {}}
    replaced = [os.path.join(run_dir, name) for name in ("metrics.json", "checkpoint.pt", MANIFEST)]
    probes = [os.path.join(where, ".write-probe") for where in (run_dir, os.path.join(run_dir, "checkpoints"))]
    for path in replaced + probes:
        try:
            if path in probes:
                open(path, "wb").close()
                os.remove(path)
            elif os.path.exists(path):
                open(path, "r+b").close()
        except OSError as e:
            fail(f"cannot write {path!r} ({e.strerror}); the run could not save its stages")


def check_writable(folder: str) -> None:
    """Before a run builds anything: the folder (or, where it does not exist yet, the folder that
    will hold it) accepts new files."""
    existing = os.path.normpath(folder)
    while existing not in ("", os.sep) and not os.path.exists(existing):
        existing = os.path.dirname(existing)
    existing = existing or os.curdir
    if not os.path.isdir(existing):
        fail(f"cannot write {folder!r}: {existing!r} is a file; give a writable --runs-dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        fail(f"cannot write {folder!r}: {existing!r} is not writable; give a writable --runs-dir")


def open_run(args, run_dir: str, run_name: str, checkpoint: dict | None, device, config: dict):
    """From here on the run writes: lock its folder, say where it is and how to watch it, start
    tracking (--track), open TensorBoard (dropping what a killed run logged after its last
    checkpoint; the stage-boundary step itself is kept) and, for a new run, write config.json
    (`run_name`, every flag, then `config` and the machine) and its fingerprint. A new run that fails here (a full disk, --track without a login) leaves no folder behind. Returns the
    SummaryWriter."""
    runs_dir_existed, writer = os.path.isdir(args.runs_dir), None
    try:
        hold_run_folder(run_dir)
        print(f"training on {device} ({torch.get_num_threads()} threads); watch it with: tensorboard --logdir "
              f"{run_dir if args.resume else args.runs_dir}", flush=True)
        if args.track:
            start_tracking(args, run_name)
        writer = SummaryWriter(run_dir, purge_step=checkpoint["global_step"] + 1 if checkpoint else None)
        if checkpoint is None:
            writer.add_text("hyperparameters", "|param|value|\n|-|-|\n%s" % "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))
            _manifests[run_dir]["fingerprint"] = fingerprint(args)
            atomic_write_json(os.path.join(run_dir, "config.json"),
                              {"run_name": run_name, "args": asdict(args), **config, "machine": machine(device)})
    except BaseException:
        if writer is not None:  # its thread writes into the folder: closed first, or it races the removal
            writer.close()
        if checkpoint is None:  # a new run's folder holds nothing yet: leave none behind
            release_run_folder(run_dir)
            shutil.rmtree(run_dir, ignore_errors=True)
            if not runs_dir_existed:
                with contextlib.suppress(OSError):
                    os.rmdir(args.runs_dir)
        raise
    return writer


def start_tracking(args, run_name: str) -> None:
    try:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=asdict(args), name=run_name, id=run_name, resume="allow", save_code=True)
    except Exception as e:  # no login, no network, no wandb: before anything is trained
        detail = (str(e).strip().splitlines() or [""])[0][:200]
        fail(f"--track could not start Weights & Biases ({type(e).__name__}: {detail}); log in with `wandb login` "
             f"(or set WANDB_API_KEY), or run without --track")


def machine(device) -> dict:
    """What runs the run, for its report: the CPU's model and cores, the instruction set torch's CPU
    kernels use (`cpu_capability`: AVX2, AVX512...; one seed's CPU runs differed between two machines
    of one CPU model name, docs/reliability.md), torch's threads, the GPU."""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:  # not Linux
        cpu = None
    return {"cpu": cpu or platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "os": platform.platform()}


def processor(record: dict) -> dict:
    """What of a `machine` record decides a run's rounding: the CPU kernels' instruction set and the GPU."""
    return {key: record.get(key) for key in ("cpu_capability", "gpu")}


def record_resume(args, run_dir: str, checkpoint: dict, device) -> None:
    """config.json's `resumes`: when, at which stage and step, on which machine, and each flag
    changed from the value the run last ran with (from -> to); the changes are announced on the
    console, and so is a processor (CPU kernels' instruction set, GPU) other than the one the run last
    ran on: the run goes on, but its numbers may no longer match an uninterrupted run's bit for bit."""
    config_path = os.path.join(run_dir, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    ran_with = config["args"] | {change["flag"]: change["to"] for resume in config.get("resumes", [])
                                 for change in resume["changed"]}
    changed = [{"flag": name, "from": ran_with.get(name), "to": value} for name, value in asdict(args).items()
               if name in RESUME_OVERRIDABLE and name != "resume" and ran_with.get(name) != value]
    ran_on = ([config.get("machine")] + [resume.get("machine") for resume in config.get("resumes", [])])[-1]
    now_on = machine(device)
    config.setdefault("resumes", []).append({
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "stage": checkpoint["stage"] + 1,
        "step": (checkpoint.get("mid_stage") or {}).get("step", 0), "machine": now_on, "changed": changed})
    atomic_write_json(config_path, config)
    if ran_on and "cpu_capability" in ran_on and processor(ran_on) != processor(now_on):
        print(f"warning: resumed on another processor ({processor(now_on)}, the run last ran on {processor(ran_on)}): "
              f"from here its numbers may differ from an uninterrupted run's; recorded in {config_path}", flush=True)
    if changed:
        print("resumed with " + ", ".join(f"{flag(c['flag'])} {json.dumps(c['to'])} (was {json.dumps(c['from'])})"
                                          for c in changed) + f"; recorded in {config_path}", flush=True)


def close_run(args, run_dir: str, writer) -> None:
    writer.close()
    release_run_folder(run_dir)
    if args.track:
        import wandb

        wandb.finish()


def release_run_folder(run_dir: str) -> None:
    held = _held_folders.pop(run_dir, None)
    _manifests.pop(run_dir, None)
    if held is not None:
        folder, lock = held
        lock.close()
        os.close(folder)


def first_non_finite(values: dict, tensors: dict) -> str | None:
    """The first non-finite quantity, as 'name (value)': among `values` (floats already on the
    host: the logged losses) and `tensors` (parameters, the temperature, optimizer and method
    state; one host synchronisation for all of them); None when everything is finite."""
    for name, value in values.items():
        if not math.isfinite(value):
            return f"{name} ({value})"
    names = [name for name, tensor in tensors.items() if tensor.numel()]
    if not names:
        return None
    device = tensors[names[0]].device  # a method may keep its state on the host
    finite = torch.stack([tensors[name].detach().abs().amax().isfinite().to(device) for name in names]).cpu()
    bad = [name for name, ok in zip(names, finite) if not ok]
    return f"{bad[0]} (non-finite values)" if bad else None


def optimizer_tensors(learner) -> dict:
    """The floating-point state of the learner's optimizers (Adam's moments), by name."""
    return {f"{name}.{key}[{i}]": value for name, optimizer in vars(learner).items()
            if isinstance(optimizer, torch.optim.Optimizer)
            for i, state in enumerate(optimizer.state.values()) for key, value in state.items()
            if isinstance(value, torch.Tensor) and value.is_floating_point()}


def floating_tensors(state, prefix: str) -> dict:
    """Every floating-point tensor in a nested state (dicts, lists), by its path."""
    if isinstance(state, torch.Tensor):
        return {prefix: state} if state.is_floating_point() else {}
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    return {path: tensor for key, value in items for path, tensor in floating_tensors(value, f"{prefix}.{key}").items()}


def stop_diverged(run_dir: str, metrics: dict, average: str, where: dict, quantity: str) -> typing.NoReturn:
    """A run whose losses, parameters, temperature, optimizer or method state became non-finite:
    metrics.json says it diverged, with no continual metrics (null), one line on stderr, exit
    DIVERGED_EXIT."""
    metrics = metrics | {average: None, "FM": None, "FWT": None, "complete": False,
                         "diverged": where | {"quantity": quantity}}
    atomic_write_json(os.path.join(run_dir, "metrics.json"), metrics)
    print(f"error: the run diverged: non-finite {quantity} at stage {where['stage']} ({where['task']}), global step "
          f"{where['global_step']}; {os.path.join(run_dir, 'metrics.json')} marks it diverged, with no result",
          file=sys.stderr)
    sys.exit(DIVERGED_EXIT)


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def eta_seconds(remaining_steps: int, steps_per_second: float | None) -> float | None:
    """Time left at the measured rate (env steps/s after learning starts, evaluation included);
    None before any rate is measured."""
    return remaining_steps / steps_per_second if steps_per_second else None


class Progress:
    """The run's progress: tqdm's bar on a terminal, or, when stderr is a log file (nohup, Slurm),
    one plain line every `every` seconds. Both show the stage, the global step, env steps/s, the
    ETA, recent training results and the last evaluation. The rate behind SPS and the ETA is the
    stage's own, measured from `measure_from` (the stage's first update, or a resumed run's first
    step: the random-action phase before it is much faster), over wall time including
    evaluations; with early stopping the ETA is an upper bound (`<=`). The bar shows no remaining
    time or rate of its own (tqdm's, over every step since the start, would contradict them)."""

    BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"

    def __init__(self, total_steps: int, done_steps: int, every: float, upper_bound: bool):
        self.total, self.done, self.every, self.upper_bound = total_steps, done_steps, every, upper_bound
        self.terminal = sys.stderr.isatty()
        self.bar = tqdm(total=total_steps, initial=done_steps, dynamic_ncols=True, mininterval=1.0,
                        disable=not self.terminal, bar_format=self.BAR_FORMAT)
        self.rate, self.label, self.fields = None, "", {}
        self.rate_start = None
        self.last_print = time.time()

    def begin_stage(self, label: str) -> None:
        """A new stage: no rate until it is measured in this stage."""
        self.label, self.rate_start, self.rate = label, None, None
        self.bar.set_description(label)

    def measure_from(self, step: int) -> None:
        self.rate_start = (time.time(), step)

    def advance(self, steps: int, stage_step: int, global_step: int, **fields) -> None:
        """`steps` more env steps done (called every 100 steps); `fields`: what to show besides."""
        self.done += steps
        self.bar.update(steps)
        now = time.time()
        if self.rate_start is not None and stage_step > self.rate_start[1] and now > self.rate_start[0]:
            self.rate = (stage_step - self.rate_start[1]) / (now - self.rate_start[0])
        self.fields = {"step": global_step, "SPS": f"{self.rate:.0f}" if self.rate else "n/a",
                       "ETA": self.eta(), **fields}
        if self.terminal:
            self.bar.set_postfix({k: v for k, v in self.fields.items() if k != "step"}, refresh=False)
        elif self.every and now - self.last_print >= self.every:
            self.last_print = now
            print(f"[{time.strftime('%H:%M:%S')}] {self.label} " + " ".join(f"{k}={v}" for k, v in self.fields.items()),
                  flush=True)

    def skip(self, steps: int) -> None:
        """A stage's unused budget (early stop): counted as done."""
        self.done += steps
        self.bar.update(steps)

    def eta(self) -> str:
        seconds = eta_seconds(self.total - self.done, self.rate)
        if seconds is None:
            return "n/a"
        return ("<=" if self.upper_bound else "") + format_duration(seconds)

    def close(self) -> None:
        self.bar.close()


@dataclass
class Evaluation:
    """What an evaluation of every task of the run is in a script: `score(step)` plays the
    evaluation episodes and writes their TensorBoard values; `brief(scores)` shows them in the
    progress line, `text(scores)` on the console; `probe()` takes the fixed batch the plasticity
    diagnostics are measured on (at the run's first evaluation), `plasticity(probe)` measures them."""

    score: Callable[[int], object]
    brief: Callable[[object], str]
    text: Callable[[object], str]
    probe: Callable[[], object]
    plasticity: Callable[[object], dict]
    record: Callable[[str], tuple[np.ndarray, float]] | None = None
    """with --capture-video: `record(task)` plays the task's recorded episode, returning its frames
    [T, H, W, 3] (uint8, upright) and their frames per second; it leaves every random stream and
    every score of the run untouched"""


class StopSignals:
    """SIGTERM, SIGUSR1 (Slurm's warning before the time limit) and SIGINT (Ctrl-C) ask the run to
    stop: the handler only notes the first of them (a second one while stopping is ignored); the
    run stops where it looks, at the end of an env step or of a stage."""

    def __init__(self):
        self.received, self.previous = None, {}

    def install(self) -> None:
        self.previous = {signum: signal.signal(signum, self.note) for signum in STOP_SIGNALS}

    def note(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    def uninstall(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}


def rng_state(device: torch.device) -> dict:
    """Every global random generator a step draws from (Python, numpy, torch, CUDA), in the types
    a weights-only checkpoint holds."""
    numpy_state = np.random.get_state(legacy=False)
    key = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    return {"python": random.getstate(), "numpy": numpy_state | {"state": numpy_state["state"] | {"key": key}},
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []}


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(numpy_state | {"state": numpy_state["state"] | {"key": numpy_state["state"]["key"].numpy().astype(np.uint32)}})
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


class Run:
    """The lifecycle of one training run, the same in both scripts: its name and folder, what a
    resumed run restores, TensorBoard, progress and SPS, the divergence stop, evaluations with
    the plasticity diagnostics, the success matrix sr with its per-task rows, stage records,
    checkpoints (at stage ends, on a stop signal and every --checkpoint-every minutes) and
    metrics.json. `script`: the training script's file; `average` names the continual average (ASR
    or AR); `rows` the per-task rows that metrics.json and the checkpoint keep besides sr."""

    def __init__(self, args, script: str, label: str, stage_tasks: list[str], average: str, rows: tuple[str, ...],
                 checkpoint: dict | None):
        self.args, self.stage_tasks, self.average, self.checkpoint = args, stage_tasks, average, checkpoint
        self.script, self.stop = os.path.relpath(script), StopSignals()
        if args.resume:
            self.run_name, self.run_dir = checkpoint["run_name"], args.resume
        else:
            self.run_name = f"{label}__{args.exp_name}__{args.seed}__{int(time.time())}"
            self.run_dir = os.path.join(args.runs_dir, self.run_name)
            if len(self.run_name.encode()) > MAX_NAME_BYTES:
                fail(f"the run folder's name {label}__<exp-name>__<seed>__<time> would be {len(self.run_name.encode())} "
                     f"bytes, over the file system's {MAX_NAME_BYTES}; give a shorter --exp-name")
            if os.path.exists(self.run_dir):
                fail(f"run folder {self.run_dir!r} already exists; pick another --exp-name or --runs-dir")
        check_writable(self.run_dir if args.resume else args.runs_dir)
        self.sr, self.stages, self.rows = [], [], {name: [] for name in rows}
        self.start_stage, self.global_step, self.plasticity_probe = 0, 0, None
        if checkpoint is not None:
            self.sr, self.stages = checkpoint["sr"], checkpoint["stages"]
            self.rows = {name: checkpoint[name] for name in rows}
            self.start_stage, self.global_step = checkpoint["stage"], checkpoint["global_step"]
            self.plasticity_probe = checkpoint.get("plasticity_probe")
        self.last_eval = "n/a"
        # the start line, before the slow part (environments, networks, buffers, a checkpoint's load)
        print(f"run folder {self.run_dir}: building the environments, networks and replay buffers", flush=True)
        if checkpoint is not None and self.start_stage < len(stage_tasks):
            print(f"resuming {self.run_dir} at stage {self.start_stage + 1}, step {self.resume_step()}", flush=True)

    def all_stages_done(self) -> bool:
        """A resumed run killed between its last checkpoint and metrics.json: nothing to train."""
        done = self.checkpoint is not None and self.checkpoint["stage"] >= len(self.stage_tasks)
        if done:
            print(f"{self.run_dir}: all {len(self.stage_tasks)} stages are finished; nothing to resume")
        return done

    def restore(self, method, sac, masks, dpre, rb, install_masks: bool) -> None:
        """The run's learning state, which every checkpoint saves: a resumed run's method state,
        learner, NBSP masks (installed with `install_masks`; a baseline installs its own in setup),
        Dpre and, with --keep-buffer or inside a stage, D."""
        self.learning = (method, sac, masks, dpre, rb)
        if self.checkpoint is None:
            return
        with restoring(self.run_dir):
            method.load_state_dict(self.checkpoint["method"])  # first: a method may have grown the networks
            sac.load_state_dict(self.checkpoint)
            masks.load_state_dict(self.checkpoint)
            dpre.load_state_dict(self.checkpoint["dpre"])
            if self.args.keep_buffer or "mid_stage" in self.checkpoint:
                rb.load_state_dict(self.checkpoint["rb"])
        if install_masks:
            masks.install()

    def open(self, device, config: dict, watched: Callable[[], dict], evaluation: Evaluation, upper_bound: bool) -> None:
        """From here on the run writes (open_run); `watched()`: the tensors that must stay finite."""
        self.writer = open_run(self.args, self.run_dir, self.run_name, self.checkpoint, device, config)
        self.device = device
        self.watched, self.evaluation = watched, evaluation
        if self.checkpoint is not None:
            record_resume(self.args, self.run_dir, self.checkpoint, device)
        self.progress = Progress(len(self.stage_tasks) * self.args.steps_per_task,
                                 sum(r["budget_steps"] for r in self.stages) + self.resume_step(),
                                 self.args.progress_every, upper_bound)
        self.stop.install()
        self.next_checkpoint = time.time() + 60 * self.args.checkpoint_every

    def mid_stage(self, stage: int) -> dict | None:
        """What a run resumed inside stage `stage` saved of its steps (the script's own state), or None."""
        checkpoint = self.checkpoint
        if checkpoint is None or checkpoint["stage"] != stage:
            return None
        return checkpoint.get("mid_stage")

    def resume_step(self) -> int:
        """The steps of its stage that a resumed run has done (0 at a stage start)."""
        return (self.mid_stage(self.start_stage) or {}).get("step", 0)

    def begin_stage(self, stage: int) -> int:
        """Every stage restarts its randomness (resume is exact); returns the stage's seed."""
        stage_seed = self.args.seed + 1000 * (stage + 1)
        seed_everything(stage_seed, self.args.torch_deterministic)
        resumed = self.mid_stage(stage) or {}
        # a resumed stage's wall time goes on from its time before the stop (checkpoints older than
        # this record have none: their stage's time counts from the resume)
        self.stage, self.stage_start_time = stage, time.time() - resumed.get("stage_seconds", 0.0)
        self.first_step = resumed.get("step", 0)  # a resumed stage's first step in this process
        self.sps_window = None  # TensorBoard's SPS: (time, stage step) since which it is measured, once measured
        self.progress.begin_stage(f"stage {stage + 1}/{len(self.stage_tasks)} {self.stage_tasks[stage]}")
        return stage_seed

    def next_step(self) -> int:
        self.global_step += 1
        return self.global_step

    def metrics(self) -> dict:
        return metrics_of(self.run_name, self.stage_tasks, self.sr, self.average, **self.rows, stages=self.stages)

    def write_metrics(self) -> dict:
        metrics = self.metrics()
        atomic_write_json(os.path.join(self.run_dir, "metrics.json"), metrics)
        return metrics

    def stop_if_diverged(self, values: dict, method_state: bool = False) -> None:
        """Stop a diverged run (non-finite losses, parameters, temperature or optimizer moments):
        checked where the losses reach the host anyway, and before every evaluation, where the
        method's state (e.g. EWC's Fisher information) is checked too."""
        method, sac = self.learning[:2]
        watched = self.watched() | optimizer_tensors(sac)
        if method_state:
            watched |= floating_tensors(method.state_dict(), "method")
        problem = first_non_finite(values, watched)
        if problem:
            self.writer.close()
            stop_diverged(self.run_dir, self.metrics(), self.average, {
                "stage": self.stage + 1, "task": self.stage_tasks[self.stage], "global_step": self.global_step}, problem)

    def log_losses(self, values: dict) -> None:
        """The update's values, already on the host, as `losses/...`; then the divergence check."""
        for name, value in values.items():
            self.writer.add_scalar(f"losses/{name}", value, self.global_step)
        self.stop_if_diverged(values)

    def log_method_and_sps(self, method, step: int) -> None:
        """The method's own values, and env steps per second since the last time, once the
        stage's rate is measured (advance)."""
        for name, value in method.logs().items():
            self.writer.add_scalar(f"method/{name}", float(value), self.global_step)
        if self.sps_window is not None:
            since, since_step = self.sps_window
            self.sps_window = (time.time(), step + 1)
            sps = int((step + 1 - since_step) / (self.sps_window[0] - since))
            self.writer.add_scalar("charts/SPS", sps, self.global_step)

    def advance(self, step: int, learning_starts: int, recent: Callable[[], dict]) -> None:
        """Progress after stage step `step`; `recent()`: the training results to show. The stage's
        rate (SPS, the ETA, TensorBoard's SPS) is measured from its first update, or from a resumed
        run's first step: neither the random-action phase nor the stages before count."""
        if step == max(learning_starts, self.first_step):
            self.progress.measure_from(step)
            self.sps_window = (time.time(), step + 1)
        if step % 100 == 99:
            self.progress.advance(100, step, self.global_step, eval=self.last_eval, **recent())

    def evaluate(self, video: str | None = None) -> tuple[object, dict]:
        """Every task's scores and the plasticity diagnostics, in TensorBoard at the global step;
        with --capture-video and a `video` name, every task's recorded episode (record_videos)."""
        self.stop_if_diverged({}, method_state=True)  # a diverged policy would make the simulator and the diagnostics fail first
        scores = self.evaluation.score(self.global_step)
        if self.args.capture_video and video:
            self.record_videos(video)
        if self.plasticity_probe is None:
            self.plasticity_probe = self.evaluation.probe()
        plasticity = self.evaluation.plasticity(self.plasticity_probe)
        for name, values in plasticity.items():
            for key, value in values.items():
                self.writer.add_scalar(f"plasticity/{name}/{key}", value, self.global_step)
        return scores, plasticity

    def record_videos(self, name: str) -> None:
        """One recorded episode of every task of the run (Evaluation.record), written to
        videos/{name}_{task}.mp4 and to TensorBoard as `videos/{task}` at the global step."""
        for task in dict.fromkeys(self.stage_tasks):
            frames, fps = self.evaluation.record(task)
            write_video(os.path.join(self.run_dir, "videos", f"{name}_{task}.mp4"), frames, fps)
            stride = math.ceil(fps / GIF_MAX_FPS)  # TensorBoard's video is a GIF
            self.writer.add_video(f"videos/{task}", torch.from_numpy(frames[::stride]).permute(0, 3, 1, 2)[None],
                                  self.global_step, fps=round(fps / stride))

    def evaluate_if_due(self, step: int) -> None:
        """The evaluation every --eval-every global steps (with its videos, with --video-every-eval),
        kept out of TensorBoard's SPS; none at the stage's last step, where the stage's own
        evaluation (evaluate_stage) follows. A script calls it after its early-stop check, for the
        same reason."""
        if not self.args.eval_every or self.global_step % self.args.eval_every or step + 1 == self.args.steps_per_task:
            return
        scores, _ = self.evaluate(f"step{self.global_step}" if self.args.video_every_eval else None)
        self.last_eval = self.evaluation.brief(scores)
        print(f"step {self.global_step}: eval {self.evaluation.text(scores)}")
        if self.sps_window is not None:
            self.sps_window = (time.time(), step + 1)

    def evaluate_stage(self, stage_steps: int, row: Callable[[object], dict], **rows: Callable[[object], dict]):
        """The evaluation after a stage: sr's next row from `row(scores)` (task -> score), each of
        `rows` (name -> the per-task values of the scores) appended to its row, the continual average.
        Returns the scores and the plasticity diagnostics."""
        self.progress.skip(self.args.steps_per_task - (stage_steps - stage_steps % 100))  # unused budget
        scores, plasticity = self.evaluate(f"stage{self.stage + 1}")
        self.last_eval = self.evaluation.brief(scores)
        for name, values in rows.items():
            self.rows[name].append(values(scores))
        self.sr.append([row(scores)[self.stage_tasks[j]] for j in range(self.stage + 1)])
        average = continual_metrics(self.sr, self.average)[self.average]
        if average is not None:
            self.writer.add_scalar(f"eval/{self.average}", average, self.global_step)
        return scores, plasticity

    def end_stage(self, record: dict, scores, note: str = "") -> None:
        """The stage's record, with its wall time, and its console line (`note` appended)."""
        record["wall_seconds"] = round(time.time() - self.stage_start_time, 2)
        self.stages.append(record)
        print(f"stage {self.stage + 1}/{len(self.stage_tasks)} {record['task']}: {record['env_steps']} steps"
              f"{' (early stop)' if record.get('early_stopped') else ''}, {record['wall_seconds']:.0f}s, "
              f"{self.evaluation.text(scores)}{note}")

    def save_checkpoint(self, networks: dict, scores: dict) -> dict:
        """At a stage's end: checkpoints/stage_<k>.pt (the stage's networks, masks and scores),
        checkpoint.pt (everything a resumed run needs) and metrics.json, each replaced atomically.
        A stop signal that came during the stage's end stops the run here, before the next stage."""
        masks = self.learning[2]
        model = {"run_name": self.run_name, "stage": self.stage + 1, "task": self.stage_tasks[self.stage], **networks,
                 "neuron_masks": masks.neuron_masks, "scores": scores, "selected": dict(masks.last_selected)}
        atomic_torch_save(os.path.join(self.run_dir, "checkpoints", f"stage_{self.stage + 1}.pt"), model)
        atomic_torch_save(os.path.join(self.run_dir, "checkpoint.pt"), self.resume_state(model))
        metrics = self.write_metrics()
        if self.stop.received is not None and self.stage + 1 < len(self.stage_tasks):
            self.stop_now(self.stage + 2, 0)
        return metrics

    def resume_state(self, model: dict, mid_stage: dict | None = None) -> dict:
        """checkpoint.pt's content: `model` and the learning state, and inside a stage D always and
        the script's `mid_stage` state of its steps."""
        method, sac, masks, dpre, rb = self.learning
        probe = self.plasticity_probe
        state = {**model, **sac.state_dict(), "method": method.state_dict(), "last_selected": masks.last_selected,
                 "dpre": dpre.state_dict(), "rb": rb.state_dict() if self.args.keep_buffer or mid_stage else {},
                 "sr": self.sr, "stages": self.stages, **self.rows, "global_step": self.global_step,
                 "plasticity_probe": {k: v.cpu() for k, v in probe.items()} if isinstance(probe, dict) else
                 None if probe is None else probe.cpu()}
        return state | {"mid_stage": mid_stage} if mid_stage else state

    def end_step(self, step: int, stage_state: Callable[[], dict]) -> None:
        """After stage step `step`: on a stop signal, checkpoint this step and stop; every
        --checkpoint-every minutes, checkpoint it and go on. `stage_state()`: the script's state of
        the stage's steps (env, episode, counters), to which the step and every RNG are added."""
        stopping = self.stop.received is not None
        due = self.args.checkpoint_every and time.time() >= self.next_checkpoint
        if not (stopping or due) or step + 1 == self.args.steps_per_task:  # the stage's end checkpoints next
            return
        _, _, masks, _, _ = self.learning
        self.writer.flush()  # TensorBoard's values up to this step are on disk before the checkpoint names it
        model = {"run_name": self.run_name, "stage": self.stage, "task": self.stage_tasks[self.stage],
                 "neuron_masks": masks.neuron_masks, "scores": {}, "selected": dict(masks.last_selected)}
        mid_stage = {"step": step + 1, "stage_seconds": time.time() - self.stage_start_time, "rng": rng_state(self.device),
                     **stage_state()}
        atomic_torch_save(os.path.join(self.run_dir, "checkpoint.pt"), self.resume_state(model, mid_stage))
        self.next_checkpoint = time.time() + 60 * self.args.checkpoint_every
        if stopping:
            self.stop_now(self.stage + 1, step + 1)

    def stop_now(self, stage_number: int, step: int) -> typing.NoReturn:
        """The stop after the checkpoint of (1-based) stage `stage_number`, step `step` is written:
        one line, a Slurm self-requeue on SIGUSR1, exit STOPPED_EXIT."""
        signum = self.stop.received
        self.progress.close()
        close_run(self.args, self.run_dir, self.writer)
        self.stop.uninstall()
        resumable = os.path.isfile(os.path.join(self.run_dir, "checkpoint.pt"))
        print(f"stopped at stage {stage_number}, step {step}; " + (
              f"resume with: python {self.script} --resume {self.run_dir}" if resumable else
              "nothing to resume: no stage or step was checkpointed"), flush=True)
        if signum == signal.SIGUSR1:
            import slurm  # slurm.py imports this module

            slurm.requeue_self()
        sys.exit(STOPPED_EXIT)

    def close(self, metrics: dict) -> dict:
        """Close TensorBoard and the run folder, which a finished run leaves without run.lock; the
        sr table and the summary line."""
        self.progress.close()
        with contextlib.suppress(FileNotFoundError):  # before the lock is released: never the next holder's
            os.remove(os.path.join(self.run_dir, "run.lock"))
        close_run(self.args, self.run_dir, self.writer)
        self.stop.uninstall()
        print(matrix_table(self.stage_tasks, self.sr))
        print(summary_line(metrics, self.average, os.path.join(self.run_dir, "metrics.json")))
        return metrics


def format_score(value, digits: int = 2) -> str:
    """A score for the console; `n/a` where it is missing (an Atari evaluation that finished no game)."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def matrix_table(stage_tasks: list[str], sr: list[list[float | None]]) -> str:
    """The matrix sr as a small text table: a row after each stage, a column per stage's task."""
    width = max(len(t) for t in stage_tasks)
    head = " " * (width + 10) + " ".join(f"{t[:8]:>8}" for t in stage_tasks)
    rows = [f"after {i + 1:>2}: {stage_tasks[i]:<{width}} " + " ".join(f"{format_score(v):>8}" for v in row)
            for i, row in enumerate(sr)]
    return "\n".join([head, *rows])


def summary_line(metrics: dict, average: str, path: str) -> str:
    """The run's last line: its continual metrics and where metrics.json is."""
    return " ".join(f"{name}={format_score(metrics[name], 3)}" for name in (average, "FM", "FWT")) + f" -> {path}"


def continual_metrics(sr: list[list[float | None]], average: str = "ASR") -> dict:
    """Paper Eq. 9-11 (13 on Atari, where the average is called AR) of the lower-triangular matrix
    sr[i][j] (task j evaluated after stage i) over its rows: the average over stages of the mean
    over the tasks seen so far, FM the mean drop from each task's best earlier value, FWT the mean
    of the diagonal. A metric that reads a missing entry (None: an Atari evaluation that finished
    no game) is missing too, rather than computed from part of the matrix."""
    H = len(sr)
    seen = [sr[i][: i + 1] for i in range(H)]
    missing = {(i, j) for i in range(H) for j in range(i + 1) if sr[i][j] is None}
    mean_seen = sum(sum(row) / len(row) for row in seen) / H if not missing else None
    fwt = sum(sr[i][i] for i in range(H)) / H if not any(i == j for i, j in missing) else None
    fm = None
    if H > 1 and not missing - {(H - 1, H - 1)}:  # FM reads every entry but the last task's first score
        fm = sum(
            sum(max(sr[l][j] - sr[i][j] for l in range(j, i)) for j in range(i)) / i for i in range(1, H)
        ) / (H - 1)
    return {average: mean_seen, "FM": fm, "FWT": fwt}


def metrics_of(run_name: str, stage_tasks: list[str], sr, average: str, **rows) -> dict:
    """metrics.json's content: the sr matrix padded to H x H, the continual metrics (None before
    the first stage ends) and the per-stage `rows`."""
    H = len(stage_tasks)
    scores = continual_metrics(sr, average) if sr else {average: None, "FM": None, "FWT": None}
    return {"run_name": run_name, "stage_tasks": stage_tasks, "complete": len(sr) == H,
            "sr": [row + [None] * (H - len(row)) for row in sr] + [[None] * H] * (H - len(sr)), **scores, **rows}


class HashingWriter:
    """A file being written, and the sha256 of what was written to it."""

    def __init__(self, file):
        self.file, self.digest = file, hashlib.sha256()

    def write(self, data) -> int:
        self.digest.update(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def atomic_write_json(path: str, data) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=2).encode()))


def atomic_torch_save(path: str, data) -> None:
    """Written beside `path`, on disk, then renamed over it: `path` is the old file or the new one, whole."""
    atomic_write(path, lambda f: torch.save(data, f))


def atomic_write(path: str, write: Callable[[HashingWriter], None]) -> None:
    """`write(f)` into a temporary file beside `path`, on disk, then renamed over it. Inside a held
    run folder the file's sha256 is recorded in its manifest.json: while the file is replaced the
    manifest accepts the old and the new checksum, so a kill at any point leaves a file it vouches
    for. A failed write (a full disk) removes the temporary file and stops with one line."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            hashing = HashingWriter(f)
            write(hashing)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        with contextlib.suppress(OSError):
            os.remove(tmp)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).strip().splitlines() or [""])[-1][:200]
        fail(f"cannot write {path!r} ({reason}); is the disk full? Files already written are kept")
    run_dir = next((d for d in _manifests if os.path.dirname(path) in (d, os.path.join(d, "checkpoints"))), None)
    if run_dir is None or os.path.basename(path) == MANIFEST:
        os.replace(tmp, path)
        return
    files, name, digest = _manifests[run_dir]["files"], os.path.relpath(path, run_dir), hashing.digest.hexdigest()
    previous = files.get(name) if os.path.exists(path) else None
    if previous is not None:
        files[name] = [*(previous if isinstance(previous, list) else [previous]), digest]
        atomic_write_json(os.path.join(run_dir, MANIFEST), _manifests[run_dir])
    os.replace(tmp, path)
    files[name] = digest
    atomic_write_json(os.path.join(run_dir, MANIFEST), _manifests[run_dir])


def write_video(path: str, frames: np.ndarray, fps: float) -> None:
    """frames [T, H, W, 3] (uint8) as an H.264 mp4 (imageio's ffmpeg), written beside `path` and
    renamed over it: a killed run leaves no half-written video."""
    import imageio.v2 as imageio  # only runs that record videos need the encoder

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path.removesuffix(".mp4") + ".tmp.mp4"
    try:
        imageio.mimwrite(tmp, frames, fps=fps, macro_block_size=1)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        fail(f"cannot write {path!r} ({e.strerror or e}); is the disk full? Files already written are kept")
    os.replace(tmp, path)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = deterministic
