import os

# The suite runs offline: nothing may reach the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

FOX = Path(__file__).resolve().parents[2] / "shared" / "data" / "fox"


@pytest.fixture
def fox_path() -> Path:
    """The real captured scene beside the checkout (../shared/data/fox); skip when absent."""
    if not (FOX / "transforms.json").exists():
        pytest.skip(f"real capture not found at {FOX} (it lives beside the checkout, never in it)")
    return FOX
