"""Open a targets dataset with its float16 targets kept."""

import os
from pathlib import Path

import datasets
import torch

from .schema import METADATA_FILE, TRAINING_COLUMNS, target_shape


def load_targets(path: str | os.PathLike) -> datasets.Dataset:
    """Open a targets dataset: a folder written by `render_targets`, a folder pushed with
    `fit3d_hf.hub.push_targets` (parquet shards), or a Hub dataset id.

    The training columns come back as torch float16 tensors (image [3, H, W] with values
    0..255, target [Cb, h, w], mask [h, w]); `with_format("torch")` alone would upcast the
    targets to float32 and double their memory. Other columns come back as Python values.
    """
    path = Path(path)
    if (path / "state.json").exists():
        dataset = datasets.load_from_disk(str(path))
    elif path.is_dir() and any(path.glob("data/*.parquet")):
        dataset = datasets.load_dataset("parquet", data_dir=str(path / "data"), split="train")
        dataset = _attach_sidecar(dataset, path / METADATA_FILE)
    elif path.exists():
        raise FileNotFoundError(f"{path} is neither a saved dataset (no state.json) nor a pushed one (no data/*.parquet)")
    else:
        dataset = datasets.load_dataset(str(path), split="train")
    target_shape(dataset)
    return dataset.with_format("torch", columns=TRAINING_COLUMNS, dtype=torch.float16, output_all_columns=True)


def training_dataset(dataset: datasets.Dataset) -> datasets.Dataset:
    """Only the image/target/mask columns, as torch float16 (no upcast of the targets)."""
    return dataset.select_columns(TRAINING_COLUMNS).with_format("torch", dtype=torch.float16)


def _attach_sidecar(dataset: datasets.Dataset, sidecar: Path) -> datasets.Dataset:
    if sidecar.exists():
        dataset.info.description = sidecar.read_text()
    return dataset
