"""gsplat's CUDA kernels against the torch backend, on what lifting uses: SH degree 3 colours with
D = 64 features, wide features in channel chunks, depth modes, a densification step on gsplat's
`meta`, and a short lifting run. Run on a GPU machine with `pytest -m cuda tests/test_rasterize_cuda.py -s`
(the first run compiles gsplat's kernels: about 4-5 minutes). Skipped, with the reason, where
gsplat's extension cannot run; TF32 is off (the torch backend's exponent is a matmul)."""

import json

import pytest
import torch
from test_lift import tiny_backbone, tiny_config_for_tests, tiny_room
from test_rasterize import H, W, leaves, make_scene

from fit3d_hf.lift import lift_scene
from fit3d_hf.splatting import (
    CappedDefaultStrategy,
    gsplat_backend,
    gsplat_extension_problem,
    load_gsplat_extension,
    rasterize,
    resolve_backend,
)

pytestmark = pytest.mark.cuda

VALUE_TOLERANCE = 2e-3  # max abs difference of renders, alphas and features
GRADIENT_TOLERANCE = 1e-2  # relative (Frobenius) difference of each gradient


@pytest.fixture(scope="module", autouse=True)
def gsplat_kernels():
    """gsplat's extension loaded (compiled on first use), TF32 off; skip with the reason when it cannot run."""
    problem = gsplat_extension_problem()
    if problem is not None:
        pytest.skip(problem)
    load_gsplat_extension()
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(precision)


def both_backends(scene, record_property, label, backgrounds=None, **kwargs):
    """Render `scene` (+ `features`) with both backends, backpropagate one loss; compare values and gradients."""
    outputs, grads = {}, {}
    features = kwargs.pop("features", None)
    for backend in ("torch", "gsplat"):
        params = leaves(*scene[:5], *([] if features is None else [features]))
        r, a, meta = rasterize(
            *params[:5], *scene[5:], W, H, backgrounds=backgrounds, features=params[5] if features is not None else None,
            backend=backend, **kwargs,
        )  # fmt: skip
        assert meta["backend"] == backend
        meta["means2d"].retain_grad()
        loss = r.square().sum() + a.sum() + (meta["features"].square().sum() if features is not None else 0)
        loss.backward()
        outputs[backend] = (r, a, meta.get("features"), meta["radii"])
        grads[backend] = [p.grad for p in params] + [meta["means2d"].grad]
    covered = torch.ones_like(outputs["gsplat"][1], dtype=torch.bool)
    if kwargs.get("render_mode") == "RGB+ED":  # expected depth divides by alpha: compare it where alpha is not tiny
        covered = outputs["gsplat"][1] > 0.05
    for name, x, y in zip(["renders", "alphas", "features"], outputs["torch"][:3], outputs["gsplat"][:3]):
        if x is None:
            continue
        diff = ((x - y).abs() * covered).max().item()
        record_property(f"max_abs_diff_{name}_{label}", diff)
        print(f"gsplat parity {label}: {name} max abs diff {diff:.3g}")
        assert diff < VALUE_TOLERANCE, name
    # Radii are ceil()s of float32 values: allow a rare off-by-one at a rounding edge.
    assert (outputs["torch"][3] == outputs["gsplat"][3]).float().mean() > 0.99, "radii"
    names = ["means", "quats", "scales", "opacities", "colors"] + ([] if features is None else ["features"]) + ["means2d"]
    for name, g, g_ref in zip(names, grads["torch"], grads["gsplat"]):
        rel = ((g - g_ref).norm() / g_ref.norm().clamp(min=1e-12)).item()
        record_property(f"grad_rel_diff_{name}_{label}", rel)
        print(f"gsplat parity {label}: grad {name} relative diff {rel:.3g}")
        assert g_ref.abs().max() > 0, name
        assert rel < GRADIENT_TOLERANCE, name
    return outputs


def cuda_scene(n=300, d=3, seed=17):
    return [t.float().cuda() for t in make_scene(n=n, n_cameras=2, d=d, seed=seed)]


@pytest.mark.parametrize("render_mode,d", [("RGB", 3), ("RGB+D", 64), ("RGB+ED", 67)])
def test_plain_colours_and_depth_modes(render_mode, d, record_property):
    scene = cuda_scene(d=d)
    features = torch.randn(300, 16, device="cuda")
    backgrounds = torch.rand(2, d, device="cuda")
    both_backends(scene, record_property, f"{render_mode}_D{d}", backgrounds=backgrounds, render_mode=render_mode,
                  features=features)  # fmt: skip


def test_sh_degree_3_with_64_features_as_lifting_renders(record_property):
    scene = cuda_scene()
    generator = torch.Generator().manual_seed(5)
    scene[4] = (torch.randn(300, 16, 3, generator=generator) * 0.3).cuda()  # sh0 + shN of degree 3
    features = torch.randn(300, 64, generator=generator).cuda()
    both_backends(scene, record_property, "SH3_F64", sh_degree=3, features=features)


def test_wide_features_and_colours_in_chunks(record_property, monkeypatch):
    """Widths past any chunk (and past gsplat's widest kernel that fits): the backward pass runs, and agrees."""
    scene = cuda_scene(d=150)
    features = torch.randn(300, 200, device="cuda")
    chunk = gsplat_backend.device_channel_chunk(scene[0].device)
    record_property("channel_chunk", chunk)
    print(f"channel chunk on {torch.cuda.get_device_name()}: {chunk}")
    wide = both_backends(scene, record_property, "D150_F200", features=features)
    # Narrower chunks change nothing but the number of passes.
    monkeypatch.setattr(gsplat_backend, "device_channel_chunk", lambda device: 8)
    narrow = rasterize(*scene, W, H, features=features, backend="gsplat")
    torch.testing.assert_close(narrow[0], wide["gsplat"][0].detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(narrow[2]["features"], wide["gsplat"][2].detach(), rtol=0, atol=1e-5)


def test_default_strategy_step_on_gsplat_meta_matches_the_torch_twin():
    """CappedDefaultStrategy (gsplat's DefaultStrategy) gathers the same statistics from either backend's
    meta, and a refinement on gsplat's grows the Gaussians the torch twin's would."""
    means, quats, scales, opacities, colors, viewmats, Ks = cuda_scene(seed=23)

    def two_steps(backend, grow_grad2d=2e-4, refine=False):
        """Steps 1 and 2 (a refinement when `refine`): the parameters, and the statistics growth saw (else the last)."""
        params = {
            "means": means, "quats": quats, "scales": scales.log(), "opacities": torch.logit(opacities), "colors": colors,
        }  # fmt: skip
        params = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
        optimizers = {k: torch.optim.Adam([p], lr=1e-3, eps=1e-15) for k, p in params.items()}
        strategy = CappedDefaultStrategy(refine_start_iter=0, refine_every=2 if refine else 10**6, reset_every=10**6,
                                         prune_opa=0.0, grow_grad2d=grow_grad2d)  # fmt: skip
        state = strategy.initialize_state(scene_scale=1.0)
        seen = {}
        grow = strategy._grow_gs

        def recording_grow(params, optimizers, state, step):
            seen.update(grad2d=state["grad2d"].clone(), count=state["count"].clone())
            return grow(params, optimizers, state, step)

        strategy._grow_gs = recording_grow
        for step in (1, 2):
            renders, _, info = rasterize(
                params["means"], params["quats"], params["scales"].exp(), torch.sigmoid(params["opacities"]),
                params["colors"], viewmats, Ks, W, H, backend=backend,
            )  # fmt: skip
            strategy.step_pre_backward(params, optimizers, state, step, info)
            renders.square().mean().backward()
            torch.manual_seed(0)  # splitting draws from the RNG
            strategy.step_post_backward(params, optimizers, state, step, info)
        return params, (seen if refine else state)

    _, torch_stats = two_steps("torch")
    _, gsplat_stats = two_steps("gsplat")
    assert torch_stats["count"].sum() > 200, "most Gaussians must be seen"
    assert (torch_stats["count"] == gsplat_stats["count"]).float().mean() > 0.99
    rel = ((torch_stats["grad2d"] - gsplat_stats["grad2d"]).norm() / torch_stats["grad2d"].norm()).item()
    print(f"DefaultStrategy statistics: grad2d relative diff {rel:.3g}")
    assert rel < GRADIENT_TOLERANCE

    torch_grads = torch_stats["grad2d"] / torch_stats["count"].clamp_min(1)
    threshold = torch_grads[torch_stats["count"] > 0].median().item()
    selected = {}
    for backend in ("torch", "gsplat"):
        params, seen = two_steps(backend, threshold, refine=True)
        selected[backend] = seen["grad2d"] / seen["count"].clamp_min(1) > threshold
        assert 0 < selected[backend].sum() < 300
        assert len(params["means"]) == 300 + selected[backend].sum()  # each clone or split adds one
    # The same Gaussians grow, but for ones within float noise of the threshold.
    near_threshold = (torch_grads / threshold - 1).abs() < 0.05
    assert not ((selected["torch"] != selected["gsplat"]) & ~near_threshold).any()


def test_auto_takes_gsplat_for_float32_cuda_and_torch_for_float64():
    assert resolve_backend("auto", torch.device("cuda"), torch.float32) == "gsplat"
    scene = cuda_scene(n=20)
    assert rasterize(*scene, W, H)[2]["backend"] == "gsplat"
    assert rasterize(*[t.double() for t in scene], W, H)[2]["backend"] == "torch"  # gsplat has no float64 kernels


def test_lifting_on_the_gpu_records_gsplat(tmp_path):
    backbone = tiny_backbone().cuda()
    lift_scene(tiny_room(), backbone, tiny_config_for_tests(check_every=5), output_dir=tmp_path, progress=False)
    report = json.loads((tmp_path / "room_0000.json").read_text())
    assert report["backend"] == "gsplat" and report["device"].startswith("cuda")
    assert len(report["loss_history"]) == 24 and report["loss_history"][-1] < report["loss_history"][0]
    print(f"lifting on {torch.cuda.get_device_name()}: {report['iterations_per_second']:.1f} it/s, "
          f"PSNR {report['metrics']['psnr']:.2f} dB")  # fmt: skip
