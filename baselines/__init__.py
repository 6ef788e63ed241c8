"""The baselines of the NBSP paper (Appendix C.1), plugged into both training scripts by `--method`.

Every method trains the scripts' own SAC on the same cycling protocol, with the same evaluation,
logging and checkpoints as NBSP; NBSP's skill-neuron mask and Dpre replay are off for all of them.
A method is a `Method` subclass overriding some of the hooks below. Both scripts call each hook
at the same point, so a new method is one new module plus one line in `METHODS`.

Network construction
    hidden_activation(width)      -> (linear_width, activation module, output_width) of a hidden
                                     fully connected layer (CReLU changes it)
    setup(learner)                once the learner's networks and optimizers exist, before a
                                  checkpoint is loaded
Training
    begin_stage(stage, task)      before the first environment step of a stage
    acting(task)                  context around the evaluation rollouts of `task` (training acts
                                  on the task begin_stage named); only CoTASP uses the identity
    extra_loss(network)           scalar added to the "critic" or "actor" loss before backward
    after_backward(network)       gradients of that loss are in `.grad`, the step comes next
    after_step(network)           right after that network's optimizer step
    after_update(data, update_policy, update_target)   after the learner's whole update on
                                  the batch `data` (obs, actions, rewards, next_obs, dones)
    end_stage(stage, task, rb)    at a task switch, after the finished stage's evaluation; `rb`
                                  is its replay buffer (`rb.sample(n)` -> obs, actions, ...)
Bookkeeping
    logs()                        scalars written to TensorBoard as `method/{name}` with the losses
    state_dict(), load_state_dict(state)   method state saved in every checkpoint; loading runs
                                  after `setup` and before the learner's own state, so methods
                                  that grow networks (PI) rebuild their shape first

What a method may use of the learner (both scripts' `SACLearner`):
    actor                         Meta-World: forward(obs) -> (mean, log_std) of the pre-tanh
                                  Gaussian; Atari: forward(obs) -> logits over actions
    discrete                      True for Atari
    critics, critic_targets       lists of critic modules (Meta-World: [qf], one module holding
                                  both critics; Atari: [qf1, qf2]) and their targets
    q_values(obs, actions)        [num_critics, B]: Q of the given actions for every critic
    actor_optimizer, q_optimizer  `MaskedOptimizer`s: `.optimizer` is the Adam, `set_masks(...)`
                                  scales the steps of chosen parameters
    neuron_layers()               {"actor"|"qf1"|"qf2": [NeuronLayer]} hidden layers with the
                                  layers that consume their output
    heads()                       [(network, start, outputs)] for the actor, the critics and the
                                  critic targets: the network's head is `network.trunk[start:]`
                                  followed by its output layers, the attributes named in `outputs`
                                  (all reading the trunk's output); the trunk before `start` is the
                                  encoder. Meta-World: the last hidden layer (Linear + activation);
                                  Atari: every fully connected layer after the conv encoder. Each
                                  network gives its own `head_start()` and `head_names` (PI)
    new_actor(), new_critic()     freshly initialised networks, built as the learner builds its own
    reset_critics()               fresh critics, targets, temperature and their optimizers
    plain_copy()                  an independent learner with the same weights and no method
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import skill_neurons as sn

METHODS = ("nbsp", "sac", "ewc", "npc", "ancl", "cotasp", "crelu", "cbp", "pi")


@dataclass(frozen=True)
class Consumer:
    """A layer reading a hidden layer's output: the slices of `weight` along `in_dim` (a dimension
    of the whole tensor; ensembles index their member on dimension 0) are the neurons' outgoing
    weights; a flattened conv channel feeds `block` consecutive inputs."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    in_dim: int
    member: int | None = None
    block: int = 1


@dataclass(frozen=True)
class NeuronLayer:
    hidden: sn.HiddenLayer
    consumers: tuple[Consumer, ...]


class Method:
    """Plain SAC: every hook does nothing. `--method sac` is this class."""

    name = "sac"

    def __init__(self, args):
        self.args = args

    def hidden_activation(self, width: int) -> tuple[int, nn.Module, int]:
        return width, nn.ReLU(), width

    def setup(self, learner) -> None:
        self.learner = learner

    def begin_stage(self, stage: int, task: str) -> None:
        pass

    def acting(self, task: str):
        return contextlib.nullcontext()

    def extra_loss(self, network: str) -> Tensor | None:
        return None

    def after_backward(self, network: str) -> None:
        pass

    def after_step(self, network: str) -> None:
        pass

    def after_update(self, data, update_policy: bool, update_target: bool) -> None:
        pass

    def end_stage(self, stage: int, task: str, rb) -> None:
        pass

    def logs(self) -> dict[str, Tensor | float]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def make_method(args) -> Method:
    """The `Method` of `args.method`; NBSP is the scripts' own code, so it gets plain hooks."""
    if args.method in ("nbsp", "sac"):
        return Method(args)
    import importlib

    module = importlib.import_module(f"baselines.{args.method}")
    return module.METHOD(args)
