"""Features of the families beyond the paper's six against timm's reference implementations.

Each test builds a shrunken timm architecture with every parameter random (norms and layer scales
included), maps its weights onto `build_backbone(tiny_config(family))` of the same sizes and
compares the last block's features (normed and unnormed, prefix tokens dropped) at a non-native,
non-square patch grid. The paper's six are compared in tests/test_convert.py.
"""

import re

import pytest
import torch

from fit3d_hf import backbones
from fit3d_hf.convert import _BLOCK_NAMES, timm_to_transformers

timm = pytest.importorskip("timm")
torch.set_num_threads(1)

WIDTH, DEPTH, HEADS, GRID = 64, 2, 2, (3, 7)


def random_timm_model(name: str, patch: int, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A shrunken timm architecture with a native 4x4 grid and every parameter random."""
    torch.manual_seed(seed)
    kwargs = {"depth": DEPTH, "embed_dim": WIDTH, "num_heads": HEADS, "num_classes": 0, **kwargs}
    model = timm.create_model(name, pretrained=False, img_size=4 * patch, **kwargs)
    with torch.no_grad():
        for key, param in model.named_parameters():
            is_norm_scale = key.endswith("weight") and param.ndim == 1
            param.copy_((1.0 if is_norm_scale else 0.0) + 0.3 * torch.randn_like(param))
    return model.eval()


def timm_tokens(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, unnormed) tokens `[B, P + h*w, C]` of the last block."""
    captured = {}
    hook = model.blocks[-1].register_forward_hook(lambda module, args, output: captured.update(tokens=output))
    with torch.no_grad():
        normed = model.forward_features(images)
    hook.remove()
    return normed, captured["tokens"]


# SigLIP and SigLIP 2 blocks are named as CLIP's in transformers: timm's keys map as for the `clip` family.
CLIP_BLOCKS = _BLOCK_NAMES["clip"]


def map_blocks(state: dict, block_prefix: str, names: dict[str, str], qkv: str, top: dict[str, str]) -> dict:
    """timm ViT-style keys -> transformers keys: per-block module renames, a split qkv, top-level renames."""
    converted = {}
    for key, value in state.items():
        block = re.fullmatch(r"blocks\.(\d+)\.(.+?)(?:\.(weight|bias))?", key)
        if block:
            index, module, param = block.groups()
            prefix = block_prefix.format(index)
            if module == "attn.qkv":
                for name, part in zip("qkv", value.chunk(3, dim=0)):
                    converted[f"{prefix}{qkv.format(name)}.{param}"] = part
            else:
                converted[prefix + names[module] + (f".{param}" if param else "")] = value
        else:
            module, _, param = key.rpartition(".")
            target = top[key] if key in top else f"{top[module]}.{param}"
            converted[target] = value
    return converted


def compare(family: str, timm_model: torch.nn.Module, state: dict, *, timm_images=None, **config) -> None:
    model = backbones.build_backbone(
        backbones.tiny_config(family, hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS, **config)
    ).eval()
    model.load_state_dict(state, strict=True)
    patch = backbones.patch_size_of(model.config)
    images = torch.rand(2, 3, GRID[0] * patch, GRID[1] * patch, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        features = backbones.extract_features(model, backbones.normalize(images, model.config))
    normed, unnormed = timm_tokens(
        timm_model, backbones.normalize(images, model.config) if timm_images is None else timm_images(images)
    )
    num_prefix = backbones.num_prefix_tokens_of(model.config)

    def as_map(tokens):
        return tokens[:, num_prefix:].transpose(1, 2).reshape(2, WIDTH, *GRID)

    # Relative to the largest feature: random weights make large activations before the final norm.
    diffs = {
        "normed": ((features.feature_maps - as_map(normed)).abs().max() / normed.abs().max()).item(),
        "unnormed": ((features.unnormed_feature_maps - as_map(unnormed)).abs().max() / unnormed.abs().max()).item(),
    }
    print(f"{family} max abs diff / max abs feature vs timm at a {GRID[0]}x{GRID[1]} grid: {diffs}")
    assert max(diffs.values()) <= 1e-5, diffs
    assert features.feature_maps.abs().max() > 0.1  # the comparison is not between zeros


def test_dinov3_matches_timm():
    # The `_qkvb` variant has DINOv3's query and value biases (and, like DINOv3, no key bias).
    reference = random_timm_model("vit_small_patch16_dinov3_qkvb", 16)
    state = map_blocks(
        reference.state_dict(),
        "model.layer.{}.",
        {
            "norm1": "norm1",
            "norm2": "norm2",
            "attn.proj": "attention.o_proj",
            "mlp.fc1": "mlp.up_proj",
            "mlp.fc2": "mlp.down_proj",
            "gamma_1": "layer_scale1.lambda1",
            "gamma_2": "layer_scale2.lambda1",
            "attn.q_bias": "attention.q_proj.bias",
            "attn.v_bias": "attention.v_proj.bias",
        },
        "attention.{}_proj",
        {"cls_token": "embeddings.cls_token", "reg_token": "embeddings.register_tokens",
         "patch_embed.proj": "embeddings.patch_embeddings", "norm": "norm"},
    )  # fmt: skip
    state["embeddings.mask_token"] = torch.zeros(1, 1, WIDTH)
    compare("dinov3", reference, state)


def test_siglip_matches_timm():
    # timm's SigLIP defaults to exact GELU; SigLIP itself (big_vision) and transformers use the tanh approximation.
    reference = random_timm_model("vit_base_patch16_siglip_224", 16, act_layer="gelu_tanh", dynamic_img_size=True)
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("attn_pool.")}
    table = state.pop("pos_embed")[0]
    state = map_blocks(
        state,
        *CLIP_BLOCKS,
        {"patch_embed.proj": "embeddings.patch_embedding", "norm": "post_layernorm"},
    )
    state["embeddings.position_embedding.weight"] = table
    compare("siglip", reference, state)


def test_ijepa_matches_timm():
    reference = random_timm_model("vit_huge_patch14_gap_224", 14, dynamic_img_size=True)
    state = reference.state_dict()
    table = state.pop("pos_embed")
    state = map_blocks(
        state,
        "layers.{}.",
        {
            "norm1": "layernorm_before",
            "norm2": "layernorm_after",
            "attn.proj": "attention.o_proj",
            "mlp.fc1": "mlp.fc1",
            "mlp.fc2": "mlp.fc2",
        },
        "attention.{}_proj",
        {"patch_embed.proj": "embeddings.patch_embeddings.projection", "norm": "layernorm"},
    )
    state["embeddings.position_embeddings"] = table
    compare("ijepa", reference, state)


def test_aimv2_matches_timm():
    reference = random_timm_model("aimv2_large_patch14_224", 14, mlp_ratio=4.0, dynamic_img_size=True)
    state = reference.state_dict()
    table = state.pop("pos_embed")[0]
    state = map_blocks(
        state,
        "encoder.layers.{}.",
        {"norm1": "rms_norm1", "norm2": "rms_norm2", "attn.proj": "attention.out_proj",
         "mlp.fc1_g": "ffn.gate_proj", "mlp.fc1_x": "ffn.up_proj", "mlp.fc2": "ffn.down_proj"},
        "attention.{}_proj",
        {"patch_embed.proj": "embeddings.patch_embed", "patch_embed.norm": "embeddings.rms_norm", "norm": "rms_norm"},
    )  # fmt: skip
    state["embeddings.position_embedding.weight"] = table
    compare("aimv2", reference, state)


def test_vit_mae_matches_timm():
    # timm's MAE is a plain ViT: its keys map as for the paper's `mae` family (a ViTModel).
    reference = random_timm_model("vit_base_patch16_224.mae", 16, dynamic_img_size=True)
    sizes = dict(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS, image_size=64)
    compare("vit_mae", reference, timm_to_transformers(reference.state_dict(), backbones.backbone_config("mae", **sizes)))


def test_metaclip2_matches_timm():
    # MetaCLIP 2's worldwide ViT-H/14 in timm; its keys map as for the paper's `clip` family.
    reference = random_timm_model("vit_huge_patch14_clip_224", 14, dynamic_img_size=True)
    sizes = dict(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS, image_size=56, patch_size=14)
    compare("metaclip2", reference, timm_to_transformers(reference.state_dict(), backbones.backbone_config("clip", **sizes)))


def test_siglip2_matches_timm_naflex():
    reference = random_timm_model("naflexvit_base_patch16_siglip", 16, pos_embed_grid_size=(4, 4))
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("attn_pool.")}
    table = state.pop("embeds.pos_embed")[0]
    state = map_blocks(
        state,
        *CLIP_BLOCKS,
        {"embeds.proj": "embeddings.patch_embedding", "norm": "post_layernorm"},
    )
    state["embeddings.position_embedding.weight"] = table.reshape(-1, WIDTH)
    compare("siglip2", reference, state)


def test_radio_matches_timm_naflex():
    # C-RADIOv3-L's layout (timm resizes its table with align_corners=False, as transformers' RadioModel does).
    reference = random_timm_model("naflexvit_large_patch16_radio_v3", 16, reg_tokens=9, pos_embed_grid_size=(4, 4))
    state = reference.state_dict()
    prefix = torch.cat([state.pop("embeds.cls_token")[0], state.pop("embeds.reg_token")[0]])
    table = state.pop("embeds.pos_embed")
    patch_bias = state.pop("embeds.proj.bias")
    # timm flattens a patch as [p, p, 3], transformers' RadioModel as [3, p, p].
    state["embeds.proj.weight"] = state["embeds.proj.weight"].reshape(WIDTH, 16, 16, 3).permute(0, 3, 1, 2).reshape(WIDTH, -1)
    state = map_blocks(
        state,
        "encoder.layer.{}.",
        {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.o_proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
         "ls1.gamma": "layer_scale1.lambda1", "ls2.gamma": "layer_scale2.lambda1"},
        "attention.{}_proj",
        {"embeds.proj": "embeddings.patch_projection"},
    )  # fmt: skip
    # transformers' RadioModel has no patch bias: fold it into the table, which is added to every patch alike.
    state["embeddings.position_embedding"] = table.reshape(1, -1, WIDTH) + patch_bias
    state["embeddings.cls_register_token"] = prefix
    model_state = backbones.build_backbone(
        backbones.tiny_config("radio", hidden_size=WIDTH, num_hidden_layers=DEPTH)
    ).state_dict()
    state.update({k: model_state[k] for k in ("summary_idxs", "input_conditioner.norm_mean", "input_conditioner.norm_std")})
    # RADIO normalises inside the model; timm's takes CLIP-normalised images.
    clip_normalize = lambda images: backbones.normalize(images, backbones.tiny_config("clip"))  # noqa: E731
    compare("radio", reference, state, timm_images=clip_normalize)


# Each preset's timm reference architecture (built on the meta device: no memory, no weights).
PRESET_TIMM_ARCHITECTURES = {
    "dinov2_small": "vit_small_patch14_dinov2", "dinov2_base": "vit_base_patch14_dinov2",
    "dinov2_large": "vit_large_patch14_dinov2", "dinov2_giant": "vit_giant_patch14_dinov2",
    "dinov2_reg_small": "vit_small_patch14_reg4_dinov2", "dinov2_reg_base": "vit_base_patch14_reg4_dinov2",
    "dinov2_reg_large": "vit_large_patch14_reg4_dinov2", "dinov2_reg_giant": "vit_giant_patch14_reg4_dinov2",
    "clip_base": "vit_base_patch16_clip_384", "clip_large": "vit_large_patch14_clip_224",
    "mae_base": "vit_base_patch16_224", "mae_large": "vit_large_patch16_224", "mae_huge": "vit_huge_patch14_224",
    "deit3_small": "deit3_small_patch16_224", "deit3_base": "deit3_base_patch16_224", "deit3_large": "deit3_large_patch16_224",
    "dinov3_small": "vit_small_patch16_dinov3_qkvb", "dinov3_small_plus": "vit_small_plus_patch16_dinov3_qkvb",
    "dinov3_base": "vit_base_patch16_dinov3_qkvb", "dinov3_large": "vit_large_patch16_dinov3_qkvb",
    "dinov3_huge_plus": "vit_huge_plus_patch16_dinov3_qkvb",
    "siglip_base": "vit_base_patch16_siglip_224", "siglip_large": "vit_large_patch16_siglip_256",
    "siglip_so400m": "vit_so400m_patch14_siglip_224",
    "siglip2_base": "naflexvit_base_patch16_siglip", "siglip2_large": "vit_large_patch16_siglip_256",
    "siglip2_so400m": "naflexvit_so400m_patch16_siglip", "siglip2_giant": "vit_giantopt_patch16_siglip_256",
    "ijepa_huge": "vit_huge_patch14_gap_224", "ijepa_giant": "vit_giant_patch16_gap_224",
    "aimv2_large": "aimv2_large_patch14_224", "aimv2_huge": "aimv2_huge_patch14_224", "aimv2_1b": "aimv2_1b_patch14_224",
    "vit_mae_base": "vit_base_patch16_224", "vit_mae_large": "vit_large_patch16_224", "vit_mae_huge": "vit_huge_patch14_224",
    "metaclip2_huge": "vit_huge_patch14_clip_224", "metaclip2_gigantic": "vit_gigantic_patch14_clip_224",
    "radio_base": "vit_base_patch16_radio_v3", "radio_large": "vit_large_patch16_radio_v3",
    "radio_huge": "vit_huge_patch16_radio_v3",
}  # fmt: skip
# Layer scales are left out: transformers' RADIO always has them, timm's ViT-H RADIO has none.
LAYER_SCALE = re.compile(r"ls\d|gamma|layer_scale|lambda1")


def block_parameters(model: torch.nn.Module, blocks: str) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if re.search(blocks, n) and not LAYER_SCALE.search(n))


def test_every_preset_has_a_reference_architecture():
    assert set(PRESET_TIMM_ARCHITECTURES) == set(backbones.PRESETS)


@pytest.mark.parametrize(
    "preset",
    [
        p if p in ("dinov2_small", "dinov3_small", "siglip2_base") else pytest.param(p, marks=pytest.mark.slow)
        for p in backbones.PRESETS
    ],
)
def test_preset_blocks_match_the_reference_architecture(preset):
    """Width, depth, heads and MLP of every preset: the transformer blocks hold exactly the reference's parameters."""
    with torch.device("meta"):
        ours = backbones.build_backbone(backbones.preset_config(preset))
        reference = timm.create_model(PRESET_TIMM_ARCHITECTURES[preset], pretrained=False, num_classes=0)
    assert block_parameters(ours, r"(^|\.)layers?\.\d+\.") == block_parameters(reference, r"^blocks\.\d+\.") > 0
    assert backbones.patch_size_of(ours.config) == int(re.search(r"patch(\d+)", PRESET_TIMM_ARCHITECTURES[preset]).group(1))
