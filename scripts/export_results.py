"""Copies the finished runs of a runs folder into a folder small enough to commit (results/NAME/),
from which the tables, figures and reports can be rebuilt without the run folders: per run its
config.json, metrics.json, the sweep's log of the run as console.log (when there is one) and
scalars.json, the TensorBoard scalars the reports and figures read (`eval/...`, `plasticity/...`;
figures.read_scalars reads it where a folder has no events). Checkpoints and events stay behind.
Absolute paths become relative: the runs folder becomes --runs-dir-as, an interpreter and a
training script's path become `python nbsp_sac_*.py`. Unfinished runs are skipped and named;
running it again refreshes what it wrote.

examples:
  python scripts/export_results.py runs/regime results/regime
  python scripts/export_results.py /scratch/me/runs/regime results/regime --runs-dir-as runs/regime
"""

import json
import os
import re
import sys

import cli
from cli import UsageError
from figures import SCALARS_FILE, read_scalars
from run_folders import RunFolderError, find

EXPORTED_SCALARS = re.compile(r"(eval|plasticity)/.+")
SCRIPT_CALL = re.compile(r"\S*python[\d.]*\s+\S*/(nbsp_sac_(?:metaworld|atari)\.py)")


def relative(text: str, runs_dir: str, runs_dir_as: str) -> str:
    """`text` with the runs folder's absolute path as `runs_dir_as` and interpreter + script paths as
    `python nbsp_sac_*.py`."""
    return SCRIPT_CALL.sub(r"python \1", text.replace(os.path.abspath(runs_dir), runs_dir_as))


def export(runs_dir: str, out_dir: str, runs_dir_as: str, log_dir: str) -> tuple[list[str], list[str]]:
    """Exports the complete runs of `runs_dir` into `out_dir`; returns (exported, skipped) run names."""
    exported, skipped = [], []
    for run in find([runs_dir]):
        name = os.path.basename(run.path)
        if not run.complete:
            skipped.append(name)
            continue
        target = os.path.join(out_dir, name)
        os.makedirs(target, exist_ok=True)
        for file in ("config.json", "metrics.json"):
            with open(os.path.join(run.path, file)) as f:
                text = relative(f.read(), runs_dir, runs_dir_as)
            with open(os.path.join(target, file), "w") as f:
                f.write(text)
        label = f"{'+'.join(run.tasks())}__{run.args['exp_name']}__{run.args['seed']}"  # the sweep's name of its log
        log = os.path.join(log_dir, label + ".log")
        if os.path.isfile(log):
            with open(log) as f:
                text = relative(f.read(), runs_dir, runs_dir_as)
            with open(os.path.join(target, "console.log"), "w") as f:
                f.write(text)
        scalars = {tag: [[int(step), float(value)] for step, value in zip(*curve)]
                   for tag, curve in read_scalars(run.path, EXPORTED_SCALARS).items()}
        with open(os.path.join(target, SCALARS_FILE), "w") as f:
            json.dump(scalars, f, separators=(",", ":"))
        exported.append(name)
    return exported, skipped


def make_parser() -> cli.Parser:
    parser = cli.Parser(description=__doc__)
    parser.add_argument("runs_dir", help="folder of run folders (a sweep's --runs-dir)")
    parser.add_argument("out_dir", help="where the runs' small files go, a folder per run (e.g. results/NAME)")
    parser.add_argument("--runs-dir-as", default=None,
                        help="what the runs folder's path becomes in the copied files (default: runs/ + OUT_DIR's name)")
    parser.add_argument("--log-dir", default=None, help="the sweep's logs of the runs (default: RUNS_DIR/sweep_logs)")
    return parser


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    try:
        if not os.path.isdir(args.runs_dir):
            raise UsageError(f"runs_dir {args.runs_dir!r} is not a folder")
        cli.check_folder("out_dir", args.out_dir)
        runs_dir_as = args.runs_dir_as or "runs/" + os.path.basename(os.path.normpath(args.out_dir))
        log_dir = args.log_dir or os.path.join(args.runs_dir, "sweep_logs")
        exported, skipped = export(args.runs_dir, args.out_dir, runs_dir_as, log_dir)
    except (UsageError, RunFolderError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {len(exported)} complete runs to {args.out_dir}" +
          (f"; skipped {len(skipped)} unfinished: {', '.join(skipped)}" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
