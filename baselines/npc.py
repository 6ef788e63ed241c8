"""NPC: neuron-level plasticity control (Paik, Oh, Kwak and Kim, "Overcoming Catastrophic
Forgetting by Neuron-level Plasticity Control", AAAI 2020, arXiv 1907.13322).

What it changes in SAC: from the second task on, the optimizer step of every hidden neuron of the
actor and of both critics (its incoming weights and its bias) is scaled down by the neuron's
importance to the tasks already finished, so the neurons that carried an earlier task consolidate
while the others stay plastic. Losses, targets (which follow their critics as usual) and the
temperature are untouched. No code of the authors was found; of the paper, only the abstract and
introduction could be read for this port (the method section could not), so the rules below are
this port's, named as choices, and their values are flags.

- Importance of neuron i on one batch: NPC's Taylor criterion (the first-order pruning criterion
  of Molchanov et al.), c_i = mean over the batch of |a_i * dL/da_i|, with a_i the neuron's
  output after its activation and L the loss of that network's step: the critic loss for the
  critics, the actor loss for the actor. A convolutional channel (Atari) is one neuron: per
  sample its products are summed over the channel's positions first (the first-order change of
  the loss when the whole channel is zeroed), then the absolute value is averaged over the batch.
- Choice, normalisation per layer: c_i / mean_j c_j over the neurons j of its layer, so that an
  average neuron has importance 1 whatever the layer's (and the loss's) scale; Q-values, and
  with them the critic loss and its gradients, change scale by orders of magnitude during RL
  training, which raw Taylor values would carry into the step sizes.
- Importance of the current task: a moving average over the stage's updates, restarted at every
  stage start, T_i <- d T_i + (1 - d) c_i / mean(c), d = --npc-decay (0.99, about the last 100
  updates); at the task switch it is normalised per layer again (T / mean(T): exactly mean 1,
  which also removes the average's start-up bias) and becomes that task's importance.
- Choice, consolidation across tasks: C_i <- max(C_i, T_i / mean(T)) at every task switch
  (`end_stage`), C = 0 before the first, and C is kept for the rest of the run. This is what
  "consolidates the neurons important to the previous tasks" needs in RL: a single moving average
  over the whole run, through the task switches, forgets a task's importance within a few hundred
  updates of the next task (d = 0.99), far less than a stage of 10^5-10^6 updates, so the earlier
  task's neurons would soon be unprotected (test_npc_is_not_plain_sac in tests/test_baseline_npc.py
  measures it). The maximum, not the sum: under the cycling protocol a task comes back, and
  re-learning it must not stack a second protection on the same neurons; a sum would also shrink
  the step of every neuron that was ever used with each task switch, so that plasticity would fade
  with the number of stages rather than with what the neurons carry.
- Choice, step scale of neuron i: 1 / (1 + s C_i), s = --npc-scale (1.0): 1 for a neuron that no
  finished task used (and for every neuron during the first task: nothing to protect yet), 1/2
  for one of average importance to its most demanding finished task at s = 1, 1/(1 + 3 s) for one
  three times the layer average; never 0 (no neuron freezes for good, no upper bound to tune).
  NPC lowers the learning rate of important neurons under plain SGD; SAC trains with Adam, whose
  step does not depend on the gradient's scale, so the scale multiplies Adam's step instead (the
  learner's `actor_mask`/`q_mask`: p <- p_old + scale * (p_adam - p_old)), which is what a per-neuron
  learning rate does.
- The current task's own importance does not slow its training: NPC consolidates what earlier
  tasks need while the new task is learned. (The scales change only at task switches.)
- Output layers keep their full step (NPC controls hidden neurons).
- The critics' activations also enter the actor loss (Meta-World evaluates the critics with
  detached parameters, so gradients do reach their activations); those products belong to the
  actor loss and are discarded. Forward passes without gradients (targets, rollouts) record
  nothing.
- Checkpoints hold the consolidated importance C (the scales follow from it) and the current
  task's average T, which a task switch restarts (zero in a stage end's checkpoint), so a run
  stopped inside a stage resumes with the average it had; the scales are installed in the
  learner's optimizers at setup and again at every stage start.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import skill_neurons as sn
from baselines.method import DECAY, NON_NEGATIVE, Flag, Method

NETWORKS_OF_LOSS = {loss: sn.APPLY_TO[loss] for loss in ("actor", "critic")}


def taylor_importance(activation: Tensor, grad: Tensor, member: int | None = None) -> Tensor:
    """Per-neuron mean over the batch of |a * dL/da|; activations [B, N], [B, C, H, W] (a channel's
    products summed over its positions) or with a leading ensemble dimension selected by `member`."""
    if member is not None:
        activation, grad = activation[member], grad[member]
    product = activation * grad
    if product.dim() > 2:
        product = product.flatten(2).sum(-1)
    return product.abs().mean(0)


def normalise_per_layer(importance: Tensor) -> Tensor:
    """Importance relative to the layer's mean (a layer that is all zero stays zero)."""
    return importance / importance.mean().clamp_min(torch.finfo(importance.dtype).tiny)


def scale_shape(param: Tensor, hidden: sn.HiddenLayer) -> list[int]:
    """Shape of a per-neuron step scale broadcasting over `param` (ensembles: one slice per member)."""
    shape = [1] * param.dim()
    shape[hidden.neuron_dim] = param.shape[hidden.neuron_dim]
    if hidden.member is not None:
        shape[0] = param.shape[0]
    return shape


class NeuronLevelPlasticityControl(Method):
    name = "npc"
    label = "NPC"
    flags = (
        Flag("npc_decay", 0.99, "npc: moving-average factor d, in [0, 1), of the current task's per-layer-normalised importance, T <- d T + (1 - d) c / mean(c), restarted every stage; at a task switch C <- max(C, T / mean(T)), kept for the rest of the run",
             DECAY),  # at 1 the task's average would never move from 0
        Flag("npc_scale", 1.0, "npc: a neuron's step is scaled by 1 / (1 + npc_scale * C), C its consolidated importance to the finished tasks (1 during the first task)",
             NON_NEGATIVE),
    )
    compiles = False  # its hooks run eagerly

    def setup(self, learner) -> None:
        super().setup(learner)
        self.hidden = {name: [layer.hidden for layer in layers] for name, layers in learner.neuron_layers().items()}

        def zeros():
            return {name: [torch.zeros(h.num_neurons, device=h.weight.device) for h in hidden]
                    for name, hidden in self.hidden.items()}

        self.task_importance = zeros()  # T: moving average over the current stage's updates (zeroed at its end)
        self.consolidated = zeros()  # C: maximum over the finished tasks of their normalised T
        self.batch_importance: dict[tuple[str, int], Tensor] = {}
        # One step-scale tensor per hidden weight, shaped to broadcast over it; its bias shares the
        # storage. An ensemble's members fill their own slice of a shared tensor.
        self.masks = {"actor": {}, "critic": {}}
        self.neuron_scales: dict[str, list[Tensor]] = {}
        for network, names in NETWORKS_OF_LOSS.items():
            for name in names:
                self.neuron_scales[name] = [self._add_masks(self.masks[network], h) for h in self.hidden[name]]
                for index, hidden in enumerate(self.hidden[name]):
                    hidden.activation.register_forward_hook(self._recorder(name, index, hidden.member))
        self.install_masks()

    def _add_masks(self, masks: dict[nn.Parameter, Tensor], hidden: sn.HiddenLayer) -> Tensor:
        """Creates (or reuses, for an ensemble) the step scales of `hidden`'s weight and bias;
        returns the `[N]` view of this layer's neurons."""
        weight, bias = hidden.weight, hidden.bias
        if weight not in masks:
            masks[weight] = torch.ones(scale_shape(weight, hidden), device=weight.device)
            if bias is not None:
                masks[bias] = masks[weight].view(scale_shape(bias, hidden))
        scale = masks[weight] if hidden.member is None else masks[weight][hidden.member]
        return scale.view(-1)

    def install_masks(self) -> None:
        self.learner.actor_mask.set(self.masks["actor"])
        self.learner.q_mask.set(self.masks["critic"])

    def _recorder(self, name: str, index: int, member: int | None):
        def forward_hook(_module: nn.Module, _inputs, output: Tensor) -> None:
            if not output.requires_grad:  # no loss flows through passes without gradients
                return
            activation = output.detach()

            def gradient_hook(grad: Tensor) -> None:
                self.batch_importance[(name, index)] = taylor_importance(activation, grad, member)

            output.register_hook(gradient_hook)

        return forward_hook

    @torch.no_grad()
    def begin_stage(self, stage: int, task: str) -> None:
        # installed again at every stage start: nothing the script installs in between (NBSP's own,
        # empty, masks when it resumes) displaces them
        self.install_masks()

    @torch.no_grad()
    def after_backward(self, network: str) -> None:
        # only the products of this loss's own networks count; the rest (critics inside the actor loss) are dropped
        batch_importance, self.batch_importance = self.batch_importance, {}
        for name in NETWORKS_OF_LOSS[network]:
            for index, importance in enumerate(self.task_importance[name]):
                importance.lerp_(normalise_per_layer(batch_importance[(name, index)]), 1.0 - self.args.npc_decay)

    @torch.no_grad()
    def end_stage(self, stage: int, task: str, rb) -> None:
        for name, values in self.task_importance.items():
            for task_importance, consolidated in zip(values, self.consolidated[name], strict=True):
                torch.maximum(consolidated, normalise_per_layer(task_importance), out=consolidated)
                task_importance.zero_()  # the next task's average starts from zero
            self._write_scales(name)

    @torch.no_grad()
    def _write_scales(self, name: str) -> None:
        for importance, scale in zip(self.consolidated[name], self.neuron_scales[name], strict=True):
            torch.reciprocal(1.0 + self.args.npc_scale * importance, out=scale)

    def logs(self) -> dict[str, Tensor]:
        return {f"{name}_mean_step_scale": torch.cat(scales).mean() for name, scales in self.neuron_scales.items()}

    def state_dict(self) -> dict:
        return {key: {name: [c.cpu() for c in values] for name, values in importance.items()}
                for key, importance in (("consolidated", self.consolidated), ("task_importance", self.task_importance))}

    def load_state_dict(self, state: dict) -> None:
        # checkpoints written before T was saved are stage ends', where T is zero as after setup
        for key in ("consolidated", "task_importance") if "task_importance" in state else ("consolidated",):
            for name, values in state[key].items():
                for importance, saved in zip(getattr(self, key)[name], values, strict=True):
                    importance.copy_(saved)
        for name in self.consolidated:
            self._write_scales(name)


METHOD = NeuronLevelPlasticityControl
