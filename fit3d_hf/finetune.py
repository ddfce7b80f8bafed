"""Stage II: fine-tune a backbone on rendered 3D-aware targets (one visible accelerate loop).

    for batch in dataloader:                       # image, target [Cb, h, w], mask [h, w]
        flip image, target and mask together (p = 0.5)
        out = finetuned(normalize(image))          # last block, final norm, patch tokens [B, Cb, h, w]
        loss = sum(|out - target| * mask) / (sum(mask) * Cb)
        backward; every `gradient_accumulation_steps` batches: clip grad norm 0.1, AdamW step
        (lr 1e-5, wd 1e-4, constant)

Only `FiT3DModel.finetuned` is trained; `FiT3DModel.original` stays frozen and is never run.
The same code runs on one CPU, several CPU processes (gloo) or GPUs, as `accelerate launch`
configures it; the device is accelerate's (its config, or what it detects). Checkpoints are
`accelerator.save_state` folders `<output_dir>/checkpoints/step_<N>/`, written under a temporary
name and renamed when complete.

The dataset is map-style (a `datasets.Dataset`, random order from accelerate's seedable sampler)
or streamed (`FinetuneConfig.streaming`, or a `datasets.IterableDataset`): each process reads its
own part (`split_dataset_by_node`) through a shuffle buffer, float16 kept, and all processes end
an epoch together when one runs out.

One entry, with the arguments of `fit3d finetune`:

    result = finetune("targets", "embedded", "fit3d-model", FinetuneConfig(max_steps=100))
    # fit3d-model/: the FiT3DModel (save_pretrained), its image processor, fit3d_finetune.json

The model card is not written here (`fit3d_hf.hub.write_model_card`, `hub.finetune_card_extra`).
"""

import contextlib
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.tracking import get_available_trackers
from accelerate.utils import GradientAccumulationPlugin, gather_object, set_seed
from datasets.distributed import split_dataset_by_node
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from fit3d_hf import backbones
from fit3d_hf.backbone_specs import backbone_name, load_backbone_spec
from fit3d_hf.errors import InputError, InputNotFoundError, OutputError, UserError
from fit3d_hf.io import LOCK_FILE, TMP_MARK, atomic_directory, check_output_folder, folder_lock, remove_stale_temporaries
from fit3d_hf.modeling_fit3d import FiT3DModel
from fit3d_hf.provenance import PROVENANCE_KEY, backbone_identity, check_backbone, check_provenance, check_source, hub_error
from fit3d_hf.targets import (
    collate_training_rows,
    load_targets,
    target_shape,
    targets_metadata,
    training_dataset,
    training_stream,
)

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
TRAINER_STATE_FILE = "trainer_state.json"
TRAINING_INFO_FILE = "fit3d_finetune.json"
# FinetuneConfig fields that leave the trained weights unchanged: a run may resume with other values of these.
RESULT_INDEPENDENT_FIELDS = (
    "checkpointing_steps",
    "checkpoints_total_limit",
    "logging_steps",
    "dataloader_num_workers",
    "report_to",
    "gradient_checkpointing",  # recomputes the same activations
)


@dataclass
class FinetuneConfig:
    """Stage II hyper-parameters. Defaults are the paper's (FiT3D, ECCV 2024; official code
    ywyue/FiT3D `finetune.py`, `engine.py`): AdamW lr 1e-5, weight decay 1e-4, constant lr, gradient
    clipping 0.1, batch 2, horizontal flip p = 0.5, one epoch (two epochs were worse in the paper),
    fp32; the input normalised as the targets were lifted (ImageNet's with `--protocol paper`).

    Effective batch = `per_device_batch_size` × processes. The paper's is 2 on one GPU, at lr 1e-5.
    On N processes keep the product at 2 (e.g. 1 per process on 2 GPUs) for the paper's run; a
    larger effective batch B is a deviation, for which the usual rule is to scale the learning
    rate linearly: lr = 1e-5 × B / 2 (not validated against the paper's numbers).
    """

    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate (constant)."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=0.1, metadata={"help": "Gradient clipping (total L2 norm)."})
    per_device_batch_size: int = field(default=2, metadata={"help": "Views per process per batch."})
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={
            "help": "Batches per optimizer step (the loss is averaged over them); a step sees batch x this x processes views."
        },
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute each block's activations in the backward pass: less memory, more time."}
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Read the dataset as it is needed (IterableDataset): a Hub id is not downloaded first, no Arrow cache."
        },
    )
    shuffle_buffer_size: int = field(
        default=256, metadata={"help": "streaming: views each process holds in its shuffle buffer (ViT-S at 41x62: ~2 MB each)."}
    )
    num_epochs: int = field(default=1, metadata={"help": "Passes over the dataset."})
    max_steps: int | None = field(default=None, metadata={"help": "Stop after this many optimizer steps (overrides num_epochs)."})
    flip_probability: float = field(default=0.5, metadata={"help": "Joint horizontal flip of image, target and mask."})
    seed: int = field(default=0, metadata={"help": "Seed for data order and flips (a resumed run reproduces them)."})
    mixed_precision: str = field(
        default="no",
        metadata={
            "help": "'no' (fp32, the paper's), 'bf16' or 'fp16' (GPU autocast: faster, a deviation from the paper); "
            "overrides the accelerate config when not 'no'."
        },
    )
    normalization: str | None = field(
        default=None,
        metadata={
            "help": "Input normalisation of the fine-tuned model, recorded in its config and image processor: "
            "'imagenet' (as the official code for every backbone) or 'family' (the family's own). Unset: what the "
            "targets dataset records (the lifting's), else what the backbone's config records."
        },
    )
    checkpointing_steps: int = field(default=500, metadata={"help": "save_state every N optimizer steps (0: never)."})
    checkpoints_total_limit: int = field(default=2, metadata={"help": "Keep only the newest N checkpoints."})
    logging_steps: int = field(default=10, metadata={"help": "Print the loss (mean over processes) every N steps."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes per training process."})
    report_to: str = field(
        default="none", metadata={"help": "Tracker for accelerate ('tensorboard', 'wandb', ...; must be installed) or 'none'."}
    )

    @classmethod
    def paper_preset(cls, **overrides) -> "FinetuneConfig":
        """The official Stage II (`fit3d finetune --protocol paper`): `PAPER_PRESET`, which the defaults equal."""
        return cls(**{**PAPER_PRESET, **overrides})


# The official Stage II values (`finetune.py` defaults, `engine.py`; docs/protocol.md), on one process.
PAPER_PRESET = dict(
    learning_rate=1e-5,
    weight_decay=1e-4,
    max_grad_norm=0.1,
    per_device_batch_size=2,
    num_epochs=1,
    flip_probability=0.5,
    mixed_precision="no",
)


@dataclass
class FinetuneResult:
    """What `finetune` returns.

    Args:
        model: the trained `FiT3DModel` (unwrapped, on the training device).
        output_dir: the saved FiT3DModel folder.
        global_step: optimizer steps taken.
        losses: the logged `(step, loss)` pairs (all of them, also after a resume: checkpoints
            carry the log).
        rank_checksums: SHA-256 of the fine-tuned weights as held by each process (all equal).
        training_info: what `fit3d_finetune.json` holds (dataset, its metadata, backbone name,
            config, the fields above).
    """

    model: FiT3DModel
    output_dir: Path
    global_step: int
    losses: list[tuple[int, float]]
    rank_checksums: list[str]
    training_info: dict


def masked_l1(output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """FiT3D's feature loss `sum(|output - target| * mask) / (sum(mask) * C)`.

    Args:
        output: [B, C, h, w] predicted feature maps.
        target: [B, C, h, w] rendered targets.
        mask: [B, h, w], 1 where the target is valid.

    Returns:
        Scalar mean absolute error over valid positions and channels (0 when no position is valid).
    """
    mask = mask.to(output.dtype).unsqueeze(1)
    error = ((output - target.to(output.dtype)).abs() * mask).sum()
    return error / (mask.sum() * output.shape[1]).clamp_min(1.0)


def collate_targets(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack rows of a targets dataset formatted by `fit3d_hf.targets.training_dataset` into a batch.

    Returns:
        images [B, 3, H, W] float16 with values 0..255 (exact in float16), targets [B, Cb, h, w]
        float16 and masks [B, h, w] float16; upcast on the device, not before the transfer.
    """
    return {
        "images": torch.stack([example["image"] for example in examples]),
        "targets": torch.stack([example["target"] for example in examples]),
        "masks": torch.stack([example["mask"] for example in examples]),
    }


def random_hflip(
    images: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor, probability: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flip each sample of images [B, 3, H, W], targets [B, C, h, w] and masks [B, h, w] left-right
    together with `probability`, drawn from `generator` (CPU)."""
    flip = (torch.rand(images.shape[0], generator=generator) < probability).to(images.device)
    images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
    targets = torch.where(flip.view(-1, 1, 1, 1), targets.flip(-1), targets)
    masks = torch.where(flip.view(-1, 1, 1), masks.flip(-1), masks)
    return images, targets, masks


def check_dataset(dataset: datasets.Dataset | datasets.IterableDataset, backbone_config) -> None:
    """Refuse, before training, a targets dataset that does not fit the backbone (width, patch grid)."""
    hidden_size, grid_height, grid_width = target_shape(dataset)
    width = backbones.hidden_size_of(backbone_config)
    metadata = targets_metadata(dataset)
    made_for = metadata.get("backbone", {}).get("name_or_path") or "another backbone"
    if hidden_size != width:
        raise InputError(
            f"the dataset's targets are {hidden_size}-dimensional (rendered for {made_for}) but the backbone "
            f"is {width} wide; render targets with the backbone you fine-tune (`fit3d render --backbone ...`)"
        )
    if _num_views(dataset) == 0:
        raise InputError("the targets dataset is empty")
    if metadata.get("valid_fraction") and not any(metadata["valid_fraction"].values()):
        raise InputError(
            "no target cell of the dataset is valid (every mask is 0: the renders cover nothing); "
            "lift the scenes longer or check the scene masks"
        )
    first = next(iter(dataset.select_columns(["image"])))["image"]
    patch = backbones.patch_size_of(backbone_config)
    height, width_px = first.shape[-2:] if isinstance(first, torch.Tensor) else (first.height, first.width)
    try:
        backbones.check_image_size(height, width_px, backbone_config)
    except ValueError as error:
        raise InputError(f"the targets dataset's images do not fit the backbone: {error}") from error
    if (height // patch, width_px // patch) != (grid_height, grid_width):
        raise InputError(
            f"images of {height}x{width_px} give a {height // patch}x{width_px // patch} patch grid at patch size "
            f"{patch}, but the targets are {grid_height}x{grid_width}; the dataset was rendered for another patch size"
        )


def _num_views(dataset: datasets.Dataset | datasets.IterableDataset) -> int | None:
    """Rows of a dataset; for a streamed one, as its metadata or its split info says (None if neither does)."""
    if isinstance(dataset, datasets.Dataset):
        return dataset.num_rows
    if targets_metadata(dataset).get("num_views") is not None:
        return targets_metadata(dataset)["num_views"]
    split = (dataset.info.splits or {}).get("train")
    return split.num_examples if split is not None and split.num_examples else None


def _normalization(config: FinetuneConfig, metadata: dict, model_config) -> str:
    """The input normalisation to fine-tune with: the config's, else the targets', else the backbone's record.

    Raises a ValueError when the config asks for another one than the targets were lifted with.
    """
    lifted = metadata.get("normalization")
    if config.normalization is not None and lifted is not None and config.normalization != lifted:
        raise ValueError(
            f"the targets were made with {lifted!r} input normalisation, but normalization is {config.normalization!r}: "
            "fine-tune with the one the targets were lifted with (leave normalization unset)"
        )
    return config.normalization or lifted or backbones.normalization_of(model_config)


class FeatureMapHead(torch.nn.Module):
    """Wraps a transformers backbone so that `forward(pixel_values [B,3,H,W]) -> [B, Cb, h, w]`
    (last block, final norm, prefix tokens dropped) goes through DDP's forward."""

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return backbones.extract_features(self.backbone, pixel_values).feature_maps


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder under `<output_dir>/checkpoints`, or None."""
    folder = Path(output_dir) / "checkpoints"
    steps = [(int(m.group(1)), p) for p in folder.glob("step_*") if (m := CHECKPOINT_PATTERN.match(p.name))]
    return max(steps)[1] if steps else None


def _save_checkpoint(accelerator: Accelerator, output_dir: Path, state: dict, total_limit: int) -> None:
    folder = output_dir / "checkpoints"
    final = folder / f"step_{state['global_step']:08d}"
    tmp = folder / f".{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every rank writes its own RNG file here
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / TRAINER_STATE_FILE).write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        complete = sorted(p for p in folder.glob("step_*") if CHECKPOINT_PATTERN.match(p.name))
        for old in complete[: max(0, len(complete) - total_limit)]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def _flip_generator(seed: int, batch_index: int, rank: int) -> torch.Generator:
    # Flips are a pure function of (seed, batch, rank), so a resumed run draws the same ones
    # whatever else consumed random numbers in between.
    return torch.Generator().manual_seed(seed * 1_000_003 + batch_index * 101 + rank)


def _freeze_unused_parameters(model: PreTrainedModel) -> list[str]:
    """Freeze the parameters that get no gradient from the patch features (e.g. DINOv2's mask token),
    found by one forward and backward of a one-patch image; return their names. AdamW skips them
    anyway, and frozen they spare DDP the search for unused parameters (`find_unused_parameters`)
    in every step."""
    patch, training = backbones.patch_size_of(model.config), model.training
    weight = next(model.parameters())
    backbones.extract_features(model.train(), weight.new_zeros(1, 3, patch, patch)).feature_maps.sum().backward()
    unused = [name for name, parameter in model.named_parameters() if parameter.requires_grad and parameter.grad is None]
    for name, parameter in model.named_parameters():
        parameter.grad = None
        if name in unused:
            parameter.requires_grad_(False)
    model.train(training)
    return unused


def _epoch_batches(
    loader: torch.utils.data.DataLoader,
    accelerator: Accelerator,
    epoch: int,
    skip: int,
    num_batches: int | None,
    stream: datasets.IterableDataset | None,
    group: int,
) -> Iterator[dict[str, torch.Tensor]]:
    """The batches of one epoch after its first `skip` ones, at most `num_batches` in all (None: a
    streamed epoch of unknown length, until a process runs out).

    Map-style: accelerate's prepared loader, reshuffled per epoch, skipping without reading.
    Streamed (`stream` is the process's part of the dataset): reshuffled per epoch, skipped batches
    are read and dropped (a shuffle buffer cannot be restored, so a resumed run replays its epoch to
    the checkpoint), moved to the device here, and handed out `group` (one optimizer step) at a time
    while every process has a full group: processes may hold a few views more or less, and DDP
    needs all of them in every step.
    """
    if stream is None:
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        epoch_loader.set_epoch(epoch)
        yield from itertools.islice(epoch_loader, num_batches - skip)
        return
    stream.set_epoch(epoch)  # before iter(): the DataLoader's workers take a copy
    batches = iter(loader)
    for _ in range(skip):
        next(batches)
    for _ in itertools.count() if num_batches is None else range((num_batches - skip) // group):
        steps = list(itertools.islice(batches, group))
        full = torch.tensor([len(steps) == group], device=accelerator.device)
        if not bool(accelerator.gather(full).all()):
            return
        for batch in steps:
            yield {key: value.to(accelerator.device, non_blocking=True) for key, value in batch.items()}


def finetune(
    dataset: str | os.PathLike | datasets.Dataset | datasets.IterableDataset,
    backbone: str | PreTrainedModel,
    output_dir: str | os.PathLike,
    config: FinetuneConfig | None = None,
    *,
    resume_from_checkpoint: str | os.PathLike | None = None,
) -> FinetuneResult:
    """Fine-tune a copy of `backbone` on a targets dataset and save the FiT3DModel to `output_dir`.

    Args:
        dataset: a folder written by `fit3d_hf.targets.render_targets`, a folder in the Hub layout or
            a Hub dataset id (opened with `load_targets`, streamed when `config.streaming`), or a
            `datasets.Dataset` / `datasets.IterableDataset` with the columns image, target [Cb, h, w]
            and mask [h, w].
        backbone: a `--backbone` spec (`fit3d_hf.backbone_specs.load_backbone_spec`; random weights
            seeded by `config.seed`) or a transformers backbone of a FiT3D family. It is paired with
            a trainable copy of itself (`FiT3DModel.from_backbone`, concat) and left unchanged; a
            spec's backbone is not kept beside the two copies.
        output_dir: the FiT3DModel folder: `save_pretrained`, the image processor
            (`backbones.make_image_processor`, as `fit3d convert` writes) and `fit3d_finetune.json`,
            written atomically at the end. Checkpoints go to `<output_dir>/checkpoints/step_<N>/`
            (and tracker logs here); these sub-folders are kept in the final folder.
        config: hyper-parameters (default: the paper's, `FinetuneConfig()`).
        resume_from_checkpoint: a checkpoint folder, or "latest" for the newest one under
            `output_dir` (a fresh start when there is none).

    Before any work: `output_dir` must be new or empty, or hold this run's checkpoints when
    resuming (a finished model is never overwritten, another run's checkpoints never deleted);
    the targets must have been rendered for `backbone` (same weights, from the dataset's recorded
    provenance); a resumed checkpoint must have been made with the same backbone, targets and
    settings (all `FinetuneConfig` fields but `RESULT_INDEPENDENT_FIELDS`). The main process holds
    `output_dir`'s lock (`io.folder_lock`) while it trains. `fit3d_finetune.json` records the run's
    provenance.

    Returns:
        `FinetuneResult`, on every process; only the main process writes `output_dir`.
    """
    config = config or FinetuneConfig()
    _check_config(config)
    output_dir = check_output_folder(output_dir, what="the fine-tuning output folder")
    resume_from_checkpoint = _resume_point(output_dir, resume_from_checkpoint)
    dataset_source = None if isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)) else str(dataset)
    if dataset_source is not None:
        dataset = _open_targets(dataset_source, streaming=config.streaming)
    streaming = isinstance(dataset, datasets.IterableDataset)
    if isinstance(backbone, FiT3DModel):
        raise TypeError("backbone is a FiT3DModel; pass the backbone to fine-tune (e.g. its .finetuned) or a --backbone spec")
    if isinstance(backbone, (str, os.PathLike)):
        backbone, name = load_backbone_spec(str(backbone), config.seed)
        identity = backbone_identity(backbone)
        model = FiT3DModel.from_backbone(backbone, assembly="concat")
        del backbone  # the FiT3DModel holds two copies; a third would stay in memory through training
    else:
        name = backbone_name(backbone)
        identity = backbone_identity(backbone)
        model = FiT3DModel.from_backbone(backbone, assembly="concat")
    check_dataset(dataset, model.config)
    _check_targets_backbone(targets_metadata(dataset), identity, dataset_source)
    backbones.set_normalization(model.config, _normalization(config, targets_metadata(dataset), model.config))
    num_views = _num_views(dataset)
    if streaming and num_views is None and config.max_steps is None:
        raise InputError("the streamed dataset does not say how many views it has (no num_views metadata): pass max_steps")
    log_with = None
    if config.report_to not in ("none", "", None):
        available = [str(t) for t in get_available_trackers()]
        if config.report_to not in available:
            raise ValueError(f"--report_to {config.report_to!r} is not installed here; available trackers: {available or 'none'}")
        log_with = config.report_to

    backbone_config = model.finetuned.config
    model.original.requires_grad_(False)
    model.finetuned.requires_grad_(True).train()
    frozen = _freeze_unused_parameters(model.finetuned)
    if config.gradient_checkpointing:
        if not model.finetuned.supports_gradient_checkpointing:
            raise ValueError(f"{type(model.finetuned).__name__} does not support gradient checkpointing")
        # Non-reentrant: the input (pixels) needs no gradient. transformers 5.x renamed the method.
        if hasattr(model.finetuned, "activation_checkpointing_enable"):
            model.finetuned.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.finetuned.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # The device: an accelerator torch sees (CUDA, MPS, XPU, ...), or the CPU; `accelerate launch` sets the processes.
    accelerator = Accelerator(
        # CPU only where torch sees no accelerator (CUDA, MPS, XPU, ...): under `accelerate launch` with
        # several CPU processes, accelerate alone starts each as a silent single process.
        cpu=not torch.accelerator.is_available(),
        mixed_precision=None if config.mixed_precision == "no" else config.mixed_precision,
        log_with=log_with,
        project_dir=str(output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
        # Epochs end on whole optimizer steps (see `_epoch_batches`), so no sync is forced at a loader's end.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=config.gradient_accumulation_steps, sync_with_dataloader=False
        ),
    )
    provenance = {
        "backbone": identity,
        "targets": _targets_identity(dataset),
        "finetune_config": {key: value for key, value in asdict(config).items() if key not in RESULT_INDEPENDENT_FIELDS},
        "num_processes": accelerator.num_processes,
    }
    if resume_from_checkpoint is not None:
        trainer_state = json.loads((resume_from_checkpoint / TRAINER_STATE_FILE).read_text())
        check_provenance(
            trainer_state.get(PROVENANCE_KEY),
            provenance,
            artifact=f"the checkpoint {resume_from_checkpoint}",
            fix=(
                "resume with the targets, backbone, settings and number of processes it was started with, "
                "or start anew in another --output_dir"
            ),
        )
    # The main process holds the folder's lock; a run that raises leaves it to this process or to a later run (stale).
    claim = contextlib.ExitStack()
    if accelerator.is_main_process:
        claim.enter_context(folder_lock(output_dir, what="the fine-tuning output folder"))
        remove_stale_temporaries(output_dir)
        remove_stale_temporaries(output_dir.parent)
    accelerator.wait_for_everyone()
    set_seed(config.seed)
    if log_with is not None:
        accelerator.init_trackers("fit3d_finetune", config=asdict(config))

    student = FeatureMapHead(model.finetuned)
    trainable = [parameter for parameter in student.parameters() if parameter.requires_grad]
    # The fused kernel (CPU and CUDA) makes the step ~5x cheaper than the for-loop default on CPU.
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay, fused=True)
    batches_per_step, world = config.gradient_accumulation_steps, accelerator.num_processes
    if streaming:
        # Shuffled before the split: every process draws the same shard order, so the parts are disjoint.
        stream = split_dataset_by_node(
            training_stream(dataset).shuffle(seed=config.seed, buffer_size=config.shuffle_buffer_size),
            rank=accelerator.process_index,
            world_size=world,
        )
        dataloader = torch.utils.data.DataLoader(
            stream,
            batch_size=config.per_device_batch_size,
            collate_fn=collate_training_rows,
            num_workers=config.dataloader_num_workers,
            drop_last=True,
        )
        student, optimizer = accelerator.prepare(student, optimizer)
        batches_per_epoch = (num_views or 0) // (world * config.per_device_batch_size)
    else:
        stream = None
        dataloader = torch.utils.data.DataLoader(
            training_dataset(dataset),
            batch_size=config.per_device_batch_size,
            shuffle=True,
            collate_fn=collate_targets,
            num_workers=config.dataloader_num_workers,
            drop_last=True,
        )
        student, optimizer, dataloader = accelerator.prepare(student, optimizer, dataloader)
        batches_per_epoch = len(dataloader)
    steps_per_epoch = batches_per_epoch // batches_per_step
    if steps_per_epoch == 0 and num_views is not None:
        raise ValueError(
            f"{num_views} views give no full step of {config.per_device_batch_size} x {batches_per_step} accumulated on each of "
            f"{world} processes; lower per_device_batch_size or gradient_accumulation_steps"
        )
    total_steps = config.max_steps if config.max_steps is not None else config.num_epochs * steps_per_epoch
    effective_batch_size = config.per_device_batch_size * batches_per_step * world
    accumulated = f" x {batches_per_step} accumulated" if batches_per_step > 1 else ""
    accelerator.print(
        f"effective batch {effective_batch_size} ({config.per_device_batch_size} per process{accumulated} x {world} "
        f"processes) at lr {config.learning_rate:g}; the paper's: 2 at 1e-5 (FinetuneConfig)"
    )

    global_step, epoch, epoch_step = 0, 0, 0  # epoch_step: optimizer steps taken in `epoch`
    losses: list[tuple[int, float]] = []
    if resume_from_checkpoint is not None:
        accelerator.load_state(str(resume_from_checkpoint))
        global_step, epoch, epoch_step = trainer_state["global_step"], trainer_state["epoch"], trainer_state["epoch_step"]
        losses = [tuple(entry) for entry in trainer_state["losses"]]
        accelerator.print(f"resumed from {resume_from_checkpoint} at step {global_step}")

    progress = tqdm(total=total_steps, initial=global_step, desc="finetune", disable=not accelerator.is_local_main_process)
    rank = accelerator.process_index
    while global_step < total_steps:
        # A streamed epoch of unknown length ends when a process runs out (max_steps bounds the run).
        epoch_batches = steps_per_epoch * batches_per_step if num_views is not None else None
        batches = _epoch_batches(
            dataloader, accelerator, epoch, epoch_step * batches_per_step, epoch_batches, stream, batches_per_step
        )
        batch_index = global_step * batches_per_step
        step_loss = 0.0
        for batch in batches:
            with accelerator.accumulate(student):
                images, targets, masks = random_hflip(
                    batch["images"],
                    batch["targets"],
                    batch["masks"],
                    config.flip_probability,
                    _flip_generator(config.seed, batch_index, rank),
                )
                pixel_values = backbones.normalize(images.float() / 255.0, backbone_config)
                output = student(pixel_values)
                loss = masked_l1(output.float(), targets.float(), masks.float())
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(student.parameters(), config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            batch_index += 1
            step_loss = step_loss + loss.detach() / batches_per_step
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            epoch_step += 1
            progress.update(1)

            if global_step % config.logging_steps == 0 or global_step == total_steps:
                mean_loss = accelerator.gather(step_loss[None]).mean().item()
                losses.append((global_step, mean_loss))
                progress.set_postfix(loss=f"{mean_loss:.4f}")
                if accelerator.is_main_process:
                    progress.write(f"step {global_step}/{total_steps} epoch {epoch} loss {mean_loss:.5f}")  # keeps the bar intact
                accelerator.log({"train/loss": mean_loss, "train/epoch": epoch}, step=global_step)
            step_loss = 0.0
            if config.checkpointing_steps and global_step % config.checkpointing_steps == 0:
                state = {
                    "global_step": global_step,
                    "epoch": epoch,
                    "epoch_step": epoch_step,
                    "losses": losses,
                    "config": asdict(config),
                    PROVENANCE_KEY: provenance,
                }
                _save_checkpoint(accelerator, output_dir, state, config.checkpoints_total_limit)
            if global_step >= total_steps:
                break
        else:
            if epoch_step == 0:
                raise ValueError(f"epoch {epoch} gave no full step on some process; the dataset is too small for this batch")
            epoch, epoch_step = epoch + 1, 0
    progress.close()

    accelerator.wait_for_everyone()
    rank_checksums = gather_object([backbones.weights_checksum(accelerator.unwrap_model(student).backbone)])
    if len(set(rank_checksums)) != 1:
        raise RuntimeError(f"processes ended with different weights (checksums {rank_checksums}); DDP did not synchronise")
    training_info = {
        "dataset": dataset_source,
        "dataset_metadata": targets_metadata(dataset),
        "backbone": name,
        "config": asdict(config),
        "normalization": backbones.normalization_of(model.config),
        "effective_batch_size": effective_batch_size,
        "num_views": num_views,
        "frozen_parameters": frozen,
        "global_step": global_step,
        "num_processes": len(rank_checksums),
        "rank_checksums": rank_checksums,
        "losses": losses,
        PROVENANCE_KEY: provenance,
    }
    if accelerator.is_main_process:
        _save_model(model, output_dir, training_info)
    accelerator.wait_for_everyone()
    claim.close()
    accelerator.end_training()
    return FinetuneResult(
        model=model,
        output_dir=output_dir,
        global_step=global_step,
        losses=losses,
        rank_checksums=rank_checksums,
        training_info=training_info,
    )


def _check_config(config: FinetuneConfig) -> None:
    """Refuse settings that would train nothing or lose the checkpoints, naming the option."""
    limits = (
        ("max_steps", config.max_steps, 1, "a model saved after no step would be called fine-tuned"),
        ("num_epochs", config.num_epochs, 1, "a model saved after no step would be called fine-tuned"),
        ("per_device_batch_size", config.per_device_batch_size, 1, "views per process per batch"),
        ("gradient_accumulation_steps", config.gradient_accumulation_steps, 1, "batches per optimizer step"),
        ("shuffle_buffer_size", config.shuffle_buffer_size, 1, "views each process holds to shuffle a stream"),
        ("checkpoints_total_limit", config.checkpoints_total_limit, 1, "0 would delete every checkpoint"),
        ("checkpointing_steps", config.checkpointing_steps, 0, "0 means never"),
        ("logging_steps", config.logging_steps, 1, "the loss is logged every this many steps"),
    )
    for name, value, least, why in limits:
        if value is not None and value < least:
            raise InputError(f"{name} is {value}; it must be at least {least} ({why})")


def _resume_point(output_dir: Path, resume: str | os.PathLike | None) -> Path | None:
    """The checkpoint to resume from (`resume`, with "latest" resolved), after refusing an output
    folder that holds a finished model, another run's checkpoints or other files."""
    latest = latest_checkpoint(output_dir)
    has_model = (output_dir / TRAINING_INFO_FILE).is_file() or (output_dir / "config.json").is_file()
    if resume == "latest":
        if latest is not None:
            return latest
        resume = None
    if resume is None:
        if latest is not None and has_model:
            raise OutputError(
                f"{output_dir} already holds a fine-tuned model (and its checkpoints); choose another --output_dir, "
                "or delete it to fine-tune again (fine-tuning never overwrites a model)"
            )
        if latest is not None:
            raise OutputError(
                f"{output_dir} holds the checkpoints of an unfinished run ({latest.name}); continue it with "
                "--resume_from_checkpoint latest, or choose another --output_dir (a new run never deletes them)"
            )
        if has_model:
            raise OutputError(
                f"{output_dir} already holds a fine-tuned model; choose another --output_dir, or delete it to "
                "fine-tune again (fine-tuning never overwrites a model)"
            )
        other = sorted(
            entry.name
            for entry in (output_dir.iterdir() if output_dir.is_dir() else [])
            if entry.name not in ("checkpoints", LOCK_FILE) and TMP_MARK not in entry.name
        )
        if other:
            raise OutputError(
                f"{output_dir} is not empty ({', '.join(other[:5])}); fine-tuning writes a model folder there: "
                "choose a new or empty --output_dir"
            )
        return None
    path = Path(resume)
    if not (path / TRAINER_STATE_FILE).is_file():
        raise InputNotFoundError(f"{path} is not a finetune checkpoint (no {TRAINER_STATE_FILE})")
    if latest is not None and path.resolve().parent != (output_dir / "checkpoints").resolve():
        raise OutputError(
            f"{output_dir} holds the checkpoints of another run ({latest.name}) than {path}; resume into the folder "
            "the checkpoint belongs to, or choose another --output_dir"
        )
    if latest is None and has_model:
        raise OutputError(f"{output_dir} already holds a fine-tuned model; choose another --output_dir")
    return path


def _open_targets(source: str, streaming: bool = False) -> datasets.Dataset | datasets.IterableDataset:
    """`load_targets(source, streaming=streaming)`, with errors that name the dataset and the fix."""
    check_source(source, "targets dataset")
    try:
        return load_targets(source, streaming=streaming)
    except UserError:
        raise
    except FileNotFoundError as error:
        if os.path.exists(source):
            raise InputNotFoundError(f"targets dataset {source}: {error}; pass the folder `fit3d render` wrote") from error
        raise hub_error(source, "targets dataset", error) from error
    except ConnectionError as error:
        raise hub_error(source, "targets dataset", error) from error
    except (OSError, ValueError) as error:  # pyarrow's errors for truncated files are ValueErrors
        raise InputError(
            f"targets dataset {source}: cannot be read ({type(error).__name__}: {str(error)[:200]}); a file may be "
            "truncated: render it again (`fit3d render`)"
        ) from error


def _check_targets_backbone(metadata: dict, identity: dict, source: str | None) -> None:
    """Refuse targets rendered for another backbone (other weights) than the one fine-tuned."""
    recorded = (metadata.get(PROVENANCE_KEY) or {}).get("backbone")
    artifact = f"the targets dataset {source}" if source else "the targets dataset"
    if recorded is None:
        logger.warning(
            "%s records no provenance (not made by `fit3d render`, or by an older one): its backbone is not checked", artifact
        )
        return
    check_backbone(
        recorded,
        identity,
        artifact=artifact,
        fix=(
            "fine-tune the backbone the targets were rendered for (the --backbone and --seed given to `fit3d render`), "
            "or render targets for this backbone"
        ),
    )


def _targets_identity(dataset: datasets.Dataset | datasets.IterableDataset) -> dict:
    """What identifies a targets dataset for a fine-tuning run: size, shape and a hash of its metadata."""
    metadata = targets_metadata(dataset)
    return {
        "num_rows": _num_views(dataset),
        "target_shape": list(target_shape(dataset)),
        "metadata_sha256": hashlib.sha256(json.dumps(metadata, sort_keys=True).encode()).hexdigest() if metadata else None,
    }


def _save_model(model: FiT3DModel, output_dir: Path, training_info: dict) -> None:
    """Write the FiT3DModel folder atomically. The sub-folders the run left in `output_dir`
    (checkpoints, tracker logs) are carried into the new folder; files of an earlier save are replaced.
    The backbone's `_name_or_path` is kept only when it is not a local path (a Hub id, a built-in name)."""
    # A published config must not carry a path of this machine; a Hub id or a built-in name stays.
    name = model.config.backbone_config._name_or_path or ""
    model.config.backbone_config._name_or_path = "" if os.path.isabs(name) or os.path.exists(name) else name
    with atomic_directory(output_dir, overwrite=True) as staging:
        model.save_pretrained(staging)
        backbones.make_image_processor(model.config).save_pretrained(staging)
        (staging / TRAINING_INFO_FILE).write_text(json.dumps(training_info, indent=2))
        if output_dir.is_dir():
            for entry in output_dir.iterdir():
                if entry.is_dir() and not (staging / entry.name).exists():
                    os.replace(entry, staging / entry.name)
