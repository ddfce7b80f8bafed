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
