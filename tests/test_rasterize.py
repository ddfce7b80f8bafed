"""fit3d_hf.splatting.rasterize: the torch backend against an independent float64 brute-force
compositor (gsplat's own pure-torch projection + a per-Gaussian loop over all pixels), analytic
cases, the feature pass, DefaultStrategy on CPU and input validation. The gsplat path on CPU:
test_gsplat_backend.py; gsplat parity on CUDA: test_rasterize_cuda.py."""

import math

import pytest
import torch
from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci, _spherical_harmonics
from gsplat.strategy import DefaultStrategy

from fit3d_hf.splatting import _torch_backend, rasterize

W, H = 28, 20


def make_scene(n=24, n_cameras=1, d=3, seed=0, dtype=torch.float64, opacity_range=(0.05, 0.95)):
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g, dtype=dtype) - 0.5) * torch.tensor([1.6, 1.2, 1.0], dtype=dtype)
    means[:, 2] += 3.0
    quats = torch.randn(n, 4, generator=g, dtype=dtype)
    scales = torch.rand(n, 3, generator=g, dtype=dtype) * 0.12 + 0.03
    lo, hi = opacity_range
    opacities = torch.rand(n, generator=g, dtype=dtype) * (hi - lo) + lo
    colors = torch.rand(n, d, generator=g, dtype=dtype)
    viewmats = torch.eye(4, dtype=dtype).repeat(n_cameras, 1, 1)
    for c in range(1, n_cameras):
        angle = 0.1 * c
        viewmats[c, 0, 0] = viewmats[c, 2, 2] = math.cos(angle)
        viewmats[c, 0, 2], viewmats[c, 2, 0] = math.sin(angle), -math.sin(angle)
        viewmats[c, :3, 3] = torch.tensor([0.1 * c, -0.05 * c, 0.2], dtype=dtype)
    Ks = torch.tensor([[30.0, 0.0, W / 2 + 0.3], [0.0, 32.0, H / 2 - 0.2], [0.0, 0.0, 1.0]], dtype=dtype)
    return means, quats, scales, opacities, colors, viewmats, Ks.repeat(n_cameras, 1, 1)


def reference(means, quats, scales, opacities, colors, viewmats, Ks, width, height, backgrounds=None,
              render_mode="RGB", sh_degree=None, features=None, near_plane=0.01, eps2d=0.3, info=None):  # fmt: skip
    """Every Gaussian at every pixel, one Gaussian at a time in depth order, with gsplat's rules.

    `info`, when a dict, receives `means2d` [C, N, 2] (grad retained) and `ended` [C, H, W], the
    pixels that stopped early at transmittance 1e-4."""
    covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_preci=False)
    radii, means2d, depths, conics, _ = _fully_fused_projection(
        means, covars, viewmats, Ks, width, height, eps2d=eps2d, near_plane=near_plane
    )
    if info is not None and means2d.requires_grad:
        means2d.retain_grad()
    ended = []
    px = torch.arange(width, dtype=means.dtype) + 0.5
    py = torch.arange(height, dtype=means.dtype) + 0.5
    renders, alphas, feats = [], [], []
    for c in range(viewmats.shape[0]):
        if sh_degree is None:
            col = colors
        else:
            campos = torch.linalg.inv(viewmats[c])[:3, 3]
            col = torch.clamp_min(_spherical_harmonics(sh_degree, means - campos, colors) + 0.5, 0.0)
        if render_mode != "RGB":
            col = torch.cat([col, depths[c, :, None]], dim=1)
        if features is not None:
            col = torch.cat([col, features], dim=1)
        trans = torch.ones(height, width, dtype=means.dtype)
        done = torch.zeros(height, width, dtype=torch.bool)
        out = torch.zeros(height, width, col.shape[1], dtype=means.dtype)
        for i in torch.argsort(depths[c]).tolist():
            if not (radii[c, i] > 0).all():
                continue
            dx = means2d[c, i, 0] - px[None, :]
            dy = means2d[c, i, 1] - py[:, None]
            a, b, cc = conics[c, i]
            sigma = 0.5 * (a * dx * dx + cc * dy * dy) + b * dx * dy
            alpha = torch.clamp(opacities[i] * torch.exp(-sigma), max=0.999)
            ok = (sigma >= 0) & (alpha >= 1 / 255) & ~done
            ends = ok & (trans * (1 - alpha) <= 1e-4)
            done = done | ends
            alpha = torch.where(ok & ~ends, alpha, 0.0)
            out = out + (alpha * trans)[..., None] * col[i]
            trans = trans * (1 - alpha)
        n_geo = col.shape[1] - (0 if features is None else features.shape[1])
        render = out[..., :n_geo]
        if backgrounds is not None:
            bg = backgrounds[c]
            if render_mode != "RGB":
                bg = torch.cat([bg, bg.new_zeros(1)])
            render = render + trans[..., None] * bg
        if render_mode == "RGB+ED":
            render = torch.cat([render[..., :-1], render[..., -1:] / (1 - trans[..., None]).clamp(min=1e-10)], -1)
        renders.append(render)
        ended.append(done)
        alphas.append(1 - trans[..., None])
        feats.append(out[..., n_geo:])
    if info is not None:
        info.update(means2d=means2d, ended=torch.stack(ended))
    return torch.stack(renders), torch.stack(alphas), torch.stack(feats)


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def grads_of(loss_fn, params):
    loss = loss_fn(*params)
    return torch.autograd.grad(loss, params, allow_unused=True)


@pytest.mark.parametrize("seed,n_cameras", [(0, 1), (1, 1), (2, 3)])
def test_matches_bruteforce_values_and_gradients(seed, n_cameras):
    scene = make_scene(n=30, n_cameras=n_cameras, seed=seed)
    means, quats, scales, opacities, colors, viewmats, Ks = scene
    bg = torch.rand(n_cameras, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    weights = torch.randn(n_cameras, H, W, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9))

    def loss_ours(m, q, s, o, c):
        r, a, _ = rasterize(m, q, s, o, c, viewmats, Ks, W, H, backgrounds=bg, backend="torch")
        return (torch.cat([r, a], -1) * weights).sum()

    def loss_ref(m, q, s, o, c):
        r, a, _ = reference(m, q, s, o, c, viewmats, Ks, W, H, backgrounds=bg)
        return (torch.cat([r, a], -1) * weights).sum()

    params = leaves(means, quats, scales, opacities, colors)
    r, a, _ = rasterize(*params, viewmats, Ks, W, H, backgrounds=bg, backend="torch")
    r_ref, a_ref, _ = reference(*params, viewmats, Ks, W, H, backgrounds=bg)
    assert a.max() > 0.5, "the scene should cover part of the image"
    torch.testing.assert_close(r, r_ref, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(a, a_ref, atol=1e-10, rtol=1e-9)
    ours, ref = grads_of(loss_ours, params), grads_of(loss_ref, params)
    for name, g, g_ref in zip(["means", "quats", "scales", "opacities", "colors"], ours, ref):
        assert g_ref.abs().max() > 0, name
        torch.testing.assert_close(g, g_ref, atol=1e-8, rtol=1e-6, msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize(
    "tile_size,block,max_elements,min_step,max_saved",
    [(8, 4, 4 * 64 * 2, 0, 0), (16, 7, 1, 0, 1 << 23), (8, 2, 1 << 22, 1 << 20, 3000), (4, 64, 1 << 22, 0, 1 << 23)],
)
def test_tiles_blocks_chunks_and_early_termination(tile_size, block, max_elements, min_step, max_saved, monkeypatch):
    """Long tile lists split over several blocks (fixed or growing) and tile chunks; opaque layers
    end pixels early; the backward pass reuses the forward pass's blocks or recomputes them (when
    more than `max_saved` values); the result does not depend on the tile size."""
    monkeypatch.setattr(_torch_backend, "TILE_SIZE", tile_size)
    monkeypatch.setattr(_torch_backend, "BLOCK", block)
    monkeypatch.setattr(_torch_backend, "MAX_BLOCK_ELEMENTS", max_elements)
    monkeypatch.setattr(_torch_backend, "MIN_STEP_ELEMENTS", min_step)
    monkeypatch.setattr(_torch_backend, "MAX_SAVED_ELEMENTS", max_saved)
    scene = make_scene(n=90, n_cameras=2, seed=6, opacity_range=(0.8, 1.0))
    bg = torch.full((2, 3), 0.3, dtype=torch.float64)
    params = leaves(scene[0], scene[1], 2 * scene[2], *scene[3:5])
    r, a, _ = rasterize(*params, *scene[5:], W, H, backgrounds=bg, backend="torch")
    info = {}
    r_ref, a_ref, _ = reference(*params, *scene[5:], W, H, backgrounds=bg, info=info)
    assert info["ended"].sum() > 20, "some pixels must terminate early"
    torch.testing.assert_close(r, r_ref, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(a, a_ref, atol=1e-10, rtol=1e-9)
    ours = torch.autograd.grad(r.square().sum() + a.sum(), params)
    ref = torch.autograd.grad(r_ref.square().sum() + a_ref.sum(), params)
    for g, g_ref in zip(ours, ref):
        torch.testing.assert_close(g, g_ref, atol=1e-8, rtol=1e-6)


def test_tile_lists_hold_exactly_the_gaussians_that_reach_a_pixel():
    """A tile's list holds every pair whose alpha reaches 1/255 at one of its pixel centres (the
    bounding-box tiles it misses are dropped), front to back."""
    means, quats, scales, opacities, _, viewmats, Ks = make_scene(n=200, n_cameras=2, seed=8)
    scales = scales * torch.tensor([2.5, 0.3, 1.0], dtype=torch.float64)  # elongated: boxes wider than ellipses
    proj = _torch_backend.project(means, quats, scales, opacities, viewmats, Ks, W, H, 0.01, 1e10, 0.3)
    ts = 4
    plan = _torch_backend.bin_to_tiles(proj, 2, W, H, ts)
    tiles_x, tiles_y = plan.tiles_x, plan.tiles_y
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float64) + 0.5, torch.arange(W, dtype=torch.float64) + 0.5, indexing="ij")
    d = torch.stack([xs, ys], -1)[None] - proj.means2d.detach()[:, None, None, :]  # [M, H, W, 2]
    a, b, c = proj.conics.detach().unbind(-1)
    sigma = (
        0.5 * (a[:, None, None] * d[..., 0] ** 2 + c[:, None, None] * d[..., 1] ** 2) + b[:, None, None] * d[..., 0] * d[..., 1]
    )
    alpha = proj.opacities.detach()[:, None, None] * torch.exp(-sigma)
    pad = torch.nn.functional.pad(alpha, (0, tiles_x * ts - W, 0, tiles_y * ts - H))
    peak = pad.reshape(-1, tiles_y, ts, tiles_x, ts).amax(dim=(2, 4))  # [M, ty, tx]
    reaches, nearly = peak >= 1 / 255, peak >= 0.99 / 255  # pairs at the threshold may be listed
    radii = proj.radii.double()
    in_box = []
    for m in range(len(proj.depths)):
        x0, x1 = proj.means2d[m, 0] - radii[m, 0], proj.means2d[m, 0] + radii[m, 0]
        y0, y1 = proj.means2d[m, 1] - radii[m, 1], proj.means2d[m, 1] + radii[m, 1]
        tx, ty = torch.arange(tiles_x) * ts, torch.arange(tiles_y) * ts
        in_box.append(((ty[:, None] + ts > y0) & (ty[:, None] < y1)) & ((tx[None] + ts > x0) & (tx[None] < x1)))
    expected, allowed = reaches & torch.stack(in_box), nearly & torch.stack(in_box)
    for tile in range(plan.lengths.numel()):
        camera, t = divmod(tile, tiles_x * tiles_y)
        listed = plan.entries[plan.starts[tile] : plan.starts[tile] + plan.lengths[tile]]
        assert (proj.camera_ids[listed] == camera).all()
        assert (proj.depths[listed].diff() >= 0).all(), "front to back"
        in_camera = proj.camera_ids == camera
        wanted = (in_camera & expected[:, t // tiles_x, t % tiles_x]).nonzero().squeeze(1)
        may = (in_camera & allowed[:, t // tiles_x, t % tiles_x]).nonzero().squeeze(1)
        assert set(wanted.tolist()) <= set(listed.tolist()) <= set(may.tolist()), f"tile {tile}"
    assert (torch.stack(in_box) & ~reaches).sum() > 50, "the scene should have box tiles that the ellipses miss"


def test_float32_close_to_float64():
    scene = make_scene(n=40, seed=5)
    r64, a64, _ = rasterize(*scene, W, H, backend="torch")
    r32, a32, _ = rasterize(*[t.float() for t in scene], W, H, backend="torch")
    assert r32.dtype == torch.float32
    torch.testing.assert_close(r32.double(), r64, atol=2e-4, rtol=0)
    torch.testing.assert_close(a32.double(), a64, atol=2e-4, rtol=0)


@pytest.mark.parametrize("d", [1, 3, 64, 67])
def test_channel_widths(d):
    scene = make_scene(n=20, d=d, seed=d)
    colors = leaves(scene[4])[0]
    r, a, _ = rasterize(*scene[:4], colors, *scene[5:], W, H, backend="torch")
    r_ref, _, _ = reference(*scene[:4], colors, *scene[5:], W, H)
    assert r.shape == (1, H, W, d) and a.shape == (1, H, W, 1)
    torch.testing.assert_close(r, r_ref, atol=1e-10, rtol=1e-9)
    (g,) = torch.autograd.grad(r.square().sum(), colors)
    (g_ref,) = torch.autograd.grad(r_ref.square().sum(), colors)
    torch.testing.assert_close(g, g_ref, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("render_mode", ["RGB+D", "RGB+ED"])
def test_depth_modes(render_mode):
    scene = make_scene(n=25, n_cameras=2, seed=3)
    bg = torch.full((2, 3), 0.25, dtype=torch.float64)
    means = leaves(scene[0])[0]
    r, _, _ = rasterize(means, *scene[1:], W, H, backgrounds=bg, render_mode=render_mode, backend="torch")
    r_ref, _, _ = reference(means, *scene[1:], W, H, backgrounds=bg, render_mode=render_mode)
    assert r.shape == (2, H, W, 4)
    torch.testing.assert_close(r, r_ref, atol=1e-9, rtol=1e-8)
    covered = r_ref[..., 3] > 0
    if render_mode == "RGB+ED":  # expected depth lies inside the scene's depth range
        assert ((r[..., 3][covered] > 2.0) & (r[..., 3][covered] < 4.0)).all()
    (g,) = torch.autograd.grad(r[..., 3].sum(), means)
    (g_ref,) = torch.autograd.grad(r_ref[..., 3].sum(), means)
    torch.testing.assert_close(g, g_ref, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("sh_degree", [0, 1, 3, 4])
def test_spherical_harmonics(sh_degree):
    scene = list(make_scene(n=20, n_cameras=2, seed=11))
    coeffs = torch.randn(20, 25, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 0.3
    means, coeffs = leaves(scene[0], coeffs)
    r, _, _ = rasterize(means, *scene[1:4], coeffs, *scene[5:], W, H, sh_degree=sh_degree, backend="torch")
    r_ref, _, _ = reference(means, *scene[1:4], coeffs, *scene[5:], W, H, sh_degree=sh_degree)
    assert r.shape == (2, H, W, 3)
    torch.testing.assert_close(r, r_ref, atol=1e-10, rtol=1e-9)
    ours = torch.autograd.grad(r.square().sum(), [means, coeffs])
    ref = torch.autograd.grad(r_ref.square().sum(), [means, coeffs])
    for g, g_ref in zip(ours, ref):
        torch.testing.assert_close(g, g_ref, atol=1e-8, rtol=1e-6)
    n_bases = (sh_degree + 1) ** 2
    assert (ours[1][:, n_bases:] == 0).all() and ours[1][:, :n_bases].abs().max() > 0


def one_gaussian(depth=2.0, scale=0.1, opacity=0.8, cx=W / 2 + 0.5, cy=H / 2 + 0.5, focal=40.0):
    means = torch.tensor([[0.0, 0.0, depth]], dtype=torch.float64)
    quats = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    scales = torch.full((1, 3), scale, dtype=torch.float64)
    opacities = torch.tensor([opacity], dtype=torch.float64)
    Ks = torch.tensor([[[focal, 0.0, cx], [0.0, focal, cy], [0.0, 0.0, 1.0]]], dtype=torch.float64)
    return means, quats, scales, opacities, torch.eye(4, dtype=torch.float64)[None], Ks


def test_one_gaussian_analytic():
    means, quats, scales, opacities, viewmats, Ks = one_gaussian()
    color = torch.tensor([[0.2, 0.5, 0.9]], dtype=torch.float64)
    r, a, meta = rasterize(means, quats, scales, opacities, color, viewmats, Ks, W, H, backend="torch")
    var = (40.0 * 0.1 / 2.0) ** 2 + 0.3  # (f s / z)^2 plus the eps2d dilation, pixels^2
    j0, i0 = W // 2, H // 2  # this pixel's centre is the projected mean
    for di, dj in [(0, 0), (0, 2), (3, -1), (-2, -2)]:
        expected = 0.8 * math.exp(-0.5 * (di * di + dj * dj) / var)
        torch.testing.assert_close(a[0, i0 + di, j0 + dj, 0].item(), expected, rtol=1e-12, atol=0)
        torch.testing.assert_close(r[0, i0 + di, j0 + dj], expected * color[0], rtol=1e-12, atol=0)
    radius = math.ceil(min(3.33, math.sqrt(2 * math.log(255 * 0.8))) * math.sqrt(var))
    assert meta["radii"].tolist() == [[[radius, radius]]]
    torch.testing.assert_close(meta["means2d"][0, 0], torch.tensor([W / 2 + 0.5, H / 2 + 0.5], dtype=torch.float64))
    # Far from the centre the contribution falls under 1/255 and is skipped, not blended.
    assert a[0, 0, 0, 0] == 0


def test_two_overlapping_gaussians_front_to_back():
    m1, q, s, _, viewmats, Ks = one_gaussian()
    means = torch.cat([m1 + torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), m1])  # back first
    quats, scales = q.repeat(2, 1), s.repeat(2, 1)
    opacities = torch.tensor([0.7, 0.6], dtype=torch.float64)
    colors = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    bg = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    r, a, _ = rasterize(means, quats, scales, opacities, colors, viewmats, Ks, W, H, backgrounds=bg, backend="torch")
    front, back = 0.6, 0.7  # the centre pixel sees both at full opacity
    expected = front * colors[1] + (1 - front) * back * colors[0] + (1 - front) * (1 - back) * bg[0]
    torch.testing.assert_close(r[0, H // 2, W // 2], expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(a[0, H // 2, W // 2, 0].item(), 1 - (1 - front) * (1 - back), rtol=1e-12, atol=0)
    r_swapped, _, _ = rasterize(means.flip(0), quats, scales, opacities.flip(0), colors.flip(0), viewmats, Ks, W, H,
                                backgrounds=bg, backend="torch")  # fmt: skip
    torch.testing.assert_close(r_swapped, r, rtol=0, atol=1e-15)


def test_alpha_clamp_and_early_termination():
    """Opacity 1 blends at 0.999; the second of three opaque layers would take T to 1e-6 <= 1e-4,
    so the pixel stops before it (exclusive) and keeps T = 1e-3 for the background."""
    m1, q, s, _, viewmats, Ks = one_gaussian(scale=0.3)
    step = torch.tensor([0.0, 0.0, 0.5], dtype=torch.float64)
    means = torch.cat([m1, m1 + step, m1 + 2 * step])
    colors = torch.eye(3, dtype=torch.float64)
    bg = torch.tensor([[0.5, 0.5, 0.5]], dtype=torch.float64)
    opacities = torch.ones(3, dtype=torch.float64)
    r, a, _ = rasterize(means, q.repeat(3, 1), s.repeat(3, 1), opacities, colors, viewmats, Ks, W, H,
                        backgrounds=bg, backend="torch")  # fmt: skip
    expected = torch.tensor([0.999, 0.0, 0.0], dtype=torch.float64) + 1e-3 * bg[0]
    torch.testing.assert_close(r[0, H // 2, W // 2], expected)
    torch.testing.assert_close(a[0, H // 2, W // 2, 0].item(), 0.999)


@pytest.mark.parametrize("max_saved", [0, 1 << 23])
def test_clamped_alpha_passes_no_gradient(max_saved, monkeypatch):
    """Gaussians of opacity above 0.999 blend at 0.999 near their centre, where their opacity and
    shape get no gradient, with the forward pass's blocks kept or recomputed."""
    monkeypatch.setattr(_torch_backend, "MAX_SAVED_ELEMENTS", max_saved)
    m1, q, s, _, viewmats, Ks = one_gaussian(scale=0.3)
    front, back = [0.1, -0.05, 0.0], [-0.2, 0.1, 0.6]  # two overlapping opaque Gaussians
    means = m1 + torch.tensor([front, back], dtype=torch.float64)
    colors = torch.tensor([[1.0, 0.2, 0.0], [0.0, 0.5, 1.0]], dtype=torch.float64)
    opacities = torch.tensor([1.0, 0.9995], dtype=torch.float64)
    params = leaves(
        means, q.repeat(2, 1), s.repeat(2, 1) * torch.tensor([[1.0, 0.7, 1.0]], dtype=torch.float64), opacities, colors
    )
    r, a, _ = rasterize(*params, viewmats, Ks, W, H, backend="torch")
    r_ref, a_ref, _ = reference(*params, viewmats, Ks, W, H)
    assert (a >= 0.999).any(), "the front Gaussian should be clamped at 0.999 at its centre"
    torch.testing.assert_close(r, r_ref, atol=1e-10, rtol=1e-9)
    ours = torch.autograd.grad(r.square().sum() + a.sum(), params)
    ref = torch.autograd.grad(r_ref.square().sum() + a_ref.sum(), params)
    for g, g_ref in zip(ours, ref):
        torch.testing.assert_close(g, g_ref, atol=1e-8, rtol=1e-6)


def test_gaussian_behind_camera_and_empty_scene():
    means, quats, scales, opacities, viewmats, Ks = one_gaussian(depth=-2.0)
    means, colors = leaves(means, torch.ones(1, 3, dtype=torch.float64))
    bg = torch.tensor([[0.1, 0.2, 0.3]], dtype=torch.float64)
    r, a, meta = rasterize(means, quats, scales, opacities, colors, viewmats, Ks, W, H, backgrounds=bg, backend="torch")
    assert (a == 0).all() and (r == bg[0]).all()
    assert (meta["radii"] == 0).all()
    r.sum().backward()
    assert means.grad is None or (means.grad == 0).all()

    empty = [torch.zeros(0, k, dtype=torch.float64) for k in (3, 4, 3)]
    r, a, meta = rasterize(*empty, torch.zeros(0, dtype=torch.float64), torch.zeros(0, 3, dtype=torch.float64),
                           viewmats.repeat(2, 1, 1), Ks.repeat(2, 1, 1), W, H, backgrounds=bg.repeat(2, 1),
                           backend="torch")  # fmt: skip
    assert r.shape == (2, H, W, 3) and (r == bg[0]).all() and (a == 0).all()
    assert meta["means2d"].shape == (2, 0, 2)


def test_several_cameras_equal_single_camera_calls():
    scene = make_scene(n=40, n_cameras=3, seed=7, d=5)
    means, quats, scales, opacities, colors, viewmats, Ks = scene
    r, a, meta = rasterize(*scene, W, H, render_mode="RGB+D", backend="torch")
    assert meta["n_cameras"] == 3 and meta["means2d"].shape == (3, 40, 2) and meta["radii"].shape == (3, 40, 2)
    for c in range(3):
        r1, a1, meta1 = rasterize(means, quats, scales, opacities, colors, viewmats[c : c + 1], Ks[c : c + 1], W, H,
                                  render_mode="RGB+D", backend="torch")  # fmt: skip
        torch.testing.assert_close(r[c : c + 1], r1, rtol=0, atol=1e-14)
        torch.testing.assert_close(a[c : c + 1], a1, rtol=0, atol=1e-14)
        assert torch.equal(meta["radii"][c : c + 1], meta1["radii"])
    assert not torch.equal(r[0], r[1]), "cameras differ, so must their renders"


def test_image_larger_than_one_tile_and_not_a_multiple():
    """37×45 pixels: several 16-px tiles with a partial last row and column."""
    means, quats, scales, opacities, colors, viewmats, Ks = make_scene(n=60, seed=4)
    Ks = Ks.clone()
    Ks[:, 0, 2], Ks[:, 1, 2], Ks[:, 0, 0], Ks[:, 1, 1] = 18.5, 22.5, 45.0, 45.0
    params = leaves(means, opacities)
    r, a, _ = rasterize(params[0], quats, scales, params[1], colors, viewmats, Ks, 37, 45, backend="torch")
    r_ref, a_ref, _ = reference(params[0], quats, scales, params[1], colors, viewmats, Ks, 37, 45)
    torch.testing.assert_close(r, r_ref, atol=1e-10, rtol=1e-9)
    ours = torch.autograd.grad((r.sum() + a.sum()), params)
    ref = torch.autograd.grad((r_ref.sum() + a_ref.sum()), params)
    for g, g_ref in zip(ours, ref):
        torch.testing.assert_close(g, g_ref, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("f", [1, 64])
def test_feature_pass_reuses_weights_and_never_moves_geometry(f):
    scene = make_scene(n=30, n_cameras=2, seed=13)
    feats = torch.randn(30, f, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    bg = torch.full((2, 3), 0.5, dtype=torch.float64)
    means, quats, scales, opacities, colors, features = leaves(*scene[:5], feats)
    geometry = [means, quats, scales, opacities]
    r, a, meta = rasterize(*geometry, colors, *scene[5:], W, H, backgrounds=bg, features=features, backend="torch")
    _, _, f_ref = reference(*geometry, colors, *scene[5:], W, H, features=features)
    assert meta["features"].shape == (2, H, W, f)
    torch.testing.assert_close(meta["features"], f_ref, atol=1e-10, rtol=1e-9)  # background 0 for features

    target = torch.randn_like(meta["features"])
    grads = torch.autograd.grad((meta["features"] - target).abs().sum(), geometry + [colors, features],
                                allow_unused=True)  # fmt: skip
    for name, g in zip(["means", "quats", "scales", "opacities", "colors"], grads[:5]):
        assert g is None or (g == 0).all(), f"feature loss reached {name}"
    (g_ref,) = torch.autograd.grad((f_ref - target).abs().sum(), features)
    torch.testing.assert_close(grads[5], g_ref, atol=1e-9, rtol=1e-7)

    # With both losses, geometry gets exactly the RGB loss's gradients.
    r, a, meta = rasterize(*geometry, colors, *scene[5:], W, H, backgrounds=bg, features=features, backend="torch")
    both = torch.autograd.grad(r.sum() + a.sum() + meta["features"].square().sum(), geometry)
    r, a, _ = rasterize(*geometry, colors, *scene[5:], W, H, backgrounds=bg, backend="torch")
    rgb_only = torch.autograd.grad(r.sum() + a.sum(), geometry)
    for g, g_rgb in zip(both, rgb_only):
        torch.testing.assert_close(g, g_rgb, rtol=0, atol=1e-12)


@pytest.mark.parametrize("s,width,height", [(2, W, H), (4, W, H), (3, 27, 21)])
def test_features_averaged_over_pixel_blocks(s, width, height):
    """features_downscale=s gives the full feature render averaged over s×s blocks, with its
    gradients for the features alone, and leaves colours and alphas as they are."""
    scene = make_scene(n=40, n_cameras=2, seed=21)
    feats = torch.randn(40, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    means, quats, scales, opacities, colors, features = leaves(*scene[:5], feats)
    geometry = [means, quats, scales, opacities]
    r, a, meta = rasterize(*geometry, colors, *scene[5:], width, height, features=features, features_downscale=s, backend="torch")
    r_full, a_full, meta_full = rasterize(*geometry, colors, *scene[5:], width, height, features=features, backend="torch")
    _, _, f_ref = reference(*geometry, colors, *scene[5:], width, height, features=features)
    pooled_ref = torch.nn.functional.adaptive_avg_pool2d(f_ref.permute(0, 3, 1, 2), (height // s, width // s)).permute(0, 2, 3, 1)
    assert meta["features"].shape == (2, height // s, width // s, 5)
    assert pooled_ref.abs().max() > 0.1, "the features should cover part of the image"
    torch.testing.assert_close(meta["features"], pooled_ref, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(r, r_full, atol=1e-12, rtol=0)
    torch.testing.assert_close(a, a_full, atol=1e-12, rtol=0)
    target = torch.randn_like(meta["features"])
    grads = torch.autograd.grad((meta["features"] - target).abs().sum(), geometry + [colors, features], allow_unused=True)
    assert all(g is None or (g == 0).all() for g in grads[:5]), "a feature loss must not reach geometry or colours"
    (g_ref,) = torch.autograd.grad((pooled_ref - target).abs().sum(), features)
    torch.testing.assert_close(grads[5], g_ref, atol=1e-9, rtol=1e-7)
    with pytest.raises(ValueError, match="features_downscale"):
        rasterize(*geometry, colors, *scene[5:], width + 1, height, features=features, features_downscale=s, backend="torch")


def test_default_strategy_runs_on_torch_backend():
    torch.manual_seed(0)
    means, quats, scales, opacities, colors, viewmats, Ks = [t.float() for t in make_scene(n=50, n_cameras=2, seed=21)]
    params = torch.nn.ParameterDict({
        "means": means, "quats": quats, "scales": scales.log(),
        "opacities": torch.logit(opacities), "colors": colors,
    })  # fmt: skip
    optimizers = {k: torch.optim.Adam([p], lr=1e-3) for k, p in params.items()}
    strategy = DefaultStrategy(refine_start_iter=0, refine_every=2, grow_grad2d=1e-9, grow_scale3d=1.0, prune_opa=0.0)
    strategy.check_sanity(params, optimizers)
    state = strategy.initialize_state(scene_scale=1.0)
    for step in range(2):
        renders, _, info = rasterize(params["means"], params["quats"], params["scales"].exp(),
                                     torch.sigmoid(params["opacities"]), params["colors"], viewmats, Ks, W, H,
                                     backend="torch")  # fmt: skip
        strategy.step_pre_backward(params, optimizers, state, step, info)
        renders.square().mean().backward()
        assert info["means2d"].grad.shape == (2, 50, 2)
        visible = (info["radii"] > 0).all(-1)
        assert info["means2d"].grad[visible].abs().sum() > 0 and (info["means2d"].grad[~visible] == 0).all()
        if step == 0:
            strategy.step_post_backward(params, optimizers, state, step, info)
            assert state["count"].sum() == visible.sum() and state["grad2d"].sum() > 0
        else:  # step 2 refines: every visible Gaussian has gradient > 1e-9 and is duplicated
            n_seen = int((state["count"] + visible.any(0).float() > 0).sum())
            strategy.step_post_backward(params, optimizers, state, 2, info)
            assert len(params["means"]) == 50 + n_seen
        for opt in optimizers.values():
            opt.step()
            opt.zero_grad()


def test_means2d_gradient_matches_bruteforce():
    """meta['means2d'].grad is d loss / d (pixel position) per camera, the input of DefaultStrategy."""
    scene = make_scene(n=25, n_cameras=2, seed=8)
    scene = leaves(scene[0]) + list(scene[1:])
    r, _, meta = rasterize(*scene, W, H, backend="torch")
    meta["means2d"].retain_grad()
    r.square().sum().backward()
    info = {}
    r_ref, _, _ = reference(*scene, W, H, info=info)
    means2d_ref = info["means2d"]
    r_ref.square().sum().backward()
    visible = (meta["radii"] > 0).all(-1)
    assert visible.sum() > 10
    torch.testing.assert_close(meta["means2d"].detach()[visible], means2d_ref.detach()[visible])
    torch.testing.assert_close(meta["means2d"].grad[visible], means2d_ref.grad[visible], atol=1e-9, rtol=1e-7)
    assert (meta["means2d"].grad[~visible] == 0).all()


@pytest.mark.parametrize(
    "change,needle",
    [
        (lambda a: a.update(means=a["means"].clone().index_fill_(0, torch.tensor([3]), float("nan"))), "means"),
        (lambda a: a.update(scales=a["scales"].clone().index_fill_(0, torch.tensor([1]), float("inf"))), "scales"),
        (lambda a: a.update(viewmats=a["viewmats"].clone().fill_(float("nan"))), "viewmats"),
        (lambda a: a.update(opacities=a["opacities"][:-1]), "opacities"),
        (lambda a: a.update(colors=a["colors"][:, :, None]), "colors"),
        (lambda a: a.update(quats=a["quats"][:, :3]), "quats"),
        (lambda a: a.update(Ks=a["Ks"][:, :2]), "Ks"),
        (lambda a: a.update(Ks=a["Ks"].repeat(2, 1, 1)), "Ks"),
        (lambda a: a.update(scales=a["scales"].float()), "scales"),
        (lambda a: a.update(means=a["means"].int()), "means"),
        (lambda a: a.update(width=0), "width"),
        (lambda a: a.update(height=12.5), "height"),
        (lambda a: a.update(backgrounds=torch.zeros(1, 4, dtype=torch.float64)), "backgrounds"),
        (lambda a: a.update(features=torch.zeros(7, 2, dtype=torch.float64)), "features"),
        (lambda a: a.update(features=torch.full((24, 2), float("nan"), dtype=torch.float64)), "features"),
        (lambda a: a.update(render_mode="D"), "render_mode"),
        (lambda a: a.update(backend="cuda"), "backend"),
        (lambda a: a.update(sh_degree=2), "colors"),
        (lambda a: a.update(near_plane=0.0), "near_plane"),
    ],
)
def test_bad_input_names_the_tensor(change, needle):
    names = ["means", "quats", "scales", "opacities", "colors", "viewmats", "Ks"]
    args = dict(zip(names, make_scene(n=24)), width=W, height=H, backend="torch")
    change(args)
    with pytest.raises((ValueError, TypeError)) as info:
        rasterize(**args)
    assert needle in str(info.value)


def test_gsplat_backend_refuses_cpu_tensors():
    scene = [t.float() for t in make_scene(n=5)]
    with pytest.raises(RuntimeError, match="CUDA"):
        rasterize(*scene, W, H, backend="gsplat")
    _, _, meta = rasterize(*scene, W, H)  # auto picks torch on CPU
    assert meta["backend"] == "torch"
