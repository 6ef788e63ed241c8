"""Plasticity diagnostics of a network, measured on a fixed batch at every evaluation, for every
method: the dormant-neuron ratio (ReDo), the feature rank of the last hidden layer (srank) and the
mean absolute weight."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from skill_neurons import HiddenLayer


def dormant_ratio(activations: Sequence[Tensor], threshold: float) -> float:
    """ReDo's tau-dormant neurons (Sokar et al. 2023, arXiv 2302.12902, Def. 3.1): neuron i of a
    layer scores s_i = E|h_i| / mean_k E|h_k| over the batch, the mean taken over the layer's
    neurons; it is dormant when s_i <= threshold. Returns the dormant share of all the network's
    hidden neurons (conv channels by their spatial mean, as recorded)."""
    dormant = total = 0
    for layer in activations:
        mean_abs = layer.abs().mean(0)
        score = mean_abs / mean_abs.mean().clamp_min(1e-12)
        dormant += int((score <= threshold).sum())
        total += mean_abs.numel()
    return dormant / total


def feature_rank(features: Tensor, delta: float = 0.01) -> int:
    """Effective rank srank_delta of a feature matrix [B, N] (Kumar et al. 2021, arXiv 2010.14498):
    the fewest singular values whose sum reaches 1 - delta of the total."""
    singular = torch.linalg.svdvals(features.double())
    if singular.sum() == 0:
        return 0
    cumulative = singular.cumsum(0) / singular.sum()
    return int((cumulative < 1 - delta).sum()) + 1


def weight_magnitude(layers: Sequence[HiddenLayer]) -> float:
    """Mean absolute incoming weight of the network's hidden neurons (its member's slice in an ensemble)."""
    weights = [(layer.weight if layer.member is None else layer.weight[layer.member]).detach().abs().flatten()
               for layer in layers]
    return float(torch.cat(weights).mean())


def plasticity_stats(layers: Sequence[HiddenLayer], activations: Sequence[Tensor], dormant_threshold: float) -> dict:
    """One network's diagnostics on a batch: dormant ratio, feature rank of the last hidden layer,
    mean absolute weight."""
    return {"dormant_ratio": dormant_ratio(activations, dormant_threshold),
            "feature_rank": feature_rank(activations[-1]), "weight_magnitude": weight_magnitude(layers)}
