"""Adam steps that torch.compile traces into the update's one graph, and the scaling of a masked
step (NBSP's Eq. 7 masks, Alg. 2 lines 13-14; the baselines' masks use the same path).

Optimizer.step and Optimizer.zero_grad break a compiled graph on purpose; `zero_grad_` and
`adam_step_` do not, and are the plain methods in eager mode."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


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


# The optimizer steps of an update that torch.compile traces into one graph: Optimizer.step and
# Optimizer.zero_grad break a compiled graph on purpose, the two functions below do not.
def zero_grad_(optimizer: torch.optim.Optimizer) -> None:
    """optimizer.zero_grad() in eager mode; under torch.compile the gradients are zeroed in place
    (`prepare_graph_optimizer_` creates them): a gradient set to None between two backward calls
    of one graph loses the second one's gradient (torch 2.13). Call it between the forward pass
    and backward(), as CleanRL does: in torch 2.13 a graph that reads the optimizer before its
    first forward pass with gradients loses that backward's gradients."""
    if not torch.compiler.is_compiling():
        optimizer.zero_grad()
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad.zero_()


def prepare_graph_optimizer_(optimizer: torch.optim.Adam) -> None:
    """Outside the compiled graph, before it runs: zero gradients, and the state torch.optim.Adam
    would create at its first step (same keys, devices and dtypes, so checkpoints load either way),
    for `zero_grad_` and `adam_step_` to find; a no-op once they exist. With capturable Adam (CUDA
    graphs) their addresses are marked static: a CUDA graph updates them in place, and one that
    mutates other inputs is not captured."""
    for group in optimizer.param_groups:
        if group["amsgrad"] or group["maximize"] or group["weight_decay"] or group["fused"]:
            raise ValueError("adam_step_ implements Adam without amsgrad, maximize, weight decay or fused")
        for p in group["params"]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if not optimizer.state[p]:
                device = p.device if group["capturable"] else "cpu"
                optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=device),
                                      "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                      "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
            if group["capturable"]:  # --cudagraphs; every call: a loaded checkpoint brings new state tensors
                for tensor in (p.grad, *optimizer.state[p].values()):
                    torch._dynamo.mark_static_address(tensor)


@torch.no_grad()
def adam_step_(optimizer: torch.optim.Adam) -> None:
    """optimizer.step() in eager mode; under torch.compile, the same Adam update (torch's
    _multi_tensor_adam) in foreach ops on the optimizer's own state (`prepare_graph_optimizer_` first).
    The bias corrections are float32 tensors there, host doubles in eager Adam: the two agree to
    float32 rounding."""
    if not torch.compiler.is_compiling():
        optimizer.step()
        return
    for group in optimizer.param_groups:
        params = group["params"]
        grads = [p.grad for p in params]
        states = [optimizer.state[p] for p in params]
        exp_avgs, exp_avg_sqs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        steps = [s["step"] for s in states]
        beta1, beta2 = group["betas"]
        torch._foreach_add_(steps, 1)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        step = steps[0].to(params[0].device)  # a group's parameters step together
        denom = torch._foreach_div(torch._foreach_sqrt(exp_avg_sqs), (1 - beta2**step).sqrt())
        torch._foreach_add_(denom, group["eps"])
        updates = torch._foreach_div(exp_avgs, denom)
        torch._foreach_mul_(updates, -group["lr"] / (1 - beta1**step))
        torch._foreach_add_(params, updates)


class StepMask:
    """The per-parameter masks of one optimizer's step: `before_step` keeps the masked parameters
    (target "update") or masks their gradients (target "grad"); for target "update", `scale_step`
    then turns Adam's step p_adam - p_old of those parameters into mask * (p_adam - p_old).
    Without masks both do nothing."""

    def __init__(self, target: str):
        self.target = target
        self.params, self.masks, self.snapshot = [], [], []

    def set(self, masks: dict) -> None:
        """`masks`: parameter -> mask broadcastable to it (skill_neurons.parameter_masks); {} removes them."""
        self.params, self.masks = list(masks), list(masks.values())
        self.snapshot = [p.detach().clone() for p in self.params]
        for buffer in self.snapshot:  # updated in place by a CUDA graph (--cudagraphs)
            torch._dynamo.mark_static_address(buffer)

    def before_step(self) -> list[Tensor] | None:
        """The masked parameters before the step (target "grad": None, their gradients now masked)."""
        if self.target == "grad":
            mask_gradients_(self.params, self.masks)
            return None
        if self.params:
            torch._foreach_copy_(self.snapshot, [p.detach() for p in self.params])
        return self.snapshot

    def scale_step(self, p_old: list[Tensor] | None) -> None:
        """p <- p_old + mask * (p - p_old) after the step (target "update")."""
        if p_old is not None:
            mask_update_(self.params, p_old, self.masks)
