"""Densification: gsplat's `DefaultStrategy` plus the two things it lacks here.

1. gsplat 1.5.3 never resets opacities: `default.py:195` reads
   `step % self.reset_every == 0 & step > 0`, which Python parses as the chained comparison
   `(step % reset_every == 0) and (0 > 0)`. We reset them ourselves on the same schedule
   (every `reset_every` steps while refining, to `2 × prune_opa`, as gsplat intends and the
   official 3DGS does) with gsplat's own `reset_opa`, which also clears the Adam moments.
2. A cap on the number of Gaussians (CPU rasterization cost grows with it). Growth gets a
   budget: at a refinement step the gradient threshold is raised so that at most
   `max_gaussians - N` Gaussians are cloned or split (each adds one), the ones with the largest
   screen-space gradients, as an uncapped run would rank them. Should the count still exceed the
   cap, the least opaque Gaussians are removed with gsplat's `remove`.

Both act on the plain dicts gsplat uses (`params`, `optimizers`, strategy `state`), so they
checkpoint with everything else.
"""

from typing import Any

import torch
from gsplat.strategy import DefaultStrategy
from gsplat.strategy.ops import remove, reset_opa


def refine_step(
    strategy: DefaultStrategy,
    params: dict[str, torch.nn.Parameter],
    optimizers: dict[str, torch.optim.Optimizer],
    state: dict[str, Any],
    step: int,
    info: dict[str, Any],
    max_gaussians: int | None,
) -> None:
    """`strategy.step_post_backward` with the opacity reset fixed and an optional cap on the count."""
    if step >= strategy.refine_stop_iter:
        return
    grow_grad2d = strategy.grow_grad2d
    refining = step > strategy.refine_start_iter and step % strategy.refine_every == 0
    if max_gaussians and refining and state["grad2d"] is not None:
        budget = max_gaussians - len(params["means"])
        grads = state["grad2d"] / state["count"].clamp_min(1)
        if budget <= 0:
            strategy.grow_grad2d = float("inf")
        elif budget < len(grads):
            # Growth selects grads > threshold: the budget-th largest value lets through fewer than budget.
            strategy.grow_grad2d = max(grow_grad2d, grads.topk(budget).values[-1].item())
    try:
        strategy.step_post_backward(params, optimizers, state, step, info, packed=False)
    finally:
        strategy.grow_grad2d = grow_grad2d
    if step > 0 and step % strategy.reset_every == 0:
        reset_opa(params, optimizers, state, value=strategy.prune_opa * 2.0)
    if max_gaussians and len(params["means"]) > max_gaussians:
        opacities = params["opacities"].detach()
        drop = torch.zeros_like(opacities, dtype=torch.bool)
        drop[opacities.argsort(stable=True)[: len(opacities) - max_gaussians]] = True
        remove(params, optimizers, state, drop)
