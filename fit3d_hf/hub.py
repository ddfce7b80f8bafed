"""Publishing: model cards with `model-index`, and uploads to the Hub.

The benchmark (`fit3d_hf.evaluation`) writes a results JSON (its format is described in
`fit3d_hf.evaluation.report`); this module turns it into `huggingface_hub.EvalResult`s and the
report's results table, renders `model_cards/<template>.md` into `<model_dir>/README.md`, and
uploads folders: models, Spaces (`fit3d space`), and targets datasets with their dataset card
(`push_targets`). The stages write no cards: callers (the commands and the demo) write them after
a stage.
"""

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import datasets
from huggingface_hub import EvalResult, ModelCard, ModelCardData, create_repo, metadata_load, upload_folder

from . import __version__
from .errors import InputError, InputNotFoundError, ProvenanceError, ResultsError
from .evaluation.report import METRIC_NAMES, results_table
from .io import atomic_directory, atomic_write_text, remove_stale_temporaries
from .provenance import PROVENANCE_KEY, weight_files_sha256
from .targets import MASK_DTYPES, METADATA_FILE, bytes_per_view, target_shape, targets_metadata

TEMPLATES_DIR = Path(__file__).resolve().parent / "model_cards"
DEFAULT_TEMPLATE = "fit3d_template"

TASK_TYPES = {
    "segmentation": ("image-segmentation", "Semantic segmentation (linear probe)"),
    "depth": ("depth-estimation", "Monocular depth (linear probe)"),
    "correspondence": ("keypoint-matching", "Multi-view patch correspondence (nearest neighbour)"),
}


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


def eval_results_from(results: dict, source: str | None = None) -> list[EvalResult]:
    """`model-index` entries for one source (default: the one whose role is "fit3d")."""
    if source is None:
        source = next((n for n, s in results["sources"].items() if s.get("role") == "fit3d"), None)
        if source is None:
            raise ValueError(f"no source with role 'fit3d' in results (sources: {list(results['sources'])})")
    if source not in results["sources"]:
        raise ValueError(f"source {source!r} not in results (sources: {list(results['sources'])})")
    entries = []
    for row in results["results"]:
        if row["source"] != source:
            continue
        task_type, task_name = TASK_TYPES.get(row["task"], (row["task"], row["task"]))
        display, metric_type = METRIC_NAMES.get(row["metric"], (row["metric"], row["metric"]))
        over = "test scenes" if row["task"] == "correspondence" else "probe seeds"
        entries.append(
            EvalResult(
                task_type=task_type,
                task_name=task_name,
                dataset_type=row["dataset"],
                dataset_name=row["dataset"],
                dataset_split=row.get("split", "test"),
                metric_type=metric_type,
                metric_name=f"{display} (mean of {len(row['values'])} {over}, std {row['std']:.4f})",
                metric_value=round(float(row["mean"]), 6),
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
        model_dir: a FiT3DModel folder (its `config.json` gives backbone and assembly).
        eval_results_path: a benchmark results JSON; fills `model-index` (the "fit3d" source)
            and the results table. Without it the card says that no benchmark was run.
        extra: template variables and card metadata, e.g. `model_name`, `base_model`,
            `datasets`, `tags`, `license`, `training` (free text: steps, lr, scenes...).
            Keys named like `ModelCardData` fields go to the YAML header; all are passed
            to the template.
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
    variables: dict[str, Any] = {
        "model_name": extra.pop("model_name", model_dir.resolve().name),
        "assembly": config.get("assembly", "unknown"),
        "backbone_type": backbone.get("model_type", config.get("model_type", "unknown")),
        "hidden_size": backbone.get("hidden_size"),
        "patch_size": backbone.get("patch_size"),
        "package_version": __version__,
        "results_table": None,
        "protocol": None,
    }
    eval_results = None
    if eval_results_path is not None:
        results = load_results(eval_results_path)
        check_results_for_card(results, eval_results_path, model_dir)
        eval_results = eval_results_from(results) or None
        variables["results_table"] = results_table(results)
        variables["protocol"] = json.dumps(results["protocol"], indent=2, sort_keys=True)

    card_fields = ("base_model", "datasets", "language", "license", "metrics", "pipeline_tag", "tags")
    card_kwargs = {key: extra[key] for key in card_fields if key in extra}
    card_kwargs.setdefault("library_name", "transformers")
    card_kwargs.setdefault("license", "apache-2.0")
    card_kwargs["tags"] = list(dict.fromkeys(["fit3d", "feature-extraction", "3d-aware"] + list(card_kwargs.get("tags") or [])))
    card_data = ModelCardData(model_name=variables["model_name"], eval_results=eval_results, **card_kwargs)
    variables.update(extra)
    card = ModelCard.from_template(card_data, template_path=str(template_path), **variables)
    remove_stale_temporaries(model_dir)
    out = model_dir / "README.md"
    atomic_write_text(out, str(card))
    return out


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

    A model folder (config.json, model.safetensors, preprocessor_config.json, README.md) goes
    up as is; for a dataset, pass a folder written by `Dataset.save_to_disk` or a folder of
    parquet/json files with `repo_type="dataset"`; for a Space, a folder whose README.md names
    its `sdk` and `app_file` (`fit3d space` writes one) with `repo_type="space"`. Files matching
    `.*`, `*.tmp` and `checkpoint*/` are not uploaded.
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
        ignore_patterns=[".*", "*.tmp", "checkpoint*/**"],
    )
    return str(getattr(info, "commit_url", info))


def base_model_of(backbone: str) -> str | None:
    """The Hub id a `--backbone` spec names, for a card's `base_model`; None for a local folder or a
    built-in spec ('embedded', 'tiny:...', 'random:...')."""
    return backbone if "/" in backbone and not os.path.exists(backbone) else None


def finetune_card_extra(training_info: dict, backbone: str | None = None) -> dict[str, Any]:
    """`write_model_card` variables for a model written by `fit3d_hf.finetune.finetune`.

    Args:
        training_info: the run's `fit3d_finetune.json` (`FinetuneResult.training_info`).
        backbone: the `--backbone` spec it was fine-tuned from; a Hub id becomes `base_model`.
    """
    config, losses = training_info["config"], training_info["losses"]
    final_loss = losses[-1][1] if losses else None
    dataset = f"`{training_info['dataset']}`" if training_info["dataset"] else "a `datasets.Dataset` given in Python"
    extra: dict[str, Any] = {
        "training": (
            f"`{training_info['backbone']}` fine-tuned for {training_info['global_step']} steps on "
            f"{training_info['num_views']} rendered views of {dataset} "
            f"({training_info['num_processes']} process(es), batch {config['per_device_batch_size']} per process, AdamW lr "
            f"{config['learning_rate']}, wd {config['weight_decay']}, grad clip {config['max_grad_norm']}, flip p "
            f"{config['flip_probability']}); final masked-L1 loss {final_loss if final_loss is None else round(final_loss, 5)}. "
            "Details in `fit3d_finetune.json`."
        ),
    }
    base_model = base_model_of(backbone) if backbone else None
    if base_model:
        extra["base_model"] = base_model
    return extra


def export_for_hub(dataset_dir: str | os.PathLike, folder: str | os.PathLike, *, num_shards: int = 1) -> Path:
    """Write the Hub layout of a saved targets dataset into `folder` (created atomically; it must
    not hold files): `data/train-*.parquet` (self-contained: images embedded), `fit3d_targets.json`
    and a dataset card `README.md`. `datasets.load_dataset(repo_id)` then reads it back with the
    same features."""
    dataset = datasets.load_from_disk(str(dataset_dir))
    metadata = targets_metadata(dataset)
    hidden_size, grid_height, grid_width = target_shape(dataset)
    mask = metadata.get("render", {}).get("mask_kind", "coverage")
    card = [
        "---",
        "tags: [fit3d, feature-distillation, 3d-aware-fine-tuning]",
        "configs:",
        "- config_name: default",
        "  data_files:",
        "  - split: train",
        "    path: data/train-*.parquet",
        "---",
        "",
        "# FiT3D fine-tuning targets",
        "",
        f"{dataset.num_rows} views; target float16 [{hidden_size}, {grid_height}, {grid_width}] per view "
        f"({bytes_per_view(hidden_size, grid_height, grid_width, mask) / 1e6:.2f} MB uncompressed), {MASK_DTYPES[mask]} mask, "
        "PNG image, cameras. Made with `fit3d render` (fit3d_hf); rendering details in `fit3d_targets.json`.",
        "",
        "```python",
        "from fit3d_hf.targets import load_targets",
        "dataset = load_targets(snapshot_download(repo_id, repo_type='dataset'))  # float16 kept",
        "```",
        "",
        "```json",
        json.dumps(metadata, indent=2),
        "```",
        "",
    ]
    with atomic_directory(folder) as staging:
        (staging / "data").mkdir()
        for index in range(num_shards):
            shard = dataset.shard(num_shards=num_shards, index=index, contiguous=True)
            shard.to_parquet(str(staging / "data" / f"train-{index:05d}-of-{num_shards:05d}.parquet"))
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
        (staging / "README.md").write_text("\n".join(card))
    return Path(folder)


def push_targets(
    dataset_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    num_shards: int = 1,
) -> Path:
    """Upload a saved targets dataset to the Hub as a dataset repo (parquet + card + metadata).
    Returns the local folder that was uploaded (kept under a temporary directory)."""
    folder = export_for_hub(dataset_dir, tempfile.mkdtemp(prefix="fit3d-targets-"), num_shards=num_shards)
    push_to_hub(folder, repo_id, repo_type="dataset", private=private, token=token)
    return folder
