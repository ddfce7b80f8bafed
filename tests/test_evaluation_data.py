import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from fit3d_hf.evaluation.data import PAPER_DATASETS, from_hf_dataset, from_scenes, load_eval_dataset
from fit3d_hf.scenes import synthetic


def _rgb(path, h=8, w=12, value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _mmseg(root, split_dir="training", suffix=".jpg"):
    labels = np.array([[0, 1, 2, 3] * 3] * 8, np.uint8)
    for stem in ("b", "a"):
        _rgb(root / "images" / split_dir / f"{stem}{suffix}")
        _png(root / "annotations" / split_dir / f"{stem}.png", labels)


def _depth_split(root, split_file, scale, rows, h=8, w=12, image_dir="", depth_dir=""):
    lines = []
    for i, depth_m in enumerate(rows):
        _rgb(root / image_dir / "scene" / f"rgb_{i}.jpg", h, w)
        if depth_m is None:
            lines.append(f"/scene/rgb_{i}.jpg None 518.8")
            continue
        _png(root / depth_dir / "scene" / f"depth_{i}.png", np.full((h, w), depth_m * scale, np.uint16))
        lines.append(f"/scene/rgb_{i}.jpg /scene/depth_{i}.png 518.8")
    (root / split_file).write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("name", ["ade20k", "scannetpp", "scannet", "nyuv2"])
def test_mmseg_layouts_reduce_zero_label(tmp_path, name):
    _mmseg(tmp_path, "validation", ".png" if name == "nyuv2" else ".jpg")
    data = load_eval_dataset(name, tmp_path, "test", "segmentation")
    assert len(data) == 2 and data.tasks == ["segmentation"]
    assert data.num_labels == PAPER_DATASETS[name]["segmentation"]["num_labels"]
    item = data[0]
    assert item["name"] == "a" and item["image"].shape == (3, 8, 12)
    assert item["image"].max() == pytest.approx(100 / 255, abs=1e-6)
    # 0 (void) -> 255, k -> k - 1
    assert item["semantics"][0, :4].tolist() == [255, 0, 1, 2]


def test_voc2012_layout(tmp_path):
    root = tmp_path / "VOC2012"
    border = np.array([[0, 5, 255, 20] * 3] * 8, np.uint8)
    for stem in ("2007_000001", "2007_000002"):
        _rgb(root / "JPEGImages" / f"{stem}.jpg")
        _png(root / "SegmentationClass" / f"{stem}.png", border)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000002\n")
    data = load_eval_dataset("voc2012", root, "test", "segmentation")
    assert len(data) == 1 and data.num_labels == 21
    assert data[0]["semantics"][0, :4].tolist() == [0, 5, 255, 20]  # no label shift for VOC
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000009\n")
    with pytest.raises(FileNotFoundError, match="2007_000009"):
        load_eval_dataset("voc2012", root, "train", "segmentation")


def test_nyu_depth_split_file_and_eigen_crop(tmp_path):
    _depth_split(tmp_path, "nyu_test.txt", 1000, [2.5, 12.0], h=480, w=640)
    data = load_eval_dataset("nyuv2", tmp_path, "test", "depth")
    assert data.max_depth == 10.0 and data.tasks == ["depth"]
    item = data[0]
    assert item["depth_m"].shape == (480, 640) and item["depth_m"][0, 0].item() == pytest.approx(2.5)
    mask = data.eval_mask(item["depth_m"])
    assert mask.sum() == (471 - 45) * (601 - 41) and mask[45, 41] and not mask[44, 41]
    assert not data.eval_mask(data[1]["depth_m"]).any()  # 12 m is beyond NYU's 10 m


def test_kitti_eigen_split_skips_missing_depth_and_scales_by_256(tmp_path):
    # KITTI's split-file paths are relative to input/ (RGB) and gt_depth/ (depth)
    _depth_split(tmp_path, "kitti_eigen_test.txt", 256, [30.0, None, 90.0], h=40, w=100, image_dir="input", depth_dir="gt_depth")
    data = load_eval_dataset("kitti", tmp_path, "test", "depth")
    assert len(data) == 2 and data.max_depth == 80.0 and data.eval_crop == "garg"
    assert data[0]["depth_m"][0, 0].item() == pytest.approx(30.0)
    mask = data.eval_mask(data[0]["depth_m"])
    assert not mask[0].any() and mask[int(0.40810811 * 40), int(0.03594771 * 100)]


def test_scannetpp_depth_and_errors(tmp_path):
    _depth_split(tmp_path, "scannetpp_train.txt", 1000, [15.0])
    data = load_eval_dataset("scannetpp", tmp_path, "train", "depth")
    assert data.max_depth == 20.0 and data.eval_mask(data[0]["depth_m"]).all()
    (tmp_path / "scene" / "depth_0.png").unlink()
    with pytest.raises(FileNotFoundError, match="depth_0.png"):
        load_eval_dataset("scannetpp", tmp_path, "train", "depth")
    with pytest.raises(ValueError, match="no depth benchmark"):
        load_eval_dataset("ade20k", tmp_path, "train", "depth")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_eval_dataset("coco", tmp_path, "train", "depth")


def test_hf_dataset_column_mapping():
    import datasets

    rows = {
        "img": [Image.fromarray(np.full((6, 8, 3), 10, np.uint8)) for _ in range(3)],
        "seg": [np.full((6, 8), k, np.uint8).tolist() for k in range(3)],
        "d": [np.full((6, 8), 1500, np.uint16).tolist() for _ in range(3)],
    }
    ds = datasets.Dataset.from_dict(rows)
    data = from_hf_dataset(
        ds,
        name="mine",
        image_column="img",
        semantics_column="seg",
        depth_column="d",
        num_labels=3,
        max_depth=10.0,
        depth_scale=1000.0,
    )
    assert data.tasks == ["segmentation", "depth"]
    item = data[2]
    assert item["semantics"].unique().tolist() == [2] and item["depth_m"][0, 0].item() == pytest.approx(1.5)
    with pytest.raises(ValueError, match="columns"):
        from_hf_dataset(ds, name="mine", image_column="rgb", semantics_column="seg", num_labels=3)


def test_from_scenes_uses_view_splits():
    room = synthetic.make_room(7, num_views=8, height=24, width=32)
    test = from_scenes([room], views="test")
    assert len(test) == len(room.test_views) and test.num_labels == len(synthetic.CLASS_NAMES)
    assert test.max_depth >= float(room.depth_m.max())
    item = test[0]
    assert torch.equal(item["semantics"], room.semantics[room.test_views[0]])
    assert len(from_scenes([room])) == 8


def test_run_benchmark_on_images_of_different_sizes(tmp_path):
    from fit3d_hf import backbones
    from fit3d_hf.evaluation.benchmark import BenchmarkConfig, run_benchmark

    for split, sizes in (("training", [(16, 24), (20, 20), (24, 16)]), ("validation", [(18, 30), (16, 16)])):
        for i, (h, w) in enumerate(sizes):
            _rgb(tmp_path / "images" / split / f"{i}.jpg", h, w, value=40 * i)
            _png(tmp_path / "annotations" / split / f"{i}.png", np.full((h, w), i % 3 + 1, np.uint8))
    train = load_eval_dataset("ade20k", tmp_path, "train", "segmentation")
    test = load_eval_dataset("ade20k", tmp_path, "test", "segmentation")
    torch.manual_seed(0)
    model = backbones.build_backbone(backbones.tiny_config("dinov2", patch_size=8))
    config = BenchmarkConfig(
        protocol="fixed",
        image_height=16,
        image_width=16,
        seeds=[0],
        seg_iterations=3,
        seg_batch_size=2,
        seg_warmup_iterations=0,
        progress=False,
    )
    results = run_benchmark({"a": model, "b": [model, model]}, train, test, config)
    rows = [r for r in results["results"] if r["metric"] == "mean_iou"]
    assert [r["source"] for r in rows] == ["a", "b"] and all(0 <= r["mean"] <= 1 for r in rows)
    assert {r["task"] for r in results["results"]} == {"segmentation"}  # no depth, no scenes


def test_evaluate_command_on_a_paper_layout(tmp_path):
    from fit3d_hf import FiT3DModel, backbones
    from fit3d_hf.commands import evaluate

    root = tmp_path / "nyu"
    for split in ("training", "validation"):
        for i in range(2):
            _rgb(root / "images" / split / f"{split}_{i}.png", 16, 24, value=50 * i)
            _png(root / "annotations" / split / f"{split}_{i}.png", np.full((16, 24), i + 1, np.uint8))
    for split_file in ("nyu_train.txt", "nyu_test.txt"):  # the same frames in both lists: enough for the command
        _depth_split(root, split_file, 1000, [2.0, 3.0], h=16, w=24)
    torch.manual_seed(0)
    FiT3DModel.from_backbone(backbones.build_backbone(backbones.tiny_config("dinov2", patch_size=8))).save_pretrained(
        tmp_path / "model"
    )
    results = evaluate.main(
        [
            "--model",
            str(tmp_path / "model"),
            "--output_dir",
            str(tmp_path / "eval"),
            "--dataset",
            "nyuv2",
            "--data_root",
            str(root),
            "--protocol",
            "fixed",
            "--image_height",
            "16",
            "--image_width",
            "24",
            "--seeds",
            "0",
            "--seg_iterations",
            "2",
            "--depth_iterations",
            "2",
            "--seg_batch_size",
            "2",
            "--depth_batch_size",
            "2",
            "--no_controls",
            "--progress",
            "false",
        ]
    )
    tasks = {(r["source"], r["task"]) for r in results["results"]}
    assert tasks == {(s, t) for s in ("original", "fit3d") for t in ("segmentation", "depth")}
    assert (tmp_path / "eval" / "results.json").is_file()


def test_hub_dataset_ids_load_through_load_dataset(tmp_path, hub_cache):
    from fit3d_hf.errors import InputError
    from fit3d_hf.evaluation import BenchmarkConfig, EvaluationArguments, evaluate
    from fit3d_hf.evaluation.data import load_hf_splits

    rows = datasets.Dataset.from_dict(
        {
            "image": [Image.new("RGB", (16, 16), (40 * i, 80, 120)) for i in range(3)],
            "semantics": [np.eye(16, dtype=np.uint8)] * 3,
        }
    )
    files = {}
    for split in ("train", "validation"):
        rows.to_parquet(str(tmp_path / f"{split}.parquet"))
        files[split] = [str(tmp_path / f"{split}.parquet")]
    hub_cache("me/segbench", files)  # as an earlier online `load_dataset("me/segbench")` left it
    data = load_hf_splits("me/segbench")
    assert sorted(data) == ["train", "validation"] and data["train"].num_rows == 3
    folder = tmp_path / "files"  # a folder of data files, as load_dataset reads it
    (folder / "data").mkdir(parents=True)
    rows.to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    assert load_hf_splits(folder)["train"].num_rows == 3
    # `fit3d evaluate --dataset <hub id>` opens it with the `hf` checks: here its splits are named.
    args = EvaluationArguments(
        output_dir=str(tmp_path / "out"), model="unused", dataset="me/segbench", semantics_column="semantics", num_labels=2
    )
    with pytest.raises(InputError, match=r"me/segbench has no split 'test' \(its splits: \['train', 'validation'\]\)"):
        evaluate(args, BenchmarkConfig.cpu_preset())
