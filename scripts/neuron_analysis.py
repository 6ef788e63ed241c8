# General and specific RL skill neurons (paper Appendix C.5, Table 8), on a two-task run.
# Examples: `--help` (DESCRIPTION).
#
# Task A's skill neurons are the `selected` set of the checkpoint of the stage that trained A,
# task B's that of the stage that trained B (by default the latest such stages up to the
# evaluated one; --stage-a / --stage-b pick others). The actor of `--stage` (default: the last
# finished stage) is evaluated on both tasks with the training script's own evaluation (the
# deterministic policy, its fixed goal configurations, `eval_episodes` episodes as one batch of
# environments, the run's evaluation seed) four times: with the output of the intersection
# A∩B, of A−B, of B−A, and of no neuron forced to 0. "Forced to 0" is a forward hook on the
# neuron's activation module (its post-ReLU output), so nothing downstream sees it.
#
# The paper zeroes "the outputs of these neurons" without naming the network. Only the actor
# acts at evaluation (critics are never read by the deterministic policy), so `--network actor`
# is the one choice that can change a success rate; it is a flag so that the choice is explicit
# in the output.
#
# This module also holds what the figure script needs to bring a checkpoint back to life
# (`load_agent`, `make_envs`, `zero_neurons`).
import argparse
import contextlib
import json
import os
from dataclasses import fields

import numpy as np
import torch

import nbsp_sac_metaworld as mw
import skill_neurons as sn
from baselines import make_method
from cli import Parser, UsageError, check_device, check_output

DESCRIPTION = """General and specific skill neurons of a two-task NBSP run (paper Table 8): the actor of a stage
is evaluated on both tasks with the output of task A's and task B's skill neurons forced to 0 (their
intersection A∩B, A−B, B−A, none), each task's skill neurons being the selection of the stage that
trained it. Prints a Markdown table; --json also writes the numbers.

examples:
  python scripts/neuron_analysis.py runs/<run_name>                  # final actor
  python scripts/neuron_analysis.py runs/<run_name> --stage 2 --json table8.json"""
NETWORKS = ("actor",)  # see the header: the only network whose neurons the evaluated policy reads
CONDITIONS = ("intersection", "A_minus_B", "B_minus_A", "none")
EVAL_ENV_SEED_OFFSET = 10_000  # the training script's evaluation pool: make_env(task, seed + 10_000 + i)


class AnalysisError(Exception):
    """Unusable input; the command line prints it as one `error:` line and exits with 2."""


# ------------------------------------------------------------------------------------------
# Runs and checkpoints
# ------------------------------------------------------------------------------------------
def read_config(run_dir: str) -> dict:
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise AnalysisError(f"{run_dir!r} is not a run folder (no config.json); give runs/<run_name>")
    with open(path) as f:
        return json.load(f)


def finished_stages(run_dir: str) -> list[int]:
    folder = os.path.join(run_dir, "checkpoints")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted(int(n[len("stage_"):-len(".pt")]) for n in names
                  if n.startswith("stage_") and n.endswith(".pt") and n[len("stage_"):-len(".pt")].isdigit())


def load_stage(run_dir: str, stage: int) -> dict:
    """The checkpoint written after stage `stage` (1-based)."""
    path = os.path.join(run_dir, "checkpoints", f"stage_{stage}.pt")
    if not os.path.isfile(path):
        raise AnalysisError(f"{run_dir!r} has no checkpoint of stage {stage}; finished stages: "
                            f"{', '.join(map(str, finished_stages(run_dir))) or 'none'}")
    return torch.load(path, map_location="cpu", weights_only=True)


def run_args(config: dict) -> mw.Args:
    """The run's Args (fields this version of the script does not know are dropped)."""
    known = {f.name for f in fields(mw.Args)}
    return mw.Args(**{k: v for k, v in config["args"].items() if k in known})


def make_envs(task: str, args: mw.Args, count: int) -> list:
    """The training script's evaluation pool of `task` (same env seeds), `count` copies."""
    return [mw.make_env(task, args.seed + EVAL_ENV_SEED_OFFSET + i) for i in range(count)]


def load_agent(args: mw.Args, checkpoint: dict, env, device="cpu") -> tuple[mw.Actor, mw.TwinQNetwork]:
    """Actor and critics of a stage checkpoint, built as the training script builds them."""
    method = make_method(args)
    obs_dim, act_dim = int(np.prod(env.observation_space.shape)), int(np.prod(env.action_space.shape))
    actor = mw.Actor(obs_dim, act_dim, args.hidden, env.action_space.low, env.action_space.high,
                     method.hidden_activation).to(device)
    qf = mw.TwinQNetwork(obs_dim, act_dim, args.hidden, hidden_activation=method.hidden_activation).to(device)
    try:
        actor.load_state_dict(checkpoint["actor"])
        qf.load_state_dict(checkpoint["qf"])
    except RuntimeError as e:
        raise AnalysisError(f"the checkpoint does not fit the networks of --method {args.method} "
                            f"with --hidden {' '.join(map(str, args.hidden))}: {str(e).splitlines()[0]}") from e
    return actor.eval(), qf.eval()


def network_layers(name: str, actor: mw.Actor, qf: mw.TwinQNetwork) -> list[sn.HiddenLayer]:
    """Hidden layers of `actor`, `qf1` or `qf2`, in the order of the checkpoint's score vectors."""
    return {"actor": actor.hidden_layers, "qf1": lambda: qf.hidden_layers(0), "qf2": lambda: qf.hidden_layers(1)}[name]()


# ------------------------------------------------------------------------------------------
# Zeroing neurons
# ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def zero_neurons(layers, indices):
    """Force the post-activation output of the given neurons to 0 inside the block.

    `indices` count over the neurons of `layers` concatenated (the order of the checkpoint's
    `scores` and `selected`). A forward hook on each layer's activation module replaces its
    output, so the next layer and the heads read 0 for those neurons; for an ensemble layer
    only member `layer.member` is touched, for a convolution the whole channel."""
    indices = torch.as_tensor(indices, dtype=torch.long).flatten()
    total = sum(layer.num_neurons for layer in layers)
    if len(indices) and (indices.min() < 0 or indices.max() >= total):
        raise ValueError(f"neuron indices must be in [0, {total}), got {indices.tolist()}")
    handles, offset = [], 0
    try:
        for layer in layers:
            local = indices[(indices >= offset) & (indices < offset + layer.num_neurons)] - offset
            offset += layer.num_neurons
            if len(local):
                handles.append(layer.activation.register_forward_hook(_zero_hook(layer, local)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _zero_hook(layer: sn.HiddenLayer, local: torch.Tensor):
    def hook(_module, _inputs, output):
        zero = torch.zeros(output.shape, dtype=torch.bool, device=output.device)
        view = zero if layer.member is None else zero[layer.member]
        view[:, local.to(output.device)] = True  # neurons (channels) are dimension 1 of [B, N, ...]
        return output.masked_fill(zero, 0.0)

    return hook


# ------------------------------------------------------------------------------------------
# The analysis
# ------------------------------------------------------------------------------------------
def neuron_sets(selected_a: torch.Tensor, selected_b: torch.Tensor) -> dict[str, torch.Tensor]:
    """Index sets of the four conditions from the two boolean selections."""
    a, b = selected_a.bool(), selected_b.bool()
    return {"intersection": torch.nonzero(a & b).flatten(), "A_minus_B": torch.nonzero(a & ~b).flatten(),
            "B_minus_A": torch.nonzero(b & ~a).flatten(), "none": torch.zeros(0, dtype=torch.long)}


def latest_stage_of(task: str, stage_tasks: list[str], up_to: int) -> int | None:
    stages = [s for s in range(1, up_to + 1) if stage_tasks[s - 1] == task]
    return stages[-1] if stages else None


def analyse(run_dir: str, stage: int | None = None, network: str = "actor", tasks: list[str] | None = None,
            stage_a: int | None = None, stage_b: int | None = None, episodes: int | None = None,
            device: str = "cpu") -> dict:
    """Table 8 of one run: success of both tasks with each neuron set zeroed (see the header)."""
    if network not in NETWORKS:
        raise AnalysisError(f"--network must be one of {', '.join(NETWORKS)}, got {network!r}")
    config = read_config(run_dir)
    args, stage_tasks = run_args(config), config["stage_tasks"]
    done = finished_stages(run_dir)
    if not done:
        raise AnalysisError(f"{run_dir!r} has no stage checkpoints yet (checkpoints/stage_<i>.pt)")
    stage = done[-1] if stage is None else stage
    if stage not in done:
        raise AnalysisError(f"--stage must be a finished stage of the run: {', '.join(map(str, done))}; got {stage}")
    run_tasks = list(dict.fromkeys(stage_tasks))
    tasks = list(tasks) if tasks else run_tasks
    if len(tasks) != 2 or len(set(tasks)) != 2 or not set(tasks) <= set(run_tasks):
        raise AnalysisError(f"the analysis compares two tasks of the run; the run has {', '.join(run_tasks)}"
                            + ("" if tasks == run_tasks else f", asked for {', '.join(tasks)}") + "; pick two with --tasks A B")
    stages = {}
    for key, task, given in (("A", tasks[0], stage_a), ("B", tasks[1], stage_b)):
        stages[key] = latest_stage_of(task, stage_tasks, stage) if given is None else given
        if stages[key] is None:
            raise AnalysisError(f"task {task} is not trained by stage {stage}; evaluate a later --stage")
        if not 1 <= stages[key] <= len(stage_tasks) or stage_tasks[stages[key] - 1] != task:
            raise AnalysisError(f"--stage-{key.lower()} {stages[key]} is not a stage of task {task}; its stages: "
                                f"{', '.join(str(s + 1) for s, t in enumerate(stage_tasks) if t == task)}")
    selections = {}
    for key in ("A", "B"):
        selected = load_stage(run_dir, stages[key]).get("selected") or {}
        if network not in selected:
            what = ("has no skill neurons (a run of --method " + args.method + " identifies none)" if not selected
                    else f"has skill neurons of {', '.join(selected)} only (--apply-to {args.apply_to})")
            raise AnalysisError(f"the stage {stages[key]} checkpoint of {run_dir!r} {what}; "
                                f"the analysis needs the {network}'s selected neurons of an NBSP run")
        selections[key] = selected[network].bool()
    sets = neuron_sets(selections["A"], selections["B"])

    checkpoint = load_stage(run_dir, stage)
    episodes = args.eval_episodes if episodes is None else episodes
    envs = {task: make_envs(task, args, episodes) for task in tasks}
    actor, qf = load_agent(args, checkpoint, envs[tasks[0]][0], device)
    layers = network_layers(network, actor, qf)
    success = {}
    for task in tasks:
        success[task] = {}
        for condition in CONDITIONS:
            with zero_neurons(layers, sets[condition]):
                result = mw.rollout(envs[task], episodes, actor.deterministic_action, args.seed, torch.device(device),
                                    until_success=True)
            success[task][condition] = float(result["success"].mean())
        for env in envs[task]:
            env.close()
    return {"run_dir": run_dir, "run_name": config["run_name"], "method": args.method, "network": network,
            "stage": stage, "stage_task": stage_tasks[stage - 1], "episodes": episodes,
            "tasks": {"A": tasks[0], "B": tasks[1]}, "skill_stages": stages,
            "num_neurons": sum(layer.num_neurons for layer in layers),
            "sizes": {"A": int(selections["A"].sum()), "B": int(selections["B"].sum()),
                      **{c: len(sets[c]) for c in CONDITIONS if c != "none"}},
            "neurons": {c: sets[c].tolist() for c in CONDITIONS if c != "none"}, "success": success}


def markdown_table(result: dict) -> str:
    """Table 8's layout: a row per task, a column per zeroed set, plus the unzeroed reference."""
    a, b, n = result["tasks"]["A"], result["tasks"]["B"], result["sizes"]
    header = (f"Run {result['run_name']}: {result['network']} of stage {result['stage']} ({result['stage_task']}), "
              f"{result['episodes']} deterministic episodes per task.\n"
              f"A = {a}: {n['A']} skill neurons (stage {result['skill_stages']['A']}); "
              f"B = {b}: {n['B']} skill neurons (stage {result['skill_stages']['B']}); "
              f"of {result['num_neurons']} hidden neurons.\n")
    columns = [f"zero A∩B (n={n['intersection']})", f"zero A−B (n={n['A_minus_B']})",
               f"zero B−A (n={n['B_minus_A']})", "none zeroed"]
    lines = ["| task | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for task in (a, b):
        lines.append(f"| {task} | " + " | ".join(f"{result['success'][task][c]:.2f}" for c in CONDITIONS) + " |")
    return header + "\n" + "\n".join(lines)


def make_parser() -> argparse.ArgumentParser:
    parser = Parser(description=DESCRIPTION)
    parser.add_argument("run_dir", help="run folder runs/<run_name> with config.json and checkpoints/")
    which = parser.add_argument_group("which networks and neurons")
    which.add_argument("--stage", type=int, default=None, help="stage whose actor is evaluated (default: the last finished)")
    which.add_argument("--network", choices=NETWORKS, default="actor",
                       help="network whose skill neurons are zeroed (the policy reads only the actor)")
    which.add_argument("--tasks", nargs=2, metavar=("A", "B"), default=None,
                       help="the two tasks (default: the run's two tasks in order)")
    which.add_argument("--stage-a", type=int, default=None, help="stage whose selection is A's (default: the latest of A)")
    which.add_argument("--stage-b", type=int, default=None, help="stage whose selection is B's (default: the latest of B)")
    evaluation = parser.add_argument_group("evaluation and output")
    evaluation.add_argument("--episodes", type=int, default=None, help="episodes per task (default: the run's --eval-episodes)")
    evaluation.add_argument("--device", default="cpu", help="torch device of the actor: cpu, cuda or cuda:N")
    evaluation.add_argument("--json", default=None, help="also write the result (success, set sizes, neuron indices) here")
    return parser


def main(argv=None) -> dict:
    parser = make_parser()
    options = parser.parse_args(argv)
    try:
        if options.episodes is not None and options.episodes <= 0:
            raise AnalysisError(f"--episodes must be a positive integer, got {options.episodes}")
        check_device("--device", options.device)
        if options.json:
            check_output("--json", options.json)
        result = analyse(options.run_dir.rstrip("/"), options.stage, options.network, options.tasks,
                         options.stage_a, options.stage_b, options.episodes, options.device)
    except (AnalysisError, UsageError) as e:
        parser.exit(2, f"error: {e}\n")
    print(markdown_table(result))
    if options.json:
        os.makedirs(os.path.dirname(os.path.abspath(options.json)), exist_ok=True)
        with open(options.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
