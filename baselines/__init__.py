"""The baselines of the NBSP paper (Appendix C.1), plugged into both training scripts by `--method`.

Every method trains the scripts' own SAC on the same cycling protocol, with the same evaluation,
logging and checkpoints as NBSP; NBSP's skill-neuron mask and Dpre replay are off for all of them.
A method is a `Method` subclass (baselines/method.py) that declares its `name`, its table
`label`, its command-line `flags` (`Flag`: default, help and the check of its value) and
overrides some of the hooks below. Both scripts call each hook at the same point. This package
is the one registry of methods: both scripts' `--method` choices and flags, their flag checks,
scripts/sweep.py, scripts/paper_tables.py and the tests read it. A new method is one new module plus
its name in `BASELINE_MODULES`.

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
    feature_layer(layer)          the hidden layer (skill_neurons.HiddenLayer) as the plasticity
                                  diagnostics measure it: PI points it at the module that sums its
                                  head's pieces and at the weights of its trainable piece
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
    actor_optimizer, q_optimizer  the Adam optimizers of the actor and of the critics
    actor_mask, q_mask            `fast_adam.StepMask`s of their steps: `set(...)` scales the
                                  steps of chosen parameters
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

import importlib

from baselines.method import Flag, Method

# The paper's baselines in the order of its Table 1, each a module of this package.
BASELINE_MODULES = ("ewc", "npc", "ancl", "cotasp", "crelu", "cbp", "pi")


class NBSP(Method):
    """NBSP is the training scripts' own code (skill neurons, mask, Dpre): as a method its hooks
    do nothing. Its flags are declared in each script's Args (their defaults differ by domain)."""

    name, label = "nbsp", "NBSP"
    flag_names = ("mask", "replay", "hard_mask", "identify", "identify_window", "goal_score", "apply_to",
                  "skill_ratio", "mask_alpha", "mask_target", "mask_combine", "replay_interval", "dpre_per_task",
                  "identify_episodes", "identify_max_steps")


METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (
    NBSP, Method, *(importlib.import_module(f"baselines.{module}").METHOD for module in BASELINE_MODULES))}
METHOD_NAMES = tuple(METHODS)
LABELS = {name: cls.label for name, cls in METHODS.items()}
BASELINES = tuple(name for name in METHODS if name not in (NBSP.name, Method.name))


def method_flags() -> dict[str, Flag]:
    """Every baseline flag by name, in declaration order (a flag shared by methods is declared once)."""
    return {flag.name: flag for cls in METHODS.values() for flag in cls.flags}


def flag_owners(name: str) -> tuple[str, ...]:
    """Methods that read a method-specific flag; () for a general flag."""
    return tuple(method for method, cls in METHODS.items()
                 if name in cls.flag_names or any(flag.name == name for flag in cls.flags))


def with_method_flags(args_class):
    """Class decorator of the scripts' Args: appends every method's flags as command-line fields."""
    from dataclasses import field, make_dataclass
    from typing import Annotated

    import tyro

    extra = [(flag.name, Annotated[type(flag.default), tyro.conf.arg(help=flag.help)], field(default=flag.default))
             for flag in method_flags().values()]
    combined = make_dataclass(args_class.__name__, extra, bases=(args_class,))
    combined.__module__, combined.__qualname__ = args_class.__module__, args_class.__qualname__
    return combined


def method_flags_error(args) -> str | None:
    """Why `args` is invalid for its method, or None: a flag of another method (it would be silently
    ignored), a value its check refuses, the method's own check across flags, or --compile."""
    cls = METHODS[args.method]
    defaults = type(args)()
    for name in (*NBSP.flag_names, *method_flags()):
        owners = flag_owners(name)
        if args.method not in owners and getattr(args, name) != getattr(defaults, name):
            return f"--{name.replace('_', '-')} applies to --method {' or '.join(owners)}, not {args.method}"
    for flag in method_flags().values():
        value = getattr(args, flag.name)
        if flag.check is not None and not flag.check.accepts(value):
            return f"--{flag.name.replace('_', '-')} must be {flag.check.valid}, got {value}"
    problem = cls.check_args(args)
    if problem:
        return problem
    if not cls.compiles and (args.compile or args.cudagraphs):
        return f"--compile and --cudagraphs support --method {' and '.join(n for n, c in METHODS.items() if c.compiles)}; {args.method}'s hooks run eagerly"
    return None


def make_method(args) -> Method:
    """The `Method` of `args.method`; NBSP is the scripts' own code, so it gets plain hooks."""
    return METHODS[args.method](args)
