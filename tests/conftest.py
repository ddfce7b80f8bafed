import os

# The suite runs offline: nothing may reach the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# A real hand-held capture kept beside the checkout (never in it); FIT3D_FOX_DIR points elsewhere.
FOX = Path(os.environ.get("FIT3D_FOX_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data" / "fox")


@pytest.fixture
def fox_path() -> Path:
    """The real captured scene (FIT3D_FOX_DIR, default ../shared/data/fox); skip when absent."""
    if not (FOX / "transforms.json").exists():
        pytest.skip(f"real capture not found at {FOX} (it lives beside the checkout, never in it)")
    return FOX


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """Hub datasets as an earlier online run would have left them in the local caches (the suite is
    offline). Returns `add(repo_id, data_files, files=None)`: `data_files` maps splits to lists of
    parquet paths, read into `datasets`' cache as `load_dataset(repo_id)` prepares them; `files`
    maps repo file names to their text, put in the Hub cache where `hf_hub_download` finds them."""
    import datasets
    import huggingface_hub.constants
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.parquet.parquet import Parquet

    datasets_cache, hub = tmp_path / "datasets_cache", tmp_path / "hub_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", datasets_cache)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    commit = "0" * 40

    def add(repo_id: str, data_files: dict[str, list[str]], files: dict[str, str] | None = None) -> None:
        namespace, name = repo_id.split("/")
        cached = f"{namespace}___{name}"
        Parquet(
            cache_dir=str(datasets_cache),
            dataset_name=cached,
            config_name="default",
            data_files=DataFilesDict.from_patterns(data_files),
            hash="0" * 16,
        ).download_and_prepare()
        # `load_dataset(repo_id)` offline looks for <namespace>___<name>/default/<version>/<hash>/<name>-<split>*.arrow
        (config_dir,) = (datasets_cache / cached).glob("default-*")
        config_dir = config_dir.rename(config_dir.with_name("default"))
        for arrow in config_dir.glob(f"*/*/{cached}-*.arrow"):
            arrow.rename(arrow.with_name(arrow.name.replace(cached, name, 1)))
        repo = hub / f"datasets--{namespace}--{name}"
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
        for filename, text in (files or {}).items():
            (repo / "snapshots" / commit / filename).write_text(text)

    return add
