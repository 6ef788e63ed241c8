"""PI: plasticity injection (Nikishin et al. 2023, "Deep Reinforcement Learning with Plasticity
Injection", NeurIPS; the NBSP paper cites it as 2024).

What changes in SAC: at every task switch, each output layer (head) h_theta of the actor and of
both critics is frozen and two copies of a freshly initialised head theta' join it, one trainable
and one frozen (theta'_0); the network's output becomes

    h_theta(x) + (h_theta'(x) - h_theta'_0(x)),

equal to h_theta(x) at the moment of injection (theta' = theta'_0), after which only theta' learns.
Heads (`learner.heads()`): Meta-World actor.fc_mean, actor.fc_logstd (before the log-std squashing)
and qf.head (the `EnsembleLinear` of both critics); Atari actor.fc_logits, qf1.fc_q, qf2.fc_q;
and the heads of the critic targets.

Values and adaptation choices:
- When: at every task switch (BASELINES.md), i.e. H - 1 injections in H stages. Nikishin et al.
  inject once, mid-training, and we know of no released code: there are no other values to take.
- Where: the output layer only, as BASELINES.md prescribes; the trunk keeps learning as in SAC.
- Fresh head: built as the training script builds that network (same class and initialisation:
  nn.Linear's default or EnsembleLinear's on Meta-World, the scripts' `layer_init` on Atari), taken
  from a freshly constructed actor or critic.
- Optimizers: the trainable heads theta' form one new parameter group of the actor's Adam and one
  of the critics' Adam (same learning rate and settings). The frozen heads stay in their old group
  with requires_grad False: they never get a gradient, so Adam never steps them.
- Repeated injection keeps one fixed structure, `InjectedHead(frozen, trainable, trainable_init)`:
  the next injection first folds the learned change into the frozen head (frozen <- frozen +
  trainable - trainable_init, parameter by parameter; the heads are affine, so the output is the
  same up to float rounding), then gives trainable and trainable_init fresh, equal values and
  drops Adam's moments of trainable (fresh parameters start with fresh moments). The first
  injection is exactly output-preserving, later ones up to float rounding (the folded sum); the
  cost of a forward pass stays three head evaluations however many tasks have passed.
- Critic targets get the same structure, lined up parameter for parameter with their critic, so
  both scripts' target updates (`_foreach_lerp_` / `_foreach_copy_` over `parameters()`, lists
  built at every call) pair the right tensors: the target's frozen head is its own old head (its
  output stays the target's, unchanged at injection), its trainable and trainable_init copy the
  critic's (theta' = theta'_0, so the change is zero). Polyak averaging then keeps the target the
  average of the critic's whole head: frozen follows the critic's frozen head, trainable the
  critic's trainable one, and trainable_init, equal on both sides, stays put.
- Resume: `state_dict()` records the number of injections; `load_state_dict` (before the learner
  loads its weights and Adam states) rebuilds the structure and the parameter groups.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from baselines import Method


class InjectedHead(nn.Module):
    """frozen(x) + (trainable(x) - trainable_init(x)); frozen and trainable_init never learn."""

    def __init__(self, frozen: nn.Module, trainable: nn.Module, trainable_init: nn.Module):
        super().__init__()
        self.frozen, self.trainable, self.trainable_init = frozen, trainable, trainable_init
        for p in [*frozen.parameters(), *trainable_init.parameters()]:
            p.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        # the difference first: it is exactly zero at injection, so the output is frozen(x) bit for bit
        return self.frozen(x) + (self.trainable(x) - self.trainable_init(x))

    @torch.no_grad()
    def fold_(self) -> None:
        """Move the learned change into the frozen head: frozen <- frozen + trainable - trainable_init."""
        for f, t, t0 in zip(self.frozen.parameters(), self.trainable.parameters(), self.trainable_init.parameters()):
            f.add_(t - t0)

    @torch.no_grad()
    def restart_(self, fresh: nn.Module) -> None:
        """trainable = trainable_init = `fresh`'s values (a zero change)."""
        for module in (self.trainable, self.trainable_init):
            torch._foreach_copy_(list(module.parameters()), list(fresh.parameters()))


def fresh_network(learner, net: nn.Module) -> nn.Module:
    """A freshly initialised network of `net`'s kind, built as the training script builds it."""
    return learner.new_actor() if net is learner.actor else learner.new_critic()


class PlasticityInjection(Method):
    name = "pi"

    def __init__(self, args):
        super().__init__(args)
        self.injections = 0

    def trainable_heads(self) -> list[tuple[nn.Module, str, nn.Module | None, torch.optim.Optimizer]]:
        """(network, head attribute, its critic target or None, the network's Adam) for every
        learned head of `learner.heads()`; a target's head goes with its critic's."""
        learner = self.learner
        target_of = {id(qf): target for qf, target in zip(learner.critics, learner.critic_targets)}
        optimizer_of = {id(learner.actor): learner.actor_optimizer.optimizer}
        optimizer_of |= {id(qf): learner.q_optimizer.optimizer for qf in learner.critics}
        return [(net, name, target_of.get(id(net)), optimizer_of[id(net)])
                for net, name in learner.heads() if id(net) in optimizer_of]

    def wrap_heads(self) -> None:
        """The structure: every head h (and its target's) becomes InjectedHead(h, copy of h, copy of
        h), a zero change, and the trainable copies get their parameter groups. The values come
        from `inject`, or on resume from the learner's own checkpoint."""
        new_params = {}
        for net, name, target, optimizer in self.trainable_heads():
            head = getattr(net, name)
            injected = InjectedHead(head, copy.deepcopy(head), copy.deepcopy(head))
            setattr(net, name, injected)
            new_params.setdefault(optimizer, []).extend(injected.trainable.parameters())
            if target is not None:
                setattr(target, name, InjectedHead(getattr(target, name), copy.deepcopy(injected.trainable),
                                                   copy.deepcopy(injected.trainable_init)))
        for optimizer, params in new_params.items():
            optimizer.add_param_group({"params": params})

    def inject(self) -> None:
        """Fold each head's learned change into its frozen part and restart the change from a
        fresh head; the targets follow with the critics' fresh values."""
        fresh = {}
        for net, name, target, optimizer in self.trainable_heads():
            if id(net) not in fresh:
                fresh[id(net)] = fresh_network(self.learner, net)
            head = getattr(net, name)
            head.fold_()
            head.restart_(getattr(fresh[id(net)], name))
            for p in head.trainable.parameters():
                optimizer.state.pop(p, None)
            if target is not None:
                target_head = getattr(target, name)
                target_head.fold_()
                target_head.restart_(head.trainable)

    def end_stage(self, stage: int, task: str, rb) -> None:
        if self.injections == 0:
            self.wrap_heads()
        self.inject()
        self.injections += 1

    def logs(self) -> dict[str, Tensor | float]:
        return {"injections": float(self.injections)}

    def state_dict(self) -> dict:
        return {"injections": self.injections}

    def load_state_dict(self, state: dict) -> None:
        self.injections = state["injections"]
        if self.injections:  # the learner's own load fills in the weights and Adam states
            self.wrap_heads()


METHOD = PlasticityInjection
