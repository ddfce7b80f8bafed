"""fit3d_hf.backbones: the adapter of every supported model type on tiny random configs."""

import pytest
import torch
from transformers import AutoModel

from fit3d_hf import FiT3DModel, backbones

torch.set_num_threads(1)

# Tokens before the patch grid of each family's tiny config (registers: 4 for DINOv2-reg and DINOv3;
# RADIO: 3 summary CLS tokens + 7 registers).
PREFIX_TOKENS = {
    "dinov2": 1, "dinov2_reg": 5, "clip": 1, "mae": 1, "deit3": 1, "dinov3": 5, "siglip": 0, "siglip2": 0,
    "ijepa": 0, "aimv2": 0, "vit_mae": 1, "metaclip2": 1, "radio": 10,
}  # fmt: skip


def tiny(family: str, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return backbones.build_backbone(backbones.tiny_config(family, **kwargs)).eval()


def pixels(config, rows: int = 3, cols: int = 5, batch: int = 2) -> torch.Tensor:
    patch = backbones.patch_size_of(config)
    return torch.randn(batch, 3, rows * patch, cols * patch, generator=torch.Generator().manual_seed(1))


def test_every_family_has_an_adapter_and_a_prefix_count():
    assert set(PREFIX_TOKENS) == set(backbones.FAMILIES)
    assert set(backbones.PAPER_FAMILIES) < set(backbones.FAMILIES)
    model_types = {backbones.tiny_config(family).model_type for family in backbones.FAMILIES}
    assert model_types == set(backbones.ADAPTERS)


@pytest.mark.parametrize("family", backbones.FAMILIES)
def test_features_shapes_norm_and_prefix_tokens(family):
    model = tiny(family)
    config = model.config
    assert backbones.family_of(config) == family
    assert backbones.num_prefix_tokens_of(config) == PREFIX_TOKENS[family]
    pixel_values = pixels(config)  # non-square, not the native 4x4 grid
    adapter = backbones.adapter_of(config)
    with torch.no_grad():
        features = backbones.extract_features(model, pixel_values)
        tokens = model(**adapter.model_inputs(model, pixel_values), output_hidden_states=True).hidden_states[-1]
    width = backbones.hidden_size_of(config)
    assert features.feature_maps.shape == features.unnormed_feature_maps.shape == (2, width, 3, 5)
    assert features.cls_token.shape == features.unnormed_cls_token.shape == (2, width)
    # The model's sequence is the prefix tokens then the 3x5 grid, row-major; the prefix is dropped.
    assert tokens.shape[1] == PREFIX_TOKENS[family] + 15
    torch.testing.assert_close(
        features.unnormed_feature_maps.flatten(2).transpose(1, 2), tokens[:, PREFIX_TOKENS[family] :], rtol=0, atol=0
    )
    summary = tokens[:, 0] if PREFIX_TOKENS[family] else tokens.mean(1)
    torch.testing.assert_close(features.unnormed_cls_token, summary, rtol=0, atol=0)
    if adapter.final_norm is None:  # RADIO: the last block's tokens are the features
        torch.testing.assert_close(features.feature_maps, features.unnormed_feature_maps, rtol=0, atol=0)
    else:
        final_norm = getattr(model, adapter.final_norm)
        renormed = final_norm(features.unnormed_feature_maps.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        torch.testing.assert_close(renormed, features.feature_maps, rtol=0, atol=1e-6)
        assert not torch.allclose(features.feature_maps, features.unnormed_feature_maps)


@pytest.mark.parametrize("family", backbones.FAMILIES)
def test_other_sizes_and_batch_independence(family):
    """A portrait grid, a landscape one and the native one all work; an image's features do not depend on its batch."""
    model = tiny(family)
    with torch.no_grad():
        for rows, cols in [(6, 2), (2, 7), (4, 4)]:
            batch = pixels(model.config, rows, cols)
            features = backbones.extract_features(model, batch).feature_maps
            assert features.shape[-2:] == (rows, cols)
            alone = backbones.extract_features(model, batch[1:]).feature_maps
            torch.testing.assert_close(alone, features[1:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", backbones.FAMILIES)
def test_bad_image_size_names_the_sizes(family):
    model = tiny(family)
    patch = backbones.patch_size_of(model.config)
    with pytest.raises(ValueError, match=rf"{3 * patch + 1}x{4 * patch}.*patch size {patch}"):
        backbones.extract_features(model, torch.randn(1, 3, 3 * patch + 1, 4 * patch))


@pytest.mark.parametrize("family", backbones.FAMILIES)
def test_save_and_load_backbone_is_exact(family, tmp_path):
    model = tiny(family, seed=2)
    model.save_pretrained(tmp_path)
    loaded = backbones.load_backbone(str(tmp_path)).eval()
    assert type(loaded) is type(model) and backbones.family_of(loaded.config) == family
    with torch.no_grad():
        torch.testing.assert_close(
            backbones.extract_features(loaded, pixels(model.config)).feature_maps,
            backbones.extract_features(model, pixels(model.config)).feature_maps,
            rtol=0,
            atol=0,
        )


LEARNED_TABLE_FAMILIES = [
    f for f in backbones.FAMILIES if backbones.adapter_of(backbones.tiny_config(f)).positions in ("timm", "aimv2")
]


@pytest.mark.parametrize("family", LEARNED_TABLE_FAMILIES)
def test_timm_resampling_is_installed_once_and_on_plain_models(family, tmp_path):
    model = tiny(family, seed=3)
    method = "forward" if family == "aimv2" else "interpolate_pos_encoding"
    installed = model.embeddings.__dict__[method]
    with torch.no_grad():
        ours = backbones.extract_features(model, pixels(model.config)).feature_maps
        backbones.extract_features(model, pixels(model.config))
    assert model.embeddings.__dict__[method] is installed  # not re-installed on every call
    # A model loaded with plain transformers resamples its own way until extract_features prepares it.
    model.save_pretrained(tmp_path)
    plain = type(model).from_pretrained(tmp_path).eval()  # AutoModel has no MetaClip2VisionModel entry
    assert method not in plain.embeddings.__dict__
    with torch.no_grad():
        again = backbones.extract_features(plain, pixels(model.config)).feature_maps
    assert method in plain.embeddings.__dict__
    torch.testing.assert_close(again, ours, rtol=0, atol=0)


def test_timm_resampling_differs_from_transformers_default():
    model = tiny("mae")
    pixel_values = pixels(model.config)
    with torch.no_grad():
        ours = backbones.extract_features(model, pixel_values).feature_maps
        del model.embeddings.interpolate_pos_encoding  # back to the transformers method
        stock = model(pixel_values=pixel_values, interpolate_pos_encoding=True).last_hidden_state
    assert (ours.flatten(2).transpose(1, 2) - stock[:, 1:]).abs().max() > 1e-3


def test_vit_mae_keeps_every_patch_in_grid_order():
    """A plain ViTMAEModel masks 75% and shuffles; extract_features reads all patches in order, deterministically."""
    from transformers import ViTMAEModel

    torch.manual_seed(4)
    config = backbones.tiny_config("vit_mae", mask_ratio=0.75)
    plain = ViTMAEModel(config).eval()
    with torch.no_grad():
        first = backbones.extract_features(plain, pixels(config)).feature_maps
        second = backbones.extract_features(plain, pixels(config)).feature_maps
    assert plain.config.mask_ratio == 0.0 and first.shape == (2, 32, 3, 5)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    # Moving one patch's pixels changes that patch's token most: the tokens are in grid order.
    edited = pixels(config).clone()
    edited[:, :, 16:32, 48:64] += 3.0  # row 1, column 3
    with torch.no_grad():
        change = (
            backbones.extract_features(plain, edited).unnormed_feature_maps
            - backbones.extract_features(plain, pixels(config)).unnormed_feature_maps
        ).norm(dim=1)
    assert change[0].flatten().argmax().item() == 1 * 5 + 3


def test_resample_position_table_matches_timm():
    timm_layers = pytest.importorskip("timm.layers")
    table = torch.randn(1, 1 + 6 * 6, 8)
    ours = backbones.resample_position_table(table, (4, 9))
    reference = timm_layers.resample_abs_pos_embed(table, new_size=(4, 9), old_size=(6, 6), num_prefix_tokens=1)
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    assert backbones.resample_position_table(table, (6, 6)) is table
    no_prefix = table[:, 1:]
    reference = timm_layers.resample_abs_pos_embed(no_prefix, new_size=(4, 9), old_size=(6, 6), num_prefix_tokens=0)
    torch.testing.assert_close(backbones.resample_position_table(no_prefix, (4, 9), num_prefix_rows=0), reference, rtol=0, atol=0)


def test_fullgraph_compile_matches_eager():
    """A built backbone needs no re-patching inside the forward, so dynamo traces it as one graph."""
    model = tiny("dinov2_reg")
    pixel_values = pixels(model.config)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: backbones.extract_features(model, x).feature_maps, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(pixel_values), backbones.extract_features(model, pixel_values).feature_maps)


@pytest.mark.slow
@pytest.mark.parametrize("family", backbones.FAMILIES)
def test_fullgraph_compile_every_family(family):
    model = tiny(family)
    pixel_values = pixels(model.config)
    torch._dynamo.reset()
    # Inductor for one family (it compiles C++ for minutes on a CPU); dynamo's graph capture for the others.
    backend = "inductor" if family == "dinov3" else "eager"
    compiled = torch.compile(lambda x: backbones.extract_features(model, x).feature_maps, fullgraph=True, backend=backend)
    with torch.no_grad():
        expected = backbones.extract_features(model, pixel_values).feature_maps
        torch.testing.assert_close(compiled(pixel_values), expected, rtol=1e-4, atol=1e-4)


def test_image_mean_std_and_normalize():
    expected = {
        "clip": backbones.CLIP_MEAN, "metaclip2": backbones.CLIP_MEAN, "aimv2": backbones.CLIP_MEAN,
        "dinov2": backbones.IMAGENET_MEAN, "dinov3": backbones.IMAGENET_MEAN, "ijepa": backbones.IMAGENET_MEAN,
        "siglip": (0.5, 0.5, 0.5), "siglip2": (0.5, 0.5, 0.5), "radio": (0.0, 0.0, 0.0),
    }  # fmt: skip
    for family, mean in expected.items():
        assert backbones.image_mean_std(backbones.tiny_config(family))[0] == mean
    images = torch.rand(2, 3, 4, 5)
    pixel_values = backbones.normalize(images, backbones.tiny_config("clip"))
    torch.testing.assert_close(pixel_values[:, 1], (images[:, 1] - 0.4578275) / 0.26130258)
    # RADIO normalises inside the model: its pixel_values are the images.
    torch.testing.assert_close(backbones.normalize(images, backbones.tiny_config("radio")), images)


def test_recorded_normalization_is_used_everywhere(tmp_path):
    """`set_normalization(config, "imagenet")` (the official code's, for every family) is saved with the config and
    read by `normalize`, `image_mean_std` and the image processor; `with_normalization` leaves the config alone."""
    from fit3d_hf import FiT3DConfig

    config = backbones.tiny_config("clip")
    assert backbones.normalization_of(config) == "family" and backbones.image_mean_std(config)[0] == backbones.CLIP_MEAN
    copy = backbones.with_normalization(config, "imagenet")
    assert backbones.normalization_of(config) == "family" and backbones.with_normalization(config, None) is config
    images = torch.rand(1, 3, 4, 5)
    expected = (images - torch.tensor(backbones.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(backbones.IMAGENET_STD).view(
        1, 3, 1, 1
    )
    torch.testing.assert_close(backbones.normalize(images, copy), expected)
    fit3d = FiT3DConfig(backbone_config=copy)
    fit3d.save_pretrained(tmp_path)
    loaded = FiT3DConfig.from_pretrained(tmp_path)
    assert backbones.normalization_of(loaded) == "imagenet" and backbones.image_mean_std(loaded)[1] == backbones.IMAGENET_STD
    assert tuple(backbones.make_image_processor(loaded).image_mean) == backbones.IMAGENET_MEAN
    with pytest.raises(ValueError, match="normalization must be one of"):
        backbones.set_normalization(config, "clip")
    with pytest.raises(ValueError, match="radio normalises its input inside the model"):
        backbones.set_normalization(backbones.tiny_config("radio"), "imagenet")


def test_processor_sizes_follow_the_native_size():
    siglip2 = backbones.make_image_processor(backbones.tiny_config("siglip2"))
    assert siglip2.size == {"height": 64, "width": 64} and siglip2.ensure_multiple_of == 16  # sqrt(16 patches) * 16
    assert backbones.native_image_size(backbones.preset_config("siglip2_base")) == 256
    assert backbones.make_image_processor(backbones.preset_config("dinov3_base")).size["height"] == 224


def test_presets_and_errors():
    paper = {"dinov2_small", "dinov2_base", "dinov2_reg_small", "clip_base", "mae_base", "deit3_base"}
    assert paper < set(backbones.PRESETS)
    assert {family for family, _ in backbones.PRESETS.values()} == set(backbones.FAMILIES)
    deit3 = backbones.preset_config("deit3_base")
    assert (backbones.family_of(deit3), backbones.patch_size_of(deit3), backbones.hidden_size_of(deit3)) == ("deit3", 16, 768)
    assert backbones.preset_config("clip_base").hidden_act == "gelu"
    giant = backbones.preset_config("dinov2_giant")
    assert giant.use_swiglu_ffn and giant.hidden_size == 1536
    huge_plus = backbones.preset_config("dinov3_huge_plus")
    assert huge_plus.use_gated_mlp and backbones.num_prefix_tokens_of(huge_plus) == 5
    with pytest.raises(ValueError, match="unknown backbone family 'swin'"):
        backbones.backbone_config("swin")
    with pytest.raises(ValueError, match="unknown backbone family 'swin'"):
        backbones.tiny_config("swin")
    with pytest.raises(ValueError, match="unknown preset 'dinov2_huge'"):
        backbones.preset_config("dinov2_huge")


def test_unsupported_model_type_lists_the_supported_ones_and_what_an_adapter_needs():
    from transformers import BertConfig, SwinConfig

    for config in (BertConfig(), SwinConfig()):
        with pytest.raises(ValueError) as error:
            backbones.family_of(config)
        message = str(error.value)
        assert f"model_type {config.model_type!r}" in message
        assert "'dinov3_vit'" in message and "'radio'" in message and "'siglip2_vision_model'" in message
        assert "prefix tokens" in message and "final norm" in message
    with pytest.raises(ValueError, match="model_type 'swin'"):
        backbones.build_backbone(SwinConfig())


def test_a_checkpoint_that_does_not_fill_the_model_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny("ijepa").save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["layernorm.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 1 weight\(s\) of the model \(layernorm.weight\).*IJepaModel"):
        backbones.load_backbone(str(tmp_path))


def test_a_fit3d_folder_is_not_a_backbone(tmp_path):
    FiT3DModel.from_backbone(tiny("dinov2")).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds a FiT3DModel.*model.finetuned.save_pretrained"):
        backbones.load_backbone(str(tmp_path))


def test_backbone_specs_of_new_families():
    from fit3d_hf.backbone_specs import backbone_name, load_backbone_spec

    first, name = load_backbone_spec("tiny:dinov3", seed=1)
    again, _ = load_backbone_spec("tiny:dinov3", seed=1)
    assert name == "tiny:dinov3 (random init, seed 1)" == backbone_name(first)
    assert backbones.weights_checksum(first) == backbones.weights_checksum(again) != backbones.weights_checksum(tiny("dinov3"))
    with torch.device("meta"):  # a published size, without allocating it
        large, _ = load_backbone_spec("random:aimv2_1b")
    assert type(large).__name__ == "Aimv2VisionModel" and backbones.hidden_size_of(large.config) == 2048
    with pytest.raises(ValueError, match="unknown backbone family 'swin'.*dinov3"):
        load_backbone_spec("tiny:swin")


def test_deit3_family_survives_save_and_load(tmp_path):
    model = tiny("deit3")
    model.save_pretrained(tmp_path)
    loaded = backbones.load_backbone(str(tmp_path))
    assert type(loaded).__name__ == "Dinov2Model"
    assert backbones.family_of(loaded.config) == "deit3"


@pytest.mark.parametrize(
    ("composite", "family"),
    [
        ("SiglipConfig", "siglip"),
        ("Siglip2Config", "siglip2"),
        ("CLIPConfig", "clip"),
        ("MetaClip2Config", "metaclip2"),
        ("Aimv2Config", "aimv2"),
    ],
)
def test_image_text_model_loads_as_its_vision_tower(composite, family, tmp_path):
    import transformers

    vision = backbones.tiny_config(family).to_dict()
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99)
    config = getattr(transformers, composite)(text_config=text, vision_config=vision)
    torch.manual_seed(5)
    full = AutoModel.from_config(config).eval()
    full.save_pretrained(tmp_path)
    tower = backbones.load_backbone(str(tmp_path)).eval()
    assert backbones.family_of(tower.config) == family
    state = full.state_dict()
    for key, value in tower.state_dict().items():
        torch.testing.assert_close(value, state[f"vision_model.{key}"], rtol=0, atol=0)


def test_heads_fit3d_does_not_build_are_dropped_by_from_backbone():
    from transformers import SiglipVisionModel

    config = backbones.tiny_config("siglip", vision_use_head=True)
    with_head = SiglipVisionModel(config).eval()
    assert any(key.startswith("head.") for key in with_head.state_dict())
    model = FiT3DModel.from_backbone(with_head).eval()
    assert not any(key.startswith("head.") for key in backbones.backbone_state_dict(with_head))
    with torch.no_grad():
        expected = backbones.extract_features(with_head, pixels(config)).feature_maps
        torch.testing.assert_close(model(pixels(config)).original_feature_maps, expected, rtol=0, atol=0)
