"""Publishing: model cards and dataset cards the Hub understands, and uploads.

Model cards (`write_model_card`): the YAML header has `pipeline_tag: image-feature-extraction`,
`library_name: transformers`, `base_model`, `datasets` and a `license` derived from the backbone's
(`backbone_license`). Benchmark results (a results JSON written by `fit3d_hf.evaluation`; its format
is in `fit3d_hf.evaluation.report`) go twice: into `.eval_results/<dataset>.yaml` (the Hub's current
format, `huggingface_hub.EvalResultEntry`; only for datasets that are Hub datasets) and into
`model-index` in the README (`huggingface_hub.EvalResult`, read by older tools), with the report's
results table in the text.

Dataset cards (`targets_card`) describe a targets dataset: licence, task category, size, the
backbone, and for ScanNet++-derived data a note on its terms and gating. `push_targets` uploads
one with `Dataset.push_to_hub` (Parquet shards of at most `max_shard_size`, written and uploaded one
at a time: nothing is left on disk) plus the card and `fit3d_targets.json`, which
`fit3d_hf.targets.load_targets(<repo id>)` reads back; `export_for_hub` writes the same layout into
a local folder. `push_to_hub` uploads a model, dataset or Space folder. The stages write no cards:
callers (the commands and the demo) write them after a stage.
"""

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import datasets
import yaml
from datasets.arrow_writer import get_writer_batch_size_from_data_size
from datasets.utils.py_utils import convert_file_size_to_int
from huggingface_hub import (
    CommitOperationAdd,
    DatasetCard,
    DatasetCardData,
    EvalResult,
    EvalResultEntry,
    HfApi,
    ModelCard,
    ModelCardData,
    create_repo,
    eval_result_entries_to_yaml,
    metadata_load,
    upload_folder,
)

from . import __version__
from .backbone_specs import hub_id_of
from .backbones import ADAPTERS
from .embedded import EMBEDDED_BACKBONE_NAME
from .errors import InputError, InputNotFoundError, ProvenanceError, ResultsError
from .evaluation.report import METRIC_NAMES, results_table
from .io import atomic_directory, atomic_write_text, remove_stale_temporaries
from .provenance import PROVENANCE_KEY, weight_files_sha256
from .targets import MASK_DTYPES, METADATA_FILE, bytes_per_view, target_shape, targets_metadata

TEMPLATES_DIR = Path(__file__).resolve().parent / "model_cards"
DEFAULT_TEMPLATE = "fit3d_template"
TARGETS_TEMPLATE = "targets_template"
EVAL_RESULTS_DIR = ".eval_results"  # huggingface_hub.constants.EVAL_RESULTS_FOLDER

TASK_TYPES = {
    "segmentation": ("image-segmentation", "Semantic segmentation (linear probe)"),
    "depth": ("depth-estimation", "Monocular depth (linear probe)"),
    "correspondence": ("keypoint-matching", "Multi-view patch correspondence (nearest neighbour)"),
}

_APACHE = {"license": "apache-2.0"}
_CC_BY_NC = {"license": "cc-by-nc-4.0"}
# The licence of each family's published weights: a FiT3D model starts from them and keeps it.
FAMILY_LICENSES: dict[str, dict[str, str]] = {
    "dinov2": _APACHE,
    "dinov2_reg": _APACHE,
    "deit3": _APACHE,
    "siglip": _APACHE,
    "siglip2": _APACHE,
    # The paper's CLIP is timm's vit_base_patch16_clip_384.laion2b_ft_in12k_in1k (apache-2.0); OpenAI's
    # and LAION's own CLIP releases are MIT (`ORG_LICENSES`).
    "clip": _APACHE,
    "mae": _CC_BY_NC,
    "vit_mae": _CC_BY_NC,
    "ijepa": _CC_BY_NC,
    "metaclip2": _CC_BY_NC,
    "dinov3": {
        "license": "other",
        "license_name": "dinov3-license",
        "license_link": "https://ai.meta.com/resources/models-and-libraries/dinov3-license/",
    },
    "aimv2": {"license": "other", "license_name": "apple-amlr"},
    "radio": {"license": "other", "license_name": "nvidia-open-model-license"},
}
# Hub organisations whose backbones carry another licence than their family's entry says.
ORG_LICENSES = {"openai": {"license": "mit"}, "laion": {"license": "mit"}}
SCANNETPP_LICENSE = {
    "license": "other",
    "license_name": "scannetpp-terms-of-use",
    "license_link": "https://kaldir.vc.in.tum.de/scannetpp/static/scannetpp-terms-of-use.pdf",
}
LICENSE_KEYS = ("license", "license_name", "license_link")


def backbone_license(family: str | None, name: str | None = None) -> dict[str, str]:
    """The licence fields (`license`, and `license_name`/`license_link` for "other") of a backbone's
    weights, for the cards of what is made from them; {} when it cannot be told.

    Args:
        family: the backbone's family (`backbones.family_of`), e.g. "mae" -> cc-by-nc-4.0.
        name: its recorded name (`backbone_specs.backbone_name`) or Hub id. A Hub model whose card is
            in the local cache (or reachable) gives its own licence; the embedded backbone and
            randomly initialised ones ("tiny:", "random:") are this package's, apache-2.0.
    """
    name = name or ""
    if name == EMBEDDED_BACKBONE_NAME or name.startswith(("tiny:", "random:")):
        return dict(_APACHE)
    hub_id = hub_id_of(name)
    if hub_id is not None:
        try:
            card = ModelCard.load(hub_id).data.to_dict()
        except Exception:  # noqa: BLE001 - offline, no card, gated or gone: fall back to the tables
            card = {}
        if card.get("license"):
            return {key: card[key] for key in LICENSE_KEYS if card.get(key)}
        if hub_id.split("/")[0] in ORG_LICENSES:
            return dict(ORG_LICENSES[hub_id.split("/")[0]])
    return dict(FAMILY_LICENSES.get(family or "", {}))


def license_note(fields: dict[str, str], origin: str) -> str:
    """One line for a card's text saying which licence applies and why."""
    if not fields:
        return f"not determined: check the licence of {origin}"
    name = fields.get("license_name") or fields["license"]
    link = f" ({fields['license_link']})" if fields.get("license_link") else ""
    return f"`{name}`{link}, that of {origin}"


def _family_of_config(backbone_config: dict) -> str | None:
    adapter = ADAPTERS.get(backbone_config.get("model_type", ""))
    return backbone_config.get("fit3d_family") or (adapter.family if adapter else None)


def load_results(path: str | os.PathLike) -> dict:
    """Read a results JSON written by the benchmark; errors name the file and what is missing."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"results file not found: {path}")
    try:
        with open(path) as f:
            results = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path} is not a JSON file ({error}); pass the results.json `fit3d evaluate` wrote") from error
    missing = [key for key in ("protocol", "sources", "results") if not isinstance(results, dict) or key not in results]
    if missing:
        raise InputError(f"{path} is not a fit3d_hf benchmark results file: missing keys {missing}")
    return results


def _source_rows(results: dict, source: str | None) -> list[dict]:
    """The results rows of one source (default: the one whose role is "fit3d"); one row per
    (dataset, split, task, metric), as `model-index` needs."""
    if source is None:
        source = next((n for n, s in results["sources"].items() if s.get("role") == "fit3d"), None)
        if source is None:
            raise ValueError(f"no source with role 'fit3d' in results (sources: {list(results['sources'])})")
    if source not in results["sources"]:
        raise ValueError(f"source {source!r} not in results (sources: {list(results['sources'])})")
    rows = [row for row in results["results"] if row["source"] == source]
    keys = [(row["dataset"], row.get("split", "test"), row["task"], row["metric"]) for row in rows]
    duplicated = sorted({key for key in keys if keys.count(key) > 1})
    if duplicated:
        raise ValueError(f"results hold several rows for (dataset, split, task, metric) {duplicated} of source {source!r}")
    return rows


def _summary(row: dict) -> str:
    over = "test scenes" if row["task"] == "correspondence" else "probe seeds"
    return f"mean of {len(row['values'])} {over}, std {row['std']:.4f}"


def eval_results_from(results: dict, source: str | None = None) -> list[EvalResult]:
    """`model-index` entries for one source (default: the one whose role is "fit3d"). A dataset named
    by a Hub id keeps it as `dataset.type`, so the Hub links the result to the dataset."""
    entries = []
    for row in _source_rows(results, source):
        task_type, task_name = TASK_TYPES.get(row["task"], (row["task"], row["task"]))
        display, metric_type = METRIC_NAMES.get(row["metric"], (row["metric"], row["metric"]))
        entries.append(
            EvalResult(
                task_type=task_type,
                task_name=task_name,
                dataset_type=row["dataset"],
                dataset_name=row["dataset"],
                dataset_split=row.get("split", "test"),
                metric_type=metric_type,
                metric_name=f"{display} ({_summary(row)})",
                metric_value=round(float(row["mean"]), 6),
            )
        )
    return entries


def eval_result_entries_from(results: dict, source: str | None = None) -> dict[str, list[EvalResultEntry]]:
    """`.eval_results/` entries for one source, by Hub dataset id; rows of datasets that are not Hub
    datasets (procedural rooms, local folders) have none (they stay in `model-index`). The task id
    is `<task>_<metric>`, e.g. `segmentation_mean_iou`. The Hub lists an entry on the model page
    and the dataset's leaderboard only when the dataset is registered as a Benchmark there."""
    entries: dict[str, list[EvalResultEntry]] = {}
    for row in _source_rows(results, source):
        dataset_id = hub_id_of(row["dataset"])
        if dataset_id is None:
            continue
        entries.setdefault(dataset_id, []).append(
            EvalResultEntry(
                dataset_id=dataset_id,
                task_id=f"{row['task']}_{row['metric']}",
                value=round(float(row["mean"]), 6),
                notes=f"split {row.get('split', 'test')}; {_summary(row)}; fit3d_hf {results.get('fit3d_hf_version', __version__)}",
            )
        )
    return entries


def check_results_for_card(results: dict, path: str | os.PathLike, model_dir: str | os.PathLike) -> None:
    """Refuse results that would put wrong numbers on the card of `model_dir`: values that are not
    numbers (NaN), or results measured on other weights than the folder holds (their recorded
    `provenance.model.weight_files_sha256`)."""
    bad = sorted(
        {
            f"{row['source']}: {row['task']} {row['metric']}"
            for row in results["results"]
            if not all(map(math.isfinite, row["values"]))
        }
    )
    if bad:
        raise ResultsError(
            f"{path} holds results that are not numbers ({', '.join(bad)}); a card never shows NaN as a result. "
            "Run `fit3d evaluate` again (it refuses such results and says why)"
        )
    recorded = ((results.get(PROVENANCE_KEY) or {}).get("model") or {}).get("weight_files_sha256")
    current = weight_files_sha256(model_dir)
    if recorded is not None and current is not None and recorded != current:
        raise ProvenanceError(
            f"{path} was measured on other weights (sha256 {recorded[:12]}…) than {model_dir} holds ({current[:12]}…); "
            f"evaluate {model_dir} itself (`fit3d evaluate --model {model_dir}`) and card those results"
        )


def write_model_card(
    model_dir: str | os.PathLike,
    *,
    eval_results_path: str | os.PathLike | None = None,
    extra: dict[str, Any] | None = None,
    template: str = DEFAULT_TEMPLATE,
) -> Path:
    """Render `model_cards/<template>.md` into `<model_dir>/README.md` and return its path.

    Args:
        model_dir: a FiT3DModel folder (its `config.json` gives backbone, assembly and licence).
        eval_results_path: a benchmark results JSON; fills `model-index` and `.eval_results/`
            (the "fit3d" source) and the results table. Without it the card says that no
            benchmark was run, and `.eval_results/` is removed.
        extra: template variables and card metadata, e.g. `model_name`, `repo_id` (for the usage
            snippet), `base_model`, `datasets`, `tags`, `license` (+ `license_name`,
            `license_link`), `training` (free text), `limitations`. Keys named like
            `ModelCardData` fields go to the YAML header; all are passed to the template.
        template: name of a template in `fit3d_hf/model_cards/` (without `.md`) or a path.

    Raises:
        ResultsError: the results hold a value that is not a number (`check_results_for_card`).
        ProvenanceError: the results were measured on other weights than `model_dir` holds.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise InputNotFoundError(f"model folder not found: {model_dir}")
    template_path = Path(template) if template.endswith(".md") else TEMPLATES_DIR / f"{template}.md"
    if not template_path.is_file():
        raise InputNotFoundError(f"model card template not found: {template_path}")
    extra = dict(extra or {})

    config = {}
    if (model_dir / "config.json").is_file():
        with open(model_dir / "config.json") as f:
            config = json.load(f)
    backbone = config.get("backbone_config") or {}
    family = _family_of_config(backbone)
    base_model = extra.pop("base_model", None) or hub_id_of(backbone.get("_name_or_path") or "")
    license_fields = {key: extra.pop(key) for key in LICENSE_KEYS if key in extra}
    if not license_fields:
        license_fields = backbone_license(family, base_model or backbone.get("_name_or_path"))
    origin = f"the backbone it starts from ({base_model or backbone.get('_name_or_path') or family or 'unknown'})"
    model_name = extra.pop("model_name", model_dir.resolve().name)
    variables: dict[str, Any] = {
        "model_name": model_name,
        "repo_id": extra.pop("repo_id", model_name),
        "assembly": config.get("assembly", "unknown"),
        "backbone_type": backbone.get("model_type", config.get("model_type", "unknown")),
        "hidden_size": backbone.get("hidden_size"),
        "patch_size": backbone.get("patch_size"),
        "package_version": __version__,
        "base_model": base_model,
        "license_note": license_note(license_fields, origin),
        "results_table": None,
        "protocol": None,
    }
    eval_results, eval_entries = None, {}
    if eval_results_path is not None:
        results = load_results(eval_results_path)
        check_results_for_card(results, eval_results_path, model_dir)
        eval_results = eval_results_from(results) or None
        eval_entries = eval_result_entries_from(results)
        variables["results_table"] = results_table(results)
        variables["protocol"] = json.dumps(results["protocol"], indent=2, sort_keys=True)

    card_fields = ("datasets", "language", "metrics", "pipeline_tag", "tags", "library_name")
    card_kwargs = {key: extra.pop(key) for key in card_fields if key in extra}
    card_kwargs.setdefault("library_name", "transformers")
    card_kwargs.setdefault("pipeline_tag", "image-feature-extraction")
    card_kwargs["datasets"] = list(dict.fromkeys(list(card_kwargs.get("datasets") or []) + list(eval_entries))) or None
    card_kwargs["tags"] = list(
        dict.fromkeys(
            ["fit3d", "3d-aware-fine-tuning", "vision", *([family] if family else [])] + list(card_kwargs.get("tags") or [])
        )
    )
    if base_model:
        card_kwargs.update(base_model=base_model, base_model_relation="finetune")
    card_data = ModelCardData(model_name=model_name, eval_results=eval_results, **license_fields, **card_kwargs)
    variables.update(extra)
    card = ModelCard.from_template(card_data, template_path=str(template_path), **variables)
    remove_stale_temporaries(model_dir)
    out = model_dir / "README.md"
    atomic_write_text(out, str(card))
    _write_eval_results(model_dir / EVAL_RESULTS_DIR, eval_entries)
    return out


def _write_eval_results(folder: Path, entries: dict[str, list[EvalResultEntry]]) -> None:
    """One `<owner>__<name>.yaml` per Hub dataset in `folder` (replaced as a whole); none: no folder."""
    if not entries:
        shutil.rmtree(folder, ignore_errors=True)  # results of an earlier card must not outlive it
        return
    with atomic_directory(folder, overwrite=True) as staging:
        for dataset_id, dataset_entries in entries.items():
            text = yaml.safe_dump(eval_result_entries_to_yaml(dataset_entries), sort_keys=False)
            (staging / f"{dataset_id.replace('/', '__')}.yaml").write_text(text)


# Not uploaded: the temporary names of `fit3d_hf.io`, tool caches, and training checkpoints.
UPLOAD_IGNORE_PATTERNS = [".*.tmp-*", "*.tmp", ".cache/**", ".git/**", ".DS_Store", "checkpoint*/**"]


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    repo_type: str = "model",
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Create `repo_id` if needed and upload `folder` to it; return the commit URL.

    A model folder (config.json, model.safetensors, preprocessor_config.json, README.md,
    `.eval_results/`) goes up as is; for a dataset, pass a folder written by `Dataset.save_to_disk`
    or a folder of parquet/json files with `repo_type="dataset"` (a targets dataset: `push_targets`);
    for a Space, a folder whose README.md names its `sdk` and `app_file` (`fit3d space` writes one)
    with `repo_type="space"`. Temporary files (`UPLOAD_IGNORE_PATTERNS`) and `checkpoint*/` are not uploaded.
    """
    folder = Path(folder)
    if repo_type not in ("model", "dataset", "space"):
        raise ValueError(f"repo_type must be 'model', 'dataset' or 'space', got {repo_type!r}")
    if not folder.is_dir():
        raise FileNotFoundError(f"folder to upload not found: {folder}")
    if not any(folder.iterdir()):
        raise ValueError(f"folder to upload is empty: {folder}")
    if repo_type == "model":
        has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))
        if not (folder / "config.json").is_file() or not has_weights:
            raise ValueError(
                f"{folder} is not a model folder: it needs config.json and *.safetensors (use repo_type='dataset' for a dataset)"
            )
    space_sdk = {}
    if repo_type == "space":
        metadata = metadata_load(folder / "README.md") if (folder / "README.md").is_file() else None
        app_file = (metadata or {}).get("app_file", "app.py")
        if not metadata or "sdk" not in metadata or not (folder / app_file).is_file():
            raise ValueError(
                f"{folder} is not a Space folder: it needs README.md with `sdk` in its YAML header and the app_file it names "
                "(`fit3d space` writes one)"
            )
        space_sdk = {"space_sdk": metadata["sdk"]}  # the Hub needs the SDK to create a Space
    create_repo(repo_id, token=token, private=private, repo_type=repo_type, exist_ok=True, **space_sdk)
    info = upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type=repo_type,
        token=token,
        commit_message=commit_message or f"Upload {repo_type} with fit3d_hf {__version__}",
        ignore_patterns=UPLOAD_IGNORE_PATTERNS,
    )
    return str(getattr(info, "commit_url", info))


def base_model_of(backbone: str) -> str | None:
    """The Hub id a `--backbone` spec names, for a card's `base_model`; None for a local folder or a
    built-in spec ('embedded', 'tiny:...', 'random:...')."""
    return hub_id_of(backbone)


def finetune_card_extra(training_info: dict, backbone: str | None = None) -> dict[str, Any]:
    """`write_model_card` variables for a model written by `fit3d_hf.finetune.finetune`.

    Args:
        training_info: the run's `fit3d_finetune.json` (`FinetuneResult.training_info`).
        backbone: the `--backbone` spec it was fine-tuned from; a Hub id becomes `base_model`.
            A targets dataset given as a Hub id becomes `datasets`.
    """
    config, losses = training_info["config"], training_info["losses"]
    final_loss = losses[-1][1] if losses else None
    dataset = f"`{training_info['dataset']}`" if training_info["dataset"] else "a `datasets.Dataset` given in Python"
    accumulation = config.get("gradient_accumulation_steps", 1)
    batch = f"batch {config['per_device_batch_size']} per process" + (
        f" x {accumulation} accumulated" if accumulation > 1 else ""
    )
    extra: dict[str, Any] = {
        "training": (
            f"`{training_info['backbone']}` fine-tuned for {training_info['global_step']} steps on "
            f"{training_info['num_views']} rendered views of {dataset} "
            f"({training_info['num_processes']} process(es), {batch}, AdamW lr "
            f"{config['learning_rate']}, wd {config['weight_decay']}, grad clip {config['max_grad_norm']}, flip p "
            f"{config['flip_probability']}); final masked-L1 loss {final_loss if final_loss is None else round(final_loss, 5)}. "
            "Details in `fit3d_finetune.json`."
        ),
    }
    base_model = base_model_of(backbone) if backbone else None
    if base_model:
        extra["base_model"] = base_model
    if training_info["dataset"] and (dataset_id := hub_id_of(training_info["dataset"])):
        extra["datasets"] = [dataset_id]
    return extra


def _size_category(num_rows: int) -> str:
    """The Hub's `size_categories` value for a number of rows."""
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")]
    return next((label for bound, label in bounds if num_rows < bound), "10M<n<100M")


def targets_card(dataset: datasets.Dataset, *, license: dict[str, str] | None = None, repo_id: str | None = None) -> DatasetCard:
    """The dataset card of a targets dataset written by `render_targets`.

    Args:
        dataset: the dataset (its metadata: backbone, sources, sizes).
        license: licence fields (`license`, `license_name`, `license_link`). Default: ScanNet++'s
            terms when any scene comes from ScanNet++ (with gating fields in the header), else the
            backbone's (`backbone_license`): the targets are its features.
        repo_id: the Hub id, for the usage snippet.
    """
    metadata = targets_metadata(dataset)
    if not metadata:
        raise ValueError("the dataset has no fit3d targets metadata (fit3d_targets.json); write its card yourself")
    hidden_size, grid_height, grid_width = target_shape(dataset)
    backbone = metadata["backbone"]
    sources = metadata.get("scene_sources") or {}
    scannetpp = sources.get("scannetpp", 0)
    if license is not None:
        license_fields, origin = dict(license), "its publisher's choice"
    elif scannetpp:
        license_fields, origin = dict(SCANNETPP_LICENSE), "the ScanNet++ scenes it is made from"
    else:
        license_fields = backbone_license(backbone.get("family"), backbone.get("name_or_path"))
        origin = "the backbone whose features the targets are"
    note = license_note(license_fields, origin)
    if sources.get("capture"):
        note += f"; the images of its {sources['capture']} captured scene(s) keep their own licence"
    gating = {}
    if scannetpp:
        gating = {
            "extra_gated_prompt": "These targets embed ScanNet++ images. Request access only if you have accepted the ScanNet++ Terms of Use.",
            "extra_gated_fields": {"I have accepted the ScanNet++ Terms of Use": "checkbox"},
        }
    pretty_name = f"FiT3D targets for {hub_id_of(backbone.get('name_or_path') or '') or backbone.get('family')}"
    card_data = DatasetCardData(
        **license_fields,
        pretty_name=pretty_name,
        task_categories=["image-feature-extraction"],
        size_categories=[_size_category(dataset.num_rows)],
        tags=["fit3d", "3d-aware-fine-tuning", "feature-distillation", "vision"],
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}],
        **gating,
    )
    image_height, image_width = metadata["image_size"]
    source = metadata["target_source"]
    mask = (metadata.get("render") or {}).get("mask_kind", "coverage")
    provenance = metadata.get(PROVENANCE_KEY) or {}
    return DatasetCard.from_template(
        card_data,
        template_path=str(TEMPLATES_DIR / f"{TARGETS_TEMPLATE}.md"),
        pretty_name=pretty_name,
        package_version=__version__,
        target_description=(
            "rendered from feature Gaussians lifted from the backbone's features of each scene (Stage I)"
            if source == "lifted"
            else "of the single-view control (the backbone's own features of the view, blurred: no 3D)"
        ),
        backbone_name=backbone.get("name_or_path") or backbone.get("model_type"),
        family=backbone.get("family"),
        hidden_size=hidden_size,
        patch_size=backbone.get("patch_size"),
        num_views=dataset.num_rows,
        num_scenes=len(metadata.get("scenes", [])),
        image_height=image_height,
        image_width=image_width,
        grid_height=grid_height,
        grid_width=grid_width,
        megabytes_per_view=f"{bytes_per_view(hidden_size, grid_height, grid_width, mask) / 1e6:.2f}",
        mask_kind=mask,
        mask_dtype=MASK_DTYPES[mask],
        mask_rule=(metadata.get("render") or {}).get("mask", ""),
        normalization=metadata.get("normalization") or "not recorded",
        weights_sha256=((provenance.get("backbone") or {}).get("weights_sha256") or "not recorded")[:16],
        license_note=note,
        scannetpp=bool(scannetpp),
        scannetpp_scenes=scannetpp,
        repo_id=repo_id or "<namespace>/<name>",
    )


def targets_num_shards(dataset: datasets.Dataset, max_shard_size: int | str = "500MB") -> int:
    """Parquet shards of at most `max_shard_size` (uncompressed Arrow bytes), as `Dataset.push_to_hub` counts them."""
    return int(dataset.data.nbytes / convert_file_size_to_int(max_shard_size)) + 1


def _open_for_hub(
    dataset_dir: str | os.PathLike, num_shards: int | None, max_shard_size: int | str
) -> tuple[datasets.Dataset, int]:
    dataset = datasets.load_from_disk(str(dataset_dir))
    if not targets_metadata(dataset):
        raise ValueError(f"{dataset_dir} is not a targets dataset written by `render_targets` (no fit3d metadata)")
    return dataset, num_shards or targets_num_shards(dataset, max_shard_size)


def export_for_hub(
    dataset_dir: str | os.PathLike,
    folder: str | os.PathLike,
    *,
    max_shard_size: int | str = "500MB",
    num_shards: int | None = None,
    license: dict[str, str] | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write the Hub layout of a saved targets dataset into `folder`, as `push_targets` uploads it:
    `data/train-<i>-of-<n>.parquet` (images embedded; shards and ~100 MB row groups as
    `Dataset.push_to_hub` makes them), `fit3d_targets.json` and the dataset card `README.md`. The
    folder is created atomically and must not hold files. `load_targets(folder)` and
    `datasets.load_dataset(folder)` read it back with the same features; `hf upload-large-folder`
    uploads it."""
    dataset, num_shards = _open_for_hub(dataset_dir, num_shards, max_shard_size)
    card = targets_card(dataset, license=license, repo_id=repo_id)
    with atomic_directory(folder) as staging:
        (staging / "data").mkdir()
        for index in range(num_shards):
            shard = dataset.shard(num_shards=num_shards, index=index, contiguous=True)
            row_group = get_writer_batch_size_from_data_size(len(shard), shard.data.nbytes)
            shard.to_parquet(str(staging / "data" / f"train-{index:05d}-of-{num_shards:05d}.parquet"), batch_size=row_group)
        (staging / METADATA_FILE).write_text(json.dumps(targets_metadata(dataset), indent=2))
        (staging / "README.md").write_text(str(card))
    return Path(folder)


def push_targets(
    dataset_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    max_shard_size: int | str = "500MB",
    num_shards: int | None = None,
    license: dict[str, str] | None = None,
    gated: bool | None = None,
) -> str:
    """Upload a saved targets dataset to the Hub as a dataset repo; return the commit URL.

    First the dataset card (`targets_card`) and `fit3d_targets.json` in one commit, then the rows
    with `Dataset.push_to_hub` in Parquet shards of at most `max_shard_size` (or `num_shards`),
    each written to a temporary file, uploaded and deleted: no copy of the dataset is made on disk.
    `Dataset.push_to_hub` adds `dataset_info` to the card's header and keeps the rest.

    Args:
        gated: enable manual access requests on the repo. Default: for ScanNet++-derived data
            (whose terms restrict redistribution), and never for others.
    """
    dataset, num_shards = _open_for_hub(dataset_dir, num_shards, max_shard_size)
    card = targets_card(dataset, license=license, repo_id=repo_id)
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    if gated if gated is not None else bool(targets_metadata(dataset).get("scene_sources", {}).get("scannetpp")):
        api.update_repo_settings(repo_id, gated="manual", repo_type="dataset")
    api.create_commit(
        repo_id,
        operations=[
            CommitOperationAdd("README.md", str(card).encode()),
            CommitOperationAdd(METADATA_FILE, json.dumps(targets_metadata(dataset), indent=2).encode()),
        ],
        commit_message=f"Dataset card and {METADATA_FILE} (fit3d_hf {__version__})",
        repo_type="dataset",
    )
    info = dataset.push_to_hub(
        repo_id, split="train", token=token, num_shards=num_shards, commit_message=f"Upload targets with fit3d_hf {__version__}"
    )
    return str(getattr(info, "commit_url", info))
