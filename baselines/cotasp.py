"""CoTASP: Continual Task Allocation in meta-policy network via Sparse Prompting (Yang et al.,
NeurIPS 2023), on the actor of both scripts' SAC. Values and rules from the authors' code
(github.com/stevenyangyj/CoTASP: train_cotasp.py, configs/sac_cotasp.yaml, CoTASPLearner in
jaxrl/agents/sac/sac_learner.py, MetaPolicy in jaxrl/networks/policies.py, OnlineDictLearnerV2 in
jaxrl/dict_learning/task_dict.py).

The actor is a meta-policy network from which each task takes a sub-network:
- Prompts. Each task t has, per hidden layer l, a prompt alpha (one value per unit), first set to
  the sparse code of the task's embedding e against the layer's dictionary D [units, 384]:
  argmin_a 1/2 ||e - D^T a||^2 + lambda ||a||_1, lambda = --cotasp-lambda 1e-3 (the authors'
  lasso_lars sparse_encode, codes of either sign). The layer's unit mask is Heaviside(alpha)
  (1 where alpha > 0); it multiplies the layer's activations, with the authors' straight-through
  gradient d mask / d alpha = 1 for 0 < alpha < 1, else 0.
- Alternation (theta_step 990, alpha_step 10): in each stage, rounds of --cotasp-weight-steps
  actor updates of the weights (prompts fixed) then --cotasp-prompt-steps updates of the stage's
  prompt (weights fixed: their gradients are dropped so Adam skips them), the count restarting
  with each stage as the authors' loop restarts with each task. The prompt has its own Adam (lr
  --policy-lr; the authors use the actor's 3e-4), fresh each stage (theirs is reset at each task
  end). The lasso term of the prompt objective is taken as its proximal step (soft-threshold by
  lr * lambda after each Adam step): under Adam a subgradient of lambda |alpha| would move every
  code without actor gradient by about lr per step and switch units near zero on and off. (The
  authors' prompt step uses the actor loss alone; lr * lambda = 3e-7 per step, a small pull.)
- Protection. The units used by the other trained tasks (M, the maximum of their masks, each
  task's mask taken from its latest prompt) are frozen through the learner's masked optimizer
  step (exact under Adam): a weight is frozen when the unit it feeds and the unit it reads are
  both in M (the first layer's inputs always count as used), a bias when its unit is in M, the
  authors' get_grad_masks. Every earlier task's masked network then reads frozen weights only,
  so its policy is preserved exactly.
- Heads are shared by all tasks (the authors' one output layer) and trainable: their weights
  reading units in M are frozen (authors: the mean layer), and so is their bias once another task
  has been trained (every task reads it; the authors' mean layer has none). Unlike the authors'
  code, which leaves the log-std layer free (their evaluation reads the mean only), this applies
  to every actor head, so an earlier task's whole action distribution is kept: Atari's evaluation
  samples from it.
- A task seen again (A, B, A, B) reuses its prompt, looked up by name (the authors never revisit
  a task). M is taken from the OTHER tasks only, so its own units that no other task uses train
  again: the other tasks stay exactly protected and a task keeps improving its own sub-network.
- At each task switch: the dictionaries take the authors' online dictionary-learning step
  (Mairal et al. 2009, OnlineDictLearnerV2.update_dict): statistics A = sum_t a_t a_t^T and
  B = sum_t e_t a_t^T over the trained tasks (each once, with its latest prompt: for first visits
  the authors' running sums), one pass of block coordinate descent over the atoms, an unused atom
  resampled as the finished task's embedding plus noise, atoms projected on the unit ball (c = 1);
  the critics and temperature are reset (learner.reset_critics()) and the actor's Adam moments
  cleared (the authors' reset_agent).
- Dictionaries start as standard Gaussian atoms projected on the unit ball, seeded by seed +
  layer + 1 (the authors' init); all dictionary maths runs on the CPU in float64.
- Checkpoints hold the prompts, the trained tasks, the dictionaries and the stage's update count,
  and inside a stage the prompt's Adam state too (a task switch drops the optimizer, so a stage
  end's checkpoint holds none): a run stopped inside a stage resumes its alternation exactly.

Adaptations:
- Task embeddings. The authors encode a sentence describing the task with a sentence encoder
  (all-MiniLM-L12-v2, 384-d) downloaded at run time. Here a task's embedding is a fixed 384-d
  standard Gaussian vector seeded by the SHA-256 of its name, scaled to unit length like the
  encoder's outputs: deterministic across runs and machines, no download. Distinct names get
  nearly orthogonal embeddings, so units are shared through the dictionary, not through any
  similarity of the task descriptions.
- CoTASP is the one baseline told the task identity: training uses the prompt of the stage's
  task, and `acting(task)` switches the masks to the evaluated task's prompt. A task not trained
  yet is evaluated with the sparse code of its embedding against the current dictionaries (the
  prompt CoTASP would give it).
- Atari: prompts on every hidden layer, the convolutional channels included (a channel is a unit,
  as for NPC and CBP): with shared trainable convolutions, a new task's updates would change the
  earlier tasks' sub-networks, which CoTASP exists to prevent.
- Not carried over: the authors' network (layer norm and tanh after the first layer, 1024-wide
  actor) and their optional start-of-task random-network distillation and "uniform-previous"
  exploration; every method shares the scripts' SAC and protocol.
"""

from __future__ import annotations

import contextlib
import hashlib

import torch
from torch import Tensor

from baselines.method import NON_NEGATIVE, POSITIVE_INT, Flag, Method

EMBEDDING_DIM = 384  # the authors' sentence encoder (all-MiniLM-L12-v2)
UNUSED_ATOM = 1e-6  # an atom whose statistic A[k, k] is below this is resampled (the authors', from sklearn)


def task_embedding(task: str) -> Tensor:
    """The task's fixed unit-length embedding: a standard Gaussian vector seeded by its name."""
    seed = int.from_bytes(hashlib.sha256(task.encode()).digest()[:8], "little")
    embedding = torch.randn(EMBEDDING_DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return embedding / embedding.norm()


def sparse_code(embedding: Tensor, dictionary: Tensor, lasso: float, max_iterations: int = 20_000,
                check_every: int = 250) -> Tensor:
    """argmin_a 1/2 ||e - D^T a||^2 + lasso ||a||_1 for D [atoms, features] (the objective of the
    authors' lasso_lars). FISTA finds the support; the least-squares fit on that support with its
    signs is then the exact solution once the optimality conditions hold, as LARS returns it."""
    gram, correlation = dictionary @ dictionary.T, dictionary @ embedding
    lipschitz = torch.linalg.matrix_norm(dictionary, ord=2) ** 2
    code = momentum = torch.zeros(len(dictionary), dtype=dictionary.dtype)
    t = 1.0
    for iteration in range(1, max_iterations + 1):
        step = momentum - (gram @ momentum - correlation) / lipschitz
        next_code = step.sign() * (step.abs() - lasso / lipschitz).clamp(min=0)
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        momentum = next_code + (t - 1) / t_next * (next_code - code)
        code, t = next_code, t_next
        if iteration % check_every == 0:
            exact = exact_on_support(embedding, dictionary, lasso, code)
            if exact is not None:
                return exact
    return code


def exact_on_support(embedding: Tensor, dictionary: Tensor, lasso: float, code: Tensor) -> Tensor | None:
    """The lasso solution with the support and signs of `code`, or None if that guess is wrong."""
    support, signs = code != 0, code[code != 0].sign()
    atoms = dictionary[support]
    values, singular = torch.linalg.solve_ex(atoms @ atoms.T, atoms @ embedding - lasso * signs)
    if singular:  # more atoms than features: not a lasso support yet
        return None
    exact = torch.zeros_like(code)
    exact[support] = values
    correlation = dictionary @ (embedding - dictionary.T @ exact)
    if (values.sign() == signs).all() and (correlation[~support].abs() <= lasso * (1 + 1e-9)).all():
        return exact
    return None


def update_dictionary(dictionary: Tensor, codes: Tensor, embeddings: Tensor, resample_from: Tensor,
                      generator: torch.Generator) -> Tensor:
    """One pass of block coordinate descent on the atoms (rows) of `dictionary` with the statistics
    A = codes^T codes and B = embeddings^T codes of the tasks so far (codes [tasks, atoms],
    embeddings [tasks, features]); an unused atom becomes `resample_from` plus noise of its
    standard deviation; every atom is projected on the unit ball."""
    dictionary = dictionary.clone()
    A, B = codes.T @ codes, embeddings.T @ codes
    noise_scale = float(resample_from.std(correction=0)) or 1.0
    for k in range(len(dictionary)):  # sequential by nature: each atom's step sees the atoms before it updated
        if A[k, k] > UNUSED_ATOM:
            dictionary[k] += (B[:, k] - A[k] @ dictionary) / A[k, k]
        else:
            noise = torch.randn(resample_from.shape, generator=generator, dtype=dictionary.dtype)
            dictionary[k] = resample_from + noise_scale * noise
        dictionary[k] /= dictionary[k].norm().clamp(min=1.0)
    return dictionary


def step_mask(weight: Tensor, bias: Tensor | None, frozen_units: Tensor, frozen_inputs: Tensor) -> dict:
    """Step masks of one layer (units on dimension 0 of `weight`, inputs on dimension 1): 0 for a
    weight joining a frozen unit to a frozen input and for a frozen unit's bias, 1 elsewhere."""
    spatial = (1,) * (weight.dim() - 2)
    frozen = frozen_units.view(-1, 1, *spatial) * frozen_inputs.view(1, -1, *spatial)
    masks = {weight: (1 - frozen).expand_as(weight).contiguous()}
    if bias is not None:
        masks[bias] = 1 - frozen_units
    return masks


def straight_through_mask(prompt: Tensor) -> Tensor:
    """Heaviside(prompt) forward; gradient 1 where 0 < prompt < 1, else 0 (the authors' ste_step_fn).
    The added term is exactly zero, so the mask is exactly 0 or 1."""
    gate = ((prompt > 0) & (prompt < 1)).to(prompt.dtype)
    return (prompt > 0).to(prompt.dtype) + (prompt - prompt.detach()) * gate


class CoTASP(Method):
    name = "cotasp"
    label = "CoTASP"
    flags = (
        Flag("cotasp_lambda", 1e-3, "cotasp: lasso weight of the sparse prompt code", NON_NEGATIVE),
        Flag("cotasp_weight_steps", 990, "cotasp: actor weight updates of each alternation round", POSITIVE_INT),
        Flag("cotasp_prompt_steps", 10, "cotasp: prompt updates of each alternation round", POSITIVE_INT),
    )
    compiles = False  # its hooks run eagerly

    def setup(self, learner) -> None:
        super().setup(learner)
        self.neuron_layers = learner.neuron_layers()["actor"]
        # a mask of layer l broadcasts over its activations: [B, N] or [B, C, H, W]
        self.mask_shapes = [(-1,) + (1,) * (layer.hidden.weight.dim() - 2) for layer in self.neuron_layers]
        self.dictionaries = []
        for index, layer in enumerate(self.neuron_layers):
            generator = torch.Generator().manual_seed(self.args.seed + index + 1)
            atoms = torch.randn(layer.hidden.num_neurons, EMBEDDING_DIM, generator=generator, dtype=torch.float64)
            self.dictionaries.append(atoms / atoms.norm(dim=1, keepdim=True).clamp(min=1.0))
        self.prompts: dict[str, list[Tensor]] = {}  # task name -> per-layer prompt, on the learner's device
        self.trained: list[str] = []  # tasks whose stage has ended, in order
        self.untrained_codes: dict[str, list[Tensor]] = {}  # prompts of unseen tasks under the current dictionaries
        self.actor_updates = 0  # of the stage: the alternation's clock
        self.task, self.prompt_optimizer, self.frozen_fraction = None, None, 0.0
        self.restored_prompt_optimizer = None  # the state of a resume inside a stage, for its begin_stage
        self.active_masks = [torch.ones(layer.hidden.num_neurons, device=learner.device).view(shape)
                             for layer, shape in zip(self.neuron_layers, self.mask_shapes)]
        self.evaluating = False  # inside acting(): fixed masks of the evaluated task
        for index, layer in enumerate(self.neuron_layers):
            layer.hidden.activation.register_forward_hook(self.mask_hook(index))

    def mask_hook(self, index: int):
        def hook(_module, _inputs, output: Tensor) -> Tensor:
            if self.prompt_phase and not self.evaluating and torch.is_grad_enabled():
                return output * straight_through_mask(self.prompts[self.task][index]).view(self.mask_shapes[index])
            return output * self.active_masks[index]

        return hook

    @property
    def prompt_phase(self) -> bool:
        """The next actor update trains the prompt: the last prompt_steps of every round."""
        round_length = self.args.cotasp_weight_steps + self.args.cotasp_prompt_steps
        return self.actor_updates % round_length >= self.args.cotasp_weight_steps

    # ---------------------------------------------------------------------------------------
    # Prompts and masks
    # ---------------------------------------------------------------------------------------
    def encode(self, task: str) -> list[Tensor]:
        embedding = task_embedding(task)
        return [sparse_code(embedding, dictionary, self.args.cotasp_lambda).float().to(self.learner.device)
                for dictionary in self.dictionaries]

    def prompt_of(self, task: str) -> list[Tensor]:
        if task in self.prompts:
            return self.prompts[task]
        if task not in self.untrained_codes:
            self.untrained_codes[task] = self.encode(task)
        return self.untrained_codes[task]

    def masks_of(self, task: str) -> list[Tensor]:
        return [(prompt.detach() > 0).float().view(shape) for prompt, shape in zip(self.prompt_of(task), self.mask_shapes)]

    def used_by_others(self, task: str) -> list[Tensor]:
        """M per layer: 1 for a unit in the mask of any trained task other than `task`."""
        used = [torch.zeros(layer.hidden.num_neurons, device=self.learner.device) for layer in self.neuron_layers]
        for other in self.trained:
            if other != task:
                used = [torch.maximum(u, (p.detach() > 0).float()) for u, p in zip(used, self.prompts[other])]
        return used

    def step_masks(self, used: list[Tensor]) -> dict:
        """The actor's optimizer step masks that protect the `used` units: hidden layers by their
        units and input units (the observations always count as used), and the heads, whose
        every output is shared by all tasks."""
        device = self.learner.device
        masks, inputs = {}, torch.ones(self.neuron_layers[0].hidden.weight.shape[1], device=device)
        for layer, units in zip(self.neuron_layers, used):
            masks |= step_mask(layer.hidden.weight, layer.hidden.bias, units, inputs)
            inputs = units.repeat_interleave(layer.consumers[0].block)  # a conv channel feeds `block` inputs
        for head in self.neuron_layers[-1].consumers:
            masks |= step_mask(head.weight, head.bias, torch.ones(head.weight.shape[0], device=device), inputs)
        return masks

    # ---------------------------------------------------------------------------------------
    # Hooks
    # ---------------------------------------------------------------------------------------
    def begin_stage(self, stage: int, task: str) -> None:
        self.task = task
        if task not in self.prompts:
            self.prompts[task] = self.untrained_codes.pop(task, None) or self.encode(task)
        self.prompts[task] = [p.detach().clone().requires_grad_(True) for p in self.prompts[task]]
        self.prompt_optimizer = torch.optim.Adam(self.prompts[task], lr=self.args.policy_lr)
        restored, self.restored_prompt_optimizer = self.restored_prompt_optimizer, None
        if restored is None:  # the stage's start; a resume inside it keeps its count and Adam state
            self.actor_updates = 0
        else:
            self.prompt_optimizer.load_state_dict(restored)
        self.active_masks = self.masks_of(task)
        used = self.used_by_others(task)
        others_trained = any(other != task for other in self.trained)
        self.learner.actor_mask.set(self.step_masks(used) if others_trained else {})
        self.frozen_fraction = float(torch.cat(used).mean())

    @contextlib.contextmanager
    def acting(self, task: str):
        previous = self.active_masks
        self.active_masks, self.evaluating = self.masks_of(task), True
        try:
            yield
        finally:
            self.active_masks, self.evaluating = previous, False

    def after_backward(self, network: str) -> None:
        if network != "actor" or not self.prompt_phase:
            return
        for param in self.learner.actor.parameters():
            param.grad = None  # Adam skips them: the weights do not move in a prompt update
        self.prompt_optimizer.step()
        self.prompt_optimizer.zero_grad()
        shrink = self.args.policy_lr * self.args.cotasp_lambda
        with torch.no_grad():  # proximal step of the lasso term
            for prompt in self.prompts[self.task]:
                prompt.copy_(prompt.sign() * (prompt.abs() - shrink).clamp(min=0))
        self.active_masks = self.masks_of(self.task)

    def after_step(self, network: str) -> None:
        if network == "actor":
            self.actor_updates += 1

    def end_stage(self, stage: int, task: str, rb) -> None:
        if task not in self.trained:
            self.trained.append(task)
        codes = [torch.stack([self.prompts[t][index].detach().cpu().double() for t in self.trained])
                 for index in range(len(self.dictionaries))]
        embeddings = torch.stack([task_embedding(t) for t in self.trained])
        self.dictionaries = [
            update_dictionary(d, c, embeddings, task_embedding(task),
                              torch.Generator().manual_seed(self.args.seed + 1000 * (stage + 1) + index))
            for index, (d, c) in enumerate(zip(self.dictionaries, codes))]
        self.untrained_codes.clear()  # they were codes against the old dictionaries
        self.learner.reset_critics()
        self.learner.actor_optimizer.state.clear()
        self.prompt_optimizer = None  # the next stage's prompt gets a fresh one

    def logs(self) -> dict[str, Tensor | float]:
        return {"active_units": torch.cat([m.flatten() for m in self.active_masks]).mean(),
                "frozen_units": self.frozen_fraction}

    def state_dict(self) -> dict:
        return {"prompts": {t: [p.detach().cpu().clone() for p in prompts] for t, prompts in self.prompts.items()},
                "trained": list(self.trained), "dictionaries": [d.clone() for d in self.dictionaries],
                "actor_updates": self.actor_updates,
                "prompt_optimizer": None if self.prompt_optimizer is None else self.prompt_optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.prompts = {t: [p.to(self.learner.device) for p in prompts] for t, prompts in state["prompts"].items()}
        self.trained = list(state["trained"])
        self.dictionaries = [d.clone() for d in state["dictionaries"]]
        self.actor_updates = state["actor_updates"]
        self.restored_prompt_optimizer = state.get("prompt_optimizer")  # none in a stage end's checkpoint
        self.untrained_codes.clear()


METHOD = CoTASP
