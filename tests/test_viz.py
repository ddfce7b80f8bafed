import pytest
import torch

from fit3d_hf.viz import (
    best_matches,
    cell_at,
    cluster_rgb,
    cosine_similarity_map,
    feature_figure,
    feature_panel,
    grid_picture,
    heat_rgb,
    kmeans,
    loss_curves_figure,
    mark_point,
    pca_rgb,
)

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


def test_similarity_map_and_best_match_find_the_query_cell():
    maps = torch.randn(2, 16, 5, 7, generator=torch.Generator().manual_seed(0))
    similarity = cosine_similarity_map(maps, maps[1, :, 3, 4] * 5)  # the scale of the query does not matter
    assert similarity.shape == (2, 5, 7) and similarity.max() <= 1 + 1e-5
    match = best_matches(similarity, (40, 56))[1]
    assert (match.view, match.row, match.col) == (1, 3, 4)
    assert (match.x, match.y) == (4.5 * 8, 3.5 * 8)  # the cell's centre in pixels
    assert match.similarity == pytest.approx(1.0, abs=1e-5)


def test_cell_at_maps_pixels_to_grid_cells_and_clamps():
    assert cell_at(0, 0, (120, 160), (15, 20)) == (0, 0)
    assert cell_at(159.9, 119.9, (120, 160), (15, 20)) == (14, 19)
    assert cell_at(500, -3, (120, 160), (15, 20)) == (0, 19)
    assert cell_at(12, 20, (120, 160), (15, 20)) == (2, 1)


def test_heat_rgb_shares_one_scale_over_views():
    values = torch.stack([torch.full((2, 2), 0.2), torch.full((2, 2), 0.9)])
    rgb = heat_rgb(values)
    assert rgb.shape == (2, 3, 2, 2) and rgb.min() >= 0 and rgb.max() <= 1
    # The low view gets the colormap's low end, the high view its high end: not both stretched to full range.
    assert rgb[0].sum() < rgb[1].sum()
    assert torch.equal(rgb[0, :, 0, 0], rgb[0, :, 1, 1])
    # From the median up: the lower half of the values all get the lowest colour, the top the highest.
    ramp = heat_rgb(torch.arange(8.0).view(2, 2, 2), low_quantile=0.5)
    lowest, highest = heat_rgb(torch.tensor([[[0.0, 1.0]]]))[0, :, 0].T
    assert all(torch.allclose(ramp[v, :, r, c], lowest) for v, r, c in ((0, 0, 0), (0, 0, 1), (0, 1, 0)))
    assert torch.allclose(ramp[1, :, 1, 1], highest) and not torch.allclose(ramp[1, :, 0, 0], lowest)


def test_mark_point_draws_a_visible_cross_and_leaves_the_input():
    picture = torch.full((3, 40, 60), 0.5)
    marked = mark_point(picture, 30, 20, radius=5)
    assert torch.equal(picture, torch.full((3, 40, 60), 0.5))
    assert marked[:, 20, 30].tolist() == [1.0, 1.0, 1.0]  # white centre
    assert marked[:, 19, 27].tolist() == [0.0, 0.0, 0.0]  # black outline beside an arm
    assert marked[:, 0, 0].tolist() == [0.5, 0.5, 0.5]  # far away: untouched
    assert torch.equal(mark_point(picture, -10, 100)[:, 39, 0], torch.ones(3))  # clamped into the picture


def test_grid_picture_lays_tiles_out_with_gaps_and_checks_shapes():
    tiles = [[torch.zeros(3, 4, 5), torch.zeros(3, 4, 5)], [torch.zeros(3, 4, 5), torch.zeros(3, 4, 5)]]
    picture = grid_picture(tiles, gap=2)
    assert picture.shape == (3, 10, 12)
    assert picture[:, 4:6].eq(1).all() and picture[:, :, 5:7].eq(1).all()  # white gaps
    assert picture[:, :4, :5].eq(0).all() and picture[:, 6:, 7:].eq(0).all()
    with pytest.raises(ValueError, match=r"tile \(1, 0\)"):
        grid_picture([[torch.zeros(3, 4, 5)], [torch.zeros(3, 4, 6)]])
    with pytest.raises(ValueError, match="row 1 has 1 tiles"):
        grid_picture([tiles[0], tiles[1][:1]])


def test_feature_panel_matches_a_point_across_shifted_views():
    # View 2 shows view 1 shifted right by two cells: the point's feature must be found two cells right.
    generator = torch.Generator().manual_seed(0)
    view = torch.randn(8, 6, 10, generator=generator)
    shifted = torch.roll(view, shifts=2, dims=2)
    maps = torch.stack([view, shifted])
    images = torch.rand(2, 3, 48, 80, generator=generator)
    panel, matches = feature_panel(images, maps, (3.5 * 8, 2.5 * 8), k=3, scale=2, gap=4)
    assert panel.shape == (3, 3 * 96 + 2 * 4, 2 * 160 + 4)
    assert panel.min() >= 0 and panel.max() <= 1
    assert (matches[0].row, matches[0].col) == (2, 3) and matches[0].similarity == pytest.approx(1.0, abs=1e-5)
    assert (matches[1].view, matches[1].row, matches[1].col) == (1, 2, 5)
    assert (matches[1].x, matches[1].y) == (5.5 * 8, 2.5 * 8)
    with pytest.raises(ValueError, match="3 images but feature maps of 2 views"):
        feature_panel(torch.rand(3, 3, 48, 80), maps, (0, 0))
