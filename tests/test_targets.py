import json
import math
import tempfile
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from huggingface_hub import DatasetCard

from fit3d_hf import backbones, hub
from fit3d_hf.hub import push_targets
from fit3d_hf.lift.gaussians import FORMAT, FeatureGaussians
from fit3d_hf.scenes import synthetic
from fit3d_hf.targets import (
    METADATA_FILE,
    PAPER_TARGETS,
    PREVIEW_MIN_LONG_SIDE,
    bytes_per_view,
    collate_training_rows,
    gaussian_blur,
    load_targets,
    render_targets,
    target_preview,
    targets_metadata,
    training_stream,
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
    assert metadata["num_views"] == dataset.num_rows and metadata["scene_sources"] == {"synthetic": 1}
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


def test_export_shards_card_metadata_and_reads_back(tmp_path, lifted):
    root, dataset = lifted
    size = datasets.load_from_disk(str(root / "targets")).data.nbytes
    folder = hub.export_for_hub(root / "targets", tmp_path / "hub", max_shard_size=size // 3 + 1)
    shards = sorted(p.name for p in (folder / "data").iterdir())
    assert shards == [f"train-0000{i}-of-00003.parquet" for i in range(3)]  # as push_to_hub counts them
    assert sorted(p.name for p in folder.iterdir()) == sorted(["README.md", METADATA_FILE, "data"])
    # What would be uploaded reads back with the same rows, float16 targets and metadata.
    pushed = load_targets(folder)
    assert pushed.num_rows == dataset.num_rows and pushed.features["target"] == dataset.features["target"]
    assert torch.equal(pushed[0]["target"], dataset[0]["target"]) and pushed[0]["target"].dtype == torch.float16
    assert targets_metadata(pushed) == targets_metadata(dataset)
    # The card, read by huggingface_hub: licence (the backbone's: these are random-init tiny dinov2 features,
    # whose family is apache-2.0), task category, size, and the data files the Hub viewer reads.
    card = DatasetCard.load(folder / "README.md")
    assert card.data.license == "apache-2.0" and card.data.task_categories == ["image-feature-extraction"]
    assert card.data.size_categories == ["n<1K"] and "extra_gated_prompt" not in card.data.to_dict()
    assert card.data.configs == [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}]
    assert "ScanNet++" not in card.text and f"{dataset.num_rows} views of 1 scene(s)" in card.text
    # How the targets were made, as the metadata records it: mask kind, normalisation, provenance.
    metadata = targets_metadata(dataset)
    assert f"Mask `{metadata['render']['mask_kind']}` (uint8)" in card.text
    assert f"`{metadata['normalization']}`" in card.text
    assert metadata["provenance"]["backbone"]["weights_sha256"][:16] in card.text
    with pytest.raises(FileExistsError):
        hub.export_for_hub(root / "targets", folder)


def test_push_targets_uploads_card_metadata_then_shards(tmp_path, lifted, monkeypatch):
    root, dataset = lifted
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create", repo_id, kwargs["repo_type"], kwargs["private"]))

        def update_repo_settings(self, repo_id, **kwargs):
            calls.append(("gated", repo_id, kwargs["gated"]))

        def create_commit(self, repo_id, operations, **kwargs):
            calls.append(("commit", repo_id, {op.path_in_repo: op.path_or_fileobj for op in operations}))

    def fake_push(self, repo_id, **kwargs):
        calls.append(("push", repo_id, self.num_rows, kwargs["num_shards"], kwargs["split"], list(self.features)))
        return type("Info", (), {"commit_url": "https://huggingface.co/datasets/me/targets/commit/1"})()

    monkeypatch.setattr(hub, "HfApi", FakeApi)
    monkeypatch.setattr(datasets.Dataset, "push_to_hub", fake_push)
    temporary = set(Path(tempfile.gettempdir()).iterdir())
    url = push_targets(root / "targets", "me/targets", private=True, token="t", num_shards=2)
    assert url.endswith("/commit/1")
    kinds = [call[0] for call in calls]
    assert kinds == ["token", "create", "commit", "push"]  # not gated: procedural rooms
    files = calls[2][2]
    assert json.loads(files[METADATA_FILE]) == targets_metadata(dataset)  # load_targets(<repo id>) reads it
    assert DatasetCard(files["README.md"].decode()).data.license == "apache-2.0"
    assert calls[3][1:5] == ("me/targets", dataset.num_rows, 2, "train") and "preview" in calls[3][5]
    assert set(Path(tempfile.gettempdir()).iterdir()) <= temporary  # nothing left behind


def test_scannetpp_scenes_get_terms_gating_and_a_gated_repo(tmp_path, room, backbone, monkeypatch):
    import dataclasses

    scannetpp_room = dataclasses.replace(room, source=f"/data/scannetpp/{room.scene_id}/transforms_train.json")
    dataset = render_targets([scannetpp_room], backbone, tmp_path / "t", target_source="single_view_blur")
    assert targets_metadata(dataset)["scene_sources"] == {"scannetpp": 1}
    assert "/data/scannetpp" not in json.dumps(targets_metadata(dataset))  # kinds are recorded, not paths
    card = hub.targets_card(datasets.load_from_disk(str(tmp_path / "t")))
    assert card.data.license == "other" and card.data.to_dict()["license_name"] == "scannetpp-terms-of-use"
    assert "ScanNet++ Terms of Use" in card.data.to_dict()["extra_gated_prompt"]
    assert "Keep this repository private or gated" in card.text
    gated = []
    monkeypatch.setattr(
        hub,
        "HfApi",
        lambda token=None: type(
            "Api",
            (),
            {
                "create_repo": lambda self, *a, **k: None,
                "update_repo_settings": lambda self, repo_id, **k: gated.append(k["gated"]),
                "create_commit": lambda self, *a, **k: None,
            },
        )(),
    )
    monkeypatch.setattr(datasets.Dataset, "push_to_hub", lambda self, repo_id, **kwargs: "url")
    push_targets(tmp_path / "t", "me/scannetpp-targets", private=True)
    assert gated == ["manual"]


def test_hub_id_reads_back_with_metadata_and_streams_float16(tmp_path, lifted, hub_cache):
    root, dataset = lifted
    folder = hub.export_for_hub(root / "targets", tmp_path / "hub")
    hub_cache(
        "me/targets",
        {"train": [str(p) for p in (folder / "data").glob("*.parquet")]},
        {METADATA_FILE: (folder / METADATA_FILE).read_text()},
    )
    loaded = load_targets("me/targets")
    assert loaded.num_rows == dataset.num_rows and targets_metadata(loaded) == targets_metadata(dataset)
    assert loaded[0]["target"].dtype == torch.float16
    stream = load_targets("me/targets", streaming=True)
    assert isinstance(stream, datasets.IterableDataset) and targets_metadata(stream) == targets_metadata(dataset)
    rows = list(training_stream(stream))
    batch = collate_training_rows(rows[:2])
    assert batch["targets"].dtype == torch.float16 and batch["targets"].shape == (2, WIDTH, 6, 8)
    assert batch["images"].shape == (2, 3, 48, 64) and batch["masks"].shape == (2, 6, 8)
    by_view = {int(dataset[i]["view_id"]): dataset[i]["target"] for i in range(dataset.num_rows)}
    first = next(iter(stream))
    assert torch.equal(batch["targets"][0], by_view[first["view_id"]])  # no float32 round trip


def test_target_preview_colours_follow_the_features():
    target = torch.zeros(4, 2, 3)
    target[0, :, :2] = 1.0  # two kinds of cells
    valid = torch.ones(2, 3, dtype=torch.bool)
    valid[1, 2] = False
    pixels = np.asarray(target_preview(target, valid))
    scale = -(-PREVIEW_MIN_LONG_SIDE // 3)
    assert pixels.shape == (2 * scale, 3 * scale, 3)
    cell = lambda r, c: pixels[r * scale, c * scale]  # noqa: E731
    assert (cell(0, 0) == cell(1, 1)).all() and not (cell(0, 0) == cell(0, 2)).all()
    assert not cell(1, 2).any()  # invalid: black
    assert not np.asarray(target_preview(target, torch.zeros(2, 3, dtype=torch.bool))).any()


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
    # The preview (what the Hub viewer shows): the grid enlarged to >= 128 px, black where the mask is 0.
    preview = torch.from_numpy(np.array(datasets.load_from_disk(str(tmp_path / "t"))[0]["preview"]))
    scale = -(-PREVIEW_MIN_LONG_SIDE // 8)
    assert preview.shape == (6 * scale, 8 * scale, 3)
    assert not preview[:, : 4 * scale].any() and preview[:, 4 * scale :].float().std() > 10


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
