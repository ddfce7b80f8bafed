import json
from dataclasses import asdict, replace

import pytest
import torch

from fit3d_hf.backbones import extract_features, normalize
from fit3d_hf.embedded import (
    EMBEDDED_BACKBONE_DIR,
    EmbeddedPretrainConfig,
    load_embedded_backbone,
    patchify,
    pretrain_embedded_backbone,
    random_block_mask,
    save_embedded_backbone,
)

TINY = EmbeddedPretrainConfig(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=32,
    crop_height=32,
    crop_width=48,
    steps=40,
    batch_size=8,
    learning_rate=2e-3,
    warmup_steps=5,
)


def test_block_mask_masks_whole_blocks_at_the_ratio():
    mask = random_block_mask(4, 6, 8, block=2, ratio=0.5, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (4, 48) and mask.dtype == torch.bool
    blocks = mask.view(4, 3, 2, 4, 2)
    # Every 2x2 block is all masked or all visible, and half of the 12 blocks are masked.
    assert torch.equal(blocks.all(dim=(2, 4)), blocks.any(dim=(2, 4)))
    assert blocks.all(dim=(2, 4)).sum(dim=(1, 2)).tolist() == [6, 6, 6, 6]


def test_patchify_follows_the_token_order():
    images = torch.rand(2, 3, 16, 24)
    patches = patchify(images, 8)
    assert patches.shape == (2, 6, 192)
    # Token 4 is row 1, column 1 of the 2x3 grid; pixels are stored (y, x, channel).
    expected = images[1, :, 8:16, 8:16].permute(1, 2, 0).reshape(-1)
    assert torch.equal(patches[1, 4], expected)


def test_pretraining_lowers_the_masked_patch_loss(tmp_path):
    generator = torch.Generator().manual_seed(0)
    # Smooth random images: predictable from context, so SimMIM can learn something in 40 steps.
    images = torch.nn.functional.interpolate(torch.rand(16, 3, 4, 6, generator=generator), size=(40, 56), mode="bilinear")
    result = pretrain_embedded_backbone(TINY, images=images, progress=False)
    assert len(result.losses) == TINY.steps
    assert sum(result.losses[-8:]) / 8 < 0.95 * sum(result.losses[:8]) / 8
    path = save_embedded_backbone(result, TINY, tmp_path / "backbone")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone"]
    record = json.loads((path / "pretraining.json").read_text())
    assert record["config"]["seed"] == TINY.seed and len(record["losses"]) == TINY.steps
    loaded = load_embedded_backbone(path)
    assert next(loaded.parameters()).dtype == torch.float32
    pixel_values = normalize(images[:2, :, :32, :48], loaded.config)
    with torch.no_grad():
        expected = extract_features(result.model.half().float(), pixel_values).feature_maps
        got = extract_features(loaded, pixel_values).feature_maps
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_missing_weights_name_the_command_that_makes_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="fit3d pretrain_embedded --output"):
        load_embedded_backbone(tmp_path)


def test_shipped_backbone_is_small_and_matches_the_documented_recipe():
    weights = EMBEDDED_BACKBONE_DIR / "model.safetensors"
    assert weights.stat().st_size < 6e6
    record = json.loads((EMBEDDED_BACKBONE_DIR / "pretraining.json").read_text())
    # The defaults of EmbeddedPretrainConfig are the recipe that made the shipped weights.
    assert record["config"] == json.loads(json.dumps(asdict(EmbeddedPretrainConfig())))
    assert record["loss_last_50"] < record["loss_first_50"]
    model = load_embedded_backbone()
    assert (model.config.patch_size, model.config.hidden_size) == (8, record["config"]["hidden_size"])
    with torch.no_grad():
        features = extract_features(model, normalize(torch.rand(1, 3, 120, 160), model.config)).feature_maps
    assert features.shape == (1, model.config.hidden_size, 15, 20) and torch.isfinite(features).all()


@pytest.mark.slow
def test_pretraining_run_reproduces_the_shipped_start():
    """The first steps of `python -m fit3d_hf.embedded` (defaults) give the recorded losses."""
    record = json.loads((EMBEDDED_BACKBONE_DIR / "pretraining.json").read_text())
    result = pretrain_embedded_backbone(replace(EmbeddedPretrainConfig(), steps=3), progress=False)
    # Within warm-up the lr does not depend on the total steps, so the first losses must agree.
    assert result.losses == pytest.approx(record["losses"][:3], abs=2e-3)
