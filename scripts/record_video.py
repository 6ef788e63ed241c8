# Videos of a finished stage's policy, from a Meta-World run folder: to see what a task learned,
# and later forgotten, looks like, after the run (or for a run made without --capture-video).
# Examples: `--help` (DESCRIPTION).
#
# The actor of checkpoints/stage_<k>.pt plays each task as the training script's --capture-video
# records it (nbsp_sac_metaworld.video_envs and video_recorder: the task's first evaluation
# configuration, the deterministic policy, the corner camera, upright), so a video of stage k made
# here is the one --capture-video would have written after stage k at the same size and length.
import argparse
import dataclasses
import os
import types

import imageio.v2 as imageio

import nbsp_sac_metaworld as mw
import protocol
from baselines import make_method
from cli import Parser, UsageError, check_folder
from neuron_analysis import AnalysisError, finished_stages, load_agent, load_stage, read_config, run_args

DESCRIPTION = """Videos of the policy of a finished stage of a Meta-World run: the actor saved after stage k
(checkpoints/stage_<k>.pt) plays each task of the run (or --tasks), recorded as --capture-video
records it, into <out>/stage<k>_<task>.mp4; --frame also saves one frame as a PNG.

examples:
  python scripts/record_video.py runs/<run_name>                       # the last finished stage, every task
  python scripts/record_video.py runs/<run_name> --stage 2 --tasks window-open --frame 150"""

UNSUPPORTED = {"cotasp": "its actor's task-specific weights live in the method's state, not in the stage checkpoint"}


def record(run_dir: str, stage: int | None, tasks: list[str] | None, size: int | None, steps: int | None,
           out: str | None, frame: int | None) -> list[str]:
    """Writes the videos (and frames) and returns their paths."""
    config = read_config(run_dir)
    if "games" in config["args"]:
        raise AnalysisError(f"{run_dir!r} is an Atari run; this script records Meta-World runs (an Atari run "
                            "records its videos with --capture-video)")
    args = run_args(config)
    if args.method in UNSUPPORTED:
        raise AnalysisError(f"--method {args.method} runs are not supported: {UNSUPPORTED[args.method]}")
    stages = finished_stages(run_dir)
    stage = stage if stage is not None else (stages[-1] if stages else 1)
    checkpoint = load_stage(run_dir, stage)
    run_tasks = list(dict.fromkeys(config.get("stage_tasks", [t.removesuffix("-v3") for t in args.tasks])))
    tasks = tasks or run_tasks
    unknown = [t for t in tasks if t not in mw.TASK_NAMES]
    if unknown:
        raise AnalysisError(f"unknown task {unknown[0]!r}; valid Meta-World v3 tasks: {' '.join(mw.TASK_NAMES)}")
    args = dataclasses.replace(args, video_size=size or args.video_size, video_steps=steps or args.video_steps)
    low, high = protocol.VIDEO_SIZES
    if args.video_size % 2 or not low <= args.video_size <= high:
        raise AnalysisError(f"--size must be an even number of pixels in [{low}, {high}], got {args.video_size}")
    if args.video_steps <= 0:
        raise AnalysisError(f"--steps must be a positive integer, got {args.video_steps}")
    if frame is not None and not 0 <= frame <= args.video_steps:
        raise AnalysisError(f"--frame must be in [0, --steps {args.video_steps}], got {frame}")
    envs = mw.video_envs(tasks, args)
    actor, _ = load_agent(args, checkpoint, envs[tasks[0]])
    play = mw.video_recorder(envs, types.SimpleNamespace(actor=actor), make_method(args), args, "cpu", mw.MujocoWarnings())
    folder, written = out or os.path.join(run_dir, "videos"), []
    for task in tasks:
        frames, fps = play(task)
        path = os.path.join(folder, f"stage{stage}_{task}.mp4")
        protocol.write_video(path, frames, fps)
        written.append(path)
        if frame is not None:
            png = os.path.join(folder, f"stage{stage}_{task}_frame{frame}.png")
            imageio.imwrite(png, frames[min(frame, len(frames) - 1)])
            written.append(png)
    return written


def make_parser() -> argparse.ArgumentParser:
    parser = Parser(description=DESCRIPTION)
    parser.add_argument("run_dir", help="Meta-World run folder runs/<run_name> with config.json and checkpoints/")
    which = parser.add_argument_group("which policy and tasks")
    which.add_argument("--stage", type=int, default=None, help="stage whose actor plays (default: the last finished)")
    which.add_argument("--tasks", nargs="+", default=None, help="tasks to record (default: every task of the run)")
    video = parser.add_argument_group("video")
    video.add_argument("--size", type=int, default=None, help="width and height in pixels (default: the run's --video-size)")
    video.add_argument("--steps", type=int, default=None, help="environment steps recorded (default: the run's --video-steps)")
    video.add_argument("--frame", type=int, default=None, help="also save this frame of each video as a PNG")
    video.add_argument("--out", default=None, help="folder of the files (default: the run's videos/)")
    return parser


def main(argv=None) -> list[str]:
    parser = make_parser()
    options = parser.parse_args(argv)
    try:
        if options.out:
            check_folder("--out", options.out)
        written = record(options.run_dir.rstrip("/"), options.stage, options.tasks, options.size, options.steps,
                         options.out, options.frame)
    except (AnalysisError, UsageError) as e:
        parser.exit(2, f"error: {e}\n")
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
