"""PI: plasticity injection (Nikishin, Oh, Ostrovski, Lyle, Pascanu, Dabney and Barreto, "Deep
Reinforcement Learning with Plasticity Injection", NeurIPS 2023; the NBSP paper cites it as 2024).

What changes in SAC: each network is split into an encoder phi and a head h_theta. At every task
switch the head's parameters theta are frozen and two copies of a freshly initialised head
theta' join it, one trainable and one frozen (theta'_0); the network's output becomes

    h_theta(phi(x)) + (h_theta'(phi(x)) - h_theta'_0(phi(x))),

equal to h_theta(phi(x)) at the moment of injection (theta' = theta'_0), after which theta' and
the encoder phi learn (Nikishin et al., Fig. 2: only the head's old parameters are frozen; the
encoder gets the gradient through all three heads). Losses, targets and schedules are SAC's.

The head (`learner.heads()`: each network's `trunk[start:]` and its output layers; the trunk
before `start` is the encoder):
- Meta-World: the last hidden layer (Linear + ReLU) and the output layers. Actor: the last hidden
  Linear + ReLU of `trunk` feeding `fc_mean` and `fc_logstd` (the log-std squashing after the head
  is unchanged); critics: the last hidden `EnsembleLinear` + ReLU of the fused `TwinQNetwork` and
  its `head` (both critics in one module: every ensemble member has its own head weights, so each
  critic gets its own injected head).
- Atari: every fully connected layer after the convolutional encoder (Linear + ReLU per hidden
  width, then `fc_logits` / `fc_q`), of the actor and of each critic, as Nikishin et al. split
  their Atari networks.
- And the heads of the critic targets (below).

Values and adaptation choices:
- Why not the output layer alone: for an affine head, h_theta' - h_theta'_0 is an affine map whose
  parameters receive exactly the gradient h_theta's would, so injection would be plain SAC with
  that layer's Adam moments restarted (tests/test_baseline_pi.py shows it to 1e-10 in float64).
  The head must contain a nonlinearity; on Meta-World (an MLP, where the paper defines no split)
  we take the smallest such head, one hidden layer, so that the encoder keeps the other hidden
  layers and the injected head adds as few parameters as possible.
- When: at every task switch (BASELINES.md), i.e. H - 1 injections in H stages. Nikishin et al.
  inject once, mid-training, and we know of no released code: there are no other values to take.
- Fresh head: built as the training script builds that network (same class and initialisation:
  nn.Linear's default or EnsembleLinear's on Meta-World, the scripts' `layer_init` on Atari), taken
  from a freshly constructed actor or critic; the frozen theta'_0 is an exact copy of it.
- Repeated injection: a growing sum. After k injections every head is the sum of 2k + 1 pieces,

      h_0 + sum_{i=1..k} (h_i' - h_i'_0),

  where h_0 is the head before the first injection and only h_k' (the latest) learns. This is
  exactly "freeze the whole current head (itself such a sum) as the new theta" at each injection,
  kept as one flat list instead of nested modules. It is exact at every injection: the new pair
  computes the same operations on equal weights, so its difference is exactly 0 and the output
  is unchanged bit for bit. The earlier design folded the learned change into the frozen head
  (theta <- theta + theta' - theta'_0), which is exact only for affine heads: a sum of two ReLU
  heads is not one ReLU head of the same width, so no fold exists for these heads.
  Cost per forward pass after k injections: the encoder once and the head 2k + 1 times (the
  backward pass goes through all of them to reach the encoder, with weight gradients for the
  trainable piece only); memory: 2k + 1 heads per network, Adam moments for one. Each injection
  adds two heads' worth of compute; e.g. the Meta-World actor with the default hidden 768 768 768
  does about 1.2 M multiply-adds per sample before any injection (0.6 M of them in the head), 2.4 M
  after one injection and 4.8 M after three (the default protocol's H = 4 stages); an Atari network
  (conv 32 64 64, hidden 768 768) about 10.7 M (3.0 M in the head), 16.8 M and 28.9 M.
- Optimizers: the trainable pieces of the latest injection form parameter group 1 of the actor's
  Adam and of the critics' Adam (same learning rate and settings), added at the first injection
  and replaced at every later one. Every other piece gets requires_grad False: it never gets a
  gradient, so Adam never steps it, and its Adam moments are dropped. The new trainable pieces
  start with fresh moments, as fresh parameters do.
- Activations of the head (ReLU) have no parameters: one module applied to every piece.
- Critic targets get the same structure, lined up parameter for parameter with their critic, so
  both scripts' target updates (`_foreach_lerp_` / `_foreach_copy_` over `parameters()`, lists
  built at every call) pair the right tensors: the target's earlier pieces are its own (its output
  is unchanged at injection), its new pair copies the critic's new pair (theta' = theta'_0, a zero
  change). Polyak averaging (copies, on Atari) then moves each target piece toward the critic's
  piece of the same place, as SAC moves every target parameter toward its critic's.
- Resume: `state_dict()` records the number of injections; `load_state_dict` (before the learner
  loads its weights and Adam states) rebuilds the structure, the requires_grad flags and the
  parameter groups; the learner's own load fills in the values and moments.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import Tensor, nn

from baselines.method import Method
from skill_neurons import HiddenLayer


def summed(outputs: list[Tensor]) -> Tensor:
    """h_0 + sum_i (h_{2i-1} - h_{2i}) of one output per piece: what the injected head computes."""
    out = outputs[0]
    for i in range(1, len(outputs), 2):
        # each difference first: the latest one is exactly zero at injection, so the sum is bit for bit the same
        out = out + (outputs[i] - outputs[i + 1])
    return out


class InjectedLayer(nn.Module):
    """A layer of an injected head, once per piece: `pieces[0]` is that layer of the head before
    the first injection, `pieces[2i - 1]` and `pieces[2i]` that of injection i's trainable head
    and of its frozen initial copy. Input: one tensor (the encoder's output, read by every piece)
    or a list of one tensor per piece. Output: a list of one tensor per piece, or, for an output
    layer of the head (`sums`), the combined output h_0 + sum_i (h_{2i-1} - h_{2i})."""

    def __init__(self, layer: nn.Module, sums: bool):
        super().__init__()
        self.pieces = nn.ModuleList([layer])
        self.sums = sums

    def forward(self, x: Tensor | list[Tensor]) -> Tensor | list[Tensor]:
        inputs = x if isinstance(x, list) else [x] * len(self.pieces)
        outputs = [piece(piece_input) for piece, piece_input in zip(self.pieces, inputs)]
        return summed(outputs) if self.sums else outputs


class PerPiece(nn.Module):
    """A layer without parameters inside the head (its activation), applied to every piece."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        return [self.layer(x) for x in xs]

    def features(self, outputs: list[Tensor]) -> Tensor:
        """The hidden layer's features in the summed head (equal to the head's before an injection,
        right after it): what the plasticity diagnostics measure, not one row per piece."""
        return summed(outputs)


def head_layers(net: nn.Module, start: int, outputs: tuple[str, ...]) -> list[tuple[nn.Module, str, bool]]:
    """(parent module, attribute, is an output layer) of every layer of `net`'s head, in order:
    `net.trunk[start:]`, then the output layers `outputs` (all reading the last hidden layer)."""
    return [(net.trunk, str(i), False) for i in range(start, len(net.trunk))] + [(net, name, True) for name in outputs]


def has_parameters(layer: nn.Module) -> bool:
    return next(layer.parameters(), None) is not None


def wrap(net: nn.Module, start: int, outputs: tuple[str, ...]) -> None:
    """The structure of the first injection, once: every head layer with parameters becomes an
    InjectedLayer of one piece (itself), every other one (the activations) a PerPiece. With one
    piece the network computes exactly what it computed before."""
    for parent, name, output in head_layers(net, start, outputs):
        layer = getattr(parent, name)
        if not isinstance(layer, (InjectedLayer, PerPiece)):
            setattr(parent, name, InjectedLayer(layer, sums=output) if has_parameters(layer) else PerPiece(layer))


def weighted_layers(net: nn.Module, start: int, outputs: tuple[str, ...]) -> list[nn.Module]:
    """The head layers of `net` that have parameters, in order (InjectedLayers once wrapped)."""
    layers = [getattr(parent, name) for parent, name, _ in head_layers(net, start, outputs)]
    return [layer for layer in layers if has_parameters(layer)]


def fresh_network(learner, net: nn.Module) -> nn.Module:
    """A freshly initialised network of `net`'s kind, built as the training script builds it."""
    return learner.new_actor() if net is learner.actor else learner.new_critic()


class PlasticityInjection(Method):
    name = "pi"
    label = "PI"
    compiles = False  # its hooks run eagerly

    def __init__(self, args):
        super().__init__(args)
        self.injections = 0

    def trained_heads(self) -> list[tuple[nn.Module, int, tuple[str, ...], nn.Module | None, torch.optim.Optimizer]]:
        """(network, head start, output layers, its critic target or None, the network's Adam) for
        the actor and every critic of `learner.heads()`; a target's head goes with its critic's."""
        learner = self.learner
        target_of = {id(qf): target for qf, target in zip(learner.critics, learner.critic_targets)}
        optimizer_of = {id(learner.actor): learner.actor_optimizer}
        optimizer_of |= {id(qf): learner.q_optimizer for qf in learner.critics}
        return [(net, start, tuple(outputs), target_of.get(id(net)), optimizer_of[id(net)])
                for net, start, outputs in learner.heads() if id(net) in optimizer_of]

    def inject(self, fresh: bool = True) -> None:
        """Freeze every piece of each head and add a new pair, a trainable piece and its frozen
        copy: fresh values at a task switch, or, with `fresh` False, placeholders that the
        checkpoint's values overwrite (a resume). Each critic target gets copies of its critic's
        new pair. The trainable pieces become parameter group 1 of their network's Adam."""
        trainable: dict[int, tuple[torch.optim.Optimizer, list[nn.Parameter]]] = {}
        for net, start, outputs, target, optimizer in self.trained_heads():
            for module in [net] if target is None else [net, target]:
                wrap(module, start, outputs)
            layers = weighted_layers(net, start, outputs)
            sources = weighted_layers(fresh_network(self.learner, net), start, outputs) if fresh else None
            target_layers = weighted_layers(target, start, outputs) if target is not None else [None] * len(layers)
            for i, (layer, target_layer) in enumerate(zip(layers, target_layers)):
                for p in layer.pieces.parameters():
                    p.requires_grad_(False)
                    optimizer.state.pop(p, None)  # a frozen piece never steps: its moments go
                new = copy.deepcopy(sources[i] if fresh else layer.pieces[0]).requires_grad_(True)
                layer.pieces.extend([new, copy.deepcopy(new).requires_grad_(False)])
                trainable.setdefault(id(optimizer), (optimizer, []))[1].extend(new.parameters())
                if target_layer is not None:
                    target_layer.pieces.extend([copy.deepcopy(piece) for piece in layer.pieces[-2:]])
        for optimizer, params in trainable.values():
            if len(optimizer.param_groups) == 1:
                optimizer.add_param_group({"params": params})
            else:
                optimizer.param_groups[1]["params"] = params

    def end_stage(self, stage: int, task: str, rb) -> None:
        self.inject()
        self.injections += 1

    def feature_layer(self, layer: HiddenLayer) -> HiddenLayer:
        """A head's hidden layer is recorded at the PerPiece applying its activation to every piece
        (the activation itself runs once per piece), which gives the summed head's features; its
        weights are those of the piece that trains now (the latest injection's; the first piece
        is frozen from the first injection on)."""
        wrappers = [module for net, _, _ in self.learner.heads() for module in net.modules()
                    if isinstance(module, PerPiece) and module.layer is layer.activation]
        if not wrappers:
            return layer
        [injected] = {id(module): module for net, _, _ in self.learner.heads() for module in net.modules()
                      if isinstance(module, InjectedLayer) and module.pieces[0].weight is layer.weight}.values()
        training = injected.pieces[-2] if len(injected.pieces) > 1 else injected.pieces[0]
        return dataclasses.replace(layer, activation=wrappers[0], weight=training.weight, bias=training.bias)

    def logs(self) -> dict[str, Tensor | float]:
        return {"injections": float(self.injections)}

    def state_dict(self) -> dict:
        return {"injections": self.injections}

    def load_state_dict(self, state: dict) -> None:
        for _ in range(state["injections"]):  # the learner's own load fills in the weights and Adam states
            self.inject(fresh=False)
        self.injections = state["injections"]


METHOD = PlasticityInjection
