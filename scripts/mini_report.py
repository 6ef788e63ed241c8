"""Writes docs/results-mini.md from the runs of `python scripts/sweep.py --preset mini` (and the
single-task pilot runs that chose its task pair): the Table 2 layout, the IQM table, the curves
figure, the exact commands, the machine and the wall time. Nothing in the document is typed by
hand except the free text passed with --notes.

    python scripts/mini_report.py --runs runs/mini --pilot runs/mini-pilot --sweep-log sweep.out \
        --notes notes.md --out docs/results-mini.md
"""

import argparse
import os
import platform
import shlex
import sys

import numpy as np

import figures
import paper_tables
from run_folders import RunFolderError, complete_runs, find
from sweep import PRESETS


def steps_to(curve, threshold: float):
    """First evaluation step whose success reaches `threshold`, or None."""
    steps, values = curve
    hits = np.nonzero(np.asarray(values) >= threshold)[0]
    return int(steps[hits[0]]) if len(hits) else None


def pilot_section(pilot_dir: str, threshold: float, out_dir: str) -> list[str]:
    """Single-task learning curves: the steps each candidate task needed to reach `threshold`."""
    runs = find([pilot_dir])
    flags = runs[0].args
    intro = (f"Each pilot run: hidden {' '.join(map(str, flags['hidden']))}, batch {flags['batch_size']}, up to "
             f"{flags['steps_per_task']:,} steps, {flags['learning_starts']:,} random steps first, evaluation every "
             f"{flags['eval_every']:,} steps ({flags['eval_episodes']} episodes).")
    if any(not r.complete for r in runs):
        intro += " Runs marked \"stopped by hand\" were ended before their budget to free the CPU for the benchmark itself."
    lines = [intro, "", f"| task | seed | evaluations (step: success) | steps to {threshold} | run length |",
             "|---|---:|---|---:|---:|"]
    for run in sorted(runs, key=lambda r: (r.args["tasks"][0], r.args["seed"])):
        task = run.args["tasks"][0]
        curve = figures.read_eval_curves(run.path).get(task)
        if curve is None:
            continue
        steps, values = curve
        first = steps_to(curve, threshold)
        evaluations = ", ".join(f"{s / 1000:g}k: {v:.2f}" for s, v in zip(steps, values))
        reached = f"{first:,}" if first is not None else f"not by {int(steps[-1]):,}"
        finished = "complete" if run.complete else "stopped by hand"
        lines.append(f"| {task} | {run.args['seed']} | {evaluations} | {reached} | {int(steps[-1]):,} ({finished}) |")
    figure = figures.plot_curves([r.path for r in runs], os.path.join(out_dir, "results-mini-pilot"),
                                 title="single-task SAC (pilot)") if runs else []
    return lines, figure


def per_run_table(runs) -> list[str]:
    lines = ["| run | sr (rows = after each stage) | ASR | FM | FWT | stage steps |", "|---|---|---:|---:|---:|---|"]
    for run in sorted(runs, key=lambda r: (r.args["exp_name"], r.args["seed"])):
        m = run.metrics
        sr = "; ".join(" ".join(f"{v:.2f}" for v in row if v is not None) for row in m["sr"])
        steps = " ".join(str(s["env_steps"]) + ("*" if s["early_stopped"] else "") for s in m["stages"])
        lines.append(f"| {run.args['exp_name']} seed {run.args['seed']} | {sr} | {m['ASR']:.3f} | "
                     f"{m['FM']:.3f} | {m['FWT']:.3f} | {steps} |")
    return lines


def by_setting(runs, label):
    """(setting label, its runs), sorted by label."""
    groups = {}
    for run in runs:
        groups.setdefault(label(run.args), []).append(run)
    return sorted(groups.items())


def identification_table(runs, label) -> list[str]:
    """Per setting, what identification had to work with: windows whose goal metric was constant
    (no goal information), dead units among the selected skill neurons, and the share of the
    window's steps that belong to successful episodes."""
    lines = ["| setting | runs | windows with a constant goal metric | selected units dead over the window | "
             "steps in successful episodes (mean) |", "|---|---:|---:|---:|---:|"]
    for name, group in by_setting(runs, label):
        stages = [stage for run in group for stage in run.metrics["stages"] if "selection" in stage]
        if not stages:
            continue
        constant = sum(bool(stage["goal_constant"]) for stage in stages)
        dead = sum(sel["selected_dead"] for stage in stages for sel in stage["selection"].values())
        selected = sum(stage["skill_neurons"][net] for stage in stages for net in stage["selection"])
        share = np.mean([stage["identify_success_share"] for stage in stages])
        lines.append(f"| {name} | {len(group)} | {constant} of {len(stages)} | {dead} of {selected} | {share:.2f} |")
    return lines


def plasticity_table(runs, label) -> list[str]:
    """Per setting and stage, the means over runs of the actor's dormant share and the first critic's
    feature rank, as each run measured them at the end of the stage."""
    stages = max(len(run.metrics["stages"]) for run in runs)
    lines = ["| setting | runs | " + " | ".join(f"after stage {i + 1}" for i in range(stages)) + " |",
             "|---|---:|" + "---:|" * stages]
    for name, group in by_setting(runs, label):
        cells = []
        for i in range(stages):
            measured = [run.metrics["stages"][i]["plasticity"] for run in group if len(run.metrics["stages"]) > i]
            cells.append(f"{np.mean([m['actor']['dormant_ratio'] for m in measured]):.2f} / "
                         f"{np.mean([m['qf1']['feature_rank'] for m in measured]):.1f}")
        lines.append(f"| {name} | {len(group)} | " + " | ".join(cells) + " |")
    return lines


def more_seeds_section(grid_runs, more_dir: str, command: str | None) -> list[str]:
    """The settings that have runs in `more_dir` (same preset, further seeds), tabled over the
    grid's seeds and those together, with the further runs themselves and their cost."""
    extra = paper_tables.load_runs([more_dir])
    settings = {run.label for run in extra}
    pooled = [run for run in grid_runs if run.label in settings] + extra
    seeds = sorted({run.seed for run in pooled if run.ok})
    extra_counted = complete_runs([more_dir])
    return ["## More seeds for some settings", "", "```bash", command or f"(runs in {more_dir})", "```", "",
            f"The same pair and flags as the grid; each of these settings pooled over the grid's runs and these "
            f"(seeds {', '.join(map(str, seeds))}):", "",
            paper_tables.settings_table(pooled, "markdown", title=None), "",
            paper_tables.iqm_table(pooled, "markdown"), "",
            f"The further runs (training wall time summed over them: {wall_time(extra_counted) / 60:.1f} min):", ""] \
        + per_run_table(extra_counted) + [""]


def wall_time(runs) -> float:
    return sum(stage["wall_seconds"] for run in runs for stage in run.metrics["stages"])


class ReportError(Exception):
    """Bad input: reported in one line."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like the other scripts, instead of usage + error
        raise ReportError(message)


def input_problem(args) -> str | None:
    """What is wrong with the command line before anything is read, or None."""
    for flag, path in (("--runs", args.runs), ("--pilot", args.pilot), ("--sweep-log", args.sweep_log),
                       ("--notes", args.notes), ("--supplement", args.supplement), ("--more-seeds", args.more_seeds)):
        if path is not None and not os.path.exists(path):
            return f"{flag} {path!r} does not exist"
    for command, folder in (("supplement_command", "supplement"), ("more_seeds_command", "more_seeds")):
        if getattr(args, command) is not None and getattr(args, folder) is None:
            return f"--{command.replace('_', '-')} describes the runs of --{folder.replace('_', '-')}, which is not given"
    if not 0 < args.threshold <= 1:
        return f"--threshold must be in (0, 1], got {args.threshold}"
    return None


def main(argv=None) -> int:
    try:
        args = make_parser().parse_args(argv)
        problem = input_problem(args)
        if problem:
            raise ReportError(problem)
        return write_report(args, argv)
    except (ReportError, paper_tables.TablesError, figures.FigureError, RunFolderError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def make_parser() -> argparse.ArgumentParser:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/mini", help="run folders of the mini preset")
    parser.add_argument("--pilot", default=None, help="single-task pilot runs that chose the task pair")
    parser.add_argument("--sweep-log", default=None, help="the sweep's console output (for its start, end and wall time)")
    parser.add_argument("--notes", default=None, help="Markdown file of findings written after reading the numbers")
    parser.add_argument("--supplement", default=None, help="runs of a further try (another size, say), reported after the main grid")
    parser.add_argument("--supplement-command", default=None, help="the command that made the --supplement runs")
    parser.add_argument("--more-seeds", default=None,
                        help="runs of the same preset with further seeds (sweep.py --preset mini --seeds 4 5 --settings ...); "
                             "their settings are tabled again over the grid's seeds and these")
    parser.add_argument("--more-seeds-command", default=None, help="the command that made the --more-seeds runs")
    parser.add_argument("--threshold", type=float, default=0.8, help="success that counts as learned in the pilot")
    parser.add_argument("--out", default="docs/results-mini.md")
    return parser


def write_report(args, argv) -> int:
    runs = paper_tables.load_runs([args.runs])
    counted = complete_runs([args.runs])
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    preset = PRESETS["mini"]
    command = "python scripts/sweep.py --preset mini --jobs 2"
    curves = figures.plot_curves([r.path for r in counted], os.path.join(out_dir, "results-mini-curves"),
                                 align="stage", label=paper_tables.setting_label,
                                 title="mini: " + " -> ".join(preset["sequences"][0].split(",")) + " x 2 cycles")

    doc = ["# Laptop-scale benchmark: does SAC forget, and does NBSP keep what it learned?", "",
           "Generated by `scripts/mini_report.py` from the run folders; the numbers are as measured.", ""]
    report_command = "python scripts/mini_report.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    doc += ["## Command", "", "```bash", command, report_command, "```", "",
            f"Sequence: {preset['sequences'][0].replace(',', ' -> ')}, two cycles (4 stages). Settings: "
            + ", ".join(preset["settings"]) + ". Flags of every run: `" + " ".join(preset["flags"]) + "` (NBSP-only "
            "flags go to the settings that use them). Seeds 1, 2, 3.", ""]
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, no GPU"
    doc += ["## Machine and time", "", f"- Machine: {machine}; two runs at a time, one thread each.",
            f"- Training wall time summed over runs (stages, evaluation and identification included): "
            f"{wall_time(counted) / 60:.1f} min for {len(counted)} complete runs."]
    if args.sweep_log:
        with open(args.sweep_log) as f:
            tail = [line.rstrip() for line in f if line.strip()]
        doc += [f"- Sweep console, first and last lines: `{tail[0]}` ... `{tail[-1]}`"]
        real = [line for line in tail if line.startswith("real")]
        if real:
            doc += [f"- Sweep wall time (`time`): {real[-1].split()[1]}"]
    doc += [""]
    doc += ["## Results (layout of paper Table 2; mean ± standard error over seeds)", "",
            paper_tables.settings_table(runs, "markdown", title=None), "",
            paper_tables.iqm_table(runs, "markdown"), ""]
    doc += ["Every run (`*`: the stage stopped early at 0.9 training success):", ""] + per_run_table(counted) + [""]
    identification = identification_table(counted, paper_tables.setting_label)
    if len(identification) > 2:
        doc += ["## What identification had to work with", "",
                "Over every stage of every run of a setting (4 identification windows per run):", ""] + identification + [""]
    doc += ["## Plasticity", "", "Actor's dormant share / first critic's feature rank at the end of each stage, mean over "
            "runs: a neuron is dormant when its mean |activation| is at most "
            f"{counted[0].args['dormant_threshold']} of its layer's mean (ReDo); the rank is srank (delta 0.01) of the last "
            "hidden layer, out of its width. Both on one fixed batch of the first task's transitions.", ""]
    doc += plasticity_table(counted, paper_tables.setting_label) + [""]
    doc += ["## Curves", "", "Evaluation success of each task (deterministic policy, 10 episodes; mean and standard error "
            "over seeds) against the stage, each seed's steps scaled to its own stage lengths (stages that stop early "
            "differ between seeds); shaded spans are the stages that train the panel's task.", "",
            f"![curves]({os.path.basename(curves[0])})", ""]
    if args.supplement:
        extra = complete_runs([args.supplement])
        wide = figures.plot_curves([r.path for r in extra], os.path.join(out_dir, "results-mini-supplement-curves"),
                                   align="stage", label=paper_tables.setting_label, title="further try")
        doc += ["## A further try", "", "```bash", args.supplement_command or f"(runs in {args.supplement})", "```", "",
                paper_tables.settings_table(paper_tables.load_runs([args.supplement]), "markdown", title=None), "",
                f"Training wall time summed over runs: {wall_time(extra) / 60:.1f} min.", ""]
        doc += per_run_table(extra) + ["", f"![supplement]({os.path.basename(wide[0])})", ""]
    if args.more_seeds:
        doc += more_seeds_section(runs, args.more_seeds, args.more_seeds_command)
    if args.notes:
        with open(args.notes) as f:
            doc += ["## What the numbers say", "", f.read().strip(), ""]
    if args.pilot:
        lines, figure = pilot_section(args.pilot, args.threshold, out_dir)
        doc += ["## How the task pair was chosen", "",
                "Single-task SAC runs (`python scripts/sweep.py --preset mini-pilot`, seeds 1, 2, 3) of the candidate "
                "tasks; the pair had to be learned within the stage budget by SAC alone.", ""] + lines + [""]
        if figure:
            doc += [f"![pilot]({os.path.basename(figure[0])})", ""]
    with open(args.out, "w") as f:
        f.write("\n".join(doc))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
