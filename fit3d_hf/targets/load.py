"""Open a targets dataset with its float16 targets kept: map-style or streamed."""

import os
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

from .schema import METADATA_FILE, TRAINING_COLUMNS, parse_metadata, target_shape


def load_targets(
    path: str | os.PathLike, *, streaming: bool = False, revision: str | None = None
) -> datasets.Dataset | datasets.IterableDataset:
    """Open a targets dataset: a folder written by `render_targets`, a folder in the Hub layout
    (`fit3d_hf.hub.export_for_hub`: `data/*.parquet` + `fit3d_targets.json`), or a Hub dataset id.

    The metadata (`targets_metadata`) comes with it from every source: from a Hub id it is the
    repo's `fit3d_targets.json` (`datasets` keeps no description on the Hub).

    Args:
        path: the folder or the Hub id.
        streaming: return a `datasets.IterableDataset` that reads the rows as they are needed (no
            download of the whole dataset, no Arrow cache); rows come as `datasets` decodes them,
            and `training_stream` gives the float16 training view.
        revision: a branch, tag or commit of a Hub dataset.

    Returns:
        Map-style: the training columns as torch float16 tensors (image [3, H, W] with values
        0..255, target [Cb, h, w], mask [h, w]); `with_format("torch")` alone would upcast the
        targets to float32 and double their memory. Other columns come back as Python values.
    """
    local = Path(path)
    if (local / "state.json").exists():
        dataset = datasets.load_from_disk(str(local))
        metadata_text = dataset.info.description
        if streaming:
            # One shard per Arrow file, so that processes and workers can split them.
            dataset = dataset.to_iterable_dataset(num_shards=len(dataset.cache_files) or 1)
    elif local.is_dir() and any(local.glob("data/*.parquet")):
        dataset = datasets.load_dataset("parquet", data_dir=str(local / "data"), split="train", streaming=streaming)
        metadata_text = (local / METADATA_FILE).read_text() if (local / METADATA_FILE).is_file() else None
    elif local.exists():
        raise FileNotFoundError(f"{local} is neither a saved dataset (no state.json) nor a pushed one (no data/*.parquet)")
    else:
        dataset = datasets.load_dataset(str(path), split="train", streaming=streaming, revision=revision)
        metadata_text = _hub_metadata(str(path), revision)
    if metadata_text and parse_metadata(metadata_text):
        dataset.info.description = metadata_text
    target_shape(dataset)
    if streaming:
        return dataset
    return dataset.with_format("torch", columns=TRAINING_COLUMNS, dtype=torch.float16, output_all_columns=True)


def _hub_metadata(repo_id: str, revision: str | None) -> str | None:
    """The text of a Hub dataset's `fit3d_targets.json` (from the local cache when offline), or None when the repo has none."""
    try:
        return Path(hf_hub_download(repo_id, METADATA_FILE, repo_type="dataset", revision=revision)).read_text()
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None


def training_dataset(dataset: datasets.Dataset) -> datasets.Dataset:
    """Only the image/target/mask columns, as torch float16 (no upcast of the targets)."""
    return dataset.select_columns(TRAINING_COLUMNS).with_format("torch", dtype=torch.float16)


def training_stream(dataset: datasets.IterableDataset) -> datasets.IterableDataset:
    """The image/target/mask columns of a streamed targets dataset as one-row Arrow tables, for
    `collate_training_rows`. `IterableDataset.with_format("torch")` (and "numpy") take no dtype and
    upcast float16 to float32; Arrow keeps the stored float16 and PNG bytes, decoded in the collate
    (in the DataLoader's workers)."""
    return dataset.select_columns(TRAINING_COLUMNS).with_format("arrow")


def collate_training_rows(rows: list[pa.Table]) -> dict[str, torch.Tensor]:
    """Batch rows of `training_stream`: images [B, 3, H, W] float16 with values 0..255 (exact in
    float16), targets [B, Cb, h, w] float16 and masks [B, h, w] float16, as `finetune.collate_targets`
    batches the map-style rows."""
    table = pa.concat_tables(rows)
    decode = datasets.Image().decode_example  # PNG bytes (or a path) -> PIL image
    images = [np.asarray(decode(cell).convert("RGB")) for cell in table.column("image").to_pylist()]
    return {
        "images": torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).to(torch.float16),
        "targets": torch.from_numpy(_array_column(table, "target")),
        "masks": torch.from_numpy(_array_column(table, "mask")).to(torch.float16),
    }


def _array_column(table: pa.Table, name: str) -> np.ndarray:
    """An ArrayXD column of a table as one writable numpy array [rows, ...] in its stored dtype (torch
    tensors cannot share Arrow's read-only buffers)."""
    return table.column(name).combine_chunks().to_numpy(zero_copy_only=False).copy()
