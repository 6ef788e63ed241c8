"""RL skill neurons: recording, scoring (NBSP Alg. 1, Eq. 1-5), masks (Eq. 7) and masked updates.

A *neuron* is one output unit of a hidden layer after its activation function; for a
convolutional layer it is one channel, its activation being the spatial mean. A
`HiddenLayer` ties the activation module whose output is recorded to the parameters that
feed its neurons (the rows of the incoming weight and the bias), so scoring and masking need
no change to the network's code. Ensembles (both critics in one module, parameters shaped
`[E, ...]`) are supported through `member`: that layer's neurons are the slice `member`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

IDENTIFY_RULES = ("goal", "activation", "weight", "random")


@dataclass(frozen=True)
class HiddenLayer:
    """One hidden layer of candidate neurons.

    activation: module whose forward output holds the neurons' activations,
        shaped `[B, N]`, `[B, C, H, W]` (conv: channel = neuron), or with a leading ensemble
        dimension `[E, B, N]` when `member` is set.
    weight, bias: parameters whose slices along `neuron_dim` feed each neuron.
    neuron_dim: dimension of `weight` and `bias` that indexes the neurons.
    member: ensemble index (dimension 0 of activation, weight and bias), or None.
    """

    activation: nn.Module
    weight: nn.Parameter
    bias: nn.Parameter | None
    neuron_dim: int
    member: int | None = None

    @property
    def num_neurons(self) -> int:
        return self.weight.shape[self.neuron_dim]

    def incoming_weight(self) -> Tensor:
        """Incoming weights as `[N, fan_in]` (rows = neurons)."""
        w = self.weight.detach()
        if self.member is not None:
            w = w[self.member]
            dim = self.neuron_dim - 1
        else:
            dim = self.neuron_dim
        return w.movedim(dim, 0).reshape(w.shape[dim], -1)


# --------------------------------------------------------------------------------------------
# Recording activations
# --------------------------------------------------------------------------------------------
class ActivationRecorder:
    """Records the activations of hidden layers with forward hooks, as `[T, N]` per layer.

    Use as a context manager around forward passes; `activations()` returns one tensor per
    layer, the batches concatenated along the first dimension.
    """

    def __init__(self, layers: Sequence[HiddenLayer]):
        self.layers = list(layers)
        self._chunks: list[list[Tensor]] = [[] for _ in self.layers]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> ActivationRecorder:
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.activation.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, index: int):
        layer = self.layers[index]

        def hook(_module: nn.Module, _inputs, output: Tensor) -> None:
            out = output.detach()
            if layer.member is not None:
                out = out[layer.member]
            if out.dim() > 2:  # conv: a channel's activation is its spatial mean
                out = out.flatten(2).mean(-1)
            self._chunks[index].append(out.float())

        return hook

    def activations(self) -> list[Tensor]:
        return [torch.cat(chunks) for chunks in self._chunks]


# --------------------------------------------------------------------------------------------
# Scores (one value per neuron, higher = more of a skill neuron)
# --------------------------------------------------------------------------------------------
def goal_scores(activations: Tensor, goal: Tensor) -> Tensor:
    """Goal-oriented score of Eq. 1-4: activations `[T, N]`, goal metric `[T]` -> `[N]`.

    R_over = mean_t 1[(a_t > mean a) == (q_t > mean q)], score = max(R_over, 1 - R_over);
    both comparisons are strict and both means are over the same window of T steps.
    """
    if activations.dim() != 2 or goal.shape != activations.shape[:1]:
        raise ValueError(f"expected activations [T, N] and goal [T], got {tuple(activations.shape)} and {tuple(goal.shape)}")
    above_mean_activation = activations > activations.mean(0, keepdim=True)
    above_mean_goal = (goal > goal.mean()).unsqueeze(1)
    over_activation_rate = (above_mean_activation == above_mean_goal).float().mean(0)
    return torch.maximum(over_activation_rate, 1.0 - over_activation_rate)


def activation_scores(activations: Tensor) -> Tensor:
    """Activation-magnitude rule (Table 3): mean absolute activation over the window."""
    return activations.abs().mean(0)


def weight_scores(layer: HiddenLayer) -> Tensor:
    """Weight-magnitude rule (Table 3): mean absolute incoming weight of each neuron."""
    return layer.incoming_weight().abs().mean(1)


def random_scores(num_neurons: int, generator: torch.Generator) -> Tensor:
    """Random rule (Table 3): uniform scores, so the top-m are a uniform random subset."""
    return torch.rand(num_neurons, generator=generator)


def to_goal_score_range(scores: Tensor) -> Tensor:
    """Min-max rescale scores to [0.5, 1], the range of goal scores, so that Eq. 7 gives the
    other identification rules masks of the same magnitude as the goal rule."""
    low, high = scores.min(), scores.max()
    if high <= low:  # no ranking information: the middle of the range
        return torch.full_like(scores, 0.75)
    return 0.5 + 0.5 * (scores - low) / (high - low)


# --------------------------------------------------------------------------------------------
# Selection and masks
# --------------------------------------------------------------------------------------------
def select_top(scores: Tensor, ratio: float) -> Tensor:
    """Global top-m selection (Eq. 5): a bool mask of the round(ratio * N) best scores (at
    least one). Ties are broken by position, earlier neurons first."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"skill ratio must be in (0, 1], got {ratio}")
    count = max(1, round(ratio * scores.numel()))
    order = torch.argsort(scores, descending=True, stable=True)
    selected = torch.zeros_like(scores, dtype=torch.bool)
    selected[order[:count]] = True
    return selected


def neuron_mask(scores: Tensor, selected: Tensor, alpha: float, hard: bool = False) -> Tensor:
    """Eq. 7: alpha * (1 - score) for skill neurons (0 with `hard`), 1 for the others."""
    protected = torch.zeros_like(scores) if hard else alpha * (1.0 - scores)
    return torch.where(selected, protected, torch.ones_like(scores))


def score_network(
    layers: Sequence[HiddenLayer],
    rule: str,
    activations: Sequence[Tensor] | None = None,
    goal: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Scores of all candidate neurons of one network, its hidden layers concatenated."""
    if rule == "goal":
        return goal_scores(torch.cat(list(activations), 1), goal)
    if rule == "activation":
        scores = activation_scores(torch.cat(list(activations), 1))
    elif rule == "weight":
        scores = torch.cat([weight_scores(layer).cpu() for layer in layers])
    elif rule == "random":
        scores = random_scores(sum(layer.num_neurons for layer in layers), generator)
    else:
        raise ValueError(f"unknown identification rule {rule!r}; valid: {', '.join(IDENTIFY_RULES)}")
    return to_goal_score_range(scores)


def split_by_layer(values: Tensor, layers: Sequence[HiddenLayer]) -> list[Tensor]:
    return list(values.split([layer.num_neurons for layer in layers]))


def goal_is_constant(goal: Tensor) -> bool:
    """True when the goal metric carries no information over the window (Eq. 3 degenerates)."""
    return bool((goal == goal[0]).all())



# --------------------------------------------------------------------------------------------
# Applying masks to parameters
# --------------------------------------------------------------------------------------------
def parameter_masks(
    layers: Sequence[HiddenLayer], neuron_masks: Sequence[Tensor]
) -> dict[nn.Parameter, Tensor]:
    """Per-neuron masks -> one mask tensor per parameter, broadcastable to it.

    Each neuron's multiplier applies to its row of the incoming weight and to its bias.
    Ensemble members share parameters, so their slices are filled into one tensor.
    """
    masks: dict[nn.Parameter, Tensor] = {}
    for layer, values in zip(layers, neuron_masks, strict=True):
        for param in (layer.weight, layer.bias):
            if param is None:
                continue
            if param not in masks:
                masks[param] = torch.ones_like(param)
            shape = [1] * param.dim()
            shape[layer.neuron_dim] = -1
            view = masks[param] if layer.member is None else masks[param][layer.member]
            if layer.member is not None:
                shape = shape[1:]
            view.copy_(values.to(param.device).view(shape).expand_as(view))
    return masks


@torch.no_grad()
def mask_update_(params: Sequence[Tensor], old_params: Sequence[Tensor], masks: Sequence[Tensor]) -> None:
    """p <- p_old + mask * (p - p_old): scales the optimizer's step by the mask (default target)."""
    if params:
        torch._foreach_lerp_(list(old_params), list(params), list(masks))
        torch._foreach_copy_(list(params), list(old_params))


@torch.no_grad()
def mask_gradients_(params: Sequence[Tensor], masks: Sequence[Tensor]) -> None:
    """grad <- mask * grad: the literal gradient masking (Adam largely undoes it; see SPEC)."""
    grads = [p.grad for p in params]
    if grads:
        torch._foreach_mul_(grads, list(masks))


def combine_masks(previous: Iterable[Tensor] | None, new: Sequence[Tensor], rule: str) -> list[Tensor]:
    """Across stages: element-wise minimum (protection accumulates) or only the latest."""
    if previous is None or rule == "latest":
        return list(new)
    if rule == "min":
        return [torch.minimum(p, n) for p, n in zip(previous, new, strict=True)]
    raise ValueError(f"unknown mask combination {rule!r}; valid: min, latest")
