"""Pictures of features and training: PCA → RGB, k-means clusters, loss curves (PNG, matplotlib Agg).

PCA and k-means are fitted jointly over all views of one feature source, so a colour means the
same thing in every view of that source (but not across sources: each has its own basis).
"""

import os
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
