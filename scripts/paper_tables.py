"""Result tables of NBSP runs, side by side with the paper's own numbers (Tables 1-5, 9, 10).

Usage
-----
    python scripts/paper_tables.py runs/                          # every paper table with a matching run
    python scripts/paper_tables.py runs/ --table 1 9              # chosen paper tables
    python scripts/paper_tables.py runs/ --table all              # every distinct setting (any task list)
    python scripts/paper_tables.py runs/ --table ablation --iqm   # Tables 2, 9, 10, 3, 4 and rliable's IQM
    python scripts/paper_tables.py runs/ other/ --format markdown latex --out docs/results
                                                                   # -> docs/results.md and docs/results.tex

Input: every `metrics.json` under the given folders (recursively) with the `config.json` beside it,
as the training scripts write them in `runs/{run_name}/`. Runs whose `metrics.json` says
`"complete": false` (a killed or still running run), runs without a readable `config.json`, and the
older of two runs with the same configuration and seed are not counted; they are listed at the end.

`--table` choices (several may be given):
  1 2 3 4 5 9 10  the paper's tables; a table is printed when at least one run matches it
  ablation        2 9 10 3 4 (every ablation table of the paper)
  paper           1 2 3 4 5 9 10
  all             one generic table of every distinct setting, in the layout of Table 2
                  (settings rows x ASR, FM, FWT; AR for Atari), any task sequence
Without `--table`: the paper tables that have a matching run, or `all` when none does.

`--iqm` adds the interquartile mean over runs of ASR/AR, FM and FWT per setting, with 95%
stratified-bootstrap confidence intervals from rliable (`--reps`, default 2000, `--seed`, default
0). rliable 1.2.0 resamples with NumPy's global generator, so that one is seeded for each setting
and metric and restored afterwards: a number does not depend on which other runs are in the
folder. With fewer than 4 runs the IQM equals the mean (the 25% trimmed mean trims nothing).

`--format markdown latex` (default markdown). Output goes to stdout, or with `--out PATH` to PATH;
with two formats `--out PATH` writes PATH.md and PATH.tex (a `.md`/`.tex` suffix of PATH is
replaced). LaTeX tables use booktabs (`\\usepackage{booktabs}`), one `table` environment each.
Bad input (a folder without any metrics.json, an unknown table, a config.json or metrics.json that
is valid JSON of another shape than the training scripts write, an --out that cannot be written)
stops with one `error:` line that names the valid choices (or the file and field), exit status 2,
before anything is written. When no run counts (all incomplete, say) the runs
are listed on stderr and an `error:` line follows, exit status 1.

How runs are classified and grouped
-----------------------------------
* A run's setting comes from its config args, never from `exp_name`: `--method sac`, or
  `--method nbsp` with `--no-mask --no-replay`, is "vanilla SAC"; NBSP with `--no-mask` only is
  "only experience replay", with `--no-replay` only "only gradient masking" ("only hard gradient
  masking" with `--hard-mask`); `--hard-mask` with replay is "NBSP with hard gradient masking";
  otherwise "NBSP". Non-default `--identify`, `--apply-to`, `--skill-ratio` of a masking setting
  are appended: "NBSP (identify=activation)" (a row of Table 3), "NBSP (apply_to=actor)" (Table 4),
  "NBSP (skill_ratio=0.1)". A baseline is its paper name (EWC, NPC, ANCL, CoTASP, CRelu, CBP, PI).
  A config without `method` (or any other newer flag) takes the training script's default.
* Runs are averaged together only when their whole config is equal, except the seed and the
  bookkeeping fields (exp_name, runs_dir, resume, track, wandb_*, cuda, compile, cudagraphs,
  torch_deterministic) and the flags of methods other than the run's own (the training scripts
  refuse those anyway). Task names are compared without their "-v3" suffix.
* When settings of one table differ in other flags (steps_per_task, hidden, ...), the differing
  flags label them and they are shown apart, never averaged: a flag every setting of the table
  has (general flags) splits rows, e.g. "window-open → window-close [steps_per_task=50000]";
  a method's own flag (dpre_per_task for NBSP, ewc_lambda for EWC) goes into the setting's
  label, e.g. "NBSP [dpre_per_task=1000]". Flags that are equal across the table but not at the
  paper's defaults (the training scripts' defaults are Table 6) are listed under the table.
* Each cell is mean ± standard error over seeds (sample std, ddof=1, / sqrt(n)); one seed shows
  "± –". A cell with fewer seeds than the table's most common count, or whose setting has a run
  that is not counted (a killed seed), is marked † and a note names the missing seeds.

Layout decisions where the paper leaves room
--------------------------------------------
* Tables 1 and 5 keep the paper's layout (task sequence x metric rows, methods as columns) with a
  "seeds" row per sequence; each cell reads `0.71 ± 0.03 (paper 0.90 ± 0.04)`. A "vanilla SAC"
  column is added when such runs exist; its paper numbers come from the ablation Tables 2, 9, 10
  (none for the 4-task sequences). Only methods and sequences with runs are shown.
* Tables 2, 9, 10, 3, 4 print settings as rows and ASR/FM/FWT as columns (the paper prints them
  transposed), each metric followed by a "paper" column; Tables 3 and 4 stack their three task
  sequences as row blocks. Rows with no run are left out.
* The generic table (`all`) shows the paper's number wherever the paper has one for the same task
  sequence and setting (whatever the budget of the runs: see the flags listed under the table).

Importable API (for scripts that write docs): `load_runs(paths)`, `settings_table(runs, fmt)`,
`paper_table(runs, table_id, fmt)`, `iqm_table(runs, fmt, reps, seed)`, `skipped_list(runs, fmt)`,
`report(runs, tables, fmt, iqm=...)`; `TablesError` is raised for bad input. `import paper_tables`
with `scripts/` on the path.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import cache

import numpy as np

import baselines
import protocol
from cli import Parser, UsageError, check_output
from run_folders import ROOT, RunFolder, RunFolderError, check_shape, metrics_files, read_json, script_defaults

PAPER_RESULTS = os.path.join(ROOT, "data", "paper_results.json")

BOOKKEEPING = set(protocol.BOOKKEEPING)
SETTING_FLAGS = {"method", "mask", "replay", "hard_mask", "identify", "apply_to", "skill_ratio", "goal_score"}
LABEL_MODS = ("identify", "apply_to", "skill_ratio", "goal_score")
TASK_KEYS = {"tasks", "games"}
BASELINES = {name: baselines.LABELS[name] for name in baselines.BASELINES}
ABLATION = ["vanilla SAC", "only experience replay", "only gradient masking", "NBSP with hard gradient masking", "NBSP"]
SETTING_ORDER = ["vanilla SAC", "only experience replay", "only gradient masking", "only hard gradient masking",
                 "NBSP with hard gradient masking", *BASELINES.values(), "NBSP"]
METRICS = {"metaworld": ("ASR", "FM", "FWT"), "atari": ("AR", "FM", "FWT")}
ARROWS = {"ASR": "↑", "AR": "↑", "FM": "↓", "FWT": "↑"}
ENV_NAMES = {"metaworld": "Meta-World", "atari": "Atari"}
TABLE_IDS = ["1", "2", "3", "4", "5", "9", "10"]
TABLE_GROUPS = {"ablation": ["2", "9", "10", "3", "4"], "paper": TABLE_IDS}
TABLE_CHOICES = [*TABLE_IDS, "ablation", "paper", "all"]
FORMATS = {"markdown": "markdown", "md": "markdown", "latex": "latex", "tex": "latex"}
MISSING = object()
MIN_BOOTSTRAP_RUNS = 3  # a bootstrap interval from fewer runs only repeats them


class TablesError(Exception):
    """Bad input (no runs, unknown table or format): the CLI prints it as one `error:` line, exit 2."""


# ----------------------------------------------------------------------------------------------
# Runs

@dataclass
class Run:
    path: str                      # the run folder
    run_name: str
    env: str = "metaworld"         # "metaworld" | "atari"
    sequence: tuple = ()           # the task list of one cycle, e.g. ("window-open", "window-close")
    seed: int | None = None
    config: dict = field(default_factory=dict)   # the grouping config (see module docstring)
    scores: dict = field(default_factory=dict)   # {"ASR"|"AR": float, "FM": float | None, "FWT": float}
    problem: str | None = None     # why the run is not counted (None: counted)
    time: float = 0.0              # start time (run name suffix), to keep the latest of duplicates

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def label(self) -> str:
        return setting_label(self.config)


def setting_label(config: dict) -> str:
    """The paper's name of a run's setting, from its flags (module docstring)."""
    method = config.get("method", "nbsp")
    if method == "sac":
        return "vanilla SAC"
    if method != "nbsp":
        return BASELINES.get(method, method)
    mask, replay, hard = config.get("mask", True), config.get("replay", True), bool(config.get("hard_mask"))
    if not mask:
        return "only experience replay" if replay else "vanilla SAC"
    if not replay:
        base = "only hard gradient masking" if hard else "only gradient masking"
    else:
        base = "NBSP with hard gradient masking" if hard else "NBSP"
    defaults = script_defaults("metaworld")
    fallback = {"identify": "goal", "apply_to": "both", "skill_ratio": 0.2, "goal_score": "paper"}
    mods = [f"{k}={fmt_value(config[k])}" for k in LABEL_MODS
            if k in config and config[k] != defaults.get(k, fallback[k])]
    return f"{base} ({', '.join(mods)})" if mods else base


def fmt_value(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(fmt_value(x) for x in v) + "]"
    if v is MISSING:
        return "n/a"
    return str(v)


def _key(v) -> str:
    return "\0missing" if v is MISSING else json.dumps(v, sort_keys=True)


def _read_run(metrics_path: str) -> Run:
    run_dir = os.path.dirname(metrics_path)
    run = Run(path=run_dir, run_name=os.path.basename(run_dir))
    try:
        metrics = read_json(metrics_path)
    except (OSError, ValueError) as e:
        run.problem = f"unreadable metrics.json ({type(e).__name__})"
        return run
    try:
        config = read_json(os.path.join(run_dir, "config.json"))
    except (OSError, ValueError) as e:
        run.problem = f"no readable config.json beside metrics.json ({type(e).__name__})"
        return run
    try:
        check_shape(run_dir, config, metrics)
    except RunFolderError as e:
        raise TablesError(str(e)) from None
    folder = RunFolder(run_dir, config, metrics)
    args = folder.args
    run.run_name = metrics.get("run_name", run.run_name)
    run.env = folder.benchmark()
    try:
        run.time = float(str(run.run_name).rsplit("__", 1)[-1])
    except ValueError:
        run.time = os.path.getmtime(metrics_path)
    stage_tasks = folder.stage_tasks
    defaults = script_defaults(run.env)
    run.sequence = folder.sequence()
    run.seed = args.get("seed")
    full = {**defaults, **args}
    method = full.get("method", "nbsp")
    run.config = {k: v for k, v in full.items()
                  if k not in BOOKKEEPING and (not baselines.flag_owners(k) or method in baselines.flag_owners(k))}
    run.config["games" if run.env == "atari" else "tasks"] = list(run.sequence)
    names = METRICS[run.env]
    run.scores = {m: metrics.get(m) for m in names}
    H = len(stage_tasks) or len(metrics.get("sr") or [])
    done = len(metrics.get("stages") or [row for row in metrics.get("sr") or [] if row and row[0] is not None])
    complete = metrics.get("complete", done == H and H > 0)
    if metrics.get("diverged"):
        where = metrics["diverged"]
        run.problem = f"diverged at stage {where['stage']}, global step {where['global_step']} ({where['quantity']})"
    elif not complete:
        run.problem = f"incomplete ({done}/{H} stages)"
    elif run.scores.get(names[0]) is None or run.scores.get("FWT") is None:
        # an Atari game can be unscored at a stage before it is trained without touching the metrics
        unscored = sorted({g for s in metrics.get("stages") or [] for g in s.get("eval_unscored", [])})
        run.problem = (f"{names[0]} missing: no {'/'.join(unscored)} game finished within an evaluation (raise --eval-steps)"
                       if unscored else f"metrics.json has no {names[0]}/FWT")
    return run


def load_runs(paths) -> list[Run]:
    """Every run (metrics.json + config.json) under `paths` (folders, searched recursively, or
    metrics.json files). Runs that are not counted keep a `problem` string; the others have
    `problem is None`. Raises TablesError when a path does not exist or holds no metrics.json."""
    try:
        files = metrics_files(paths)
    except RunFolderError as e:
        raise TablesError(str(e)) from None
    runs = [_read_run(f) for f in files]
    # the same config and seed twice (a rerun): keep the latest, list the other
    latest = {}
    for run in sorted((r for r in runs if r.ok), key=lambda r: r.time):
        k = (run.env, _key(run.config), run.seed)
        if k in latest:
            latest[k].problem = f"same config and seed {run.seed} as the later run {run.run_name}; not counted"
        latest[k] = run
    return runs


# ----------------------------------------------------------------------------------------------
# Groups of runs (one setting = one full config) and their statistics

@dataclass
class Group:
    env: str
    sequence: tuple
    label: str
    config: dict
    runs: list
    dropped: list = field(default_factory=list)   # runs of this config not counted, of seeds it lacks

    @property
    def seeds(self) -> list:
        return sorted(r.seed for r in self.runs)

    @property
    def n(self) -> int:
        return len(self.runs)

    def values(self, metric) -> list[float]:
        return [r.scores[metric] for r in self.runs if r.scores.get(metric) is not None]

    def stat(self, metric):
        """(mean, standard error or None for one seed) over seeds; None when the metric is undefined."""
        v = self.values(metric)
        return mean_and_se(v) if v else None


def mean_and_se(values) -> tuple[float, float | None]:
    """The mean and the standard error (sample std, ddof=1, / sqrt(n); None for one value)."""
    return float(np.mean(values)), (float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None)


def group_runs(runs) -> list[Group]:
    """Counted runs grouped by their whole config (minus seed and bookkeeping)."""
    groups = {}
    for run in runs:
        if not run.ok:
            continue
        k = (run.env, _key(run.config))
        if k not in groups:
            groups[k] = Group(run.env, run.sequence, run.label, run.config, [])
        groups[k].runs.append(run)
    for g in groups.values():
        g.runs.sort(key=lambda r: (r.seed is None, r.seed))
    for run in runs:  # a killed seed of a counted setting is a missing seed of that setting
        g = groups.get((run.env, _key(run.config))) if not run.ok and run.config else None
        if g is not None and run.seed not in g.seeds:
            g.dropped.append(run)
    return list(groups.values())


def _order(label: str) -> tuple:
    base = label.split(" [")[0].split(" (")[0]
    return (SETTING_ORDER.index(base) if base in SETTING_ORDER else len(SETTING_ORDER), label)


def label_flags(groups) -> dict:
    """For the groups of one table: {id(group): (row_flags, col_flags)} as ((flag, value), ...).
    row_flags: general flags (every group has them) whose values differ across the table;
    col_flags: a method's own flags that differ among the groups that have them, plus, for groups
    that would still share a cell, every flag that tells them apart."""
    if not groups:
        return {}
    keysets = [set(g.config) - SETTING_FLAGS - TASK_KEYS for g in groups]
    common, union = set.intersection(*keysets), set.union(*keysets)
    row_keys = sorted(k for k in common if len({_key(g.config[k]) for g in groups}) > 1)
    col_keys = sorted(k for k in union - common if len({_key(g.config[k]) for g in groups if k in g.config}) > 1)
    out = {id(g): (tuple((k, g.config[k]) for k in row_keys),
                   tuple((k, g.config[k]) for k in col_keys if k in g.config)) for g in groups}
    cells = defaultdict(list)
    for g in groups:
        cells[(g.env, g.sequence, g.label, out[id(g)])].append(g)
    for same in cells.values():
        if len(same) > 1:
            # the fewest words that tell them apart: flags they all have, else the ones some lack
            shared = sorted(set.intersection(*(set(g.config) for g in same)) - TASK_KEYS)
            diff = [k for k in shared if len({_key(g.config[k]) for g in same}) > 1]
            if not diff:
                diff = sorted(set.union(*(set(g.config) for g in same)) - TASK_KEYS - set(shared))
            for g in same:
                row, col = out[id(g)]
                out[id(g)] = (row, col + tuple((k, g.config.get(k, MISSING)) for k in diff))
    return out


def _flags_text(flags) -> str:
    return "; ".join(f"{k}={fmt_value(v)}" for k, v in flags)


def _bracket(text: str, flags) -> str:
    return f"{text} [{_flags_text(flags)}]" if flags else text


def nondefault_note(groups, flagged) -> str | None:
    """Flags equal across the table (where present) but not at the training scripts' defaults."""
    parts = []
    keys = sorted(set.union(*(set(g.config) for g in groups)) - SETTING_FLAGS - TASK_KEYS - flagged) if groups else []
    for k in keys:
        have = [g for g in groups if k in g.config]
        values = {_key(g.config[k]) for g in have}
        defaults = script_defaults(have[0].env)
        if len(values) != 1 or k not in defaults or have[0].config[k] == defaults[k]:
            continue
        scope = "" if len(have) == len(groups) else " (" + ", ".join(sorted({g.label for g in have}, key=_order)) + ")"
        parts.append(f"{k}={fmt_value(have[0].config[k])}{scope}")
    return ("Flags not at the training scripts' defaults (the paper's settings, Table 6), the same in every run "
            "of this table that has them: " + ", ".join(parts)) if parts else None


def seed_marks(groups, name) -> tuple[set, list[str]]:
    """Groups with fewer seeds than the table's most common count (ties: the larger count) or with a
    run that is not counted (a killed seed), and a note for each naming the missing seeds."""
    if not groups:
        return set(), []
    counts = Counter(g.n for g in groups)
    modal = max(counts, key=lambda c: (counts[c], c))
    reference = set().union(*(set(g.seeds) for g in groups if g.n >= modal))
    marked, notes = set(), []
    for g in groups:
        if g.n < modal or g.dropped:
            marked.add(id(g))
            missing = sorted(reference - set(g.seeds) - {r.seed for r in g.dropped})
            text = f"† {name(g)}: {g.n} seed{'s' if g.n > 1 else ''} ({', '.join(map(str, g.seeds))})"
            if missing:
                text += f", missing {', '.join(map(str, missing))}"
            if g.dropped:
                text += ", not counted " + ", ".join(f"{r.seed} ({r.problem})" for r in g.dropped)
            if g.n < modal:
                text += f"; this table's most common count is {modal}"
            notes.append(text)
    return marked, notes


def fmt_stat(stat, dagger=False) -> str:
    if stat is None:
        return "–"
    mean, se = stat
    text = f"{_num(mean)} ± {_num(se) if se is not None else '–'}"
    return text + ("†" if dagger else "")


def _num(x: float) -> str:
    s = f"{x:.2f}"
    return "0.00" if s == "-0.00" else s


def seq_text(sequence) -> str:
    return " → ".join(sequence)


# ----------------------------------------------------------------------------------------------
# The paper's numbers

@cache
def paper_data() -> dict:
    with open(PAPER_RESULTS) as f:
        return json.load(f)


def _paper_key(tid: str) -> str:
    for k in paper_data():
        if k.startswith(f"table{tid}_"):
            return k
    raise KeyError(tid)


# display names of Tables 3 and 4 -> this script's setting labels
TABLE3 = {"activation": "NBSP (identify=activation)", "weight": "NBSP (identify=weight)",
          "random": "NBSP (identify=random)", "goal (NBSP)": "NBSP"}
TABLE4 = {"actor": "NBSP (apply_to=actor)", "critic": "NBSP (apply_to=critic)", "both": "NBSP"}


@cache
def paper_lookup(tid: str) -> dict:
    """{(sequence string "a,b", setting label): {metric: (mean, se)}} of one paper table."""
    data, out = paper_data()[_paper_key(tid)], {}
    if tid in ("1", "5"):
        for seq, metrics in data["rows"].items():
            for i, method in enumerate(data["methods"]):
                out[(seq, method)] = {m: tuple(v[i]) for m, v in metrics.items()}
    elif tid in ("2", "9", "10"):
        seq = _paper_key(tid).split("ablation_", 1)[1]
        for i, setting in enumerate(data["settings"]):
            out[(seq, setting)] = {m: tuple(data[m][i]) for m in ("ASR", "FM", "FWT")}
    else:
        names = TABLE3 if tid == "3" else TABLE4
        for seq, metrics in data.items():
            if seq == "settings":
                continue
            for i, setting in enumerate(data["settings"]):
                out[(seq, names[setting])] = {m: tuple(v[i]) for m, v in metrics.items()}
    return out


def paper_value(sequence, label, metric, tables=("1", "5", "2", "9", "10", "3", "4")):
    """The paper's (mean, se) for a task sequence, setting label and metric, or None."""
    base = label.split(" [")[0]
    for tid in tables:
        hit = paper_lookup(tid).get((",".join(sequence), base))
        if hit and metric in hit:
            return hit[metric]
    return None


def fmt_paper(stat) -> str:
    return "–" if stat is None else f"{_num(stat[0])} ± {_num(stat[1])}"


# ----------------------------------------------------------------------------------------------
# Tables: built as plain text with Unicode (±, †, →, ↑), rendered as Markdown or LaTeX

@dataclass
class Table:
    title: str
    header: list
    rows: list = field(default_factory=list)
    breaks: set = field(default_factory=set)    # row indices that start a block (a rule in LaTeX)
    notes: list = field(default_factory=list)
    left: int = 1                                # leading left-aligned columns

    def render(self, fmt: str) -> str:
        return to_latex(self) if fmt == "latex" else to_markdown(self)


def to_markdown(t: Table) -> str:
    def row(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    lines = [f"### {t.title}", "", row(t.header),
             "|" + "|".join(":---" if i < t.left else "---:" for i in range(len(t.header))) + "|"]
    lines += [row(r) for r in t.rows]
    if t.notes:
        lines += [""] + [f"{n}  " if i < len(t.notes) - 1 else n for i, n in enumerate(t.notes)]
    return "\n".join(lines) + "\n"


LATEX_SUBS = [("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("#", r"\#"), ("_", r"\_"),
              ("{", r"\{"), ("}", r"\}"), ("$", r"\$"), ("~", r"\textasciitilde{}"), ("^", r"\^{}"),
              ("±", r"$\pm$"), ("†", r"$^\dagger$"), ("→", r"$\rightarrow$"), ("↑", r"$\uparrow$"),
              ("↓", r"$\downarrow$"), ("–", "--"), ("`", "")]


def latex_escape(text: str) -> str:
    out = []
    for ch in str(text):
        for a, b in LATEX_SUBS:
            if ch == a:
                ch = b
                break
        out.append(ch)
    return "".join(out)


def to_latex(t: Table) -> str:
    cols = "l" * t.left + "c" * (len(t.header) - t.left)
    lines = ["\\begin{table}[t]", "\\centering", f"\\caption{{{latex_escape(t.title)}}}",
             f"\\begin{{tabular}}{{{cols}}}", "\\toprule",
             " & ".join(latex_escape(h) for h in t.header) + " \\\\", "\\midrule"]
    for i, r in enumerate(t.rows):
        if i in t.breaks and i > 0:
            lines.append("\\midrule")
        lines.append(" & ".join(latex_escape(c) for c in r) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    if t.notes:
        lines.append("\\par\\smallskip{\\footnotesize " + " \\\\\n".join(latex_escape(n) for n in t.notes) + "}")
    lines.append("\\end{table}")
    return "\n".join(lines) + "\n"


SE_NOTE = ("Mean ± standard error over seeds (sample std / sqrt(n)); paper: the paper's mean ± standard error "
           "over 3 seeds.")
ONE_SEED_NOTE = "± –: one seed, no standard error."


def _settings_table(title, groups, env, display=lambda g: g.label, seq_col=True, paper_tables=None) -> Table | None:
    """Settings as rows x metrics as columns (paper Table 2 layout), each metric with a paper column."""
    if not groups:
        return None
    metrics = METRICS[env]
    flags = label_flags(groups)

    def name(g):
        row, col = flags[id(g)]
        text = _bracket(display(g), col + row)
        return f"{seq_text(g.sequence)}, {text}" if seq_col else text
    groups = sorted(groups, key=lambda g: (_seq_order(g.sequence, paper_tables), _order(g.label),
                                           _flags_text(sum(flags[id(g)], ()))))
    marked, seed_notes = seed_marks(groups, name)
    paper_kw = {"tables": paper_tables} if paper_tables else {}
    paper = {id(g): {m: paper_value(g.sequence, g.label, m, **paper_kw) for m in metrics} for g in groups}
    with_paper = any(v is not None for p in paper.values() for v in p.values())
    header = (["Tasks"] if seq_col else []) + ["Setting", "seeds"]
    for m in metrics:
        header += [f"{m} {ARROWS[m]}"] + (["paper"] if with_paper else [])
    t = Table(title, header, left=2 if seq_col else 1)
    previous = None
    for g in groups:
        row, col = flags[id(g)]
        dagger = id(g) in marked
        cells = ([seq_text(g.sequence) if g.sequence != previous else ""] if seq_col else [])
        if seq_col and g.sequence != previous:
            t.breaks.add(len(t.rows))
        previous = g.sequence
        cells += [_bracket(display(g), col + row), f"{g.n}{'†' if dagger else ''}"]
        for m in metrics:
            cells.append(fmt_stat(g.stat(m), dagger))
            if with_paper:
                cells.append(fmt_paper(paper[id(g)][m]))
        t.rows.append(cells)
    t.notes = [SE_NOTE if with_paper else SE_NOTE.split(";")[0] + "."] + seed_notes
    return with_common_notes(t, groups, flags)


def with_common_notes(t: Table, groups, flags) -> Table:
    """The notes every grouped table ends with: single-seed groups and the flags left at their defaults."""
    if any(g.n == 1 for g in groups):
        t.notes.append(ONE_SEED_NOTE)
    used = {k for g in groups for k, _ in sum(flags[id(g)], ())}
    note = nondefault_note(groups, used)
    if note:
        t.notes.append(note)
    return t


def _seq_order(sequence, paper_tables):
    key = ",".join(sequence)
    for tid in paper_tables or ():
        seqs = [s for s, _ in paper_lookup(tid)]
        if key in seqs:
            return (0, seqs.index(key), key)
    return (1, len(sequence), key)


def _methods_table(tid, title, groups, env) -> Table | None:
    """Paper Tables 1 and 5: (task sequence x metric) rows, methods as columns."""
    if not groups:
        return None
    metrics = METRICS[env]
    flags = label_flags(groups)
    column = {id(g): _bracket(g.label, flags[id(g)][1]) for g in groups}
    block = {id(g): (g.sequence, flags[id(g)][0]) for g in groups}
    columns = sorted(set(column.values()), key=_order)
    blocks = sorted(set(block.values()), key=lambda b: (_seq_order(b[0], [tid]), _flags_text(b[1])))
    cell = {(block[id(g)], column[id(g)]): g for g in groups}
    marked, seed_notes = seed_marks(
        groups, lambda g: f"{column[id(g)]}, {_bracket(seq_text(g.sequence), block[id(g)][1])}")
    label_of = {column[id(g)]: g.label for g in groups}
    t = Table(title, ["Cycling sequential " + ("tasks" if env == "metaworld" else "games"), "Metric"] + columns,
              left=2)
    for b in blocks:
        t.breaks.add(len(t.rows))
        for i, m in enumerate(metrics):
            cells = [_bracket(seq_text(b[0]), b[1]) if i == 0 else "", f"{m} {ARROWS[m]}"]
            for c in columns:
                g = cell.get((b, c))
                pv = paper_value(b[0], label_of[c], m, tables=(tid, "2", "9", "10"))
                text = fmt_stat(g.stat(m), id(g) in marked) if g else "–"
                cells.append(text + (f" (paper {fmt_paper(pv)})" if pv else ""))
            t.rows.append(cells)
        t.rows.append(["", "seeds"] + [f"{cell[(b, c)].n}{'†' if id(cell[(b, c)]) in marked else ''}"
                                        if (b, c) in cell else "0" for c in columns])
    t.notes = [("Each cell: mean ± standard error over seeds (sample std / sqrt(n)), then in parentheses the "
                "paper's mean ± standard error over 3 seeds."), *seed_notes]
    if "vanilla SAC" in label_of.values():
        t.notes.append("vanilla SAC is not a column of the paper's table; " + (
            "its paper numbers are those of the ablation Tables 2, 9, 10." if env == "metaworld"
            else "the paper has no vanilla SAC numbers on Atari."))
    return with_common_notes(t, groups, flags)


PAPER_TITLES = {
    "1": "Table 1: Results of NBSP with other baselines on the Meta-World benchmark",
    "2": "Table 2: Results of ablation study of gradient masking and experience replay techniques",
    "3": "Table 3: Results of ablation study of neuron identification methods",
    "4": "Table 4: Results of ablation study of the actor and critic modules",
    "5": "Table 5: Results of NBSP with other baselines on the Atari benchmark",
    "9": "Table 9: Results of ablation study of gradient masking and experience replay techniques",
    "10": "Table 10: Results of ablation study of gradient masking and experience replay techniques",
}


def paper_table_object(runs, tid: str) -> Table | None:
    """The Table of paper table `tid` for the counted runs that match it, or None when none does."""
    tid = str(tid)
    if tid not in TABLE_IDS:
        raise TablesError(f"unknown table {tid!r}; valid choices: {', '.join(TABLE_CHOICES)}")
    groups = group_runs(runs)
    lookup = paper_lookup(tid)
    seqs = {s for s, _ in lookup}
    labels = {label for _, label in lookup}
    if tid in ("1", "5"):
        env = "metaworld" if tid == "1" else "atari"
        labels = labels | {"vanilla SAC"}
        chosen = [g for g in groups if g.env == env and ",".join(g.sequence) in seqs and g.label in labels]
        return _methods_table(tid, PAPER_TITLES[tid], chosen, env)
    chosen = [g for g in groups if g.env == "metaworld" and ",".join(g.sequence) in seqs and g.label in labels]
    if tid in ("2", "9", "10"):
        (seq,) = seqs
        title = f"{PAPER_TITLES[tid]} on ({seq_text(seq.split(','))})"
        return _settings_table(title, chosen, "metaworld", seq_col=False, paper_tables=(tid,))
    names = {v: k for k, v in (TABLE3 if tid == "3" else TABLE4).items()}
    return _settings_table(PAPER_TITLES[tid], chosen, "metaworld", display=lambda g: names[g.label],
                           paper_tables=(tid,))


def paper_table(runs, table_id, fmt: str = "markdown") -> str | None:
    """Paper table `table_id` ("1".."5", "9", "10") as Markdown or LaTeX, or None when no run matches."""
    t = paper_table_object(runs, table_id)
    return t.render(_fmt(fmt)) if t else None


def settings_table(runs, fmt: str = "markdown", env: str | None = None, title: str | None = None) -> str:
    """Every distinct setting (any task sequence) x ASR/AR, FM, FWT, mean ± s.e. and seeds, with the
    paper's number where the paper has the same task sequence and setting; one table per benchmark
    (or only `env`). Incomplete runs among `runs` are listed under it. Empty string when no run counts."""
    fmt = _fmt(fmt)
    groups = group_runs(runs)
    out = []
    envs = [e for e in METRICS if (env is None or e == env) and any(g.env == e for g in groups)]
    for e in envs:
        name = f"{title} ({ENV_NAMES[e]})" if title and len(envs) > 1 else title or f"All settings ({ENV_NAMES[e]})"
        out.append(_settings_table(name, [g for g in groups if g.env == e], e).render(fmt))
    skipped = skipped_list(runs, fmt)
    return "\n".join(out + ([skipped] if skipped else []))


def iqm_table_object(runs, reps: int = 2000, seed: int = 0, env: str | None = None) -> list[Table]:
    """IQM over runs with 95% stratified-bootstrap CIs (rliable) of each metric, per setting."""
    from rliable import library as rly
    from rliable import metrics as rl_metrics

    groups = group_runs(runs)
    tables = []
    for e in METRICS:
        gs = [g for g in groups if g.env == e and (env is None or env == e)]
        if not gs:
            continue
        flags = label_flags(gs)
        gs.sort(key=lambda g: (_seq_order(g.sequence, ()), _order(g.label), _flags_text(sum(flags[id(g)], ()))))

        def name(g, flags=flags):
            row, col = flags[id(g)]
            return f"{seq_text(g.sequence)}, {_bracket(g.label, col + row)}"
        marked, seed_notes = seed_marks(gs, name)
        t = Table(f"Interquartile mean with 95% stratified-bootstrap CIs ({ENV_NAMES[e]})",
                  ["Tasks", "Setting", "seeds"] + [f"IQM {m} {ARROWS[m]} [95% CI]" for m in METRICS[e]], left=2)
        previous = None
        for g in gs:
            row, col = flags[id(g)]
            dagger = "†" if id(g) in marked else ""
            if g.sequence != previous:
                t.breaks.add(len(t.rows))
            cells = [seq_text(g.sequence) if g.sequence != previous else "", _bracket(g.label, col + row),
                     f"{g.n}{dagger}"]
            previous = g.sequence
            for m in METRICS[e]:
                v = np.asarray(g.values(m), dtype=float)
                if v.size == 0:
                    cells.append("–")
                    continue
                if v.size < MIN_BOOTSTRAP_RUNS:  # resampling one or two runs only repeats them
                    cells.append(f"{_num(float(np.mean(v)))} [–]{dagger}")
                    continue
                # rliable 1.2.0 resamples with NumPy's global generator (its random_state only reaches
                # arch): seed that one for this call, and put its state back afterwards
                state = np.random.get_state()
                np.random.seed(seed)
                try:
                    point, interval = rly.get_interval_estimates(
                        {"x": v.reshape(-1, 1)}, lambda x: np.array([rl_metrics.aggregate_iqm(x)]), reps=reps)
                finally:
                    np.random.set_state(state)
                lo, hi = interval["x"][:, 0]
                cells.append(f"{_num(point['x'][0])} [{_num(lo)}, {_num(hi)}]{dagger}")
            t.rows.append(cells)
        t.notes = [(f"rliable: IQM (25% trimmed mean: int(n / 4) runs off each end, so the middle 3 of 5) over runs, percentile bootstrap with {reps} repetitions, "
                    f"seed {seed}."), *seed_notes]
        if any(g.n < 4 for g in gs):
            t.notes.append("With fewer than 4 runs the IQM trims nothing and equals the mean.")
        if any(g.n < MIN_BOOTSTRAP_RUNS for g in gs):
            t.notes.append(f"[–]: no interval from fewer than {MIN_BOOTSTRAP_RUNS} runs.")
        used = {k for g in gs for k, _ in sum(flags[id(g)], ())}
        note = nondefault_note(gs, used)
        if note:
            t.notes.append(note)
        tables.append(t)
    return tables


def iqm_table(runs, fmt: str = "markdown", reps: int = 2000, seed: int = 0, env: str | None = None) -> str:
    """The IQM table(s) (see iqm_table_object) as Markdown or LaTeX."""
    return "\n".join(t.render(_fmt(fmt)) for t in iqm_table_object(runs, reps, seed, env))


def skipped_list(runs, fmt: str = "markdown") -> str:
    """The runs that are not counted and why; empty string when every run counts."""
    skipped = sorted((r for r in runs if not r.ok), key=lambda r: r.path)
    if not skipped:
        return ""
    plural = "s" if len(skipped) > 1 else ""
    if _fmt(fmt) == "latex":
        return "\n".join([f"% Not counted ({len(skipped)} run{plural}):"]
                         + [f"%   {r.path}: {r.problem}" for r in skipped]) + "\n"
    return "\n".join([f"Not counted ({len(skipped)} run{plural}):", ""]
                     + [f"- `{r.path}`: {r.problem}" for r in skipped]) + "\n"


def expand_tables(names) -> list[str]:
    """Table choices -> ordered unique table ids ("1".."10", "all"); TablesError for unknown names."""
    out = []
    for name in names:
        name = str(name).lower().removeprefix("table")
        if name in TABLE_GROUPS:
            out += TABLE_GROUPS[name]
        elif name in TABLE_IDS or name in ("all", "settings"):
            out.append("all" if name == "settings" else name)
        else:
            raise TablesError(f"unknown table {name!r}; valid choices: {', '.join(TABLE_CHOICES)}")
    return list(dict.fromkeys(out))


def _fmt(fmt: str) -> str:
    if fmt not in FORMATS:
        raise TablesError(f"unknown format {fmt!r}; valid choices: markdown, latex")
    return FORMATS[fmt]


def report(runs, tables=None, fmt: str = "markdown", iqm: bool = False, reps: int = 2000, seed: int = 0,
           source: str | None = None) -> str:
    """The whole output: the chosen tables (None: the paper tables with a matching run, else `all`),
    the IQM tables with `iqm`, and the list of runs not counted."""
    fmt = _fmt(fmt)
    ids = expand_tables(tables) if tables else None
    counted = [r for r in runs if r.ok]
    parts = []
    head = f"{len(counted)} runs counted, {len(runs) - len(counted)} not" + (f", from {source}" if source else "")
    parts.append(f"% {head}\n" if fmt == "latex" else f"_{head}._\n")
    if ids is None:
        found = [t for t in (paper_table_object(runs, tid) for tid in TABLE_IDS) if t]
        parts += [t.render(fmt) for t in found]
        if not found:
            ids = ["all"]
    for tid in ids or []:
        if tid == "all":
            groups = group_runs(runs)
            for e in METRICS:
                t = _settings_table(f"All settings ({ENV_NAMES[e]})", [g for g in groups if g.env == e], e)
                if t:
                    parts.append(t.render(fmt))
            if not counted:
                parts.append(_plain(fmt, "All settings: no run counts."))
            continue
        t = paper_table_object(runs, tid)
        parts.append(t.render(fmt) if t else _plain(fmt, f"Table {tid}: no matching run ({_needs(tid)})."))
    if iqm and counted:
        parts += [t.render(fmt) for t in iqm_table_object(runs, reps, seed)]
    skipped = skipped_list(runs, fmt)
    if skipped:
        parts.append(skipped)
    return "\n".join(parts)


def _plain(fmt, text):
    return f"% {text}\n" if fmt == "latex" else f"{text}\n"


def _needs(tid: str) -> str:
    seqs = ", ".join(sorted({s for s, _ in paper_lookup(tid)}))
    return {"1": f"Meta-World runs of a method on {seqs}",
            "5": f"Atari runs of a method on {seqs}",
            "3": f"NBSP runs with --identify on {seqs}",
            "4": f"NBSP runs with --apply-to on {seqs}"}.get(tid, f"NBSP ablation runs on {seqs}")


# ----------------------------------------------------------------------------------------------
# Command line

def output_paths(out: str, formats: list[str]) -> dict[str, str]:
    """{format: file} of --out: OUT itself for one format with an extension, else OUT.md / OUT.tex
    (a .md/.tex extension of OUT replaced)."""
    stem, ext = os.path.splitext(out)
    return {f: out if len(formats) == 1 and ext else (stem if ext in (".md", ".tex") else out)
            + (".md" if f == "markdown" else ".tex") for f in formats}


DESCRIPTION = """Result tables of NBSP runs beside the paper's own numbers (Tables 1-5, 9, 10), a generic table
of every setting, and rliable's IQM, from every metrics.json (with the config.json beside it) under
the given folders. Runs are grouped by their saved config, not their names; each cell is mean ±
standard error over seeds. Incomplete, diverged and duplicate runs are listed, not counted.

examples:
  python scripts/paper_tables.py runs/                             # every paper table with a matching run
  python scripts/paper_tables.py runs/ --table ablation --iqm      # Tables 2, 9, 10, 3, 4 and the IQM
  python scripts/paper_tables.py runs/ --format markdown latex --out results/tables   # .md and .tex"""
EPILOG = """--table: 1 2 3 4 5 9 10 are the paper's tables (printed when a run matches); ablation is 2 9 10 3 4;
paper is every one of them; all is one generic table of every distinct setting (any task sequence).
Without --table: the paper tables that have a matching run, or all when none does. How runs are
classified, grouped and laid out: the docstring at the top of scripts/paper_tables.py."""


class _Parser(Parser):
    def error(self, message):
        raise TablesError(message)


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("paths", nargs="+", help="folders holding runs/{run_name}/ (searched recursively), or metrics.json files")
    tables = parser.add_argument_group("tables")
    tables.add_argument("--table", nargs="+", metavar="T",
                        help=f"one or more of {', '.join(TABLE_CHOICES)} (default: the paper tables with a matching run)")
    tables.add_argument("--iqm", action="store_true", help="add rliable's interquartile mean with 95%% bootstrap CIs per setting")
    tables.add_argument("--reps", type=int, default=2000, help="bootstrap repetitions of --iqm")
    tables.add_argument("--seed", type=int, default=0, help="random seed of the --iqm bootstrap")
    output = parser.add_argument_group("output")
    output.add_argument("--format", nargs="+", default=["markdown"], metavar="F", help="markdown and/or latex")
    output.add_argument("--out", help="write here instead of stdout (OUT.md and/or OUT.tex when OUT has no extension)")
    return parser


def main(argv=None) -> int:
    parser = make_parser()
    try:
        args = parser.parse_args(argv)
        formats = list(dict.fromkeys(_fmt(f) for f in args.format))
        tables = expand_tables(args.table) if args.table else None
        if args.reps < 1:
            raise TablesError(f"--reps must be a positive integer, got {args.reps}")
        if not 0 <= args.seed < 2**32:
            raise TablesError(f"--seed must be in [0, 2**32), got {args.seed}")
        out_paths = output_paths(args.out, formats) if args.out else {}
        for path in out_paths.values():
            check_output("--out", path)
        runs = load_runs(args.paths)
    except (TablesError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not any(r.ok for r in runs):
        print(skipped_list(runs), end="", file=sys.stderr)
        print(f"error: none of the {len(runs)} runs under {', '.join(args.paths)} counts (listed above)",
              file=sys.stderr)
        return 1
    source = ", ".join(args.paths)
    outputs = {f: report(runs, tables, f, args.iqm, args.reps, args.seed, source=source) for f in formats}
    if not args.out:
        print("\n".join(outputs.values()), end="")
        return 0
    for f, text in outputs.items():
        path = out_paths[f]
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as fh:
            fh.write(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
