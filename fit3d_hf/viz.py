"""Pictures of features and training: PCA → RGB, k-means clusters, similarity heat maps, cross-view
matches, loss curves. The demo's PNG figures and the app's pictures (`fit3d_hf.app`) are drawn here.

PCA, k-means and the heat-map colour scale are fitted jointly over all views of one feature source,
so a colour means the same thing in every view of that source (but not across sources: each has its
own basis).
"""

import os
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from .io import atomic_write  # noqa: E402

# Distinct colours for cluster ids (matplotlib's tab10, then tab20's light shades).
_CLUSTER_COLORS = torch.tensor(plt.get_cmap("tab10").colors + plt.get_cmap("tab20").colors[1::2])


def pca_rgb(feature_maps: torch.Tensor, num_components: int = 3) -> torch.Tensor:
    """Project features onto their first principal components, scaled to [0, 1] for display.

    Args:
        feature_maps: `[V, C, h, w]`; the PCA basis is fitted over all `V*h*w` feature vectors.

    Returns:
        `[V, num_components, h, w]` in [0, 1]; each component is mapped through its own 1st–99th
        percentile range, as is usual for DINO feature pictures.
    """
    views, channels, height, width = feature_maps.shape
    x = feature_maps.permute(0, 2, 3, 1).reshape(-1, channels).float()
    x = x - x.mean(0, keepdim=True)
    # Right singular vectors of the centred data are the principal axes.
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    projected = x @ vh[:num_components].T
    low = projected.quantile(0.01, dim=0)
    high = projected.quantile(0.99, dim=0)
    projected = ((projected - low) / (high - low).clamp_min(1e-8)).clamp(0, 1)
    return projected.reshape(views, height, width, num_components).permute(0, 3, 1, 2)


def kmeans(x: torch.Tensor, k: int, iterations: int = 30, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding, on cosine-normalised vectors.

    Args:
        x: `[N, D]`.

    Returns:
        labels `[N]` (long, in [0, k)) and centres `[k, D]` (unit norm).
    """
    if k < 1 or k > x.shape[0]:
        raise ValueError(f"k-means needs 1 <= k <= N, got k={k} for N={x.shape[0]} vectors")
    generator = torch.Generator().manual_seed(seed)
    x = F.normalize(x.float(), dim=1)
    centres = x[torch.randint(x.shape[0], (1,), generator=generator)]
    for _ in range(1, k):
        distance = (1 - x @ centres.T).clamp_min(0).min(dim=1).values
        weights = distance**2
        choice = (
            torch.multinomial(weights / weights.sum(), 1, generator=generator)
            if weights.sum() > 0
            else torch.randint(x.shape[0], (1,), generator=generator)
        )
        centres = torch.cat([centres, x[choice]])
    for _ in range(iterations):
        labels = (x @ centres.T).argmax(dim=1)
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k)
        # An emptied cluster keeps its old centre rather than collapsing to zero.
        updated = torch.where(counts[:, None] > 0, F.normalize(sums, dim=1), centres)
        if torch.equal(updated, centres):
            break
        centres = updated
    return (x @ centres.T).argmax(dim=1), centres


def cluster_rgb(feature_maps: torch.Tensor, k: int = 6, seed: int = 0) -> torch.Tensor:
    """k-means cluster ids of all feature vectors as colours: `[V, C, h, w]` → `[V, 3, h, w]` in [0, 1]."""
    views, channels, height, width = feature_maps.shape
    labels, _ = kmeans(feature_maps.permute(0, 2, 3, 1).reshape(-1, channels), k, seed=seed)
    colors = _CLUSTER_COLORS[labels % len(_CLUSTER_COLORS)].float()
    return colors.reshape(views, height, width, 3).permute(0, 3, 1, 2)


def cosine_similarity_map(feature_maps: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every feature vector to one query vector: `[V, C, h, w]`, `[C]` → `[V, h, w]` in [-1, 1]."""
    return torch.einsum("vchw,c->vhw", F.normalize(feature_maps.float(), dim=1), F.normalize(query.float(), dim=0))


def heat_rgb(values: torch.Tensor, colormap: str = "inferno", low_quantile: float = 0.0) -> torch.Tensor:
    """Colour values with a matplotlib colormap: `[V, h, w]` → `[V, 3, h, w]` in [0, 1].

    The colour range runs from the `low_quantile` quantile to the maximum of all views together, so
    the same colour means the same value in every view; values below it get the lowest colour.
    """
    values = values.float()
    low, high = values.quantile(low_quantile), values.max()
    scaled = ((values - low) / (high - low).clamp_min(1e-8)).clamp(0, 1)
    rgba = plt.get_cmap(colormap)(scaled.numpy())
    return torch.from_numpy(rgba[..., :3]).float().permute(0, 3, 1, 2)


@dataclass
class Match:
    """A feature-grid cell of one view: its row and column, its centre in pixels, and its similarity."""

    view: int
    row: int
    col: int
    x: float
    y: float
    similarity: float


def cell_at(x: float, y: float, image_size: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
    """The (row, col) of the feature-grid cell `grid = (h, w)` that holds pixel (x, y) of an image `(H, W)`."""
    (height, width), (rows, cols) = image_size, grid
    return min(rows - 1, max(0, int(y * rows / height))), min(cols - 1, max(0, int(x * cols / width)))


def best_matches(similarity: torch.Tensor, image_size: tuple[int, int]) -> list[Match]:
    """The most similar cell of each view: `[V, h, w]` similarities of images `(H, W)` → one `Match` per view."""
    views, rows, cols = similarity.shape
    height, width = image_size
    matches = []
    for view in range(views):
        index = int(similarity[view].flatten().argmax())
        row, col = divmod(index, cols)
        x, y = (col + 0.5) * width / cols, (row + 0.5) * height / rows
        matches.append(Match(view, row, col, x, y, float(similarity[view, row, col])))
    return matches


def mark_point(picture: torch.Tensor, x: float, y: float, radius: int | None = None) -> torch.Tensor:
    """A copy of `picture` `[3, H, W]` with a white cross, outlined in black, centred on pixel (x, y)."""
    height, width = picture.shape[-2:]
    radius = radius or max(3, min(height, width) // 25)
    marked = picture.clone()
    cx, cy = min(width - 1, max(0, int(x))), min(height - 1, max(0, int(y)))
    # The black outline first (3 px thick), then the white arms (1 px) on top: visible on any colour.
    for thickness, colour in ((1, 0.0), (0, 1.0)):
        rows = slice(max(0, cy - thickness), cy + thickness + 1)
        cols = slice(max(0, cx - thickness), cx + thickness + 1)
        marked[:, rows, max(0, cx - radius - thickness) : cx + radius + thickness + 1] = colour
        marked[:, max(0, cy - radius - thickness) : cy + radius + thickness + 1, cols] = colour
    return marked


def grid_picture(tiles: list[list[torch.Tensor]], gap: int = 4) -> torch.Tensor:
    """Lay out rows of equally sized tiles `[3, H, W]` on a white background, `gap` pixels apart.

    Returns:
        `[3, R*H + (R-1)*gap, C*W + (C-1)*gap]` for R rows of C tiles.
    """
    rows, cols = len(tiles), len(tiles[0])
    height, width = tiles[0][0].shape[-2:]
    picture = torch.ones(3, rows * height + (rows - 1) * gap, cols * width + (cols - 1) * gap)
    for r, row in enumerate(tiles):
        if len(row) != cols:
            raise ValueError(f"grid row {r} has {len(row)} tiles, row 0 has {cols}")
        for c, tile in enumerate(row):
            if tile.shape != (3, height, width):
                raise ValueError(f"tile ({r}, {c}) has shape {tuple(tile.shape)}, tile (0, 0) {(3, height, width)}")
            top, left = r * (height + gap), c * (width + gap)
            picture[:, top : top + height, left : left + width] = tile
    return picture


def feature_panel(
    images: torch.Tensor, feature_maps: torch.Tensor, point: tuple[float, float], *, k: int = 6, scale: int = 1, gap: int = 4
) -> tuple[torch.Tensor, list[Match]]:
    """One feature source's picture: PCA, k-means and the similarity to a point, one column per view.

    Rows: PCA → RGB; k-means clusters; the cosine similarity of every cell to the cell under `point`
    in view 0, as a heat map over the image from the median (dark) to the maximum similarity (bright)
    over all views (view 0 marks the point, the other views their best match, which is where the
    point's feature matches in another view of the scene).

    Args:
        images: `[V, 3, H, W]` in [0, 1]; H and W multiples of the feature grid.
        feature_maps: `[V, C, h, w]` of these images.
        point: (x, y) in pixels of view 0.
        k: k-means clusters.
        scale: integer enlargement of every tile (nearest: one patch stays one flat block).

    Returns:
        the picture `[3, 3*H*scale + 2*gap, V*W*scale + (V-1)*gap]` in [0, 1], and the best match of
        each view (view 0: the point's own cell).
    """
    views, _, grid_h, grid_w = feature_maps.shape
    if images.shape[0] != views:
        raise ValueError(f"{images.shape[0]} images but feature maps of {views} views")
    height, width = images.shape[-2:]
    size = (height * scale, width * scale)
    row, col = cell_at(*point, (height, width), (grid_h, grid_w))
    similarity = cosine_similarity_map(feature_maps, feature_maps[0, :, row, col])
    matches = best_matches(similarity, (height, width))
    cx, cy = (col + 0.5) * width / grid_w, (row + 0.5) * height / grid_h
    matches[0] = Match(0, row, col, cx, cy, float(similarity[0, row, col]))

    def enlarge(pictures: torch.Tensor) -> torch.Tensor:
        return F.interpolate(pictures, size=size, mode="nearest")

    shown = enlarge(images)
    # The heat map over a grey copy of the image, so that the scene stays recognisable under it.
    # Colours span the median to the maximum similarity: most cells of a scene are fairly similar
    # to any point, and a full range would leave little contrast where the point matches.
    grey = shown.mean(dim=1, keepdim=True).expand_as(shown)
    heat = 0.7 * enlarge(heat_rgb(similarity, low_quantile=0.5)) + 0.3 * grey
    heat = torch.stack([mark_point(heat[m.view], m.x * scale, m.y * scale) for m in matches])
    rows = [enlarge(pca_rgb(feature_maps)), enlarge(cluster_rgb(feature_maps, k)), heat]
    return grid_picture([[pictures[v] for v in range(views)] for pictures in rows], gap=gap), matches


def _save(fig: plt.Figure, path: str | os.PathLike) -> Path:
    """Save a figure as PNG atomically (temp name, then rename) and close it."""
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    finally:
        plt.close(fig)


def feature_figure(
    images: torch.Tensor, sources: dict[str, torch.Tensor], path: str | os.PathLike, *, k: int = 6, title: str = ""
) -> Path:
    """One row per view: the image, then for each feature source its PCA picture and its k-means clusters.

    Args:
        images: `[V, 3, H, W]` in [0, 1].
        sources: name → feature maps `[V, C_s, h, w]` (widths may differ between sources).
        path: PNG file to write.
        k: clusters per source.

    Returns:
        the written path.
    """
    views = images.shape[0]
    for name, maps in sources.items():
        if maps.shape[0] != views:
            raise ValueError(f"feature source {name!r} has {maps.shape[0]} views, the images {views}")
    columns = [("image", images)]
    for name, maps in sources.items():
        columns.append((f"{name}: PCA", pca_rgb(maps)))
        columns.append((f"{name}: k-means (k={k})", cluster_rgb(maps, k)))
    fig, axes = plt.subplots(views, len(columns), figsize=(2.2 * len(columns), 1.8 * views), squeeze=False)
    for col, (label, pictures) in enumerate(columns):
        for row in range(views):
            ax = axes[row, col]
            ax.imshow(pictures[row].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def loss_curves_figure(
    curves: dict[str, list],
    path: str | os.PathLike,
    *,
    title: str,
    xlabel: str = "step",
    ylabel: str = "loss",
    smooth: int = 1,
    log_y: bool = False,
) -> Path:
    """Plot loss curves (one line per name) into a PNG.

    Args:
        curves: name → per-step values `[v0, v1, ...]` (x = 0, 1, ...) or logged `[(step, value), ...]`
            pairs; curves may have different lengths.
        smooth: width of a trailing moving average (1 = raw values).
        log_y: logarithmic y axis.
    """
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for name, values in curves.items():
        if not values:
            continue
        points = torch.tensor(values, dtype=torch.float64)
        x, y = (points[:, 0], points[:, 1]) if points.ndim == 2 else (torch.arange(len(points)), points)
        if smooth > 1 and len(y) >= smooth:
            y = torch.cat([y[: smooth - 1], y.unfold(0, smooth, 1).mean(1)])
        ax.plot(x.numpy(), y.numpy(), label=name, linewidth=1.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize=7)
    return _save(fig, path)
