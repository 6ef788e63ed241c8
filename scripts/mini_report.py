"""Writes docs/results-{preset}.md from the runs of `python scripts/sweep.py --preset {preset}` (and
the pilot runs that chose its task pair: single-task runs, or vanilla SAC on candidate pairs): the
Table 2 layout, the IQM table, every run's success matrix, identification and plasticity
diagnostics, the curves, the exact commands, the machine and the wall time. Nothing in the
document is typed by hand except the free text passed with --notes.

examples:
  python scripts/mini_report.py --runs runs/mini --pilot runs/mini-pilot --sweep-log sweep.out --notes notes.md
  python scripts/mini_report.py --preset regime --runs runs/regime --pilot runs/regime-pilot --notes notes.md
"""

import argparse
import os
import json
import platform
import shlex
import sys

import numpy as np

import figures
import paper_tables
import cli
from cli import UsageError, check_output
from run_folders import RunFolderError, complete_runs, find
from sweep import PRESETS

# per preset: the document's title, the preset of its pilot runs, and the success that counts as learned there
REPORTS = {
    "mini": dict(title="Laptop-scale benchmark: does SAC forget, and does NBSP keep what it learned?",
                 pilot="mini-pilot", threshold=0.8, bar="The pair had to be learned within the stage budget by SAC alone.",
                 comparisons=[("nbsp", "sac"), ("nbsp", "only-replay"), ("nbsp", "identify-random")]),
    "regime": dict(title="In the paper's regime (SAC learns each task and forgets it): what do NBSP and its parts keep?",
                   pilot="regime-pilot", threshold=0.9,
                   bar="The pair had to be like the paper's vanilla SAC: each task learned (evaluation success at least "
                       "0.9) within its stage in at least 4 of 5 seeds, FWT at least 0.9 and FM at least 0.5.",
                   # NBSP against no protection and against Dpre alone; Table 2's parts: the mask alone against no
                   # protection, Eq. 7's soft mask against a freeze, the freeze against Dpre alone; the balanced
                   # score's masks (on live units) against Dpre alone and the paper's score; goal-oriented selection
                   # against other rules, both balanced
                   comparisons=[("nbsp", "sac"), ("nbsp", "only-replay"), ("only-mask", "sac"), ("nbsp", "hard-mask"),
                                ("hard-mask", "only-replay"), ("goal-balanced", "only-replay"),
                                ("goal-balanced", "nbsp"), ("goal-balanced", "identify-random-balanced"),
                                ("goal-balanced", "identify-activation-balanced")]),
}


def steps_to(curve, threshold: float):
    """First evaluation step whose success reaches `threshold`, or None."""
    steps, values = curve
    hits = np.nonzero(np.asarray(values) >= threshold - 1e-6)[0]  # TensorBoard's float32: 0.9 reads 0.8999999762
    return int(steps[hits[0]]) if len(hits) else None


def pilot_section(pilot_dirs: list[str], pilot_preset: str, threshold: float, out_dir: str, stem: str) -> tuple[list[str], list[str]]:
    """The pilot's table and figures: single-task runs, or vanilla SAC on candidate pairs, as its preset runs."""
    runs = find(pilot_dirs)
    if any("," in sequence for sequence in PRESETS[pilot_preset]["sequences"]):
        complete = [run for run in runs if run.metrics and run.metrics.get("complete")]
        lines, figure_paths = pair_pilot(complete, threshold, out_dir, stem)
        unfinished = len(runs) - len(complete)
        return lines + ([f"({unfinished} unfinished pilot run(s) left out.)"] if unfinished else []), figure_paths
    return single_task_pilot(runs, threshold, out_dir, stem)


def single_task_pilot(runs, threshold: float, out_dir: str, stem: str) -> tuple[list[str], list[str]]:
    """Single-task learning curves: the steps each candidate task needed to reach `threshold`."""
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
    figure = figures.plot_curves([r.path for r in runs], os.path.join(out_dir, f"{stem}-pilot"),
                                 title="single-task SAC (pilot)") if runs else []
    return lines, figure[:1]


def fmt_curve(steps, values) -> str:
    return ", ".join(f"{s / 1000:g}k: {v:.2f}" for s, v in zip(steps, values))


def pair_pilot(runs, threshold: float, out_dir: str, stem: str) -> tuple[list[str], list[str]]:
    """Vanilla SAC on candidate pairs A -> B: per pair, how many seeds reached `threshold` on A
    within stage 1 and on B within stage 2 (steps counted from the stage's start), A's success after
    each stage and the run's FM and FWT; then every run's evaluation curve of each task and a figure
    per pair."""
    flags = runs[0].args
    lines = [f"Each pilot run: vanilla SAC, A -> B once, hidden {' '.join(map(str, flags['hidden']))}, batch "
             f"{flags['batch_size']}, at most {flags['steps_per_task']:,} steps per stage (a stage ends early at "
             "the training success in the early stop column; 0: never), evaluation every "
             f"{flags['eval_every']:,} steps ({flags['eval_episodes']} episodes). Learned: evaluation success at "
             f"least {threshold} within the task's own stage; forgetting: A's success after A minus after B.", "",
             f"| pair A -> B | early stop | seeds | A learned in stage 1 | B learned in stage 2 | A after A | A after B | "
             "FM | FWT |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    pairs, rows, figure_paths = {}, [], []
    for run in sorted(runs, key=lambda r: (r.args["tasks"], -r.args["early_stop_success"], r.args["seed"])):
        pairs.setdefault((*run.args["tasks"], run.args["early_stop_success"]), []).append(run)
    stops = {}  # pair -> its early-stop values: a figure per value where a pair has several
    for a, b, stop in pairs:
        stops.setdefault((a, b), []).append(stop)
    for (a, b, stop), group in pairs.items():
        learned, after = [], []
        for run in group:
            curves, stages = figures.read_eval_curves(run.path), run.metrics["stages"]
            ends = np.cumsum([stage["env_steps"] for stage in stages])
            reached = []
            for k, task in enumerate((a, b)):  # task k is trained in stage k
                steps, values = curves.get(task, (np.array([]), np.array([])))
                start = ends[k - 1] if k else 0
                inside = (steps > start) & (steps <= ends[k]) if k < len(ends) else np.zeros(len(steps), bool)
                first = steps_to((steps[inside] - start, values[inside]), threshold)
                reached.append(f"{first:,}" if first is not None else "no")
            sr = run.metrics["sr"]
            learned.append([r != "no" for r in reached])
            after.append((sr[0][0], sr[1][0] if len(sr) > 1 else None, run.metrics.get("FM"), run.metrics.get("FWT")))
            rows.append(f"| {a} -> {b} | {stop:g} | {run.args['seed']} | {reached[0]} | {reached[1]} | "
                        f"{fmt_curve(*curves.get(a, ([], [])))} | {fmt_curve(*curves.get(b, ([], [])))} |")
        means = [np.mean([x[i] for x in after if x[i] is not None]) if any(x[i] is not None for x in after) else None
                 for i in range(4)]
        lines.append(f"| {a} -> {b} | {stop:g} | {len(group)} | {sum(l[0] for l in learned)} of {len(group)} | "
                     f"{sum(l[1] for l in learned)} of {len(group)} | "
                     + " | ".join("n/a" if m is None else f"{m:.2f}" for m in means) + " |")
        several = len(stops[a, b]) > 1
        figure_paths += figures.plot_curves(
            [r.path for r in group], os.path.join(out_dir, f"{stem}-pilot-{a}-{b}" + (f"-early-stop-{stop:g}" if several else "")),
            title=f"vanilla SAC: {a} -> {b} (pilot{f', early stop {stop:g}' if several else ''})")[:1]
    lines += ["", "Every pilot run (steps from the stage's start at which evaluation first reached "
              f"{threshold}; the evaluation curves, global step: success):", "",
              "| pair A -> B | early stop | seed | A reached | B reached | A's curve | B's curve |",
              "|---|---:|---:|---:|---:|---|---|"]
    return lines + rows, figure_paths


def per_run_table(runs) -> list[str]:
    lines = ["| run | sr (rows = after each stage) | ASR | FM | FWT | held during stages 2, 3, ... | stage steps |",
             "|---|---|---:|---:|---:|---|---|"]
    for run in sorted(runs, key=lambda r: (r.args["exp_name"], r.args["seed"])):
        m = run.metrics
        sr = "; ".join(" ".join(f"{v:.2f}" for v in row if v is not None) for row in m["sr"])
        held = " ".join("n/a" if value is None else f"{value:.2f}" for value in held_through_stages(run))
        steps = " ".join(str(s["env_steps"]) + ("*" if s["early_stopped"] else "") for s in m["stages"])
        lines.append(f"| {run.args['exp_name']} seed {run.args['seed']} | {sr} | {m['ASR']:.3f} | "
                     f"{m['FM']:.3f} | {m['FWT']:.3f} | {held or 'n/a'} | {steps} |")
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


def mean_se(values, digits: int = 2) -> str:
    """Mean ± standard error (paper_tables.mean_and_se); the mean alone for one value."""
    mean, se = paper_tables.mean_and_se(values)
    return f"{mean:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")


def protection_table(runs, label) -> list[str]:
    """Per setting, how strongly its selection protected, apart from which units it chose, over the
    selections whose masks acted (every stage's but the last, which no stage follows) and every
    network: the share of the selected skill neurons dead over the window (a dead unit gets no
    gradient: a mask on it protects nothing) and the mean mask over the live ones (the stages' masks
    combined, as the optimizer applies them: 1 leaves a unit free, 0 freezes it); each per run, then
    mean ± standard error over runs. A run whose acting selections were all dead has no live mean:
    the cell says over how many runs the mean is; runs older than the statistic make it n/a."""
    lines = ["| setting | runs | selected units | dead share | mean mask on the live selected units |",
             "|---|---:|---:|---:|---:|"]
    for name, group in by_setting(runs, label):
        selected_total, dead_shares, live_masks, lacks_statistic = 0, [], [], False
        for run in group:
            applied = run.metrics["stages"][:len(run.metrics["stage_tasks"]) - 1]
            records = [(stage["skill_neurons"][net], sel) for stage in applied if "selection" in stage
                       for net, sel in stage["selection"].items()]
            if not records:
                continue
            selected = sum(n for n, _ in records)
            selected_total += selected
            dead_shares.append(sum(sel["selected_dead"] for _, sel in records) / selected)
            live = [(n - sel["selected_dead"], sel.get("selected_live_mask_mean")) for n, sel in records if n > sel["selected_dead"]]
            if any(mean is None for _, mean in live):  # older runs lack the statistic
                lacks_statistic = True
            elif live:
                live_masks.append(sum(count * mean for count, mean in live) / sum(count for count, _ in live))
        if not dead_shares:
            continue
        if lacks_statistic:
            mask = "n/a"
        elif not live_masks:
            mask = "no live pick"
        elif len(live_masks) < len(dead_shares):
            mask = f"{mean_se(live_masks, 3)} (over {len(live_masks)} runs; the others' acting picks were all dead)"
        else:
            mask = mean_se(live_masks, 3)
        lines.append(f"| {name} | {len(dead_shares)} | {selected_total} | {mean_se(dead_shares)} | {mask} |")
    return lines


DIFFERENCE_REPS = 10_000  # bootstrap resamples of each difference between settings


def difference_table(runs, comparisons, metrics, reps: int = DIFFERENCE_REPS, seed: int = 0) -> list[str]:
    """For each pair of settings (A, B) that both ran: A's mean minus B's of each metric, with a 95%
    percentile-bootstrap interval (each setting's runs resampled on their own, `reps` times, the
    same seed for every cell); an interval that holds 0 means these runs do not tell A from B."""
    by_name, labels = {}, {}
    for run in runs:
        by_name.setdefault(run.args["exp_name"], []).append(run.metrics)
        labels[run.args["exp_name"]] = paper_tables.setting_label(run.args)
    lines = ["| A − B | runs of A / B | " + " | ".join(f"{m} difference [95% CI]" for m in metrics) + " |",
             "|---|---:|" + "---:|" * len(metrics)]
    for a, b in comparisons:
        if a not in by_name or b not in by_name:
            continue
        cells = []
        for metric in metrics:
            x, y = (np.array([m[metric] for m in by_name[name] if m.get(metric) is not None]) for name in (a, b))
            cell = f"{x.mean() - y.mean():+.2f}"
            if min(len(x), len(y)) >= paper_tables.MIN_BOOTSTRAP_RUNS:
                rng = np.random.default_rng(seed)
                resampled = (x[rng.integers(0, len(x), (reps, len(x)))].mean(1)
                             - y[rng.integers(0, len(y), (reps, len(y)))].mean(1))
                low, high = np.percentile(resampled, [2.5, 97.5])
                cell += f" [{low:+.2f}, {high:+.2f}]"
            cells.append(cell)
        lines.append(f"| {labels[a]} − {labels[b]} | {len(by_name[a])} / {len(by_name[b])} | " + " | ".join(cells) + " |")
    return lines if len(lines) > 2 else []


def held_through_stages(run) -> list[float | None]:
    """For each stage from the second on, the success of the tasks the stage does not train,
    averaged over the stage's evaluations (steps after its start up to its end) and those tasks
    (None for a sequence of one task, which has none untrained): how much of the other tasks the run
    held through the whole stage, which one end-of-stage evaluation (the success matrix) samples
    from curves that can swing widely."""
    curves = figures.read_eval_curves(run.path)
    ends = np.cumsum([stage["env_steps"] for stage in run.metrics["stages"]])
    held = []
    for k in range(1, len(ends)):
        means = [values[(steps > ends[k - 1]) & (steps <= ends[k])].mean()
                 for task, (steps, values) in curves.items() if task != run.metrics["stage_tasks"][k]]
        held.append(float(np.mean(means)) if means else None)
    return held


def retention_table(runs, label) -> list[str]:
    """Per setting and stage from the second on, what its runs held of the tasks the stage does not
    train (held_through_stages), mean ± standard error over runs."""
    stages = max(len(run.metrics["stages"]) for run in runs)
    stage_tasks = runs[0].metrics["stage_tasks"]
    lines = ["| setting | runs | " + " | ".join(f"during stage {k + 1} ({stage_tasks[k]})" for k in range(1, stages)) + " |",
             "|---|---:|" + "---:|" * (stages - 1)]
    for name, group in by_setting(runs, label):
        held = [held_through_stages(run) for run in group]
        cells = []
        for k in range(stages - 1):
            values = [run_held[k] for run_held in held if len(run_held) > k and run_held[k] is not None]
            cells.append(mean_se(values) if values else "n/a")
        lines.append(f"| {name} | {len(group)} | " + " | ".join(cells) + " |")
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
    extra_counted = counted_runs(more_dir)
    return ["## More seeds for some settings", "", "```bash", command or f"(runs in {more_dir})", "```", "",
            f"The same pair and flags as the grid; each of these settings pooled over the grid's runs and these "
            f"(seeds {', '.join(map(str, seeds))}):", "",
            paper_tables.settings_table(pooled, "markdown", title=None), "",
            paper_tables.iqm_table(pooled, "markdown"), "",
            f"The further runs (training wall time summed over them: {wall_time(extra_counted) / 60:.1f} min):", ""] \
        + per_run_table(extra_counted) + [""]


def grid_status(folder_runs, preset_settings: list[str], seeds: list[int] | None = None) -> list[str]:
    """For a folder that does not hold the whole grid (a setting of the preset without a complete
    run, settings with unequal seeds, a seed of `seeds` missing, or an unfinished run): which seeds
    of each setting are complete and how far the unfinished runs are; nothing for a finished grid."""
    complete, unfinished = {}, []
    for run in folder_runs:
        if run.complete:
            complete.setdefault(run.args["exp_name"], []).append(run.args["seed"])
        else:
            done = len((run.metrics or {}).get("stages") or [])
            unfinished.append(f"{run.args['exp_name']} seed {run.args['seed']} ({done} of {len(run.stage_tasks)} stages done)")
    missing = [name for name in preset_settings if name not in complete]
    expected = set(seeds or [])
    seeds_lacking = any(expected - set(complete.get(name, [])) for name in preset_settings)
    if not (missing or unfinished or seeds_lacking or len({len(done) for done in complete.values()}) > 1):
        return []
    counts = "; ".join(f"{name}: {', '.join(map(str, sorted(done)))}" for name, done in
                       sorted(complete.items(), key=lambda item: (preset_settings + sorted(complete)).index(item[0])))
    if expected:
        in_grid = sum(len(expected & set(complete.get(name, []))) for name in preset_settings)
        size = (f"{in_grid} of its {len(preset_settings) * len(expected)} runs complete ({len(preset_settings)} "
                f"settings x seeds {', '.join(map(str, sorted(expected)))})")
    else:
        size = f"{sum(map(len, complete.values()))} complete runs"
    return [f"**Not the whole grid.** {size}, the seeds of each setting: {counts}. "
            + (f"No complete run yet: {', '.join(missing)}. " if missing else "")
            + (f"Unfinished in the folder: {'; '.join(sorted(unfinished))}. " if unfinished else "")
            + "Every table and figure below counts the complete runs only.", ""]


def stage_one_agreement(runs) -> list[str]:
    """Whether stage 1 was the same computation in every setting of a seed (the ablations' masks
    and Dpre act from stage 2 on): its length, the success of every task after it and the
    plasticity diagnostics at its end (each network's weight magnitude, dormant share and feature
    rank, measured before identification), compared value for value between the settings of each
    seed. Equal weight magnitudes to the last digit mean equal networks in practice."""
    by_seed = {}
    for run in runs:
        by_seed.setdefault(run.args["seed"], []).append(run)
    equal, differ = [], []
    for seed, group in sorted(by_seed.items()):
        if len(group) < 2:
            continue
        signatures = {}
        for run in group:
            first = run.metrics["stages"][0]
            signature = json.dumps([first["env_steps"], run.metrics["sr"][:1], first["plasticity"]], sort_keys=True)
            signatures.setdefault(signature, []).append(run.args["exp_name"])
        if len(signatures) == 1:
            equal.append(str(seed))
        else:
            differ.append(f"seed {seed} ({' | '.join(', '.join(sorted(names)) for names in signatures.values())})")
    if not (equal or differ):
        return []
    return ["Stage 1 comes before any setting's masks or Dpre act. Its length, the success after it and the "
            "plasticity diagnostics at its end (every network's weight magnitude, dormant share and feature rank) "
            "compared between the settings of each seed: "
            + (f"the same in every setting for seed{'s' if len(equal) > 1 else ''} {', '.join(equal)}" if equal else "")
            + ("; " if equal and differ else "")
            + (f"different for {'; '.join(differ)} (groups of equal settings)" if differ else "") + ".", ""]


def counted_runs(folder: str):
    """The complete runs in `folder` that the tables count: of one config and seed run twice, the
    later only (paper_tables.load_runs)."""
    counted = {os.path.realpath(run.path) for run in paper_tables.load_runs([folder]) if run.ok}
    return [run for run in complete_runs([folder]) if os.path.realpath(run.path) in counted]


def describe_machine(record: dict) -> str:
    gpu = record["gpu"] or "no GPU"
    capability = f" ({record['cpu_capability']})" if record.get("cpu_capability") else ""  # recorded since 2026-12-07
    return f"{record['cpu']}{capability}, {record['cores']} cores, {record['threads']} torch thread(s), {gpu}"


def machine_lines(runs) -> list[str]:
    """What ran the runs, from their config.json: each machine (at the start and at every resume)
    and each set of package versions, with the number of runs that used it."""
    machines, versions, unrecorded = {}, {}, 0
    for run in runs:
        records = [run.config.get("machine"), *(resume.get("machine") for resume in run.config.get("resumes", []))]
        for text in {describe_machine(record) for record in records if record}:
            machines[text] = machines.get(text, 0) + 1
        unrecorded += not any(records)
        text = ", ".join(f"{name} {v}" for name, v in run.config.get("versions", {}).items()) or "not recorded"
        versions[text] = versions.get(text, 0) + 1
    lines = [f"- Machine: {text} ({count} run{'s' if count > 1 else ''})" for text, count in sorted(machines.items())]
    if unrecorded:
        lines.append(f"- Machine of {unrecorded} run(s): not recorded (their scripts predate config.json's "
                     f"`machine`, added on 2026-12-06); this report was written on {platform.machine()}, "
                     f"{os.cpu_count()} cores, Python {platform.python_version()}.")
    return lines + [f"- Versions: {text} ({count} run{'s' if count > 1 else ''})" for text, count in sorted(versions.items())]


def wall_time(runs) -> float:
    return sum(stage["wall_seconds"] for run in runs for stage in run.metrics["stages"])


class ReportError(Exception):
    """Bad input: reported in one line."""


class Parser(cli.Parser):
    def error(self, message):  # one line, like the other scripts, instead of usage + error
        raise ReportError(message)


def input_problem(args) -> str | None:
    """What is wrong with the command line before anything is read, or None."""
    for flag, path in (("--runs", args.runs), *(("--pilot", path) for path in args.pilot or []), ("--sweep-log", args.sweep_log),
                       ("--notes", args.notes), ("--supplement", args.supplement), ("--more-seeds", args.more_seeds)):
        if path is not None and not os.path.exists(path):
            return f"{flag} {path!r} does not exist"
        if path is not None and flag not in ("--sweep-log", "--notes") and not os.path.isdir(path):
            return f"{flag} {path!r} is a file; give the folder of the runs"
    for command, folder in (("runs_command", "runs"), ("pilot_command", "pilot"), ("supplement_command", "supplement"),
                            ("more_seeds_command", "more_seeds")):
        if getattr(args, command) is not None and getattr(args, folder) is None:
            return f"--{command.replace('_', '-')} describes the runs of --{folder.replace('_', '-')}, which is not given"
    if args.pilot_only and (args.pilot is None or args.runs or args.seeds or args.supplement or args.more_seeds):
        return "--pilot-only reports the --pilot runs alone: give --pilot, and no --runs, --seeds, --supplement or --more-seeds"
    if not 0 < args.threshold <= 1:
        return f"--threshold must be in (0, 1], got {args.threshold}"
    return None


def main(argv=None) -> int:
    try:
        args = make_parser().parse_args(argv)
        report = REPORTS[args.preset]
        if not args.pilot_only:
            args.runs = args.runs or f"runs/{args.preset}"
        args.out = args.out or f"docs/results-{args.preset}.md"
        args.title = args.title or report["title"]
        args.threshold = report["threshold"] if args.threshold is None else args.threshold
        problem = input_problem(args)
        if problem:
            raise ReportError(problem)
        check_output("--out", args.out)
        for folders in (args.pilot, [args.supplement], [args.more_seeds]):  # read before a file is written, as --runs is
            if folders and None not in folders:
                find(folders)
        return write_report(args, argv)
    except (ReportError, paper_tables.TablesError, figures.FigureError, RunFolderError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def make_parser() -> argparse.ArgumentParser:
    parser = Parser(description=__doc__)
    runs = parser.add_argument_group("runs")
    runs.add_argument("--preset", default="mini", choices=sorted(REPORTS), help="the sweep preset the runs come from")
    runs.add_argument("--runs", default=None, help="folder of the preset's runs (default: runs/PRESET)")
    runs.add_argument("--runs-command", default=None,
                      help="the command that made the --runs runs (default: python scripts/sweep.py --preset PRESET --jobs 2)")
    runs.add_argument("--seeds", nargs="+", type=int, default=None,
                      help="the seeds the grid is meant to have (the sweep's --seeds): while any setting lacks a complete run "
                           "of one of them, the report's top says how many of the grid's runs are complete "
                           "(default: no seeds expected)")
    runs.add_argument("--pilot", nargs="+", default=None,
                      help="folders of the pilot runs that chose the task pair (default: no pilot section)")
    runs.add_argument("--pilot-command", action="append", default=None,
                      help="a command that made the --pilot runs (repeat for several; default: python scripts/sweep.py "
                           "--preset PILOT_PRESET)")
    runs.add_argument("--threshold", type=float, default=None,
                      help="success that counts as learned in the pilot (default: mini 0.8, regime 0.9)")
    runs.add_argument("--supplement", default=None,
                      help="folder of the runs of a further try (another size, say), reported after the main grid")
    runs.add_argument("--supplement-command", default=None, help="the command that made the --supplement runs")
    runs.add_argument("--more-seeds", default=None,
                      help="folder of runs of the same preset with further seeds (sweep.py --preset mini --seeds 4 5 "
                           "--settings ...); their settings are tabled again over the grid's seeds and these")
    runs.add_argument("--more-seeds-command", default=None, help="the command that made the --more-seeds runs")
    runs.add_argument("--pilot-only", action="store_true",
                      help="a report of the pilot alone, before the grid has run (needs --pilot; no --runs)")
    document = parser.add_argument_group("document")
    document.add_argument("--out", default=None,
                          help="the document (default: docs/results-PRESET.md); its figures go next to it")
    document.add_argument("--title", default=None, help="the document's title (default: the preset's)")
    document.add_argument("--sweep-log", default=None, help="the sweep's console output (for its start, end and wall time)")
    document.add_argument("--notes", default=None, help="Markdown file of findings written after reading the numbers")
    return parser


def write_report(args, argv) -> int:
    out_dir = os.path.dirname(os.path.abspath(args.out))  # made once the runs are read: bad input writes nothing
    stem = os.path.splitext(os.path.basename(args.out))[0]
    doc = [f"# {args.title}", "", "Generated by `scripts/mini_report.py` from the run folders; the numbers are as measured.", ""]
    report_command = "python scripts/mini_report.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.pilot_only:  # the pair is chosen, the grid not yet run
        doc += ["## Command", "", "```bash", report_command, "```", "",
                f"Status: only the pilot has run; the grid (`python scripts/sweep.py --preset {args.preset}`) has not.", ""]
    else:
        doc += grid_sections(args, out_dir, stem, report_command)
    if args.notes:
        with open(args.notes) as f:
            doc += ["## What the numbers say", "", f.read().strip(), ""]
    os.makedirs(out_dir, exist_ok=True)
    if args.pilot:
        pilot_preset = REPORTS[args.preset]["pilot"]
        lines, pilot_figures = pilot_section(args.pilot, pilot_preset, args.threshold, out_dir, stem)
        pilot_seeds = ", ".join(map(str, sorted({run.args["seed"] for run in find(args.pilot)
                                                   if run.metrics and run.metrics.get("complete")})))
        commands = args.pilot_command or [f"python scripts/sweep.py --preset {pilot_preset}"]
        doc += ["## How the task pair was chosen", "", f"Pilot runs (seeds {pilot_seeds}; each pair's below), made by:", "",
                "```bash", *commands, "```", "", REPORTS[args.preset]["bar"], ""]
        doc += lines + [""]
        doc += [f"![pilot]({os.path.basename(path)})" for path in pilot_figures] + ([""] if pilot_figures else [])
    with open(args.out, "w") as f:
        f.write("\n".join(doc))
    print(f"wrote {args.out}")
    return 0


def grid_sections(args, out_dir: str, stem: str, report_command: str) -> list[str]:
    """The grid's sections: command, machine and time, results, every run, identification,
    plasticity, curves and the further runs."""
    runs = paper_tables.load_runs([args.runs])
    counted = counted_runs(args.runs)
    if not counted:
        raise ReportError(f"no complete run in --runs {args.runs!r} (metrics.json with \"complete\": true)")
    preset = PRESETS[args.preset]
    os.makedirs(out_dir, exist_ok=True)
    command = args.runs_command or f"python scripts/sweep.py --preset {args.preset} --jobs 2"
    names = {run.args["exp_name"] for run in counted}  # the settings that ran, the preset's first, in its order
    settings = [name for name in preset["settings"] if name in names] + sorted(names - set(preset["settings"]))
    seeds = ", ".join(map(str, sorted({run.args["seed"] for run in counted})))
    first = counted[0].args
    sequence, stages = " -> ".join(first["tasks"]), len(counted[0].metrics["stage_tasks"])
    curves = figures.plot_curves([r.path for r in counted], os.path.join(out_dir, f"{stem}-curves"),
                                 align="stage", label=paper_tables.setting_label,
                                 title=f"{args.preset}: {sequence} x {first['cycles']} cycles")

    doc = grid_status(find([args.runs]), preset["settings"], args.seeds)
    doc += ["## Command", "", "```bash", command, report_command, "```", "",
            f"Sequence: {sequence}, {first['cycles']} cycles ({stages} stages). Settings: "
            + ", ".join(settings) + ". Flags of every run: `" + " ".join(preset["flags"]) + "` (NBSP-only "
            f"flags go to the settings that use them). Seeds {seeds}.", ""]
    doc += ["## Machine and time", "", *machine_lines(counted),
            "- Runs at a time and threads per run: as in the command above.",
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
    metrics = paper_tables.METRICS[preset["script"]]
    differences = difference_table(counted, REPORTS[args.preset]["comparisons"], metrics)
    if differences:
        doc += ["Differences between settings: A's mean minus B's, with a 95% percentile-bootstrap interval (each "
                f"setting's runs resampled on their own, {DIFFERENCE_REPS:,} times, seed 0; no interval from fewer than "
                f"{paper_tables.MIN_BOOTSTRAP_RUNS} runs a side). An interval that holds 0 does not tell the two apart; "
                "with 5 runs a side such intervals run narrow, so one that barely clears 0 is weak evidence.", ""] \
            + differences + [""]
    early = first.get("early_stop_success", 0.9)
    if len(counted[0].metrics["stages"]) > 1:
        doc += ["What each setting held of the tasks a stage does not train, through the stage: their evaluation success "
                "averaged over the stage's evaluations, mean ± standard error over runs (the success matrix samples "
                "the same curves once, at the stage's end):", ""] + retention_table(counted, paper_tables.setting_label) + [""]
    stops = f"`*`: the stage stopped early at {early} training success" if early else "no early stop: every stage to its budget"
    doc += [f"Every run ({stops}; held: the tasks a stage does not train, their success averaged over the "
            "stage's evaluations, as above):", ""] + per_run_table(counted) + [""]
    doc += stage_one_agreement(counted)
    identification = identification_table(counted, paper_tables.setting_label)
    if len(identification) > 2:
        windows = sum("selection" in stage for run in counted for stage in run.metrics["stages"])
        with_windows = sum(any("selection" in stage for stage in run.metrics["stages"]) for run in counted)
        doc += ["## What identification had to work with", "",
                f"Over every stage of every run of a setting ({windows / with_windows:g} identification windows per run):",
                ""] + identification + [""]
        doc += ["What each setting's selection protected: the share of its skill neurons that were dead (constant) "
                "over the window, which a mask cannot protect since they get no gradient, and the mean mask on the "
                "live ones (1 leaves a unit free, 0 freezes it), so that the strength of the protection and the "
                "choice of units are not confused. Only the selections whose masks acted count (not the last "
                "stage's, which no stage follows); each run's share and mean, then mean ± standard error over runs:", ""] + protection_table(counted, paper_tables.setting_label) + [""]
    doc += ["## Plasticity", "", "Actor's dormant share / first critic's feature rank at the end of each stage, mean over "
            "runs: a neuron is dormant when its mean |activation| is at most "
            f"{first['dormant_threshold']} of its layer's mean (ReDo); the rank is srank (delta 0.01) of the last "
            "hidden layer, out of its width. Both on one fixed batch of the first task's transitions.", ""]
    doc += plasticity_table(counted, paper_tables.setting_label) + [""]
    episodes = f"{first['eval_episodes']} episodes; " if "eval_episodes" in first else ""
    doc += ["## Curves", "", f"Evaluation success of each task (deterministic policy, {episodes}mean and standard error "
            "over seeds) against the stage, each seed's steps scaled to its own stage lengths (stages that stop early "
            "differ between seeds); shaded spans are the stages that train the panel's task.", "",
            f"![curves]({os.path.basename(curves[0])})", ""]
    if args.supplement:
        extra = counted_runs(args.supplement)
        wide = figures.plot_curves([r.path for r in extra], os.path.join(out_dir, f"{stem}-supplement-curves"),
                                   align="stage", label=paper_tables.setting_label, title="further try")
        doc += ["## A further try", "", "```bash", args.supplement_command or f"(runs in {args.supplement})", "```", "",
                paper_tables.settings_table(paper_tables.load_runs([args.supplement]), "markdown", title=None), "",
                f"Training wall time summed over runs: {wall_time(extra) / 60:.1f} min.", ""]
        doc += per_run_table(extra) + ["", f"![supplement]({os.path.basename(wide[0])})", ""]
    if args.more_seeds:
        doc += more_seeds_section(runs, args.more_seeds, args.more_seeds_command)
    return doc


if __name__ == "__main__":
    sys.exit(main())
