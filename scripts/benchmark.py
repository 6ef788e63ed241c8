# Speed of the project's SAC update against the fixed CleanRL-style reference, on one machine,
# from one process and the same inputs: updates/s at paper size and over widths x batches, the
# fraction of the machine's dense matmul throughput the update reaches, end-to-end env steps/s
# and peak memory of the training script (with --compile: also the eager script and the compile
# warm-up), and (GPU) concurrent runs on one card.
# Examples: `--help` (DESCRIPTION).
#
# One "update" is what the training loop does per env step after learning starts: the
# project's `SACLearner.update` with NBSP masks installed on every hidden layer and every
# `replay_interval`-th batch drawn from Dpre, versus `CleanRLSAC.update` with the batch from D.
# Reference and project blocks alternate, so machine noise hits both alike; read the ratios.
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields, replace
from typing import Annotated

import numpy as np
import torch
import tyro

import nbsp_sac_metaworld as nbsp
import skill_neurons as sn
import nbsp_sac_atari as atari
from baselines import METHODS, make_method
from cleanrl_reference import CleanRLSAC, CleanRLSACAtari

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OBS_DIM, ACT_DIM = 39, 4  # Meta-World v3 observation and action sizes
ATARI_ACTIONS = 18  # the full ALE action space
PAPER_HIDDEN, PAPER_BATCH = [768, 768, 768], 256
SKILL_RATIO, MASK_RANGE = 0.2, (0.02, 0.1)  # Eq. 7 masks: alpha * (1 - score), alpha 0.2, score 0.5-0.9


@dataclass
class Measurement:
    """how and where everything is measured"""

    device: str = "cpu"
    """device of the update benchmark and of the training runs (`cpu`, `cuda` or `cuda:N`)"""
    compile: bool = False
    """torch.compile the project's update (CPU and GPU); the reference stays eager"""
    cudagraphs: bool = False
    """also replay the project's compiled update as CUDA graphs (GPU only)"""
    seed: int = 1
    """seed of the networks, masks and replay rows"""
    quick: bool = False
    """tiny table, few updates, short end-to-end run at a small width: a smoke test, not a measurement"""


@dataclass
class PaperSizeUpdate:
    """the update at paper size (hidden 768 768 768, batch 256), project against the reference"""

    rounds: int = 10
    """interleaved rounds (reference block, project block) at paper size; medians are reported"""
    updates_per_block: int | None = None
    """updates per timed block at paper size, rounded up to even (None: 10 on CPU, 200 on GPU)"""
    warmup: int | None = None
    """untimed updates of each side before timing (None: 4; 20 with --compile or --cudagraphs)"""
    buffer_rows: int = 100_000
    """random rows in each of D and Dpre for the update benchmark"""
    matmul_size: int | None = None
    """side of the square float32 matmul measuring dense throughput (None: 2048 on CPU, 8192 on GPU)"""


@dataclass
class SizeTable:
    """the widths x batches table"""

    table: bool = True
    """measure the widths x batches table"""
    widths: list[int] = field(default_factory=lambda: [256, 768, 1024])
    """hidden widths of the table (3 hidden layers)"""
    batches: list[int] = field(default_factory=lambda: [64, 256, 1024])
    """batch sizes of the table"""
    table_rounds: int = 4
    """interleaved rounds per table cell"""


@dataclass
class EndToEnd:
    """the training script end to end (a subprocess) against the CleanRL-style loop, and concurrent runs"""

    e2e: bool = True
    """measure the training script end to end (a subprocess) and the CleanRL-style loop"""
    e2e_task: str = "reach"
    """Meta-World task of the end-to-end runs"""
    e2e_hidden: list[int] = field(default_factory=lambda: list(PAPER_HIDDEN))
    """hidden widths of the end-to-end runs"""
    e2e_batch: int = PAPER_BATCH
    """batch size of the end-to-end runs (the `mini` sweep preset: --e2e-hidden 128 128 --e2e-batch 128)"""
    e2e_learning_starts: int = 300
    """random-action steps before learning starts in the end-to-end runs"""
    e2e_steps: int = 500
    """env steps with an update after learning starts (SPS is logged every 100; more than 100)"""
    ref_loop_steps: int | None = None
    """env steps of the CleanRL-style loop, half before and half after the run (None: 100 on CPU, 1000 on GPU)"""
    concurrent: list[int] | None = None
    """numbers of training runs started at once on the device (None: 1 2 4 on GPU, none on CPU)"""


@dataclass
class AtariUpdate:
    """the Atari update at paper size against CleanRL's sac_atari.py"""

    atari: bool = True
    """measure the Atari update at paper size (conv 32 64 64, hidden 768 768, batch 64) against CleanRL's sac_atari.py"""
    atari_rounds: int = 3
    """interleaved rounds of the Atari update"""
    atari_updates_per_block: int | None = None
    """Atari updates per timed block (None: 2 on CPU, 50 on GPU)"""


@dataclass
class MethodCost:
    """the update cost of every method against plain SAC"""

    methods: list[str] = field(default_factory=lambda: list(METHODS))
    """methods whose Meta-World update cost is compared with `sac` (empty: skip)"""
    method_hidden: list[int] = field(default_factory=lambda: [256, 256, 256])
    """hidden widths of the method comparison"""
    method_rounds: int = 3
    """interleaved rounds of the method comparison (every method once per round)"""
    method_updates_per_block: int = 20
    """updates per method and round"""


@dataclass
class Args(MethodCost, AtariUpdate, EndToEnd, SizeTable, PaperSizeUpdate, Measurement):
    """Every flag of the benchmark, as one object (the groups above are its --help topics)."""


@dataclass
class CommandLine:
    """The flags by topic; flag names without a group prefix."""

    measurement: Annotated[Measurement, tyro.conf.OmitArgPrefixes] = field(default_factory=Measurement)
    paper_size_update: Annotated[PaperSizeUpdate, tyro.conf.OmitArgPrefixes] = field(default_factory=PaperSizeUpdate)
    size_table: Annotated[SizeTable, tyro.conf.OmitArgPrefixes] = field(default_factory=SizeTable)
    end_to_end: Annotated[EndToEnd, tyro.conf.OmitArgPrefixes] = field(default_factory=EndToEnd)
    atari_update: Annotated[AtariUpdate, tyro.conf.OmitArgPrefixes] = field(default_factory=AtariUpdate)
    method_cost: Annotated[MethodCost, tyro.conf.OmitArgPrefixes] = field(default_factory=MethodCost)

    def args(self) -> Args:
        return Args(**{f.name: getattr(group, f.name) for group in vars(self).values() for f in fields(group)})


QUICK = dict(rounds=2, updates_per_block=2, warmup=1, buffer_rows=2_000, matmul_size=256, widths=[32, 64],
             batches=[16, 64], table_rounds=2, e2e_hidden=[64, 64, 64], e2e_learning_starts=20, e2e_steps=101,
             ref_loop_steps=10, atari_rounds=1, method_hidden=[32, 32], method_rounds=1, method_updates_per_block=4)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def resolve(args: Args) -> Args:
    """Apply --quick to the fields left at their defaults, validate, fill the device defaults."""
    defaults = Args()
    if args.quick:
        args = replace(args, **{k: v for k, v in QUICK.items() if getattr(args, k) == getattr(defaults, k)})
    if not (args.device == "cpu" or args.device == "cuda" or args.device.startswith("cuda:")):
        fail(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    cuda = args.device.startswith("cuda")
    if args.cudagraphs and not cuda:
        fail("--cudagraphs needs a CUDA device")
    if cuda and not torch.cuda.is_available():
        fail(f"--device {args.device} needs a CUDA device; none is available")
    for name in ("rounds", "buffer_rows", "table_rounds", "e2e_learning_starts", "e2e_batch", "atari_rounds"):
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    for name in ("updates_per_block", "warmup", "matmul_size", "ref_loop_steps", "atari_updates_per_block"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            kind = "a non-negative" if name == "warmup" else "a positive"
            fail(f"--{name.replace('_', '-')} must be {kind} integer, got {value}")
    if args.e2e_steps <= 100:
        fail(f"--e2e-steps must be more than 100 (SPS is logged every 100 updates), got {args.e2e_steps}")
    for name in ("widths", "batches", "e2e_hidden"):
        if not getattr(args, name) or min(getattr(args, name)) <= 0:
            fail(f"--{name.replace('_', '-')} needs one or more positive integers, got {getattr(args, name)}")
    if args.concurrent is not None and (not args.concurrent or min(args.concurrent) <= 0):
        fail(f"--concurrent needs one or more positive run counts, got {args.concurrent}")
    if args.e2e_task.removesuffix("-v3") not in nbsp.TASK_NAMES:
        fail(f"unknown task {args.e2e_task!r}; valid Meta-World v3 tasks: {' '.join(nbsp.TASK_NAMES)}")
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        fail(f"unknown --methods {' '.join(unknown)}; valid: {' '.join(METHODS)}")
    for name in ("method_rounds", "method_updates_per_block"):
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if not args.method_hidden or min(args.method_hidden) <= 0:
        fail(f"--method-hidden needs one or more positive integers, got {args.method_hidden}")
    compiled = args.compile or args.cudagraphs
    updates = args.updates_per_block or (200 if cuda else 10)
    return replace(args, updates_per_block=updates + updates % 2,  # even: same actor-step mix per block
                   warmup=args.warmup if args.warmup is not None else (20 if compiled else 4),
                   matmul_size=args.matmul_size or (8192 if cuda else 2048),
                   ref_loop_steps=args.ref_loop_steps or (1000 if cuda else 100),
                   atari_updates_per_block=args.atari_updates_per_block or (50 if cuda else 2),
                   concurrent=args.concurrent if args.concurrent is not None else ([1, 2, 4] if cuda else []))


# ------------------------------------------------------------------------------------------
# The two update paths, on the same replay rows
# ------------------------------------------------------------------------------------------
def filled_buffer(rows: int, device, generator) -> nbsp.ReplayBuffer:
    buffer = nbsp.ReplayBuffer(rows, OBS_DIM, ACT_DIM, device)
    data = torch.randn(rows, 2 * OBS_DIM + ACT_DIM + 2, generator=generator)
    data[:, OBS_DIM : OBS_DIM + ACT_DIM].uniform_(-1, 1, generator=generator)  # actions in the box
    data[:, -1] = 0.0  # Meta-World never terminates
    buffer.extend(data.to(device))
    return buffer


def random_neuron_masks(layers, generator) -> list[torch.Tensor]:
    """Eq. 7-style masks: a random SKILL_RATIO of the network's hidden neurons get a value in
    MASK_RANGE, the others 1."""
    total = sum(layer.num_neurons for layer in layers)
    selected = sn.select_top(torch.rand(total, generator=generator), SKILL_RATIO)
    low, high = MASK_RANGE
    values = torch.where(selected, low + (high - low) * torch.rand(total, generator=generator), torch.ones(total))
    return sn.split_by_layer(values, layers)


class ProjectPath:
    """`SACLearner.update` as the training loop calls it after learning starts, masks on."""

    def __init__(self, hidden, batch, device, args: Args, D, Dpre, generator):
        self.config = nbsp.Args(hidden=list(hidden), batch_size=batch)
        self.learner = nbsp.SACLearner(OBS_DIM, ACT_DIM, -np.ones(ACT_DIM), np.ones(ACT_DIM), self.config, device,
                                       compile=args.compile, cudagraphs=args.cudagraphs)
        actor_layers = self.learner.actor.hidden_layers()
        q_layers = self.learner.qf.hidden_layers(0), self.learner.qf.hidden_layers(1)
        self.learner.actor_mask.set(sn.parameter_masks(actor_layers, random_neuron_masks(actor_layers, generator)))
        q_masks = random_neuron_masks(q_layers[0], generator) + random_neuron_masks(q_layers[1], generator)
        self.learner.q_mask.set(sn.parameter_masks(q_layers[0] + q_layers[1], q_masks))
        self.D, self.Dpre, self.batch, self.index = D, Dpre, batch, 0

    def step(self):
        i, c = self.index, self.config
        self.index += 1
        data = (self.Dpre if i % c.replay_interval == 0 else self.D).sample(self.batch)
        self.learner.update(data, update_policy=i % c.policy_frequency == 0,
                            update_target=i % c.target_network_frequency == 0)


class ReferencePath:
    """`CleanRLSAC.update`, the batch from D."""

    def __init__(self, hidden, batch, device, D):
        self.sac = CleanRLSAC(OBS_DIM, ACT_DIM, list(hidden), device)
        self.D, self.batch, self.index = D, batch, 0

    def step(self):
        self.sac.update(self.index, *self.D.sample(self.batch))
        self.index += 1


class AtariProjectPath:
    """The Atari `SACLearner.update` as its training loop calls it (every 4th env step), masks on
    every conv channel and fully connected neuron, every `replay_interval`-th batch from Dpre."""

    def __init__(self, config, device, args: Args, D, Dpre, generator):
        self.config = config
        self.learner = atari.SACLearner(ATARI_ACTIONS, config, device, compile=args.compile, cudagraphs=args.cudagraphs)
        actor_layers = self.learner.actor.hidden_layers()
        q_layers = self.learner.qf1.hidden_layers() + self.learner.qf2.hidden_layers()
        self.learner.actor_mask.set(sn.parameter_masks(actor_layers, random_neuron_masks(actor_layers, generator)))
        q_masks = random_neuron_masks(self.learner.qf1.hidden_layers(), generator) + random_neuron_masks(
            self.learner.qf2.hidden_layers(), generator)
        self.learner.q_mask.set(sn.parameter_masks(q_layers, q_masks))
        self.D, self.Dpre, self.index = D, Dpre, 0

    def step(self):
        i, c = self.index, self.config
        self.index += 1
        data = (self.Dpre if i % c.replay_interval == 0 else self.D).sample(c.batch_size)
        self.learner.update(data, update_policy=True, update_target=i % c.target_network_frequency == 0)


class AtariReferencePath:
    """`CleanRLSACAtari.update`, the batch from D."""

    def __init__(self, config, device, D):
        self.sac = CleanRLSACAtari(ATARI_ACTIONS, config.conv_channels, config.hidden, device)
        self.config, self.D, self.index = config, D, 0

    def step(self):
        self.sac.update(*self.D.sample(self.config.batch_size), update_target=self.index % self.config.target_network_frequency == 0)
        self.index += 1


class MethodPath:
    """The Meta-World update of one `--method` in the second task of a run: its task switch has
    happened (Fishers, anchors, injected heads, prompts), so every per-update cost is on. NBSP gets
    masks on every hidden layer and Dpre batches, as `ProjectPath`."""

    def __init__(self, method, hidden, batch, device, D, Dpre, generator):
        self.config = nbsp.Args(method=method, hidden=list(hidden), batch_size=batch, fisher_batches=2)
        if method == "nbsp":
            self.path = ProjectPath(hidden, batch, device, Args(), D, Dpre, generator)
            self.step = self.path.step
            return
        self.method = make_method(self.config)
        self.learner = nbsp.SACLearner(OBS_DIM, ACT_DIM, -np.ones(ACT_DIM), np.ones(ACT_DIM), self.config, device,
                                       method=self.method)
        self.method.setup(self.learner)
        self.method.begin_stage(0, "task-a")
        self.method.end_stage(0, "task-a", D)
        self.method.begin_stage(1, "task-b")
        self.D, self.batch, self.index = D, batch, 0

    def step(self):
        i, c = self.index, self.config
        self.index += 1
        data = self.D.sample(self.batch)
        update_policy, update_target = i % c.policy_frequency == 0, i % c.target_network_frequency == 0
        self.learner.update(data, update_policy, update_target)
        self.method.after_update(data, update_policy, update_target)


def method_costs(methods, hidden, batch, device, D, Dpre, generator, updates, rounds, sync) -> dict[str, float]:
    """Median updates/s of every method, the methods interleaved within each round."""
    paths = {m: MethodPath(m, hidden, batch, device, D, Dpre, generator) for m in methods}
    rates = {m: [] for m in methods}
    for path in paths.values():
        path.step()  # warm-up
    for _ in range(rounds):
        for name, path in paths.items():
            sync()
            start = time.perf_counter()
            for _ in range(updates):
                path.step()
            sync()
            rates[name].append(updates / (time.perf_counter() - start))
    return {m: statistics.median(r) for m, r in rates.items()}


def filled_atari_buffer(transitions, device, seed):
    buffer = atari.ReplayBuffer(transitions, device)
    rng = np.random.default_rng(seed)
    stack = rng.integers(0, 256, (4, 84, 84), dtype=np.uint8)
    for i in range(transitions):
        next_stack = np.concatenate([stack[1:], rng.integers(0, 256, (1, 84, 84), dtype=np.uint8)])
        buffer.add(stack, rng.integers(ATARI_ACTIONS), float(rng.normal()), next_stack, i % 500 == 499)
        stack = next_stack
    return buffer


def synchronizer(device):
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def interleaved(reference, project, updates, rounds, warmup, sync, between=None):
    """Warm up both, then `rounds` of (reference block, project block); updates/s per block, and
    the seconds of the project's warm-up updates (with --compile: the compilation)."""
    warmup_seconds = 0.0
    for _ in range(warmup):
        reference.step()
        sync()
        start = time.perf_counter()
        project.step()
        sync()
        warmup_seconds += time.perf_counter() - start
    rates = {"reference": [], "project": [], "warmup_seconds": warmup_seconds}
    for _ in range(rounds):
        for name, path in (("reference", reference), ("project", project)):
            start = time.perf_counter()
            for _ in range(updates):
                path.step()
            sync()
            rates[name].append(updates / (time.perf_counter() - start))
        if between is not None:
            between()
    return rates


# ------------------------------------------------------------------------------------------
# FLOPs and the physical limit
# ------------------------------------------------------------------------------------------
def update_flops(hidden, batch) -> dict[str, float]:
    """Matmul FLOPs of one update per env step (2 * batch * in * out per linear forward; a
    backward costs that again for weight grads and again for input grads).

    Critic step: actor forward on next_obs, target twin forward, twin forward + backward (weight
    grads, input grads except the first layer's). Actor steps (policy_frequency of them every
    policy_frequency env steps, so one per env step): actor forward + backward, twin forward +
    input-grad backward (the project takes no critic weight grads there; CleanRL does), actor
    forward for the alpha loss."""
    def forward(dims, heads):
        layers = list(zip(dims[:-1], dims[1:])) + heads
        return sum(2.0 * batch * i * o for i, o in layers), 2.0 * batch * dims[0] * dims[1]

    actor, actor_first = forward([OBS_DIM, *hidden], [(hidden[-1], ACT_DIM)] * 2)  # mean and log-std heads
    q, q_first = forward([OBS_DIM + ACT_DIM, *hidden, 1], [])
    twin = 2 * q
    critic = actor + twin + twin + twin + (twin - 2 * q_first)
    actor_step = actor + actor + (actor - actor_first) + twin + twin + actor
    return {"project": critic + actor_step, "reference": critic + actor_step + twin}


def matmul_seconds(size, device, sync) -> float:
    """Seconds per square float32 matmul, timed over enough repeats to take ~0.2 s."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    repeats, elapsed = 1, 0.0
    while True:
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b)
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= 0.2 or repeats >= 1024:
            return elapsed / repeats
        repeats *= 2


# ------------------------------------------------------------------------------------------
# End to end: the training script in a subprocess, and a CleanRL-style loop in this process
# ------------------------------------------------------------------------------------------
CHILD = """
import json, resource, sys
import torch, tyro
import nbsp_sac_metaworld
nbsp_sac_metaworld.main(tyro.cli(nbsp_sac_metaworld.Args, args=sys.argv[1:]))
cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
print("BENCHMARK_MEMORY " + json.dumps({"max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                                        "cuda_max_allocated": cuda}))
"""


def training_args(args: Args, runs_dir, exp_name, seed, compiled) -> list[str]:
    cli = ["--tasks", args.e2e_task, "--cycles", "1", "--seed", str(seed),
           "--learning-starts", str(args.e2e_learning_starts),
           "--steps-per-task", str(args.e2e_learning_starts + args.e2e_steps),
           "--hidden", *map(str, args.e2e_hidden), "--batch-size", str(args.e2e_batch),
           "--eval-every", "0", "--eval-episodes", "1", "--identify-episodes", "1", "--early-stop-success", "0",
           "--buffer-size", "10000", "--runs-dir", runs_dir, "--exp-name", exp_name]
    if not args.device.startswith("cuda"):
        cli.append("--no-cuda")
    return cli + ["--compile"] * compiled + ["--cudagraphs"] * (compiled and args.cudagraphs)


def steady_sps(run_dir) -> list[float]:
    """SPS values logged after learning starts (each over the last 100 steps; the stage's rate is
    measured from its first update on, so neither the random-action phase nor that first
    (compiling) update is in them)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    events.Reload()
    return [event.value for event in events.Scalars("charts/SPS")]


def training_runs(args: Args, count: int, threads: int | None, compiled: bool) -> list[dict]:
    """Start `count` training runs at once (seeds 1..count), compiled (--compile, --cudagraphs as
    asked) or eager; their steady SPS, peak memory and the stage's wall seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ)
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        index = torch.device(args.device).index
        if index is not None:  # the training script takes the first visible GPU
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            env["CUDA_VISIBLE_DEVICES"] = visible.split(",")[index] if visible else str(index)
        children = []
        for k in range(count):
            runs_dir = os.path.join(tmp, f"runs{k}")
            log = open(os.path.join(tmp, f"log{k}.txt"), "w+")
            cli = training_args(args, runs_dir, "benchmark", seed=k + 1, compiled=compiled)
            # `python -c` imports from its working folder: the repository root, installed or not
            child = subprocess.Popen([sys.executable, "-c", CHILD, *cli], cwd=ROOT, env=env,
                                     stdout=log, stderr=subprocess.STDOUT)
            children.append((child, log, runs_dir))
        results = []
        for child, log, runs_dir in children:
            rc = child.wait()
            log.seek(0)
            output = log.read()
            log.close()
            if rc != 0:
                tail = "\n".join(output.strip().splitlines()[-5:])
                print(f"error: training run failed (exit {rc}):\n{tail}", file=sys.stderr)
                sys.exit(1)
            memory = json.loads(output.rsplit("BENCHMARK_MEMORY ", 1)[1].splitlines()[0])
            (run_name,) = os.listdir(runs_dir)
            sps = steady_sps(os.path.join(runs_dir, run_name))
            with open(os.path.join(runs_dir, run_name, "metrics.json")) as f:
                wall = json.load(f)["stages"][0]["wall_seconds"]
            results.append({"sps": statistics.median(sps), "logs": len(sps), "wall_seconds": wall, **memory})
        return results


class ReferenceLoop:
    """CleanRL's sac_continuous_action.py loop after learning starts, one env: action from the
    actor, env step, host replay buffer, batch copied to the device, one CleanRLSAC update."""

    def __init__(self, task, hidden, batch, device, seed, capacity=10_000):
        self.env = nbsp.make_env(task, seed)
        self.obs, _ = self.env.reset(seed=seed)
        self.sac = CleanRLSAC(OBS_DIM, ACT_DIM, list(hidden), device)
        self.device, self.batch, self.rng = device, batch, np.random.default_rng(seed)
        self.observations = self.rng.standard_normal((capacity, OBS_DIM), dtype=np.float32)
        self.next_observations = self.rng.standard_normal((capacity, OBS_DIM), dtype=np.float32)
        self.actions = self.rng.uniform(-1, 1, (capacity, ACT_DIM)).astype(np.float32)
        self.rewards = self.rng.standard_normal(capacity, dtype=np.float32)
        self.dones = np.zeros(capacity, np.float32)
        self.capacity, self.pos, self.step_index = capacity, 0, 0

    def run(self, steps) -> float:
        """Seconds for `steps` env steps with one update each."""
        sync = synchronizer(self.device)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            action = self.sac.actor.get_action(torch.Tensor(self.obs[None]).to(self.device))[0]
            action = action.detach().cpu().numpy()[0]
            next_obs, reward, terminated, truncated, _ = self.env.step(action)
            i = self.pos
            self.observations[i], self.actions[i], self.rewards[i] = self.obs, action, reward
            self.next_observations[i], self.dones[i] = next_obs, float(terminated)
            self.pos = (self.pos + 1) % self.capacity
            self.obs = self.env.reset()[0] if terminated or truncated else next_obs
            index = self.rng.integers(0, self.capacity, self.batch)
            batch = [torch.tensor(a[index], device=self.device) for a in
                     (self.observations, self.actions, self.rewards, self.next_observations, self.dones)]
            self.sac.update(self.step_index, *batch)
            self.step_index += 1
        sync()
        return time.perf_counter() - start


# ------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------
def main(args: Args) -> None:
    args = resolve(args)
    device = torch.device(args.device)
    sync = synchronizer(device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    mode = "cudagraphs" if args.cudagraphs else "compile" if args.compile else "eager"
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    D = filled_buffer(args.buffer_rows, device, generator)
    Dpre = filled_buffer(args.buffer_rows, device, generator)
    config = nbsp.Args()
    cores = len(os.sched_getaffinity(0))
    print(f"device {device_name} (torch {torch.__version__}, {torch.get_num_threads()} threads, {cores} cores, load "
          f"average {os.getloadavg()[0]:.1f} at start), project update {mode}{' (smoke test: --quick)' if args.quick else ''}")
    print(f"update: obs {OBS_DIM}, act {ACT_DIM}; project with Eq. 7 masks on every hidden layer of actor, qf1, qf2 "
          f"({SKILL_RATIO:.0%} of neurons, {MASK_RANGE[0]}-{MASK_RANGE[1]}), every {config.replay_interval}th batch from "
          f"Dpre; reference CleanRLSAC (two critic modules, eager)")

    # paper size, with the dense matmul throughput sampled between rounds
    matmul_times = []
    matmul_seconds(args.matmul_size, device, sync)  # warm-up
    reference = ReferencePath(PAPER_HIDDEN, PAPER_BATCH, device, D)
    project = ProjectPath(PAPER_HIDDEN, PAPER_BATCH, device, args, D, Dpre, generator)
    rates = interleaved(reference, project, args.updates_per_block, args.rounds, args.warmup, sync,
                        between=lambda: matmul_times.append(matmul_seconds(args.matmul_size, device, sync)))
    del reference, project
    paper_ref, paper_proj = statistics.median(rates["reference"]), statistics.median(rates["project"])
    speedup = paper_proj / paper_ref
    round_ratios = [p / r for p, r in zip(rates["project"], rates["reference"])]
    print(f"\npaper size (hidden {' '.join(map(str, PAPER_HIDDEN))}, batch {PAPER_BATCH}), median of {args.rounds} "
          f"interleaved rounds of {args.updates_per_block} updates:")
    print(f"  CleanRL-style {paper_ref:.2f} updates/s, project {paper_proj:.2f} updates/s, ratio {speedup:.2f}x "
          f"(per-round ratios: median {statistics.median(round_ratios):.2f}, range {min(round_ratios):.2f}-"
          f"{max(round_ratios):.2f})")
    matmul_flops = 2.0 * args.matmul_size**3 / statistics.median(matmul_times)
    flops = update_flops(PAPER_HIDDEN, PAPER_BATCH)
    print(f"dense matmul throughput: {matmul_flops / 1e9:.1f} GFLOP/s (float32 {args.matmul_size}x{args.matmul_size}, "
          f"median of {len(matmul_times)}, sampled between the rounds)")
    print(f"matmul fraction at paper size: project {flops['project'] / 1e9:.3f} GFLOP/update x {paper_proj:.2f} "
          f"updates/s = {flops['project'] * paper_proj / 1e9:.1f} GFLOP/s = "
          f"{flops['project'] * paper_proj / matmul_flops:.1%} of dense matmul (CleanRL-style: "
          f"{flops['reference'] / 1e9:.3f} GFLOP/update, {flops['reference'] * paper_ref / matmul_flops:.1%})")

    # widths x batches
    if args.table:
        scaled = device.type == "cpu"
        print(f"\nupdates/s by size (3 hidden layers), median of {args.table_rounds} interleaved rounds per cell"
              f"{'; updates per block scaled by FLOPs (CPU)' if scaled else ''}; dense matmul sampled between each "
              f"cell's rounds; warm-up: seconds of the project's {args.warmup} untimed updates ({mode}):")
        print(f"{'width':>6} {'batch':>6} {'upd/block':>9} {'CleanRL-style':>13} {'project':>9} {'ratio':>6} "
              f"{'GFLOP/upd':>9} {'matmul GFLOP/s':>14} {'% matmul':>8} {'warm-up s':>9}")
        paper_flops = flops["project"]
        for width in args.widths:
            for batch in args.batches:
                hidden = [width] * 3
                cell_flops = update_flops(hidden, batch)["project"]
                if hidden == PAPER_HIDDEN and batch == PAPER_BATCH:
                    ref_rate, proj_rate, updates = paper_ref, paper_proj, args.updates_per_block
                    cell_matmul, warmup_seconds = matmul_flops, rates["warmup_seconds"]
                else:
                    updates = args.updates_per_block
                    if scaled:
                        updates = min(4 * updates, max(2, round(updates * paper_flops / cell_flops)))
                        updates += updates % 2
                    if args.compile or args.cudagraphs:
                        torch._dynamo.reset()  # a fresh compilation per size, not recompilations
                    reference = ReferencePath(hidden, batch, device, D)
                    project = ProjectPath(hidden, batch, device, args, D, Dpre, generator)
                    times = []  # the matmul throughput of this cell's own time window
                    cell = interleaved(reference, project, updates, args.table_rounds, args.warmup, sync,
                                       between=lambda: times.append(matmul_seconds(args.matmul_size, device, sync)))
                    del reference, project
                    ref_rate, proj_rate = statistics.median(cell["reference"]), statistics.median(cell["project"])
                    cell_matmul, warmup_seconds = 2.0 * args.matmul_size**3 / statistics.median(times), cell["warmup_seconds"]
                print(f"{width:>6} {batch:>6} {updates:>9} {ref_rate:>13.2f} {proj_rate:>9.2f} {proj_rate / ref_rate:>5.2f}x "
                      f"{cell_flops / 1e9:>9.3f} {cell_matmul / 1e9:>14.1f} {cell_flops * proj_rate / cell_matmul:>8.1%} "
                      f"{warmup_seconds:>9.1f}", flush=True)

    # the Atari update (paper Table 6, Atari column)
    if args.atari:
        config = atari.Args() if not args.quick else atari.Args(conv_channels=[8, 16, 16], hidden=[64, 64], batch_size=16)
        D_atari, Dpre_atari = filled_atari_buffer(2_000, device, args.seed), filled_atari_buffer(2_000, device, args.seed + 1)
        reference = AtariReferencePath(config, device, D_atari)
        project = AtariProjectPath(config, device, args, D_atari, Dpre_atari, generator)
        cell = interleaved(reference, project, args.atari_updates_per_block, args.atari_rounds, min(args.warmup, 2), sync)
        del reference, project, D_atari, Dpre_atari
        ref_rate, proj_rate = statistics.median(cell["reference"]), statistics.median(cell["project"])
        print(f"\nAtari update (conv {' '.join(map(str, config.conv_channels))}, hidden {' '.join(map(str, config.hidden))}, "
              f"batch {config.batch_size}, 18 actions), median of {args.atari_rounds} interleaved rounds of "
              f"{args.atari_updates_per_block} updates:")
        print(f"  CleanRL-style sac_atari {ref_rate:.2f} updates/s, project {proj_rate:.2f} updates/s, "
              f"ratio {proj_rate / ref_rate:.2f}x", flush=True)

    # update cost of every method, relative to plain SAC
    if args.methods:
        methods = ["sac"] + [m for m in args.methods if m != "sac"]
        costs = method_costs(methods, args.method_hidden, PAPER_BATCH, device, D, Dpre, generator,
                             args.method_updates_per_block, args.method_rounds, sync)
        print(f"\nupdate cost by method (Meta-World, hidden {' '.join(map(str, args.method_hidden))}, batch {PAPER_BATCH}, "
              f"second task of a run), median of {args.method_rounds} interleaved rounds of {args.method_updates_per_block} updates:")
        print(f"{'method':>8} {'updates/s':>10} {'time vs sac':>12}")
        for name, rate in costs.items():
            print(f"{name:>8} {rate:>10.2f} {costs['sac'] / rate:>11.2f}x", flush=True)

    # end to end
    if args.e2e:
        size = f"hidden {' '.join(map(str, args.e2e_hidden))}, batch {args.e2e_batch}"
        print(f"\nend to end ({args.e2e_task}, {size}; {args.e2e_learning_starts} random steps, then "
              f"{args.e2e_steps} steps with an update each):", flush=True)
        loop = ReferenceLoop(args.e2e_task, args.e2e_hidden, args.e2e_batch, device, args.seed)
        loop.run(max(2, args.warmup))
        first = args.ref_loop_steps // 2
        seconds = loop.run(first)
        compiled = args.compile or args.cudagraphs
        (run,) = training_runs(args, 1, threads=None, compiled=compiled)
        if compiled:
            (eager,) = training_runs(args, 1, threads=None, compiled=False)
        seconds += loop.run(args.ref_loop_steps - first)
        ref_sps = args.ref_loop_steps / seconds
        memory = f"peak RSS {run['max_rss_kb'] / 1024:.0f} MiB"
        if run["cuda_max_allocated"] is not None:
            memory += f", CUDA max allocated {run['cuda_max_allocated'] / 2**20:.0f} MiB"
        print(f"  project (nbsp_sac_metaworld.main, subprocess): {run['sps']:.1f} env steps/s "
              f"(median of {run['logs']} SPS logs after learning starts), {memory}")
        print(f"  CleanRL-style loop (this process, {args.ref_loop_steps} steps, half before and half after): "
              f"{ref_sps:.1f} env steps/s")
        print(f"  env steps/s project / CleanRL-style: {run['sps'] / ref_sps:.2f}x")
        if compiled:
            # each run's wall time less its updating steps at the steady rate: the rest is equal
            # in both (random steps, final evaluation) except the compilation
            steady = [r["wall_seconds"] - args.e2e_steps / r["sps"] for r in (run, eager)]
            print(f"  project eager (same script without --compile, after the {mode} run): {eager['sps']:.1f} env steps/s; "
                  f"{mode} / eager: {run['sps'] / eager['sps']:.2f}x; compile warm-up about {steady[0] - steady[1]:.0f} s")

    # concurrent runs on one device (a seed sweep)
    if args.concurrent:
        print(f"\nconcurrent training runs on one {device_name} ({cores} cores shared):", flush=True)
        for count in args.concurrent:
            runs = training_runs(args, count, threads=max(1, cores // count), compiled=args.compile or args.cudagraphs)
            per_run = " ".join(f"{run['sps']:.1f}" for run in runs)
            print(f"  {count} run{'s' if count > 1 else ''} (OMP_NUM_THREADS={max(1, cores // count)}): "
                  f"env steps/s per run {per_run}, aggregate {sum(run['sps'] for run in runs):.1f}", flush=True)

    print(f"\nupdate speedup vs CleanRL-style at paper size: {speedup:.2f}x ({device_name})")


DESCRIPTION = """Speed of the project's SAC update against a fixed CleanRL-style reference, on this machine, from
one process and the same inputs: updates/s at paper size and over widths x batches, the fraction of
the machine's dense matmul throughput the update reaches, end-to-end env steps/s and peak memory of
the training script, the Atari update, every method's update cost, and (GPU) concurrent runs.

examples:
  python scripts/benchmark.py                     # CPU, a few minutes on 2 cores
  python scripts/benchmark.py --device cuda --compile --cudagraphs
  python scripts/benchmark.py --quick             # tiny sizes, well under a minute"""


if __name__ == "__main__":
    main(tyro.cli(CommandLine, description=DESCRIPTION).args())
