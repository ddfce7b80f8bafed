"""Pure-PyTorch Gaussian rasterizer with gsplat 1.5.3's semantics (runs on any device).

Three steps, as in gsplat's CUDA path:

1. `project`: EWA projection of every Gaussian into every camera (plain autograd), culling what
   gsplat culls: depth outside [near, far], a non-positive 2D determinant after the eps2d
   dilation, opacity < 1/255, an opacity-aware bounding box that misses the image.
2. `bin_to_tiles`: each visible (camera, Gaussian) pair is listed in every TILE_SIZE² tile its
   bounding box touches and where its alpha reaches 1/255 at some pixel; each tile's list is
   sorted front to back. Elsewhere a Gaussian's alpha is below 1/255 (gsplat skips it), so the
   image does not depend on the tile size; 8 px tiles waste fewer evaluations than gsplat's 16 px
   on a CPU.
3. `_Composite`: walks all tile lists together, a block of Gaussians per tile per step, with a
   running transmittance per pixel, dropping tiles whose pixels have all terminated. The exponent
   of a Gaussian over a tile is a quadratic in the pixel offset, so a whole block is one matmul.
   The backward pass reuses the forward pass's blending values while they are few (at most
   MAX_SAVED_ELEMENTS per tensor) and recomputes them block by block otherwise, so memory is
   bounded by that, one step (MAX_BLOCK_ELEMENTS values per temporary) and per-pixel state, never
   by N × H × W.

The composite also carries extra channels (features) whose gradients reach those channels only:
geometry gradients are computed from the first `n_geo` channels, so the feature pass reuses the
RGB pass's blending weights without a second rasterization.
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor

ALPHA_THRESHOLD = 1.0 / 255.0  # gsplat skips fainter contributions
ALPHA_MAX = 0.999
TRANSMITTANCE_MIN = 1e-4  # a pixel stops before the Gaussian that would take T to or below this
LOG_ALPHA_FLOOR = -80.0  # exp(-80) < 1/255: any exponent below is as skipped as this one
RADIUS_SIGMAS = 3.33
TILE_SIZE = 8
BLOCK = 32  # Gaussians per tile per step of the compositing loop, at least
MAX_BLOCK = 1024
MIN_STEP_ELEMENTS = 1 << 18  # when few tiles remain, longer blocks keep each step this large
MAX_BLOCK_ELEMENTS = 1 << 20  # tiles × block × pixels evaluated at once (bounds temporary memory)
MAX_SAVED_ELEMENTS = 1 << 23  # blending values per tensor the forward pass keeps for the backward pass

# Degree-0 real spherical harmonic, as in gsplat.
SH_C0 = 0.28209479177387814
_SH_C1 = 0.48860251190292


@dataclass
class Projection:
    """Visible (camera, Gaussian) pairs, M of them, in gsplat's conventions.

    camera_ids, gaussian_ids: [M] long. means2d: [M, 2] pixels. conics: [M, 3] upper triangle
    (a, b, c) of the inverse dilated 2D covariance. depths: [M] camera z. radii: [M, 2] int32
    bounding-box half sizes in pixels. opacities: [M].
    """

    camera_ids: Tensor
    gaussian_ids: Tensor
    means2d: Tensor
    conics: Tensor
    depths: Tensor
    radii: Tensor
    opacities: Tensor


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """[N, 4] wxyz quaternions (any norm) -> [N, 3, 3] rotation matrices."""
    w, x, y, z = torch.nn.functional.normalize(quats, dim=-1).unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]  # fmt: skip
    return torch.stack(rows, dim=-1).reshape(quats.shape[:-1] + (3, 3))


def project(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    near_plane: float,
    far_plane: float,
    eps2d: float,
) -> Projection:
    """Project [N] Gaussians into [C] cameras; only pairs gsplat would rasterize are returned."""
    rot, trans = viewmats[:, :3, :3], viewmats[:, :3, 3]
    with torch.no_grad():
        z_all = (means @ rot[:, 2, :].T + trans[:, 2]).T  # [C, N]
        camera_ids, gaussian_ids = ((z_all >= near_plane) & (z_all <= far_plane)).nonzero(as_tuple=True)

    # Differentiable projection of the depth-valid pairs.
    rot_m = rot[camera_ids]  # [M, 3, 3]
    means_c = (rot_m @ means[gaussian_ids, :, None]).squeeze(-1) + trans[camera_ids]  # [M, 3]
    rs = quat_to_rotmat(quats) * scales[:, None, :]
    covars_c = rot_m @ (rs @ rs.transpose(1, 2))[gaussian_ids] @ rot_m.transpose(1, 2)  # [M, 3, 3]

    K = Ks[camera_ids]
    fx, fy, cx, cy = K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2]
    x, y, z = means_c.unbind(-1)
    rz = 1.0 / z
    # gsplat clamps the Jacobian's direction to 1.3× the field of view (off-screen stability).
    lim_x_pos = (width - cx) / fx + 0.3 * (0.5 * width / fx)
    lim_x_neg = cx / fx + 0.3 * (0.5 * width / fx)
    lim_y_pos = (height - cy) / fy + 0.3 * (0.5 * height / fy)
    lim_y_neg = cy / fy + 0.3 * (0.5 * height / fy)
    tx = z * torch.clamp(x * rz, min=-lim_x_neg, max=lim_x_pos)
    ty = z * torch.clamp(y * rz, min=-lim_y_neg, max=lim_y_pos)
    zero = torch.zeros_like(z)
    jac = torch.stack([fx * rz, zero, -fx * tx * rz * rz, zero, fy * rz, -fy * ty * rz * rz], -1).reshape(-1, 2, 3)
    cov2d = jac @ covars_c @ jac.transpose(1, 2)  # [M, 2, 2]
    means2d = torch.stack([fx * x * rz + cx, fy * y * rz + cy], dim=-1)
    cov_a = cov2d[:, 0, 0] + eps2d
    cov_b = 0.5 * (cov2d[:, 0, 1] + cov2d[:, 1, 0])
    cov_c = cov2d[:, 1, 1] + eps2d

    with torch.no_grad():
        det = cov_a * cov_c - cov_b * cov_b
        opac = opacities[gaussian_ids]
        extend = torch.sqrt(2.0 * torch.log(opac.clamp(min=ALPHA_THRESHOLD) / ALPHA_THRESHOLD)).clamp(max=RADIUS_SIGMAS)
        radii = torch.stack([torch.ceil(extend * cov_a.clamp(min=0).sqrt()), torch.ceil(extend * cov_c.clamp(min=0).sqrt())], -1)
        mx, my = means2d[:, 0], means2d[:, 1]
        visible = (
            (det > 0)
            & (opac >= ALPHA_THRESHOLD)
            & ((radii[:, 0] > 0) | (radii[:, 1] > 0))
            & (mx + radii[:, 0] > 0)
            & (mx - radii[:, 0] < width)
            & (my + radii[:, 1] > 0)
            & (my - radii[:, 1] < height)
        )
        keep = visible.nonzero().squeeze(1)

    # Conics only where det > 0, so no 0/0 reaches the backward pass.
    cov_a, cov_b, cov_c = cov_a[keep], cov_b[keep], cov_c[keep]
    det = cov_a * cov_c - cov_b * cov_b
    conics = torch.stack([cov_c / det, -cov_b / det, cov_a / det], dim=-1)
    return Projection(
        camera_ids=camera_ids[keep],
        gaussian_ids=gaussian_ids[keep],
        means2d=means2d[keep],
        conics=conics,
        depths=z[keep],
        radii=radii[keep].to(torch.int32),
        opacities=opacities[gaussian_ids[keep]],
    )


def spherical_harmonics(degree: int, dirs: Tensor, coeffs: Tensor) -> Tensor:
    """Evaluate real SH of `degree` (0-4) at directions [M, 3] (any norm) with coeffs [M, K, 3] -> [M, 3].

    Same basis, signs and constants as gsplat (Sloan, "Efficient Spherical Harmonic Evaluation", 2013).
    """
    x, y, z = torch.nn.functional.normalize(dirs, dim=-1).unbind(-1)
    bases = [torch.full_like(x, SH_C0)]
    if degree >= 1:
        bases += [-_SH_C1 * y, _SH_C1 * z, -_SH_C1 * x]
    if degree >= 2:
        z2, c1, s1 = z * z, x * x - y * y, 2 * x * y
        bases += [
            0.5462742152960395 * s1, -1.092548430592079 * z * y, 0.9461746957575601 * z2 - 0.3153915652525201,
            -1.092548430592079 * z * x, 0.5462742152960395 * c1,
        ]  # fmt: skip
    if degree >= 3:
        c2, s2 = x * c1 - y * s1, x * s1 + y * c1
        tmp_c = -2.285228997322329 * z2 + 0.4570457994644658
        tmp_b = 1.445305721320277 * z
        sh12 = z * (1.865881662950577 * z2 - 1.119528997770346)
        bases += [
            -0.5900435899266435 * s2, tmp_b * s1, tmp_c * y, sh12, tmp_c * x, tmp_b * c1, -0.5900435899266435 * c2,
        ]  # fmt: skip
    if degree >= 4:
        c3, s3 = x * c2 - y * s2, x * s2 + y * c2
        tmp_d = z * (-4.683325804901025 * z2 + 2.007139630671868)
        tmp_c1 = 3.31161143515146 * z2 - 0.47308734787878
        tmp_b2 = -1.770130769779931 * z
        sh20 = 1.984313483298443 * z * sh12 - 1.006230589874905 * (0.9461746957575601 * z2 - 0.3153915652525201)
        bases += [
            0.6258357354491763 * s3, tmp_b2 * s2, tmp_c1 * s1, tmp_d * y, sh20,
            tmp_d * x, tmp_c1 * c1, tmp_b2 * c2, 0.6258357354491763 * c3,
        ]  # fmt: skip
    bases = torch.stack(bases, dim=-1)  # [M, (degree + 1)^2]
    return (bases[..., None] * coeffs[:, : bases.shape[-1]]).sum(dim=1)


@dataclass
class TilePlan:
    """Per-tile lists of visible pairs, front to back. Tiles are numbered camera-major, row-major.

    entries: [I] indices into the Projection's M pairs. starts, lengths: [C * tiles_y * tiles_x].
    """

    entries: Tensor
    starts: Tensor
    lengths: Tensor
    n_cameras: int
    width: int
    height: int
    tiles_x: int
    tiles_y: int
    tile_size: int


@torch.no_grad()
def bin_to_tiles(proj: Projection, n_cameras: int, width: int, height: int, tile_size: int) -> TilePlan:
    """Build the front-to-back Gaussian list of every tile (gsplat's isect_tiles + sort)."""
    tiles_x, tiles_y = math.ceil(width / tile_size), math.ceil(height / tile_size)
    centre = proj.means2d.detach() / tile_size
    half = proj.radii.to(centre.dtype) / tile_size
    x0 = torch.floor(centre[:, 0] - half[:, 0]).clamp(0, tiles_x).long()
    x1 = torch.ceil(centre[:, 0] + half[:, 0]).clamp(0, tiles_x).long()
    y0 = torch.floor(centre[:, 1] - half[:, 1]).clamp(0, tiles_y).long()
    y1 = torch.ceil(centre[:, 1] + half[:, 1]).clamp(0, tiles_y).long()
    counts = (x1 - x0) * (y1 - y0)  # tiles touched by each pair

    order = torch.argsort(proj.depths.detach(), stable=True)  # front to back
    counts = counts[order]
    # Per pair (in depth order): first tile id and bbox width; expanded to one row per touched tile.
    first_tile = (proj.camera_ids * (tiles_x * tiles_y) + y0 * tiles_x + x0)[order].to(torch.int32)
    span_x = (x1 - x0)[order].to(torch.int32)
    pair = torch.repeat_interleave(torch.arange(order.numel(), device=order.device), counts)
    local = torch.arange(pair.numel(), device=pair.device, dtype=torch.int32)
    local -= (torch.cumsum(counts, 0) - counts).to(torch.int32).index_select(0, pair)
    span = span_x.index_select(0, pair)
    tile_ids = first_tile.index_select(0, pair) + (local // span) * tiles_x + local % span
    # A bounding box's corner tiles often miss the ellipse: drop the tiles where the Gaussian stays
    # under 1/255 at every pixel (about a quarter of them in fitted scenes; nothing else changes).
    reaches = _reaches_tile(proj, order.index_select(0, pair), tile_ids % (tiles_x * tiles_y), tiles_x, tile_size)
    pair, tile_ids = pair[reaches], tile_ids[reaches]
    tile_ids, perm = torch.sort(tile_ids, stable=True)  # keeps depth order inside a tile
    entries = order.index_select(0, pair.index_select(0, perm))
    lengths = torch.bincount(tile_ids, minlength=n_cameras * tiles_x * tiles_y)
    return TilePlan(
        entries=entries,
        starts=torch.cumsum(lengths, 0) - lengths,
        lengths=lengths,
        n_cameras=n_cameras,
        width=width,
        height=height,
        tiles_x=tiles_x,
        tiles_y=tiles_y,
        tile_size=tile_size,
    )


def _reaches_tile(proj: Projection, pairs: Tensor, tiles: Tensor, tiles_x: int, tile_size: int) -> Tensor:
    """[K] bool: whether pair `pairs` [K] reaches alpha >= 1/255 anywhere in tile `tiles` [K] (within a camera).

    The exponent sigma = 0.5·(a x² + c y²) + b x y is convex in the offset (x, y) from the mean, so
    its minimum over the rectangle of the tile's pixel centres is 0 when the mean lies inside and
    otherwise on an edge, where it is a clamped 1-D minimum. A small margin keeps borderline pairs.
    """
    mx, my = proj.means2d[pairs, 0].detach(), proj.means2d[pairs, 1].detach()
    a, b, c = proj.conics[pairs].detach().unbind(-1)
    x0 = ((tiles % tiles_x) * tile_size).to(mx.dtype) + 0.5 - mx
    y0 = ((tiles // tiles_x) * tile_size).to(mx.dtype) + 0.5 - my
    x1, y1 = x0 + (tile_size - 1), y0 + (tile_size - 1)

    def sigma(x, y):
        return 0.5 * (a * x * x + c * y * y) + b * x * y

    edges = [sigma(x, torch.clamp(-b * x / c, y0, y1)) for x in (x0, x1)]
    edges += [sigma(torch.clamp(-b * y / a, x0, x1), y) for y in (y0, y1)]
    inside = (x0 <= 0) & (x1 >= 0) & (y0 <= 0) & (y1 >= 0)
    min_sigma = torch.where(inside, 0.0, torch.stack(edges).amin(dim=0))
    return torch.log(proj.opacities[pairs].detach()) - min_sigma >= math.log(ALPHA_THRESHOLD) - 1e-3


def _tiles_to_image(x: Tensor, plan: TilePlan, pool: int = 1) -> Tensor:
    """[C * ty * tx, (ts / pool)², D] -> [C, H / pool, W / pool, D] (pool: pixels per block side)."""
    ts = plan.tile_size // pool
    x = x.reshape(plan.n_cameras, plan.tiles_y, plan.tiles_x, ts, ts, -1).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(plan.n_cameras, plan.tiles_y * ts, plan.tiles_x * ts, -1)
    return x[:, : plan.height // pool, : plan.width // pool]


def _image_to_tiles(x: Tensor, plan: TilePlan, pool: int = 1) -> Tensor:
    """[C, H / pool, W / pool, D] -> [C * ty * tx, (ts / pool)², D], zero padded past the image border."""
    ts = plan.tile_size // pool
    pad_h, pad_w = plan.tiles_y * ts - x.shape[1], plan.tiles_x * ts - x.shape[2]
    x = torch.nn.functional.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    x = x.reshape(plan.n_cameras, plan.tiles_y, ts, plan.tiles_x, ts, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(plan.n_cameras * plan.tiles_y * plan.tiles_x, ts * ts, -1)


def _pool_pixels(weights: Tensor, tile_size: int, pool: int) -> Tensor:
    """[T, ts², B] blending weights -> [T, (ts / pool)², B], averaged over pool × pool pixel blocks.

    Compositing is linear in the channels, so the features averaged over a block are the block's
    mean weights times the features: the feature pass runs on pool² times fewer rows.
    """
    if pool == 1:
        return weights
    n, side = weights.shape[0], tile_size // pool
    blocks = weights.view(n, side, pool, side, pool, weights.shape[-1])
    # A sum of strided slices: several times faster on a CPU than mean() over the two inner axes.
    total = sum(blocks[:, :, i, :, j] for i in range(pool) for j in range(pool))
    return (total * (1.0 / pool**2)).reshape(n, side * side, weights.shape[-1])


def _pixel_basis(plan: TilePlan, like: Tensor) -> Tensor:
    """[P, 6] monomials (1, x, y, x², xy, y²) of the pixel centres relative to the tile centre.

    gsplat samples pixel (i, j) at (j + 0.5, i + 0.5); with these, a Gaussian's exponent over a
    tile is one [6] coefficient vector times this basis, so a block of tiles is one matmul.
    """
    ts = plan.tile_size
    idx = torch.arange(ts * ts, device=like.device)
    x = (idx % ts).to(like.dtype) + 0.5 - ts / 2
    y = (idx // ts).to(like.dtype) + 0.5 - ts / 2
    return torch.stack([torch.ones_like(x), x, y, x * x, x * y, y * y], dim=-1)


def _block(plan: TilePlan, tiles: Tensor, k0: int, size: int, packed: Tensor, basis: Tensor):
    """Evaluate list positions [k0, k0 + size) of `tiles` [T] at all their P pixels.

    `packed` [M, 7] holds per pair (mean x, mean y, conic a, b, c, log opacity, opacity).
    Returns entries [T, B]; (u, v, a, b, c, opacity) [T, B], with (u, v) the mean relative to
    the tile centre; alpha_raw = o·exp(-sigma) [T, P, B], unclamped, 0 past the end of a list.
    """
    k = torch.arange(k0, k0 + size, device=tiles.device)
    in_list = k[None, :] < plan.lengths[tiles, None]
    pos = (plan.starts[tiles, None] + k).clamp(max=max(plan.entries.numel() - 1, 0))
    entries = plan.entries[pos]  # [T, B]
    pairs = packed.index_select(0, entries.reshape(-1)).view(*entries.shape, 7)
    mx, my, a, b, c, log_opacity, opacity = pairs.unbind(-1)
    tile_in_cam = tiles % (plan.tiles_x * plan.tiles_y)
    half = plan.tile_size / 2
    u = mx - (((tile_in_cam % plan.tiles_x) * plan.tile_size).to(mx.dtype) + half)[:, None]
    v = my - (((tile_in_cam // plan.tiles_x) * plan.tile_size).to(mx.dtype) + half)[:, None]
    # log(o) - sigma as a polynomial in the pixel offset (x, y), with dx = u - x, dy = v - y.
    const = torch.where(in_list, log_opacity, -1e4) - (0.5 * a * u * u + 0.5 * c * v * v + b * u * v)
    coefs = torch.stack([const, a * u + b * v, c * v + b * u, -0.5 * a, -b, -0.5 * c], dim=1)  # [T, 6, B]
    # Exponents below LOG_ALPHA_FLOOR give alpha < 1/255 (skipped) either way; clamping them keeps exp()
    # off its slow path for float32 results that underflow (about 10x slower below -87 on a CPU).
    return entries, (u, v, a, b, c, opacity), torch.exp((basis @ coefs).clamp_(min=LOG_ALPHA_FLOOR))


def _blend_alpha(alpha_raw: Tensor) -> Tensor:
    """gsplat's per-contribution alpha: clamped to 0.999, zero (skipped) below 1/255."""
    # threshold() keeps x > t; the next float below 1/255 makes that x >= 1/255, in one fused op.
    threshold = torch.tensor(ALPHA_THRESHOLD, dtype=alpha_raw.dtype)
    keep_above = float(torch.nextafter(threshold, torch.zeros_like(threshold)))
    return torch.nn.functional.threshold(alpha_raw.clamp(max=ALPHA_MAX), keep_above, 0.0)


def _transmittance(alpha: Tensor, t_start: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """1 - alpha, and inclusive and exclusive transmittance [T, P, B] from t_start [T, P]."""
    one_minus = 1.0 - alpha
    t_incl = t_start[..., None] * torch.cumprod(one_minus, dim=-1)
    t_excl = torch.cat([t_start[..., None], t_incl[..., :-1]], dim=-1)
    return one_minus, t_incl, t_excl


def _steps(active: Tensor, n_pixels: int) -> tuple[int, tuple[Tensor, ...]]:
    """Block length for this step and the tile chunks that keep each evaluation under memory bounds.

    The block doubles from BLOCK while the step stays small: near the end only a few tiles with
    long lists are left, and fewer, longer steps cost less than many short ones.
    """
    size = BLOCK
    while size < MAX_BLOCK and active.numel() * size * 2 * n_pixels <= MIN_STEP_ELEMENTS:
        size *= 2
    return size, active.split(max(1, MAX_BLOCK_ELEMENTS // (size * n_pixels)))


def _pack(means2d: Tensor, conics: Tensor, opacities: Tensor) -> Tensor:
    """[M, 7] per-pair columns that `_block` gathers in one index_select."""
    return torch.cat([means2d, conics, torch.log(opacities)[:, None], opacities[:, None]], dim=1)


@dataclass
class _Block:
    """One step of the compositing loop: list positions [k0, k0 + B) of `tiles` [T] at their P pixels.

    entries [T, B] and geometry (u, v, a, b, c, opacity) [T, B] as `_block` returns them; alpha
    [T, P, B] the blended alpha (0 where skipped, at or past a pixel's stop, outside its list);
    t_excl [T, P, B] the transmittance in front of each Gaussian; unclamped [T, P, B] bool,
    alpha_raw <= ALPHA_MAX, or None when no Gaussian of the block is more opaque than ALPHA_MAX.
    """

    k0: int
    tiles: Tensor
    entries: Tensor
    geometry: tuple[Tensor, ...]
    alpha: Tensor
    t_excl: Tensor
    unclamped: Tensor | None


def _unclamped(alpha_raw: Tensor, opacity: Tensor) -> Tensor | None:
    """Where alpha_raw is not clamped at ALPHA_MAX (its gradient passes), None when that is everywhere."""
    return (alpha_raw <= ALPHA_MAX) if bool((opacity > ALPHA_MAX).any()) else None


def _consumed(blocks: list[_Block]):
    """The blocks front to back, each dropped from the list as it is handed out (freeing its memory once used)."""
    blocks.reverse()
    while blocks:
        yield blocks.pop()


def _recomputed_blocks(plan: TilePlan, stop: Tensor, packed: Tensor, basis: Tensor):
    """The forward pass's blocks again, front to back, from each pixel's stop position `stop` [tiles, P]."""
    n_pix = plan.tile_size**2
    trans = packed.new_ones(plan.lengths.numel(), n_pix)
    tile_stop = stop.max(dim=1).values
    k0 = 0
    while (active := (tile_stop > k0).nonzero().squeeze(1)).numel():
        size, chunks = _steps(active, n_pix)
        k = torch.arange(k0, k0 + size, device=stop.device)
        for tiles in chunks:
            entries, geometry, alpha_raw = _block(plan, tiles, k0, size, packed, basis)
            alpha = _blend_alpha(alpha_raw) * (k < stop[tiles][..., None])
            _, t_incl, t_excl = _transmittance(alpha, trans[tiles])
            trans[tiles] = t_incl[..., -1]
            yield _Block(k0, tiles, entries, geometry, alpha, t_excl, _unclamped(alpha_raw, geometry[5]))
        k0 += size


class _Composite(torch.autograd.Function):
    """Front-to-back alpha compositing over tile lists of colours (which move geometry) and features (which do not).

    Blocks are laid out [tiles, pixels, Gaussians] so that the running products and sums along
    the depth order run over the contiguous last dimension. The features use the same blending
    weights, averaged over `pool` × `pool` pixel blocks, and get gradients only for themselves.
    The forward pass keeps its blocks' alpha and transmittance for the backward pass while they
    hold at most MAX_SAVED_ELEMENTS values each; past that, the backward pass recomputes them.
    """

    @staticmethod
    def forward(ctx, means2d, conics, opacities, colors, features, plan: TilePlan, pool: int):
        n_tiles, n_pix = plan.lengths.numel(), plan.tile_size**2
        basis = _pixel_basis(plan, means2d)
        packed = _pack(means2d, conics, opacities)
        out = means2d.new_zeros(n_tiles, n_pix, colors.shape[1])
        out_features = None if features is None else means2d.new_zeros(n_tiles, n_pix // pool**2, features.shape[1])
        trans = means2d.new_ones(n_tiles, n_pix)
        # live: 1 while a pixel still blends; padding past the image border is never live.
        live = _image_to_tiles(means2d.new_ones(plan.n_cameras, plan.height, plan.width, 1), plan)[..., 0]
        stop = torch.where(live > 0, plan.lengths[:, None], 0)  # list position where each pixel stopped
        blocks, saved = ([] if any(ctx.needs_input_grad[:5]) else None), 0
        k0 = 0
        while (active := ((plan.lengths > k0) & (live > 0).any(dim=1)).nonzero().squeeze(1)).numel():
            size, chunks = _steps(active, n_pix)
            for tiles in chunks:
                entries, geometry, alpha_raw = _block(plan, tiles, k0, size, packed, basis)
                pixel_live = live[tiles]
                alpha = _blend_alpha(alpha_raw) * pixel_live[..., None]  # finished pixels blend nothing more
                _, t_incl, t_excl = _transmittance(alpha, trans[tiles])
                # A live pixel's T is above TRANSMITTANCE_MIN, a finished one's stays where it stopped.
                t_end = t_incl[..., -1]
                ended = t_end <= TRANSMITTANCE_MIN
                if bool(ended.any()):
                    # T only decreases along a list: the first position at or below the minimum and all
                    # behind it are not blended, and T stays at its value in front of that position.
                    ends = t_incl <= TRANSMITTANCE_MIN
                    first = ends.to(torch.uint8).argmax(dim=-1)
                    alpha = alpha * ~ends
                    t_end = torch.where(ended, t_excl.gather(-1, first[..., None])[..., 0], t_end)
                    stop[tiles] = torch.where(ended, k0 + first, stop[tiles])
                    live[tiles] = pixel_live * ~ended
                weights = alpha * t_excl
                flat = entries.reshape(-1)
                out.index_add_(0, tiles, torch.bmm(weights, colors.index_select(0, flat).view(*entries.shape, -1)))
                if features is not None:
                    block_features = features.index_select(0, flat).view(*entries.shape, -1)
                    out_features.index_add_(0, tiles, torch.bmm(_pool_pixels(weights, plan.tile_size, pool), block_features))
                trans[tiles] = t_end
                saved += alpha.numel()
                if blocks is not None and saved > MAX_SAVED_ELEMENTS:
                    blocks = None  # too many to keep: the backward pass recomputes them
                if blocks is not None:
                    unclamped = _unclamped(alpha_raw, geometry[5])
                    blocks.append(_Block(k0, tiles, entries, geometry, alpha, t_excl, unclamped))
            k0 += size
        ctx.plan, ctx.pool, ctx.blocks = plan, pool, blocks
        ctx.save_for_backward(means2d, conics, opacities, colors, features, out, trans, stop)
        image = _tiles_to_image(out, plan), _tiles_to_image(1.0 - trans[..., None], plan)
        return (*image, None if features is None else _tiles_to_image(out_features, plan, pool))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_alpha, grad_features):
        means2d, conics, opacities, colors, features, out, trans_final, stop = ctx.saved_tensors
        plan, pool, blocks = ctx.plan, ctx.pool, ctx.blocks
        ctx.blocks = None  # freed as the loop goes
        n_tiles, n_pix = plan.lengths.numel(), plan.tile_size**2
        basis = _pixel_basis(plan, means2d)
        basis_t = basis.T.contiguous()
        packed = _pack(means2d, conics, opacities)
        grad_out = _image_to_tiles(grad_out, plan)  # [tiles, P, D]
        if features is not None and grad_features is None:
            grad_features = features.new_zeros(plan.n_cameras, plan.height // pool, plan.width // pool, features.shape[1])
        grad_features = None if features is None else _image_to_tiles(grad_features, plan, pool)  # [tiles, P / pool², F]
        # d loss / d alpha_i = T_i (c_i · g) - (sum over j behind i of w_j (c_j · g) - g_A T_final) / (1 - alpha_i);
        # the sum behind i is the total over all blended Gaussians minus the running prefix up to i.
        total_minus_final = (out * grad_out).sum(-1) - _image_to_tiles(grad_alpha, plan)[..., 0] * trans_final
        v_means2d, v_conics = torch.zeros_like(means2d), torch.zeros_like(conics)
        v_opacities, v_colors = torch.zeros_like(opacities), torch.zeros_like(colors)
        v_features = None if features is None else torch.zeros_like(features)
        prefix = means2d.new_zeros(n_tiles, n_pix)
        for block in _recomputed_blocks(plan, stop, packed, basis) if blocks is None else _consumed(blocks):
            tiles, alpha, t_excl = block.tiles, block.alpha, block.t_excl
            u, v, a, b, c, opacity = block.geometry
            weights = alpha * t_excl  # [T, P, B]
            flat = block.entries.reshape(-1)
            block_colors = colors.index_select(0, flat).view(*block.entries.shape, -1)
            block_grad = grad_out[tiles]
            v_colors.index_add_(0, flat, torch.bmm(weights.transpose(1, 2), block_grad).flatten(0, 1))
            if features is not None:
                pooled = _pool_pixels(weights, plan.tile_size, pool)
                v_features.index_add_(0, flat, torch.bmm(pooled.transpose(1, 2), grad_features[tiles]).flatten(0, 1))

            color_dot_grad = torch.bmm(block_grad, block_colors.transpose(1, 2))  # [T, P, B]
            running = prefix[tiles, :, None] + torch.cumsum(weights * color_dot_grad, dim=-1)
            v_alpha = t_excl * color_dot_grad - (total_minus_final[tiles, :, None] - running) / (1.0 - alpha)
            # d alpha / d log(alpha_raw) = alpha_raw where alpha is blended and not clamped at 0.999.
            v_log_alpha = alpha * v_alpha
            if block.unclamped is not None:
                v_log_alpha = v_log_alpha * block.unclamped
            # Sums over pixels of v_log_alpha times (1, x, y, x², xy, y²), then the chain rule
            # through log(o) - sigma with dx = u - x, dy = v - y.
            r0, r1, r2, r3, r4, r5 = (basis_t @ v_log_alpha).unbind(1)  # [T, B] each
            s_dx, s_dy = u * r0 - r1, v * r0 - r2
            s_dxdx = u * u * r0 - 2 * u * r1 + r3
            s_dydy = v * v * r0 - 2 * v * r2 + r5
            s_dxdy = u * v * r0 - u * r2 - v * r1 + r4
            v_mean = -torch.stack([a * s_dx + b * s_dy, b * s_dx + c * s_dy], dim=-1)
            v_conic = -torch.stack([0.5 * s_dxdx, s_dxdy, 0.5 * s_dydy], dim=-1)
            v_means2d.index_add_(0, flat, v_mean.reshape(-1, 2))
            v_conics.index_add_(0, flat, v_conic.reshape(-1, 3))
            v_opacities.index_add_(0, flat, (r0 / opacity).reshape(-1))
            prefix[tiles] = running[..., -1]
        return v_means2d, v_conics, v_opacities, v_colors, v_features, None, None


def rasterize_torch(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    *,
    sh_degree: int | None,
    backgrounds: Tensor | None,
    near_plane: float,
    far_plane: float,
    eps2d: float,
    render_mode: str,
    features: Tensor | None,
    features_downscale: int = 1,
) -> tuple[Tensor, Tensor, dict]:
    """The torch backend of `fit3d_hf.splatting.rasterize` (inputs already validated there)."""
    n_cameras, n_gaussians = viewmats.shape[0], means.shape[0]
    proj = project(means, quats, scales, opacities, viewmats, Ks, width, height, near_plane, far_plane, eps2d)
    cam, gid = proj.camera_ids, proj.gaussian_ids

    # meta["means2d"] is gsplat's unpacked [C, N, 2]; the compositor reads from it so that its
    # .grad (retain_grad) holds the image-plane gradients that DefaultStrategy accumulates.
    means2d = proj.means2d.new_zeros(n_cameras, n_gaussians, 2).index_put((cam, gid), proj.means2d)
    radii = torch.zeros(n_cameras, n_gaussians, 2, dtype=torch.int32, device=means.device)
    radii[cam, gid] = proj.radii
    depths = proj.depths.new_zeros(n_cameras, n_gaussians).index_put((cam, gid), proj.depths.detach())

    if sh_degree is None:
        channels = colors[gid]
    else:
        campos = torch.linalg.inv(viewmats)[:, :3, 3]
        sh = spherical_harmonics(sh_degree, means[gid] - campos[cam], colors[gid])
        channels = torch.clamp_min(sh + 0.5, 0.0)
    if render_mode != "RGB":
        channels = torch.cat([channels, proj.depths[:, None]], dim=1)

    # Tiles hold whole features_downscale² blocks, so that the feature pass averages within a tile.
    plan = bin_to_tiles(proj, n_cameras, width, height, math.lcm(TILE_SIZE, features_downscale))
    renders, alphas, rendered_features = _Composite.apply(
        means2d[cam, gid], proj.conics, proj.opacities, channels, None if features is None else features[gid], plan,
        features_downscale,
    )  # fmt: skip
    if backgrounds is not None:
        if render_mode != "RGB":
            backgrounds = torch.cat([backgrounds, backgrounds.new_zeros(n_cameras, 1)], dim=1)
        renders = renders + (1.0 - alphas) * backgrounds[:, None, None, :]
    if render_mode == "RGB+ED":
        renders = torch.cat([renders[..., :-1], renders[..., -1:] / alphas.clamp(min=1e-10)], dim=-1)

    meta = {
        "camera_ids": None,
        "gaussian_ids": None,
        "radii": radii,
        "means2d": means2d,
        "depths": depths,
        "width": width,
        "height": height,
        "n_cameras": n_cameras,
        "tile_size": plan.tile_size,
        "backend": "torch",
    }
    if features is not None:
        meta["features"] = rendered_features
    return renders, alphas, meta
