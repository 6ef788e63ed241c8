# Figures of NBSP runs (matplotlib, PNG and PDF of each figure); examples: `--help`.
#
# A run argument is a run folder (with config.json) or a folder of run folders. Runs are grouped
# by task sequence and cycle count: one figure per sequence, titled with it (written to OUT when
# there is one sequence, OUT-{task+task} when there are several). Within a sequence, runs are
# grouped into *settings* by their config.json args minus the seed and bookkeeping (BOOKKEEPING
# below); the runs of a setting are its seeds. Each setting is labelled by the args in which the
# settings of its figure differ ("sac" / "nbsp" when only --method differs).
#
# curves: one panel per task, the deterministic evaluation success of that task (TensorBoard
#   `eval/{task}/success_rate`, logged every --eval-every steps and at every stage end) against
#   training progress, one colour per setting: the mean over seeds and a shaded band of +- one
#   standard error (no band for one seed). Stage boundaries are dashed lines, and the stages that
#   train the panel's task are shaded, so a drop outside the shading is forgetting and the level
#   at the start of a shaded stage of the second cycle is what was retained.
#   Alignment of seeds (early stop makes stage lengths differ between seeds):
#   --align step (default): x = global environment step. Each seed's curve is interpolated
#     linearly onto the union of all seeds' evaluation steps, and a seed counts only inside the
#     range it logged. Boundaries and shading are drawn from the first seed (lowest --seed) of
#     each setting; a dotted line marks any boundary where another seed of the setting differs.
#     When all settings share those boundaries they are drawn once in grey, otherwise in the
#     setting's colour (shading then follows the first setting).
#   --align stage: x = stage index + fraction of the stage done, from each seed's own stage
#     lengths (metrics.json `stages[].env_steps`; a stage still running counts its budget), so
#     every seed's boundaries fall on the integers and stage k of every seed is averaged with
#     stage k of the others. Use it when stages end early.
# skill-ratio: a metric of metrics.json (ASR by default) against --skill-ratio, mean +- s.e. over
#   seeds, one line per setting (runs grouped by their args minus seed, bookkeeping and the
#   skill ratio); runs of another method than nbsp are drawn as horizontal reference lines with
#   their band, and unfinished runs are left out (with a note on stderr).
# histogram: per-step activations of one neuron over episodes of the stochastic policy on a task,
#   split by whether the episode succeeded (the goal metric of identification), from a stage
#   checkpoint; default stage: the first whose episodes hold a success and a failure (stages whose
#   identification window did are tried first); default neuron: the top-scoring (hence selected)
#   skill neuron of the actor.
import argparse
import json
import logging
import math
import os
import re
import sys
import textwrap
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from matplotlib.transforms import blended_transform_factory  # noqa: E402

from cli import Parser, UsageError, check_device, check_output  # noqa: E402
from protocol import BOOKKEEPING  # noqa: E402
from run_folders import RunFolder, RunFolderError, find  # noqa: E402
from skill_neurons import NETWORKS  # noqa: E402

EVAL_TAG = re.compile(r"eval/(.+)/success_rate")
PLASTICITY_TAG = re.compile(rf"plasticity/({'|'.join(NETWORKS)})/(dormant_ratio|feature_rank|weight_magnitude)")
PLASTICITY_NAMES = {"dormant_ratio": "dormant neurons (ReDo)", "feature_rank": "feature rank (srank, last hidden layer)",
                    "weight_magnitude": "mean |weight|"}
COLORS = plt.rcParams["axes.prop_cycle"].by_key()["color"]
LEGEND_WIDTH = 48  # characters of a legend entry's line: the legend stays narrower than the plots


class FigureError(Exception):
    """Unusable input; the command line prints it as one `error:` line and exits with 2."""


# ------------------------------------------------------------------------------------------
# Settings: runs grouped by their args (scripts/run_folders.py reads the run folders)
# ------------------------------------------------------------------------------------------
def setting_key(args: dict, ignore=()) -> str:
    return json.dumps({k: v for k, v in args.items() if k not in BOOKKEEPING and k not in ignore}, sort_keys=True)


def group_runs(runs: list[RunFolder], ignore=()) -> dict[str, list[RunFolder]]:
    """Runs grouped into settings (args minus seed, bookkeeping and `ignore`), seeds sorted."""
    groups = defaultdict(list)
    for run in runs:
        groups[setting_key(run.args, ignore)].append(run)
    return {k: sorted(v, key=lambda r: (r.args.get("seed", 0), r.path)) for k, v in groups.items()}


def _format_value(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def setting_labels(keys) -> dict[str, str]:
    """Short label of each setting: the args whose values differ between the settings."""
    parsed = {k: json.loads(k) for k in keys}
    names = sorted({n for a in parsed.values() for n in a})
    differing = [n for n in names if len({json.dumps(a.get(n)) for a in parsed.values()}) > 1]
    labels = {}
    for key, a in parsed.items():
        if not differing:
            labels[key] = str(a.get("method", "nbsp"))
        elif differing == ["method"]:
            labels[key] = str(a.get("method"))
        else:
            labels[key] = ", ".join(f"{n.replace('_', '-')}={_format_value(a.get(n))}" for n in differing)
    return labels


def legend_label(label: str, runs: list[RunFolder]) -> str:
    """A setting's legend entry: its label with the seed count, wrapped so that the legend stays
    narrower than the plots."""
    return textwrap.fill(f"{label} (n={len(runs)})", LEGEND_WIDTH, break_on_hyphens=False)


def by_sequence(runs: list[RunFolder]) -> dict[str, list[RunFolder]]:
    """Runs grouped by task sequence and cycle count, {"reach → drawer-close, 2 cycles": runs}, in
    the order first seen: one figure each."""
    sequences = defaultdict(list)
    for run in runs:
        cycles = len(run.stage_tasks) // max(len(run.sequence()), 1)
        sequences[f"{' → '.join(run.sequence())}, {cycles} cycle{'s' * (cycles != 1)}"].append(run)
    return dict(sequences)


def sequence_outputs(out: str, sequences) -> dict[str, str]:
    """{sequence: output path without extension}: `out` for one sequence, else `out-{tasks}` (and
    the cycle count when two figures share the tasks)."""
    stem = out[: -len(os.path.splitext(out)[1])] if os.path.splitext(out)[1] in (".png", ".pdf") else out
    if len(sequences) == 1:
        return {sequence: stem for sequence in sequences}
    tasks = {sequence: sequence.rsplit(", ", 1)[0].replace(" → ", "+") for sequence in sequences}
    repeated = {t for t in tasks.values() if list(tasks.values()).count(t) > 1}
    return {sequence: f"{stem}-{t}" + (f"-{sequence.rsplit(', ', 1)[1].split()[0]}cycles" if t in repeated else "")
            for sequence, t in tasks.items()}


def out_paths(out: str) -> list[str]:
    stem = out[: -len(os.path.splitext(out)[1])] if os.path.splitext(out)[1] in (".png", ".pdf") else out
    return [stem + ".png", stem + ".pdf"]


def save(fig, out: str) -> list[str]:
    paths = out_paths(out)
    os.makedirs(os.path.dirname(os.path.abspath(paths[0])), exist_ok=True)
    for path in paths:
        # no creation date in the PDF: the same runs give the same bytes, so a regenerated report changes
        # in git only where its numbers do
        metadata = {"CreationDate": None} if path.endswith(".pdf") else None
        fig.savefig(path, dpi=150, bbox_inches="tight", metadata=metadata)
    plt.close(fig)
    return paths


# ------------------------------------------------------------------------------------------
# Training curves (paper Fig. 3, 9-12)
# ------------------------------------------------------------------------------------------
SCALARS_FILE = "scalars.json"  # an exported run's scalars (scripts/export_results.py), read when it has no events


def read_scalars(run_dir: str, keep: re.Pattern | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{tag: (steps, values)} of the run's TensorBoard scalars (those matching `keep`), one value per
    step (the last logged: a periodic evaluation that falls on a stage end repeats the same
    evaluation); from its scalars.json when the folder has no events (an exported run)."""
    if not any(name.startswith("events.out.tfevents") for name in os.listdir(run_dir)) and \
            os.path.isfile(os.path.join(run_dir, SCALARS_FILE)):
        with open(os.path.join(run_dir, SCALARS_FILE)) as f:
            logged = {tag: [tuple(point) for point in points] for tag, points in json.load(f).items()}
    else:
        from tensorboard.backend.event_processing import event_accumulator as ea

        guidance = {ea.SCALARS: 0, ea.HISTOGRAMS: 1, ea.COMPRESSED_HISTOGRAMS: 1, ea.TENSORS: 1, ea.IMAGES: 1, ea.AUDIO: 1}
        accumulator = ea.EventAccumulator(run_dir, size_guidance=guidance)
        tensorboard_log = logging.getLogger("tensorboard")
        level = tensorboard_log.level
        tensorboard_log.setLevel(logging.ERROR)  # a resumed run's events restart at its checkpoint (purge_step):
        try:  # TensorBoard's warning "Detected out of order event.step ... Purging" is the expected purge
            accumulator.Reload()
        finally:
            tensorboard_log.setLevel(level)
        logged = {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}
    scalars = {}
    for tag, points in logged.items():
        if keep is None or keep.fullmatch(tag):
            by_step = dict(points)
            steps = sorted(by_step)
            scalars[tag] = (np.array(steps, dtype=float), np.array([by_step[s] for s in steps], dtype=float))
    return scalars


def read_eval_curves(run_dir: str, pattern: re.Pattern = EVAL_TAG) -> dict:
    """{task: (steps, success rates)} of `eval/{task}/success_rate` (or {match groups: curve} of
    the scalar tags matching `pattern`), as read_scalars reads them."""
    curves = {}
    for tag, curve in read_scalars(run_dir, pattern).items():
        match = pattern.fullmatch(tag)
        curves[match.group(1) if len(match.groups()) == 1 else match.groups()] = curve
    return curves


def to_stage_coordinates(steps, stage_lengths) -> np.ndarray:
    """Global steps -> stage index + fraction of the stage done (stage k ends at x = k).
    A step on a boundary maps to that boundary; steps past the last stage extrapolate it."""
    steps = np.asarray(steps, dtype=float)
    ends = np.cumsum(stage_lengths).astype(float)
    starts = ends - np.asarray(stage_lengths, dtype=float)
    stage = np.clip(np.searchsorted(ends, steps, side="left"), 0, len(ends) - 1)
    return stage + (steps - starts[stage]) / np.asarray(stage_lengths, dtype=float)[stage]


def mean_and_se(curves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seeds' curves on the union of their x values (linear interpolation, each seed only within
    the x range it covers): x, mean, standard error (0 where one seed), number of seeds."""
    grid = np.unique(np.concatenate([x for x, _ in curves]))
    values = np.full((len(curves), len(grid)), np.nan)
    for i, (x, y) in enumerate(curves):
        inside = (grid >= x[0]) & (grid <= x[-1])
        values[i, inside] = np.interp(grid[inside], x, y)
    count = (~np.isnan(values)).sum(0)
    mean = np.nanmean(values, 0)
    deviation = np.zeros_like(mean)
    several = count > 1
    deviation[several] = np.nanstd(values[:, several], 0, ddof=1)
    return grid, mean, deviation / np.sqrt(np.maximum(count, 1)), count


def _task_order(runs: list[RunFolder]) -> list[str]:
    return list(dict.fromkeys(t for run in runs for t in run.stage_tasks))


def plot_curves(run_dirs, out_path: str, align: str = "step", title: str | None = None, label=None) -> list[str]:
    """Evaluation success of every task across the stages (see the header), one figure per task
    sequence; returns [png, pdf] of each. `label`, if given, names a setting from its run args
    (default: the args that differ between the settings of the figure)."""
    if align not in ("step", "stage"):
        raise FigureError(f"--align must be step or stage, got {align!r}")
    sequences = by_sequence(find(run_dirs))
    outputs = sequence_outputs(out_path, sequences)
    return [path for sequence, runs in sequences.items()
            for path in curves_figure(runs, outputs[sequence], align, sequence, title if len(sequences) == 1 or title is None
                                      else f"{title}: {sequence}", label)]


def curves_figure(runs: list[RunFolder], out_path: str, align: str, sequence: str, title: str | None, label) -> list[str]:
    """The curves figure of the runs of one task sequence."""
    groups = group_runs(runs)
    labels = setting_labels(groups) if label is None else {k: label(g[0].args) for k, g in groups.items()}
    order = sorted(groups, key=lambda k: labels[k])
    colors = {k: COLORS[i % len(COLORS)] for i, k in enumerate(order)}
    tasks = _task_order(runs)
    curves = {run.path: read_eval_curves(run.path) for run in runs}
    if not any(curves.values()):
        raise FigureError("no eval/{task}/success_rate scalars in the TensorBoard events of " + ", ".join(r.path for r in runs))

    ncols = len(tasks) if len(tasks) <= 3 else 2 if len(tasks) == 4 else 3
    nrows = math.ceil(len(tasks) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.2 * nrows + 0.6), sharey=True, squeeze=False,
                             layout="constrained")
    for ax in axes.flat[len(tasks):]:
        ax.set_visible(False)

    # stage boundaries: first seed of each setting (step) or the integers (stage)
    reference = groups[order[0]][0]
    if align == "stage":
        stage_count = max(len(r.stage_tasks) for r in runs)
        bounds = {k: (list(range(1, stage_count)), []) for k in order}
        shading = [(s, s + 1, t) for s, t in enumerate(reference.stage_tasks)]
    else:
        bounds = {}
        for k in order:
            first = groups[k][0].inner_boundaries()
            bounds[k] = (first, sorted({b for r in groups[k][1:] for b in r.inner_boundaries()} - set(first)))
        ends = reference.boundaries()
        starts = [0] + ends
        shading = [(starts[s], ends[s], t) for s, t in enumerate(reference.stage_tasks) if s < len(ends)]
    shared = len({json.dumps(bounds[k][0]) for k in order}) == 1

    for ax, task in zip(axes.flat, tasks):
        for start, end, stage_task in shading:
            if stage_task == task:
                ax.axvspan(start, end, color="0.92", zorder=0, lw=0)
        for k in order:
            solid, extra = bounds[k]
            color = "0.45" if shared else colors[k]
            for b in solid:
                ax.axvline(b, color=color, ls="--", lw=0.9, zorder=1)
            for b in extra:
                ax.axvline(b, color=color, ls=":", lw=0.7, alpha=0.7, zorder=1)
            if shared:
                break
        for k in order:
            seeds = []
            for run in groups[k]:
                if task in curves[run.path]:
                    x, y = curves[run.path][task]
                    seeds.append((to_stage_coordinates(x, run.stage_lengths()) if align == "stage" else x, y))
            if not seeds:
                continue
            x, mean, se, _ = mean_and_se(seeds)
            ax.plot(x, mean, color=colors[k], lw=1.6, zorder=3)
            ax.fill_between(x, mean - se, mean + se, color=colors[k], alpha=0.22, lw=0, zorder=2)
        ax.set_title(task)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3, lw=0.5)
        transform = blended_transform_factory(ax.transData, ax.transAxes)
        for s, (start, end, stage_task) in enumerate(shading):
            ax.text((start + end) / 2, 0.985, f"{s + 1}", transform=transform, ha="center", va="top", fontsize=7, color="0.35")
        if align == "stage":
            ax.set_xlim(0, max(len(r.stage_tasks) for r in runs))
            ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))  # many stages: no overlapping labels
            ax.set_xlabel("stage (fraction of each seed's own stage length)")
        else:
            ax.set_xlim(left=0)
            ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
            ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 3))
            ax.set_xlabel("environment steps")
    for row in axes:
        row[0].set_ylabel("success rate (eval)")

    handles = [Line2D([], [], color=colors[k], lw=2, label=legend_label(labels[k], groups[k])) for k in order]
    handles += [Patch(color="0.92", label="stage trains this task"),
                Line2D([], [], color="0.45", ls="--", lw=0.9, label="stage boundary"
                       + (" (first seed)" if align == "step" and any(len(g) > 1 for g in groups.values()) else ""))]
    if align == "step" and any(bounds[k][1] for k in order):
        handles.append(Line2D([], [], color="0.45", ls=":", lw=0.7, label="other seeds' boundaries"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), max(ncols, 2)), frameon=False, fontsize=8)
    fig.suptitle(title or f"{sequence}: evaluation success (mean ± s.e. over seeds)", fontsize=10)
    return save(fig, out_path)


def plot_plasticity(run_dirs, out_path: str, title: str | None = None) -> list[str]:
    """The plasticity diagnostics logged at every evaluation (`plasticity/{network}/{metric}`): one
    row per diagnostic, one column per network, a line per setting (mean ± s.e. over seeds); one
    figure per task sequence, returns [png, pdf] of each."""
    sequences = by_sequence(find(run_dirs))
    outputs = sequence_outputs(out_path, sequences)
    return [path for sequence, runs in sequences.items()
            for path in plasticity_figure(runs, outputs[sequence], sequence, title if len(sequences) == 1 or title is None
                                          else f"{title}: {sequence}")]


def plasticity_figure(runs: list[RunFolder], out_path: str, sequence: str, title: str | None) -> list[str]:
    """The plasticity figure of the runs of one task sequence."""
    groups = group_runs(runs)
    labels = setting_labels(groups)
    order = sorted(groups, key=lambda k: labels[k])
    colors = {k: COLORS[i % len(COLORS)] for i, k in enumerate(order)}
    curves = {run.path: read_eval_curves(run.path, PLASTICITY_TAG) for run in runs}
    if not any(curves.values()):
        raise FigureError("no plasticity/{network}/{metric} scalars in the TensorBoard events of "
                          + ", ".join(r.path for r in runs) + " (runs from before the diagnostics existed)")
    networks = NETWORKS
    fig, axes = plt.subplots(len(PLASTICITY_NAMES), len(networks), figsize=(4.4 * len(networks), 2.6 * len(PLASTICITY_NAMES) + 0.6),
                             squeeze=False, layout="constrained", sharex=True)
    for row, metric in enumerate(PLASTICITY_NAMES):
        for col, network in enumerate(networks):
            ax = axes[row][col]
            for k in order:
                seeds = [curves[run.path][(network, metric)] for run in groups[k] if (network, metric) in curves[run.path]]
                if seeds:
                    x, mean, se, _ = mean_and_se(seeds)
                    ax.plot(x, mean, color=colors[k], lw=1.6)
                    ax.fill_between(x, mean - se, mean + se, color=colors[k], alpha=0.22, lw=0)
            for boundary in groups[order[0]][0].inner_boundaries():
                ax.axvline(boundary, color="0.45", ls="--", lw=0.9)
            ax.set_title(f"{network}: {PLASTICITY_NAMES[metric]}", fontsize=9)
            ax.grid(alpha=0.3, lw=0.5)
            ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
            ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 3))
    for ax in axes[-1]:
        ax.set_xlabel("environment steps")
    handles = [Line2D([], [], color=colors[k], lw=2, label=legend_label(labels[k], groups[k])) for k in order]
    handles.append(Line2D([], [], color="0.45", ls="--", lw=0.9, label="stage boundary (first seed)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), len(networks)), frameon=False, fontsize=8)
    fig.suptitle(title or f"{sequence}: plasticity diagnostics at every evaluation (mean ± s.e. over seeds)", fontsize=10)
    return save(fig, out_path)


# ------------------------------------------------------------------------------------------
# Proportion of skill neurons (paper Fig. 4)
# ------------------------------------------------------------------------------------------
def plot_skill_ratio(run_dirs, out_path: str, metric: str = "ASR", title: str | None = None) -> list[str]:
    """`metric` of metrics.json against --skill-ratio, mean +- s.e. over seeds; returns [png, pdf]."""
    if metric not in ("ASR", "FM", "FWT"):
        raise FigureError(f"--metric must be ASR, FM or FWT, got {metric!r}")
    runs = []
    for run in find(run_dirs):
        if not run.complete or run.metrics.get(metric) is None:
            print(f"note: {run.path} left out (unfinished, or no {metric})", file=sys.stderr)
        else:
            runs.append(run)
    if not runs:
        raise FigureError(f"no finished runs with {metric} in metrics.json among the runs given")
    groups = group_runs(runs, ignore=("skill_ratio",))
    labels = setting_labels(groups)
    if len(groups) == 1:
        labels = {k: "NBSP" if json.loads(k).get("method", "nbsp") == "nbsp" else labels[k] for k in groups}
    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    ratios = sorted({r.args["skill_ratio"] for r in runs if r.args.get("method", "nbsp") == "nbsp"})
    for i, key in enumerate(sorted(groups, key=lambda k: labels[k])):
        color = COLORS[i % len(COLORS)]
        by_ratio = defaultdict(list)
        for run in groups[key]:
            by_ratio[run.args["skill_ratio"]].append(run.metrics[metric])
        if json.loads(key).get("method", "nbsp") != "nbsp":  # no skill neurons: a reference level
            values = [v for vs in by_ratio.values() for v in vs]
            mean, se = np.mean(values), np.std(values, ddof=1) / np.sqrt(len(values)) if len(values) > 1 else 0.0
            ax.axhline(mean, color=color, ls="--", lw=1.2, label=f"{labels[key]} (n={len(values)})")
            ax.axhspan(mean - se, mean + se, color=color, alpha=0.15, lw=0)
            continue
        xs = sorted(by_ratio)
        means = [np.mean(by_ratio[x]) for x in xs]
        ses = [np.std(by_ratio[x], ddof=1) / np.sqrt(len(by_ratio[x])) if len(by_ratio[x]) > 1 else 0.0 for x in xs]
        seeds = sorted({len(by_ratio[x]) for x in xs})
        ax.errorbar(xs, means, yerr=ses, color=color, marker="o", ms=4, capsize=3, lw=1.4,
                    label=f"{labels[key]} (n={'-'.join(map(str, seeds))} per point)")
    ax.set_xlabel("proportion of RL skill neurons (--skill-ratio)")
    ax.set_ylabel(metric)
    if ratios:
        ax.set_xticks(ratios)
        ax.set_xticklabels([f"{r:g}" for r in ratios], rotation=45 if len(ratios) > 6 else 0)
    ax.grid(alpha=0.3, lw=0.5)
    ax.legend(fontsize=8, frameon=False)
    ax.set_title(title or f"{metric} vs proportion of skill neurons (mean ± s.e.)", fontsize=10)
    fig.tight_layout()
    return save(fig, out_path)


# ------------------------------------------------------------------------------------------
# Activation histogram of one neuron by episode success (paper Fig. 1)
# ------------------------------------------------------------------------------------------
def candidate_stages(run_dir: str) -> list[int]:
    """The finished stages (with a checkpoint) in the order the histogram tries them: first those
    whose identification window held successful and failed episodes (metrics.json
    `stages[].identify_success_share` strictly between 0 and 1), then the others."""
    import neuron_analysis as na

    saved = na.finished_stages(run_dir)
    if not saved:
        raise FigureError(f"{run_dir!r} has no stage checkpoint yet (checkpoints/stage_<i>.pt)")
    stages = (RunFolder.read(run_dir).metrics or {}).get("stages", [])
    share = {record.get("stage"): record.get("identify_success_share") for record in stages}
    return sorted(saved, key=lambda stage: not (share.get(stage) is not None and 0 < share[stage] < 1))


def activations_with_both_outcomes(run_dir: str, **options) -> dict:
    """neuron_activations of the first candidate stage whose episodes hold a success and a failure,
    or FigureError listing what every stage's episodes gave."""
    outcomes = []
    for stage in candidate_stages(run_dir):
        data = neuron_activations(run_dir, stage, **options)
        won = int(data["episode_success"].sum())
        if 0 < won < len(data["episode_success"]):
            return data
        outcomes.append(f"stage {stage}: {won}/{len(data['episode_success'])}")
    raise FigureError(f"no stage of {run_dir!r} gave both successful and failed episodes (successes: {', '.join(outcomes)}); "
                      "give --stage, or more --episodes")


def neuron_activations(run_dir: str, stage: int = 1, network: str = "actor", neuron: int | None = None,
                       task: str | None = None, episodes: int | None = None, seed: int | None = None,
                       device: str = "cpu") -> dict:
    """Per-step activations of one neuron over `episodes` episodes of the stochastic policy of a
    stage checkpoint on `task` (default: the stage's task), with each step's episode success.

    The episodes are post-stage rollouts, as `--identify-window rollout` scores on
    (`rollout(..., record=True)` on the training script's evaluation pool of environments, goal
    configurations 0..episodes-1), with the stage's seed (`seed + 1000 * stage`) by default. Critics are probed at the
    executed actions, as in identification."""
    import torch

    import nbsp_sac_metaworld as mw
    import neuron_analysis as na
    import skill_neurons as sn

    try:
        config = na.read_config(run_dir)
        args = na.run_args(config)
        if not 1 <= stage <= len(config["stage_tasks"]):
            raise FigureError(f"--stage must be in 1..{len(config['stage_tasks'])}, got {stage}")
        checkpoint = na.load_stage(run_dir, stage)
    except na.AnalysisError as e:
        raise FigureError(str(e)) from e
    if network not in NETWORKS:
        raise FigureError(f"--network must be one of {', '.join(NETWORKS)}, got {network!r}")
    task = task or config["stage_tasks"][stage - 1]
    if task not in config["stage_tasks"]:
        raise FigureError(f"task {task!r} is not a task of the run; its tasks: {', '.join(dict.fromkeys(config['stage_tasks']))}")
    scores = (checkpoint.get("scores") or {}).get(network)
    if neuron is None:
        if scores is None:
            raise FigureError(f"the stage {stage} checkpoint has no {network} skill-neuron scores "
                              f"(--method {args.method}, --apply-to {args.apply_to}); pick one with --neuron")
        neuron = int(torch.argmax(scores))
    episodes = episodes or args.identify_episodes
    seed = args.seed + 1000 * stage if seed is None else seed

    envs = na.make_envs(task, args, min(episodes, max(args.eval_episodes, args.identify_episodes)))
    try:
        actor, qf = na.load_agent(args, checkpoint, envs[0], device)
    except na.AnalysisError as e:
        raise FigureError(str(e)) from e
    layers = na.network_layers(network, actor, qf)
    widths = [layer.num_neurons for layer in layers]
    if not 0 <= neuron < sum(widths):
        raise FigureError(f"--neuron must be in 0..{sum(widths) - 1} ({network}'s hidden neurons, layers concatenated)")
    torch.manual_seed(seed)
    window = mw.rollout(envs, episodes, lambda obs: actor.get_action(obs)[0], seed, torch.device(device), record=True)
    for env in envs:
        env.close()
    obs = torch.as_tensor(window["obs"], device=device)
    actions = torch.as_tensor(window["actions"], device=device)
    with sn.ActivationRecorder(layers) as recorder, torch.no_grad():
        for chunk in range(0, len(obs), 8192):
            if network == "actor":
                actor(obs[chunk : chunk + 8192])
            else:
                qf(obs[chunk : chunk + 8192], actions[chunk : chunk + 8192])
    activations = torch.cat([a.cpu() for a in recorder.activations()], 1)
    step_success = window["success"][window["episode"]]  # each step: the success of its episode
    goal = torch.as_tensor(step_success)
    layer = int(np.searchsorted(np.cumsum(widths), neuron, side="right"))
    return {"run_dir": run_dir, "stage": stage, "stage_task": config["stage_tasks"][stage - 1], "task": task,
            "network": network, "neuron": neuron, "layer": layer, "unit": neuron - int(sum(widths[:layer])),
            "activation": activations[:, neuron].numpy(), "success": step_success > 0.5,
            "episode_success": window["success"], "seed": seed,
            "score": None if scores is None else float(scores[neuron]),
            "selected": None if network not in (checkpoint.get("selected") or {}) else bool(checkpoint["selected"][network][neuron]),
            "window_score": None if sn.goal_is_constant(goal)
            else float(sn.goal_scores(activations[:, neuron : neuron + 1], goal, args.goal_score)[0])}


def plot_histogram(run_dir: str, out_path: str, stage: int | None = None, network: str = "actor", neuron: int | None = None,
                   task: str | None = None, episodes: int | None = None, seed: int | None = None, bins: int = 30,
                   device: str = "cpu") -> list[str]:
    """Fig. 1: histogram of one neuron's activations, steps of successful vs failed episodes; by
    default after the first stage whose episodes hold both outcomes (activations_with_both_outcomes)."""
    options = dict(network=network, neuron=neuron, task=task, episodes=episodes, seed=seed, device=device)
    data = (activations_with_both_outcomes(run_dir, **options) if stage is None
            else neuron_activations(run_dir, stage, **options))
    activation, success = data["activation"], data["success"]
    edges = np.histogram_bin_edges(activation, bins=bins)
    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    won, lost = int(data["episode_success"].sum()), int((~data["episode_success"].astype(bool)).sum())
    for mask, label, color, count in ((success, "success", COLORS[2], won), (~success, "failure", COLORS[3], lost)):
        if mask.any():
            ax.hist(activation[mask], bins=edges, density=True, alpha=0.55, color=color, label=f"{label} ({count} episode{'s' * (count != 1)})")
        else:
            ax.plot([], [], color=color, label=f"{label} (0 episodes)")
    ax.set_xlabel(f"activation of {data['network']} neuron {data['neuron']} (layer {data['layer'] + 1}, unit {data['unit']})")
    ax.xaxis.set_major_locator(MaxNLocator(nbins=6))  # a narrow axis: few enough labels not to overlap
    ax.set_ylabel("density (per step)")
    ax.legend(fontsize=8, frameon=False)
    score = ("" if data["score"] is None else f"identification score {data['score']:.2f} on {data['stage_task']}"
             f"{' (skill neuron)' if data['selected'] else ''}; ")
    window = ("goal constant on these episodes" if data["window_score"] is None
              else f"score on these episodes {data['window_score']:.2f}")
    ax.set_title(f"{data['task']} episodes, {data['network']} after stage {data['stage']} ({data['stage_task']})\n"
                 f"{score}{window}", fontsize=8)
    ax.grid(alpha=0.3, lw=0.5)
    fig.tight_layout()
    return save(fig, out_path)


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------
DESCRIPTION = """Figures of NBSP runs, each written as PNG and PDF. A run argument is a run folder (with
config.json) or a folder of run folders. Runs are grouped by task sequence (one figure each,
titled with it; OUT-{tasks} when there are several) and, within a sequence, into settings by their
args minus the seed; a setting is labelled by the args in which the settings of its figure differ.

examples:
  python scripts/figures.py curves runs/ --out figs/curves                  # paper Fig. 3, 9-12
  python scripts/figures.py curves runs/sac_* runs/nbsp_* --align stage --out figs/curves
  python scripts/figures.py plasticity runs/ --out figs/plasticity
  python scripts/figures.py skill-ratio runs/ratio_sweep/ --out figs/skill_ratio   # paper Fig. 4
  python scripts/figures.py histogram runs/<run_name> --out figs/neuron        # paper Fig. 1"""


FIGURES = ("curves", "plasticity", "skill-ratio", "histogram")


def make_parser() -> argparse.ArgumentParser:
    parser = Parser(description=DESCRIPTION)
    sub = parser.add_subparsers(dest="figure", help="the figure to draw (each has its own --help)")

    def figure(name, help, out, title=None):
        command = sub.add_parser(name, help=help, description=help)
        if name == "histogram":
            command.add_argument("run", help="run folder (runs/<run_name>, with checkpoints/)")
        else:
            command.add_argument("runs", nargs="+", help="run folders, or folders of run folders")
        output = command.add_argument_group("output")
        output.add_argument("--out", default=out, help="output path; .png and .pdf are written (an extension given is dropped)")
        if title:
            output.add_argument("--title", default=None, help=title)
        return command

    per_sequence = "figure title, after which the task sequence comes when there are several (default: the sequence and what is drawn)"
    curves = figure("curves", "evaluation success of every task across the stages (paper Fig. 3, 9-12)", "figs/curves", per_sequence)
    curves.add_argument("--align", choices=("step", "stage"), default="step",
                        help="x axis: the global env step, or stage index + fraction of each seed's own stage "
                             "(aligns seeds whose stages stopped early)")
    figure("plasticity", "dormant neurons, feature rank and weight magnitude across training", "figs/plasticity", per_sequence)
    ratio = figure("skill-ratio", "a metric against the proportion of skill neurons (paper Fig. 4)", "figs/skill_ratio",
                   "figure title (default: the metric against the proportion of skill neurons)")
    ratio.add_argument("--metric", choices=("ASR", "FM", "FWT"), default="ASR", help="metric of metrics.json on the y axis")
    hist = figure("histogram", "activations of one neuron, steps of successful vs failed episodes (paper Fig. 1)",
                  "figs/neuron_histogram")
    which = hist.add_argument_group("which neuron, after which stage")
    which.add_argument("--stage", type=int, default=None,
                       help="stage checkpoint (default: the first stage whose episodes hold a success and a "
                            "failure, those whose identification window did tried first)")
    which.add_argument("--network", choices=NETWORKS, default="actor", help="network of the neuron")
    which.add_argument("--neuron", type=int, default=None,
                       help="index over the network's hidden neurons, layers concatenated (default: the top score)")
    episodes = hist.add_argument_group("episodes")
    episodes.add_argument("--task", default=None, help="task to run (default: the stage's task)")
    episodes.add_argument("--episodes", type=int, default=None, help="episodes (default: the run's --identify-episodes)")
    episodes.add_argument("--seed", type=int, default=None, help="rollout seed (default: the stage's identification seed)")
    episodes.add_argument("--device", default="cpu", help="torch device of the networks: cpu, cuda or cuda:N")
    hist.add_argument("--bins", type=int, default=30, help="histogram bins")
    return parser


def check_options(options) -> None:
    """Bad values of the command line, before anything is read or written."""
    check_output("--out", out_paths(options.out)[0])
    if options.figure != "histogram":
        return
    for flag, value in (("--stage", options.stage), ("--episodes", options.episodes), ("--bins", options.bins)):
        if value is not None and value <= 0:
            raise FigureError(f"{flag} must be a positive integer, got {value}")
    if options.neuron is not None and options.neuron < 0:
        raise FigureError(f"--neuron must be >= 0, got {options.neuron}")
    check_device("--device", options.device)


def main(argv=None) -> list[str]:
    parser = make_parser()
    options = parser.parse_args(argv)
    if options.figure is None:
        parser.error(f"give the figure to draw: {', '.join(FIGURES)} (then its run folders; --help for each)")
    try:
        check_options(options)
        if options.figure == "curves":
            paths = plot_curves(options.runs, options.out, options.align, options.title)
        elif options.figure == "plasticity":
            paths = plot_plasticity(options.runs, options.out, options.title)
        elif options.figure == "skill-ratio":
            paths = plot_skill_ratio(options.runs, options.out, options.metric, options.title)
        else:
            paths = plot_histogram(options.run.rstrip("/"), options.out, options.stage, options.network, options.neuron,
                                   options.task, options.episodes, options.seed, options.bins, options.device)
    except (FigureError, RunFolderError, UsageError) as e:
        parser.exit(2, f"error: {e}\n")
    print("\n".join(paths))
    return paths


if __name__ == "__main__":
    main()
