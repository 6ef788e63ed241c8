"""CBP: continual backpropagation (Dohare, Hernandez-Garcia, Lan, Rahman, Mahmood and Sutton,
"Loss of plasticity in deep continual learning", Nature 2024). Values and conventions from the
authors' code, github.com/shibhansh/loss-of-plasticity: lop/algos/gnt.py (generate-and-test, the
one their RL agents use), lop/algos/convGnT.py (convolutional layers), lop/algos/rl/ppo.py (where
their PPO calls it) and their RL settings: lop/rl/cfg/{ant,hopper,walker,sant}/cbp.yml (rr: 1e-4,
mt: 10000, util_type contribution for policy and value network) with the defaults of
lop/rl/run_ppo.py (decay_rate 0.99, init lecun). The library defaults are not the RL values:
GnT's maturity_threshold is 20 (gnt.py) and CBPLinear's 100 (lop/algos/cbp_linear.py), the RL
configs set 10000.

What it changes in SAC: after every optimizer step of the actor or of the critics, a few of
their hidden units with the lowest utility are reinitialised. Losses are untouched; the critic
targets keep following their critics by Polyak averaging (or copies, on Atari), so a
replacement reaches them gradually, as any change of the critics does.

- Utility of hidden unit i, after each step of its network: u_i <- eta u_i + (1 - eta) *
  mean_j |W_out[j, i]| * mean_batch |h_i|, the authors' "contribution" utility, with h_i the
  unit's output (after its activation) on the batch of that step and W_out the weights of the
  layers that read it, after the step. eta = --cbp-decay (0.99). Bias-corrected as the authors
  do: u_i / (1 - eta^age_i).
  Convolutional channels (Atari) are units, as in convGnT.py: the outgoing magnitude of a channel
  read by a convolution is the mean over output channels and kernel positions; a channel of the
  last convolution feeds 49 inputs of the first linear layer (the flatten), and its utility is
  the mean over those positions of (outgoing magnitude of the position) * mean_batch |h| there.
  Units feeding several layers (the actor's mean and log-std heads) average over all of them.
- Age: optimizer steps of its network since the unit was created or last replaced. Units older
  than mt = --cbp-maturity-threshold (1e4) are eligible. In the authors' PPO (ppo.py `learn`),
  every minibatch's `opt.step()` is followed by one `gen_and_test` of the policy and one of the
  value network, each adding 1 to its units' ages (gnt.py `test_features`): a unit ages by one
  per optimizer step of its network. Here the actor and the critics have optimizers of their own, so
  the actor's units age with the actor's steps (`after_step("actor")`; Meta-World: 2 actor steps
  every 2nd update) and each critic's with the critic steps (`after_step("critic")`, one per
  update); the steps of other networks do not count.
- Replacement: each step, rr * (number of eligible units) of a layer are replaced, rr =
  --cbp-replacement-rate (1e-4); a fractional count x is rounded stochastically, floor(x + U),
  U ~ Uniform(0, 1). For x < 1 (every layer narrower than 1 / rr = 10^4 units) that is the
  authors' rule, one unit with probability x (gnt.py without `accumulate`); for x >= 1 it keeps
  the average exact where the authors truncate. The units replaced are the eligible ones with the
  lowest bias-corrected utility.
- A replaced unit gets fresh incoming weights from lecun uniform, U(-sqrt(3 / fan_in),
  +sqrt(3 / fan_in)) (fan_in = inputs x kernel positions for a channel): the authors draw fresh
  units from their networks' initialisation, lecun in their RL experiments, while these networks
  keep CleanRL's initialisation (nn.Linear's default on Meta-World, Kaiming normal on Atari);
  zero incoming bias and zero outgoing weights, so the new unit leaves the output alone until it
  learns; its running mean activation (bias-corrected) times its old outgoing weights is added
  to the biases of the layers that read it first, so that removing the unit barely moves the
  output (exact for a constant unit). gnt.py has this transfer too but zeroes the running mean
  just before using it, so its transfer adds nothing; here it is done as the method describes.
  For a channel read by a convolution the channel's mean over positions is used (exact when the
  channel is constant over positions). Utility, running mean and age restart at 0.
- Adam's moments (exp_avg, exp_avg_sq) of the replaced incoming weights, bias and outgoing
  weights are zeroed, as the authors' AdamGnT does (choice: their RL runs build torch's plain Adam,
  run_ppo.py `opt = Adam`, for which gnt.py's `update_optim_params` does nothing, so there the
  moments of a new unit are left as they were; zeroing them keeps the old unit's momentum from
  moving the new unit's zeroed outgoing weights); AdamGnT also restarts a per-element step
  count, which torch's Adam (one step count per tensor) cannot: with the tensor's large step
  count, Adam's bias correction no longer compensates the zeroed moments, and a new unit's steps
  are up to about 6 times those of a fresh Adam over its first few hundred steps.
- Not carried over: their RL "CBP" configs also set Adam's betas to (0.99, 0.99) and weight
  decay 1e-4 (their ns.yml sets those betas alone, l2.yml those betas with weight decay 1e-3);
  those are optimizer settings of their PPO, and every method here trains the scripts' SAC with
  CleanRL's Adam.
- Hidden layers of the actor and of each critic (Meta-World's two critics are one ensemble
  module: each member's units are handled apart, in its own slice); not the output layers.
- No host synchronisation per step: whether a unit is eligible depends only on how many steps
  passed since it was created, so the number of eligible units of each layer is also tracked on
  the host (sorted creation steps), the count to replace is drawn from torch's CPU generator
  (reseeded by the scripts at every stage, so runs and resumes are reproducible), and the device
  work of a replacement runs only on the steps that replace (about 1 in 13 for 768 units).
- Checkpoints hold the utilities, running means, creation steps, step counts and replaced counts
  (`logs()`: units replaced so far, per network).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from baselines.method import DECAY, NON_NEGATIVE_INT, UNIT_INTERVAL, Flag, Method
import skill_neurons as sn
from skill_neurons import Consumer, NeuronLayer

NETWORKS_OF_STEP = {step: sn.APPLY_TO[step] for step in ("actor", "critic")}


def neuron_slices(weight: Tensor, member: int | None, dim: int) -> Tensor:
    """A view of `weight` with one row (first dimension) per slice along `dim`, after selecting the
    ensemble member; writing into it writes the parameter."""
    if member is not None:
        return weight[member].movedim(dim - 1, 0)
    return weight.movedim(dim, 0)


def outgoing(consumer: Consumer, weight: Tensor, num_units: int) -> Tensor:
    """`weight` (the consumer's weight or one of its Adam moments) as [units, block, outputs...]."""
    return neuron_slices(weight, consumer.member, consumer.in_dim).unflatten(0, (num_units, consumer.block))


@dataclass
class UnitLayer:
    """A hidden layer's units: their statistics on the device, and on the host the creation steps
    that decide how many units are eligible without reading the device."""

    layer: NeuronLayer
    fan_out: int  # outgoing weights of one unit (per position of a flattened channel)
    utility: Tensor  # [N], not bias-corrected
    mean_activation: Tensor  # [N, block]: per input of the readers (a channel read by a conv: its mean)
    created: Tensor  # [N] int64, the network's step count when the unit was created or replaced
    # sorted creation steps on the host; a replacement drops the oldest entries rather than those of the
    # units it replaced (unknown to the host), which leaves every later eligible count the same, since
    # an eligible unit stays eligible until it is replaced
    created_host: list[int]

    @property
    def num_units(self) -> int:
        return self.utility.numel()

    def eligible(self, steps: int, maturity: int) -> int:
        return bisect.bisect_right(self.created_host, steps - maturity - 1)


class ContinualBackprop(Method):
    name = "cbp"
    label = "CBP"
    flags = (
        Flag("cbp_replacement_rate", 1e-4, "cbp: fraction of mature units of a layer replaced after each optimizer step", UNIT_INTERVAL),
        Flag("cbp_maturity_threshold", 10_000, "cbp: optimizer steps a unit must age before it can be replaced", NON_NEGATIVE_INT),
        Flag("cbp_decay", 0.99, "cbp: moving-average factor eta of the utility", DECAY),  # the bias correction divides by 1 - decay**age
    )
    compiles = False  # its hooks run eagerly

    def setup(self, learner) -> None:
        super().setup(learner)
        self.optimizers = {"actor": learner.actor_optimizer, "qf1": learner.q_optimizer,
                           "qf2": learner.q_optimizer}
        self.units: dict[str, list[UnitLayer]] = {}
        for name, layers in learner.neuron_layers().items():
            self.units[name] = []
            for index, layer in enumerate(layers):
                n, device = layer.hidden.num_neurons, layer.hidden.weight.device
                fan_out = sum(outgoing(c, c.weight, n)[0, 0].numel() for c in layer.consumers)
                self.units[name].append(UnitLayer(layer, fan_out, torch.zeros(n, device=device),
                                                  torch.zeros(n, layer.consumers[0].block, device=device),
                                                  torch.zeros(n, dtype=torch.long, device=device), [0] * n))
                layer.hidden.activation.register_forward_hook(self._recorder(name, index, layer.hidden.member))
        self.steps = {name: 0 for name in self.units}
        self.replaced = {name: 0 for name in self.units}
        self.activations: dict[tuple[str, int], Tensor] = {}

    def _recorder(self, name: str, index: int, member: int | None):
        def forward_hook(_module: nn.Module, _inputs, output: Tensor) -> None:
            if output.requires_grad:  # a training forward pass, not a target or rollout under no_grad
                self.activations[(name, index)] = output.detach() if member is None else output.detach()[member]

        return forward_hook

    def after_step(self, network: str) -> None:
        # only this step's own forward pass counts (the critics' activations inside the actor loss are dropped)
        activations, self.activations = self.activations, {}
        for name in NETWORKS_OF_STEP[network]:
            self.steps[name] += 1
            for index, units in enumerate(self.units[name]):
                self._update_statistics(units, activations[(name, index)])
            eligible = [units.eligible(self.steps[name], self.args.cbp_maturity_threshold) for units in self.units[name]]
            if any(eligible):
                draws = torch.rand(len(eligible)).tolist()  # CPU generator: no device synchronisation
                for units, count, draw in zip(self.units[name], eligible, draws):
                    replace = math.floor(self.args.cbp_replacement_rate * count + draw)
                    if replace:
                        self._replace(name, units, replace)
                        self.replaced[name] += replace

    @torch.no_grad()
    def _update_statistics(self, units: UnitLayer, activation: Tensor) -> None:
        """Utility and running mean activation after a step; `activation` [B, N] or [B, C, H, W]."""
        n, decay = units.num_units, self.args.cbp_decay
        features = activation.reshape(activation.shape[0], n, -1)  # [B, N, positions]
        magnitude = sum(outgoing(c, c.weight, n).abs().flatten(2).sum(-1) for c in units.layer.consumers) / units.fan_out
        contribution = (magnitude * features.abs().mean(0)).mean(1)  # [N, block] x [N, positions], block 1 or positions
        units.utility.lerp_(contribution, 1.0 - decay)
        batch_mean = features.mean(0)
        if units.mean_activation.shape[1] == 1:
            batch_mean = batch_mean.mean(1, keepdim=True)
        units.mean_activation.lerp_(batch_mean, 1.0 - decay)

    @torch.no_grad()
    def _replace(self, name: str, units: UnitLayer, count: int) -> None:
        """Reinitialises the `count` eligible units of lowest bias-corrected utility."""
        steps, decay = self.steps[name], self.args.cbp_decay
        age = (steps - units.created).float()
        correction = 1.0 - decay**age
        utility = torch.where(age > self.args.cbp_maturity_threshold, units.utility / correction, math.inf)
        chosen = torch.topk(utility, count, largest=False).indices
        self._reinitialise(name, units, chosen, units.mean_activation[chosen] / correction[chosen, None])
        del units.created_host[:count]
        units.created_host.extend([steps] * count)

    def _reinitialise(self, name: str, units: UnitLayer, chosen: Tensor, mean_activation: Tensor) -> None:
        """Fresh incoming weights, zero bias and outgoing weights for the units `chosen`, whose
        mean activations ([k, block]) move into the readers' biases first; zero Adam moments of all
        three; fresh statistics."""
        hidden, n, state = units.layer.hidden, units.num_units, self.optimizers[name].state
        for consumer in units.layer.consumers:
            weights = outgoing(consumer, consumer.weight, n)
            removed = weights[chosen]  # [k, block, outputs, kernel...]
            removed = removed.reshape(*removed.shape[:3], -1).sum(-1)  # a conv reader sees the unit at every kernel position
            bias = consumer.bias if consumer.member is None else consumer.bias[consumer.member]
            bias.view(-1).add_(torch.einsum("kbo,kb->o", removed, mean_activation))
            weights.index_fill_(0, chosen, 0.0)
            for moment in ("exp_avg", "exp_avg_sq"):
                outgoing(consumer, state[consumer.weight][moment], n).index_fill_(0, chosen, 0.0)
        incoming = neuron_slices(hidden.weight, hidden.member, hidden.neuron_dim)
        bound = math.sqrt(3.0 / incoming[0].numel())  # lecun uniform
        incoming.index_copy_(0, chosen, incoming.new_empty((len(chosen), *incoming.shape[1:])).uniform_(-bound, bound))
        neuron_slices(hidden.bias, hidden.member, hidden.neuron_dim).index_fill_(0, chosen, 0.0)
        for param in (hidden.weight, hidden.bias):
            for moment in ("exp_avg", "exp_avg_sq"):
                neuron_slices(state[param][moment], hidden.member, hidden.neuron_dim).index_fill_(0, chosen, 0.0)
        units.utility.index_fill_(0, chosen, 0.0)
        units.mean_activation.index_fill_(0, chosen, 0.0)
        units.created.index_fill_(0, chosen, self.steps[name])

    def logs(self) -> dict[str, float]:
        return {f"replaced_{name}": float(count) for name, count in self.replaced.items()}

    def state_dict(self) -> dict:
        layers = {name: [{"utility": u.utility.cpu(), "mean_activation": u.mean_activation.cpu(), "created": u.created.cpu()}
                         for u in units] for name, units in self.units.items()}
        return {"layers": layers, "steps": dict(self.steps), "replaced": dict(self.replaced)}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.replaced = dict(state["steps"]), dict(state["replaced"])
        for name, saved_layers in state["layers"].items():
            for units, saved in zip(self.units[name], saved_layers, strict=True):
                units.utility.copy_(saved["utility"])
                units.mean_activation.copy_(saved["mean_activation"])
                units.created.copy_(saved["created"])
                units.created_host = sorted(saved["created"].tolist())


METHOD = ContinualBackprop
