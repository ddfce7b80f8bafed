"""fit3d_hf.backbones on tiny random configs of every family."""

import pytest
import torch

from fit3d_hf import backbones

torch.set_num_threads(1)


@pytest.mark.parametrize("family", backbones.FAMILIES)
def test_extract_features_shapes_and_norm(family):
    config = backbones.tiny_config(family)
    model = backbones.build_backbone(config).eval()
    assert backbones.family_of(config) == family
    patch = backbones.patch_size_of(config)
    pixel_values = torch.randn(2, 3, 3 * patch, 5 * patch)  # non-square, not the native 4x4 grid
    with torch.no_grad():
        features = backbones.extract_features(model, pixel_values)
    width = backbones.hidden_size_of(config)
    assert features.feature_maps.shape == (2, width, 3, 5)
    assert features.unnormed_feature_maps.shape == (2, width, 3, 5)
    assert features.cls_token.shape == features.unnormed_cls_token.shape == (2, width)
    # The normed maps are the final norm of the unnormed ones (CLIP: post_layernorm on every token).
    final_norm = model.post_layernorm if family == "clip" else model.layernorm
    renormed = final_norm(features.unnormed_feature_maps.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(renormed, features.feature_maps, rtol=0, atol=1e-6)
    assert not torch.allclose(features.feature_maps, features.unnormed_feature_maps)


def test_prefix_tokens_dropped():
    config = backbones.tiny_config("dinov2_reg")
    model = backbones.build_backbone(config).eval()
    assert backbones.num_prefix_tokens_of(config) == 5
    pixel_values = torch.randn(1, 3, 28, 42)
    with torch.no_grad():
        tokens = model(pixel_values=pixel_values).last_hidden_state
        features = backbones.extract_features(model, pixel_values)
    assert tokens.shape[1] == 5 + 2 * 3
    torch.testing.assert_close(features.feature_maps.flatten(2).transpose(1, 2), tokens[:, 5:], rtol=0, atol=0)
    torch.testing.assert_close(features.cls_token, tokens[:, 0], rtol=0, atol=0)


@pytest.mark.parametrize("family", backbones.FAMILIES)
def test_bad_image_size_names_the_sizes(family):
    config = backbones.tiny_config(family)
    model = backbones.build_backbone(config)
    patch = backbones.patch_size_of(config)
    with pytest.raises(ValueError, match=rf"{3 * patch + 1}x{4 * patch}.*patch size {patch}"):
        backbones.extract_features(model, torch.randn(1, 3, 3 * patch + 1, 4 * patch))


def test_timm_interpolation_differs_from_transformers_default_and_is_installed_on_plain_models():
    config = backbones.tiny_config("mae")
    model = backbones.build_backbone(config).eval()
    pixel_values = torch.randn(1, 3, 48, 80)
    with torch.no_grad():
        ours = backbones.extract_features(model, pixel_values).feature_maps
        del model.embeddings.interpolate_pos_encoding  # back to the transformers method
        stock = model(pixel_values=pixel_values, interpolate_pos_encoding=True).last_hidden_state
        again = backbones.extract_features(model, pixel_values).feature_maps  # re-installs timm's
    assert (ours.flatten(2).transpose(1, 2) - stock[:, 1:]).abs().max() > 1e-3
    torch.testing.assert_close(again, ours, rtol=0, atol=0)


def test_resample_position_table_matches_timm():
    timm_layers = pytest.importorskip("timm.layers")
    table = torch.randn(1, 1 + 6 * 6, 8)
    ours = backbones.resample_position_table(table, (4, 9))
    reference = timm_layers.resample_abs_pos_embed(table, new_size=(4, 9), old_size=(6, 6), num_prefix_tokens=1)
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    assert backbones.resample_position_table(table, (6, 6)) is table


def test_image_mean_std_and_normalize():
    clip, dino = backbones.tiny_config("clip"), backbones.tiny_config("dinov2")
    assert backbones.image_mean_std(clip) == (backbones.CLIP_MEAN, backbones.CLIP_STD)
    assert backbones.image_mean_std(dino) == (backbones.IMAGENET_MEAN, backbones.IMAGENET_STD)
    images = torch.rand(2, 3, 4, 5)
    pixel_values = backbones.normalize(images, clip)
    expected = (images[:, 1] - 0.4578275) / 0.26130258
    torch.testing.assert_close(pixel_values[:, 1], expected)


def test_presets_and_family_errors():
    assert set(backbones.PRESETS) == {"dinov2_small", "dinov2_base", "dinov2_reg_small", "clip_base", "mae_base", "deit3_base"}
    deit3 = backbones.preset_config("deit3_base")
    assert (backbones.family_of(deit3), backbones.patch_size_of(deit3), backbones.hidden_size_of(deit3)) == ("deit3", 16, 768)
    assert backbones.family_of(backbones.preset_config("dinov2_small")) == "dinov2"
    assert backbones.preset_config("clip_base").hidden_act == "gelu"
    with pytest.raises(ValueError, match="unknown backbone family 'swin'"):
        backbones.backbone_config("swin")
    with pytest.raises(ValueError, match="unknown preset 'dinov2_huge'"):
        backbones.preset_config("dinov2_huge")
    from transformers import BertConfig

    with pytest.raises(ValueError, match="model_type 'bert'"):
        backbones.family_of(BertConfig())


def test_deit3_family_survives_save_and_load(tmp_path):
    model = backbones.build_backbone(backbones.tiny_config("deit3"))
    model.save_pretrained(tmp_path)
    loaded = backbones.load_backbone(str(tmp_path))
    assert type(loaded).__name__ == "Dinov2Model"
    assert backbones.family_of(loaded.config) == "deit3"
    pixel_values = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(
            backbones.extract_features(loaded, pixel_values).feature_maps,
            backbones.extract_features(model.eval(), pixel_values).feature_maps,
            rtol=0,
            atol=0,
        )
