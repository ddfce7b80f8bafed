import pytest
import torch

from fit3d_hf.viz import cluster_rgb, feature_figure, kmeans, loss_curves_figure, pca_rgb

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_kmeans_recovers_separated_clusters():
    generator = torch.Generator().manual_seed(0)
    directions = torch.eye(8)[:4] * 5
    truth = torch.arange(4).repeat_interleave(50)
    points = directions[truth] + 0.3 * torch.randn(200, 8, generator=generator)
    labels, centres = kmeans(points, 4, seed=1)
    assert centres.shape == (4, 8)
    # Every true cluster maps onto exactly one found cluster and vice versa.
    pairs = {(int(t), int(p)) for t, p in zip(truth, labels)}
    assert len(pairs) == 4 and len({p for _, p in pairs}) == 4


def test_kmeans_rejects_bad_k():
    with pytest.raises(ValueError, match="k=5"):
        kmeans(torch.randn(4, 3), 5)


def test_pca_rgb_follows_the_main_direction():
    # Features vary mostly along one direction whose coefficient is a left→right ramp.
    ramp = torch.linspace(-1, 1, 16).expand(2, 1, 8, 16)
    axis = torch.randn(32, 1, 1)
    maps = ramp * axis + 0.01 * torch.randn(2, 32, 8, 16, generator=torch.Generator().manual_seed(0))
    rgb = pca_rgb(maps)
    assert rgb.shape == (2, 3, 8, 16) and rgb.min() >= 0 and rgb.max() <= 1
    first = rgb[:, 0].mean(dim=(0, 1))  # per column
    # Monotonic along the ramp (the sign of a principal axis is arbitrary).
    steps = first[1:] - first[:-1]
    assert (steps >= -1e-6).all() or (steps <= 1e-6).all()
    assert (first.max() - first.min()) > 0.9


def test_cluster_rgb_colours_are_consistent_across_views():
    maps = torch.zeros(2, 4, 4, 4)
    maps[:, 0, :, :2] = 1
    maps[:, 1, :, 2:] = 1
    rgb = cluster_rgb(maps, k=2)
    assert torch.equal(rgb[0], rgb[1])
    assert not torch.equal(rgb[0, :, 0, 0], rgb[0, :, 0, 3])


def test_figures_are_written_atomically(tmp_path):
    images = torch.rand(2, 3, 32, 48)
    sources = {"original": torch.randn(2, 16, 4, 6), "FiT3D": torch.randn(2, 32, 4, 6)}
    path = feature_figure(images, sources, tmp_path / "features.png", k=3, title="test")
    assert path.read_bytes()[:8] == PNG_MAGIC
    curves = loss_curves_figure(
        {"lifted": [1.0, 0.5, 0.4], "control": [(5, 1.0), (10, 0.8)]}, tmp_path / "loss.png", title="t", smooth=2
    )
    assert curves.read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.png", "loss.png"]


def test_feature_figure_names_a_source_with_the_wrong_view_count(tmp_path):
    with pytest.raises(ValueError, match="'FiT3D' has 3 views"):
        feature_figure(torch.rand(2, 3, 8, 8), {"FiT3D": torch.randn(3, 4, 2, 2)}, tmp_path / "x.png")
    assert not list(tmp_path.iterdir())
