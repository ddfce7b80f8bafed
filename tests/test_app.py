"""The app's library functions and `fit3d space` / `fit3d push --repo_type space`, without gradio."""

import ast
import hashlib
import importlib.metadata
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fit3d_hf import FiT3DModel, __version__, app, hub
from fit3d_hf.backbone_specs import load_backbone_spec
from fit3d_hf.backbones import weights_checksum

# A Space records the installed gradio's version: writing one needs gradio (the app extra).
needs_gradio = pytest.mark.skipif(
    importlib.util.find_spec("gradio") is None, reason="gradio not installed (pip install '.[app]')"
)


@pytest.fixture(scope="module")
def model():
    backbone, _ = load_backbone_spec("embedded")
    return FiT3DModel.from_backbone(backbone).eval()


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fit3d-model")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    return app.example_views(tmp_path_factory.mktemp("examples") / "rooms")


def folder_state(folder):
    """Every file under `folder` with its size, modification time and content hash."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(folder.rglob("*"))
    }


def save_image(path, width, height, seed=0, **kwargs):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, **kwargs)
    return path


def test_load_fit3d_model_reads_a_folder_and_names_bad_ones(model, model_dir, tmp_path):
    loaded = app.load_fit3d_model(model_dir)
    assert isinstance(loaded, FiT3DModel) and not loaded.training
    assert weights_checksum(loaded) == weights_checksum(model)
    file = tmp_path / "weights.safetensors"
    file.write_bytes(b"0")
    with pytest.raises(ValueError, match="weights.safetensors is a file, not a FiT3D model folder"):
        app.load_fit3d_model(file)
    with pytest.raises(ValueError, match="has no config.json"):
        app.load_fit3d_model(tmp_path)
    backbone_dir = tmp_path / "backbone"
    backbone_dir.mkdir()
    (backbone_dir / "config.json").write_text(json.dumps({"model_type": "dinov2"}))
    with pytest.raises(ValueError, match="model_type 'dinov2', not 'fit3d'"):
        app.load_fit3d_model(backbone_dir)
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps({"model_type": "fit3d"}))
    with pytest.raises(ValueError, match="no \\*.safetensors weights"):
        app.load_fit3d_model(no_weights)


def test_default_long_side_is_the_native_size_capped():
    assert app.default_long_side(FiT3DModel.from_backbone(load_backbone_spec("embedded")[0])) == 160
    assert app.view_size(4000, 3000, 160, 8) == (120, 160)
    assert app.view_size(100, 60, 160, 8) == (56, 96)  # never enlarged; sides rounded down to the patch
    assert app.view_size(3000, 4000, 448, 14) == (448, 336)


def test_features_of_two_views_and_their_pictures(model, examples):
    features = app.compute_features(model, examples[0])
    assert features.images.shape == (2, 3, 120, 160) and features.notes == []
    assert set(features.sources) == {"original", "FiT3D (concat)", "fine-tuned"}
    assert features.sources["original"].shape == (2, 128, 15, 20)
    assert features.sources["FiT3D (concat)"].shape == (2, 256, 15, 20)
    # The same features as the model's own forward on the same pixels.
    with torch.no_grad():
        direct = model(app.backbones.normalize(features.images, model.config)).original_feature_maps
    torch.testing.assert_close(features.sources["original"], direct)
    result = app.draw_pictures(features, point=(0.25, 0.75), k=5)
    scale = app.display_scale(120, 160)
    assert scale == 2
    for name in features.sources:
        assert result.pictures[name].shape == (3 * 240 + 2 * 4, 2 * 320 + 4, 3)
        assert result.pictures[name].dtype == np.uint8
        assert result.pictures[name].std() > 10  # not blank
        assert (result.matches[name][0].row, result.matches[name][0].col) == (11, 5)
    text = app.describe(result, features, patch=8)
    assert "160x120 px: 20x15 patches of 8 px" in text and "Best match of the point in view 2" in text


def test_huge_rotated_and_mismatched_images_get_notes(model, tmp_path):
    # A 4000x3000 JPEG stored sideways (EXIF orientation 6): shown upright as 3000x4000.
    exif = Image.Exif()
    exif[0x0112] = 6
    huge = save_image(tmp_path / "huge.jpg", 4000, 3000, exif=exif, quality=60)
    wide = save_image(tmp_path / "wide.png", 400, 100, seed=1)
    features = app.compute_features(model, [huge, wide])
    assert features.images.shape == (2, 3, 160, 120)
    assert features.notes[0] == "huge.jpg: 3000x4000 px downscaled to 120x160 px (long side at most 160 px)"
    assert features.notes[1] == "view 2 (wide.png, 400x100 px) stretched to view 1's 120x160 px"
    # A larger long side keeps more detail; an image already small enough is not resized.
    assert app.compute_features(model, [huge], long_side=320).images.shape == (1, 3, 320, 240)
    assert app.compute_features(model, [wide], long_side=400).notes == []


def test_bad_images_are_named(model, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="notes.txt is not an image that Pillow can read"):
        app.compute_features(model, [text])
    tiny = save_image(tmp_path / "tiny.png", 5, 30)
    with pytest.raises(ValueError, match="tiny.png is 5x30 px, smaller than one 8-pixel patch"):
        app.compute_features(model, [tiny])
    with pytest.raises(ValueError, match="no image given"):
        app.compute_features(model, [])


def test_example_views_are_generated_once(examples):
    assert len(examples) == len(app.EXAMPLE_ROOM_SEEDS) * len(app.EXAMPLE_VIEW_PAIRS)
    first = examples[0][0]
    assert first.endswith("room_1003_view_000.png")
    with Image.open(first) as image:
        assert image.size == (160, 120)
    before = {path: Path(path).stat().st_mtime_ns for pair in examples for path in pair}
    assert app.example_views(Path(first).parent) == examples
    assert {path: Path(path).stat().st_mtime_ns for pair in examples for path in pair} == before


@needs_gradio
def test_the_model_folder_is_only_read(model_dir, examples):
    before = folder_state(model_dir)
    loaded = app.load_fit3d_model(model_dir)
    app.feature_pictures(loaded, examples[1], point=(0.5, 0.5), k=4)
    app.write_space(model_dir, model_dir.parent / "space-of-folder", overwrite=True)
    assert folder_state(model_dir) == before


def _front_matter(readme):
    return yaml.safe_load(readme.read_text().split("---")[1])


@needs_gradio
def test_write_space_for_a_model_folder_vendors_the_package(model_dir, tmp_path):
    space = app.write_space(model_dir, tmp_path / "space")
    header = _front_matter(space / "README.md")
    assert header["sdk"] == "gradio" and header["app_file"] == "app.py"
    assert header["sdk_version"] == importlib.metadata.version("gradio")
    assert "models" not in header  # a local model is copied in, not referenced
    assert sorted(p.name for p in (space / "model").iterdir()) == sorted(p.name for p in model_dir.iterdir())
    assert (space / "fit3d_hf" / "app.py").is_file() and (space / "fit3d_hf" / "assets" / "embedded_backbone").is_dir()
    assert not list(space.rglob("__pycache__"))
    requirements = (space / "requirements.txt").read_text().splitlines()
    assert f"# fit3d_hf=={__version__} is vendored in ./fit3d_hf; its dependencies:" in requirements
    assert any(line.startswith("torch") for line in requirements) and not any("pytest" in line for line in requirements)
    source = (space / "app.py").read_text()
    ast.parse(source)
    assert 'MODEL = Path(__file__).resolve().parent / "model"' in source
    with pytest.raises(FileExistsError, match="already exists"):
        app.write_space(model_dir, space)


@needs_gradio
def test_write_space_for_a_hub_id_with_a_package_requirement(tmp_path):
    requirement = "fit3d_hf @ git+https://github.com/<org>/fit3d_hf@v0.1.0"
    space = app.write_space("me/fit3d-demo", tmp_path / "space", package_requirement=requirement, title="My FiT3D")
    header = _front_matter(space / "README.md")
    assert header["models"] == ["me/fit3d-demo"] and header["title"] == "My FiT3D"
    assert sorted(p.name for p in space.iterdir()) == ["README.md", "app.py", "requirements.txt"]
    assert (space / "requirements.txt").read_text().splitlines()[-1] == requirement
    assert "MODEL = 'me/fit3d-demo'" in (space / "app.py").read_text()
    with pytest.raises(ValueError, match="neither a folder nor a Hub model id"):
        app.write_space("not a/valid id!", tmp_path / "other")
    not_a_model = tmp_path / "plain"
    not_a_model.mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        app.write_space(not_a_model, tmp_path / "other")
    assert not (tmp_path / "other").exists()


@needs_gradio
def test_push_accepts_a_space_folder(tmp_path, monkeypatch):
    calls = {}
    monkeypatch.setattr(hub, "create_repo", lambda repo_id, **kw: calls.setdefault("create", (repo_id, kw)))
    monkeypatch.setattr(hub, "upload_folder", lambda **kw: calls.setdefault("upload", kw) and "url")
    space = app.write_space("me/fit3d-demo", tmp_path / "space", package_requirement="fit3d_hf")
    hub.push_to_hub(space, "me/fit3d-app", repo_type="space")
    assert calls["create"] == (
        "me/fit3d-app",
        {"token": None, "private": False, "repo_type": "space", "exist_ok": True, "space_sdk": "gradio"},
    )
    assert calls["upload"]["repo_type"] == "space" and calls["upload"]["folder_path"] == str(space)
    (space / "app.py").unlink()
    with pytest.raises(ValueError, match="is not a Space folder"):
        hub.push_to_hub(space, "me/fit3d-app", repo_type="space")


@needs_gradio
def test_space_and_app_commands(model_dir, tmp_path, capsys):
    from fit3d_hf.commands import app as app_command
    from fit3d_hf.commands import space as space_command

    folder = space_command.main(["--model", "me/fit3d-demo", "--output", str(tmp_path / "space"), "--package_requirement", "x"])
    assert (folder / "README.md").is_file() and "--repo_type space" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="fit3d space: .* already exists"):
        space_command.main(["--model", "me/fit3d-demo", "--output", str(folder)])
    with pytest.raises(SystemExit, match="fit3d app: .* has no config.json"):
        app_command.main(["--model", str(tmp_path)])
