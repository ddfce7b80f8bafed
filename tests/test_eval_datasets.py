"""The paper datasets' official probe pipelines: every value pinned, the transforms checked, and the
paper protocol run end to end on tiny fixtures written in each dataset's layout."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from fit3d_hf import FiT3DModel, backbones
from fit3d_hf.evaluation.benchmark import AugmentedSamples, BenchmarkConfig, run_benchmark
from fit3d_hf.evaluation.data import PAPER_DATASETS, load_eval_dataset
from fit3d_hf.evaluation.pipelines import (
    PAPER_PIPELINES,
    DepthPipeline,
    SegmentationPipeline,
    _hsv_to_rgb,
    _rgb_to_hsv,
    center_pad,
    pad_batch,
    photometric_distortion,
    rescale_size,
)


def test_official_values_per_dataset():
    # evaluation/configs/vits_*_sem_linear_config.py: num_classes, reduce_zero_label
    classes = {
        name: PAPER_DATASETS[name]["segmentation"]["num_labels"]
        for name in PAPER_DATASETS
        if "segmentation" in PAPER_DATASETS[name]
    }
    assert classes == {"scannetpp": 100, "scannet": 40, "nyuv2": 13, "ade20k": 150, "voc2012": 21}
    assert not PAPER_DATASETS["voc2012"]["segmentation"]["reduce_zero_label"]
    depth = {name: PAPER_DATASETS[name]["depth"] for name in PAPER_DATASETS if "depth" in PAPER_DATASETS[name]}
    assert {n: (d["max_depth"], d["depth_scale"], d.get("eval_crop")) for n, d in depth.items()} == {
        "scannetpp": (20.0, 1000.0, None),
        "scannet": (10.0, 1000.0, "eigen"),
        "nyuv2": (10.0, 1000.0, "eigen"),
        "kitti": (80.0, 256.0, "garg"),
    }
    seg = SegmentationPipeline()
    assert all(PAPER_PIPELINES[name]["segmentation"] == seg for name in classes)
    assert (seg.scale, seg.ratio_range, seg.crop_size, seg.cat_max_ratio) == ((2048, 512), (0.5, 2.0), (512, 512), 0.75)
    assert (seg.flip_probability, seg.photometric, seg.stride, seg.ignore_index) == (0.5, True, (341, 341), 255)
    nyu, kitti = PAPER_PIPELINES["nyuv2"]["depth"], PAPER_PIPELINES["kitti"]["depth"]
    assert (nyu.crop_size, nyu.nyu_crop, nyu.kb_crop, nyu.brightness_range) == ((416, 544), True, None, (0.75, 1.25))
    for name in ("scannet", "scannetpp"):
        assert PAPER_PIPELINES[name]["depth"] == replace(nyu, nyu_crop=False)
    assert (kitti.crop_size, kitti.nyu_crop, kitti.kb_crop, kitti.brightness_range) == (
        (352, 704),
        False,
        (352, 1216),
        (0.9, 1.1),
    )
    for pipeline in (nyu, kitti):
        assert (pipeline.rotate_probability, pipeline.rotate_degrees, pipeline.flip_probability) == (0.5, 2.5, 0.5)
        assert (pipeline.color_probability, pipeline.gamma_range, pipeline.color_range, pipeline.test_flip) == (
            0.5,
            (0.9, 1.1),
            (0.9, 1.1),
            True,
        )


def test_resize_rule_and_sliding_windows():
    assert rescale_size(480, 640, (2048, 512)) == (512, 683)  # short side 512, aspect kept
    assert rescale_size(100, 1000, (2048, 512)) == (205, 2048)  # the long side bounds it
    seg = SegmentationPipeline()
    assert seg.windows(512, 683) == [(0, 512, 0, 512), (0, 512, 171, 683)]
    boxes = seg.windows(700, 1200)
    assert len(boxes) == 2 * 4 and all((y2 - y1, x2 - x1) == (512, 512) for y1, y2, x1, x2 in boxes)
    covered = torch.zeros(700, 1200, dtype=torch.bool)
    for y1, y2, x1, x2 in boxes:
        covered[y1:y2, x1:x2] = True
    assert covered.all()
    assert seg.windows(300, 400) == [(0, 300, 0, 400)]  # smaller than a window: the whole image
    # the official CenterPadding: 512 -> 518 for patch 14, 3 pixels on each side
    padded = center_pad(torch.ones(1, 3, 512, 511), 14)
    assert padded.shape[-2:] == (518, 518) and padded[0, 0, 3:515, 3:514].all() and padded[0, 0, :3].sum() == 0


def test_segmentation_sample_keeps_labels_aligned():
    labels = torch.arange(40)[None].repeat(30, 1) % 7  # columns encode the label
    image = (labels.float() / 255)[None].repeat(3, 1, 1)
    # no resize (ratio 1 into 40x30): crops and flips must move image and labels alike
    pipeline = replace(SegmentationPipeline(), scale=(40, 30), ratio_range=(1.0, 1.0), crop_size=(24, 32), photometric=False)
    for seed in range(6):
        out_image, out_labels = pipeline.train_sample(image, labels, torch.Generator().manual_seed(seed))
        assert out_image.shape[-2:] == out_labels.shape == (24, 32)
        assert torch.equal((out_image[0] * 255).round().long(), out_labels)
    same = [pipeline.train_sample(image, labels, torch.Generator().manual_seed(3))[1] for _ in range(2)]
    assert torch.equal(*same)  # a seed fixes the augmentation


def test_photometric_distortion_and_hsv():
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 16, 16)).float()
    # OpenCV's 8-bit HSV: H in 2-degree steps [0, 180), S and V in [0, 255]
    colors = torch.tensor([[255.0, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128]]).T[:, :, None]  # [3, 4, 1]
    assert _rgb_to_hsv(colors)[:, :, 0].T.tolist() == [[0, 255, 255], [60, 255, 255], [120, 255, 255], [0, 0, 128]]
    shifted = _rgb_to_hsv(colors)
    shifted[0] = (shifted[0] + 60) % 180  # +120 degrees: red -> green
    assert _hsv_to_rgb(shifted)[:, 0, 0].tolist() == [0, 255, 0]
    assert (_hsv_to_rgb(_rgb_to_hsv(image)) - image).abs().max() <= 5  # the 8-bit round trip's quantisation
    for seed in range(5):
        out = photometric_distortion(image, torch.Generator().manual_seed(seed))
        assert out.shape == image.shape and out.min() >= 0 and out.max() <= 255 and torch.equal(out, out.round())


def test_depth_samples_nyu_and_kb_crops():
    h, w = 480, 640
    depth = torch.arange(w, dtype=torch.float32)[None].repeat(h, 1) / 100 + 0.5  # metres encode the column
    image = (depth / depth.max())[None].repeat(3, 1, 1)
    nyu = replace(PAPER_PIPELINES["nyuv2"]["depth"], rotate_probability=0.0, color_probability=0.0)
    out_image, out_depth = nyu.train_sample(image, depth, torch.Generator().manual_seed(0))
    assert out_image.shape[-2:] == out_depth.shape == (416, 544)
    assert (
        43 <= round(float(out_depth.min()) * 100 - 50) and round(float(out_depth.max()) * 100 - 50) < 608
    )  # inside the NYU crop
    rotated = replace(nyu, rotate_probability=1.0)
    _, rotated_depth = rotated.train_sample(image, depth, torch.Generator().manual_seed(1))
    assert rotated_depth.shape == (416, 544) and (rotated_depth >= 0).all()
    kitti = PAPER_PIPELINES["kitti"]["depth"]
    big = torch.rand(3, 375, 1242)
    big_depth = torch.arange(375, dtype=torch.float32)[:, None].repeat(1, 1242)
    test_image, test_depth = kitti.test_sample(big, big_depth)
    assert test_image.shape[-2:] == test_depth.shape == (352, 1216)
    assert test_depth[0, 0] == 375 - 352 and torch.equal(test_image, big[:, 23:, 13:1229])  # bottom rows, centred columns
    assert PAPER_PIPELINES["nyuv2"]["depth"].test_sample(image, depth)[1] is depth  # native size
    with pytest.raises(ValueError, match="KB crop"):
        kitti.test_sample(torch.rand(3, 100, 200), torch.rand(100, 200))
    bright = replace(nyu, color_probability=1.0, rotate_probability=0.0, flip_probability=0.0)
    colored, _ = bright.train_sample(image, depth, torch.Generator().manual_seed(2))
    assert colored.min() >= 0 and colored.max() <= 1


def test_pad_batch_and_augmented_sample_order():
    images, valid, targets = pad_batch([(torch.ones(3, 2, 3), torch.zeros(2, 3, dtype=torch.long))], (4, 4), 255)
    assert images.shape == (1, 3, 4, 4) and valid[0, 0, :2, :3].all() and not valid[0, 0, 2:].any()
    assert (targets[0, 2:] == 255).all() and (targets[0, :2, :3] == 0).all()

    class Data:
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return {"image": torch.full((3, 4, 4), i / 10), "depth_m": torch.full((4, 4), float(i + 1))}

    pipeline = replace(DepthPipeline(crop_size=(4, 4)), rotate_probability=0, flip_probability=0, color_probability=0)
    streams = [
        [
            int(s[1][0, 0]) - 1
            for s in AugmentedSamples(Data(), pipeline, batch_size=1, iterations=5, seed=0, process_index=p, num_processes=2)
        ]
        for p in (0, 1)
    ]
    # two processes draw the global stream in turn: the first epoch is every image once
    assert sorted([streams[p][i] for i in range(3) for p in (0, 1)][:5]) == [0, 1, 2, 3, 4]
    again = AugmentedSamples(Data(), pipeline, batch_size=1, iterations=5, seed=0, process_index=0, num_processes=2)
    assert [int(again[i][1][0, 0]) - 1 for i in (4, 0)] == [streams[0][4], streams[0][0]]  # order-independent


# --- the paper protocol end to end, on tiny fixtures in each dataset's layout ---

SMALL_SEG = SegmentationPipeline(scale=(64, 32), crop_size=(32, 32), stride=(21, 21))


def _rgb(path, h, w, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def _labels(path, h, w, seed, high):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, high, (h, w), dtype=np.uint8)).save(path)


def _depth(path, h, w, seed, scale, max_m):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.default_rng(seed).uniform(0.5, max_m, (h, w)) * scale).astype(np.uint16)).save(path)


def _mmseg_layout(root, suffix, high):
    for split, n in (("training", 3), ("validation", 2)):
        for i in range(n):
            _rgb(root / "images" / split / f"{split}_{i}{suffix}", 24, 32, seed=i)
            _labels(root / "annotations" / split / f"{split}_{i}.png", 24, 32, seed=10 + i, high=high)


def _voc_layout(root):
    stems = {"train": ["2007_000001", "2007_000002", "2007_000003"], "val": ["2007_000004", "2007_000005"]}
    (root / "SegmentationClass").mkdir(parents=True)
    for names in stems.values():
        for i, stem in enumerate(names):
            _rgb(root / "JPEGImages" / f"{stem}.jpg", 24, 32, seed=i)
            labels = np.random.default_rng(i).integers(0, 21, (24, 32), dtype=np.uint8)
            labels[:, :2] = 255  # VOC's boundary label
            Image.fromarray(labels).save(root / "SegmentationClass" / f"{stem}.png")
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    for split, names in stems.items():
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")


def _split_file_layout(root, files, scale, max_m, h, w, image_dir="", depth_dir=""):
    for split_file, n in zip(files, (3, 2)):
        lines = []
        for i in range(n):
            rgb, depth = f"scene_{split_file[:-4]}/rgb_{i}.png", f"scene_{split_file[:-4]}/depth_{i}.png"
            _rgb(root / image_dir / rgb, h, w, seed=i)
            _depth(root / depth_dir / depth, h, w, seed=20 + i, scale=scale, max_m=max_m)
            lines.append(f"/{rgb} /{depth} 518.8")
        (root / split_file).write_text("\n".join(lines) + "\n")


LAYOUTS = {
    "scannetpp": lambda root: _mmseg_layout(root, ".JPG", 101),
    "scannet": lambda root: _mmseg_layout(root, ".jpg", 41),
    "nyuv2": lambda root: _mmseg_layout(root, ".png", 14),
    "ade20k": lambda root: _mmseg_layout(root, ".jpg", 151),
    "voc2012": _voc_layout,
}
DEPTH_LAYOUTS = {
    "scannetpp": dict(files=("scannetpp_train.txt", "scannetpp_val.txt"), scale=1000, max_m=19),
    "scannet": dict(files=("scannet_train.txt", "scannet_val.txt"), scale=1000, max_m=9),
    "nyuv2": dict(files=("nyu_train.txt", "nyu_test.txt"), scale=1000, max_m=9),
    "kitti": dict(
        files=("kitti_eigen_train.txt", "kitti_eigen_test.txt"), scale=256, max_m=79, image_dir="input", depth_dir="gt_depth"
    ),
}


@pytest.fixture(scope="module")
def tiny_fit3d():
    torch.manual_seed(0)
    return FiT3DModel.from_backbone(backbones.build_backbone(backbones.tiny_config("dinov2", patch_size=8)))


PAPER_TINY = BenchmarkConfig(
    protocol="paper",
    seeds=[0],
    seg_iterations=2,
    seg_batch_size=2,
    seg_warmup_iterations=1,
    depth_iterations=2,
    depth_batch_size=4,
    depth_warmup_iterations=1,
    dataloader_num_workers=0,
    progress=False,
)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_paper_protocol_segmentation_in_each_layout(tmp_path, name, tiny_fit3d):
    LAYOUTS[name](tmp_path)
    train, test = (load_eval_dataset(name, tmp_path, split, "segmentation") for split in ("train", "test"))
    assert train.pipelines == {"segmentation": SegmentationPipeline()}  # the official one, before shrinking it
    for data in (train, test):
        data.pipelines = {"segmentation": SMALL_SEG}
    results = run_benchmark({"original": tiny_fit3d.original, "fit3d": tiny_fit3d}, train, test, PAPER_TINY)
    assert results["protocol"]["protocol"] == "paper" and results["protocol"]["pipelines"]["segmentation"]["crop_size"] == (
        32,
        32,
    )
    rows = {(r["source"], r["metric"]): r for r in results["results"]}
    assert {s for s, _ in rows} == {"original", "fit3d"} and all(0 <= r["mean"] <= 1 for r in rows.values())
    assert results["sources"]["fit3d"]["input_size"] is None


@pytest.mark.parametrize("name", sorted(DEPTH_LAYOUTS))
def test_paper_protocol_depth_in_each_layout(tmp_path, name, tiny_fit3d):
    layout = dict(DEPTH_LAYOUTS[name])
    _split_file_layout(tmp_path, h=40, w=56, **layout)
    train, test = (load_eval_dataset(name, tmp_path, split, "depth") for split in ("train", "test"))
    official = PAPER_PIPELINES[name]["depth"]
    small = replace(official, crop_size=(24, 32), nyu_crop=False, kb_crop=(32, 48) if official.kb_crop else None)
    for data in (train, test):
        data.pipelines = {"depth": small}
    results = run_benchmark({"original": tiny_fit3d.original, "fit3d": tiny_fit3d}, train, test, PAPER_TINY)
    rows = {(r["source"], r["metric"]): r for r in results["results"]}
    assert rows[("fit3d", "rmse")]["mean"] > 0 and 0 <= rows[("original", "delta1")]["mean"] <= 1
    assert results["protocol"]["depth_probe"]["loss"] == "sigloss" and results["protocol"]["depth_probe"]["loss_group_size"] == 2


def test_paper_protocol_needs_official_pipelines(tmp_path, tiny_fit3d):
    from fit3d_hf.evaluation import from_scenes
    from fit3d_hf.scenes import synthetic

    rooms = from_scenes(synthetic.make_rooms(1, seed=3, num_views=2, height=24, width=32))
    with pytest.raises(ValueError, match="official pipeline"):
        run_benchmark({"original": tiny_fit3d.original}, rooms, rooms, PAPER_TINY)
    # "auto" falls back to the fixed protocol for data without official pipelines.
    auto = run_benchmark(
        {"original": tiny_fit3d.original}, rooms, rooms, replace(PAPER_TINY, protocol="auto", tasks=["segmentation"])
    )
    assert auto["protocol"]["protocol"] == "fixed"


def _nyu_command(tmp_path, depth_size):
    """Run `fit3d evaluate --protocol paper --dataset nyuv2` on fixtures with both tasks under one root."""
    from fit3d_hf.commands import evaluate

    root = tmp_path / "nyu"
    _mmseg_layout(root, ".png", 14)
    _split_file_layout(root, ("nyu_train.txt", "nyu_test.txt"), 1000, 9, *depth_size)
    torch.manual_seed(0)
    FiT3DModel.from_backbone(backbones.build_backbone(backbones.tiny_config("dinov2", patch_size=16))).save_pretrained(
        tmp_path / "model"
    )
    argv = ["--model", str(tmp_path / "model"), "--output_dir", str(tmp_path / "eval"), "--dataset", "nyuv2"]
    argv += ["--data_root", str(root), "--protocol", "paper", "--seeds", "0", "--seg_iterations", "1", "--depth_iterations", "1"]
    argv += [
        "--seg_batch_size",
        "2",
        "--depth_batch_size",
        "2",
        "--dataloader_num_workers",
        "0",
        "--no_controls",
        "--progress",
        "false",
    ]
    results = evaluate.main(argv)
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved["protocol"]["protocol"] == "paper" and set(saved["protocol"]["pipelines"]) == {"segmentation", "depth"}
    assert {(r["source"], r["task"]) for r in saved["results"]} == {
        (s, t) for s in ("original", "fit3d") for t in ("segmentation", "depth")
    }
    assert "protocol paper" in (tmp_path / "eval" / "results.md").read_text()
    with pytest.raises(ValueError, match="protocol 'paper'"):  # synthetic rooms have no official pipeline
        evaluate.main(["--model", str(tmp_path / "model"), "--output_dir", str(tmp_path / "e2"), "--protocol", "paper"])
    return results


def test_evaluate_command_paper_protocol(tmp_path, monkeypatch):
    # small windows and crops in place of NYUv2's official pipelines, for speed
    monkeypatch.setitem(PAPER_PIPELINES["nyuv2"], "segmentation", SMALL_SEG)
    monkeypatch.setitem(
        PAPER_PIPELINES["nyuv2"], "depth", replace(PAPER_PIPELINES["nyuv2"]["depth"], crop_size=(24, 32), nyu_crop=False)
    )
    results = _nyu_command(tmp_path, (40, 56))
    assert tuple(results["protocol"]["pipelines"]["segmentation"]["crop_size"]) == (32, 32)


@pytest.mark.slow
def test_evaluate_command_paper_protocol_at_official_sizes(tmp_path):
    """The official 512 crops and windows, NYU crop then 416x544 crops, flip-averaged 480x640 test."""
    results = _nyu_command(tmp_path, (480, 640))
    pipelines = results["protocol"]["pipelines"]
    assert tuple(pipelines["segmentation"]["crop_size"]) == (512, 512) and pipelines["depth"]["nyu_crop"]
