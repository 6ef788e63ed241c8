"""EWC: Elastic Weight Consolidation (Kirkpatrick et al., 2017, arXiv 1612.00796), in the form of
Continual World's SAC (Wolczyk et al., 2021; github.com/awarelab/continual_world,
continualworld/methods/ewc.py and regularization.py), whose values are the defaults here.

What it changes in SAC: the actor loss (and, with --fisher-critic, the critic loss) gets the
penalty  lambda * sum_i F_i (theta_i - theta*_i)^2  from the second task on. Targets and the
temperature are untouched.

- At every task switch (`end_stage`), the diagonal Fisher F_new is estimated on --fisher-batches
  batches of --batch-size from the finished task's replay buffer (10 x 256 on Meta-World, as
  Continual World) and added to the Fishers of the earlier tasks (F <- F + F_new); the anchor
  theta* becomes the parameters at the end of that task. lambda = --ewc-lambda (1e4, Continual
  World's EWC coefficient).
- Actor Fisher, Meta-World (tanh-Gaussian policy): per sample, sum over action dimensions k of
  ((d mu_k/d theta)^2 + 2 (d sigma_k/d theta)^2) / (sigma_k^2 + 1e-6), the Fisher of a Gaussian
  in (mu, sigma); clipped from below at 1e-5 per sample, then averaged over the samples, all as
  Continual World. Per-sample gradients come from torch.func (vmap of jacrev).
  Choice: mu is the mean of the pre-tanh Gaussian. tanh is a bijection of the action, and the
  Fisher information does not change under a bijection of the sample, so this is the exact
  Fisher of the squashed policy; Continual World plugs the squashed mean tanh(mu) into the
  same formula instead.
- Actor Fisher, Atari (categorical policy; an adaptation, Continual World has no discrete SAC):
  the exact Fisher of the categorical distribution, per sample sum_a pi_a (d log pi_a/d theta)^2,
  with the same clip and average.
- Critic Fisher (--fisher-critic; off by default, as in Continual World): per sample and per
  critic (d Q/d theta)^2 at the buffer's (state, action) pairs, averaged, not clipped (Continual
  World's critic weights).
- Regularised parameters: the whole actor (trunk and output heads), with --fisher-critic also
  both critics (not their targets). Choice: Continual World leaves the heads out only in its
  multi-head setting, where every task has its own head; with one head (its `num_heads == 1`)
  the head is shared and regularised, and here no task id is given, so the single head is
  shared by all tasks.
- Cycling protocol: a task seen again adds a second Fisher term, as any new task does; the
  anchor is always the latest task's end.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from baselines.method import Flag, Method, NON_NEGATIVE, POSITIVE_INT

ACTOR_FISHER_FLOOR = 1e-5  # Continual World clips the per-sample actor Fisher from below
SIGMA_EPS = 1e-6  # in 1 / (sigma^2 + eps) of the Gaussian Fisher, as Continual World
CHUNK_ELEMENTS = 2**24  # per-sample Jacobian entries held at once (64 MB in float32)
FISHER_FLAGS = (  # shared with ANCL, whose old-task penalty is EWC's
    Flag("fisher_batches", 10, "ewc, ancl: batches (of --batch-size) from the finished task's buffer that estimate the Fisher",
         POSITIVE_INT),
    Flag("fisher_critic", False, "ewc, ancl: also regularise the critics (Continual World's SAC: actor only)"),
)


class QValues(nn.Module):
    """The learner's critics as one module whose forward is `learner.q_values`, so that
    `functional_call` evaluates every critic with substituted parameters."""

    def __init__(self, learner):
        super().__init__()
        self.critics = nn.ModuleList(learner.critics)
        self.q_values = learner.q_values

    def forward(self, obs, actions):
        return self.q_values(obs, actions)


def gaussian_rows(output) -> Tensor:
    """Rows whose squared gradients sum to the Gaussian Fisher: mu_k / s_k and sqrt(2) sigma_k / s_k
    with s_k = sqrt(sigma_k^2 + eps) held constant."""
    mean, log_std = output
    std = log_std.exp()
    inverse_scale = (std.square() + SIGMA_EPS).rsqrt().detach()
    return torch.cat([mean * inverse_scale, math.sqrt(2.0) * std * inverse_scale], -1).flatten()


def categorical_rows(logits) -> Tensor:
    """sqrt(pi_a) log pi_a with sqrt(pi_a) held constant: squared gradients sum to sum_a pi_a (d log pi_a)^2."""
    log_probs = F.log_softmax(logits, -1)
    return (log_probs.exp().sqrt().detach() * log_probs).flatten()


def critic_rows(q_values) -> Tensor:
    return q_values.flatten()  # one row per critic


class FisherTarget:
    """A regularised network: its module, the rows of one sample whose squared parameter
    gradients sum to that sample's Fisher, whether it reads the actions, and the clip floor."""

    def __init__(self, module: nn.Module, rows, reads_actions: bool, floor: float):
        self.module, self.rows, self.reads_actions, self.floor = module, rows, reads_actions, floor
        self.params = dict(module.named_parameters())

    def summed_sample_fisher(self, data) -> dict[str, Tensor]:
        """Sum over the samples of `data` of the per-sample diagonal Fisher, each clipped at the floor."""
        inputs = (data[0], data[1]) if self.reads_actions else (data[0],)
        params = {name: p.detach() for name, p in self.params.items()}

        def sample_fisher(params, *sample):
            def sample_rows(params):
                return self.rows(functional_call(self.module, params, tuple(x[None] for x in sample)))

            jacobian = jacrev(sample_rows)(params)  # {name: [rows, *shape]}
            return {name: j.square().sum(0).clamp_min(self.floor) for name, j in jacobian.items()}

        with torch.no_grad():
            num_rows = self.rows(self.module(*(x[:1] for x in inputs))).numel()
        size = sum(p.numel() for p in params.values())
        chunk = max(1, CHUNK_ELEMENTS // (num_rows * size))  # bounds the [chunk, rows, params] Jacobian
        per_chunk = vmap(sample_fisher, in_dims=(None,) + (0,) * len(inputs))
        total = {name: torch.zeros_like(p) for name, p in params.items()}
        for start in range(0, len(inputs[0]), chunk):
            fisher = per_chunk(params, *(x[start : start + chunk] for x in inputs))
            for name in total:
                total[name] += fisher[name].sum(0)
        return total


def fisher_targets(learner, include_critics: bool) -> dict[str, FisherTarget]:
    """The networks EWC regularises, named as the `extra_loss` hook names them."""
    actor_rows = categorical_rows if learner.discrete else gaussian_rows
    targets = {"actor": FisherTarget(learner.actor, actor_rows, False, ACTOR_FISHER_FLOOR)}
    if include_critics:
        targets["critic"] = FisherTarget(QValues(learner), critic_rows, True, 0.0)
    return targets


def estimate_fisher(targets: dict[str, FisherTarget], batches) -> dict[str, dict[str, Tensor]]:
    """Per network, the diagonal Fisher averaged over every sample of `batches`."""
    sums, count = {network: None for network in targets}, 0
    for data in batches:
        count += len(data[0])
        for network, target in targets.items():
            fisher = target.summed_sample_fisher(data)
            sums[network] = fisher if sums[network] is None else {n: sums[network][n] + fisher[n] for n in fisher}
    return {network: {n: f / count for n, f in fisher.items()} for network, fisher in sums.items()}


def quadratic_penalty(params: dict[str, Tensor], fisher: dict[str, Tensor], anchor: dict[str, Tensor]) -> Tensor:
    """sum_i F_i (theta_i - anchor_i)^2 over every parameter tensor."""
    return sum(((params[n] - anchor[n]).square() * fisher[n]).sum() for n in fisher)


def snapshot(params: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in params.items()}


def to_device(state: dict, device) -> dict:
    """{network: {name: tensor}} of a checkpoint (loaded on the CPU) on the learner's device."""
    return {network: {n: t.to(device) for n, t in tensors.items()} for network, tensors in state.items()}


class EWC(Method):
    name = "ewc"
    label = "EWC"
    flags = (Flag("ewc_lambda", 1e4, "ewc: weight lambda of the penalty lambda * sum F (theta - theta*)^2", NON_NEGATIVE),
             *FISHER_FLAGS)
    compiles = False  # its hooks run eagerly

    def setup(self, learner) -> None:
        super().setup(learner)
        self.targets = fisher_targets(learner, self.args.fisher_critic)
        self.fisher: dict[str, dict[str, Tensor]] = {}  # empty until the first task switch
        self.anchor: dict[str, dict[str, Tensor]] = {}
        self.penalties: dict[str, Tensor] = {}

    def extra_loss(self, network: str) -> Tensor | None:
        if network not in self.fisher:
            return None
        penalty = self.args.ewc_lambda * quadratic_penalty(self.targets[network].params, self.fisher[network],
                                                           self.anchor[network])
        self.penalties[network] = penalty.detach()
        return penalty

    def end_stage(self, stage: int, task: str, rb) -> None:
        batches = (rb.sample(self.args.batch_size) for _ in range(self.args.fisher_batches))
        for network, new in estimate_fisher(self.targets, batches).items():
            old = self.fisher.get(network)
            self.fisher[network] = new if old is None else {n: old[n] + new[n] for n in new}
            self.anchor[network] = snapshot(self.targets[network].params)

    def logs(self) -> dict[str, Tensor]:
        return {f"penalty_{network}": value for network, value in self.penalties.items()}

    def state_dict(self) -> dict:
        return {"fisher": self.fisher, "anchor": self.anchor}

    def load_state_dict(self, state: dict) -> None:
        device = next(self.learner.actor.parameters()).device
        self.fisher, self.anchor = to_device(state["fisher"], device), to_device(state["anchor"], device)


METHOD = EWC
