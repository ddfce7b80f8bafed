"""Densification: gsplat's `DefaultStrategy` with an opacity reset that happens and a cap on the count."""

from dataclasses import dataclass, replace
from typing import Any

import torch
from gsplat.strategy import DefaultStrategy
from gsplat.strategy.ops import remove, reset_opa


@dataclass
class CappedDefaultStrategy(DefaultStrategy):
    """The 3DGS densification of gsplat's `DefaultStrategy`, with the opacity reset done here and at most `max_gaussians`.

    Every field and default is `DefaultStrategy`'s, i.e. the official 3DGS values that FiT3D keeps
    (its `arguments/__init__.py` and `train_feat_gaussian.py`): prune Gaussians less opaque than
    `prune_opa` = 0.005; clone or split those whose mean screen gradient exceeds `grow_grad2d` =
    2e-4; refine every `refine_every` = 100 steps after `refine_start_iter` = 500 and before
    `refine_stop_iter` = 15k; reset opacities every `reset_every` = 3k steps. After the first
    `reset_every` steps a refinement also prunes Gaussians larger than `prune_scale3d` = 0.1 × the
    scene scale, as the official `densify_and_prune` does once `size_threshold` is set (after
    `opacity_reset_interval`). Its other rule there, screen radius > 20 px, never fires:
    `densification_postfix` zeroes `max_radii2D` when clone and split add Gaussians, before the
    test reads it (graphdeco-inria/gaussian-splatting#123). So `refine_scale2d_stop_iter` = 0
    (no screen-size pruning or splitting) is the faithful setting, and the default. Two differences:

    - The opacity reset is implemented here, on 3DGS's schedule: at every step > 0 that is a
      multiple of `reset_every` and before `refine_stop_iter`, opacities are clamped to
      `2 × prune_opa` and their Adam moments cleared (gsplat's `reset_opa`). gsplat 1.5.3 never
      resets: its `step_post_backward` tests `step % reset_every == 0 & step > 0`, a chained
      comparison that ends in `0 > 0` (fixed upstream in nerfstudio-project/gsplat#776). This class
      does not call the parent's `step_post_backward`, only its growth, pruning and statistics
      helpers, so it behaves the same with a gsplat that has the bug and one that does not.
    - `max_gaussians` caps the count (the CPU rasterizer's cost grows with it). At a refinement step
      the growth threshold is raised so that at most `max_gaussians - N` Gaussians pass it by the
      gradient statistics gathered before this step, the ones an uncapped run ranks highest (each
      clone or split adds one). Should the count still exceed the cap after the step, the least
      opaque Gaussians are removed (gsplat's `remove`).

    The state is the parent's plain dict of tensors, so it checkpoints with the parameters.

    Args:
        max_gaussians (int): at most this many Gaussians after each step; 0 for no cap. Default is 0.

    Examples:

        >>> from fit3d_hf.splatting import CappedDefaultStrategy, rasterize
        >>> params: dict[str, torch.nn.Parameter] = ...  # means, quats, scales, opacities, ...
        >>> optimizers = {name: torch.optim.Adam([p], lr=..., eps=1e-15) for name, p in params.items()}
        >>> strategy = CappedDefaultStrategy(max_gaussians=20_000)
        >>> strategy.check_sanity(params, optimizers)
        >>> strategy_state = strategy.initialize_state(scene_scale=extent)
        >>> for step in range(1000):
        ...     renders, alphas, info = rasterize(...)
        ...     strategy.step_pre_backward(params, optimizers, strategy_state, step, info)
        ...     loss = ...
        ...     loss.backward()
        ...     for optimizer in optimizers.values():
        ...         optimizer.step()
        ...         optimizer.zero_grad(set_to_none=True)
        ...     strategy.step_post_backward(params, optimizers, strategy_state, step, info)
    """

    max_gaussians: int = 0

    def step_post_backward(
        self,
        params: dict[str, torch.nn.Parameter] | torch.nn.ParameterDict,
        optimizers: dict[str, torch.optim.Optimizer],
        state: dict[str, Any],
        step: int,
        info: dict[str, Any],
        packed: bool = False,
    ) -> None:
        """Gather the screen gradients of this step; refine, reset opacities and apply the cap when due."""
        if step >= self.refine_stop_iter:
            return
        refining = (
            step > self.refine_start_iter
            and step % self.refine_every == 0
            and step % self.reset_every >= self.pause_refine_after_reset
        )
        # The growth budget is set from the statistics before this step's are added.
        grower = self._within_budget(params, state) if refining else self
        self._update_state(params, state, info, packed=packed)
        if refining:
            n_dupli, n_split = grower._grow_gs(params, optimizers, state, step)
            n_prune = self._prune_gs(params, optimizers, state, step)
            if self.verbose:
                print(f"Step {step}: {n_dupli} duplicated, {n_split} split, {n_prune} pruned: {len(params['means'])} Gaussians.")
            state["grad2d"].zero_()
            state["count"].zero_()
            if self.refine_scale2d_stop_iter > 0:
                state["radii"].zero_()
            torch.cuda.empty_cache()  # as the parent: growth replaced every parameter tensor
        if step > 0 and step % self.reset_every == 0:
            reset_opa(params=params, optimizers=optimizers, state=state, value=self.prune_opa * 2.0)
        if self.max_gaussians and len(params["means"]) > self.max_gaussians:
            opacities = params["opacities"].detach()
            drop = torch.zeros_like(opacities, dtype=torch.bool)
            drop[opacities.argsort(stable=True)[: len(opacities) - self.max_gaussians]] = True
            remove(params=params, optimizers=optimizers, state=state, mask=drop)

    def _within_budget(self, params: dict[str, torch.Tensor], state: dict[str, Any]) -> "CappedDefaultStrategy":
        """This strategy, or a copy whose `grow_grad2d` lets at most `max_gaussians - N` Gaussians grow."""
        if not self.max_gaussians or state["grad2d"] is None:
            return self
        budget = self.max_gaussians - len(params["means"])
        grads = state["grad2d"] / state["count"].clamp_min(1)
        if budget <= 0:
            return replace(self, grow_grad2d=float("inf"))
        if budget < len(grads):
            # Growth takes grads > threshold: the budget-th largest value lets fewer than `budget` through.
            return replace(self, grow_grad2d=max(self.grow_grad2d, grads.topk(budget).values[-1].item()))
        return self
