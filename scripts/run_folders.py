"""Run folders as the training scripts write them (`runs/{run_name}/` with config.json, metrics.json,
checkpoints and TensorBoard events): where they are, what they hold, and the training scripts' flag
defaults. The one reader of run folders of the tables, figures, sweep and report scripts.

    find(paths)            run folders: each path a run folder or a folder of run folders
    complete_runs(paths)   the same, only the runs whose metrics.json says "complete"
    runs_in(runs_dir)      the readable run folders directly in a --runs-dir (sweep's resume/skip)
    metrics_files(paths)   every metrics.json under the paths, searched recursively (the tables)
    check_shape(path, config, metrics)  RunFolderError naming the file and field of a wrong-shaped file
    script_defaults(name)  every flag's default of the training script of "metaworld" or "atari"
"""

from __future__ import annotations

import ast
import json
import math
import os
from dataclasses import dataclass
from functools import cache

import numpy as np

import baselines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"metaworld": "nbsp_sac_metaworld.py", "atari": "nbsp_sac_atari.py"}


class RunFolderError(Exception):
    """No run folder where one was expected; the scripts print it as one `error:` line."""


def read_json(path: str):
    """The JSON in `path` (OSError when missing, ValueError when not JSON)."""
    with open(path) as f:
        return json.load(f)


@dataclass
class RunFolder:
    path: str
    config: dict             # config.json: {"run_name", "args", "stage_tasks", ...}
    metrics: dict | None     # metrics.json, None before the first stage ends

    @classmethod
    def read(cls, path: str) -> RunFolder:
        """The folder's config.json and, when there is one, its metrics.json (RunFolderError when one
        is unreadable or not of the shape the training scripts write)."""
        metrics_path = os.path.join(path, "metrics.json")
        try:
            config = read_json(os.path.join(path, "config.json"))
            metrics = read_json(metrics_path) if os.path.isfile(metrics_path) else None
        except (OSError, ValueError) as e:
            raise RunFolderError(f"{path}: unreadable config.json or metrics.json ({e})") from None
        check_shape(path, config, metrics)
        return cls(path, config, metrics)

    @property
    def args(self) -> dict:
        return self.config["args"]

    @property
    def complete(self) -> bool:
        """metrics.json says the run finished every stage."""
        return isinstance(self.metrics, dict) and self.metrics.get("complete") is True

    def benchmark(self) -> str:
        """"atari" or "metaworld": the training script that wrote the run."""
        return "atari" if "games" in self.args or (isinstance(self.metrics, dict) and "AR" in self.metrics) else "metaworld"

    def tasks(self) -> tuple:
        """The task list of --tasks / --games as given (one cycle), without Meta-World's "-v3"."""
        return tuple(t.removesuffix("-v3") for t in self.args.get("games") or self.args.get("tasks") or [])

    @property
    def stage_tasks(self) -> list[str]:
        """The task of every stage, all cycles."""
        return (self.metrics or {}).get("stage_tasks") or self.config.get("stage_tasks") or []

    def sequence(self) -> tuple:
        """The tasks of one cycle, as trained (from the stages when they are recorded)."""
        stages = self.stage_tasks
        if not stages:
            return self.tasks()
        cycles = int(self.args.get("cycles", script_defaults(self.benchmark()).get("cycles", 1)) or 1)
        return tuple(stages[: max(len(stages) // cycles, 1)])

    def boundaries(self) -> list[int]:
        """Global steps at which the finished stages ended (cumulative `env_steps`)."""
        stages = (self.metrics or {}).get("stages", [])
        return np.cumsum([s["env_steps"] for s in stages]).astype(int).tolist()

    def inner_boundaries(self) -> list[int]:
        """The boundaries between stages (the end of the last stage of a finished run left out)."""
        ends = self.boundaries()
        return ends[:-1] if len(ends) == len(self.stage_tasks) else ends

    def stage_lengths(self) -> list[int]:
        """Steps of every stage: finished ones as run, the others their budget."""
        done = [s["env_steps"] for s in (self.metrics or {}).get("stages", [])]
        return done + [self.args["steps_per_task"]] * (len(self.stage_tasks) - len(done))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _whole(value, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _words(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def check_shape(path: str, config, metrics) -> None:
    """Raise RunFolderError naming the file and the field where config.json or metrics.json (None
    when absent) is not of the shape the training scripts write (an edited or foreign file)."""
    def refuse(name, field, valid, value):
        raise RunFolderError(f"{os.path.join(path, name)}: {field} must be {valid}, got {json.dumps(value)[:60]}")

    if not isinstance(config, dict):
        refuse("config.json", "the file", "an object with run_name, args and stage_tasks", config)
    args = config.get("args")
    if not isinstance(args, dict):
        refuse("config.json", '"args"', "an object of the run's flags", args)
    for name, least in (("cycles", 1), ("seed", 0), ("steps_per_task", 1)):
        if name in args and not _whole(args[name], least):
            refuse("config.json", f'args "{name}"', f"an integer >= {least}", args[name])
    for name in ("tasks", "games"):
        if args.get(name) is not None and not _words(args[name]):
            refuse("config.json", f'args "{name}"', "a list of names", args[name])
    if "stage_tasks" in config and not _words(config["stage_tasks"]):
        refuse("config.json", '"stage_tasks"', "a list of task names", config["stage_tasks"])
    if metrics is None:
        return
    if not isinstance(metrics, dict):
        refuse("metrics.json", "the file", "an object with stage_tasks, sr, stages, complete and the metrics", metrics)
    for name in ("ASR", "AR", "FM", "FWT"):
        if metrics.get(name) is not None and not _number(metrics[name]):
            refuse("metrics.json", f'"{name}"', "a finite number or null", metrics[name])
    if "complete" in metrics and not isinstance(metrics["complete"], bool):
        refuse("metrics.json", '"complete"', "true or false", metrics["complete"])
    diverged = metrics.get("diverged")
    if diverged is not None and not (isinstance(diverged, dict) and {"stage", "global_step", "quantity"} <= set(diverged)):
        refuse("metrics.json", '"diverged"', "null or an object with stage, global_step and quantity", diverged)
    if "stage_tasks" in metrics and not _words(metrics["stage_tasks"]):
        refuse("metrics.json", '"stage_tasks"', "a list of task names", metrics["stage_tasks"])
    stages = metrics.get("stages", [])
    if not (isinstance(stages, list) and all(isinstance(s, dict) and _whole(s.get("env_steps", 0), 0) for s in stages)):
        refuse("metrics.json", '"stages"', "a list of objects (env_steps an integer)", stages)
    sr = metrics.get("sr", [])
    if not (isinstance(sr, list) and all(isinstance(row, list) and all(v is None or _number(v) for v in row) for row in sr)):
        refuse("metrics.json", '"sr"', "a matrix (list of lists) of finite numbers or null", sr)


# ----------------------------------------------------------------------------------------------
# Finding run folders

def run_dirs(paths) -> list[str]:
    """Run folders among `paths`: each a run folder (with config.json) or a folder whose
    sub-folders are runs."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    found = []
    for path in paths:
        path = str(path).rstrip("/")
        if os.path.isfile(os.path.join(path, "config.json")):
            found.append(path)
        elif os.path.isdir(path):
            found += sorted(os.path.join(path, d) for d in os.listdir(path)
                            if os.path.isfile(os.path.join(path, d, "config.json")))
        elif os.path.exists(path):
            raise RunFolderError(f"{path!r} is a file; give a run folder (with config.json) or a folder of run folders")
        else:
            raise RunFolderError(f"{path!r} does not exist")
    if not found:
        raise RunFolderError(f"no run folders (with config.json) in {', '.join(map(str, paths))}")
    return list(dict.fromkeys(found))


def find(paths) -> list[RunFolder]:
    """The run folders among `paths` (see run_dirs), read."""
    return [RunFolder.read(path) for path in run_dirs(paths)]


def complete_runs(paths) -> list[RunFolder]:
    """The run folders among `paths` whose metrics.json says "complete"."""
    return [run for run in find(paths) if run.complete]


def runs_in(runs_dir: str) -> list[RunFolder]:
    """The run folders directly in `runs_dir`, by name (none when it does not exist); a folder
    without a readable config.json holding the args is not a run, an unreadable metrics.json
    counts as none."""
    runs = []
    for name in sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []:
        path = os.path.join(runs_dir, name)
        try:
            config = read_json(os.path.join(path, "config.json"))
        except (OSError, ValueError):
            continue
        if not isinstance(config, dict) or "args" not in config:
            continue
        try:
            metrics = read_json(os.path.join(path, "metrics.json"))
        except (OSError, ValueError):
            metrics = None
        runs.append(RunFolder(path, config, metrics))
    return runs


def metrics_files(paths) -> list[str]:
    """Every metrics.json under `paths` (folders, searched recursively, or metrics.json files),
    absolute and once each."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = []
    for p in map(str, paths):
        if os.path.isfile(p) and os.path.basename(p) == "metrics.json":
            files.append(p)
            continue
        if not os.path.isdir(p):
            raise RunFolderError(f"no such folder {p!r}; give folders holding runs/{{run_name}}/metrics.json")
        found = [os.path.join(d, "metrics.json") for d, _, names in os.walk(p) if "metrics.json" in names]
        if not found:
            raise RunFolderError(f"no metrics.json under {p!r}; give folders holding runs/{{run_name}}/ folders "
                                 "with config.json and metrics.json (as the training scripts write them)")
        files += sorted(found)
    return list(dict.fromkeys(os.path.abspath(f) for f in files))


# ----------------------------------------------------------------------------------------------
# The training scripts' flag defaults (paper Table 6), read from their source: importing a
# training script loads torch, Meta-World or ALE (seconds) only to read constants

@cache
def script_defaults(benchmark: str) -> dict:
    """Every flag's default of the training script of `benchmark` ("metaworld" | "atari"), as
    `dataclasses.asdict(Args())` gives it: the fields of the topic classes that its `Args` derives
    from (`RunArgs`, ..., `MethodArgs`), then every method's flags (added by `baselines.with_method_flags`)."""
    path = os.path.join(ROOT, SCRIPTS[benchmark])
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    args_class = classes["Args"]
    topics = [classes[base.id] for base in reversed(args_class.bases)]  # dataclass field order: the last base first
    defaults = {node.target.id: _default(node.value, path) for cls in (*topics, args_class) for node in cls.body
                if isinstance(node, ast.AnnAssign) and node.value is not None}
    if "baselines.with_method_flags" in map(ast.unparse, args_class.decorator_list):
        defaults |= {flag.name: flag.default for flag in baselines.method_flags().values()}
    return defaults


def _default(node: ast.expr, path: str):
    """One Args default: a literal, `field(default=...)`, `field(default_factory=lambda: literal)`
    or `list`/`dict`, or the script's own name (the exp_name default)."""
    if isinstance(node, ast.Call) and ast.unparse(node.func) == "field":
        keywords = {k.arg: k.value for k in node.keywords}
        if "default" in keywords:
            return _default(keywords["default"], path)
        factory = keywords.get("default_factory")
        if isinstance(factory, ast.Lambda):
            return ast.literal_eval(factory.body)
        if isinstance(factory, ast.Name) and factory.id in ("list", "dict"):
            return {"list": [], "dict": {}}[factory.id]
    if ast.unparse(node) == "os.path.basename(__file__)[:-len('.py')]":
        return os.path.basename(path)[: -len(".py")]
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise ValueError(f"{path}: the Args default {ast.unparse(node)!r} is not one that script_defaults reads "
                         "(a literal, field(default_factory=lambda: literal), the script's name)") from None
