"""Evaluation datasets for the probes, read from their standard on-disk layouts.

Every adapter returns an `EvalDataset`: a torch Dataset whose items are
`{"image": [3, H, W] float32 in [0, 1], "semantics": [H, W] int64 (255 = ignore),
"depth_m": [H, W] float32 (0 = invalid), "name": str}` (semantics / depth only when the set
has them), with `num_labels`, `max_depth`, `min_depth` and `eval_crop` describing it, and
`pipelines` holding the official probe pipeline per task (`evaluation.pipelines`; empty for data
that has none).

Layouts (`load_eval_dataset(name, root, split, task)`; split is "train" or "test"), as the
official configs (`evaluation/configs/*_linear_config.py`) read them:

| name | segmentation (mmseg folders) | depth (split file of "rgb depth [focal]" lines) |
|---|---|---|
| scannetpp (FiT3D release) | images/{training,validation}, annotations/..., 100 classes, 0 = void | scannetpp_{train,val}.txt, mm, max 20 m |
| scannet | images/{training,validation}, annotations/..., 40 classes, 0 = void | scannet_{train,val}.txt, mm, max 10 m, Eigen crop |
| nyuv2 | images/{training,validation}, annotations/..., 13 classes, 0 = void | nyu_{train,test}.txt, mm, max 10 m, Eigen crop |
| ade20k | images/{training,validation}, annotations/..., 150 classes, 0 = void | – |
| voc2012 | JPEGImages, SegmentationClass, ImageSets/Segmentation/{train,val}.txt, 21 classes | – |
| kitti (Eigen split) | – | kitti_eigen_{train,test}.txt, RGB under input/, depth PNG / 256 under gt_depth/, max 80 m, Garg crop |

Split-file paths are relative to the root (NYU, ScanNet, ScanNet++) or to its `input/` and
`gt_depth/` folders (KITTI), as in the official datasets.

Any `datasets` dataset works through a column mapping (`from_hf_dataset`; `load_hf_splits` opens
a Hub id, a folder `datasets.load_dataset` reads, or a `save_to_disk` folder), and posed scenes
with depth / semantics through `from_scenes`.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..scenes.images import IMAGE_SUFFIXES
from ..scenes.paths import inside
from .pipelines import PAPER_PIPELINES, Pipeline


def _read_image(source) -> torch.Tensor:
    if isinstance(source, torch.Tensor):
        return source.float()
    image = source if isinstance(source, Image.Image) else Image.open(source)
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def _read_array(source) -> np.ndarray:
    if isinstance(source, torch.Tensor):
        return source.numpy()
    if isinstance(source, Image.Image):
        return np.asarray(source)
    if isinstance(source, (str, os.PathLike)):
        with Image.open(source) as image:
            return np.asarray(image)
    return np.asarray(source)


@dataclass
class EvalDataset(torch.utils.data.Dataset):
    """Images with semantic labels and/or metric depth, read lazily.

    Attributes:
        name: dataset name (appears in the results).
        items: one dict per image with "image" and optionally "semantics", "depth" — each a
            path, a PIL image, an array or a tensor — and "name".
        num_labels: classes K (segmentation) or None.
        max_depth, min_depth: valid depth range in metres (depth) or None.
        reduce_zero_label: label 0 means void: 0 -> 255, k -> k - 1 (mmseg).
        depth_scale: stored depth / depth_scale = metres (1000 for mm PNGs, 256 for KITTI).
        eval_crop: "eigen" (NYU, ScanNet) or "garg" (KITTI): only this region counts in depth metrics.
        pipelines: task -> the official probe pipeline of this data (`load_eval_dataset` sets
            it); `BenchmarkConfig.protocol = "paper"` needs it.
    """

    name: str
    items: list[dict]
    num_labels: int | None = None
    max_depth: float | None = None
    min_depth: float = 1e-3
    reduce_zero_label: bool = False
    depth_scale: float = 1.0
    eval_crop: str | None = None
    pipelines: dict[str, Pipeline] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.items:
            raise ValueError(f"dataset {self.name!r} has no images")
        self.has_semantics = "semantics" in self.items[0]
        self.has_depth = "depth" in self.items[0]
        if self.has_semantics and self.num_labels is None:
            raise ValueError(f"dataset {self.name!r} has semantics but no num_labels")
        if self.has_depth and self.max_depth is None:
            raise ValueError(f"dataset {self.name!r} has depth but no max_depth")

    @property
    def tasks(self) -> list[str]:
        return [task for task, has in (("segmentation", self.has_semantics), ("depth", self.has_depth)) if has]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        out = {"image": _read_image(item["image"]), "name": item.get("name", str(index))}
        size = tuple(out["image"].shape[-2:])
        if self.has_semantics:
            labels = torch.from_numpy(_read_array(item["semantics"]).astype(np.int64))
            if self.reduce_zero_label:
                labels = torch.where(labels == 0, 255, labels - 1)
                labels[labels == 254] = 255
            out["semantics"] = labels
        if self.has_depth:
            out["depth_m"] = torch.from_numpy(_read_array(item["depth"]).astype(np.float32) / self.depth_scale)
        for key in ("semantics", "depth_m"):
            if key in out and tuple(out[key].shape) != size:
                raise ValueError(f"{self.name}[{index}] ({out['name']}): {key} is {tuple(out[key].shape)}, image is {size}")
        return out

    def eval_mask(self, depth_m: torch.Tensor) -> torch.Tensor:
        """Pixels of `[H, W]` ground truth that count in depth metrics (range and crop)."""
        valid = (depth_m > self.min_depth) & (depth_m < self.max_depth)
        if self.eval_crop is None:
            return valid
        crop = torch.zeros_like(valid)
        h, w = valid.shape
        if self.eval_crop == "garg":
            crop[int(0.40810811 * h) : int(0.99189189 * h), int(0.03594771 * w) : int(0.96405229 * w)] = True
        elif self.eval_crop == "eigen":
            # Eigen et al.'s crop of 480x640 NYU frames (the official [45:471, 41:601]), scaled for other sizes
            crop[round(45 * h / 480) : round(471 * h / 480), round(41 * w / 640) : round(601 * w / 640)] = True
        else:
            raise ValueError(f"unknown eval_crop {self.eval_crop!r} (eigen or garg)")
        return valid & crop


def _find_image(folder: Path, stem: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


def mmseg_segmentation(
    root: str | os.PathLike,
    img_dir: str,
    ann_dir: str,
    *,
    name: str,
    num_labels: int,
    reduce_zero_label: bool,
    stems: list[str] | None = None,
) -> EvalDataset:
    """Images in `root/img_dir`, PNG labels of the same stem in `root/ann_dir` (mmseg layout).

    Every label needs its image (a missing one is an error naming it); `stems` restricts the
    set (VOC's split files).
    """
    root = Path(root)
    images, labels = root / img_dir, root / ann_dir
    for folder in (images, labels):
        if not folder.is_dir():
            raise FileNotFoundError(f"{name}: folder not found: {folder}")
    stems = stems if stems is not None else sorted(p.stem for p in labels.glob("*.png"))
    items, missing = [], []
    for stem in stems:
        image = _find_image(images, stem)
        if image is None or not (labels / f"{stem}.png").is_file():
            missing.append(stem)
            continue
        items.append({"image": image, "semantics": labels / f"{stem}.png", "name": stem})
    if missing:
        raise FileNotFoundError(f"{name}: {len(missing)} image/label pairs incomplete in {root} (first: {missing[:5]})")
    return EvalDataset(name, items, num_labels=num_labels, reduce_zero_label=reduce_zero_label)


def split_file_depth(
    root: str | os.PathLike,
    split_file: str,
    *,
    name: str,
    depth_scale: float,
    max_depth: float,
    eval_crop: str | None = None,
    image_dir: str = "",
    depth_dir: str = "",
    allow_external_paths: bool = False,
) -> EvalDataset:
    """Depth set listed in `root/split_file`, one "rgb_path depth_path [focal]" line per image,
    paths relative to `root/image_dir` and `root/depth_dir` (a leading slash is dropped) and inside
    `root` unless `allow_external_paths` (`scenes.paths.inside`); lines whose depth is "None" are
    skipped, as in the depth toolbox (KITTI's Eigen split has some)."""
    root = Path(root)
    split_path = root / split_file
    if not split_path.is_file():
        raise FileNotFoundError(f"{name}: split file not found: {split_path}")
    items = []
    for number, line in enumerate(split_path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 2:
            raise ValueError(f"{split_path}:{number}: expected 'rgb_path depth_path [focal]', got {line!r}")
        if fields[1] == "None":
            continue
        image, depth = (
            inside(
                root,
                root / folder,
                entry.lstrip("/\\"),
                source=f"{split_path}:{number}",
                what=what,
                allow_external_paths=allow_external_paths,
            )
            for entry, folder, what in ((fields[0], image_dir, "rgb path"), (fields[1], depth_dir, "depth path"))
        )
        for path in (image, depth):
            if not path.is_file():
                raise FileNotFoundError(f"{split_path}:{number}: file not found: {path}")
        items.append({"image": image, "depth": depth, "name": fields[0].lstrip("/\\")})
    items.sort(key=lambda item: str(item["image"]))  # the toolbox sorts by file name
    return EvalDataset(name, items, max_depth=max_depth, depth_scale=depth_scale, eval_crop=eval_crop)


# name -> task -> (builder, {split: arguments}, shared arguments)
_MMSEG_SPLITS = {"train": ("images/training", "annotations/training"), "test": ("images/validation", "annotations/validation")}
PAPER_DATASETS: dict[str, dict[str, dict]] = {
    "scannetpp": {
        "segmentation": {"num_labels": 100, "reduce_zero_label": True},
        "depth": {
            "files": {"train": "scannetpp_train.txt", "test": "scannetpp_val.txt"},
            "depth_scale": 1000.0,
            "max_depth": 20.0,
        },
    },
    "scannet": {
        "segmentation": {"num_labels": 40, "reduce_zero_label": True},
        "depth": {
            "files": {"train": "scannet_train.txt", "test": "scannet_val.txt"},
            "depth_scale": 1000.0,
            "max_depth": 10.0,
            "eval_crop": "eigen",
        },
    },
    "nyuv2": {
        "segmentation": {"num_labels": 13, "reduce_zero_label": True},
        "depth": {
            "files": {"train": "nyu_train.txt", "test": "nyu_test.txt"},
            "depth_scale": 1000.0,
            "max_depth": 10.0,
            "eval_crop": "eigen",
        },
    },
    "ade20k": {"segmentation": {"num_labels": 150, "reduce_zero_label": True}},
    "voc2012": {"segmentation": {"num_labels": 21, "reduce_zero_label": False}},
    "kitti": {
        "depth": {
            "files": {"train": "kitti_eigen_train.txt", "test": "kitti_eigen_test.txt"},
            "image_dir": "input",
            "depth_dir": "gt_depth",
            "depth_scale": 256.0,
            "max_depth": 80.0,
            "eval_crop": "garg",
        },
    },
}


def load_eval_dataset(
    name: str, root: str | os.PathLike, split: str, task: str, *, allow_external_paths: bool = False
) -> EvalDataset:
    """One of the paper's evaluation sets (see the table above) from its standard layout, with its
    official probe pipeline for `task` (`EvalDataset.pipelines`); the files its split files name
    must lie inside `root` unless `allow_external_paths`."""
    if name not in PAPER_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(PAPER_DATASETS)} (or use from_hf_dataset)")
    if task not in PAPER_DATASETS[name]:
        raise ValueError(f"{name} has no {task} benchmark; it has {sorted(PAPER_DATASETS[name])}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    spec = dict(PAPER_DATASETS[name][task])
    if task == "depth":
        files = spec.pop("files")
        data = split_file_depth(root, files[split], name=name, allow_external_paths=allow_external_paths, **spec)
    elif name == "voc2012":
        root = Path(root)
        split_path = root / "ImageSets" / "Segmentation" / ("train.txt" if split == "train" else "val.txt")
        if not split_path.is_file():
            raise FileNotFoundError(f"voc2012: split file not found: {split_path}")
        stems = split_path.read_text().split()
        for stem in stems:
            inside(
                root, root / "JPEGImages", stem, source=str(split_path), what="entry", allow_external_paths=allow_external_paths
            )
        data = mmseg_segmentation(root, "JPEGImages", "SegmentationClass", name=name, stems=stems, **spec)
    else:
        data = mmseg_segmentation(root, *_MMSEG_SPLITS[split], name=name, **spec)
    data.pipelines = {task: PAPER_PIPELINES[name][task]}
    return data


def load_hf_splits(path: str | os.PathLike):
    """The splits (a `datasets.DatasetDict`) of a folder written by `save_to_disk`, or of anything
    `datasets.load_dataset` reads: a Hub dataset id (from the local cache when offline) or a folder
    of data files."""
    import datasets

    path = os.fspath(path)
    if (Path(path) / "dataset_dict.json").is_file() or (Path(path) / "state.json").is_file():
        return datasets.load_from_disk(path)
    return datasets.load_dataset(path)


def from_hf_dataset(
    dataset,
    *,
    name: str,
    image_column: str = "image",
    semantics_column: str | None = None,
    depth_column: str | None = None,
    num_labels: int | None = None,
    max_depth: float | None = None,
    depth_scale: float = 1.0,
    reduce_zero_label: bool = False,
    eval_crop: str | None = None,
) -> EvalDataset:
    """Wrap a `datasets.Dataset` whose columns hold images (PIL or arrays), label maps and/or
    depth maps; `depth_scale` converts the stored depth to metres."""
    missing = [c for c in (image_column, semantics_column, depth_column) if c is not None and c not in dataset.column_names]
    if missing:
        raise ValueError(f"{name}: columns {missing} not in the dataset (columns: {dataset.column_names})")
    if semantics_column is None and depth_column is None:
        raise ValueError(f"{name}: give semantics_column and/or depth_column")
    items = []
    for index, row in enumerate(dataset):
        item = {"image": row[image_column], "name": f"{name}_{index:06d}"}
        if semantics_column is not None:
            item["semantics"] = row[semantics_column]
        if depth_column is not None:
            item["depth"] = row[depth_column]
        items.append(item)
    return EvalDataset(
        name,
        items,
        num_labels=num_labels,
        max_depth=max_depth,
        depth_scale=depth_scale,
        reduce_zero_label=reduce_zero_label,
        eval_crop=eval_crop,
    )


def from_scenes(scenes: list, *, views: str = "all", name: str = "synthetic", max_depth: float | None = None) -> EvalDataset:
    """Views of posed scenes (`fit3d_hf.scenes.Scene`) with `semantics` and/or `depth_m`.

    views: "all", "train" or "test" (the scenes' own view split). max_depth defaults to the
    largest ground-truth depth, rounded up to a metre.
    """
    if views not in ("all", "train", "test"):
        raise ValueError(f"views must be 'all', 'train' or 'test', got {views!r}")
    items, num_labels, deepest = [], None, 0.0
    for scene in scenes:
        if scene.semantics is None and scene.depth_m is None:
            raise ValueError(f"scene {scene.scene_id} has neither semantics nor depth_m")
        indices = range(scene.num_views) if views == "all" else getattr(scene, f"{views}_views") or range(scene.num_views)
        for i in indices:
            item = {"image": scene.image(i), "name": scene.view_names[i]}
            if scene.semantics is not None:
                item["semantics"] = scene.semantics[i]
                num_labels = (
                    len(scene.class_names)
                    if scene.class_names
                    else max(num_labels or 0, int(scene.semantics[i][scene.semantics[i] != 255].max()) + 1)
                )
            if scene.depth_m is not None:
                item["depth"] = scene.depth_m[i]
                deepest = max(deepest, float(scene.depth_m[i].max()))
            items.append(item)
    if max_depth is None and deepest > 0:
        max_depth = float(np.ceil(deepest + 1e-6))
    return EvalDataset(name, items, num_labels=num_labels, max_depth=max_depth)
