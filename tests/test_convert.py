"""Conversion of timm checkpoints: parity with timm for every family, and clear errors."""

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoImageProcessor, AutoModel

import fit3d_hf  # noqa: F401  (registers the auto classes)
from fit3d_hf import backbones
from fit3d_hf.convert import ConversionError, convert_checkpoints, detect_family, load_timm_state_dict, timm_to_transformers

timm = pytest.importorskip("timm")
torch.set_num_threads(1)

TIMM_NAMES = {
    "dinov2": "vit_small_patch14_dinov2",
    "dinov2_reg": "vit_small_patch14_reg4_dinov2",
    "clip": "vit_base_patch16_clip_384",
    "mae": "vit_base_patch16_224.mae",
    "deit3": "deit3_base_patch16_224",
}
WIDTH, DEPTH, HEADS = 64, 2, 2


def random_timm_model(family: str, seed: int, grid: int = 4, width: int = WIDTH, name: str | None = None) -> torch.nn.Module:
    """A shrunken official timm architecture with every parameter random (LayerScale and norms included)."""
    torch.manual_seed(seed)
    name = name or TIMM_NAMES[family]
    patch = 14 if "patch14" in name else 16
    model = timm.create_model(
        name,
        pretrained=False,
        depth=DEPTH,
        embed_dim=width,
        num_heads=HEADS,
        img_size=grid * patch,
        num_classes=10,
        dynamic_img_size=True,
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            is_norm_scale = name.endswith("weight") and param.ndim == 1
            param.copy_((1.0 if is_norm_scale else 0.0) + 0.3 * torch.randn_like(param))
    return model.eval()


def timm_features(model: torch.nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed tokens, unnormed tokens) `[B, P + h*w, C]` of the last block."""
    captured = {}
    hook = model.blocks[-1].register_forward_hook(lambda module, args, output: captured.update(tokens=output))
    with torch.no_grad():
        normed = model.forward_features(pixel_values)
    hook.remove()
    return normed, captured["tokens"]


def as_maps(tokens: torch.Tensor, num_prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    return tokens[:, num_prefix:].transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)


def tiny_target_config(family: str):
    return backbones.backbone_config(family, hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS)


@pytest.mark.parametrize("family", backbones.PAPER_FAMILIES)
def test_conversion_matches_timm(family, tmp_path):
    original, finetuned = random_timm_model(family, seed=0), random_timm_model(family, seed=1)
    torch.save(original.state_dict(), tmp_path / "original.pth")
    save_file(finetuned.state_dict(), tmp_path / "finetuned.safetensors")
    assert detect_family(original.state_dict()) == family
    out = convert_checkpoints(
        tmp_path / "original.pth", tmp_path / "finetuned.safetensors", tmp_path / "model", tiny_target_config(family)
    )
    model = AutoModel.from_pretrained(out).eval()
    patch = backbones.patch_size_of(model.config)
    grid = (3, 7)  # non-square; fewer rows and more columns than the native 4x4 grid
    pixel_values = torch.randn(2, 3, grid[0] * patch, grid[1] * patch)
    with torch.no_grad():
        output = model(pixel_values)
        features = backbones.extract_features(model.original, pixel_values)
    num_prefix = backbones.num_prefix_tokens_of(model.config)
    normed_original, unnormed_original = timm_features(original, pixel_values)
    normed_finetuned, _ = timm_features(finetuned, pixel_values)
    diffs = {
        "original": (output.original_feature_maps - as_maps(normed_original, num_prefix, grid)).abs().max().item(),
        "finetuned": (output.finetuned_feature_maps - as_maps(normed_finetuned, num_prefix, grid)).abs().max().item(),
        "cls": (output.cls_token - normed_original[:, 0]).abs().max().item(),
        "unnormed": (features.unnormed_feature_maps - as_maps(unnormed_original, num_prefix, grid)).abs().max().item(),
    }
    print(f"{family} max abs diff vs timm: {diffs}")
    assert max(diffs.values()) <= 1e-5, diffs
    assert output.feature_maps.shape == (2, 2 * WIDTH, *grid)
    # The two backbones really hold different checkpoints.
    assert (output.original_feature_maps - output.finetuned_feature_maps).abs().max() > 1e-2
    assert sorted(p.name for p in out.iterdir()) == [
        "backbones.py",
        "config.json",
        "configuration_fit3d.py",
        "model.safetensors",
        "modeling_fit3d.py",
        "preprocessor_config.json",
    ]


def test_dinov2_giant_swiglu_conversion_matches_timm():
    original = random_timm_model("dinov2", seed=0, width=96, name="vit_giant_patch14_dinov2")
    config = backbones.backbone_config(
        "dinov2", hidden_size=96, num_hidden_layers=DEPTH, num_attention_heads=HEADS, image_size=4 * 14, use_swiglu_ffn=True
    )
    model = backbones.build_backbone(config).eval()
    model.load_state_dict(timm_to_transformers(original.state_dict(), config), strict=True)
    pixel_values = torch.randn(1, 3, 5 * 14, 3 * 14)
    with torch.no_grad():
        ours = backbones.extract_features(model, pixel_values).feature_maps
    reference, _ = timm_features(original, pixel_values)
    diff = (ours - as_maps(reference, 1, (5, 3))).abs().max().item()
    print(f"dinov2 giant (SwiGLU) max abs diff vs timm: {diff}")
    assert diff <= 1e-5


def test_wrong_width_names_the_mismatch_and_leaves_nothing(tmp_path):
    save_file(random_timm_model("dinov2", seed=0).state_dict(), tmp_path / "ckpt.safetensors")
    narrow = backbones.backbone_config("dinov2", hidden_size=32, num_hidden_layers=DEPTH, num_attention_heads=HEADS)
    with pytest.raises(ConversionError, match=r"original checkpoint .*checkpoint width 64 .*hidden_size 32"):
        convert_checkpoints(tmp_path / "ckpt.safetensors", tmp_path / "ckpt.safetensors", tmp_path / "out", narrow)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors"]


def test_wrong_family_names_the_mismatch(tmp_path):
    save_file(random_timm_model("clip", seed=0).state_dict(), tmp_path / "clip.safetensors")
    save_file(random_timm_model("dinov2", seed=0).state_dict(), tmp_path / "dino.safetensors")
    with pytest.raises(ConversionError, match="this is a clip checkpoint, not dinov2"):
        convert_checkpoints(
            tmp_path / "clip.safetensors", tmp_path / "clip.safetensors", tmp_path / "out", tiny_target_config("dinov2")
        )
    with pytest.raises(ConversionError, match="finetuned checkpoint .*this is a clip checkpoint, not dinov2"):
        convert_checkpoints(
            tmp_path / "dino.safetensors", tmp_path / "clip.safetensors", tmp_path / "out", tiny_target_config("dinov2")
        )
    assert not (tmp_path / "out").exists()


def test_unused_and_missing_keys_are_listed():
    state_dict = random_timm_model("deit3", seed=0).state_dict()
    state_dict["blocks.1.attn.q_norm.weight"] = torch.ones(WIDTH)
    del state_dict["norm.bias"]
    with pytest.raises(ConversionError) as error:
        timm_to_transformers(state_dict, tiny_target_config("deit3"))
    message = str(error.value)
    assert "source keys not used: ['blocks.1.attn.q_norm.weight']" in message
    assert "target keys not filled: ['layernorm.bias']" in message


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    save_file(random_timm_model("mae", seed=0).state_dict(), tmp_path / "ckpt.safetensors")

    def broken_processor(config):
        raise RuntimeError("disk full")

    monkeypatch.setattr("fit3d_hf.convert.make_image_processor", broken_processor)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_checkpoints(
            tmp_path / "ckpt.safetensors", tmp_path / "ckpt.safetensors", tmp_path / "out", tiny_target_config("mae")
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors"]


def test_existing_output_needs_overwrite(tmp_path):
    save_file(random_timm_model("mae", seed=0).state_dict(), tmp_path / "ckpt.safetensors")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    args = (tmp_path / "ckpt.safetensors", tmp_path / "ckpt.safetensors", tmp_path / "out", tiny_target_config("mae"))
    with pytest.raises(FileExistsError, match="overwrite"):
        convert_checkpoints(*args)
    assert (tmp_path / "out" / "keep.txt").exists()
    convert_checkpoints(*args, overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "model.safetensors").exists()


class NotATensor:
    pass


def test_pickles_are_loaded_with_weights_only(tmp_path):
    torch.save({"model": {"pos_embed": torch.zeros(1)}, "extra": NotATensor()}, tmp_path / "evil.pth")
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_timm_state_dict(tmp_path / "evil.pth")
    torch.save({"model": {"module.pos_embed": torch.zeros(1)}}, tmp_path / "wrapped.pth")
    assert list(load_timm_state_dict(tmp_path / "wrapped.pth")) == ["pos_embed"]
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_timm_state_dict(tmp_path / "missing.pth")


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    from fit3d_hf.commands.convert import main

    save_file(random_timm_model("clip", seed=0).state_dict(), tmp_path / "clip.safetensors")
    with pytest.raises(SystemExit, match="this is a clip checkpoint, not dinov2"):
        main(
            [
                "--family",
                "dinov2_small",
                "--original",
                str(tmp_path / "clip.safetensors"),
                "--finetuned",
                str(tmp_path / "clip.safetensors"),
                "--output",
                str(tmp_path / "out"),
            ]
        )
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "deit3_base" in capsys.readouterr().out


# The official releases' timm architectures (pretrained=False: the same shapes, heads included).
PRESET_TIMM_IDS = {
    "dinov2_small": "vit_small_patch14_dinov2.lvd142m",
    "dinov2_base": "vit_base_patch14_dinov2.lvd142m",
    "dinov2_reg_small": "vit_small_patch14_reg4_dinov2.lvd142m",
    "clip_base": "vit_base_patch16_clip_384.laion2b_ft_in12k_in1k",
    "mae_base": "vit_base_patch16_224.mae",
    "deit3_base": "deit3_base_patch16_224.fb_in1k",
}


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(PRESET_TIMM_IDS))
def test_cli_converts_full_size_presets(preset, tmp_path):
    from fit3d_hf.commands.convert import main

    models = []
    for seed, role in enumerate(("original", "finetuned")):
        torch.manual_seed(seed)
        model = timm.create_model(PRESET_TIMM_IDS[preset], pretrained=False, dynamic_img_size=True).eval()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.ndim <= 1 or "token" in name or "pos_embed" in name:  # matrices keep timm's random init
                    is_norm_scale = name.endswith("weight") and param.ndim == 1
                    param.copy_((1.0 if is_norm_scale else 0.0) + 0.3 * torch.randn_like(param))
        save_file(model.state_dict(), tmp_path / f"{role}.safetensors")
        models.append(model)
    main(
        [
            "--family",
            preset,
            "--original",
            str(tmp_path / "original.safetensors"),
            "--finetuned",
            str(tmp_path / "finetuned.safetensors"),
            "--output",
            str(tmp_path / "out"),
        ]
    )
    converted = AutoModel.from_pretrained(tmp_path / "out").eval()
    patch = backbones.patch_size_of(converted.config)
    grid = (11, 17)
    pixel_values = torch.randn(1, 3, grid[0] * patch, grid[1] * patch)
    num_prefix = backbones.num_prefix_tokens_of(converted.config)
    with torch.no_grad():
        output = converted(pixel_values)
    diffs = {}
    for role, model in zip(("original", "finetuned"), models):
        reference, _ = timm_features(model, pixel_values)
        diffs[role] = (output[f"{role}_feature_maps"] - as_maps(reference, num_prefix, grid)).abs().max().item()
    print(f"{preset} max abs diff vs timm: {diffs}")
    assert max(diffs.values()) <= 1e-5, diffs


def fill_hub_cache(cache, files: dict[str, tuple[str, str, dict]], revision: str = "0123456789abcdef0123456789abcdef01234567"):
    """huggingface_hub's cache layout: models--org--name/snapshots/<rev>/<file> and refs/main = <rev>."""
    for repo_id, filename, state_dict in files.values():
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        (repo / "snapshots" / revision).mkdir(parents=True, exist_ok=True)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(revision)
        path = repo / "snapshots" / revision / filename
        save_file(state_dict, path) if filename.endswith(".safetensors") else torch.save(state_dict, path)


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_official_files_are_the_hubconf_ones():
    from fit3d_hf.convert import OFFICIAL_RELEASES, official_files

    files = official_files("dinov2_small")
    assert (files["finetuned"].repo_id, files["finetuned"].filename) == ("yuanwenyue/FiT3D", "dinov2_small_finetuned.pth")
    assert (files["original"].repo_id, files["original"].filename) == (
        "timm/vit_small_patch14_dinov2.lvd142m",
        "model.safetensors",
    )
    assert files["finetuned"].url == "https://huggingface.co/yuanwenyue/FiT3D/resolve/main/dinov2_small_finetuned.pth"
    assert OFFICIAL_RELEASES == PRESET_TIMM_IDS and set(OFFICIAL_RELEASES) <= set(backbones.PRESETS)
    with pytest.raises(ValueError, match="unknown official FiT3D release 'dinov2_huge'"):
        official_files("dinov2_huge")


def test_official_release_converts_from_the_hub_cache_offline(tmp_path, offline):
    """Both files resolved through huggingface_hub from a pre-populated cache, the Hub offline; ImageNet recorded."""
    from fit3d_hf.convert import convert_official, official_files, resolve_official_files

    files = official_files("clip_base")
    original, finetuned = random_timm_model("clip", seed=0), random_timm_model("clip", seed=1)
    cache = tmp_path / "hub"
    fill_hub_cache(
        cache,
        {
            "original": (files["original"].repo_id, files["original"].filename, original.state_dict()),
            "finetuned": (files["finetuned"].repo_id, files["finetuned"].filename, finetuned.state_dict()),
        },
    )
    paths = resolve_official_files("clip_base", cache_dir=cache)
    assert paths["finetuned"].name == "clip_base_finetuned.pth" and "models--yuanwenyue--FiT3D" in str(paths["finetuned"])
    out = convert_official("clip_base", tmp_path / "model", backbone_config=tiny_target_config("clip"), cache_dir=cache)
    model = AutoModel.from_pretrained(out).eval()
    assert backbones.normalization_of(model.config) == "imagenet"
    processor = AutoImageProcessor.from_pretrained(out)
    assert tuple(processor.image_mean) == backbones.IMAGENET_MEAN  # not CLIP's: the official code's statistics
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ours = model(backbones.normalize(images, model.config)).finetuned_feature_maps
    imagenet = (images - torch.tensor(backbones.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(backbones.IMAGENET_STD).view(
        1, 3, 1, 1
    )
    normed, _ = timm_features(finetuned, imagenet)
    assert (ours - as_maps(normed, 1, (4, 4))).abs().max() <= 1e-5


def test_official_release_missing_offline_says_what_to_place_where(tmp_path, offline):
    from fit3d_hf.convert import CheckpointsUnavailableError, convert_official

    cache = tmp_path / "hub"
    files = {"finetuned": ("yuanwenyue/FiT3D", "mae_base_finetuned.pth", random_timm_model("mae", seed=1).state_dict())}
    fill_hub_cache(cache, files)  # only the fine-tuned file is cached
    with pytest.raises(CheckpointsUnavailableError) as error:
        convert_official("mae_base", tmp_path / "model", backbone_config=tiny_target_config("mae"), cache_dir=cache)
    message = str(error.value)
    assert "original: model.safetensors of timm/vit_base_patch16_224.mae" in message
    assert "https://huggingface.co/timm/vit_base_patch16_224.mae/resolve/main/model.safetensors" in message
    assert "hf download timm/vit_base_patch16_224.mae model.safetensors" in message and "--original PATH" in message
    assert "finetuned:" not in message and not (tmp_path / "model").exists()
    # A local file replaces the missing one; the cached one is still used.
    save_file(random_timm_model("mae", seed=0).state_dict(), tmp_path / "original.safetensors")
    out = convert_official(
        "mae_base", tmp_path / "model", original=tmp_path / "original.safetensors", backbone_config=tiny_target_config("mae"),
        cache_dir=cache,
    )  # fmt: skip
    assert (out / "model.safetensors").is_file()


def test_cli_official_reports_missing_files(tmp_path, offline, monkeypatch):
    import huggingface_hub.constants

    from fit3d_hf.commands.convert import main

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(SystemExit, match=r"(?s)dinov2_small_finetuned\.pth of yuanwenyue/FiT3D.*--finetuned PATH"):
        main(["--official", "dinov2_small", "--output", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="give --official NAME, or --family, --original and --finetuned"):
        main(["--output", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="contradicts"):
        main(["--official", "dinov2_small", "--family", "clip_base", "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
