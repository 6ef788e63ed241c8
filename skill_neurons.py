"""RL skill neurons (NBSP Alg. 1, Eq. 1-7), in sections: the layers of neurons; the
identification window; recording activations; the scores (Eq. 1-4 and Table 3's other rules);
selection (Eq. 5) and identification; the masks (Eq. 7, combined across stages, as parameter
masks, `SkillNeuronMasks`); reporting (selection statistics, warnings, TensorBoard).

A *neuron* is one output unit of a hidden layer after its activation function; for a
convolutional layer it is one channel, its activation being the spatial mean. A
`HiddenLayer` ties the activation module whose output is recorded to the parameters that
feed its neurons (the rows of the incoming weight and the bias), so scoring and masking need
no change to the network's code. Ensembles (both critics in one module, parameters shaped
`[E, ...]`) are supported through `member`: that layer's neurons are the slice `member`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from fast_adam import StepMask

IDENTIFY_RULES = ("goal", "activation", "weight", "random")
GOAL_SCORES = ("paper", "balanced")
IDENTIFY_WINDOWS = ("training", "rollout")
MASK_COMBINES = ("min", "latest")  # --mask-combine: masks across stages
NETWORKS = ("actor", "qf1", "qf2")  # the networks whose hidden neurons NBSP scores and masks
APPLY_TO = {"actor": NETWORKS[:1], "critic": NETWORKS[1:], "both": NETWORKS}  # --apply-to: masked networks


# --------------------------------------------------------------------------------------------
# Layers of neurons: what feeds a hidden layer's neurons, and what reads them
# --------------------------------------------------------------------------------------------
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
    """A hidden layer with the layers that consume its output (CBP and CoTASP read the consumers, NPC only `hidden`)."""

    hidden: HiddenLayer
    consumers: tuple[Consumer, ...]


# --------------------------------------------------------------------------------------------
# Identification window: the episodes and the goal metric a stage's identification scores over
# --------------------------------------------------------------------------------------------
def goal_is_constant(goal: Tensor) -> bool:
    """True when the goal metric carries no information over the window (Eq. 3 degenerates)."""
    return bool((goal == goal[0]).all())


def widen_window(episode_goals: Sequence[float], num_episodes: int) -> int:
    """First episode of the identification window over a stage's finished policy episodes
    (oldest first): the last `num_episodes`, widened backwards one episode at a time while the
    goal metric is constant over it. Returns 0 when the whole stage has one outcome."""
    start = max(0, len(episode_goals) - num_episodes)
    while start > 0 and len(set(episode_goals[start:])) < 2:
        start -= 1
    return start


def identification_window(episodes: Sequence[dict], num_episodes: int, metrics: Sequence[str]) -> tuple[list, str, bool]:
    """The episodes (oldest first, each a dict holding every goal metric) that an identification
    scores over, the goal metric it uses and whether the window was widened.

    The first metric of `metrics` that is not constant over all `episodes` is used, over the
    last `num_episodes` widened backwards until it is not constant over the window (Meta-World:
    success, else the episode return; Atari: the return). If every metric is constant, the last
    `num_episodes` with the last metric: the caller warns that the scores carry no information."""
    for metric in metrics:
        values = [episode[metric] for episode in episodes]
        start = widen_window(values, num_episodes)
        if len(set(values[start:])) > 1:
            return list(episodes[start:]), metric, start < len(episodes) - num_episodes
    return list(episodes[-num_episodes:]), metrics[-1], False


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

        def hook(module: nn.Module, _inputs, output: Tensor | list[Tensor]) -> None:
            # a module computing the layer in pieces (PI's injected heads) says what its features are
            out = (output if isinstance(output, Tensor) else module.features(output)).detach()
            if layer.member is not None:
                out = out[layer.member]
            if out.dim() > 2:  # conv: a channel's activation is its spatial mean
                out = out.flatten(2).mean(-1)
            self._chunks[index].append(out.float())

        return hook

    def activations(self) -> list[Tensor]:
        return [torch.cat(chunks) for chunks in self._chunks]


def split_recorded(recorded: Sequence[Tensor], networks: dict[str, list[HiddenLayer]], names: Sequence[str]) -> dict:
    """An ActivationRecorder's activations of the layers of `names`, in that order, per network."""
    out, start = {}, 0
    for name in names:
        out[name], start = list(recorded[start : start + len(networks[name])]), start + len(networks[name])
    return out


# --------------------------------------------------------------------------------------------
# Scores (one value per neuron, higher = more of a skill neuron)
# --------------------------------------------------------------------------------------------
def goal_scores(activations: Tensor, goal: Tensor, score: str = "paper") -> Tensor:
    """Goal-oriented score of one window: activations `[T, N]`, goal metric `[T]` -> `[N]`.

    Two scores, `score`:
    - "paper" (Eq. 3-4): R = mean_t 1[(a_t > mean a) == (q_t > mean q)].
    - "balanced": R = 1/2 [P(a > mean a | q > mean q) + P(a <= mean a | q <= mean q)], the
      balanced accuracy of the same indicator. It equals "paper" on a window with as many steps
      above the goal mean as below, and gives 0.5 to a neuron that is constant, or independent
      of the goal, whatever the balance. Eq. 3 is ruled by the balance instead: with 19 of 20
      window steps above the goal mean (e.g. in successful episodes) a constant neuron scores
      0.95 there.
    Both use the same indicators, a_t > mean a (per neuron) and q_t > mean q, strict, and
    score = max(R, 1 - R). Eq. 4 takes the maximum so that a neuron firing against the goal
    counts too; it also makes the score of a constant unit (or goal) independent of float
    rounding, whose mean can come out a hair above or below the constant, making its indicator
    all-False or all-True: either way gives the same score. One window serves both for the
    means (Alg. 1's T_avg) and for the counts (its T), a choice: Alg. 1 takes them as two inputs.
    A constant goal metric (the same goal indicator at every step):
    - "paper" still applies Eq. 3: score = share of steps with a_t <= mean a (or its
      complement, whichever is larger), so a dead unit
      scores 1.0 (and a unit firing once in T steps 1 - 1/T);
    - "balanced" leaves one class empty: every neuron scores 0.5 (no information).
    """
    if activations.dim() != 2 or goal.shape != activations.shape[:1]:
        raise ValueError(f"expected activations [T, N] and goal [T], got {tuple(activations.shape)} and {tuple(goal.shape)}")
    above_mean_activation = activations > activations.mean(0, keepdim=True)
    above_mean_goal = (goal > goal.mean()).unsqueeze(1)
    if score == "paper":
        over_activation_rate = (above_mean_activation == above_mean_goal).float().mean(0)
    elif score == "balanced":
        high = above_mean_goal.squeeze(1)
        if high.all() or not high.any():
            return torch.full(activations.shape[1:], 0.5, device=activations.device)
        over_activation_rate = 0.5 * (above_mean_activation[high].float().mean(0)
                                      + (~above_mean_activation[~high]).float().mean(0))
    else:
        raise ValueError(f"unknown goal score {score!r}; valid: {', '.join(GOAL_SCORES)}")
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


def rank_matched(ranking: Tensor, values: Tensor) -> Tensor:
    """The neuron ranked i-th by `ranking` gets the i-th largest of `values` (ties of `ranking`
    by position, as `select_top`). Other identification rules pick neurons their own way and
    take the goal rule's score values for Eq. 7, so rules differ only in which neurons they pick."""
    order = torch.argsort(ranking, descending=True, stable=True)
    matched = torch.empty_like(values)
    matched[order] = torch.sort(values, descending=True, stable=True).values
    return matched


# --------------------------------------------------------------------------------------------
# Selection (Eq. 5) and identification (Alg. 1)
# --------------------------------------------------------------------------------------------
def select_top(scores: Tensor, ratio: float) -> Tensor:
    """Global top-m selection (Eq. 5): a bool mask of the round(ratio * N) best scores, Python's
    round (half to even: round(2.5) = 2), at least one. Ties are broken by position, earlier
    neurons first.

    A constant goal metric still gives a selection, and the scripts still install its masks, on
    neurons picked without goal information: under "balanced" every goal score is 0.5, so the
    ties go to the earliest neurons, the first hidden layer's first units (masks alpha * 0.5);
    under "paper" every dead unit scores 1.0, so dead units come first (mask 0)."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"skill ratio must be in (0, 1], got {ratio}")
    count = max(1, round(ratio * scores.numel()))
    order = torch.argsort(scores, descending=True, stable=True)
    selected = torch.zeros_like(scores, dtype=torch.bool)
    selected[order[:count]] = True
    return selected


@dataclass(frozen=True)
class Identification:
    """One network's identification, one value per neuron `[N]`:
    selected: the skill neurons (Eq. 5);
    mask_scores: the scores that give the Eq. 7 masks (checkpoints save them as "scores");
    goal_scores: the window's goal scores (Eq. 3-4) of every neuron, which the statistics and
        TensorBoard's `neurons/{net}/scores` report.
    Under the goal rule both scores are the same; under --identify activation|weight|random the
    rule picks the neurons and `mask_scores` gives them the goal scores matched by rank
    (`rank_matched`), so they differ from `goal_scores`."""

    selected: Tensor
    mask_scores: Tensor
    goal_scores: Tensor


def identify_network(
    layers: Sequence[HiddenLayer],
    rule: str,
    activations: Sequence[Tensor],
    goal: Tensor,
    ratio: float,
    score: str = "paper",
    generator: torch.Generator | None = None,
) -> Identification:
    """Alg. 1 for one network, its hidden layers concatenated: rank the neurons by `rule`, select
    the top `ratio` globally, and give the i-th selected neuron the i-th best goal score of the
    window (for the goal rule, simply its own). `generator` draws the random rule's ranking and
    is required for it, so that the run's global random state stays untouched."""
    if rule == "random" and generator is None:
        raise ValueError("identification rule 'random' needs a generator")
    window = torch.cat(list(activations), 1)
    goal_values = goal_scores(window, goal, score)
    if rule == "goal":
        ranking = goal_values
    elif rule == "activation":
        ranking = activation_scores(window)
    elif rule == "weight":
        ranking = torch.cat([weight_scores(layer).cpu() for layer in layers])
    elif rule == "random":
        ranking = random_scores(sum(layer.num_neurons for layer in layers), generator)
    else:
        raise ValueError(f"unknown identification rule {rule!r}; valid: {', '.join(IDENTIFY_RULES)}")
    mask_scores = goal_values if rule == "goal" else rank_matched(ranking, goal_values)
    return Identification(select_top(ranking, ratio), mask_scores, goal_values)


# --------------------------------------------------------------------------------------------
# Masks: Eq. 7 per neuron, combined across stages, as parameter masks (fast_adam.StepMask applies them)
# --------------------------------------------------------------------------------------------
def neuron_mask(scores: Tensor, selected: Tensor, alpha: float, hard: bool = False) -> Tensor:
    """Eq. 7: alpha * (1 - score) for skill neurons (0 with `hard`), 1 for the others.

    The masks are strong: every score is max(R, 1 - R) >= 0.5, so a skill neuron's mask lies in
    [0, alpha / 2], [0, 0.1] at the paper's alpha 0.2, and a score of 1.0 acts as a hard mask."""
    protected = torch.zeros_like(scores) if hard else alpha * (1.0 - scores)
    return torch.where(selected, protected, torch.ones_like(scores))


def split_by_layer(values: Tensor, layers: Sequence[HiddenLayer]) -> list[Tensor]:
    return list(values.split([layer.num_neurons for layer in layers]))


def combine_masks(previous: Iterable[Tensor] | None, new: Sequence[Tensor], rule: str) -> list[Tensor]:
    """Across stages: element-wise minimum (protection accumulates) or only the latest."""
    if rule not in MASK_COMBINES:
        raise ValueError(f"unknown mask combination {rule!r}; valid: {', '.join(MASK_COMBINES)}")
    if previous is None or rule == "latest":
        return list(new)
    return [torch.minimum(p, n) for p, n in zip(previous, new, strict=True)]


def parameter_masks(
    layers: Sequence[HiddenLayer], neuron_masks: Sequence[Tensor]
) -> dict[nn.Parameter, Tensor]:
    """Per-neuron masks -> one mask tensor per parameter, broadcastable to it.

    Each neuron's multiplier applies to its incoming weights and to its bias: the paper's column
    W[:, j] of neuron j (Eq. 6), which is row j of an `nn.Linear` or `nn.Conv2d` weight
    `[out, in, ...]` (`neuron_dim=0`) and the last dimension of an `EnsembleLinear` weight
    `[E, in, out]` (`neuron_dim=2`). fast_adam.StepMask applies the masks: by default to the
    optimizer's step, as Alg. 2 lines 13-14 write the masked update; `--mask-target grad` to the
    gradient, Eq. 6 as written. Under plain SGD the two are the same update; under Adam they are
    not, since Adam divides the gradient by its running RMS and so undoes a constant factor on it.
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


class SkillNeuronMasks:
    """NBSP's mask state: for each masked network ("actor", "qf1", "qf2"), the Eq. 7 neuron masks
    combined over the stages so far and the latest selection; `install` turns them into the
    parameter masks of the optimizer steps of those networks.

    networks: every network's hidden layers; masked: the networks NBSP masks (--apply-to), which
    are the ones the scripts identify skill neurons in (and record activations of);
    step_masks: each optimizer's fast_adam.StepMask with the networks whose parameters it steps;
    mask_alpha, hard, combine: --mask-alpha, --hard-mask, --mask-combine. The state saved with a
    checkpoint is `state_dict`'s: the combined masks and the latest selection."""

    def __init__(self, networks: dict[str, list[HiddenLayer]], masked: Sequence[str],
                 step_masks: Sequence[tuple[StepMask, Sequence[str]]], mask_alpha: float, hard: bool, combine: str):
        self.networks, self.masked, self.step_masks = networks, list(masked), step_masks
        self.mask_alpha, self.hard, self.combine = mask_alpha, hard, combine
        self.neuron_masks: dict[str, list[Tensor]] = {}
        self.last_selected: dict[str, Tensor] = {}

    def update(self, found: dict[str, Identification], activations: dict[str, Sequence[Tensor]]) -> dict:
        """New Eq. 7 masks from each network's selection, combined with the earlier stages'; returns
        the stage's record: skill neurons, selection statistics, overlap with the previous selection.
        `found` and `activations` are keyed by network; their keys are trusted, unchecked: the
        scripts pass exactly `masked`."""
        record = {"skill_neurons": {}, "overlap_with_previous": {}, "selection": {}}
        for name, identified in found.items():
            new_mask = neuron_mask(identified.mask_scores, identified.selected, self.mask_alpha, self.hard)
            self.neuron_masks[name] = combine_masks(self.neuron_masks.get(name),
                                                    split_by_layer(new_mask, self.networks[name]), self.combine)
            record["skill_neurons"][name] = int(identified.selected.sum())
            record["selection"][name] = selection_stats(activations[name], identified, torch.cat(self.neuron_masks[name]))
            if name in self.last_selected:
                record["overlap_with_previous"][name] = int((identified.selected & self.last_selected[name]).sum())
            self.last_selected[name] = identified.selected
        return record

    def install(self) -> None:
        for step_mask, names in self.step_masks:
            names = [name for name in names if name in self.neuron_masks]
            step_mask.set(parameter_masks([layer for name in names for layer in self.networks[name]],
                                                [mask for name in names for mask in self.neuron_masks[name]]))

    def state_dict(self) -> dict:
        return {"neuron_masks": self.neuron_masks, "last_selected": self.last_selected}

    def load_state_dict(self, state: dict) -> None:
        self.neuron_masks = {name: list(masks) for name, masks in state["neuron_masks"].items()}
        self.last_selected = dict(state["last_selected"])


# --------------------------------------------------------------------------------------------
# Reporting: selection statistics, console warnings, TensorBoard
# --------------------------------------------------------------------------------------------
def selection_stats(activations: Sequence[Tensor], found: Identification, combined_mask: Tensor) -> dict:
    """What was selected, for metrics.json and TensorBoard. "Dead" means constant over the window
    (the activations of `found`'s window); only a ReLU stuck at 0 on the window's inputs also
    gets no gradient from them, so a mask on it protects nothing there.
    - selected_dead, dead: selected neurons that were dead, and all dead neurons;
    - selected_score_mean, other_score_mean: mean goal score of the selected and of the other neurons;
    - protected, protected_mask_mean: neurons whose combined mask is below 1 and their mean mask;
      under --mask-combine min they include earlier stages' selections, not only this one;
    - selected_dead_share, selected_live_mask_mean: how strongly the selection protects, apart
      from which units it chose: the share of selected units that were dead and the mean combined
      mask over the live selected ones.
    A mean over no neuron is None."""
    window = torch.cat(list(activations), 1)
    dead = window.amax(0) == window.amin(0)
    others, protected, live_selected = ~found.selected, combined_mask < 1, found.selected & ~dead

    def mean(values):
        return float(values.mean()) if values.numel() else None

    return {"selected_dead": int((dead & found.selected).sum()), "dead": int(dead.sum()),
            "selected_score_mean": mean(found.goal_scores[found.selected]),
            "other_score_mean": mean(found.goal_scores[others]),
            "protected": int(protected.sum()), "protected_mask_mean": mean(combined_mask[protected]),
            "selected_dead_share": mean(dead[found.selected].float()),
            "selected_live_mask_mean": mean(combined_mask[live_selected])}


def constant_goal_warning(goal_score: str, rule: str) -> str:
    """The console's note on a constant goal metric: the masks are still installed, and on which
    neurons (see `select_top`)."""
    if goal_score == "balanced":
        picked = "the first units of the first hidden layer (every neuron scores 0.5, ties go to the earliest)"
        values = "each skill neuron's mask is alpha * 0.5"
    else:
        picked = "dead units first"
        values = "Eq. 3 scores every dead unit 1.0, mask 0 (a hard freeze)"
    if rule != "goal":
        picked = f"the neurons --identify {rule} picks"
    return f"skill-neuron scores carry no goal information; the masks are still applied, on {picked}: {values}"


def dead_selection_warning(record: dict, goal_score: str) -> str | None:
    """A warning when selected skill neurons were constant over the window: such a unit carries no
    goal information. Under "paper" Eq. 3 scores it by the window's class balance (the larger
    share of steps on one side of the goal mean), under "balanced" 0.5, so it is selected only
    through ties broken by position; another --identify rule picks it its own way."""
    dead = {name: stats["selected_dead"] for name, stats in record["selection"].items() if stats["selected_dead"]}
    if not dead:
        return None
    return ("selected skill neurons constant over the window: "
            + ", ".join(f"{n} of {record['skill_neurons'][name]} ({name})" for name, n in dead.items())
            + ("; Eq. 3 scores a constant unit by the share of steps above the goal mean, --goal-score balanced "
               "gives it 0.5" if goal_score == "paper" else ""))


def report_selection(writer, record: dict, found: dict, label: str, goal_score: str, step: int) -> None:
    """TensorBoard `neurons/...` of a stage's identification (per network: the goal scores, the
    skill neurons' mask scores, the selection statistics), and a warning on selected dead units.

    `record` is the stage's record that the scripts' identify_skill_neurons returns; it needs
    "goal_constant", "identify_episodes", "identify_steps" (the window) and, from
    `SkillNeuronMasks.update`, "selection" and "skill_neurons". `found`: each network's
    Identification. Tags: `neurons/{net}/scores` (goal scores), `neurons/{net}/skill_scores`,
    `neurons/{net}/{statistic}` (`selection_stats`), `neurons/goal_constant`,
    `neurons/identify_episodes`, `neurons/identify_steps`. The scripts add their own goal
    metric's tags: Meta-World `neurons/identify_success_share` and `neurons/goal_metric_is_return`,
    Atari `neurons/identify_mean_return`."""
    for name, identified in found.items():
        writer.add_histogram(f"neurons/{name}/scores", identified.goal_scores, step)
        writer.add_histogram(f"neurons/{name}/skill_scores", identified.mask_scores[identified.selected], step)
        for key, value in record["selection"][name].items():
            if value is not None:
                writer.add_scalar(f"neurons/{name}/{key}", value, step)
    for key in ("goal_constant", "identify_episodes", "identify_steps"):
        writer.add_scalar(f"neurons/{key}", float(record[key]), step)
    warning = dead_selection_warning(record, goal_score)
    if warning:
        print(f"warning: {label}: {warning}", file=sys.stderr)
