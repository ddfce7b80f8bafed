"""FiT3DConfig / FiT3DModel / FiT3DBackbone: shapes, forward conventions, Auto classes, remote code, processor,
bf16, pipelines, from_backbone, dense heads, compile and export."""

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
from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    UperNetConfig,
    UperNetForSemanticSegmentation,
    pipeline,
)

from fit3d_hf import FiT3DBackbone, FiT3DConfig, FiT3DModel, backbones

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
    assert config["auto_map"] == {
        "AutoConfig": "configuration_fit3d.FiT3DConfig",
        "AutoModel": "modeling_fit3d.FiT3DModel",
        "AutoBackbone": "modeling_fit3d.FiT3DBackbone",
    }
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
from transformers import AutoBackbone, AutoConfig, AutoModel
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
# AutoBackbone.from_pretrained takes Hub ids only in transformers 5.24; from_config reads the same auto_map.
backbone = AutoBackbone.from_config(AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True), trust_remote_code=True)
backbone.load_state_dict(model.state_dict())
assert not any(name == "fit3d_hf" or name.startswith("fit3d_hf.") for name in sys.modules), "fit3d_hf was imported"
print(type(model).__module__, type(backbone).__name__)
pixel_values = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    torch.save(model(pixel_values).feature_maps, sys.argv[3])
    torch.testing.assert_close(backbone.eval()(pixel_values).feature_maps[-1], model(pixel_values).feature_maps)
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
    assert result.stdout.strip().startswith("transformers_modules.") and result.stdout.strip().endswith(" FiT3DBackbone")
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


def test_from_pretrained_with_output_loading_info(tmp_path):
    # Regression: the override froze `.original` on the `(model, loading_info)` tuple and crashed.
    tiny_model("dinov2", seed=10).save_pretrained(tmp_path)
    for model_class in (FiT3DModel, FiT3DBackbone):
        model, info = model_class.from_pretrained(tmp_path, output_loading_info=True)
        assert type(model) is model_class
        assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
        assert not any(p.requires_grad for p in model.original.parameters())
        assert all(p.requires_grad for p in model.finetuned.parameters())


def test_hidden_states_and_attentions_are_each_copys_own():
    torch.manual_seed(11)
    config = FiT3DConfig(backbone_config=backbones.tiny_config("dinov2_reg"), attn_implementation="eager")
    model = FiT3DModel(config).eval()
    with torch.no_grad():
        output = model(pixels(model), output_hidden_states=True, output_attentions=True)
        attentions = backbones.extract_features(model.finetuned, pixels(model), output_attentions=True).attentions
    assert len(output.hidden_states) == len(output.original_hidden_states) == 3  # embeddings + 2 blocks
    assert output.hidden_states[0].shape == (2, 5 + 15, 32)  # CLS + 4 registers + 3x5 patches, one copy's width
    assert len(output.attentions) == len(output.original_attentions) == 2
    assert output.attentions[0].shape == (2, 2, 20, 20)
    # Each copy's last hidden state, normed and without the prefix tokens, is that copy's features.
    for name, hidden_states, feature_maps in (
        ("finetuned", output.hidden_states, output.finetuned_feature_maps),
        ("original", output.original_hidden_states, output.original_feature_maps),
    ):
        normed = getattr(model, name).layernorm(hidden_states[-1])[:, 5:]
        torch.testing.assert_close(normed, feature_maps.flatten(2).transpose(1, 2), rtol=0, atol=1e-6)
    torch.testing.assert_close(output.attentions[1], attentions[1], rtol=0, atol=0)
    assert not torch.equal(output.original_attentions[1], output.attentions[1])  # the copies' weights differ
    # An index list keeps those hidden states only; nothing is returned unless asked for.
    with torch.no_grad():
        selected = model(pixels(model), output_hidden_states=[0, -1])
        bare = model(pixels(model))
    assert selected.hidden_states[1] is None
    torch.testing.assert_close(selected.hidden_states[2], output.hidden_states[2], rtol=0, atol=0)
    assert bare.hidden_states is bare.attentions is bare.original_hidden_states is None


def test_return_dict_false_gives_the_tuple_with_last_hidden_state_first():
    model = tiny_model("mae", seed=12)
    with torch.no_grad():
        output = model(pixels(model))
        as_tuple = model(pixels(model), return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 6  # the non-None fields, in declaration order
    torch.testing.assert_close(as_tuple[0], output.last_hidden_state, rtol=0, atol=0)
    torch.testing.assert_close(as_tuple[1], output.pooler_output, rtol=0, atol=0)


@pytest.mark.parametrize("assembly", ["concat", "add"])
def test_pooled_output_is_the_assembled_cls_token(assembly):
    model = tiny_model("clip", assembly=assembly, seed=13)
    with torch.no_grad():
        output = model(pixels(model))
        original = backbones.extract_features(model.original, pixels(model)).cls_token
        finetuned = backbones.extract_features(model.finetuned, pixels(model)).cls_token
    expected = torch.cat([original, finetuned], 1) if assembly == "concat" else original + finetuned
    torch.testing.assert_close(output.pooler_output, expected, rtol=0, atol=0)
    torch.testing.assert_close(output.cls_token, original, rtol=0, atol=0)


def test_image_feature_extraction_pipeline_pooled(tmp_path):
    model = tiny_model("dinov2", seed=14)
    save_with_processor(model, tmp_path)
    image = Image.fromarray((np.random.default_rng(1).random((60, 90, 3)) * 255).astype("uint8"))
    pooled = pipeline("image-feature-extraction", model=str(tmp_path))(image, pool=True, return_tensors=True)
    inputs = AutoImageProcessor.from_pretrained(tmp_path)(image, return_tensors="pt")
    with torch.no_grad():
        expected = model(inputs.pixel_values).pooler_output
    assert pooled.shape == expected.shape == (1, 64)
    torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-6)


def test_backbone_stages_in_the_config(tmp_path):
    backbone_config = backbones.tiny_config("clip", num_hidden_layers=3)
    config = FiT3DConfig(backbone_config=backbone_config)
    assert config.stage_names == ["stem", "stage1", "stage2", "stage3"]
    assert (config.out_features, config.out_indices) == (["stage3"], [3])  # the last stage by default
    config = FiT3DConfig(backbone_config=backbone_config, out_indices=[1, 3])
    assert config.out_features == ["stage1", "stage3"]
    assert FiT3DConfig(backbone_config=backbone_config, out_features=["stem", "stage2"]).out_indices == [0, 2]
    config.save_pretrained(tmp_path)
    assert FiT3DConfig.from_pretrained(tmp_path).out_features == ["stage1", "stage3"]
    with pytest.raises(ValueError, match="out_features must be a subset of stage_names"):
        FiT3DConfig(backbone_config=backbone_config, out_features=["stage4"])
    with pytest.raises(ValueError, match="should correspond to the same stages"):
        FiT3DConfig(backbone_config=backbone_config, out_features=["stage1"], out_indices=[2])


@pytest.mark.parametrize("family", backbones.FAMILIES)
def test_backbone_stages_are_normed_layers_of_both_copies(family, tmp_path):
    model = tiny_model(family, seed=15)
    model.save_pretrained(tmp_path)
    assert type(AutoBackbone.from_config(AutoConfig.from_pretrained(tmp_path))) is FiT3DBackbone
    # transformers 5.24's AutoBackbone.from_pretrained takes Hub ids only (it asks the Hub whether the repo
    # exists, and a local path fails validation), so a local folder loads through the class.
    backbone = FiT3DBackbone.from_pretrained(tmp_path, out_indices=[0, 1, 2]).eval()
    assert backbone.channels == [64, 64, 64]
    num_prefix = backbones.num_prefix_tokens_of(model.config)
    with torch.no_grad():
        stages = backbone(pixels(model)).feature_maps
        expected_last = model(pixels(model)).feature_maps
        layer = {
            name: copy(
                **backbones.adapter_of(copy.config).model_inputs(copy, pixels(model)), output_hidden_states=True
            ).hidden_states[1]
            for name, copy in (("original", model.original), ("finetuned", model.finetuned))
        }
    assert [stage.shape for stage in stages] == [(2, 64, 3, 5)] * 3
    torch.testing.assert_close(stages[-1], expected_last, rtol=0, atol=0)  # the last stage is FiT3DModel's output
    for half, name in ((slice(0, 32), "original"), (slice(32, 64), "finetuned")):
        norm = backbones.final_norm_of(getattr(model, name))
        expected = norm(layer[name])[:, num_prefix:].transpose(1, 2).reshape(2, 32, 3, 5)
        torch.testing.assert_close(stages[1][:, half], expected, rtol=0, atol=1e-6)


def test_backbone_in_upernet_forward_and_backward():
    torch.manual_seed(16)
    fit3d_config = FiT3DConfig(backbone_config=backbones.tiny_config("dinov2", num_hidden_layers=3), out_indices=[1, 2, 3])
    config = UperNetConfig(
        backbone_config=fit3d_config, hidden_size=16, auxiliary_in_channels=64, auxiliary_channels=16, num_labels=3
    )
    model = UperNetForSemanticSegmentation(config).train()
    assert type(model.backbone) is FiT3DBackbone and model.backbone.channels == [64, 64, 64]
    pixel_values = torch.randn(2, 3, 14 * 3, 14 * 4)
    labels = torch.randint(0, 3, (2, 14 * 3, 14 * 4))
    output = model(pixel_values=pixel_values, labels=labels)
    assert output.logits.shape == (2, 3, 14 * 3, 14 * 4)
    output.loss.backward()
    assert all(p.grad is None for p in model.backbone.original.parameters())
    assert model.backbone.finetuned.encoder.layer[0].attention.q_proj.weight.grad.abs().sum() > 0
    assert not model.backbone.original.training and model.backbone.finetuned.training


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph(backend, tmp_path):
    torch._dynamo.reset()
    model = tiny_model("dinov2_reg", seed=17)
    # A loaded model (built on the meta device, then prepared) compiles as one graph too.
    model.save_pretrained(tmp_path)
    model = FiT3DModel.from_pretrained(tmp_path).eval()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    with torch.no_grad():
        expected = model(pixels(model))
        output = compiled(pixels(model))
    torch.testing.assert_close(output.feature_maps, expected.feature_maps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(output.pooler_output, expected.pooler_output, rtol=1e-5, atol=1e-5)


def test_torch_export_matches_eager():
    model = tiny_model("clip", seed=18)
    pixel_values = pixels(model, rows=2, cols=6)  # not the native 4x4 grid: the position table is resampled
    program = torch.export.export(model, (pixel_values,))
    with torch.no_grad():
        exported, expected = program.module()(pixel_values), model(pixel_values)
    torch.testing.assert_close(exported.feature_maps, expected.feature_maps, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_onnx_export_with_dynamic_image_size(tmp_path):
    pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript")
    onnxruntime = pytest.importorskip("onnxruntime")
    model = tiny_model("dinov2", seed=19)
    height, width = torch.export.Dim("height", min=1, max=64), torch.export.Dim("width", min=1, max=64)
    torch.onnx.export(
        model,
        (pixels(model, rows=3, cols=5),),
        tmp_path / "fit3d.onnx",
        dynamo=True,  # the TorchScript exporter has no ONNX op for antialiased bicubic resampling
        input_names=["pixel_values"],
        output_names=["last_hidden_state", "pooler_output", "feature_maps"],
        dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch", max=64), 2: 14 * height, 3: 14 * width}},
    )
    session = onnxruntime.InferenceSession(str(tmp_path / "fit3d.onnx"))
    for rows, cols, batch in ((3, 5, 2), (6, 2, 1), (4, 4, 3)):  # 4x4 is the native grid
        pixel_values = pixels(model, rows=rows, cols=cols, batch=batch)
        (feature_maps,) = session.run(["feature_maps"], {"pixel_values": pixel_values.numpy()})
        with torch.no_grad():
            expected = model(pixel_values).feature_maps
        torch.testing.assert_close(torch.from_numpy(feature_maps), expected, rtol=1e-4, atol=1e-4)
