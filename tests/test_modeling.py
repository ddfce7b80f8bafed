"""FiT3DConfig / FiT3DModel: shapes, Auto classes, remote code, processor, bf16, pipeline, from_backbone."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModel, pipeline

from fit3d_hf import FiT3DConfig, FiT3DModel, backbones

torch.set_num_threads(1)


def tiny_model(family: str = "dinov2", assembly: str = "concat", seed: int = 0) -> FiT3DModel:
    torch.manual_seed(seed)
    return FiT3DModel(FiT3DConfig(backbone_config=backbones.tiny_config(family), assembly=assembly)).eval()


def save_with_processor(model: FiT3DModel, path) -> None:
    model.save_pretrained(path)
    backbones.make_image_processor(model.config).save_pretrained(path)


def pixels(model: FiT3DModel, rows: int = 3, cols: int = 5, batch: int = 2) -> torch.Tensor:
    patch = backbones.patch_size_of(model.config)
    return torch.randn(batch, 3, rows * patch, cols * patch, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", backbones.FAMILIES)
def test_output_shapes_every_family(family):
    model = tiny_model(family)
    with torch.no_grad():
        output = model(pixels(model))
    assert output.feature_maps.shape == (2, 64, 3, 5)
    assert output.last_hidden_state.shape == (2, 15, 64)
    assert output.original_feature_maps.shape == output.finetuned_feature_maps.shape == (2, 32, 3, 5)
    assert output.cls_token.shape == (2, 32)
    torch.testing.assert_close(output.last_hidden_state, output.feature_maps.flatten(2).transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(
        output.feature_maps, torch.cat([output.original_feature_maps, output.finetuned_feature_maps], 1), rtol=0, atol=0
    )


@pytest.mark.parametrize("assembly", ["finetuned", "original", "add"])
def test_assemblies(assembly):
    model = tiny_model("mae", assembly)
    with torch.no_grad():
        output = model(pixels(model))
        features = backbones.extract_features(model, pixels(model))
    expected = {
        "finetuned": output.finetuned_feature_maps,
        "original": output.original_feature_maps,
        "add": output.original_feature_maps + output.finetuned_feature_maps,
    }[assembly]
    torch.testing.assert_close(output.feature_maps, expected, rtol=0, atol=0)
    torch.testing.assert_close(features.feature_maps, expected, rtol=0, atol=0)


def test_extract_features_on_fit3d_model_assembles_every_field():
    model = tiny_model("dinov2_reg")
    with torch.no_grad():
        features = backbones.extract_features(model, pixels(model))
        original = backbones.extract_features(model.original, pixels(model))
    assert features.feature_maps.shape == features.unnormed_feature_maps.shape == (2, 64, 3, 5)
    assert features.cls_token.shape == (2, 64)
    torch.testing.assert_close(features.unnormed_cls_token[:, :32], original.unnormed_cls_token, rtol=0, atol=0)


def test_bad_config_and_image_size_errors():
    # transformers' strict configs wrap the ValueError in huggingface_hub's validation error.
    with pytest.raises(StrictDataclassClassValidationError, match="assembly must be one of"):
        FiT3DConfig(backbone_config=backbones.tiny_config("clip"), assembly="mean")
    model = tiny_model("clip")
    with pytest.raises(ValueError, match=r"image size 50x64 \(HxW\) is not a multiple of the patch size 16"):
        model(torch.randn(1, 3, 50, 64))


def test_original_is_frozen_and_gets_no_gradient(tmp_path):
    model = tiny_model("deit3")
    model.train()
    assert not model.original.training and model.finetuned.training
    model(pixels(model)).feature_maps.square().mean().backward()
    assert all(p.grad is None and not p.requires_grad for p in model.original.parameters())
    assert all(p.grad is not None for p in model.finetuned.parameters())
    model.save_pretrained(tmp_path)
    loaded = FiT3DModel.from_pretrained(tmp_path)
    assert not any(p.requires_grad for p in loaded.original.parameters())
    assert all(p.requires_grad for p in loaded.finetuned.parameters())


@pytest.mark.parametrize("family", backbones.FAMILIES)
def test_automodel_round_trip_is_exact(family, tmp_path):
    model = tiny_model(family, seed=3)
    save_with_processor(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "fit3d"
    assert config["auto_map"] == {"AutoConfig": "configuration_fit3d.FiT3DConfig", "AutoModel": "modeling_fit3d.FiT3DModel"}
    assert isinstance(AutoConfig.from_pretrained(tmp_path), FiT3DConfig)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is FiT3DModel
    assert backbones.family_of(loaded.config) == family
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels(model)).feature_maps, model(pixels(model)).feature_maps, rtol=0, atol=0)


FRESH_PROCESS = """
import sys, torch
from transformers import AutoModel
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert not any(name == "fit3d_hf" or name.startswith("fit3d_hf.") for name in sys.modules), "fit3d_hf was imported"
print(type(model).__module__)
pixel_values = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    torch.save(model(pixel_values).feature_maps, sys.argv[3])
"""


@pytest.mark.slow
def test_fresh_process_loads_with_trust_remote_code(tmp_path):
    model = tiny_model("clip", seed=4)
    model.save_pretrained(tmp_path / "model")
    pixel_values = pixels(model, rows=2, cols=6)
    torch.save(pixel_values, tmp_path / "pixels.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(FRESH_PROCESS),
            str(tmp_path / "model"),
            str(tmp_path / "pixels.pt"),
            str(tmp_path / "out.pt"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().startswith("transformers_modules.")
    with torch.no_grad():
        expected = model(pixel_values).feature_maps
    torch.testing.assert_close(torch.load(tmp_path / "out.pt", weights_only=True), expected, rtol=0, atol=0)


def test_processor_uses_the_family_mean_std_and_patch_multiples(tmp_path):
    save_with_processor(tiny_model("clip"), tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert tuple(processor.image_mean) == backbones.CLIP_MEAN and tuple(processor.image_std) == backbones.CLIP_STD
    image = Image.new("RGB", (150, 90), (200, 100, 50))  # W x H: landscape, not a multiple of 16
    pixel_values = processor(image, return_tensors="pt").pixel_values
    assert pixel_values.shape == (1, 3, 64, 112)  # short side 64 (native size), both multiples of 16
    expected = backbones.normalize(torch.tensor([200, 100, 50]).view(1, 3, 1, 1) / 255.0, backbones.tiny_config("clip"))
    torch.testing.assert_close(pixel_values, expected.expand_as(pixel_values), rtol=0, atol=1e-5)
    dino = backbones.make_image_processor(backbones.tiny_config("dinov2"))
    assert tuple(dino.image_mean) == backbones.IMAGENET_MEAN and dino.ensure_multiple_of == 14


def test_bf16_loading(tmp_path):
    model = tiny_model("dinov2", seed=5)
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        half = loaded(pixels(model).bfloat16()).feature_maps
        full = model(pixels(model)).feature_maps
    assert half.dtype == torch.bfloat16
    assert (half.float() - full).abs().max() < 0.1 * full.abs().max()


def test_image_feature_extraction_pipeline(tmp_path):
    model = tiny_model("mae", seed=6)
    save_with_processor(model, tmp_path)
    image = Image.fromarray((np.random.default_rng(0).random((70, 100, 3)) * 255).astype("uint8"))
    extractor = pipeline("image-feature-extraction", model=str(tmp_path))
    features = extractor(image, return_tensors=True)
    inputs = AutoImageProcessor.from_pretrained(tmp_path)(image, return_tensors="pt")
    with torch.no_grad():
        expected = model(inputs.pixel_values).last_hidden_state
    assert features.shape == expected.shape == (1, 4 * 6, 64)  # 70x100 -> 64x96
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-6)


def test_from_backbone_instance_and_path(tmp_path):
    torch.manual_seed(7)
    backbone = backbones.build_backbone(backbones.tiny_config("dinov2_reg")).eval()
    model = FiT3DModel.from_backbone(backbone, assembly="add")
    assert model.config.assembly == "add"
    for key, value in backbone.state_dict().items():
        torch.testing.assert_close(model.original.state_dict()[key], value, rtol=0, atol=0)
        torch.testing.assert_close(model.finetuned.state_dict()[key], value, rtol=0, atol=0)
    assert model.original.embeddings.cls_token.data_ptr() != model.finetuned.embeddings.cls_token.data_ptr()
    with torch.no_grad():
        output = model.eval()(pixels(model))
    torch.testing.assert_close(output.original_feature_maps, output.finetuned_feature_maps, rtol=0, atol=0)

    # A ViTModel saved with its pooler (transformers' default) loads from a path; the pooler is dropped.
    from transformers import ViTModel

    vit = ViTModel(backbones.tiny_config("mae")).eval()
    vit.save_pretrained(tmp_path / "vit")
    from_path = FiT3DModel.from_backbone(tmp_path / "vit").eval()
    with torch.no_grad():
        expected = backbones.extract_features(vit, pixels(from_path)).feature_maps
        output = from_path(pixels(from_path))
    torch.testing.assert_close(output.original_feature_maps, expected, rtol=0, atol=0)
    torch.testing.assert_close(output.finetuned_feature_maps, expected, rtol=0, atol=0)


def test_finetuned_backbone_saves_as_a_plain_transformers_model(tmp_path):
    model = tiny_model("clip", seed=8)
    model.finetuned.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "clip_vision_model"
    assert "auto_map" not in json.loads((tmp_path / "config.json").read_text())
    plain = AutoModel.from_pretrained(tmp_path).eval()
    assert type(plain).__name__ == "CLIPVisionModel"
    with torch.no_grad():
        expected = model(pixels(model)).finetuned_feature_maps
        torch.testing.assert_close(backbones.extract_features(plain, pixels(model)).feature_maps, expected, rtol=0, atol=0)


def test_sdpa_and_eager_agree(tmp_path):
    model = tiny_model("dinov2", seed=9)
    model.save_pretrained(tmp_path)
    eager = FiT3DModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    sdpa = FiT3DModel.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert eager.finetuned.config._attn_implementation == "eager"
    assert sdpa.finetuned.config._attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(eager(pixels(model)).feature_maps, sdpa(pixels(model)).feature_maps, rtol=1e-5, atol=1e-5)
