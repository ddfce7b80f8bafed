import json
import math
from pathlib import Path

import datasets
import pytest
import torch

from fit3d_hf import backbones, hub
from fit3d_hf.hub import push_targets
from fit3d_hf.lift.gaussians import FORMAT, FeatureGaussians
from fit3d_hf.scenes import synthetic
from fit3d_hf.targets import (
    METADATA_FILE,
    PAPER_TARGETS,
    bytes_per_view,
    gaussian_blur,
    load_targets,
    render_targets,
    targets_metadata,
)

PATCH = 8
WIDTH = 32  # backbone width Cb of the tiny test backbone
FEATURE_DIM = 8


@pytest.fixture(scope="module")
def room():
    return synthetic.make_room(0, num_views=4, height=48, width=64, num_points=4000)


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return backbones.build_backbone(backbones.tiny_config("dinov2", patch_size=PATCH, hidden_size=WIDTH)).eval()


@pytest.fixture(scope="module")
def feature_vector():
    return torch.randn(FEATURE_DIM, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def decoder_center():
    return torch.randn(WIDTH, FEATURE_DIM, generator=torch.Generator().manual_seed(2))


def write_gaussians(folder, scene, feature_vector, decoder_center, out_dim=WIDTH):
    """Opaque Gaussians on the room's surface points, all carrying one feature vector; the decoder
    has only a centre tap, so a fully covered pixel decodes to `decoder_center @ feature_vector`."""
    points = scene.points
    n = points.shape[0]
    params = {
        "means": points,
        "quats": torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(n, 1),
        "scales": torch.full((n, 3), math.log(0.08)),
        "opacities": torch.full((n,), 4.0),
        "sh0": torch.zeros(n, 1, 3),
        "features": feature_vector.repeat(n, 1),
    }
    decoder = torch.zeros(out_dim, FEATURE_DIM, 3, 3)
    decoder[:, :, 1, 1] = decoder_center[:out_dim]
    FeatureGaussians(params, decoder, {"format": FORMAT, "scene_id": scene.scene_id}).save(
        folder / f"{scene.scene_id}.safetensors"
    )


@pytest.fixture(scope="module")
def lifted(tmp_path_factory, room, backbone, feature_vector, decoder_center):
    root = tmp_path_factory.mktemp("lifted")
    (root / "gaussians").mkdir()
    write_gaussians(root / "gaussians", room, feature_vector, decoder_center)
    dataset = render_targets([room], backbone, root / "targets", gaussians_dir=root / "gaussians", render_scale=0.5)
    return root, dataset


def test_lifted_targets_schema_values_and_metadata(lifted, room, feature_vector, decoder_center):
    root, dataset = lifted
    assert dataset.num_rows == len(room.train_views)
    assert sorted(dataset["view_id"]) == sorted(room.train_views)
    assert dataset.features["target"] == datasets.Array3D((WIDTH, 6, 8), "float16")
    row = dataset[0]
    assert row["target"].dtype == torch.float16 and row["target"].shape == (WIDTH, 6, 8)
    assert row["image"].shape == (3, 48, 64) and row["mask"].shape == (6, 8)
    # The room's points cover the views: most of the grid is valid, and valid cells hold the decoded feature.
    masks = torch.stack([dataset[i]["mask"] for i in range(dataset.num_rows)])
    assert masks.float().mean() > 0.5
    expected = decoder_center @ feature_vector
    for i in range(dataset.num_rows):
        valid = dataset[i]["mask"].bool()
        values = dataset[i]["target"].float().permute(1, 2, 0)[valid]
        assert torch.allclose(values.median(0).values, expected, atol=0.15 * expected.abs().max())
    # Cameras are stored for the stored image size.
    view = dataset[0]["view_id"]
    assert torch.allclose(torch.tensor(dataset[0]["world_to_camera"]), room.world_to_camera[view])
    assert torch.allclose(torch.tensor(dataset[0]["intrinsics"]), room.intrinsics[view], atol=1e-5)
    metadata = targets_metadata(dataset)
    assert metadata["backbone"]["hidden_size"] == WIDTH and metadata["backbone"]["patch_size"] == PATCH
    assert metadata["patch_grid"] == [6, 8] and metadata["feature_dim"] == {room.scene_id: FEATURE_DIM}
    assert metadata["render"]["render_scale"] == 0.5 and 0.5 < metadata["valid_fraction"][room.scene_id] <= 1
    assert json.loads((root / "targets" / METADATA_FILE).read_text()) == metadata
    # Nothing temporary is left beside the dataset.
    assert sorted(p.name for p in root.iterdir()) == ["gaussians", "targets"]


def test_decoder_width_must_match_backbone(tmp_path, room, backbone, feature_vector, decoder_center):
    (tmp_path / "g").mkdir()
    write_gaussians(tmp_path / "g", room, feature_vector, decoder_center, out_dim=16)
    with pytest.raises(ValueError, match="decoder width 16 does not match the backbone width 32"):
        render_targets([room], backbone, tmp_path / "t", gaussians_dir=tmp_path / "g")
    assert not (tmp_path / "t").exists()


def test_missing_gaussians_named(tmp_path, room, backbone):
    with pytest.raises(FileNotFoundError, match=f"{room.scene_id}.safetensors"):
        render_targets([room], backbone, tmp_path / "t", gaussians_dir=tmp_path)


def test_single_view_blur_control(tmp_path, room, backbone):
    dataset = render_targets([room], backbone, tmp_path / "blur", target_source="single_view_blur", blur_sigma=1.0)
    row = dataset[0]
    image = row["image"].float()[None] / 255
    features = backbones.extract_features(backbone, backbones.normalize(image, backbone.config)).feature_maps
    assert torch.allclose(row["target"].float(), gaussian_blur(features, 1.0)[0], atol=2e-2)
    assert not torch.allclose(row["target"].float(), features[0], atol=2e-2)  # it is blurred
    assert row["mask"].all()
    assert targets_metadata(dataset)["target_source"] == "single_view_blur"


def test_gaussian_blur_keeps_constants_and_mass():
    constant = torch.full((1, 3, 7, 9), 2.5)
    assert torch.allclose(gaussian_blur(constant, 1.5), constant)
    spike = torch.zeros(1, 1, 15, 15)
    spike[0, 0, 7, 7] = 1
    blurred = gaussian_blur(spike, 1.0)
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-5) and blurred[0, 0, 7, 7] < 0.2


def test_float16_kept_and_shards(tmp_path, room, backbone):
    dataset = render_targets([room], backbone, tmp_path / "d", target_source="single_view_blur", num_shards=2)
    assert len(list((tmp_path / "d").glob("data-*.arrow"))) == 2
    reopened = load_targets(tmp_path / "d")
    assert reopened[0]["target"].dtype == torch.float16
    assert torch.equal(reopened[1]["target"], dataset[1]["target"])
    # The trap load_targets avoids: plain torch formatting doubles the targets' size.
    assert datasets.load_from_disk(str(tmp_path / "d")).with_format("torch")[0]["target"].dtype == torch.float32


def test_existing_output_refused_and_interrupted_run_resumes(tmp_path, room, backbone, monkeypatch):
    rooms = [room, synthetic.make_room(1, num_views=3, height=48, width=64)]
    calls = []
    real = backbones.extract_features

    def fail_on_second_scene(model, pixel_values):
        calls.append(1)
        if len(calls) > len(room.train_views):
            raise KeyboardInterrupt
        return real(model, pixel_values)

    monkeypatch.setattr(backbones, "extract_features", fail_on_second_scene)
    with pytest.raises(KeyboardInterrupt):
        render_targets(rooms, backbone, tmp_path / "d", target_source="single_view_blur")
    assert not (tmp_path / "d").exists() and (tmp_path / "d.parts" / room.scene_id).exists()
    monkeypatch.setattr(backbones, "extract_features", real)
    calls.clear()
    dataset = render_targets(rooms, backbone, tmp_path / "d", target_source="single_view_blur")
    assert dataset.num_rows == len(room.train_views) + len(rooms[1].train_views)
    assert set(dataset["scene_id"]) == {"room_0000", "room_0001"}
    assert not (tmp_path / "d.parts").exists()
    with pytest.raises(FileExistsError, match="already exists"):
        render_targets(rooms, backbone, tmp_path / "d", target_source="single_view_blur")


def test_push_sends_parquet_card_and_metadata(tmp_path, lifted, monkeypatch):
    root, dataset = lifted
    sent = {}

    def fake_upload_folder(*, repo_id, folder_path, repo_type, **kwargs):
        files = sorted(p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file())
        sent.update(repo_id=repo_id, repo_type=repo_type, files=files, folder=folder_path)
        return "https://huggingface.co/datasets/me/targets/commit/0"

    monkeypatch.setattr(hub, "create_repo", lambda repo_id, **kwargs: sent.setdefault("created", (repo_id, kwargs["repo_type"])))
    monkeypatch.setattr(hub, "upload_folder", fake_upload_folder)
    push_targets(root / "targets", "me/targets")
    assert sent["created"] == ("me/targets", "dataset") and sent["repo_type"] == "dataset"
    assert sent["files"] == sorted(["README.md", METADATA_FILE, "data/train-00000-of-00001.parquet"])
    # What would be uploaded reads back with the same rows, float16 targets and metadata.
    pushed = load_targets(sent["folder"])
    assert pushed.num_rows == dataset.num_rows
    assert pushed.features["target"] == dataset.features["target"]
    assert torch.equal(pushed[0]["target"], dataset[0]["target"]) and pushed[0]["target"].dtype == torch.float16
    assert targets_metadata(pushed) == targets_metadata(dataset)


def test_bytes_per_view():
    # ViT-S at a 41x62 grid: ~1.9 MB per view (docs/finetuning.md).
    assert bytes_per_view(384, 41, 62) == pytest.approx(1.95e6, rel=0.01)


def test_render_command(tmp_path, lifted, room, backbone, capsys):
    from fit3d_hf.commands import render

    root, _ = lifted
    backbone.save_pretrained(tmp_path / "backbone")
    dataset = render.main(
        [
            "--output_dir",
            str(tmp_path / "targets"),
            "--backbone",
            str(tmp_path / "backbone"),
            "--gaussians_dir",
            str(root / "gaussians"),
            "--synthetic_rooms",
            "1",
            "--synthetic_views",
            "4",
            "--synthetic_height",
            "48",
            "--synthetic_width",
            "64",
            "--image_height",
            "64",
            "--image_width",
            "80",
        ]
    )
    assert dataset.features["target"].shape == (WIDTH, 8, 10) and dataset.num_rows == len(room.train_views)
    assert load_targets(tmp_path / "targets")[0]["image"].shape == (3, 64, 80)
    assert targets_metadata(dataset)["backbone"]["name_or_path"] == str(tmp_path / "backbone")
    assert "wrote 3 views" in capsys.readouterr().out
    with pytest.raises(ValueError, match="give both --image_height and --image_width"):
        render.main(["--output_dir", str(tmp_path / "x"), "--synthetic_rooms", "1", "--image_height", "64"])


def test_scene_mask_marks_targets_invalid(tmp_path, room, backbone, feature_vector, decoder_center):
    import dataclasses

    masked = torch.ones(room.num_views, room.height, room.width)
    masked[:, :, : room.width // 2] = 0  # left half unusable
    masked_room = dataclasses.replace(room, mask_data=masked)
    (tmp_path / "g").mkdir()
    write_gaussians(tmp_path / "g", room, feature_vector, decoder_center)
    dataset = render_targets([masked_room], backbone, tmp_path / "t", gaussians_dir=tmp_path / "g", render_scale=0.5)
    for i in range(dataset.num_rows):
        mask = dataset[i]["mask"]
        assert not mask[:, :4].any() and mask[:, 4:].float().mean() > 0.5


def test_transparent_lift_warns_and_is_refused_for_training(tmp_path, room, backbone, feature_vector, decoder_center, caplog):
    from fit3d_hf.finetune import check_dataset

    (tmp_path / "g").mkdir()
    write_gaussians(tmp_path / "g", room, feature_vector, decoder_center)
    gaussians = FeatureGaussians.load(tmp_path / "g" / f"{room.scene_id}.safetensors")
    gaussians.params["opacities"] = torch.full_like(gaussians.params["opacities"], -8.0)  # alpha ~ 0
    gaussians.save(tmp_path / "g" / f"{room.scene_id}.safetensors")
    with caplog.at_level("WARNING"):
        dataset = render_targets([room], backbone, tmp_path / "t", gaussians_dir=tmp_path / "g", render_scale=0.5)
    assert "only 0.0% of the target cells are valid" in caplog.text
    assert targets_metadata(dataset)["valid_fraction"] == {room.scene_id: 0.0}
    with pytest.raises(ValueError, match="no target cell of the dataset is valid"):
        check_dataset(dataset, backbone.config)


def test_paper_targets_store_the_soft_mask_of_every_view(tmp_path, room, backbone, feature_vector, decoder_center):
    """`PAPER_TARGETS`: every view, the scene mask bilinearly resized to the grid (float16), coverage not used."""
    import dataclasses

    import torch.nn.functional as F

    scene_mask = torch.ones(room.num_views, room.height, room.width)
    scene_mask[:, :, :20] = 0  # a boundary between the two pixels a grid cell samples: a weight of 0.5
    masked_room = dataclasses.replace(room, mask_data=scene_mask)
    (tmp_path / "g").mkdir()
    write_gaussians(tmp_path / "g", room, feature_vector, decoder_center)
    # Gaussians that record no normalisation were lifted with the family's: the paper's ImageNet one is refused.
    with pytest.raises(ValueError, match="lifted with 'family' input normalisation, not 'imagenet'"):
        render_targets([masked_room], backbone, tmp_path / "t", gaussians_dir=tmp_path / "g", **PAPER_TARGETS)
    path = tmp_path / "g" / f"{room.scene_id}.safetensors"
    gaussians = FeatureGaussians.load(path)
    gaussians.params["opacities"][: len(gaussians.params["opacities"]) // 2] = -8.0  # half of them transparent
    FeatureGaussians(gaussians.params, gaussians.decoder_weight, {**gaussians.metadata, "normalization": "imagenet"}).save(path)
    dataset = render_targets([masked_room], backbone, tmp_path / "t", gaussians_dir=tmp_path / "g", **PAPER_TARGETS)
    assert dataset.num_rows == room.num_views and sorted(dataset["view_id"]) == list(range(room.num_views))
    assert dataset.features["mask"] == datasets.Array2D((6, 8), "float16")
    expected = F.interpolate(scene_mask[:1, None], size=(6, 8), mode="bilinear", align_corners=False)[0, 0]
    for i in range(dataset.num_rows):
        torch.testing.assert_close(dataset[i]["mask"].float(), expected, atol=1e-3, rtol=0)
    assert ((expected > 0) & (expected < 1)).any() and (expected == 1).any()
    metadata = targets_metadata(dataset)
    assert metadata["normalization"] == "imagenet" and metadata["render"]["mask_kind"] == "soft"
    assert metadata["bytes_per_view_uncompressed"] == bytes_per_view(WIDTH, 6, 8, mask="soft") == bytes_per_view(WIDTH, 6, 8) + 48


def test_blur_control_normalises_as_asked(tmp_path, room):
    torch.manual_seed(0)
    clip = backbones.build_backbone(backbones.tiny_config("clip", patch_size=PATCH, hidden_size=WIDTH)).eval()
    family = render_targets([room], clip, tmp_path / "family", target_source="single_view_blur")
    imagenet = render_targets([room], clip, tmp_path / "imagenet", target_source="single_view_blur", normalization="imagenet")
    assert targets_metadata(family)["normalization"] == "family" and targets_metadata(imagenet)["normalization"] == "imagenet"
    assert (family[0]["target"].float() - imagenet[0]["target"].float()).abs().max() > 1e-2
    assert backbones.normalization_of(clip.config) == "family"


def test_render_command_paper_protocol(tmp_path, room, backbone, feature_vector, decoder_center):
    from fit3d_hf.commands import render

    (tmp_path / "g").mkdir()
    write_gaussians(tmp_path / "g", room, feature_vector, decoder_center)
    path = tmp_path / "g" / f"{room.scene_id}.safetensors"
    gaussians = FeatureGaussians.load(path)
    FeatureGaussians(gaussians.params, gaussians.decoder_weight, {**gaussians.metadata, "normalization": "imagenet"}).save(path)
    backbone.save_pretrained(tmp_path / "backbone")
    common = ["--backbone", str(tmp_path / "backbone"), "--gaussians_dir", str(tmp_path / "g"), "--synthetic_rooms", "1"]
    common += ["--synthetic_views", "4", "--synthetic_height", "48", "--synthetic_width", "64"]
    dataset = render.main(["--protocol", "paper", "--output_dir", str(tmp_path / "t"), *common])
    assert dataset.num_rows == room.num_views and dataset.features["mask"].dtype == "float16"
    assert targets_metadata(dataset)["render"]["views"] == "all"
