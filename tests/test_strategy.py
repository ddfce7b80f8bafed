"""Densification: fit3d_hf.splatting.CappedDefaultStrategy (opacity reset on schedule, cap on the count)."""

import math

import pytest
import torch
from gsplat.strategy import DefaultStrategy

from fit3d_hf.lift import LiftConfig
from fit3d_hf.lift.loop import _make_strategy
from fit3d_hf.splatting import CappedDefaultStrategy


def _toy_params(n: int, opacity: float) -> tuple[dict, dict]:
    params = {
        "means": torch.nn.Parameter(torch.randn(n, 3)),
        "quats": torch.nn.Parameter(torch.randn(n, 4)),
        "scales": torch.nn.Parameter(torch.full((n, 3), -3.0)),
        "opacities": torch.nn.Parameter(torch.full((n,), math.log(opacity / (1 - opacity)))),
    }
    return params, {k: torch.optim.Adam([v], lr=1e-3, eps=1e-15) for k, v in params.items()}


def _toy_info(n: int, grads: torch.Tensor | None = None) -> dict:
    """What `rasterize` returns for one 64×48 camera that sees all `n` Gaussians, after backward."""
    means2d = torch.zeros(1, n, 2, requires_grad=True)
    means2d.grad = torch.zeros(1, n, 2) if grads is None else grads.reshape(1, n, 2).clone()
    return {
        "means2d": means2d,
        "radii": torch.ones(1, n, 2, dtype=torch.int32),
        "gaussian_ids": None,
        "width": 64,
        "height": 48,
        "n_cameras": 1,
    }


def _reset_steps(strategy: DefaultStrategy, steps: range) -> list[int]:
    """The steps at which `strategy` lowers opaque Gaussians' opacities (set back to 0.9 after each)."""
    params, optimizers = _toy_params(8, opacity=0.9)
    state = strategy.initialize_state()
    reset = []
    for step in steps:
        strategy.step_post_backward(params, optimizers, state, step, _toy_info(len(params["means"])))
        if torch.sigmoid(params["opacities"]).max() < 0.5:
            reset.append(step)
            with torch.no_grad():
                params["opacities"].fill_(math.log(0.9 / 0.1))
    return reset


def test_opacity_reset_on_the_reset_schedule():
    strategy = CappedDefaultStrategy(refine_start_iter=1000, refine_stop_iter=2000, reset_every=10)
    params, optimizers = _toy_params(8, opacity=0.9)
    params["opacities"].sum().backward()
    optimizers["opacities"].step()
    state = strategy.initialize_state()
    strategy.step_post_backward(params, optimizers, state, 10, _toy_info(8))
    assert torch.sigmoid(params["opacities"]).max().item() == pytest.approx(2 * strategy.prune_opa, rel=1e-4)
    # gsplat's reset_opa also clears the Adam moments of the opacities.
    assert optimizers["opacities"].state[params["opacities"]]["exp_avg"].abs().max() == 0
    # Every multiple of reset_every but 0, and none after densification stopped (as the official code).
    assert _reset_steps(strategy, range(0, 2050)) == list(range(10, 2000, 10))


def test_reset_never_calls_the_parents_step_post_backward(monkeypatch):
    """The same schedule with gsplat's bug (1.5.3) or without it: the parent's version is never used."""

    def parent(*args, **kwargs):
        raise AssertionError("DefaultStrategy.step_post_backward was called")

    monkeypatch.setattr(DefaultStrategy, "step_post_backward", parent)
    strategy = CappedDefaultStrategy(refine_start_iter=0, refine_every=5, refine_stop_iter=100, reset_every=20)
    assert _reset_steps(strategy, range(0, 120)) == [20, 40, 60, 80]


def test_reset_happens_at_the_scaled_schedule():
    # 600 iterations: densify from 10 to 300 every 2, reset every 60 (3000 · 600 / 30000).
    assert _reset_steps(_make_strategy(LiftConfig(iterations=600)), range(600)) == [60, 120, 180, 240]
    assert _reset_steps(_make_strategy(LiftConfig(iterations=600, reset_opacity_every=0)), range(600)) == []


def test_growth_within_the_budget_goes_to_the_largest_gradients():
    torch.manual_seed(0)
    strategy = CappedDefaultStrategy(refine_start_iter=0, refine_every=1, reset_every=10**6, max_gaussians=12)
    params, optimizers = _toy_params(8, opacity=0.5)
    means = params["means"].detach().clone()
    grads = torch.zeros(8, 2)
    grads[:, 0] = torch.arange(1.0, 9.0) * 1e-3  # Gaussian i has the (i+1)-th smallest gradient
    state = strategy.initialize_state()
    strategy.step_post_backward(params, optimizers, state, 0, _toy_info(8, grads))  # statistics only
    strategy.step_post_backward(params, optimizers, state, 1, _toy_info(8, grads))
    # Budget 4: the threshold is the 4th largest gradient, so the 3 above it split (each adds one).
    assert len(params["means"]) == 11 and len(state["grad2d"]) == 11
    assert torch.equal(params["means"][:5], means[:5])  # split() keeps the others first, in order
    assert optimizers["means"].param_groups[0]["params"][0] is params["means"]


def test_cap_holds_at_every_step():
    def run(max_gaussians: int) -> list[int]:
        torch.manual_seed(0)
        strategy = CappedDefaultStrategy(refine_start_iter=0, refine_every=2, reset_every=7, max_gaussians=max_gaussians)
        params, optimizers = _toy_params(8, opacity=0.5)
        state = strategy.initialize_state()
        counts = []
        for step in range(30):
            n = len(params["means"])
            strategy.step_post_backward(params, optimizers, state, step, _toy_info(n, torch.rand(n, 2) * 1e-2))
            assert len(state["grad2d"]) == len(params["means"])
            assert optimizers["means"].param_groups[0]["params"][0] is params["means"]
            counts.append(len(params["means"]))
        return counts

    capped = run(20)
    assert max(capped) == 20 and capped[-1] == 20
    assert run(0)[-1] > 20  # without the cap the same run grows past it


def test_cap_removes_the_least_opaque_gaussians():
    strategy = CappedDefaultStrategy(refine_start_iter=1000, reset_every=10_000, max_gaussians=6)
    params, optimizers = _toy_params(10, opacity=0.5)
    with torch.no_grad():
        params["opacities"][:] = torch.arange(10.0) - 5
    state = strategy.initialize_state()
    strategy.step_post_backward(params, optimizers, state, 3, _toy_info(10))
    assert len(params["means"]) == 6 and len(state["grad2d"]) == 6
    assert sorted(params["opacities"].tolist()) == [-1.0, 0.0, 1.0, 2.0, 3.0, 4.0]
    assert optimizers["means"].param_groups[0]["params"][0] is params["means"]


def test_paper_pruning_is_the_official_rule_as_it_runs():
    """After the first reset_every (3k) steps a refinement also prunes Gaussians larger than 0.1 x the scene scale
    (the official densify_and_prune once size_threshold is set). A large screen radius alone prunes nothing: the
    official radius > 20 px test reads max_radii2D after densification_postfix zeroed it."""
    strategy = _make_strategy(LiftConfig.paper_preset())
    assert (strategy.refine_scale2d_stop_iter, strategy.prune_scale3d, strategy.reset_every) == (0, 0.1, 3_000)
    params, optimizers = _toy_params(3, opacity=0.5)
    with torch.no_grad():
        params["scales"][1] = math.log(0.5)  # 0.5 > 0.1 x scene scale 2
    state = strategy.initialize_state(scene_scale=2.0)
    info = _toy_info(3)
    info["radii"][0, 2] = 1000  # Gaussian 2 covers the whole 64x48 image
    strategy.step_post_backward(params, optimizers, state, 2_000, info)  # a refinement before the first reset
    assert len(params["means"]) == 3
    strategy.step_post_backward(params, optimizers, state, 3_100, _toy_info(3))
    assert len(params["means"]) == 2 and (params["scales"] < math.log(0.2)).all()
    info = _toy_info(2)
    info["radii"][0, 1] = 1000
    strategy.step_post_backward(params, optimizers, state, 3_200, info)
    assert len(params["means"]) == 2
