"""ANCL: Auxiliary Network Continual Learning (Kim et al., CVPR 2023, arXiv 2303.09483), in its A-EWC
form, with the values of the authors' code (github.com/kim-sanghwan/ANCL, src/approach/a-ewc.py):
lambda = 1e4 (--ancl-lambda), lambda_a = 10 (--ancl-aux-lambda), a = 0.5 (--ancl-a).

What it changes in SAC: from the second task on, the actor loss (and with --fisher-critic the
critic loss) adds
    lambda/2 * sum F_old (theta - theta_old)^2  +  lambda_a/2 * sum F_aux (theta - theta_aux)^2,
the EWC term that keeps the old tasks, and a term that pulls towards an auxiliary network trained
on the current task alone, which gives back plasticity. Targets and temperature are untouched.

- F_old, theta_old: at a task switch, F_old <- a F_old + (1 - a) F_new with F_old = 0 before the
  first task (the authors' merge, so after one task F_old = (1 - a) F_1), theta_old <- theta.
  F_new is EWC's Fisher (baselines/ewc.py: the same regularised parameters, estimator, batches
  and clip). Choices: the authors' Fisher is the squared gradient of the cross-entropy with the
  true labels, which RL does not have, so the policy's own Fisher replaces it; the authors leave
  out their per-task classifier heads, here the one head is shared by all tasks and included.
- Auxiliary network: the authors copy the main network at the start of every task t > 0 and
  train the copy on the task alone. Here, at the start of every stage after the first, the
  auxiliary learner is `learner.plain_copy()` (a full SAC learner: actor, critics, temperature,
  Adam state), and it is trained *alongside* the main learner, on the very batch of every main
  update (the `after_update` hook), with plain SAC losses. Choice: the authors train it in a
  phase before the main network, but an RL phase would need environment steps of its own (a
  larger budget than the other methods get) or leave the main learner idle; SAC is off-policy,
  so the auxiliary learner learns from the main learner's transitions at no extra interaction.
- theta_aux is the auxiliary learner's current parameters. F_aux (EWC's Fisher of the
  auxiliary networks) is re-estimated every `aux_fisher_interval` (10,000) updates from the
  last --fisher-batches training batches before it; until the first estimate F_aux = 0, so the
  stage starts with the EWC term alone. Choice: the authors estimate F_aux once, after the
  auxiliary network has finished training; alongside, it keeps training, so its Fisher is
  refreshed (every 10,000 updates: 1% of a 1M-step Meta-World stage, and one estimate costs
  a few percent of the 10,000 updates' time).
- Strength of the old-task pull: lambda/2 * F_old, with F_old = (1 - a) F_1 after the first task,
  is 1e4 / 2 * 0.5 = 2,500 F_1 at the second stage, a quarter of `--method ewc`'s lambda F_1 =
  10^4 F_1 (Continual World's form: no 1/2, Fishers summed). That is the authors' code, kept on
  purpose: src/approach/a-ewc.py adds lamb * sum(fisher * (p - older_params)^2) / 2 in `criterion`
  and merges fisher = alpha * fisher + (1 - alpha) * curr_fisher from zeros in
  `post_train_process` (defaults lamb 10000, lamb_a 10, alpha 0.5; src/gridsearch_config.py
  'a-ewc': lamb 10000, lamb-a 10). Their own EWC baseline (src/approach/ewc.py) has the same 1/2
  and merge (grid-search start lamb 10000 in gridsearch_config.py, argparse default 80000), so
  there the two pulls start equal; their run script (scripts/script_cifar100_10.sh) starts
  FACIL's grid search from these values (--gridsearch-hparam-decay 0.5), which may lower them.
  `--ancl-lambda 4e4` (or `--ancl-a 0` with `--ancl-lambda 2e4`) makes the pull at the second
  stage EWC's 10^4 F_1.
- With lambda_a = 0 the auxiliary learner is not built at all and ANCL is EWC with the penalty
  lambda/2 sum F_old (theta - theta_old)^2: with a = 0 and --ewc-lambda = lambda/2 it trains
  exactly as `--method ewc` up to the second task switch (EWC then sums its Fishers where ANCL
  merges them).
- Checkpoints hold F_old and theta_old, and inside a stage after the first the stage's own state:
  the auxiliary learner (its networks, temperature and Adam state), F_aux, the batches of the
  Fisher window, the update count and the penalties, so a run stopped inside a stage resumes with
  them. The auxiliary learner lives within one stage: a task switch drops it (a stage end's
  checkpoint holds F_old and theta_old alone) and the next stage builds it from the main learner.
"""

from __future__ import annotations

from torch import Tensor

from baselines.method import NON_NEGATIVE, UNIT_INTERVAL, Flag, Method
from baselines.ewc import (
    FISHER_FLAGS,
    estimate_fisher,
    fisher_targets,
    quadratic_penalty,
    snapshot,
    to_device,
)


class ANCL(Method):
    name = "ancl"
    label = "ANCL"
    flags = (
        Flag("ancl_lambda", 1e4, "ancl: weight lambda of the old-task (EWC) penalty", NON_NEGATIVE),
        Flag("ancl_aux_lambda", 10.0, "ancl: weight lambda_a of the auxiliary-network penalty (0: exactly EWC)", NON_NEGATIVE),
        Flag("ancl_a", 0.5, "ancl: Fisher merge at a task switch, F_old <- a F_old + (1 - a) F_new", UNIT_INTERVAL),
        *FISHER_FLAGS,
    )
    compiles = False  # its hooks run eagerly
    aux_fisher_interval = 10_000  # main updates between estimates of the auxiliary Fisher

    def setup(self, learner) -> None:
        super().setup(learner)
        self.targets = fisher_targets(learner, self.args.fisher_critic)
        self.old_fisher: dict[str, dict[str, Tensor]] = {}  # empty until the first task switch
        self.old_anchor: dict[str, dict[str, Tensor]] = {}
        self.clear_stage()

    def clear_stage(self) -> None:
        """No auxiliary learner, F_aux, Fisher window, update count or penalties: a stage's start."""
        self.aux, self.aux_fisher, self.aux_window, self.updates, self.penalties = None, {}, [], 0, {}

    def begin_stage(self, stage: int, task: str) -> None:
        if self.aux is None and self.old_fisher and self.args.ancl_aux_lambda > 0:  # a resume inside the stage restored it
            self.set_aux(self.learner.plain_copy())

    def set_aux(self, aux) -> None:
        self.aux, self.aux_targets = aux, fisher_targets(aux, self.args.fisher_critic)

    def after_update(self, data, update_policy: bool, update_target: bool) -> None:
        if self.aux is None:
            return
        self.aux.update(data, update_policy, update_target)
        self.updates += 1
        window = min(self.args.fisher_batches, self.aux_fisher_interval)
        if (self.updates - 1) % self.aux_fisher_interval >= self.aux_fisher_interval - window:
            self.aux_window.append(data)  # one of the last batches before the next estimate
        if self.updates % self.aux_fisher_interval == 0:
            self.aux_fisher = estimate_fisher(self.aux_targets, self.aux_window)
            self.aux_window = []

    def extra_loss(self, network: str) -> Tensor | None:
        if network not in self.old_fisher:
            return None
        params = self.targets[network].params
        old_fisher, old_anchor = self.old_fisher[network], self.old_anchor[network]
        old = 0.5 * self.args.ancl_lambda * quadratic_penalty(params, old_fisher, old_anchor)
        self.penalties[f"old_{network}"] = old.detach()
        if network not in self.aux_fisher:
            return old
        aux_anchor = {name: p.detach() for name, p in self.aux_targets[network].params.items()}
        aux = 0.5 * self.args.ancl_aux_lambda * quadratic_penalty(params, self.aux_fisher[network], aux_anchor)
        self.penalties[f"aux_{network}"] = aux.detach()
        return old + aux

    def end_stage(self, stage: int, task: str, rb) -> None:
        a = self.args.ancl_a
        batches = (rb.sample(self.args.batch_size) for _ in range(self.args.fisher_batches))
        for network, new in estimate_fisher(self.targets, batches).items():
            old = self.old_fisher.get(network)
            self.old_fisher[network] = {n: (1 - a) * new[n] if old is None else a * old[n] + (1 - a) * new[n]
                                        for n in new}
            self.old_anchor[network] = snapshot(self.targets[network].params)
        self.clear_stage()

    def logs(self) -> dict[str, Tensor]:
        return {f"penalty_{name}": value for name, value in self.penalties.items()}

    def state_dict(self) -> dict:
        state = {"old_fisher": self.old_fisher, "old_anchor": self.old_anchor}
        if self.aux is None and not self.penalties:  # no stage state: a stage's start (or the first stage)
            return state
        return state | {"aux": None if self.aux is None else self.aux.state_dict(), "aux_fisher": self.aux_fisher,
                        "aux_window": [list(batch) for batch in self.aux_window], "updates": self.updates,
                        "penalties": self.penalties}

    def load_state_dict(self, state: dict) -> None:
        device = next(self.learner.actor.parameters()).device
        self.old_fisher = to_device(state["old_fisher"], device)
        self.old_anchor = to_device(state["old_anchor"], device)
        self.clear_stage()
        if state.get("aux") is not None:  # stopped inside a stage that trains an auxiliary learner
            aux = self.learner.plain_copy()
            aux.load_state_dict(state["aux"])
            self.set_aux(aux)
            self.aux_fisher = to_device(state["aux_fisher"], device)
            self.aux_window = [tuple(t.to(device) for t in batch) for batch in state["aux_window"]]
            self.updates = state["updates"]
        self.penalties = {name: value.to(device) for name, value in state.get("penalties", {}).items()}


METHOD = ANCL
