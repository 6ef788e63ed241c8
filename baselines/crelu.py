"""CReLU: Concatenated ReLUs (Abbas et al. 2023, "Loss of Plasticity in Continual Deep
Reinforcement Learning", CoLLAs).

What changes in SAC: every hidden fully connected layer of the actor and of the critics (and so of
the critic targets, built the same way) applies crelu(x) = cat(relu(x), relu(-x)) along the last
dimension instead of relu(x). A unit whose pre-activation is negative still passes a signal and a
gradient through its second half, so no unit can go dead: Abbas et al. find that the activations
of agents cycling through tasks grow sparse and their gradients vanish as plasticity is lost.
Nothing else changes: same losses, optimizers, targets; no state to checkpoint.

Values and adaptation choices:
- Default (keep width): each layer keeps its pre-activation width w and outputs 2w features, so
  the next layer's fan-in doubles (a [768, 768, 768] Meta-World actor has about twice the
  parameters of the ReLU one). `--crelu-halve-width` gives each layer w // 2 pre-activation units
  instead, so it outputs w features, as many as the ReLU layer: every layer's fan-in is then the
  ReLU network's, and the network has about half its parameters (the weights into each hidden
  layer halve, the heads stay the same). Neither mode matches the ReLU parameter count exactly;
  the flag chooses whether the width of the representation (halve) or of the units (keep) stays
  the ReLU network's. Odd widths are refused with `--crelu-halve-width`: w // 2 units would give
  w - 1 features, silently not the width asked for.
- Atari: the convolutional layers keep ReLU; the scripts call this hook for the fully connected
  layers only (BASELINES.md: crelu applies to the fully connected layers of the Atari nets).
- The activation works on any leading shape: [B, W] for the plain layers, [E, B, W] for the
  Meta-World critics' ensemble layers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from baselines.method import Flag, Method


class CReLU(nn.Module):
    """cat(relu(x), relu(-x)) along the last dimension: the first half holds the positive
    pre-activations, the second half the negated negative ones."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(torch.cat([x, -x], dim=-1))


class ConcatenatedReLU(Method):
    name = "crelu"
    label = "CRelu"
    flags = (
        Flag("crelu_halve_width", False, "crelu: halve each fully connected hidden layer's pre-activation width (as many features as ReLU, about half its parameters) instead of keeping it (next fan-in doubles, about twice the parameters)"),
    )
    compiles = False  # its hooks run eagerly

    @classmethod
    def check_args(cls, args) -> str | None:
        if args.crelu_halve_width and any(width % 2 for width in args.hidden):
            return (f"--crelu-halve-width needs even hidden widths (a layer of w // 2 units gives w - 1 features); "
                    f"got {args.hidden}")
        return None

    def __init__(self, args):
        super().__init__(args)
        problem = self.check_args(args)
        if problem:
            raise ValueError(problem)
        self.halve_width = args.crelu_halve_width

    def hidden_activation(self, width: int) -> tuple[int, nn.Module, int]:
        units = width // 2 if self.halve_width else width
        return units, CReLU(), 2 * units


METHOD = ConcatenatedReLU
