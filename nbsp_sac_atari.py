"""NBSP (Neuron-level Balance between Stability and Plasticity, arXiv 2504.08000) on Atari:
discrete SAC in the form of CleanRL's sac_atari.py, trained on a cycling game sequence
(Pong -> Bowling -> Pong -> Bowling), with goal-oriented RL skill neurons (conv channels and
fully connected units), the adaptive mask of Eq. 7 and the replay buffer Dpre; --method runs one of
the paper's baselines under the same protocol instead.

Example: python nbsp_sac_atari.py --games Pong Bowling --seed 1
"""
# Read top to bottom: Args, environments, networks, the replay buffers D and Dpre, SAC, NBSP's
# identification, evaluation and videos, the main loop (`# ALGO LOGIC` marks the algorithm).
# Where the paper is:
# - discrete SAC (Alg. 2 lines 12-16): SACLearner.critic_step and actor_step
# - skill neurons (Alg. 1, Alg. 2 line 19): identify_skill_neurons -> skill_neurons.identify_network;
#   the Eq. 3-4 score is skill_neurons.goal_scores (q(t): the raw return of the step's whole game; a
#   conv channel's activation: its spatial mean); Eq. 5's top 20% per network is select_top
# - the Eq. 7 mask (Alg. 2 line 20): skill_neurons.neuron_mask, kept over stages by
#   SkillNeuronMasks; it scales Adam's step in SACLearner.masked_step (fast_adam.StepMask)
# - Dpre (Eq. 8, Alg. 2 lines 9-10 and 21): `dpre` in main gives every --replay-interval-th
#   update's batch and gets D's newest policy transitions at each stage's end but the last
# - the stages: main's `for stage in range(run.start_stage, H)`
# - the score (Eq. 12, Table 7's random and human scores): normalized_score, PAPER_SCORES
import math
import os
import sys
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Literal

import ale_py
import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import baselines
import fast_adam
import plasticity
import protocol
import skill_neurons as sn
from baselines.method import Method
from fast_adam import StepMask
from protocol import fail
from skill_neurons import Consumer, NeuronLayer

gym.register_envs(ale_py)


@dataclass
class RunArgs:
    """The run: its name, seed, device, tracking, folder, resume and checkpoints"""

    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """set `torch.backends.cudnn.deterministic` (on GPU, deterministic convolutions)"""
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
    """whether to capture videos of the agent performances (check out `videos` folder): after each stage, one evaluation game of every game of the run (the emulator's RGB screen)"""
    video_every_eval: bool = False
    """with --capture-video, also record at every periodic evaluation (--eval-every)"""
    video_size: int = 240
    """height in pixels of the recorded videos (even; the width keeps the screen's 160:210)"""
    video_steps: int = 2_000
    """environment steps (of 4 frames) recorded of a game; a longer game's video ends there"""


@dataclass
class ProtocolArgs:
    """Cycling protocol (paper Section 4.3, Tables 5-7)"""

    games: list[str] = field(default_factory=lambda: ["Pong", "Bowling"])
    """ALE games of one cycle, in order (`Pong`, `BankHeist`, ...; all play the full 18-action space)"""
    cycles: int = 2
    """number of passes through the game list; stages H = len(games) * cycles"""
    steps_per_task: int = 1_500_000
    """environment steps (agent steps, 4 frames each) of one stage; no early stop on Atari (Table 6)"""
    learning_starts: int = 20_000
    """random actions, and no update, for the first steps of every stage"""
    keep_buffer: bool = False
    """keep the replay buffer D across stages instead of starting each stage with a fresh one"""
    eval_steps: int = 100_000
    """environment steps per game of each evaluation (stochastic policy, raw full-game returns)"""
    eval_envs: int = 8
    """environments stepped together (one batched policy call) in evaluation and identification"""
    eval_every: int = 100_000
    """evaluate every game of the run every this many environment steps (0: only after stages)"""
    dormant_threshold: float = 0.025
    """plasticity diagnostics: a neuron is dormant when its mean |activation| on the probe batch is at most this fraction of its layer's mean (ReDo's tau)"""
    sticky_actions: bool = False
    """repeat the previous action with probability 0.25 (ALE v5 default); off as in CleanRL"""
    game_scores: list[str] = field(default_factory=list)
    """random and human scores of games outside the paper's Table 7, as GAME=RANDOM,HUMAN (none: the paper's games only)"""


@dataclass
class SACArgs:
    """SAC (CleanRL's sac_atari.py, paper Table 6 Atari column)"""

    conv_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    """channels of the three conv layers (8x8 stride 4, 4x4 stride 2, 3x3 stride 1) of each network"""
    hidden: list[int] = field(default_factory=lambda: [768, 768])
    """fully connected hidden layer widths after the conv layers, of the actor and of each critic"""
    buffer_size: int = 200_000
    """the replay memory buffer size (transitions)"""
    gamma: float = 0.99
    """the discount factor gamma"""
    tau: float = 1.0
    """target smoothing coefficient (1: hard copy)"""
    batch_size: int = 64
    """the batch size of sample from the replay memory"""
    policy_lr: float = 1e-4
    """the learning rate of the policy network optimizer"""
    q_lr: float = 1e-4
    """the learning rate of the Q network optimizer (and of the temperature)"""
    update_frequency: int = 4
    """environment steps between gradient updates (CleanRL's sac_atari: Table 6's "updates per environment step (replay ratio) 4" read as CleanRL's update_frequency, whose code the paper runs)"""
    target_network_frequency: int = 8000
    """environment steps (not gradient updates) between target network updates, counted from the stage's first update"""
    alpha: float = 0.2
    """entropy regularization coefficient (initial value when autotuned)"""
    autotune: bool = True
    """automatic tuning of the entropy coefficient"""
    target_entropy_scale: float = 0.89
    """target entropy = scale * log(number of actions), in (0, 1]"""
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
    """identification window: the stage's own last policy games, taken from D (no extra env steps), or post-stage rollouts"""
    goal_score: Literal[sn.GOAL_SCORES] = "paper"
    """goal score: Eq. 3-4 as written, or balanced (balanced accuracy of the same indicator: 0.5 for a dead neuron whatever the balance)"""
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
    identify_episodes: int = 10
    """full games of the identification window: the stage's last policy games (widened while their return is constant), or post-stage rollouts"""
    identify_max_steps: int = 100_000
    """cap on the identification window's steps: a longer training window is subsampled evenly; a rollout game cut off by it counts with its return so far"""


@dataclass
class MethodArgs:
    """The continual-learning method (paper Appendix C.1); each baseline's own flags follow under its name"""

    method: Literal[baselines.METHOD_NAMES] = "nbsp"
    """NBSP, plain SAC fine-tuning (sac), or one of the paper's baselines"""


@baselines.with_method_flags  # then every baseline's own flags, declared in its module in baselines/
@dataclass
class Args(MethodArgs, NBSPArgs, SACArgs, ProtocolArgs, VideoArgs, RunArgs):
    """Every flag of a run, flat (`args.batch_size`); --help shows them by topic (protocol.command_line_topics)."""


GAME_NAMES = sorted(env_id[len("ALE/") : -len("-v5")] for env_id in gym.registry
                    if env_id.startswith("ALE/") and env_id.endswith("-v5"))
# Paper Table 7 (random and human scores of Mnih et al. 2015, as printed in the paper: Alien's
# random score reads 227.5 there). Other games need --game-scores.
PAPER_SCORES = {"Alien": (227.5, 6875.0), "BankHeist": (14.2, 734.4), "Bowling": (23.1, 154.8), "Pong": (-20.7, 9.3)}
FRAME_SIZE, FRAME_STACK, NOOP_MAX, FRAME_SKIP = 84, 4, 30, 4
MAX_EVAL_ENVS = 64  # env copies per game played side by side in evaluation (built up front)
PLASTICITY_PROBE = 512  # observations of the fixed batch the plasticity diagnostics are measured on
RECORD_CHUNK = 1024  # window frames per forward pass when identification records activations: bounds a pass's memory
CONV_OUT = 7  # spatial size after the convolutions: 84 -> 20 -> 9 -> 7


def canonical_game(name: str) -> str | None:
    """`Pong`, `pong` or `ALE/Pong-v5` -> `Pong`; None for a name ale-py does not ship."""
    key = name.removeprefix("ALE/").removesuffix("-v5").lower()
    return {game.lower(): game for game in GAME_NAMES}.get(key)


def parse_game_scores(entries: list[str]) -> dict[str, tuple[float, float]]:
    """--game-scores GAME=RANDOM,HUMAN ... -> {game: (random, human)} on top of paper Table 7."""
    scores = dict(PAPER_SCORES)
    for entry in entries:
        try:
            name, values = entry.split("=")
            random_score, human_score = (float(v) for v in values.split(","))
        except ValueError:
            fail(f"--game-scores takes GAME=RANDOM,HUMAN (e.g. Breakout=1.7,31.8), got {entry!r}")
        game = canonical_game(name)
        if game is None:
            fail(f"--game-scores: unknown game {name!r}; valid ALE games: {' '.join(GAME_NAMES)}")
        if not (math.isfinite(random_score) and math.isfinite(human_score) and human_score > random_score):
            fail(f"--game-scores {entry!r}: the scores must be finite and the human score must exceed the random score")
        scores[game] = (random_score, human_score)
    return scores


def validate(args: Args) -> None:
    """Bad input stops here, before anything is written."""
    if not args.games:
        fail(f"--games needs at least one game; valid ALE games: {' '.join(GAME_NAMES)}")
    for game in args.games:
        if canonical_game(game) is None:
            fail(f"unknown game {game!r}; valid ALE games (the ROMs ale-py {version('ale-py')} ships; "
                 f"list them with python -c 'import ale_py.roms as r; print(r.get_all_rom_ids())'): {' '.join(GAME_NAMES)}")
    games = [canonical_game(game) for game in args.games]
    repeated = [game for i, game in enumerate(games) if game in games[:i]]
    if repeated:
        fail(f"--games lists {repeated[0]} more than once; give each game once (--cycles repeats the sequence)")
    if len(games) * args.cycles > protocol.MAX_STAGES:
        fail(f"--games x --cycles must be at most {protocol.MAX_STAGES} stages, got {len(games)} x {args.cycles}")
    scores = parse_game_scores(args.game_scores)
    for game in games:
        if game not in scores:
            fail(f"no random/human scores to normalize {game!r}: the paper's Table 7 has {' '.join(PAPER_SCORES)}; "
                 f"give them with --game-scores {game}=RANDOM,HUMAN (e.g. from Mnih et al. 2015, Extended Data Table 2)")
    if len(args.conv_channels) != 3 or min(args.conv_channels) <= 0:
        fail(f"--conv-channels needs three positive channel counts, got {args.conv_channels}")
    if args.eval_envs > MAX_EVAL_ENVS:
        fail(f"--eval-envs must be at most {MAX_EVAL_ENVS} (env copies per game, built up front), got {args.eval_envs}")
    if not 0.0 < args.target_entropy_scale <= 1.0:
        fail(f"--target-entropy-scale must be in (0, 1], got {args.target_entropy_scale}")
    protocol.check_args(args, positive=["cycles", "steps_per_task", "batch_size", "buffer_size", "eval_steps", "eval_envs",
                                        "identify_episodes", "identify_max_steps", "replay_interval", "dpre_per_task",
                                        "update_frequency", "target_network_frequency"],
                        non_negative=["learning_starts", "eval_every"])


# ------------------------------------------------------------------------------------------
# Environments: CleanRL's Atari wrappers (stable-baselines3 atari_wrappers), written out here, and
# `rollout`, which plays full games for evaluation and the rollout identification window
# ------------------------------------------------------------------------------------------
class NoopReset(gym.Wrapper):
    """After a reset, 1 to `noop_max` no-op actions (random start states)."""

    def __init__(self, env, noop_max=NOOP_MAX):
        super().__init__(env)
        self.noop_max = noop_max

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        for _ in range(self.unwrapped.np_random.integers(1, self.noop_max + 1)):
            obs, _, terminated, truncated, info = self.env.step(0)
            if terminated or truncated:
                obs, info = self.env.reset()
        return obs, info


class MaxAndSkip(gym.Wrapper):
    """Repeat each action `skip` frames, sum the rewards, observe the max of the last two frames."""

    def __init__(self, env, skip=FRAME_SKIP):
        super().__init__(env)
        self.skip = skip
        self.frames = np.zeros((2, *env.observation_space.shape), dtype=np.uint8)

    def step(self, action):
        total_reward = 0.0
        for i in range(self.skip):
            obs, reward, terminated, truncated, info = self.env.step(action)
            if i >= self.skip - 2:
                self.frames[i - (self.skip - 2)] = obs
            total_reward += reward
            if terminated or truncated:
                break
        return self.frames.max(0), total_reward, terminated, truncated, info


class EpisodicLife(gym.Wrapper):
    """Training only: a life loss ends the episode (terminated) but not the game; the next reset
    continues the game with a no-op. A game over, or a reset with a seed, starts a new game."""

    def __init__(self, env):
        super().__init__(env)
        self.lives, self.game_over = 0, True

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.game_over = terminated or truncated
        lives = self.unwrapped.ale.lives()
        if 0 < lives < self.lives:
            terminated = True
        self.lives = lives
        return obs, reward, terminated, truncated, info

    def reset(self, **kwargs):
        if self.game_over or kwargs.get("seed") is not None:
            obs, info = self.env.reset(**kwargs)
        else:
            obs, _, terminated, truncated, info = self.env.step(0)
            if terminated or truncated:  # the no-op ended the game
                obs, info = self.env.reset(**kwargs)
        self.lives = self.unwrapped.ale.lives()
        return obs, info


class FireReset(gym.Wrapper):
    """Press FIRE (action 1, then action 2) after a reset, for games that wait for it to start."""

    def reset(self, **kwargs):
        self.env.reset(**kwargs)
        obs, _, terminated, truncated, info = self.env.step(1)
        if terminated or truncated:
            self.env.reset(**kwargs)
        obs, _, terminated, truncated, info = self.env.step(2)
        if terminated or truncated:
            obs, info = self.env.reset(**kwargs)
        return obs, info


class ClipReward(gym.RewardWrapper):
    """Training only: reward -> its sign."""

    def reward(self, reward):
        return float(np.sign(reward))


def area_resize_matrix(src: int, dst: int) -> np.ndarray:
    """[dst, src] weights of area interpolation: each output pixel averages the input interval it covers."""
    scale, weights = src / dst, np.zeros((dst, src), np.float32)
    for i in range(dst):
        lo, hi = i * scale, (i + 1) * scale
        for j in range(int(np.floor(lo)), min(int(np.ceil(hi)), src)):
            weights[i, j] = (min(hi, j + 1) - max(lo, j)) / scale
    return weights


class ResizeFrame(gym.ObservationWrapper):
    """Grayscale 210x160 -> 84x84 by area interpolation (OpenCV's INTER_AREA, which CleanRL's
    resize uses; the paper calls it bilinear), as two matrix products: no OpenCV dependency."""

    def __init__(self, env, size=FRAME_SIZE):
        super().__init__(env)
        height, width = env.observation_space.shape
        self.rows, self.cols = area_resize_matrix(height, size), area_resize_matrix(width, size).T.copy()
        self.observation_space = gym.spaces.Box(0, 255, (size, size), np.uint8)

    def observation(self, frame):
        return np.rint(self.rows @ frame.astype(np.float32) @ self.cols).astype(np.uint8)


def wrap_atari(env: gym.Env, train: bool) -> gym.Env:
    """CleanRL's Atari preprocessing around a grayscale, frameskip-1 ALE env. RecordEpisodeStatistics
    sits innermost, so `info["episode"]` is the raw return of the full game (all lives, unclipped)
    and appears only when the game is over. `train` adds life-loss episodes and reward clipping."""
    env = gym.wrappers.RecordEpisodeStatistics(env)
    env = NoopReset(env, NOOP_MAX)
    env = MaxAndSkip(env, FRAME_SKIP)
    if train:
        env = EpisodicLife(env)
    if ale_py.Action.FIRE in env.unwrapped.ale.getMinimalActionSet():
        env = FireReset(env)
    if train:
        env = ClipReward(env)
    env = ResizeFrame(env, FRAME_SIZE)
    return gym.wrappers.FrameStackObservation(env, FRAME_STACK)


def make_env(game: str, seed: int, train: bool, sticky_actions: bool = False, render: bool = False) -> gym.Env:
    """One ALE v5 game with the full 18-action space, so one network plays every game; with
    `render`, env.render() gives the RGB screen. `seed` seeds the action space (the random actions
    before --learning-starts); the emulator is seeded by the caller's env.reset(seed=...)."""
    env = gym.make(f"ALE/{game}-v5", obs_type="grayscale", frameskip=1, full_action_space=True,
                   repeat_action_probability=0.25 if sticky_actions else 0.0, disable_env_checker=True,
                   render_mode="rgb_array" if render else None)
    env = wrap_atari(env, train)
    env.action_space.seed(seed)
    return env


def replay_stage(env: gym.Env, actions: list[int], first_obs, saved_obs: torch.Tensor):
    """Bring a stage's env, just made and reset with the stage's seed (`first_obs`), to where a
    stopped run left it, by replaying the stage's actions with its resets: exact, since the stage's
    seed fixes every random draw of the env (no-op starts, sticky actions). Returns the
    observation (the frame stack), checked against the saved one."""
    obs = first_obs
    for action in actions:
        obs, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            obs, _ = env.reset()
    if not np.array_equal(np.asarray(obs), saved_obs.numpy()):
        fail("the stopped stage did not replay to its saved observation (another ale-py or gymnasium version?); "
             "resume with the versions in config.json")
    return obs


@torch.no_grad()
def rollout(envs, policy, seed, device, max_steps, max_games=None, probe=None):
    """Play full games on the vector of `envs`, with one batched policy call per step, until
    `max_games` games have finished (an env starts a new game while fewer have started) or
    `max_steps` steps, summed over the envs, are spent. A life loss (training wrappers) resets the
    env, which continues the same game. Returns per game started, in start order: its raw
    full-game return (`return`; for a game cut off by the budget, its return so far) and whether it
    finished (`finished`); per policy row, in call order, the game it belongs to (`game`); and the
    steps spent (`steps`). `probe(obs)` runs on every batch."""
    obs, playing = [None] * len(envs), [-1] * len(envs)  # playing[i]: the game env i plays; -1: none (no game left to start)
    returns, finished, game_of_row, steps = [], [], [], 0

    def start(i, reset_seed=None):
        obs[i], playing[i] = envs[i].reset(seed=reset_seed)[0], len(returns)
        returns.append(0.0)
        finished.append(False)

    for i in range(len(envs)):
        if max_games is None or len(returns) < max_games:
            start(i, seed + i)
    while steps < max_steps:
        live = [i for i in range(len(envs)) if playing[i] >= 0]
        if not live:
            break
        batch = torch.as_tensor(np.stack([obs[i] for i in live]), device=device)
        actions = policy(batch).cpu().numpy()
        if probe is not None:
            probe(batch)
        game_of_row.append(np.array([playing[i] for i in live]))
        for action, i in zip(actions, live):
            obs[i], _, terminated, truncated, info = envs[i].step(action)
            steps += 1
            if "episode" in info:  # the game is over (its raw return, whatever wrappers sit above)
                returns[playing[i]], finished[playing[i]] = float(info["episode"]["r"]), True
                playing[i] = -1
                if max_games is None or len(returns) < max_games:
                    start(i)
            elif terminated or truncated:  # a life lost: the game goes on
                obs[i] = envs[i].reset()[0]
    for i in range(len(envs)):
        if playing[i] >= 0:  # cut off by the step budget: its return so far
            returns[playing[i]] = float(envs[i].get_wrapper_attr("episode_returns"))
    return {"return": np.array(returns), "finished": np.array(finished, bool), "steps": steps,
            "game": np.concatenate(game_of_row) if game_of_row else np.zeros(0, int)}


# ------------------------------------------------------------------------------------------
# Networks: CleanRL's sac_atari.py (separate conv encoders for the actor and each critic;
# critics give Q for every action), with fully connected 768 768 (paper C.3)
# ------------------------------------------------------------------------------------------
def layer_init(layer):
    """CleanRL's sac_atari initialisation: Kaiming normal weights, zero bias."""
    nn.init.kaiming_normal_(layer.weight)
    nn.init.constant_(layer.bias, 0.0)
    return layer


def relu_layer(width: int) -> tuple[int, nn.Module, int]:
    """The default hidden_activation: (the Linear's output width, the activation, the activation's output width)."""
    return width, nn.ReLU(), width


def conv_trunk(channels: list[int], hidden: list[int], hidden_activation=relu_layer) -> tuple[nn.Sequential, int]:
    """Nature-DQN convolutions, then Linear + activation per hidden width; `hidden_activation`
    (a method hook) may change the widths of the fully connected layers."""
    c1, c2, c3 = channels
    layers = [layer_init(nn.Conv2d(FRAME_STACK, c1, 8, stride=4)), nn.ReLU(),
              layer_init(nn.Conv2d(c1, c2, 4, stride=2)), nn.ReLU(),
              layer_init(nn.Conv2d(c2, c3, 3, stride=1)), nn.ReLU(), nn.Flatten()]
    in_dim = c3 * CONV_OUT * CONV_OUT
    for width in hidden:
        linear_width, activation, in_next = hidden_activation(width)
        layers += [layer_init(nn.Linear(in_dim, linear_width)), activation]
        in_dim = in_next
    return nn.Sequential(*layers), in_dim


def trunk_hidden_layers(trunk: nn.Sequential) -> list[sn.HiddenLayer]:
    """Skill-neuron candidates: every conv and linear layer of the trunk with the ReLU after it (what
    Eq. 7 masks: its weight rows and bias); a conv channel is one neuron, its activation the spatial
    mean (rows of weight [C_out, C_in, k, k])."""
    modules = list(trunk)
    return [sn.HiddenLayer(act, layer.weight, layer.bias, neuron_dim=0)
            for layer, act in zip(modules, modules[1:]) if isinstance(layer, (nn.Conv2d, nn.Linear))]


def trunk_neuron_layers(trunk: nn.Sequential, heads: list[nn.Module]) -> list[NeuronLayer]:
    """The same layers with the layers that read them, for the baselines (CBP, CoTASP, NPC): the next
    layer, or the heads after the last; the last conv feeds the first linear layer through the
    flatten, CONV_OUT**2 inputs per channel."""
    weighted = [m for m in trunk if isinstance(m, (nn.Conv2d, nn.Linear))]
    readers = [[m] for m in weighted[1:]] + [heads]
    layers = []
    for layer, hidden, group in zip(weighted, trunk_hidden_layers(trunk), readers):
        block = CONV_OUT * CONV_OUT if isinstance(layer, nn.Conv2d) and isinstance(group[0], nn.Linear) else 1
        # inputs are dimension 1 of both nn.Conv2d's [out, in, k, k] and nn.Linear's [out, in] weights
        layers.append(NeuronLayer(hidden, tuple(Consumer(m.weight, m.bias, in_dim=1, block=block) for m in group)))
    return layers


def fc_start(trunk: nn.Sequential) -> int:
    """Where the fully connected layers begin in `trunk` (after the flatten): a network's head for
    plasticity injection (baselines/pi.py) is these layers and its output layer; the conv layers
    before are the encoder."""
    return [isinstance(m, nn.Flatten) for m in trunk].index(True) + 1


class Actor(nn.Module):
    """The policy: a categorical distribution over the actions, from its logits."""

    head_names = ("fc_logits",)  # the output layer

    def head_start(self) -> int:
        """Where the head begins in `trunk` (plasticity injection, baselines/pi.py): fc_start."""
        return fc_start(self.trunk)

    def __init__(self, num_actions, channels, hidden, hidden_activation=relu_layer):
        super().__init__()
        self.trunk, trunk_width = conv_trunk(channels, hidden, hidden_activation)
        self.fc_logits = layer_init(nn.Linear(trunk_width, num_actions))

    def forward(self, x):
        return self.fc_logits(self.trunk(x.float() / 255.0))

    def policy(self, x):
        """Log-probabilities and probabilities of every action: the discrete SAC losses take
        expectations over actions with them, no sampling needed."""
        log_prob = F.log_softmax(self(x), dim=1)
        return log_prob, log_prob.exp()

    def get_action(self, x, generator=None):
        """An action drawn from the policy, with every action's log-probability and probability;
        `generator`: a random stream of its own (stochastic_policy), else torch's global one."""
        log_prob, action_probs = self.policy(x)
        action = torch.multinomial(action_probs, 1, generator=generator).squeeze(1)
        return action, log_prob, action_probs

    def hidden_layers(self) -> list[sn.HiddenLayer]:
        return trunk_hidden_layers(self.trunk)

    def neuron_layers(self) -> list[NeuronLayer]:
        return trunk_neuron_layers(self.trunk, [self.fc_logits])


class SoftQNetwork(nn.Module):
    """A critic: Q of every action from the observation alone (discrete SAC needs no action input)."""

    head_names = ("fc_q",)  # the output layer

    def head_start(self) -> int:
        """Where the head begins in `trunk` (baselines/pi.py): fc_start."""
        return fc_start(self.trunk)

    def __init__(self, num_actions, channels, hidden, hidden_activation=relu_layer):
        super().__init__()
        self.trunk, trunk_width = conv_trunk(channels, hidden, hidden_activation)
        self.fc_q = layer_init(nn.Linear(trunk_width, num_actions))

    def forward(self, x):
        return self.fc_q(self.trunk(x.float() / 255.0))

    def hidden_layers(self) -> list[sn.HiddenLayer]:
        return trunk_hidden_layers(self.trunk)

    def neuron_layers(self) -> list[NeuronLayer]:
        return trunk_neuron_layers(self.trunk, [self.fc_q])


# ------------------------------------------------------------------------------------------
# Replay buffers D and Dpre: every frame stored once, as uint8, preallocated on the training device.
# Dpre is a second ReplayBuffer (main): filled from D's newest rows at each stage end, sampled by
# every --replay-interval-th update.
# ------------------------------------------------------------------------------------------
class ReplayBuffer:
    """Each observation is stored once, as its newest 84x84 frame (a *slot*); its stack is rebuilt
    from the slot and the previous slots of its episode (`history`: how many earlier stack frames
    are previous slots, 0-3; at an episode start the stack repeats its first frame, as
    FrameStackObservation's reset padding does). A transition points at the slot of its
    observation; its next observation is always the following slot, which for an episode's last
    transition holds the true final observation, the next episode starting in a slot of its own.
    `capacity` transitions get capacity + capacity/16 + 4 slots (one extra slot per episode); with
    episodes shorter than 16 steps the oldest transitions leave early. No host synchronisation
    when sampling: one index tensor, gathers on the device."""

    def __init__(self, capacity, device):
        self.capacity, self.device = capacity, device
        self.num_slots = self.slots(capacity)
        self.frames = torch.zeros((self.num_slots, FRAME_SIZE, FRAME_SIZE), dtype=torch.uint8, device=device)
        self.history = torch.zeros(self.num_slots, dtype=torch.uint8, device=device)
        self.obs_slot = torch.zeros(capacity, dtype=torch.long, device=device)
        self.actions = torch.zeros(capacity, dtype=torch.long, device=device)
        self.rewards = torch.zeros(capacity, dtype=torch.float32, device=device)
        self.dones = torch.zeros(capacity, dtype=torch.float32, device=device)
        self.back = torch.arange(FRAME_STACK - 1, -1, -1, device=device)  # how far back each stack position lies
        self.oldest = np.zeros(capacity, np.int64)  # host: first slot (absolute) a transition's stacks use
        self.episode = np.full(capacity, -1, np.int64)  # host: the transition's game (its first global step; -1 unknown)
        self.clear()

    @staticmethod
    def slots(capacity):
        """Frame slots for `capacity` transitions: one per transition, one extra per episode (up to
        one per 16 transitions), and the first stack's padding."""
        return capacity + capacity // 16 + FRAME_STACK

    @classmethod
    def nbytes(cls, capacity):
        """Memory of a buffer of `capacity` transitions: its frame slots (a frame and its history) and
        per-transition arrays (obs_slot, actions, rewards, dones, and the host's oldest and episode)."""
        return cls.slots(capacity) * (FRAME_SIZE * FRAME_SIZE + 1) + capacity * (8 + 8 + 4 + 4 + 8 + 8)

    def clear(self):
        self.slots_written = 0  # absolute slot index = write order; ring position = index % num_slots
        self.first = self.end = 0  # absolute transition indices: the stored ones are [first, end)
        self.last_next_obs, self.last_history = None, 0

    @property
    def size(self):
        return self.end - self.first

    def _evict(self):
        """Drop the oldest transitions whose frames were overwritten."""
        while self.first < self.end and self.oldest[self.first % self.capacity] < self.slots_written - self.num_slots:
            self.first += 1

    def _write_slot(self, frame, history):
        position = self.slots_written % self.num_slots
        self.frames[position].copy_(torch.from_numpy(np.ascontiguousarray(frame)))
        self.history[position] = history
        self.slots_written += 1
        self.last_history = history
        self._evict()

    def add(self, obs, action, reward, next_obs, terminated, episode=-1):
        """obs and next_obs: [stack, 84, 84] uint8 from FrameStackObservation (next_obs[:-1] == obs[1:])."""
        if self.last_next_obs is None or not np.array_equal(obs, self.last_next_obs):
            first = 0  # a new episode: store obs's frames, its leading repeated frame once
            while first < FRAME_STACK - 1 and np.array_equal(obs[first + 1], obs[0]):
                first += 1
            for k in range(first, FRAME_STACK):
                self._write_slot(obs[k], k - first)
        obs_slot, history = self.slots_written - 1, self.last_history
        self._write_slot(next_obs[-1], min(history + 1, FRAME_STACK - 1))
        position = self.end % self.capacity
        self.obs_slot[position] = obs_slot % self.num_slots
        self.actions[position] = int(action)
        self.rewards[position] = float(reward)
        self.dones[position] = float(terminated)
        self.oldest[position] = obs_slot - history
        self.episode[position] = episode
        self.end += 1
        self.first = max(self.first, self.end - self.capacity)
        self.last_next_obs = np.array(next_obs, copy=True)

    def _stacks(self, slots):
        back = torch.minimum(self.back, self.history[slots].long().unsqueeze(-1))
        return self.frames[(slots.unsqueeze(-1) - back) % self.num_slots]

    def sample(self, batch_size):
        index = (self.first + torch.randint(0, self.size, (batch_size,), device=self.device)) % self.capacity
        slot = self.obs_slot[index]
        stacks = self._stacks(torch.stack([slot, (slot + 1) % self.num_slots]))
        return stacks[0], self.actions[index], self.rewards[index], stacks[1], self.dones[index]  # obs, actions, rewards, next_obs, dones

    def episode_index(self, episodes):
        """Ring positions and game tags of the stored transitions of `episodes`, oldest first."""
        positions = (self.first + np.arange(self.size)) % self.capacity
        keep = np.isin(self.episode[positions], episodes)
        return torch.from_numpy(positions[keep]).to(self.device), self.episode[positions[keep]]

    def whole_episodes(self, episodes):
        """The games of `episodes` all of whose transitions are stored. Eviction takes the oldest
        transitions, so only the game of the oldest stored one can be partly stored; stored
        transitions are consecutive global steps and a game's id is its first, so that game is
        whole when the next stored game's id lies as many steps after its own as it has stored
        transitions (with no next game stored, it cannot be told whole and is left out)."""
        tags = self.episode[(self.first + np.arange(self.size)) % self.capacity]
        if not len(tags):
            return []
        later = np.flatnonzero(tags != tags[0])
        oldest_whole = len(later) > 0 and tags[later[0]] - tags[0] == later[0]
        stored = set(tags.tolist()) - (set() if oldest_whole else {tags[0]})
        return [episode for episode in episodes if episode in stored]

    def observations(self, index):
        """The stacked observations of the transitions at ring positions `index`."""
        return self._stacks(self.obs_slot[index])

    def latest_index(self, n):
        """Ring positions of the newest n transitions (all of them when fewer are stored), oldest first."""
        n = min(n, self.size)
        return (self.end - n + torch.arange(n, device=self.device)) % self.capacity

    def latest(self, n):
        """The last n transitions and the slots they use, as a chunk for `extend` (Dpre) or a checkpoint."""
        n = min(n, self.size)
        index = self.latest_index(n)
        start = int(self.oldest[(self.end - n) % self.capacity]) if n else self.slots_written
        count = self.slots_written - start
        position = (start + torch.arange(count, device=self.device)) % self.num_slots
        return {"frames": self.frames[position], "history": self._history_within_chunk(self.history[position]),
                "obs_slot": (self.obs_slot[index] - start) % self.num_slots,
                "actions": self.actions[index], "rewards": self.rewards[index], "dones": self.dones[index],
                "episode": torch.from_numpy(self.episode[index.cpu().numpy()])}

    def extend(self, chunk):
        """Append a chunk made by `latest` (D's newest transitions joining Dpre, or a saved buffer);
        where the whole chunk does not fit, its oldest transitions are dropped."""
        obs_slot, history = chunk["obs_slot"].to(self.device), chunk["history"].to(self.device)
        oldest = (obs_slot - history[obs_slot].long()).cpu().numpy()  # stage boundaries only: a host sync is fine
        n, count = len(obs_slot), len(history)  # the chunk's transitions and slots
        # drop the oldest transitions that do not fit: keep at most `capacity`, whose slots fit in the ring
        dropped = min(n, max(n - self.capacity, int(np.searchsorted(oldest, count - self.num_slots))))
        if dropped == n:
            return
        start = int(oldest[dropped])  # the chunk's first slot that a kept transition uses
        count -= start
        base = self.slots_written
        position = (base + torch.arange(count, device=self.device)) % self.num_slots
        self.frames[position] = chunk["frames"][start:].to(self.device)
        self.history[position] = self._history_within_chunk(history[start:])
        self.slots_written += count
        n -= dropped
        index = (self.end + torch.arange(n, device=self.device)) % self.capacity
        self.obs_slot[index] = (base + obs_slot[dropped:] - start) % self.num_slots
        for name in ("actions", "rewards", "dones"):
            getattr(self, name)[index] = chunk[name][dropped:].to(self.device)
        host_index = (self.end + np.arange(n)) % self.capacity
        self.oldest[host_index] = base + oldest[dropped:] - start
        self.episode[host_index] = chunk["episode"][dropped:].numpy() if "episode" in chunk else -1
        self.end += n
        self.first = max(self.first, self.end - self.capacity)
        self._evict()
        self.last_next_obs = None

    def _history_within_chunk(self, history):
        """The `history` of consecutive slots, capped by each slot's place among them: a chunk
        (`latest`, `extend`) holds no frame from before its first slot."""
        within_chunk = torch.arange(len(history), device=self.device).clamp(max=FRAME_STACK - 1)
        return torch.minimum(history.long(), within_chunk).to(torch.uint8)

    def state_dict(self):
        return {k: v.cpu() for k, v in self.latest(self.size).items()}

    def load_state_dict(self, state):
        self.clear()
        self.extend(state)


# ------------------------------------------------------------------------------------------
# SAC, with NBSP's masked optimizer steps and the hooks of the baselines
# ------------------------------------------------------------------------------------------
class SACLearner:
    """Discrete SAC (CleanRL's sac_atari.py: critics give Q for every action, the losses take
    expectations over actions; Adam eps 1e-4) with NBSP's masked optimizer steps and the hooks of
    a baseline `method` (baselines/__init__.py lists them and what they may use).

    Fast where it is exact: no sampling in the losses, no critic gradients in the actor loss,
    foreach Adam and target copy, no host synchronisation (losses stay tensors). `compile` turns
    the whole update (critic step, actor and temperature steps, masked Adam steps, target copy)
    into one torch.compile graph without graph breaks; `cudagraphs` also replays that graph as a
    CUDA graph (mode "reduce-overhead", capturable Adam)."""

    discrete = True

    def __init__(self, num_actions, args: Args, device, compile=False, cudagraphs=False, method: Method | None = None):
        self.args, self.device, self.num_actions = args, device, num_actions
        self.method = method or Method(args)
        self.actor = self.new_actor()
        self.qf1, self.qf2, self.qf1_target, self.qf2_target = (self.new_critic() for _ in range(4))
        self.qf1_target.load_state_dict(self.qf1.state_dict())
        self.qf2_target.load_state_dict(self.qf2.state_dict())
        adam = dict(eps=1e-4, capturable=cudagraphs, foreach=True)  # eps=1e-4 increases numerical stability (CleanRL)
        q_params = list(self.qf1.parameters()) + list(self.qf2.parameters())
        self.q_optimizer = torch.optim.Adam(q_params, lr=args.q_lr, **adam)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=args.policy_lr, **adam)
        # Eq. 7 masks of their Adam steps: no-ops until SkillNeuronMasks.install after stage 1's identification
        self.q_mask, self.actor_mask = StepMask(args.mask_target), StepMask(args.mask_target)
        # a share of the uniform policy's entropy, log(num_actions) (CleanRL's sac_atari)
        self.target_entropy = -args.target_entropy_scale * float(np.log(1.0 / num_actions))
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
            next_log_pi, next_probs = self.actor.policy(next_obs)
            min_qf_next_target = torch.min(self.qf1_target(next_obs), self.qf2_target(next_obs))
            # the action probabilities give the expectation over next actions exactly
            next_value = (next_probs * (min_qf_next_target - alpha * next_log_pi)).sum(1)
            next_q_value = rewards + (1 - dones) * self.args.gamma * next_value
        qf1_a_values = self.qf1(obs).gather(1, actions.unsqueeze(1)).squeeze(1)  # Q of the taken actions only
        qf2_a_values = self.qf2(obs).gather(1, actions.unsqueeze(1)).squeeze(1)
        qf1_loss, qf2_loss = F.mse_loss(qf1_a_values, next_q_value), F.mse_loss(qf2_a_values, next_q_value)
        qf_loss = qf1_loss + qf2_loss
        penalty = self.method.extra_loss("critic")
        fast_adam.zero_grad_(self.q_optimizer)
        (qf_loss if penalty is None else qf_loss + penalty).backward()
        self.method.after_backward("critic")
        self.masked_step(self.q_optimizer, self.q_mask)
        self.method.after_step("critic")
        if update_target:  # a hard copy at tau = 1 (paper Table 6), else Polyak averaging
            # parameter lists built here: a method may have grown the critics (PI)
            q_params = [p for net in self.critics for p in net.parameters()]
            q_target_params = [p for net in self.critic_targets for p in net.parameters()]
            with torch.no_grad():
                if self.args.tau == 1.0:
                    torch._foreach_copy_(q_target_params, q_params)
                else:
                    torch._foreach_lerp_(q_target_params, q_params, self.args.tau)
        return {"qf1_values": qf1_a_values.mean().detach(), "qf2_values": qf2_a_values.mean().detach(),
                "qf1_loss": qf1_loss.detach(), "qf2_loss": qf2_loss.detach(), "qf_loss": qf_loss.detach() / 2.0}

    def actor_step(self, obs):
        log_pi, action_probs = self.actor.policy(obs)
        with torch.no_grad():  # the critics after their step, as CleanRL; no critic gradients
            min_qf_values = torch.min(self.qf1(obs), self.qf2(obs))
        # no reparameterization: the expectation over actions is computed exactly
        actor_loss = (action_probs * (self.log_alpha.exp().detach() * log_pi - min_qf_values)).mean()
        penalty = self.method.extra_loss("actor")
        fast_adam.zero_grad_(self.actor_optimizer)
        (actor_loss if penalty is None else actor_loss + penalty).backward()
        self.method.after_backward("actor")
        self.masked_step(self.actor_optimizer, self.actor_mask)
        self.method.after_step("actor")
        logs = {"actor_loss": actor_loss.detach(), "entropy": -(action_probs * log_pi).sum(1).mean().detach()}
        if self.args.autotune:
            # reuse the action probabilities for the temperature loss
            alpha_loss = (action_probs.detach() * (-self.log_alpha.exp() * (log_pi + self.target_entropy).detach())).mean()
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

    def update(self, data, update_policy: bool, update_target: bool) -> dict:
        """One critic step (and the target update with `update_target`); with `update_policy`,
        one actor (and alpha) step. This script always passes update_policy=True: CleanRL's
        sac_atari updates the actor at every update. The parameter keeps the signature of the
        Meta-World learner (delayed policy updates) for code shared by both scripts: the methods'
        after_update(data, update_policy, update_target) hook passes it on, as ANCL does to its
        auxiliary learner (baselines/ancl.py)."""
        if self.compiled:  # gradients and Adam's lazily created state, made before the graph reads them
            for optimizer in (self.q_optimizer, self.actor_optimizer, self.a_optimizer):
                fast_adam.prepare_graph_optimizer_(optimizer)
        return self.update_step(*data, update_policy, update_target)

    def update_step(self, obs, actions, rewards, next_obs, dones, update_policy: bool, update_target: bool):
        """The whole update; under `compile`, one graph per (policy update or not, target update or not)."""
        logs = self.critic_step(obs, actions, rewards, next_obs, dones, update_target)
        if update_policy:
            logs |= self.actor_step(obs)
        logs["alpha"] = self.log_alpha.detach().exp()[0]
        return logs

    def watched_tensors(self) -> dict:
        """What must stay finite: the temperature and every parameter of the actor and the critics."""
        return {"log_alpha": self.log_alpha, **{f"actor.{n}": p for n, p in self.actor.named_parameters()},
                **{f"qf1.{n}": p for n, p in self.qf1.named_parameters()},
                **{f"qf2.{n}": p for n, p in self.qf2.named_parameters()}}

    # What baseline methods use (see baselines/__init__.py)
    def new_actor(self):
        return Actor(self.num_actions, self.args.conv_channels, self.args.hidden, self.method.hidden_activation).to(self.device)

    def new_critic(self):
        return SoftQNetwork(self.num_actions, self.args.conv_channels, self.args.hidden,
                            self.method.hidden_activation).to(self.device)

    @property
    def critics(self):
        return [self.qf1, self.qf2]

    @property
    def critic_targets(self):
        return [self.qf1_target, self.qf2_target]

    def q_values(self, obs, actions):
        return torch.stack([qf(obs).gather(1, actions.long().view(-1, 1)).squeeze(1) for qf in self.critics])

    def neuron_layers(self) -> dict[str, list[NeuronLayer]]:
        return {"actor": self.actor.neuron_layers(), "qf1": self.qf1.neuron_layers(), "qf2": self.qf2.neuron_layers()}

    def heads(self) -> list[tuple[nn.Module, int, tuple[str, ...]]]:
        return [(net, net.head_start(), net.head_names) for net in (self.actor, *self.critics, *self.critic_targets)]

    def reset_critics(self):
        """Fresh critics and targets, initial temperature, and optimizers without their moments."""
        for qf, qf_target in zip(self.critics, self.critic_targets):
            fresh = self.new_critic()
            qf.load_state_dict(fresh.state_dict())
            qf_target.load_state_dict(fresh.state_dict())
        with torch.no_grad():
            self.log_alpha.fill_(float(np.log(self.args.alpha)))
        self.q_optimizer.state.clear()
        self.a_optimizer.state.clear()

    def plain_copy(self) -> "SACLearner":
        copy = SACLearner(self.num_actions, self.args, self.device)
        copy.load_state_dict(self.state_dict())
        return copy

    def state_dict(self):
        return {"actor": self.actor.state_dict(), "qf1": self.qf1.state_dict(), "qf2": self.qf2.state_dict(),
                "qf1_target": self.qf1_target.state_dict(), "qf2_target": self.qf2_target.state_dict(),
                "log_alpha": self.log_alpha.detach().cpu(), "actor_optimizer": self.actor_optimizer.state_dict(),
                "q_optimizer": self.q_optimizer.state_dict(), "a_optimizer": self.a_optimizer.state_dict()}

    def load_state_dict(self, state):
        for name in ("actor", "qf1", "qf2", "qf1_target", "qf2_target"):
            getattr(self, name).load_state_dict(state[name])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        self.actor_optimizer.load_state_dict(state["actor_optimizer"])
        self.q_optimizer.load_state_dict(state["q_optimizer"])
        self.a_optimizer.load_state_dict(state["a_optimizer"])


# ------------------------------------------------------------------------------------------
# NBSP pieces: the identification window and skill-neuron identification (Alg. 1)
# ------------------------------------------------------------------------------------------
def stochastic_policy(actor, seed, device):
    """The training policy, sampling from its own generator: evaluation and identification
    leave the training run's random streams untouched."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return lambda obs: actor.get_action(obs, generator)[0]


def probe_networks(sac, masked, obs, actor=True):
    """Forward the masked networks on `obs` (their activations are being recorded); the critics'
    hidden activations depend on the observation only: the Q head gives every action's value.
    actor=False leaves the actor out where its own policy call on `obs` records it (rollouts)."""
    if actor and "actor" in masked:
        sac.actor(obs)
    for name in sn.APPLY_TO["critic"]:
        if name in masked:
            getattr(sac, name)(obs)


def training_window(sac, masked, rb, stage_games, args, device):
    """The stage's own last `identify_episodes` policy games, taken from D (Alg. 1 runs over
    training steps), widened backwards while their return is constant, over the games D still
    holds whole only (D keeps far fewer steps than a stage). The end-of-stage networks are run on
    the window's stored observations (their activations, not those the networks had while the
    games were played). None if no policy game of the stage is whole in D."""
    stored = set(rb.whole_episodes([g["id"] for g in stage_games if g["policy"]]))
    whole_policy_games = [g for g in stage_games if g["id"] in stored]
    if not whole_policy_games:
        return None
    window, _, widened = sn.identification_window(whole_policy_games, args.identify_episodes, ("return",))
    index, tags = rb.episode_index([g["id"] for g in window])
    rows = np.arange(len(tags))
    if len(rows) > args.identify_max_steps:  # evenly spaced rows keep every game of a wide window
        rows = np.linspace(0, len(rows) - 1, args.identify_max_steps).astype(np.int64)
    index, tags = index[torch.from_numpy(rows).to(device)], tags[rows]
    with torch.no_grad():
        for start in range(0, len(index), RECORD_CHUNK):
            probe_networks(sac, masked, rb.observations(index[start : start + RECORD_CHUNK]))
    by_id = {g["id"]: g["return"] for g in window}
    return {"goal": torch.tensor([by_id[tag] for tag in tags], dtype=torch.float32), "episodes": len(window),
            "widened": widened, "mean_return": float(np.mean(list(by_id.values())))}


def rollout_window(sac, masked, envs, args, stage_seed, device):
    """`identify_episodes` games of the stochastic policy after the stage (training wrappers);
    the actor's activations are those of the calls that pick the actions."""
    window = rollout(envs, stochastic_policy(sac.actor, stage_seed, device), stage_seed, device,
                     args.identify_max_steps, max_games=args.identify_episodes,
                     probe=lambda obs: probe_networks(sac, masked, obs, actor=False))
    return {"goal": torch.as_tensor(window["return"][window["game"]], dtype=torch.float32),
            "episodes": len(window["return"]), "widened": False, "mean_return": float(window["return"].mean()),
            "unfinished": int((~window["finished"]).sum())}


def identify_skill_neurons(sac, masks: sn.SkillNeuronMasks, rb, stage_games, identify_envs, args, label, stage_seed, device):
    """Alg. 1 after a stage: record the masked networks' hidden activations over the window (the
    goal metric of a step: the raw return of the full game it belongs to), score the neurons
    against it, select the top skill_ratio of each network, and turn the selection into Eq. 7
    masks combined with the earlier stages' (`masks.update`), which the optimizers then apply
    (`masks.install`). Returns the stage's record and the selections."""
    window_kind, fallback = args.identify_window, None
    # the masked networks' hidden activations are recorded as the window's observations pass through them
    layers = [layer for name in masks.masked for layer in masks.networks[name]]
    with sn.ActivationRecorder(layers) as recorder:
        window = training_window(sac, masks.masked, rb, stage_games, args, device) if window_kind == "training" else None
        if window is None:
            if window_kind == "training":
                policy_game_finished = any(g["policy"] for g in stage_games)
                window_kind, fallback = "rollout", ("no policy game of the stage is whole in D" if policy_game_finished
                                                    else "no policy game finished in the stage")
                print(f"{label}: {fallback}; "
                      f"identifying on {args.identify_episodes} post-stage games instead", file=sys.stderr)
            window = rollout_window(sac, masks.masked, identify_envs, args, stage_seed, device)
    activations = sn.split_recorded([a.cpu() for a in recorder.activations()], masks.networks, masks.masked)
    goal = window["goal"]
    record = {"identify_window": window_kind, "identify_fallback": fallback, "identify_episodes": window["episodes"],
              "identify_steps": len(goal), "identify_widened": window["widened"], "goal_metric": "return",
              "identify_mean_return": window["mean_return"], "identify_unfinished_games": window.get("unfinished", 0),
              "goal_constant": sn.goal_is_constant(goal)}
    print(f"{label} identification: {window_kind} window, {record['identify_episodes']} games"
          f"{' (widened)' if record['identify_widened'] else ''}, {record['identify_steps']} steps, "
          f"mean return {record['identify_mean_return']:g}")
    if record["goal_constant"]:
        print(f"warning: {label}: the goal metric is constant ({goal[0]:g}) over the identification window, so "
              + sn.constant_goal_warning(args.goal_score, args.identify), file=sys.stderr)

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
def normalized_score(raw_return: float, scores: tuple[float, float]) -> float:
    """Paper Eq. 12: R = (r - r_random) / (r_human - r_random)."""
    random_score, human_score = scores
    return (raw_return - random_score) / (human_score - random_score)


@torch.no_grad()
def measure_plasticity(sac, networks, probe_obs, dormant_threshold):
    """Plasticity diagnostics of the actor and both critics on the probe batch: dormant ratio,
    feature rank of the last hidden layer, mean absolute weight."""
    measured = {name: [sac.method.feature_layer(layer) for layer in networks[name]] for name in sn.NETWORKS}
    with sn.ActivationRecorder([layer for name in sn.NETWORKS for layer in measured[name]]) as recorder:
        for net in (sac.actor, sac.qf1, sac.qf2):
            net(probe_obs.to(sac.device))
    activations = sn.split_recorded(recorder.activations(), measured, sn.NETWORKS)
    return {name: plasticity.plasticity_stats(measured[name], activations[name], dormant_threshold) for name in sn.NETWORKS}


def evaluate_all(eval_envs, actor, method, normalization, args, device):
    """Raw and normalized (Eq. 12) return of every game of the run, the mean over the games
    finished within --eval-steps, and the number of finished games. A game with none finished
    has no score (None): a game cut off by the budget is not scored from its partial return."""
    returns, normalized, finished = {}, {}, {}
    for game, envs in eval_envs.items():
        with method.acting(game):
            result = rollout(envs, stochastic_policy(actor, args.seed, device), args.seed, device, args.eval_steps)
        done = result["return"][result["finished"]]
        returns[game] = float(done.mean()) if len(done) else None
        normalized[game] = normalized_score(returns[game], normalization[game]) if len(done) else None
        finished[game] = len(done)
    unscored = [game for game in returns if returns[game] is None]
    if unscored:
        print(f"warning: no {'/'.join(unscored)} game finished within --eval-steps {args.eval_steps} "
              f"({args.eval_envs} envs): score missing (null in metrics.json, n/a in the tables); raise --eval-steps")
    return returns, normalized, finished


def video_recorder(games, sac, method, args, device):
    """Evaluation.record: a game played by the evaluation's policy (the stochastic policy, its
    generator seeded with --seed) on a rendering env copy made like the first evaluation copy, to
    the game's end or --video-steps steps; every step's RGB screen, scaled to --video-size rows."""
    envs = {game: make_env(game, args.seed + protocol.EVAL_SEED_OFFSET, False, args.sticky_actions, render=True)
            for game in games}

    @torch.no_grad()
    def record(game):
        env, policy = envs[game], stochastic_policy(sac.actor, args.seed, device)
        with method.acting(game):
            obs, frames = env.reset(seed=args.seed)[0], [env.render()]
            for _ in range(args.video_steps):
                obs, _, terminated, truncated, _ = env.step(policy(torch.as_tensor(np.asarray(obs)[None], device=device)).item())
                frames.append(env.render())
                if terminated or truncated:  # the game is over (evaluation wrappers: no life-loss episodes)
                    break
        height, width = frames[0].shape[:2]
        out_width = 2 * round(args.video_size * width / height / 2)  # even, as the encoder needs
        rows, cols = np.arange(args.video_size) * height // args.video_size, np.arange(out_width) * width // out_width
        return np.stack(frames)[:, rows[:, None], cols], 60 / FRAME_SKIP  # nearest pixels; ALE runs at 60 frames/s

    return record


def scores_text(returns, normalized) -> str:
    """`Pong=-20.0 (0.02) Bowling=n/a` for the console."""
    return " ".join(f"{g}=n/a" if r is None else f"{g}={r:.1f} ({normalized[g]:.2f})" for g, r in returns.items())


def evaluation(run, sac, method, rb, masks, eval_envs, normalization, args, device) -> protocol.Evaluation:
    """Every game's return, the plasticity diagnostics on a fixed batch (the newest observations of
    D at the run's first evaluation) and, with --capture-video, the recorded games. Scores:
    (returns, normalized, finished)."""

    def score(step):
        returns, normalized, finished = evaluate_all(eval_envs, sac.actor, method, normalization, args, device)
        for game in returns:
            run.writer.add_scalar(f"eval/{game}/finished_games", float(finished[game]), step)
            if returns[game] is not None:
                run.writer.add_scalar(f"eval/{game}/return", returns[game], step)
                run.writer.add_scalar(f"eval/{game}/normalized_return", normalized[game], step)
        return returns, normalized, finished

    def probe():
        return rb.observations(rb.latest_index(PLASTICITY_PROBE)).clone()

    return protocol.Evaluation(
        score, brief=lambda scores: "/".join(protocol.format_score(v) for v in scores[1].values()),
        text=lambda scores: f"return {scores_text(*scores[:2])}", probe=probe,
        plasticity=lambda batch: measure_plasticity(sac, masks.networks, batch, args.dormant_threshold),
        record=video_recorder(list(eval_envs), sac, method, args, device) if args.capture_video else None)


def main(args: Args) -> dict:
    validate(args)
    args, checkpoint = protocol.load_resume(args, validate)
    stage_tasks = [canonical_game(g) for g in args.games] * args.cycles
    unique_games = list(dict.fromkeys(stage_tasks))
    normalization = parse_game_scores(args.game_scores)
    H = len(stage_tasks)
    is_nbsp = args.method == "nbsp"  # every other method runs without NBSP's mask and Dpre
    use_mask, use_replay = is_nbsp and args.mask, is_nbsp and args.replay and H > 1
    run = protocol.Run(args, __file__, "+".join(unique_games), stage_tasks, average="AR",
                       rows=("task_success", "task_return"), checkpoint=checkpoint)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if args.cudagraphs and device.type != "cuda":
        fail("--cudagraphs needs a CUDA device (and --cuda); use --compile on CPU")
    # a share after every stage but the last, so Dpre never overwrites; no replay, no Dpre memory
    dpre_capacity = args.dpre_per_task * (H - 1) if use_replay else 0
    protocol.check_memory(ReplayBuffer.nbytes(args.buffer_size) + ReplayBuffer.nbytes(dpre_capacity), device,
                          f"D (--buffer-size {args.buffer_size})" + (f" and Dpre (--dpre-per-task {args.dpre_per_task} x "
                                                                     f"{H - 1})" if use_replay else ""))
    if run.all_stages_done():  # killed between the last checkpoint and metrics.json?
        return run.write_metrics()

    # fixed pools of env copies per game: eval_envs (full games, raw rewards) and, with the mask,
    # identify_envs for rollout identification windows (training wrappers: the states the agent trains on).
    # Their seeds reach only the action spaces, which nothing samples: `rollout` seeds each game's reset.
    eval_envs = {game: [make_env(game, args.seed + protocol.EVAL_SEED_OFFSET + i, False, args.sticky_actions)
                        for i in range(args.eval_envs)] for game in unique_games}
    identify_envs = {game: [make_env(game, args.seed + protocol.EVAL_SEED_OFFSET + i, True, args.sticky_actions)
                            for i in range(min(args.eval_envs, args.identify_episodes) if use_mask else 0)]
                     for game in unique_games}
    num_actions = int(eval_envs[unique_games[0]][0].action_space.n)

    protocol.seed_everything(args.seed, args.torch_deterministic)
    method = baselines.make_method(args)
    sac = SACLearner(num_actions, args, device, compile=args.compile, cudagraphs=args.cudagraphs, method=method)
    method.setup(sac)
    masks = sn.SkillNeuronMasks(  # NBSP's skill-neuron masks of the networks it protects (--apply-to)
        {"actor": sac.actor.hidden_layers(), "qf1": sac.qf1.hidden_layers(), "qf2": sac.qf2.hidden_layers()},
        masked=list(sn.APPLY_TO[args.apply_to]),
        step_masks=[(sac.actor_mask, sn.APPLY_TO["actor"]), (sac.q_mask, sn.APPLY_TO["critic"])],
        mask_alpha=args.mask_alpha, hard=args.hard_mask, combine=args.mask_combine)
    rb = ReplayBuffer(args.buffer_size, device)
    dpre = ReplayBuffer(dpre_capacity, device)
    run.restore(method, sac, masks, dpre, rb, install_masks=use_mask)
    run.open(device, {"stage_tasks": stage_tasks, "device": str(device),
                      "normalization": {game: normalization[game] for game in unique_games},
                      "versions": {name: version(name) for name in ("torch", "ale-py", "gymnasium", "numpy")}},
             sac.watched_tensors, evaluation(run, sac, method, rb, masks, eval_envs, normalization, args, device),
             upper_bound=False)

    for stage in range(run.start_stage, H):
        game = stage_tasks[stage]
        stage_seed = run.begin_stage(stage)
        env = make_env(game, stage_seed, True, args.sticky_actions)
        resumed = run.mid_stage(stage)  # the state of the stage's steps, for a run stopped inside it
        if not args.keep_buffer and not resumed:
            rb.clear()
        method.begin_stage(stage, game)
        obs, _ = env.reset(seed=stage_seed)
        game_start, game_id = 0, run.global_step + 1  # a game's id: its first global step
        stage_games = []  # finished games: id, raw return, played by the policy
        # the stage's updates, those on a batch of Dpre, and whether a loss log waits for an update on D
        updates, dpre_updates, log_due = 0, 0, False
        stage_actions = []  # the env's actions since the stage's reset, which replay it exactly
        if resumed:
            stage_actions = resumed["env"]["actions"].tolist()
            obs = replay_stage(env, stage_actions, obs, resumed["env"]["obs"])
            env.action_space.np_random.bit_generator.state = resumed["env"]["action_space_rng"]
            game_start, game_id, stage_games = resumed["game_start"], resumed["game_id"], resumed["stage_games"]
            updates, dpre_updates, log_due = resumed["updates"], resumed["dpre_updates"], resumed["log_due"]
            rb.last_history = resumed["rb_last_history"]  # D's link to the frames of the game in progress
            rb.last_next_obs = None if resumed["rb_last_next_obs"] is None else resumed["rb_last_next_obs"].numpy()
            protocol.set_rng_state(resumed["rng"])

        def stage_state():  # what the stage's next step depends on, besides the learning state and the RNGs
            return {"rb_last_history": rb.last_history,
                    "rb_last_next_obs": None if rb.last_next_obs is None else torch.from_numpy(rb.last_next_obs),
                    "env": {"actions": torch.tensor(stage_actions, dtype=torch.uint8), "obs": torch.as_tensor(np.asarray(obs)),
                            "action_space_rng": env.action_space.np_random.bit_generator.state},
                    "game_start": game_start, "game_id": game_id, "stage_games": stage_games, "updates": updates,
                    "dpre_updates": dpre_updates, "log_due": log_due}

        for step in range(run.resume_step() if resumed else 0, args.steps_per_task):
            global_step = run.next_step()
            # ALGO LOGIC: act, store the transition in D
            if step < args.learning_starts:
                action = env.action_space.sample()
            else:
                action = sac.act(torch.as_tensor(obs, device=device)[None])[0].item()
            next_obs, reward, terminated, truncated, info = env.step(action)
            stage_actions.append(action)
            # done = life lost or game over (CleanRL); a truncated game bootstraps from its true final frame
            rb.add(obs, action, reward, next_obs, terminated, game_id)
            obs = next_obs
            if terminated or truncated:  # a life lost (EpisodicLife: the reset continues the game) or the game over
                if "episode" in info:  # the full game is over: its raw return, all lives, unclipped
                    game_return = info["episode"]["r"]
                    run.writer.add_scalar("charts/episodic_return", game_return, global_step)
                    run.writer.add_scalar("charts/episodic_length", info["episode"]["l"], global_step)
                    run.writer.add_scalar("charts/normalized_return", normalized_score(game_return, normalization[game]), global_step)
                    played_by_policy = game_start >= args.learning_starts  # random-action games say nothing of the policy
                    stage_games.append({"id": game_id, "return": float(game_return), "policy": played_by_policy})
                    game_start, game_id = step + 1, global_step + 1
                obs, _ = env.reset()

            # ALGO LOGIC: one SAC update on a batch of D, or of Dpre every replay_interval-th gradient step
            if step >= args.learning_starts and (step - args.learning_starts) % args.update_frequency == 0:
                # this update's index in the stage (0-based): the Dpre and target schedules restart each stage
                update_index = (step - args.learning_starts) // args.update_frequency
                from_dpre = use_replay and dpre.size > 0 and update_index % args.replay_interval == 0
                data = (dpre if from_dpre else rb).sample(args.batch_size)
                # the target network follows the first update at or after every target_network_frequency env steps
                update_target = (step - args.learning_starts) % args.target_network_frequency < args.update_frequency
                logs = sac.update(data, update_policy=True, update_target=update_target)
                method.after_update(data, True, update_target)
                updates, dpre_updates = updates + 1, dpre_updates + from_dpre
                # log every 100 updates (the only host synchronisation of the update path), at the first
                # update since then that trains on D: Dpre's batches (the 0th, 10th, ...) would show only
                # the old tasks' losses and values
                log_due |= update_index % 100 == 0
                if log_due and (not from_dpre or args.replay_interval == 1):
                    log_due = False
                    run.log_losses({name: value.item() for name, value in logs.items()})
                    run.log_method_and_sps(method, step)
            run.advance(step, args.learning_starts, lambda: {
                "returns": f"{np.mean([g['return'] for g in stage_games[-10:]]):.1f}" if stage_games else "n/a"})
            run.evaluate_if_due(step)
            run.end_step(step, stage_state)
        env.close()
        stage_steps = step + 1

        # end of stage: evaluate every game (row of sr), identify skill neurons, fill Dpre; the normalized
        # returns are sr's row and the "task_success" row, the raw returns the "task_return" row (the rows
        # declared in protocol.Run(rows=...))
        (returns, normalized, _), plasticity = run.evaluate_stage(
            stage_steps, row=lambda scores: scores[1], task_success=lambda scores: scores[1],
            task_return=lambda scores: scores[0])
        # one actor step on the critic's batch per update (CleanRL's sac_atari): both follow Dpre's schedule
        record = {"stage": stage + 1, "task": game, "env_steps": stage_steps, "budget_steps": args.steps_per_task,
                  "critic_updates": updates, "critic_dpre_updates": dpre_updates, "actor_updates": updates,
                  "actor_dpre_updates": dpre_updates, "plasticity": plasticity,
                  "eval_unscored": [g for g, r in returns.items() if r is None],  # no game finished: no score
                  "wall_seconds": None}
        neuron_scores = {}  # each network's skill-neuron scores, saved with the stage's checkpoint
        if use_mask:  # ALGO LOGIC: identify the stage's skill neurons (Alg. 1), combine their Eq. 7 masks
            label = f"stage {stage + 1} ({game})"
            neuron_record, found = identify_skill_neurons(sac, masks, rb, stage_games, identify_envs[game], args, label,
                                                          stage_seed, device)
            sn.report_selection(run.writer, neuron_record, found, label, args.goal_score, run.global_step)
            run.writer.add_scalar("neurons/identify_mean_return", neuron_record["identify_mean_return"], run.global_step)
            neuron_scores = {name: identified.mask_scores for name, identified in found.items()}
            record |= neuron_record
        if use_replay and stage < H - 1:  # ALGO LOGIC: Dpre gets the stage's last transitions played by the policy
            # at most --dpre-per-task, only steps after --learning-starts (policy actions), no more than D holds
            record["dpre_added"] = min(args.dpre_per_task, max(0, stage_steps - args.learning_starts), rb.size)
            dpre.extend(rb.latest(record["dpre_added"]))
        if stage < H - 1:
            method.end_stage(stage, game, rb)  # a task switch follows
        run.end_stage(record, (returns, normalized))
        metrics = run.save_checkpoint({"actor": sac.actor.state_dict(), "qf1": sac.qf1.state_dict(),
                                       "qf2": sac.qf2.state_dict()}, neuron_scores)
    for envs in [*eval_envs.values(), *identify_envs.values()]:
        for e in envs:
            e.close()
    return run.close(metrics)


if __name__ == "__main__":
    main(protocol.parse_args(Args, __doc__))
