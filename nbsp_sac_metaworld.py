"""NBSP (Neuron-level Balance between Stability and Plasticity, arXiv 2504.08000) on Meta-World:
SAC in the form of CleanRL's sac_continuous_action.py, trained on a cycling task sequence
(A -> B -> A -> B), with goal-oriented RL skill neurons, the adaptive mask of Eq. 7 and the
replay buffer Dpre; --method runs one of the paper's baselines under the same protocol instead.

Example: python nbsp_sac_metaworld.py --tasks window-open window-close --seed 1
"""
# Read top to bottom: Args, environments, networks, the replay buffers D and Dpre, SAC, NBSP's
# identification, evaluation and videos, the main loop (`# ALGO LOGIC` marks the algorithm).
# Where the paper is:
# - SAC (Alg. 2 lines 12-16): SACLearner.critic_step and actor_step
# - skill neurons (Alg. 1, Alg. 2 line 19): identify_skill_neurons -> skill_neurons.identify_network;
#   the Eq. 3-4 score is skill_neurons.goal_scores (q(t): the step's episode succeeded; its return
#   where the window has one outcome); Eq. 5's top 20% per network is select_top
# - the Eq. 7 mask (Alg. 2 line 20): skill_neurons.neuron_mask, kept over stages by
#   SkillNeuronMasks; it scales Adam's step in SACLearner.masked_step (fast_adam.StepMask)
# - Dpre (Eq. 8, Alg. 2 lines 9-10 and 21): `dpre` in main gives every --replay-interval-th
#   update's batch and gets D's newest policy transitions at each stage's end but the last
# - the stages: main's `for stage in range(run.start_stage, H)`
import atexit
import contextlib
import gc
import os
import sys
import warnings
from collections import deque
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Literal

import gymnasium as gym
import metaworld
import mujoco
import numpy as np
import torch
import torch.nn as nn

import baselines
import fast_adam
import plasticity
import protocol
import skill_neurons as sn
from baselines.method import Method
from fast_adam import StepMask
from protocol import fail
from skill_neurons import Consumer, NeuronLayer


@dataclass
class RunArgs:
    """The run: its name, seed, device, tracking, folder, resume and checkpoints"""

    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """set `torch.backends.cudnn.deterministic` (CleanRL's flag): deterministic cuDNN convolutions on GPU; these MLPs have none, so it changes nothing here"""
    cuda: bool = True
    """train on CUDA when a GPU is available (--no-cuda: the CPU)"""
    track: bool = False
    """track the run with Weights and Biases (TensorBoard synced)"""
    wandb_project_name: str = "nbsp"
    """the Weights and Biases project"""
    wandb_entity: str | None = None
    """the Weights and Biases entity (team); None: your default entity"""
    runs_dir: str = "runs"
    """folder in which the run folder `{run_name}` is created"""
    resume: str | None = None
    """run folder of a stopped or killed run to continue from its checkpoint: a stage's end or a stopped step (takes its config.json)"""
    progress_every: float = 60.0
    """seconds between plain progress lines when stderr is not a terminal (log file, nohup, Slurm); 0: none"""
    checkpoint_every: float = 10.0
    """minutes between checkpoints inside a stage (besides each stage's end and a stop signal's); 0: none"""


@dataclass
class VideoArgs:
    """Videos of the agent (CleanRL's --capture-video), written under the run folder's videos/"""

    capture_video: bool = False
    """whether to capture videos of the agent performances (check out `videos` folder): after each stage, one evaluation episode of every task (MuJoCo's offscreen rendering, MUJOCO_GL=egl unless set)"""
    video_every_eval: bool = False
    """with --capture-video, also record at every periodic evaluation (--eval-every)"""
    video_size: int = 240
    """width and height in pixels of the recorded videos (even)"""
    video_steps: int = 500
    """environment steps recorded of an episode (Meta-World's episodes have 500)"""


@dataclass
class ProtocolArgs:
    """Cycling protocol (paper Section 4 and Table 6)"""

    tasks: list[str] = field(default_factory=lambda: ["window-open", "window-close"])
    """Meta-World v3 tasks of one cycle, in order (`window-open` or `window-open-v3`)"""
    cycles: int = 2
    """number of passes through the task list; stages H = len(tasks) * cycles"""
    steps_per_task: int = 1_000_000
    """maximum environment steps of one stage"""
    learning_starts: int = 10_000
    """random actions, and no update, for the first steps of every stage"""
    early_stop_success: float = 0.9
    """stop a stage when the last 10 training episodes (policy actions) reach this mean success; 0 disables"""
    keep_buffer: bool = False
    """keep the replay buffer D across stages instead of starting each stage with a fresh one"""
    eval_episodes: int = 20
    """episodes per task of each evaluation (deterministic policy, success at any step)"""
    eval_every: int = 20_000
    """evaluate every task of the run every this many environment steps (0: only after stages)"""
    dormant_threshold: float = 0.025
    """plasticity diagnostics: a neuron is dormant when its mean |activation| on the probe batch is at most this fraction of its layer's mean (ReDo's tau)"""


@dataclass
class SACArgs:
    """SAC (CleanRL's defaults, paper Table 6)"""

    hidden: list[int] = field(default_factory=lambda: [768, 768, 768])
    """hidden layer widths of the actor and of each critic"""
    buffer_size: int = 1_000_000
    """the replay memory buffer size"""
    gamma: float = 0.99
    """the discount factor gamma"""
    tau: float = 0.005
    """target smoothing coefficient"""
    batch_size: int = 256
    """the batch size of sample from the replay memory"""
    policy_lr: float = 3e-4
    """the learning rate of the policy network optimizer"""
    q_lr: float = 1e-3
    """the learning rate of the Q network optimizer (and of the temperature)"""
    policy_frequency: int = 2
    """critic updates between policy updates; each time, this many policy updates (delayed, TD3 style)"""
    target_network_frequency: int = 1
    """gradient updates between target network updates, counted from the stage's first update (1: every update)"""
    alpha: float = 0.2
    """entropy regularization coefficient (initial value when autotuned)"""
    autotune: bool = True
    """automatic tuning of the entropy coefficient"""
    compile: bool = False
    """torch.compile the SAC update and acting (CPU and GPU): 1.5-3x faster updates on CPU (docs/performance.md) after a warm-up of about 5 s with a warm cache, a minute or more without"""
    cudagraphs: bool = False
    """also replay the compiled update as CUDA graphs (GPU only)"""


@dataclass
class NBSPArgs:
    """NBSP (paper Section 3, Algorithms 1-2): with --method nbsp"""

    mask: bool = True
    """skill-neuron masking (--no-mask turns it off; with --no-replay too: vanilla SAC)"""
    replay: bool = True
    """replay from Dpre every --replay-interval-th update (--no-replay turns it off)"""
    hard_mask: bool = False
    """mask skill neurons with 0 instead of alpha * (1 - score)"""
    identify: Literal[sn.IDENTIFY_RULES] = "goal"
    """skill-neuron identification rule (paper Table 3); every rule takes Eq. 7 mask values from the goal scores of the same window, matched by rank"""
    identify_window: Literal[sn.IDENTIFY_WINDOWS] = "training"
    """identification window: the stage's own last policy episodes, taken from D (no extra env steps), or post-stage rollouts"""
    goal_score: Literal[sn.GOAL_SCORES] = "paper"
    """goal score: Eq. 3-4 as written, or balanced (balanced accuracy of the same indicator: 0.5 for a dead neuron whatever the success rate)"""
    apply_to: Literal[tuple(sn.APPLY_TO)] = "both"
    """networks whose skill neurons are identified and masked (paper Table 4)"""
    skill_ratio: float = 0.2
    """fraction of each network's hidden neurons selected as skill neurons, in (0, 1]"""
    mask_alpha: float = 0.2
    """alpha of Eq. 7, in [0, 1]: a skill neuron's mask is alpha * (1 - score)"""
    mask_target: Literal["update", "grad"] = "update"
    """scale the optimizer's parameter update (Alg. 2) or the gradient before Adam"""
    mask_combine: Literal[sn.MASK_COMBINES] = "min"
    """combine masks across stages by element-wise minimum, or keep only the latest"""
    replay_interval: int = 10
    """every this-many-th gradient step samples its batch from Dpre"""
    dpre_per_task: int = 100_000
    """most transitions of D that join Dpre after each stage but the last: its newest ones played by the policy"""
    identify_episodes: int = 20
    """episodes of the identification window: the stage's last policy episodes (widened while the goal metric is constant), or post-stage rollouts"""
    identify_max_steps: int = 100_000
    """cap on the identification window's steps; a longer window is subsampled evenly"""


@dataclass
class MethodArgs:
    """The continual-learning method (paper Appendix C.1); each baseline's own flags follow under its name"""

    method: Literal[baselines.METHOD_NAMES] = "nbsp"
    """NBSP, plain SAC fine-tuning (sac), or one of the paper's baselines"""


@baselines.with_method_flags  # then every baseline's own flags, declared in its module in baselines/
@dataclass
class Args(MethodArgs, NBSPArgs, SACArgs, ProtocolArgs, VideoArgs, RunArgs):
    """Every flag of a run, flat (`args.batch_size`); --help shows them by topic (protocol.command_line_topics)."""


TASK_NAMES = sorted(name.removesuffix("-v3") for name in metaworld.ALL_V3_ENVIRONMENTS)
EARLY_STOP_WINDOW = 10  # policy-played training episodes whose mean success decides the early stop (Table 6)
GOAL_METRICS = ("success", "return")  # the paper's goal metric; the return when a stage has one outcome
PLASTICITY_PROBE = 512  # observations of the fixed batch the plasticity diagnostics are measured on
MAX_ROLLOUT_ENVS = 20  # env copies per task for evaluation and rollouts (about 23 MB each); more episodes run in waves
RECORD_CHUNK = 8192  # window rows per forward pass when identification records activations: bounds a pass's memory


def validate(args: Args) -> None:
    """Bad input stops here, before anything is written."""
    if not args.tasks:
        fail(f"--tasks needs at least one task; valid: {' '.join(TASK_NAMES)}")
    for task in args.tasks:
        if task.removesuffix("-v3") not in TASK_NAMES:
            fail(f"unknown task {task!r}; valid Meta-World v3 tasks: {' '.join(TASK_NAMES)}")
    tasks = [task.removesuffix("-v3") for task in args.tasks]
    repeated = [task for i, task in enumerate(tasks) if task in tasks[:i]]
    if repeated:
        fail(f"--tasks lists {repeated[0]} more than once; give each task once (--cycles repeats the sequence)")
    if len(tasks) * args.cycles > protocol.MAX_STAGES:
        fail(f"--tasks x --cycles must be at most {protocol.MAX_STAGES} stages, got {len(tasks)} x {args.cycles}")
    if not 0.0 <= args.early_stop_success <= 1.0:
        fail(f"--early-stop-success must be in [0, 1] (0 disables), got {args.early_stop_success}")
    protocol.check_args(args, positive=["cycles", "steps_per_task", "batch_size", "buffer_size", "eval_episodes",
                                        "identify_episodes", "identify_max_steps", "replay_interval", "dpre_per_task",
                                        "policy_frequency", "target_network_frequency"],
                        non_negative=["learning_starts", "eval_every"])


# ------------------------------------------------------------------------------------------
# Environments
# ------------------------------------------------------------------------------------------
def make_env(task: str, seed: int, video_size: int | None = None) -> gym.Env:
    """One Meta-World v3 task (MT1): 500-step episodes, random goal positions, info['success'];
    Meta-World's registration already adds TimeLimit and RecordEpisodeStatistics (info['episode']).
    With `video_size`, rendering video_size x video_size frames from the `corner` camera."""
    render = dict(render_mode="rgb_array", camera_name="corner", width=video_size, height=video_size) if video_size else {}
    return gym.make("Meta-World/MT1", env_name=f"{task.removesuffix('-v3')}-v3", seed=seed, disable_env_checker=True,
                    **render)


class MujocoWarnings:
    """Counts MuJoCo's warnings instead of printing each: a diverging policy can make the simulation
    unstable thousands of times a stage. The hook is process-wide: it counts the warnings of the
    training steps and of the evaluation and identification rollouts alike (video recording puts the
    count back). Each stage's record takes the count since the previous stage's record, with the
    last message: its training steps and evaluations, and the previous stage's identification
    rollouts, which run after that record."""

    def __init__(self):
        self.count, self.last = 0, None
        mujoco.set_mju_user_warning(self)

    def __call__(self, message: str) -> None:
        self.count, self.last = self.count + 1, message.strip()

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


def replay_episode(env: gym.Env, saved: dict, first_obs: np.ndarray) -> np.ndarray:
    """Bring a stage's env, just made and reset with the stage's seed (`first_obs`), to where a
    stopped run left it: a Meta-World env cannot be pickled, but its episode is reproduced exactly
    by loading its state from before the episode's reset (task list, task sampler and env RNGs),
    resetting, and replaying the episode's actions. Returns the observation, checked against the
    saved one."""
    obs = first_obs
    if saved["before_reset"] is not None:  # an episode after the stage's first
        env.get_wrapper_attr("load_checkpoint")([saved["before_reset"]])
        obs, _ = env.reset()
    for action in saved["actions"].numpy():
        obs, *_ = env.step(action)
    if not np.array_equal(obs, saved["obs"].numpy()):
        fail("the stopped episode did not replay to its saved observation (another Meta-World or MuJoCo version?); "
             "resume with the versions in config.json")
    return obs


def reset_to_configuration(env: gym.Env, index: int, seed: int) -> np.ndarray:
    """Reset to the task's fixed goal configuration `index`, so evaluations are comparable."""
    configurations = env.get_wrapper_attr("tasks")
    env.get_wrapper_attr("toggle_sample_tasks_on_reset")(False)
    env.unwrapped.set_task(configurations[index % len(configurations)])
    return env.reset(seed=seed + index)[0]


@torch.no_grad()
def rollout(envs, num_episodes, policy, seed, device, record=False, until_success=False, mujoco_warnings=None):
    """Run `num_episodes` episodes, in waves over the vector of `envs`, with one batched policy
    call per step. Returns per-episode success and return, and with `record` the visited
    observations, executed actions and, per step, the episode it belongs to (`episode`).
    `until_success` ends an episode at its first success, which already decides its success (the
    return is then the return so far): evaluations only need the success, and a task the policy
    solves in a few dozen steps no longer costs 500 per episode. With `mujoco_warnings` (MujocoWarnings),
    an episode whose simulation became unstable (a non-finite action or observation, a MuJoCo
    warning during its step: MuJoCo then resets the simulation, which can look like a success)
    ends there as a failure, marked in `unstable`."""
    successes, returns, unstables, observations, actions, step_episode = [], [], [], [], [], []
    for first in range(0, num_episodes, len(envs)):
        wave = envs[: min(len(envs), num_episodes - first)]
        obs = np.stack([reset_to_configuration(env, first + i, seed) for i, env in enumerate(wave)])
        alive = np.ones(len(wave), bool)
        success, ret, unstable = np.zeros(len(wave), bool), np.zeros(len(wave)), np.zeros(len(wave), bool)
        wave_obs, wave_act, wave_owner = [], [], []
        while alive.any():
            live = np.flatnonzero(alive)
            act = policy(torch.as_tensor(obs[live], dtype=torch.float32, device=device)).cpu().numpy()
            if record:
                wave_obs.append(obs[live].astype(np.float32))
                wave_act.append(act)
                wave_owner.append(live)
            for a, i in zip(act, live):
                warned = mujoco_warnings.count if mujoco_warnings else 0
                obs[i], r, terminated, truncated, info = wave[i].step(a)
                if mujoco_warnings and (mujoco_warnings.count > warned
                                        or not (np.isfinite(a).all() and np.isfinite(obs[i]).all())):
                    unstable[i], success[i], alive[i] = True, False, False
                    continue
                success[i] |= bool(info["success"])
                ret[i] += r
                alive[i] = not (terminated or truncated or (until_success and success[i]))
        successes.extend(success.tolist())
        returns.extend(ret.tolist())
        unstables.extend(unstable.tolist())
        if record:
            observations.append(np.concatenate(wave_obs))
            actions.append(np.concatenate(wave_act))
            step_episode.append(first + np.concatenate(wave_owner))
    result = {"success": np.array(successes, np.float32), "return": np.array(returns), "unstable": np.array(unstables)}
    if record:
        result |= {"obs": np.concatenate(observations), "actions": np.concatenate(actions),
                   "episode": np.concatenate(step_episode)}
    return result


# ------------------------------------------------------------------------------------------
# Networks
# ------------------------------------------------------------------------------------------
LOG_STD_MAX = 2
LOG_STD_MIN = -5


def relu_layer(width: int) -> tuple[int, nn.Module, int]:
    """The default hidden_activation: (the Linear's output width, the activation, the activation's output width)."""
    return width, nn.ReLU(), width


def mlp_trunk(in_dim: int, hidden: list[int], hidden_activation=relu_layer,
              linear=nn.Linear) -> tuple[nn.Sequential, int]:
    """Linear + activation per hidden width; `hidden_activation` (a method hook) may change both widths.
    `linear(in_features, out_features)` makes each linear layer. Returns the trunk and its output width."""
    layers = []
    for width in hidden:
        linear_width, activation, in_next = hidden_activation(width)
        layers += [linear(in_dim, linear_width), activation]
        in_dim = in_next
    return nn.Sequential(*layers), in_dim


def linear_consumers(layers: list[nn.Module], heads: list[nn.Module], member=None) -> list[list[Consumer]]:
    """For each hidden layer, the layers that read its output: the next hidden layer or the heads."""
    readers = [[layer] for layer in layers[1:]] + [heads]
    # inputs are dimension 1 of both nn.Linear's [out, in] and EnsembleLinear's [E, in, out] weights
    return [[Consumer(m.weight, m.bias, 1, member) for m in group] for group in readers]


class Actor(nn.Module):
    head_names = ("fc_mean", "fc_logstd")  # the output layers

    def head_start(self) -> int:
        """Where the head begins in `trunk` (plasticity injection, baselines/pi.py): the last hidden
        layer (Linear + activation) and the output layers `head_names`; the trunk before is the encoder."""
        return len(self.trunk) - 2

    def __init__(self, obs_dim, act_dim, hidden, action_low, action_high, hidden_activation=relu_layer):
        super().__init__()
        self.trunk, trunk_width = mlp_trunk(obs_dim, hidden, hidden_activation)
        self.fc_mean = nn.Linear(trunk_width, act_dim)
        self.fc_logstd = nn.Linear(trunk_width, act_dim)
        self.register_buffer("action_scale", torch.tensor((action_high - action_low) / 2.0, dtype=torch.float32))
        self.register_buffer("action_bias", torch.tensor((action_high + action_low) / 2.0, dtype=torch.float32))

    def forward(self, x):
        x = self.trunk(x)
        mean = self.fc_mean(x)
        log_std = torch.tanh(self.fc_logstd(x))
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (log_std + 1)  # From SpinUp / Denis Yarats
        return mean, log_std

    def deterministic_action(self, x):
        """tanh of the mean, drawing no noise (evaluation leaves the training random stream alone)."""
        mean = self.fc_mean(self.trunk(x))
        return torch.tanh(mean) * self.action_scale + self.action_bias

    def get_action(self, x):
        mean, log_std = self(x)
        std = log_std.exp()
        x_t = mean + std * torch.randn_like(mean)  # reparameterization trick (mean + std * N(0,1))
        y_t = torch.tanh(x_t)
        action = y_t * self.action_scale + self.action_bias
        log_prob = (-0.5 * ((x_t - mean) / std) ** 2 - log_std - 0.5 * np.log(2 * np.pi)).sum(1)
        # Enforcing Action Bound
        log_prob = log_prob - torch.log(self.action_scale * (1 - y_t.pow(2)) + 1e-6).sum(1)
        mean = torch.tanh(mean) * self.action_scale + self.action_bias
        return action, log_prob, mean

    def hidden_layers(self) -> list[sn.HiddenLayer]:
        """Skill-neuron candidates: each ReLU's output, with the weight rows and bias of the Linear that
        feeds it (what Eq. 7 masks)."""
        pairs = zip(self.trunk[0::2], self.trunk[1::2])
        return [sn.HiddenLayer(act, lin.weight, lin.bias, neuron_dim=0) for lin, act in pairs]

    def neuron_layers(self) -> list[NeuronLayer]:
        """The same layers with the layers that read them, for the baselines (CBP, CoTASP, NPC); NBSP uses hidden_layers."""
        consumers = linear_consumers(list(self.trunk[0::2]), [self.fc_mean, self.fc_logstd])
        return [NeuronLayer(h, tuple(c)) for h, c in zip(self.hidden_layers(), consumers)]


class EnsembleLinear(nn.Module):
    """`num` independent linear layers applied in one batched matmul: [E, B, in] -> [E, B, out]."""

    def __init__(self, num, in_features, out_features):
        super().__init__()
        bound = 1.0 / np.sqrt(in_features)  # nn.Linear's default initialisation, per member
        self.weight = nn.Parameter(torch.empty(num, in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num, 1, out_features).uniform_(-bound, bound))

    def forward(self, x):
        return torch.baddbmm(self.bias, x, self.weight)


class TwinQNetwork(nn.Module):
    """CleanRL's two SoftQNetworks (qf1, qf2) fused into one module; forward gives [2, B]."""

    head_names = ("head",)  # the output layer of both critics

    def head_start(self) -> int:
        """Where the head begins in `trunk` (baselines/pi.py): the last hidden layer and `head`."""
        return len(self.trunk) - 2

    def __init__(self, obs_dim, act_dim, hidden, num_critics=2, hidden_activation=relu_layer):
        super().__init__()
        self.num_critics = num_critics
        self.trunk, trunk_width = mlp_trunk(obs_dim + act_dim, hidden, hidden_activation,
                                            linear=lambda i, o: EnsembleLinear(num_critics, i, o))
        self.head = EnsembleLinear(num_critics, trunk_width, 1)

    def forward(self, obs, act):
        x = torch.cat([obs, act], 1).expand(self.num_critics, -1, -1)
        return self.head(self.trunk(x)).squeeze(-1)

    def hidden_layers(self, member: int) -> list[sn.HiddenLayer]:
        """Critic `member`'s skill-neuron candidates, as Actor.hidden_layers."""
        pairs = zip(self.trunk[0::2], self.trunk[1::2])
        return [sn.HiddenLayer(act, lin.weight, lin.bias, neuron_dim=2, member=member) for lin, act in pairs]

    def neuron_layers(self, member: int) -> list[NeuronLayer]:
        """Critic `member`'s layers with their readers, as Actor.neuron_layers."""
        consumers = linear_consumers(list(self.trunk[0::2]), [self.head], member)
        return [NeuronLayer(h, tuple(c)) for h, c in zip(self.hidden_layers(member), consumers)]


# ------------------------------------------------------------------------------------------
# Replay buffers D and Dpre: one preallocated tensor on the training device, a row per transition.
# Dpre is a second ReplayBuffer (main): filled from D's newest rows at each stage end, sampled by
# every --replay-interval-th update.
# ------------------------------------------------------------------------------------------
class ReplayBuffer:
    """Each transition is tagged on the host with its episode (the global step of the episode's
    first transition; -1 when unknown), so identification can find a stage's episodes in D."""

    def __init__(self, capacity, obs_dim, act_dim, device):
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.storage = torch.zeros(capacity, 2 * obs_dim + act_dim + 2, dtype=torch.float32, device=device)
        self.episode = np.full(capacity, -1, np.int64)
        self.capacity, self.pos, self.size = capacity, 0, 0

    def add(self, obs, action, reward, next_obs, terminated, episode=-1):
        row = np.concatenate([obs, action, [reward], next_obs, [float(terminated)]]).astype(np.float32)
        self.storage[self.pos].copy_(torch.from_numpy(row))
        self.episode[self.pos] = episode
        self.pos = (self.pos + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def extend(self, rows, episodes=None):
        episodes = np.full(len(rows), -1, np.int64) if episodes is None else np.asarray(episodes)
        for start in range(0, len(rows), self.capacity):
            chunk = rows[start : start + self.capacity]
            index = (self.pos + torch.arange(len(chunk), device=self.storage.device)) % self.capacity
            self.storage[index] = chunk
            self.episode[index.cpu().numpy()] = episodes[start : start + self.capacity]
            self.pos = (self.pos + len(chunk)) % self.capacity
            self.size = min(self.size + len(chunk), self.capacity)

    def latest_index(self, n):
        n = min(n, self.size)
        return (self.pos - n + torch.arange(n, device=self.storage.device)) % self.capacity

    def latest(self, n):
        return self.storage[self.latest_index(n)]

    def episode_rows(self, episodes):
        """Observations, actions and episode tags of the stored transitions of `episodes`, oldest first."""
        index = self.latest_index(self.size)
        tags = self.episode[index.cpu().numpy()]
        keep = np.isin(tags, episodes)
        rows = self.storage[index[torch.from_numpy(keep).to(index.device)]]
        return rows[:, : self.obs_dim], rows[:, self.obs_dim : self.obs_dim + self.act_dim], tags[keep]

    def clear(self):
        self.pos = self.size = 0

    def sample(self, batch_size):
        rows = self.storage[torch.randint(0, self.size, (batch_size,), device=self.storage.device)]
        o, a = self.obs_dim, self.act_dim
        return rows.split([o, a, 1, o, 1], dim=1)  # obs, actions, rewards, next_obs, dones

    @staticmethod
    def row_bytes(obs_dim, act_dim):
        """Memory of one stored transition: its float32 row and its host episode tag."""
        return (2 * obs_dim + act_dim + 2) * 4 + 8

    def state_dict(self):
        """The stored rows as they lie in storage, with the write position: sampling draws storage
        indices, so a resumed run samples exactly what the uninterrupted one would."""
        return {"rows": self.storage[: self.size].cpu(), "episode": torch.from_numpy(self.episode[: self.size].copy()),
                "pos": self.pos}

    def load_state_dict(self, state):
        rows = state["rows"]
        if len(rows) > self.capacity or rows.shape[1:] != self.storage.shape[1:]:
            raise ValueError(f"{len(rows)} saved rows of width {tuple(rows.shape[1:])} do not fit a buffer of "
                             f"{self.capacity} rows of width {self.storage.shape[1]}")
        self.storage[: len(rows)] = rows.to(self.storage.device)
        self.episode[: len(rows)] = state["episode"].numpy()
        self.size = len(rows)
        self.pos = state["pos"] if "pos" in state else len(rows) % self.capacity  # checkpoints before "pos": oldest first


# ------------------------------------------------------------------------------------------
# SAC, with NBSP's masked optimizer steps and the hooks of the baselines
# ------------------------------------------------------------------------------------------
class SACLearner:
    """SAC (CleanRL's losses and delayed policy updates) with NBSP's masked optimizer steps and
    the hooks of a baseline `method` (baselines/__init__.py lists them and what they may use).

    Fast where it is exact: both critics in one batched module, no critic weight gradients in
    the actor loss, foreach target update, no host synchronisation (losses stay tensors).
    `compile` turns the whole update (critic step, actor and temperature steps, masked Adam
    steps, target update) into one torch.compile graph without graph breaks; `cudagraphs` also
    replays that graph as a CUDA graph (mode "reduce-overhead", capturable Adam)."""

    discrete = False
    critic_logs = ("qf1_values", "qf2_values", "qf1_loss", "qf2_loss", "qf_loss")  # critic_step's logged values

    def __init__(self, obs_dim, act_dim, action_low, action_high, args: Args, device, compile=False, cudagraphs=False,
                 method: Method | None = None):
        self.args, self.device = args, device
        self.method = method or Method(args)
        self.dims_and_bounds = (obs_dim, act_dim, action_low, action_high)  # what new networks and copies are built from
        self.actor = self.new_actor()
        self.qf = self.new_critic()
        self.qf_target = self.new_critic()
        self.qf_target.load_state_dict(self.qf.state_dict())
        adam = dict(capturable=cudagraphs, foreach=True)
        self.q_optimizer = torch.optim.Adam(self.qf.parameters(), lr=args.q_lr, **adam)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=args.policy_lr, **adam)
        # Eq. 7 masks of their Adam steps: no-ops until SkillNeuronMasks.install after stage 1's identification
        self.q_mask, self.actor_mask = StepMask(args.mask_target), StepMask(args.mask_target)
        self.target_entropy = -float(act_dim)
        self.log_alpha = torch.full((1,), float(np.log(args.alpha)), device=device, requires_grad=args.autotune)
        self.a_optimizer = torch.optim.Adam([self.log_alpha], lr=args.q_lr, **adam)
        self.compiled = compile or cudagraphs
        if self.compiled:
            from torch._inductor import config as inductor_config  # here only: it loads the compiler stack (seconds)

            inductor_config.fallback_random = True  # the eager random stream: compiled updates stay exact
            torch._dynamo.config.trace_autograd_ops = True  # backward() inside the graph instead of a graph break
            torch._dynamo.mark_static_address(self.log_alpha)  # updated in place by a CUDA graph (--cudagraphs)
            mode = "reduce-overhead" if cudagraphs else None
            self.update_step = torch.compile(self.update_step, mode=mode)
            self.act = torch.compile(self.act, mode=mode)  # acting runs every env step: worth its own small graph

    def critic_step(self, obs, actions, rewards, next_obs, dones, update_target: bool):
        with torch.no_grad():
            alpha = self.log_alpha.exp()
            next_actions, next_log_pi, _ = self.actor.get_action(next_obs)
            min_qf_next_target = self.qf_target(next_obs, next_actions).min(0).values - alpha * next_log_pi
            next_q_value = rewards.flatten() + (1 - dones.flatten()) * self.args.gamma * min_qf_next_target
        qf_a_values = self.qf(obs, actions)
        qf_losses = ((qf_a_values - next_q_value) ** 2).mean(1)
        qf_loss = qf_losses.sum()
        penalty = self.method.extra_loss("critic")
        fast_adam.zero_grad_(self.q_optimizer)
        (qf_loss if penalty is None else qf_loss + penalty).backward()
        self.method.after_backward("critic")
        self.masked_step(self.q_optimizer, self.q_mask)
        self.method.after_step("critic")
        if update_target:
            with torch.no_grad():
                torch._foreach_lerp_(list(self.qf_target.parameters()), list(self.qf.parameters()), self.args.tau)
        values = qf_a_values[0].mean(), qf_a_values[1].mean(), qf_losses[0], qf_losses[1], qf_loss / 2.0
        return {name: value.detach() for name, value in zip(self.critic_logs, values)}

    def actor_step(self, obs):
        pi, log_pi, _ = self.actor.get_action(obs)
        # detached critic parameters: the actor loss needs no critic weight gradients
        min_qf_pi = torch.func.functional_call(self.qf, self.frozen_qf_params(), (obs, pi)).min(0).values
        actor_loss = (self.log_alpha.exp().detach() * log_pi - min_qf_pi).mean()
        penalty = self.method.extra_loss("actor")
        fast_adam.zero_grad_(self.actor_optimizer)
        (actor_loss if penalty is None else actor_loss + penalty).backward()
        self.method.after_backward("actor")
        self.masked_step(self.actor_optimizer, self.actor_mask)
        self.method.after_step("actor")
        logs = {"actor_loss": actor_loss.detach()}
        if self.args.autotune:
            with torch.no_grad():
                _, log_pi, _ = self.actor.get_action(obs)
            alpha_loss = (-self.log_alpha.exp() * (log_pi + self.target_entropy)).mean()
            fast_adam.zero_grad_(self.a_optimizer)
            # inputs named: a recompiled graph (--compile, after a stage's new masks) holds log_alpha as a graph
            # attribute, and a backward() that finds its leaves itself skips it (torch 2.13; docs/reliability.md)
            alpha_loss.backward(inputs=[self.log_alpha])
            fast_adam.adam_step_(self.a_optimizer)
            logs["alpha_loss"] = alpha_loss.detach()
        return logs

    @staticmethod
    def masked_step(optimizer, step_mask: StepMask):
        """Adam's step with the step of masked rows scaled (Alg. 2, lines 13-14): p <- p_old + mask *
        (p_adam - p_old), the mask 1 for a free neuron and Eq. 7's alpha * (1 - score) for a skill
        neuron (--mask-target grad masks the gradient before Adam instead). The masks come from
        masks.install() in identify_skill_neurons."""
        p_old = step_mask.before_step()
        fast_adam.adam_step_(optimizer)
        step_mask.scale_step(p_old)

    @torch.no_grad()
    def act(self, obs):
        """The training loop's action for a batch of observations, drawn from the policy."""
        return self.actor.get_action(obs)[0]

    def update(self, data, update_policy: bool, update_target: bool, actor_obs=None) -> dict:
        """One critic step; with `update_policy`, `policy_frequency` actor (and alpha) steps, on
        the critic's observations or, one per step, on `actor_obs` (Dpre's own schedule)."""
        if update_policy:  # one stacked tensor: the same graph whichever batches alias each other
            actor_obs = torch.stack(actor_obs if actor_obs is not None else [data[0]] * self.args.policy_frequency)
        if self.compiled:  # gradients and Adam's lazily created state, made before the graph reads them
            for optimizer in (self.q_optimizer, self.actor_optimizer, self.a_optimizer):
                fast_adam.prepare_graph_optimizer_(optimizer)
        return self.update_step(*data, update_target, actor_obs if update_policy else None)

    def update_step(self, obs, actions, rewards, next_obs, dones, update_target: bool, actor_obs):
        """The whole update; under `compile`, one graph per (policy update or not, target update or not)."""
        logs = self.critic_step(obs, actions, rewards, next_obs, dones, update_target)
        if actor_obs is not None:
            for k in range(self.args.policy_frequency):  # compensate for the delay by doing 'policy_frequency' updates
                logs |= self.actor_step(actor_obs[k])
        logs["alpha"] = self.log_alpha.detach().exp()[0]
        return logs

    def watched_tensors(self) -> dict:
        """What must stay finite: the temperature and every parameter of the actor and the critics."""
        return {"log_alpha": self.log_alpha, **{f"actor.{n}": p for n, p in self.actor.named_parameters()},
                **{f"qf.{n}": p for n, p in self.qf.named_parameters()}}

    def frozen_qf_params(self):
        return {name: p.detach() for name, p in self.qf.named_parameters()}

    # What baseline methods use (see baselines/__init__.py)
    def new_actor(self):
        obs_dim, act_dim, action_low, action_high = self.dims_and_bounds
        return Actor(obs_dim, act_dim, self.args.hidden, action_low, action_high, self.method.hidden_activation).to(self.device)

    def new_critic(self):
        obs_dim, act_dim, _, _ = self.dims_and_bounds
        return TwinQNetwork(obs_dim, act_dim, self.args.hidden, hidden_activation=self.method.hidden_activation).to(self.device)

    @property
    def critics(self):
        return [self.qf]

    @property
    def critic_targets(self):
        return [self.qf_target]

    def q_values(self, obs, actions):
        return self.qf(obs, actions)

    def neuron_layers(self) -> dict[str, list[NeuronLayer]]:
        return {"actor": self.actor.neuron_layers(), "qf1": self.qf.neuron_layers(0), "qf2": self.qf.neuron_layers(1)}

    def heads(self) -> list[tuple[nn.Module, int, tuple[str, ...]]]:
        return [(net, net.head_start(), net.head_names) for net in (self.actor, self.qf, self.qf_target)]

    def reset_critics(self):
        """Fresh critics and targets, initial temperature, and optimizers without their moments."""
        fresh = self.new_critic()
        self.qf.load_state_dict(fresh.state_dict())
        self.qf_target.load_state_dict(fresh.state_dict())
        with torch.no_grad():
            self.log_alpha.fill_(float(np.log(self.args.alpha)))
        self.q_optimizer.state.clear()
        self.a_optimizer.state.clear()

    def plain_copy(self) -> "SACLearner":
        copy = SACLearner(*self.dims_and_bounds, self.args, self.device)
        copy.load_state_dict(self.state_dict())
        return copy

    def state_dict(self):
        return {"actor": self.actor.state_dict(), "qf": self.qf.state_dict(), "qf_target": self.qf_target.state_dict(),
                "log_alpha": self.log_alpha.detach().cpu(), "actor_optimizer": self.actor_optimizer.state_dict(),
                "q_optimizer": self.q_optimizer.state_dict(), "a_optimizer": self.a_optimizer.state_dict()}

    def load_state_dict(self, state):
        self.actor.load_state_dict(state["actor"])
        self.qf.load_state_dict(state["qf"])
        self.qf_target.load_state_dict(state["qf_target"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        self.actor_optimizer.load_state_dict(state["actor_optimizer"])
        self.q_optimizer.load_state_dict(state["q_optimizer"])
        self.a_optimizer.load_state_dict(state["a_optimizer"])


# ------------------------------------------------------------------------------------------
# NBSP pieces: the identification window and skill-neuron identification (Alg. 1)
# ------------------------------------------------------------------------------------------
def window_rows(window, metric, obs, actions, tags):
    """Per-step goal metric and success of a window's rows, from their episodes' tags."""
    by_id = {episode["id"]: episode for episode in window}
    return {"obs": obs, "actions": actions, "goal": torch.tensor([float(by_id[tag][metric]) for tag in tags]),
            "step_success": np.array([by_id[tag]["success"] for tag in tags], np.float32)}


def training_window(rb, episodes, num_episodes):
    """The stage's own last policy episodes, taken from D (Alg. 1 runs over training steps),
    widened while the goal metric is constant; None if no policy episode finished in the stage."""
    policy = [episode for episode in episodes if episode["policy"]]
    if not policy:
        return None
    window, metric, widened = sn.identification_window(policy, num_episodes, GOAL_METRICS)
    rows = window_rows(window, metric, *rb.episode_rows([episode["id"] for episode in window]))
    return rows | {"episodes": len(window), "widened": widened, "goal_metric": metric}


def rollout_window(envs, actor, num_episodes, stage_seed, device):
    """`num_episodes` episodes of the stochastic policy after the stage."""
    result = rollout(envs, num_episodes, lambda obs: actor.get_action(obs)[0], stage_seed, device, record=True)
    episodes = [{"id": i, "success": bool(result["success"][i]), "return": float(result["return"][i])}
                for i in range(num_episodes)]
    window, metric, _ = sn.identification_window(episodes, num_episodes, GOAL_METRICS)
    obs, actions = torch.as_tensor(result["obs"], device=device), torch.as_tensor(result["actions"], device=device)
    rows = window_rows(window, metric, obs, actions, result["episode"])
    return rows | {"episodes": len(window), "widened": False, "goal_metric": metric}


def identify_skill_neurons(sac, masks: sn.SkillNeuronMasks, rb, episodes, envs, args, label, stage_seed, device):
    """Alg. 1 after a stage: record the masked networks' hidden activations over the window,
    score the neurons against the goal metric, select the top skill_ratio of each network, and
    turn the selection into Eq. 7 masks combined with the earlier stages' (`masks.update`), which
    the optimizers then apply (`masks.install`). Returns the stage's record and the selections."""
    window_kind, fallback = args.identify_window, None
    window = training_window(rb, episodes, args.identify_episodes) if window_kind == "training" else None
    if window is None:
        if window_kind == "training":
            window_kind, fallback = "rollout", "no policy episode finished in the stage"
            print(f"{label}: no episode played by the policy finished in this stage; "
                  f"identifying on {args.identify_episodes} post-stage rollouts instead", file=sys.stderr)
        window = rollout_window(envs, sac.actor, args.identify_episodes, stage_seed, device)
    steps = len(window["goal"])
    rows = torch.arange(steps)
    if steps > args.identify_max_steps:  # evenly spaced rows keep every episode of a wide window
        rows = torch.linspace(0, steps - 1, args.identify_max_steps).long()
    index = rows.to(window["obs"].device)
    obs, actions, goal = window["obs"][index], window["actions"][index], window["goal"][rows]
    record = {"identify_window": window_kind, "identify_fallback": fallback,
              "identify_episodes": window["episodes"], "identify_steps": len(rows), "identify_widened": window["widened"],
              "goal_metric": window["goal_metric"],
              "identify_success_share": float(window["step_success"][rows.numpy()].mean()),
              "goal_constant": sn.goal_is_constant(goal)}
    print(f"{label} identification: {window_kind} window, {record['identify_episodes']} episodes"
          f"{' (widened)' if record['identify_widened'] else ''}, {record['identify_steps']} steps, goal metric "
          f"{record['goal_metric']}, {record['identify_success_share']:.0%} of the steps in successful episodes")
    if record["goal_constant"]:
        print(f"warning: {label}: the goal metric is constant ({goal[0]:g}) over the identification window, so "
              + sn.constant_goal_warning(args.goal_score, args.identify), file=sys.stderr)

    # the masked networks' activations over the window (the critics at the executed actions)
    layers = [layer for name in masks.masked for layer in masks.networks[name]]
    with sn.ActivationRecorder(layers) as recorder, torch.no_grad():
        for start in range(0, len(obs), RECORD_CHUNK):
            chunk = slice(start, start + RECORD_CHUNK)
            if "actor" in masks.masked:
                sac.actor(obs[chunk])
            if "qf1" in masks.masked:  # one pass records qf1 and qf2
                sac.qf(obs[chunk], actions[chunk])
    activations = sn.split_recorded([a.cpu() for a in recorder.activations()], masks.networks, masks.masked)

    # ALGO LOGIC: Eq. 3-4 scores -> Eq. 5's top skill_ratio per network -> Eq. 7 masks, combined with
    # the earlier stages' (masks.update; installed on Adam's steps by masks.install)
    generator = torch.Generator().manual_seed(stage_seed)  # drawn from by --identify random only
    found = {name: sn.identify_network(masks.networks[name], args.identify, activations[name], goal, args.skill_ratio,
                                       args.goal_score, generator) for name in masks.masked}
    record |= masks.update(found, activations)
    masks.install()
    return record, found


# ------------------------------------------------------------------------------------------
# Evaluation and the main loop
# ------------------------------------------------------------------------------------------
@torch.no_grad()
def measure_plasticity(sac, networks, probe, dormant_threshold):
    """Plasticity diagnostics of the actor and both critics on the probe batch (critics at its
    stored actions): dormant ratio, feature rank of the last hidden layer, mean absolute weight."""
    measured = {name: [sac.method.feature_layer(layer) for layer in networks[name]] for name in sn.NETWORKS}
    with sn.ActivationRecorder([layer for name in sn.NETWORKS for layer in measured[name]]) as recorder:
        sac.actor(probe["obs"])
        sac.qf(probe["obs"], probe["actions"])
    activations = sn.split_recorded(recorder.activations(), measured, sn.NETWORKS)
    return {name: plasticity.plasticity_stats(measured[name], activations[name], dormant_threshold) for name in sn.NETWORKS}


def evaluate_all(rollout_envs, actor, method, num_episodes, eval_seed, device, mujoco_warnings, unstable):
    """Deterministic success rate of every task of the run, on its fixed goal configurations; an
    episode whose simulation became unstable is a failure, and `unstable` gets each task's count."""
    rates = {}
    for task, envs in rollout_envs.items():
        with method.acting(task):
            result = rollout(envs, num_episodes, actor.deterministic_action, eval_seed, device, until_success=True,
                             mujoco_warnings=mujoco_warnings)
            rates[task] = float(result["success"].mean())
            unstable[task] = int(result["unstable"].sum())
    return rates


def evaluation(run, sac, method, rb, masks, rollout_envs, args, device, mujoco_warnings, unstable) -> protocol.Evaluation:
    """Every task's success rate (`unstable`: each task's unstable episodes in the last evaluation),
    the plasticity diagnostics on a fixed batch (the newest transitions of D at the run's first
    evaluation) and, with --capture-video, the recorded episodes."""

    def score(step):
        rates = evaluate_all(rollout_envs, sac.actor, method, args.eval_episodes, args.seed, device, mujoco_warnings,
                             unstable)
        for task, rate in rates.items():
            run.writer.add_scalar(f"eval/{task}/success_rate", rate, step)
        return rates

    def probe():
        rows = rb.latest(PLASTICITY_PROBE)
        return {"obs": rows[:, : rb.obs_dim].clone(), "actions": rows[:, rb.obs_dim : rb.obs_dim + rb.act_dim].clone()}

    return protocol.Evaluation(
        score, brief=lambda rates: "/".join(f"{r:.2f}" for r in rates.values()),
        text=lambda rates: "success " + " ".join(f"{t}={r:.2f}" for t, r in rates.items()), probe=probe,
        plasticity=lambda batch: measure_plasticity(sac, masks.networks, batch, args.dormant_threshold),
        record=video_recorder(video_envs(list(rollout_envs), args), sac, method, args, device, mujoco_warnings)
        if args.capture_video else None)


GL_PACKAGES = "libegl1 libegl-mesa0 libgl1-mesa-dri libopengl0"  # Debian's EGL and Mesa's software renderer


def video_envs(tasks: list[str], args: Args) -> dict[str, gym.Env]:
    """For --capture-video, a rendering env copy per task, made like the first evaluation copy
    (its goal configurations); the first renders a frame here, so a machine that cannot render
    stops before the run starts. MuJoCo renders offscreen through MUJOCO_GL, EGL unless set (gymnasium
    picks the backend when its renderer is made, so setting it here, after mujoco's import, counts)."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    envs = {task: make_env(task, args.seed + protocol.EVAL_SEED_OFFSET, args.video_size) for task in tasks}
    for env in envs.values():  # shadows: a render pass of their own, 4-6x a frame's time on Mesa's software renderer
        env.unwrapped.model.light_castshadow[:] = 0
    problem = None
    with quiet_finalizers():  # a failed backend's half-made GL objects raise again as they are freed
        try:
            envs[tasks[0]].reset(seed=args.seed)
            envs[tasks[0]].render()
        except Exception as e:  # a missing library shows as an ImportError, an EGLError or a RuntimeError
            problem = type(e).__name__
            with contextlib.suppress(Exception):  # PyOpenGL's EGLError cannot always print itself
                problem += ": " + (str(e).strip().splitlines() or [""])[0][:200]
    if problem:
        fail(f"--capture-video: MuJoCo cannot render with MUJOCO_GL={os.environ['MUJOCO_GL']} ({problem}); it renders "
             f"offscreen with MUJOCO_GL=egl (the default) given EGL and Mesa's software renderer (Debian/Ubuntu: "
             f"apt-get install {GL_PACKAGES}), or with MUJOCO_GL=osmesa given libosmesa6")
    # free the GL contexts before MuJoCo's own exit handler ends EGL (registered with the first
    # context): freed after it, each prints an EGLError at exit
    atexit.register(lambda: [env.close() for env in envs.values()])
    return envs


@contextlib.contextmanager
def quiet_finalizers():
    """Silences, for its block, the warnings and the errors raised by objects' finalizers (GLFW
    warns without a display; a GL context that failed to start raises as it is freed)."""
    hook, sys.unraisablehook = sys.unraisablehook, lambda unraisable: None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        gc.collect()
        sys.unraisablehook = hook


def video_recorder(envs, sac, method, args, device, mujoco_warnings):
    """Evaluation.record: the task's first evaluation configuration played by the deterministic
    policy, as in the evaluation, but to the episode's end (at most --video-steps steps, not cut at
    the first success) on the task's rendering copy; its MuJoCo warnings are left out of the count."""

    @torch.no_grad()
    def record(task):
        env, warned = envs[task], (mujoco_warnings.count, mujoco_warnings.last)
        with method.acting(task):
            obs, frames = reset_to_configuration(env, 0, args.seed), [env.render()]
            for _ in range(args.video_steps):
                action = sac.actor.deterministic_action(torch.as_tensor(obs[None], dtype=torch.float32, device=device))
                obs, _, terminated, truncated, _ = env.step(action[0].cpu().numpy())
                frames.append(env.render())
                if terminated or truncated:
                    break
        mujoco_warnings.count, mujoco_warnings.last = warned
        return np.ascontiguousarray(np.stack(frames)[:, ::-1]), env.metadata["render_fps"]  # the corner camera sees it upside down

    return record


def simulation_note(record: dict, last_warning: str | None) -> str:
    """The stage line's note on the simulation: the MuJoCo warnings counted since the previous stage's
    record (MujocoWarnings: training and evaluation alike) and the evaluation episodes that became
    unstable (counted as failures)."""
    unstable = sum(record["eval_unstable_episodes"].values())
    return ((f"; {record['env_warnings']} MuJoCo warnings (last: {last_warning})" if record["env_warnings"] else "")
            + (f"; {unstable} unstable evaluation episodes counted as failures" if unstable else ""))


def main(args: Args) -> dict:
    validate(args)
    args, checkpoint = protocol.load_resume(args, validate)
    stage_tasks = [t.removesuffix("-v3") for t in args.tasks] * args.cycles
    unique_tasks = list(dict.fromkeys(stage_tasks))
    H = len(stage_tasks)
    is_nbsp = args.method == "nbsp"  # every other method runs without NBSP's mask and Dpre
    use_mask, use_replay = is_nbsp and args.mask, is_nbsp and args.replay and H > 1
    run = protocol.Run(args, __file__, "+".join(unique_tasks), stage_tasks, average="ASR", rows=("task_success",),
                       checkpoint=checkpoint)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if args.cudagraphs and device.type != "cuda":
        fail("--cudagraphs needs a CUDA device (and --cuda); use --compile on CPU")
    if run.all_stages_done():  # killed between the last checkpoint and metrics.json?
        return run.write_metrics()

    # one fixed pool of env copies per task, for evaluation and identification rollouts (in waves beyond the pool)
    pool_size = min(MAX_ROLLOUT_ENVS, max(args.eval_episodes, args.identify_episodes if use_mask else 0))
    rollout_envs = {task: [make_env(task, args.seed + protocol.EVAL_SEED_OFFSET + i) for i in range(pool_size)]
                    for task in unique_tasks}
    first_env = rollout_envs[unique_tasks[0]][0]  # read for its spaces only: every task has the same
    obs_dim = int(np.prod(first_env.observation_space.shape))
    act_dim = int(np.prod(first_env.action_space.shape))
    # a share after every stage but the last, so Dpre never overwrites; no replay, no Dpre memory
    dpre_capacity = args.dpre_per_task * (H - 1) if use_replay else 0
    protocol.check_memory((args.buffer_size + dpre_capacity) * ReplayBuffer.row_bytes(obs_dim, act_dim), device,
                          f"D (--buffer-size {args.buffer_size})" + (f" and Dpre (--dpre-per-task {args.dpre_per_task} x "
                                                                     f"{H - 1})" if use_replay else ""))

    protocol.seed_everything(args.seed, args.torch_deterministic)
    method = baselines.make_method(args)
    sac = SACLearner(obs_dim, act_dim, first_env.action_space.low, first_env.action_space.high, args, device,
                     compile=args.compile, cudagraphs=args.cudagraphs, method=method)
    method.setup(sac)
    masks = sn.SkillNeuronMasks(  # NBSP's skill-neuron masks of the networks it protects (--apply-to)
        {"actor": sac.actor.hidden_layers(), "qf1": sac.qf.hidden_layers(0), "qf2": sac.qf.hidden_layers(1)},
        masked=list(sn.APPLY_TO[args.apply_to]),
        step_masks=[(sac.actor_mask, sn.APPLY_TO["actor"]), (sac.q_mask, sn.APPLY_TO["critic"])],
        mask_alpha=args.mask_alpha, hard=args.hard_mask, combine=args.mask_combine)
    rb = ReplayBuffer(args.buffer_size, obs_dim, act_dim, device)
    dpre = ReplayBuffer(dpre_capacity, obs_dim, act_dim, device)
    run.restore(method, sac, masks, dpre, rb, install_masks=use_mask)
    mujoco_warnings, unstable_episodes = MujocoWarnings(), {}
    run.open(device, {"stage_tasks": stage_tasks, "device": str(device), "versions": {
        name: version(name) for name in ("torch", "metaworld", "gymnasium", "mujoco", "numpy")}}, sac.watched_tensors,
        evaluation(run, sac, method, rb, masks, rollout_envs, args, device, mujoco_warnings, unstable_episodes),
        upper_bound=args.early_stop_success > 0)

    for stage in range(run.start_stage, H):
        task = stage_tasks[stage]
        stage_seed = run.begin_stage(stage)
        resumed = run.mid_stage(stage)  # the state of the stage's steps, for a run stopped inside it
        env = make_env(task, stage_seed)
        env.action_space.seed(stage_seed)
        if not args.keep_buffer and not resumed:
            rb.clear()
        method.begin_stage(stage, task)
        obs, _ = env.reset(seed=stage_seed)
        episode_success, episode_start, episode_id = False, 0, run.global_step + 1  # an episode's id: its first global step
        before_reset, episode_actions = None, []  # the env's state before the episode's reset, and its actions since
        recent_success = deque(maxlen=EARLY_STOP_WINDOW)
        stage_episodes = []  # finished episodes: id, success, return, played by the policy
        counts = dict.fromkeys(["critic_updates", "critic_dpre_updates", "actor_updates", "actor_dpre_updates"], 0)
        early_stopped, critic_log_due = False, False
        if resumed:
            obs = replay_episode(env, resumed["env"], obs)
            episode_success, episode_start, episode_id = resumed["episode_success"], resumed["episode_start"], resumed["episode_id"]
            before_reset, episode_actions = resumed["env"]["before_reset"], list(resumed["env"]["actions"].numpy())
            recent_success.extend(resumed["recent_success"])
            stage_episodes, counts, critic_log_due = resumed["stage_episodes"], resumed["counts"], resumed["critic_log_due"]
            mujoco_warnings.count, mujoco_warnings.last = resumed["env_warnings"], resumed["last_env_warning"]
            env.action_space.np_random.bit_generator.state = resumed["env"]["action_space_rng"]
            protocol.set_rng_state(resumed["rng"])

        def stage_state():  # what the stage's next step depends on, besides the learning state and the RNGs
            return {"env": {"before_reset": before_reset, "actions": torch.as_tensor(np.array(episode_actions, np.float32)),
                            "action_space_rng": env.action_space.np_random.bit_generator.state, "obs": torch.as_tensor(obs)},
                    "episode_success": episode_success, "episode_start": episode_start, "episode_id": episode_id,
                    "recent_success": list(recent_success), "stage_episodes": stage_episodes, "counts": counts,
                    "critic_log_due": critic_log_due, "env_warnings": mujoco_warnings.count,
                    "last_env_warning": mujoco_warnings.last}

        for step in range(run.resume_step() if resumed else 0, args.steps_per_task):
            global_step = run.next_step()
            # ALGO LOGIC: act, store the transition in D
            if step < args.learning_starts:
                action = env.action_space.sample()
            else:
                action = sac.act(torch.as_tensor(obs, dtype=torch.float32, device=device)[None])[0].cpu().numpy()
            next_obs, reward, terminated, truncated, info = env.step(action)
            episode_actions.append(action)
            episode_success |= bool(info["success"])
            rb.add(obs, action, reward, next_obs, terminated, episode_id)  # Meta-World never terminates: truncation still bootstraps
            obs = next_obs
            if terminated or truncated:
                run.writer.add_scalar("charts/episodic_return", info["episode"]["r"], global_step)
                run.writer.add_scalar("charts/episodic_length", info["episode"]["l"], global_step)
                run.writer.add_scalar("charts/success", float(episode_success), global_step)
                played_by_policy = episode_start >= args.learning_starts  # random-action episodes say nothing of the policy
                if played_by_policy:
                    recent_success.append(episode_success)
                stage_episodes.append({"id": episode_id, "success": episode_success, "return": float(info["episode"]["r"]),
                                       "policy": played_by_policy})
                before_reset, episode_actions = env.get_wrapper_attr("get_checkpoint")(), []
                obs, _ = env.reset()
                episode_success, episode_start, episode_id = False, step + 1, global_step + 1

            # ALGO LOGIC: one SAC update on a batch of D, or of Dpre every replay_interval-th gradient step
            if step >= args.learning_starts:
                # this stage's gradient steps so far: the Dpre, policy-delay and target schedules restart each stage
                update_index = step - args.learning_starts
                dpre_ready = use_replay and dpre.size > 0  # replay on and an earlier stage filled Dpre
                from_dpre = dpre_ready and update_index % args.replay_interval == 0
                data = (dpre if from_dpre else rb).sample(args.batch_size)
                update_policy = update_index % args.policy_frequency == 0
                update_target = update_index % args.target_network_frequency == 0
                actor_obs = None
                if update_policy and dpre_ready:  # the actor's steps follow Dpre's schedule of their own
                    # the actor has done update_index steps this stage (policy_frequency per policy update): its next ones
                    actor_steps = range(update_index, update_index + args.policy_frequency)
                    actor_dpre = [k % args.replay_interval == 0 for k in actor_steps]
                    # a step whose source (D or Dpre) is the critic's reuses its batch, as CleanRL's does; others sample
                    actor_obs = [data[0] if a == from_dpre else (dpre if a else rb).sample(args.batch_size)[0] for a in actor_dpre]
                    counts["actor_dpre_updates"] += sum(actor_dpre)
                counts["critic_updates"] += 1
                counts["critic_dpre_updates"] += from_dpre
                counts["actor_updates"] += args.policy_frequency if update_policy else 0
                logs = sac.update(data, update_policy, update_target, actor_obs)
                method.after_update(data, update_policy, update_target)
                # log every 100 updates (the only host synchronisations of the update path); the critic's
                # values from the first update since then that trains on D, as Dpre's batches (the 0th,
                # 10th, ...) would show only the old tasks' values. The actor's and temperature's are not
                # delayed: only a policy update has them (the next update has none with --policy-frequency
                # above 1), and they come from its last actor step, which follows Dpre's schedule of its own
                # (on D with the defaults)
                log_actor_and_alpha = update_index % 100 == 0  # the method's logs and SPS too
                critic_log_due |= log_actor_and_alpha
                log_critic = critic_log_due and (not from_dpre or args.replay_interval == 1)
                if log_actor_and_alpha or log_critic:
                    critic_log_due &= not log_critic
                    run.log_losses({name: value.item() for name, value in logs.items()
                                    if (log_critic if name in SACLearner.critic_logs else log_actor_and_alpha)})
                if log_actor_and_alpha:
                    run.log_method_and_sps(method, step)
            run.advance(step, args.learning_starts,
                        lambda: {"success": f"{np.mean(recent_success):.2f}" if recent_success else "n/a"})
            if (args.early_stop_success > 0 and len(recent_success) == EARLY_STOP_WINDOW
                    and np.mean(recent_success) >= args.early_stop_success):
                early_stopped = True
                break
            run.evaluate_if_due(step)  # after the early stop: a stage's end is evaluated once, by evaluate_stage
            run.end_step(step, stage_state)
        env.close()
        stage_steps = step + 1

        # end of stage: evaluate every task (row of sr), identify skill neurons, fill Dpre;
        # the success rates are sr's row and the "task_success" row declared in protocol.Run(rows=...)
        rates, plasticity = run.evaluate_stage(stage_steps, row=lambda rates: rates, task_success=lambda rates: rates)
        record = {"stage": stage + 1, "task": task, "env_steps": stage_steps, "budget_steps": args.steps_per_task,
                  "early_stopped": early_stopped, **counts, "env_warnings": mujoco_warnings.take(),
                  "eval_unstable_episodes": dict(unstable_episodes), "plasticity": plasticity, "wall_seconds": None}
        neuron_scores = {}  # each network's skill-neuron scores, saved with the stage's checkpoint
        if use_mask:  # ALGO LOGIC: identify the stage's skill neurons (Alg. 1), combine their Eq. 7 masks
            label = f"stage {stage + 1} ({task})"
            neuron_record, found = identify_skill_neurons(sac, masks, rb, stage_episodes, rollout_envs[task], args, label,
                                                          stage_seed, device)
            sn.report_selection(run.writer, neuron_record, found, label, args.goal_score, run.global_step)
            run.writer.add_scalar("neurons/identify_success_share", neuron_record["identify_success_share"], run.global_step)
            run.writer.add_scalar("neurons/goal_metric_is_return", float(neuron_record["goal_metric"] == "return"), run.global_step)
            neuron_scores = {name: identified.mask_scores for name, identified in found.items()}
            record |= neuron_record
        if use_replay and stage < H - 1:  # ALGO LOGIC: Dpre gets the stage's last transitions played by the policy
            # at most --dpre-per-task, only steps after --learning-starts (policy actions), no more than D holds
            record["dpre_added"] = min(args.dpre_per_task, max(0, stage_steps - args.learning_starts), rb.size)
            dpre.extend(rb.latest(record["dpre_added"]))
        if stage < H - 1:
            method.end_stage(stage, task, rb)  # a task switch follows
        run.writer.add_scalar("charts/env_warnings", record["env_warnings"], run.global_step)
        run.end_stage(record, rates, simulation_note(record, mujoco_warnings.last))
        metrics = run.save_checkpoint({"actor": sac.actor.state_dict(), "qf": sac.qf.state_dict()}, neuron_scores)
    return run.close(metrics)


if __name__ == "__main__":
    main(protocol.parse_args(Args, __doc__))
