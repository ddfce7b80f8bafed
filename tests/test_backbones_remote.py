"""A FiT3DModel of every supported backbone type in a fresh process without fit3d_hf: remote code, AutoModel, pipeline."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from fit3d_hf import FiT3DModel, backbones

FRESH_PROCESS = """
import sys, torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, pipeline
image = Image.open(sys.argv[1])
for folder in sys.argv[2:]:
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    inputs = AutoImageProcessor.from_pretrained(folder)(image, return_tensors="pt")
    with torch.no_grad():
        feature_maps = model(**inputs).feature_maps
    extractor = pipeline("image-feature-extraction", model=folder, trust_remote_code=True)
    tokens = extractor(image, return_tensors=True)
    torch.save({"feature_maps": feature_maps, "tokens": tokens}, folder + "/fresh.pt")
assert not any(name == "fit3d_hf" or name.startswith("fit3d_hf.") for name in sys.modules), "fit3d_hf was imported"
"""


@pytest.mark.slow
def test_every_type_loads_in_a_fresh_process_and_runs_the_pipeline(tmp_path):
    image_path = tmp_path / "image.png"
    Image.fromarray((np.random.default_rng(0).random((50, 70, 3)) * 255).astype("uint8")).save(image_path)
    folders, models = [], {}
    for family in backbones.FAMILIES:
        torch.manual_seed(0)
        model = FiT3DModel.from_backbone(backbones.build_backbone(backbones.tiny_config(family))).eval()
        folder = tmp_path / family
        model.save_pretrained(folder)
        backbones.make_image_processor(model.config).save_pretrained(folder)
        folders.append(str(folder))
        models[family] = model
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(FRESH_PROCESS), str(image_path), *folders],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    from transformers import AutoImageProcessor

    for family, model in models.items():
        fresh = torch.load(tmp_path / family / "fresh.pt", weights_only=True)
        inputs = AutoImageProcessor.from_pretrained(tmp_path / family)(Image.open(image_path), return_tensors="pt")
        with torch.no_grad():
            expected = model(**inputs)
        torch.testing.assert_close(fresh["feature_maps"], expected.feature_maps, rtol=0, atol=0, msg=family)
        torch.testing.assert_close(fresh["tokens"], expected.last_hidden_state, rtol=0, atol=1e-6, msg=family)
