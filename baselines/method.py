"""What every method is: its command-line flags (`Flag`, checked by `Check`) and the hooks of
plain SAC (`Method`), which each baseline overrides where it differs. baselines/__init__.py says
when each hook runs and what a method may use of the learner."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor, nn

if TYPE_CHECKING:
    from skill_neurons import HiddenLayer


@dataclass(frozen=True)
class Check:
    """A value check of a flag: `accepts(value)`, and `valid` says what is valid in the error line."""

    accepts: Callable[[object], bool]
    valid: str


NON_NEGATIVE = Check(lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
POSITIVE_INT = Check(lambda v: v > 0, "a positive integer")
NON_NEGATIVE_INT = Check(lambda v: v >= 0, ">= 0")
UNIT_INTERVAL = Check(lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
DECAY = Check(lambda v: 0.0 <= v < 1.0, "in [0, 1)")


@dataclass(frozen=True)
class Flag:
    """A method's command-line flag: an Args field `name` (prefixed by the method's name, so its
    owner is plain), its `default`, the `help` line of --help and the `check` of its value."""

    name: str
    default: bool | int | float
    help: str
    check: Check | None = None


class Method:
    """Plain SAC: every hook does nothing. `--method sac` is this class."""

    name = "sac"
    label = "vanilla SAC"  # the method's name in the paper's tables
    flags: tuple[Flag, ...] = ()  # its own command-line flags, declared once here
    flag_names: tuple[str, ...] = ()  # flags it owns that the scripts declare themselves (NBSP's)
    compiles = True  # its hooks run inside the compiled update (--compile)

    @classmethod
    def check_args(cls, args) -> str | None:
        """Why the whole command line does not suit this method (a check across flags), or None."""
        return None

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

    def feature_layer(self, layer: HiddenLayer) -> HiddenLayer:
        """`layer` as the plasticity diagnostics measure it: the output of its `activation`, its `weight`."""
        return layer

    def logs(self) -> dict[str, Tensor | float]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
