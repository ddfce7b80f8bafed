"""Probe benchmark: original vs FiT3D features, with controls, over several probe seeds.

The entry point evaluates a FiT3DModel folder (what `fit3d evaluate` runs):

```python
from fit3d_hf.evaluation import BenchmarkConfig, EvaluationArguments, evaluate

# a paper dataset with its official probe pipelines (protocol "paper", chosen by the default "auto")
evaluate(EvaluationArguments(output_dir="runs/scannetpp", model="fit3d-model", dataset="scannetpp", data_root="eval_data/scannetpp"),
         BenchmarkConfig())
# synthetic rooms on a CPU in minutes (protocol "fixed")
evaluate(EvaluationArguments(output_dir="runs/eval", model="fit3d-model"), BenchmarkConfig.cpu_preset())
```

It builds the sources (the original backbone or `baseline`, the FiT3DModel, and the controls),
loads the dataset `dataset` names, runs the benchmark per task and writes
`<output_dir>/results.json` and `results.md` (`report.write_report`). Underneath, any frozen
feature sources can be compared:

```python
from fit3d_hf.evaluation import BenchmarkConfig, benchmark_on_scenes, write_report

sources = {                                   # name -> frozen feature source
    "original": backbone,                     # a transformers backbone (the baseline)
    "fit3d": fit3d_model,                     # a FiT3DModel (its assembly decides the features)
    "finetuned_only": fit3d_finetuned_alone,  # controls: any model, or a list of models whose
    "blur_control": blur_finetuned,           #   features are concatenated channel-wise,
    "concat_random": [backbone, random_vit],  #   e.g. original + an unrelated random-init ViT
}
results = benchmark_on_scenes(sources, train_scenes, test_scenes, BenchmarkConfig.cpu_preset(),
                              roles={"original": "baseline", "fit3d": "fit3d"})
write_report(results, "runs/eval")           # results.json + results.md
```

`benchmark_on_scenes` trains probes on every view of the training scenes and tests them on
every view of unseen scenes (probes trained and tested on one room partly memorise it), and
measures multi-view correspondence recall on the test scenes. `run_benchmark` does the same
over any `EvalDataset` pair (see `evaluation.data`). Two protocols (`BenchmarkConfig.protocol`):
"paper" trains each probe on the dataset's official augmented crops, their features computed
every step, and tests with the official sliding windows or flip averaging
(`evaluation.pipelines`); "fixed" extracts every source's features once per image at one size
(frozen, eval mode) and reuses them for every probe seed. With `cache_dir`, finished probe runs
(and the fixed protocol's features) are kept on disk, so an interrupted benchmark resumes.
What a probe sees is `evaluation.features.source_features`.
"""

import copy
import functools
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from .. import __version__, backbones
from ..backbone_specs import hub_id_of, load_backbone_spec, load_fit3d_folder
from ..errors import InputError, InputNotFoundError, ProvenanceError, ResultsError
from ..finetune import TRAINING_INFO_FILE
from ..io import atomic_write, atomic_write_json, check_output_folder, remove_stale_temporaries
from ..modeling_fit3d import FiT3DModel
from ..provenance import PROVENANCE_KEY, backbone_identity, check_backbone, check_source, hub_error, weight_files_sha256
from ..scenes import IGNORE_LABEL, load_scene, synthetic
from .correspondence import correspondence_recall, view_pairs
from .data import PAPER_DATASETS, EvalDataset, from_hf_dataset, from_scenes, load_eval_dataset, load_hf_splits
from .features import FEATURES_RULE, FeatureSource, extract_source_features, source_features, source_models, source_patch_size
from .heads import DEPTH_LOSSES, SEGMENTATION_LOSSES
from .metrics import DEPTH_HIGHER_IS_BETTER, DEPTH_KEYS, DepthMetrics, MeanIoU
from .pipelines import Pipeline, pad_batch
from .report import write_report
from .training import ProbeBatch, ProbeConfig, build_head, cached_batches, predict, predict_raw, train_probe

SEG_METRICS = ("mean_iou", "mean_accuracy", "overall_accuracy")
PROTOCOLS = ("auto", "paper", "fixed")


def _arg(text: str, default=None, *, factory=None):
    """A dataclass field with `--help` text (HfArgumentParser reads `metadata["help"]`)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class BenchmarkConfig:
    """Protocol of the probe benchmark. The defaults are the official linear probes' (FiT3D's
    `evaluation/configs`, DINOv2's protocol; see docs/protocol.md) with `protocol="paper"`: each
    dataset's official augmentation and test (`EvalDataset.pipelines`). `protocol="fixed"`
    extracts features once per image at `image_height` × `image_width` instead; `cpu_preset()`
    is that on synthetic rooms, in minutes."""

    protocol: str = _arg(
        "auto (default): paper for the paper datasets, fixed for other data. "
        "paper: the dataset's official pipelines — probes train on augmented crops whose features are computed "
        "every step, and test with sliding windows (segmentation) or flip averaging (depth); needs a paper dataset. "
        "fixed: features once per image at image_height x image_width, no augmentation, whole-image test (fast, "
        "not comparable to the paper).",
        "auto",
    )
    image_height: int = _arg(
        "fixed: height fed to every source, rounded down to a multiple of its patch size (labels keep their own size).", 448
    )
    image_width: int = _arg("fixed: width fed to every source, rounded down likewise.", 448)
    tasks: list[str] = _arg(
        "Any of segmentation, depth, correspondence.", factory=lambda: ["segmentation", "depth", "correspondence"]
    )
    seeds: list[int] = _arg("Probe seeds; results report their mean and std.", factory=lambda: [0, 1, 2])
    seg_iterations: int = _arg("Segmentation probe: optimizer steps.", 40000)
    seg_batch_size: int = _arg("Segmentation probe: images per step and process.", 16)
    seg_lr: float = _arg("Segmentation probe: AdamW lr (poly schedule, power 1).", 1e-3)
    seg_weight_decay: float = _arg("Segmentation probe: AdamW weight decay.", 1e-4)
    seg_warmup_iterations: int = _arg("Segmentation probe: linear warm-up steps (factor from 1e-6 to 1).", 1500)
    seg_loss_mean_over: str = _arg(
        "Segmentation probe: cross-entropy averaged over all_pixels (ignored and padded ones count 0, as mmseg 0.27) "
        "or labelled_pixels.",
        "all_pixels",
    )
    depth_iterations: int = _arg("Depth probe: optimizer steps.", 38400)
    depth_batch_size: int = _arg("Depth probe: images per step and process.", 16)
    depth_lr: float = _arg("Depth probe: AdamW lr (cosine schedule).", 1e-4)
    depth_weight_decay: float = _arg("Depth probe: AdamW weight decay.", 1e-2)
    depth_warmup_iterations: int = _arg("Depth probe: linear warm-up steps (factor from 1e-3 to 1).", 12800)
    depth_min_lr_ratio: float = _arg("Depth probe: final lr of the cosine schedule, relative to depth_lr.", 1e-8)
    depth_sig_warmup_iterations: int = _arg(
        "Depth probe: steps during which SigLoss keeps only its mean term (mmdepth warm-up).", 100
    )
    depth_loss: str = _arg(
        "Depth probe: sigloss (what the official probes effectively train: their gradient term is exactly 0 at 2 "
        "images per GPU) or sigloss+gradient (adds 0.5 x our corrected gradient loss: a deviation).",
        "sigloss",
    )
    depth_loss_group_size: int | None = _arg(
        "Depth probe: images per loss term, averaged over the batch's groups, as data-parallel training with this "
        "many images per GPU (official: 2); unset: the whole batch at once.",
        2,
    )
    depth_max_grad_norm: float | None = _arg("Depth probe: clip the gradient norm to this; unset: no clipping.", 35.0)
    depth_momentum_cycle: bool = _arg(
        "Depth probe: mmcv's OneCycle momentum (AdamW beta1 0.95 -> 0.85 over the first 0.3 of the steps, back to 0.95); false: beta1 0.9.",
        True,
    )
    feature_batch_size: int = _arg("Images (or windows) per forward pass when testing and extracting features.", 8)
    dataloader_num_workers: int = _arg("paper: processes that load and augment training images (per process).", 4)
    correspondence_thresholds_px: list[float] = _arg(
        "Pixel radii of the correspondence recall.", factory=lambda: [4.0, 8.0, 16.0]
    )
    correspondence_pair_offsets: list[int] = _arg(
        "View pairs (i, i + k) per test scene for the correspondence metric.", factory=lambda: [1, 2]
    )
    cache_dir: str | None = _arg(
        "Keep extracted features and finished probe runs here, to resume (default: <output_dir>/cache).", None
    )
    progress: bool = _arg("Show progress bars.", True)

    def __post_init__(self) -> None:
        choices = {
            "protocol": PROTOCOLS,
            "seg_loss_mean_over": SEGMENTATION_LOSSES,
            "depth_loss": DEPTH_LOSSES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"BenchmarkConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")

    @classmethod
    def cpu_preset(cls, **overrides) -> "BenchmarkConfig":
        """Synthetic-room benchmark on a CPU in minutes: the `fixed` protocol, 120×160 rooms fed at
        96×128, short probe runs (their loss and optimiser as before the official ones were added)."""
        values = dict(
            protocol="fixed",
            image_height=96,
            image_width=128,
            seg_iterations=300,
            seg_batch_size=8,
            seg_warmup_iterations=20,
            seg_loss_mean_over="labelled_pixels",
            depth_iterations=200,
            depth_batch_size=4,
            depth_warmup_iterations=20,
            depth_min_lr_ratio=0.0,
            depth_sig_warmup_iterations=10,
            depth_loss="sigloss+gradient",
            depth_loss_group_size=None,
            depth_max_grad_norm=None,
            depth_momentum_cycle=False,
            correspondence_thresholds_px=[8.0, 16.0, 32.0],
        )
        values.update(overrides)
        return cls(**values)

    def probe_config(self, task: str) -> ProbeConfig:
        """The optimisation of the `task` probe ("segmentation" or "depth")."""
        if task == "segmentation":
            return ProbeConfig(
                "segmentation",
                self.seg_iterations,
                self.seg_batch_size,
                self.seg_lr,
                self.seg_weight_decay,
                "poly",
                self.seg_warmup_iterations,
                warmup_ratio=1e-6,
                loss=self.seg_loss_mean_over,
            )
        return ProbeConfig(
            "depth",
            self.depth_iterations,
            self.depth_batch_size,
            self.depth_lr,
            self.depth_weight_decay,
            "cosine",
            self.depth_warmup_iterations,
            warmup_ratio=1e-3,
            min_lr_ratio=self.depth_min_lr_ratio,
            sig_warmup_iterations=self.depth_sig_warmup_iterations,
            max_grad_norm=self.depth_max_grad_norm,
            momentum_cycle=(0.85, 0.95, 0.3) if self.depth_momentum_cycle else None,
            loss=self.depth_loss,
            loss_group_size=self.depth_loss_group_size,
        )


def input_size(source: FeatureSource, config: BenchmarkConfig) -> tuple[int, int]:
    """(H, W) fed to a source by the `fixed` protocol: the configured size rounded down to every model's patch size."""
    patch = source_patch_size(source)
    if config.image_height < patch or config.image_width < patch:
        raise ValueError(f"image size {config.image_height}x{config.image_width} is smaller than the patch size {patch}")
    return backbones.input_size(config.image_height, config.image_width, patch)


def describe_source(source: FeatureSource, config: BenchmarkConfig) -> dict:
    """What the protocol records about a source: models, assembly, normalisation, input size."""
    models = []
    for model in source_models(source):
        mean, std = backbones.image_mean_std(model.config)
        models.append(
            {
                "class": type(model).__name__,
                "family": backbones.family_of(model.config),
                "assembly": getattr(model.config, "assembly", None),
                "hidden_size": backbones.hidden_size_of(model.config),
                "patch_size": backbones.patch_size_of(model.config),
                "normalisation": {"mean": list(mean), "std": list(std)},
                "name_or_path": getattr(model.config, "_name_or_path", "") or None,
            }
        )
    return {
        "models": models,
        "combination": "concat" if len(models) > 1 else "single",
        # paper: the pipelines' crops and windows, centre-padded to a multiple of the patch size
        "input_size": list(input_size(source, config)) if config.protocol == "fixed" else None,
    }


def _cache_key(*parts) -> str:
    return hashlib.sha256(json.dumps([__version__, *parts], default=str).encode()).hexdigest()[:16]


class _Images:
    """The images of an EvalDataset, read one at a time."""

    def __init__(self, data: EvalDataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.data[index]["image"]


def _cached(path: Path | None, compute):
    if path is not None and path.is_file():
        return load_file(path)
    value = compute()
    if path is not None:
        atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in value.items()}, str(tmp)))
    return value


TARGET_KEYS = {"segmentation": "semantics", "depth": "depth_m"}
# the probe's inputs per task: (patch features, CLS token) keys of `BackboneFeatures`
PROBE_INPUTS = {"segmentation": ("feature_maps", None), "depth": ("unnormed_feature_maps", "unnormed_cls_token")}


def training_targets(data: EvalDataset, tasks: list[str], size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Targets `[N, H, W]` per task at the features' input size, read in one pass: nearest
    resizing keeps labels and depths exact values; labels are stored as uint8 (255 = ignore)."""
    out = {"segmentation": torch.empty(len(data), *size, dtype=torch.uint8), "depth": torch.empty(len(data), *size)}
    for i in range(len(data)):
        item = data[i]
        for task in tasks:
            out[task][i] = F.interpolate(item[TARGET_KEYS[task]][None, None].float(), size=size, mode="nearest")[0, 0]
    return {task: out[task] for task in tasks}


def _seeded_generator(*numbers: int) -> torch.Generator:
    """A generator seeded from a tuple of integers (a 63-bit hash of them)."""
    digest = hashlib.sha256(json.dumps(numbers).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


class AugmentedSamples(torch.utils.data.Dataset):
    """The training samples one process draws with the `paper` protocol, in order.

    Sample j of process p is the k-th of the global stream (k = (step · P + p) · B + b): image
    `order(epoch)[k mod N]` of a seeded random permutation per epoch (every image once per epoch,
    as the official shuffled sampler), augmented by `pipeline.train_sample` with a generator
    seeded by (seed, k) — the same samples whatever the number of loader workers.
    """

    def __init__(
        self,
        data: EvalDataset,
        pipeline: Pipeline,
        *,
        batch_size: int,
        iterations: int,
        seed: int,
        process_index: int = 0,
        num_processes: int = 1,
    ):
        self.data, self.pipeline, self.batch_size, self.iterations = data, pipeline, batch_size, iterations
        self.seed, self.process_index, self.num_processes = seed, process_index, num_processes
        self._orders: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.iterations * self.batch_size

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            self._orders = {epoch: torch.randperm(len(self.data), generator=_seeded_generator(self.seed, -1, epoch))}
        return self._orders[epoch]

    def __getitem__(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= j < len(self):
            raise IndexError(f"sample {j} of {len(self)}")
        step, b = divmod(j, self.batch_size)
        k = (step * self.num_processes + self.process_index) * self.batch_size + b
        epoch, position = divmod(k, len(self.data))
        item = self.data[int(self._order(epoch)[position])]
        return self.pipeline.train_sample(item["image"], item[TARGET_KEYS[self.pipeline.task]], _seeded_generator(self.seed, k))


def augmented_batches(
    source: FeatureSource,
    data: EvalDataset,
    pipeline: Pipeline,
    config: ProbeConfig,
    *,
    seed: int,
    accelerator: Accelerator,
    num_workers: int = 0,
):
    """`ProbeBatch`es of the `paper` protocol: augmented crops (`AugmentedSamples`), padded to the
    crop size, through the frozen source on the accelerator's device every step."""
    samples = AugmentedSamples(
        data,
        pipeline,
        batch_size=config.batch_size,
        iterations=config.iterations,
        seed=seed,
        process_index=accelerator.process_index,
        num_processes=accelerator.num_processes,
    )
    fill = 255 if pipeline.task == "segmentation" else 0
    loader = torch.utils.data.DataLoader(
        samples,
        batch_size=config.batch_size,
        num_workers=num_workers,
        collate_fn=functools.partial(pad_batch, size=pipeline.crop_size, fill=fill),
        pin_memory=accelerator.device.type == "cuda",
    )
    feature_key, cls_key = PROBE_INPUTS[pipeline.task]
    for images, valid, targets in loader:
        features = source_features(source, images.to(accelerator.device), valid=valid.to(accelerator.device))
        yield ProbeBatch(features[feature_key], targets, None if cls_key is None else features[cls_key])


def _summary(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=False)) if len(values) > 1 else 0.0


def _new_metric(task: str, data: EvalDataset):
    if task == "segmentation":
        return MeanIoU(num_labels=data.num_labels, keep_in_memory=True)
    return DepthMetrics(max_depth=data.max_depth, min_depth=data.min_depth, keep_in_memory=True)


def _scores(task: str, metric) -> dict[str, float]:
    out = metric.compute()
    return {key: out[key] for key in (SEG_METRICS if task == "segmentation" else DEPTH_KEYS)}


def _score(head, task: str, features: dict, test_data: EvalDataset) -> dict[str, float]:
    """`fixed` protocol: test metrics of a trained probe on cached features, one image at a time at its own label size."""
    metric = _new_metric(task, test_data)
    feature_key, cls_key = PROBE_INPUTS[task]
    for i in range(len(test_data)):
        target = test_data[i][TARGET_KEYS[task]]
        cls = None if cls_key is None else features[cls_key][i : i + 1]
        pred = predict(head, features[feature_key][i : i + 1], tuple(target.shape), cls_token=cls)
        if task == "depth":
            # pixels outside the evaluation crop count as invalid ground truth
            target = torch.where(test_data.eval_mask(target), target, 0)
        metric.add_batch(predictions=pred, references=target[None])
    return _scores(task, metric)


@torch.no_grad()
def _score_paper(
    head, source: FeatureSource, task: str, test_data: EvalDataset, config: BenchmarkConfig, device
) -> dict[str, float]:
    """`paper` protocol: test metrics with the official test of each task.

    Segmentation: the image resized into the pipeline's scale, logits of each sliding window
    averaged where windows overlap, resized to the label size, argmax. Depth: the whole image
    (KB-cropped for KITTI) and its mirror image, predictions averaged, with the dataset's
    evaluation crop.
    """
    pipeline = test_data.pipelines[task]
    metric = _new_metric(task, test_data)
    feature_key, cls_key = PROBE_INPUTS[task]
    for i in range(len(test_data)):
        item = test_data[i]
        if task == "segmentation":
            image = pipeline.test_image(item["image"]).to(device)
            logits = torch.zeros(test_data.num_labels, *image.shape[-2:], device=device)
            count = torch.zeros(1, *image.shape[-2:], device=device)
            boxes = pipeline.windows(*image.shape[-2:])
            for start in range(0, len(boxes), config.feature_batch_size):
                chunk = boxes[start : start + config.feature_batch_size]
                crops = torch.stack([image[:, y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])
                out = predict_raw(head, source_features(source, crops)[feature_key], tuple(crops.shape[-2:]))
                for (y1, y2, x1, x2), window in zip(chunk, out):
                    logits[:, y1:y2, x1:x2] += window
                    count[:, y1:y2, x1:x2] += 1
            target = item["semantics"]
            logits = F.interpolate((logits / count)[None], size=tuple(target.shape), mode="bilinear", align_corners=False)
            pred = logits.argmax(1).cpu()
        else:
            image, target = pipeline.test_sample(item["image"], item["depth_m"])
            images = torch.stack([image, image.flip(-1)] if pipeline.test_flip else [image]).to(device)
            features = source_features(source, images)
            depth = predict_raw(head, features[feature_key], tuple(image.shape[-2:]), cls_token=features[cls_key])[:, 0]
            if pipeline.test_flip:
                depth = torch.stack([depth[0], depth[1].flip(-1)])
            pred = depth.mean(0, keepdim=True).cpu()
            target = torch.where(test_data.eval_mask(target), target, 0)  # outside the evaluation crop: invalid
        metric.add_batch(predictions=pred, references=target[None])
    return _scores(task, metric)


def _feature_widths(source: FeatureSource, task: str, device) -> tuple[int, int | None]:
    """(patch feature width, CLS width or None) of a source's probe input for `task`."""
    patch = source_patch_size(source)
    features = source_features(source, torch.zeros(1, 3, patch, patch, device=device))
    feature_key, cls_key = PROBE_INPUTS[task]
    return features[feature_key].shape[1], None if cls_key is None else features[cls_key].shape[1]


def _check_pipelines(data: EvalDataset, tasks: list[str]) -> None:
    missing = [t for t in tasks if t not in data.pipelines]
    if missing:
        raise ValueError(
            f"protocol 'paper' needs the official pipeline of {data.name!r} for {missing}; only the paper datasets "
            "(load_eval_dataset) have one: use protocol 'fixed' for other data"
        )


def run_benchmark(
    sources: dict[str, FeatureSource],
    train_data: EvalDataset,
    test_data: EvalDataset,
    config: BenchmarkConfig,
    *,
    roles: dict[str, str] | None = None,
    descriptions: dict[str, str] | None = None,
    correspondence_scenes: list | None = None,
    accelerator: Accelerator | None = None,
) -> dict:
    """Train and test linear probes for every source; return the results dict (see `evaluation.report`).

    With `config.protocol == "paper"` each probe trains on the official augmented crops of
    `train_data.pipelines[task]` (features computed every step) and is tested as that pipeline
    says; with "fixed", features are computed once per image at the configured size and cached.

    Args:
        sources: name -> a transformers backbone, a FiT3DModel, or a list of models whose
            features are concatenated (e.g. the "concat with a random-init backbone" control).
        train_data, test_data: `EvalDataset`s with the same labels (num_labels, max_depth).
        config: the protocol.
        roles: name -> "baseline" | "fit3d" | "control"; default: first source is the
            baseline, second is FiT3D, the rest are controls.
        descriptions: name -> one line saying what the source is (goes into the JSON).
        correspondence_scenes: `Scene`s with depth and cameras for the correspondence metric
            (measured at `image_height` × `image_width` with either protocol).
        accelerator: runs the probes (a CPU one is made when None).
    """
    if not sources:
        raise ValueError("no feature sources given")
    unknown_tasks = sorted(set(config.tasks) - {"segmentation", "depth", "correspondence"})
    if unknown_tasks:
        raise ValueError(f"unknown tasks {unknown_tasks} (segmentation, depth, correspondence)")
    if not config.seeds:
        raise ValueError("give at least one probe seed")
    names = list(sources)
    roles = dict(roles or {})
    for i, name in enumerate(names):
        roles.setdefault(name, "baseline" if i == 0 else "fit3d" if i == 1 else "control")
    bad_roles = {n: r for n, r in roles.items() if n not in sources or r not in ("baseline", "fit3d", "control")}
    if bad_roles:
        raise ValueError(f"bad roles {bad_roles}: names must be sources {names}, roles baseline/fit3d/control")
    accelerator = accelerator or Accelerator(cpu=not torch.accelerator.is_available())  # as in `finetune`
    cache = Path(config.cache_dir) if config.cache_dir else None
    probe_tasks = [t for t in ("segmentation", "depth") if t in config.tasks and t in train_data.tasks and t in test_data.tasks]
    if "segmentation" in probe_tasks and train_data.num_labels != test_data.num_labels:
        raise ValueError(f"train ({train_data.num_labels}) and test ({test_data.num_labels}) num_labels differ")
    if "segmentation" in probe_tasks and train_data.num_labels > 255:
        raise ValueError(f"{train_data.name}: at most 255 classes are supported, got {train_data.num_labels}")
    if config.protocol == "auto":
        official = all(task in data.pipelines for data in (train_data, test_data) for task in probe_tasks)
        config = replace(config, protocol="paper" if official else "fixed")
    paper = config.protocol == "paper"
    if paper:
        _check_pipelines(train_data, probe_tasks)
        _check_pipelines(test_data, probe_tasks)
    rows = []
    for name in names:
        source = sources[name]
        for model in source_models(source):
            model.eval().to(accelerator.device)
        show = config.progress and accelerator.is_main_process
        weights = backbones.weights_checksum(*source_models(source)) if cache else ""
        features, all_targets = {}, {}
        if probe_tasks and not paper:
            size = input_size(source, config)
            for split, data in (("train", train_data), ("test", test_data)):
                key = _cache_key(weights, FEATURES_RULE, data.name, len(data), size)
                path = cache / "features" / f"{name}-{split}-{key}.safetensors" if cache else None
                features[split] = _cached(
                    path,
                    functools.partial(
                        extract_source_features,
                        source,
                        _Images(data),
                        size,
                        batch_size=config.feature_batch_size,
                        device=accelerator.device,
                        progress=show,
                    ),
                )
            all_targets = training_targets(train_data, probe_tasks, size)
        for task in probe_tasks:
            probe = config.probe_config(task)
            feature_key, cls_key = PROBE_INPUTS[task]
            setting = asdict(train_data.pipelines[task]) if paper else input_size(source, config)
            run_key = _cache_key(
                weights,
                FEATURES_RULE,
                train_data.name,
                len(train_data),
                test_data.name,
                len(test_data),
                config.protocol,
                setting,
                asdict(probe),
            )
            per_seed: dict[str, list[float]] = {}
            for seed in config.seeds:
                run_path = cache / "runs" / f"{name}-{task}-{seed}-{run_key}.json" if cache else None
                if run_path is not None and run_path.is_file():
                    scores = json.loads(run_path.read_text())
                else:
                    if paper:
                        widths = _feature_widths(source, task, accelerator.device)
                    else:
                        train = features["train"]
                        widths = (train[feature_key].shape[1], None if cls_key is None else train[cls_key].shape[1])
                    torch.manual_seed(seed)
                    head = build_head(
                        task,
                        widths[0],
                        cls_channels=widths[1],
                        num_labels=train_data.num_labels,
                        max_depth=train_data.max_depth,
                        min_depth=train_data.min_depth,
                    ).to(accelerator.device)
                    if paper:
                        batches = augmented_batches(
                            source,
                            train_data,
                            train_data.pipelines[task],
                            probe,
                            seed=seed,
                            accelerator=accelerator,
                            num_workers=config.dataloader_num_workers,
                        )
                    else:
                        targets = all_targets[task].long() if task == "segmentation" else all_targets[task]
                        batches = cached_batches(
                            features["train"][feature_key],
                            targets,
                            probe.batch_size,
                            cls_token=None if cls_key is None else features["train"][cls_key],
                            seed=seed,
                            process_index=accelerator.process_index,
                        )
                    head = train_probe(head, batches, probe, accelerator=accelerator, progress=show, description=f"seed {seed}")
                    if paper:
                        scores = _score_paper(head, source, task, test_data, config, accelerator.device)
                    else:
                        scores = _score(head, task, features["test"], test_data)
                    if run_path is not None and accelerator.is_main_process:
                        run_path.parent.mkdir(parents=True, exist_ok=True)
                        atomic_write_json(run_path, scores, indent=None)
                for metric, value in scores.items():
                    per_seed.setdefault(metric, []).append(value)
            for metric, values in per_seed.items():
                mean, std = _summary(values)
                rows.append(
                    dict(
                        dataset=test_data.name,
                        split="test",
                        task=task,
                        metric=metric,
                        source=name,
                        values=values,
                        mean=mean,
                        std=std,
                        higher_is_better=task == "segmentation" or DEPTH_HIGHER_IS_BETTER.get(metric, False),
                    )
                )
        if "correspondence" in config.tasks and correspondence_scenes:
            rows += _correspondence_rows(
                name, source, input_size(source, config), correspondence_scenes, config, accelerator, test_data.name
            )

    protocol = {
        "package_version": __version__,
        "protocol": config.protocol,
        "image_size": None if paper else [config.image_height, config.image_width],
        "pipelines": {task: asdict(train_data.pipelines[task]) for task in probe_tasks} if paper else None,
        "train_dataset": {"name": train_data.name, "images": len(train_data)},
        "test_dataset": {
            "name": test_data.name,
            "images": len(test_data),
            "max_depth": test_data.max_depth,
            "num_labels": test_data.num_labels,
            "eval_crop": test_data.eval_crop,
        },
        "seeds": list(config.seeds),
        "segmentation_probe": asdict(config.probe_config("segmentation"))
        | {"head": "BatchNorm + 1x1 conv on normed last-layer patch features; CE ignore 255"},
        "depth_probe": asdict(config.probe_config("depth"))
        | {
            "head": "unnormed last-layer patches + the first backbone's unnormed CLS (FiT3D: [original, fine-tuned, "
            "original CLS]), x4 upsample, 1x1 conv to 256 bins"
        },
        "correspondence": {
            "thresholds_px": list(config.correspondence_thresholds_px),
            "pair_offsets": list(config.correspondence_pair_offsets),
            "scenes": [s.scene_id for s in correspondence_scenes or []],
        },
        "tasks": list(config.tasks),
        "features": (
            "computed every step from the pipeline's augmented crops, centre-padded to a patch multiple; "
            "test as the pipeline says"
            if paper
            else "extracted once per image at image_size, frozen, no augmentation, whole-image test"
        ),
        "device": str(accelerator.device),
        "num_processes": accelerator.num_processes,
    }
    return {
        "fit3d_hf_version": __version__,
        "protocol": protocol,
        "sources": {
            name: {
                "role": roles[name],
                "description": (descriptions or {}).get(name, ""),
                **describe_source(sources[name], config),
            }
            for name in names
        },
        "results": rows,
    }


def _correspondence_rows(name, source, size, scenes, config, accelerator, dataset_name) -> list[dict]:
    per_scene: dict[str, list[float]] = {}
    for scene in scenes:
        if scene.depth_m is None:
            raise ValueError(f"scene {scene.scene_id} has no depth_m: the correspondence metric needs depth and cameras")
        feats = extract_source_features(
            source, scene.images(), size, batch_size=config.feature_batch_size, device=accelerator.device
        )
        pairs = view_pairs(scene.num_views, config.correspondence_pair_offsets)
        scores = correspondence_recall(
            feats["feature_maps"],
            scene.depth_m,
            scene.intrinsics,
            scene.world_to_camera,
            pairs,
            config.correspondence_thresholds_px,
        )
        scores.pop("num_correspondences")
        for metric, value in scores.items():
            per_scene.setdefault(metric, []).append(value)
    rows = []
    for metric, values in per_scene.items():
        mean, std = _summary(values)
        rows.append(
            dict(
                dataset=dataset_name,
                split="test",
                task="correspondence",
                metric=metric,
                source=name,
                values=values,
                mean=mean,
                std=std,
                higher_is_better=True,
                spread="over test scenes (deterministic: no probe)",
            )
        )
    return rows


def benchmark_on_scenes(
    sources: dict[str, FeatureSource], train_scenes: list, test_scenes: list, config: BenchmarkConfig, **kwargs
) -> dict:
    """`run_benchmark` on posed scenes (e.g. `scenes.synthetic.make_rooms`): probes train on
    every view of `train_scenes` and are tested on every view of the unseen `test_scenes`,
    where the correspondence metric is measured too. kwargs go to `run_benchmark`."""
    # one depth range for both splits, so train and test probes share their bins
    depths = [float(s.depth_m.max()) for s in [*train_scenes, *test_scenes] if s.depth_m is not None]
    max_depth = float(int(max(depths)) + 1) if depths else None
    train = from_scenes(train_scenes, views="all", name="synthetic", max_depth=max_depth)
    test = from_scenes(test_scenes, views="all", name="synthetic", max_depth=max_depth)
    kwargs.setdefault("correspondence_scenes", list(test_scenes))
    return run_benchmark(sources, train, test, config, **kwargs)


@dataclass
class EvaluationArguments:
    """What `evaluate` compares, on which data, and where the report goes (the protocol is a
    `BenchmarkConfig`). `fit3d evaluate` parses both with `HfArgumentParser`."""

    output_dir: str = field(metadata={"help": "Where results.json, results.md and the cache go."})
    model: str = field(metadata={"help": "A FiT3DModel folder (from `fit3d finetune`) or Hub id."})
    baseline: str | None = field(
        default=None,
        metadata={
            "help": "Baseline backbone, named as for `fit3d lift --backbone` ('embedded', a folder or Hub id); default: the model's original backbone."
        },
    )
    blur_control: str | None = field(
        default=None, metadata={"help": "A FiT3DModel fine-tuned on single-view blurred targets (control ii)."}
    )
    controls: bool = field(
        default=True,
        metadata={"help": "Include the finetuned_only and concat_random controls (--no_controls leaves them out)."},
    )
    control_seed: int = field(default=1234, metadata={"help": "Seed of the random-init backbone of concat_random."})
    dataset: str = field(
        default="synthetic",
        metadata={
            "help": "synthetic, scannetpp, scannet, nyuv2, ade20k, voc2012, kitti, hf (--hf_dataset), or a Hub dataset id "
            "(namespace/name, read with datasets.load_dataset; the hf_* and column options apply)."
        },
    )
    data_root: str | None = field(default=None, metadata={"help": "Root of a paper dataset in its standard layout."})
    num_train_scenes: int = field(default=6, metadata={"help": "synthetic: rooms the probes train on."})
    num_test_scenes: int = field(default=2, metadata={"help": "synthetic: unseen rooms the probes are tested on."})
    scene_seed: int = field(
        default=1000, metadata={"help": "synthetic: seed of the first room (fine-tuning rooms use 0, 1, ...)."}
    )
    scene_views: int = field(default=24, metadata={"help": "synthetic: views per room."})
    scene_height: int = field(default=120, metadata={"help": "synthetic: image height."})
    scene_width: int = field(default=160, metadata={"help": "synthetic: image width."})
    correspondence_scenes: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Scene folders with depth (`fit3d_hf.scenes.load_scene`) on which to measure correspondence recall too."
        },
    )
    allow_external_paths: bool = field(
        default=False, metadata={"help": "Accept split files (paper datasets) that name files outside --data_root."}
    )
    hf_dataset: str | None = field(
        default=None,
        metadata={"help": "hf: a folder written by DatasetDict.save_to_disk, a folder of data files, or a Hub dataset id."},
    )
    hf_train_split: str = field(default="train", metadata={"help": "hf: training split."})
    hf_test_split: str = field(default="test", metadata={"help": "hf: test split."})
    image_column: str = field(default="image", metadata={"help": "hf: image column."})
    semantics_column: str | None = field(default=None, metadata={"help": "hf: label-map column (255 = ignore)."})
    depth_column: str | None = field(default=None, metadata={"help": "hf: depth-map column."})
    num_labels: int | None = field(default=None, metadata={"help": "hf: number of classes."})
    max_depth: float | None = field(default=None, metadata={"help": "hf: max depth in metres."})
    depth_scale: float = field(default=1.0, metadata={"help": "hf: stored depth / depth_scale = metres."})


def build_sources(args: EvaluationArguments) -> tuple[dict[str, FeatureSource], dict[str, str], dict[str, str]]:
    """(sources, roles, descriptions) of `args.model` and its controls, for `run_benchmark`.

    original        the frozen original backbone (or `args.baseline`)      role: baseline
    fit3d           the FiT3DModel as its config.assembly says             role: fit3d
    finetuned_only  the fine-tuned backbone alone, same width (`args.controls`)
    concat_random   [original, a random-init backbone of the same size] (`args.controls`)
    blur_control    the fine-tuned backbone of `args.blur_control` alone
    """
    model = load_fit3d_folder(args.model, "--model")
    _check_model_record(model, args.model)
    original, baseline_name = load_backbone_spec(args.baseline, args.control_seed) if args.baseline else (model.original, None)
    if args.baseline:
        check_backbone(
            backbone_identity(model.original),
            backbone_identity(original),
            artifact=f"--model {args.model} (its original backbone)",
            fix=(
                "leave --baseline out (the model's own original backbone is the baseline), or pass the backbone it "
                "was fine-tuned from (and its --control_seed, for a random one)"
            ),
        )
    sources = {"original": original, "fit3d": model}
    roles = {"original": "baseline", "fit3d": "fit3d"}
    descriptions = {
        "original": f"baseline backbone ({baseline_name or 'the original backbone of ' + args.model})",
        "fit3d": f"{args.model}, assembly {model.config.assembly}",
    }
    if args.controls:
        torch.manual_seed(args.control_seed)
        random_backbone = backbones.build_backbone(copy.deepcopy(model.config.backbone_config))
        sources["finetuned_only"] = model.finetuned
        sources["concat_random"] = [original, random_backbone]
        descriptions["finetuned_only"] = "control: the fine-tuned backbone alone (same width as the baseline)"
        descriptions["concat_random"] = f"control: [original, random-init backbone of the same size (seed {args.control_seed})]"
    if args.blur_control:
        blur_model = load_fit3d_folder(args.blur_control, "--blur_control")
        _check_model_record(blur_model, args.blur_control)
        check_backbone(
            backbone_identity(model.original),
            backbone_identity(blur_model.original),
            artifact=f"--model {args.model} (its original backbone)",
            fix=f"pass as --blur_control a model fine-tuned from the same backbone as --model (not {args.blur_control})",
        )
        sources["blur_control"] = blur_model.finetuned
        descriptions["blur_control"] = f"control: fine-tuned on single-view blurred targets ({args.blur_control}), alone"
    for name in sources:
        roles.setdefault(name, "control")
    return sources, roles, descriptions


def _check_model_record(model: FiT3DModel, path: str) -> None:
    """Refuse a model folder whose weights are not the ones its `fit3d_finetune.json` records
    (a folder modified or assembled from two runs); converted models record none."""
    record = Path(path) / TRAINING_INFO_FILE
    if not record.is_file():
        return
    info = json.loads(record.read_text())
    recorded = {
        "original": (info.get(PROVENANCE_KEY) or {}).get("backbone", {}).get("weights_sha256"),
        "finetuned": (info.get("rank_checksums") or [None])[0],
    }
    for half, checksum in recorded.items():
        if checksum is not None and checksum != backbones.weights_checksum(getattr(model, half)):
            raise ProvenanceError(
                f"--model {path}: its {half} backbone's weights are not the ones {record.name} records "
                f"({checksum[:12]}…); the folder was changed after `fit3d finetune` wrote it. Fine-tune again, or use "
                "the folder as fine-tuning wrote it"
            )


def _check_results(results: dict, config: BenchmarkConfig) -> None:
    """Refuse results that are empty or hold a value that is not a number (NaN), naming the rows."""
    rows = results["results"]
    if not rows:
        raise ResultsError(f"the benchmark produced no results for the tasks {config.tasks}: the dataset has none of them")
    bad = [row for row in rows if not all(math.isfinite(value) for value in row["values"])]
    if bad:
        listed = ", ".join(sorted({f"{row['source']}: {row['task']} {row['metric']}" for row in bad}))
        raise ResultsError(
            f"{len(bad)} result(s) are not numbers ({listed}). A depth metric is NaN when no test pixel has valid "
            "ground truth (check --depth_scale, --max_depth and the depth column); a segmentation metric when no "
            "test pixel is labelled. Nothing was written; features and finished probe runs are cached in "
            f"{config.cache_dir}, so a rerun with other --tasks reports the rest quickly"
        )


def _check_hf_split(data, split: str, column: str, path: str) -> None:
    """Refuse a `datasets` folder without the split `split`, saying what the folder holds."""
    from datasets import DatasetDict

    if not isinstance(data, DatasetDict):
        raise InputError(
            f"--hf_dataset {path} is a single dataset without splits; save a DatasetDict with a training and a test "
            f"split (names given by --hf_train_split / --hf_test_split)"
        )
    if split not in data:
        raise InputError(
            f"--hf_dataset {path} has no split {split!r} (its splits: {sorted(data)}); pass {column} with one of them"
        )


def _check_hf_labels(data: EvalDataset, split: str, args: EvaluationArguments) -> None:
    """Before any work: labels inside [0, num_labels) (or 255) and some valid depth, in an hf split."""
    has_depth = False
    for index in range(len(data)):
        item = data[index]
        if "semantics" in item:
            labels = item["semantics"]
            bad = labels[(labels != IGNORE_LABEL) & ((labels < 0) | (labels >= data.num_labels))]
            if bad.numel():
                raise InputError(
                    f"--hf_dataset {args.hf_dataset} split {split!r}, row {index}: labels {bad.unique()[:10].tolist()} "
                    f"in --semantics_column {args.semantics_column} are outside 0..{data.num_labels - 1} "
                    f"(255 = ignore); give --num_labels large enough"
                )
        if "depth_m" in item:
            has_depth = has_depth or bool(data.eval_mask(item["depth_m"]).any())
    if data.has_depth and not has_depth:
        raise InputError(
            f"--hf_dataset {args.hf_dataset} split {split!r}: no pixel of --depth_column {args.depth_column} is a valid "
            f"depth (between {data.min_depth} and --max_depth {data.max_depth} m after dividing by --depth_scale "
            f"{args.depth_scale}); check those options"
        )


def _paper_tasks(args: EvaluationArguments, config: BenchmarkConfig) -> list[str]:
    """The probe tasks of `config.tasks` that the paper dataset `args.dataset` has."""
    return [t for t in ("segmentation", "depth") if t in config.tasks and t in PAPER_DATASETS[args.dataset]]


def evaluate(args: EvaluationArguments, config: BenchmarkConfig) -> dict:
    """Benchmark a FiT3DModel folder against its original backbone and the controls.

    Builds the sources (`build_sources`), loads the data `args.dataset` names — procedural rooms
    (probes train on `num_train_scenes` rooms and are tested on `num_test_scenes` unseen ones,
    where correspondence is measured too), a `datasets` dataset (a Hub id, or `hf` with a folder or Hub id; `load_hf_splits`), or a paper dataset under
    `data_root`, benchmarked task by task and merged into one results dict — runs `run_benchmark`
    on one accelerator, writes `<output_dir>/results.json` and `results.md` (main process) and
    returns the results dict (see `evaluation.report`). Finished probe runs (and, with the
    `fixed` protocol, extracted features) are cached in `config.cache_dir` (default
    `<output_dir>/cache`), so a rerun resumes. `config.protocol` "paper" runs each paper
    dataset's official pipelines; synthetic rooms and `datasets` datasets have none and need "fixed";
    "auto" (the default) chooses between the two by the dataset.
    """
    if args.dataset == "hf" and args.hf_dataset is None:
        raise InputError("EvaluationArguments: dataset 'hf' needs hf_dataset (a save_to_disk folder, a data folder or a Hub id)")
    # `datasets` data: --dataset hf --hf_dataset X, or --dataset <Hub id>
    hf_source = args.hf_dataset if args.dataset == "hf" else hub_id_of(args.dataset)
    paper = args.dataset != "synthetic" and hf_source is None
    if paper and args.dataset not in PAPER_DATASETS:
        raise InputError(
            f"EvaluationArguments: unknown dataset {args.dataset!r}; known: synthetic, hf, {', '.join(PAPER_DATASETS)}, "
            "or a Hub dataset id (namespace/name)"
        )
    if paper and args.data_root is None:
        raise InputError(f"EvaluationArguments: dataset {args.dataset!r} needs data_root")
    if paper and not _paper_tasks(args, config):
        raise InputError(f"EvaluationArguments: dataset {args.dataset!r} has none of the tasks {config.tasks}")
    if not paper and config.protocol == "paper":
        raise InputError(
            f"BenchmarkConfig: protocol 'paper' runs the official pipelines of the paper datasets ({', '.join(PAPER_DATASETS)}); "
            f"dataset {args.dataset!r} has none: use protocol 'fixed' or 'auto' (e.g. --config recipes/configs/evaluate_synthetic_cpu.yaml)"
        )
    check_output_folder(args.output_dir, what="the evaluation output folder")
    if config.cache_dir is None:
        config = replace(config, cache_dir=os.path.join(args.output_dir, "cache"))
    for folder in (args.output_dir, *(os.path.join(config.cache_dir, part) for part in ("features", "runs"))):
        remove_stale_temporaries(folder)
    hf_data = None
    if hf_source is not None:
        check_source(hf_source, "--hf_dataset")
        if os.path.exists(hf_source) and not os.path.isdir(hf_source):
            raise InputNotFoundError(f"--hf_dataset {hf_source}: not a folder (a save_to_disk folder, a data folder or a Hub id)")
        try:
            hf_data = load_hf_splits(hf_source)
        except (OSError, ValueError) as error:  # not cached offline, no such repo, no data files
            if os.path.isdir(hf_source):
                raise InputError(f"--hf_dataset {hf_source}: not a dataset folder ({error})") from error
            raise hub_error(hf_source, "--hf_dataset", error) from error
        for split, option in ((args.hf_train_split, "--hf_train_split"), (args.hf_test_split, "--hf_test_split")):
            _check_hf_split(hf_data, split, option, hf_source)
    sources, roles, descriptions = build_sources(args)
    accelerator = Accelerator(cpu=not torch.accelerator.is_available())  # as in `finetune`
    kwargs = dict(roles=roles, descriptions=descriptions, accelerator=accelerator)
    loaded = [load_scene(path) for path in args.correspondence_scenes]
    if loaded:
        kwargs["correspondence_scenes"] = loaded
    if args.dataset == "synthetic":
        size = dict(num_views=args.scene_views, height=args.scene_height, width=args.scene_width)
        train = synthetic.make_rooms(args.num_train_scenes, seed=args.scene_seed, **size)
        test = synthetic.make_rooms(args.num_test_scenes, seed=args.scene_seed + args.num_train_scenes, **size)
        kwargs["correspondence_scenes"] = test + loaded
        results = benchmark_on_scenes(sources, train, test, config, **kwargs)
    elif hf_data is not None:
        data = hf_data
        columns = dict(
            image_column=args.image_column,
            semantics_column=args.semantics_column,
            depth_column=args.depth_column,
            num_labels=args.num_labels,
            max_depth=args.max_depth,
            depth_scale=args.depth_scale,
        )
        # A Hub id names the results rows, so that cards link them to the dataset.
        name = hub_id_of(hf_source) or os.path.basename(os.path.normpath(hf_source))
        train = from_hf_dataset(data[args.hf_train_split], name=name, **columns)
        test = from_hf_dataset(data[args.hf_test_split], name=name, **columns)
        for split, split_data in ((args.hf_train_split, train), (args.hf_test_split, test)):
            _check_hf_labels(split_data, split, args)
        results = run_benchmark(sources, train, test, config, **kwargs)
    else:
        # the paper sets keep each task's images apart: one benchmark per task, merged
        results = None
        for task in _paper_tasks(args, config):
            allow = {"allow_external_paths": args.allow_external_paths}
            train = load_eval_dataset(args.dataset, args.data_root, "train", task, **allow)
            test = load_eval_dataset(args.dataset, args.data_root, "test", task, **allow)
            part = run_benchmark(sources, train, test, config, **kwargs)
            kwargs.pop("correspondence_scenes", None)  # measured once, with the first task
            if results is None:
                results = part
            else:
                results["results"] += part["results"]
                if part["protocol"]["pipelines"]:
                    results["protocol"]["pipelines"] |= part["protocol"]["pipelines"]
    _check_results(results, config)
    results[PROVENANCE_KEY] = {
        "model": {
            "path": args.model,
            "weight_files_sha256": weight_files_sha256(args.model) if os.path.isdir(args.model) else None,
        },
        "sources": {name: [backbone_identity(m) for m in source_models(source)] for name, source in sources.items()},
    }
    if accelerator.is_main_process:
        json_path, md_path = write_report(results, args.output_dir)
        print(md_path.read_text())
        print(f"wrote {json_path} and {md_path}")
    return results
