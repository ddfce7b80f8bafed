"""See what 3D-aware fine-tuning changed: a Gradio app over a FiT3D model, and a Space folder of it.

`build_app(model)` returns a `gradio.Blocks` app: upload an image (or pick a bundled procedural
room), and see side by side, for the original, the FiT3D (concat) and the fine-tuned features,
their PCA → RGB picture, their k-means clusters and the cosine similarity to a clicked point; a
second view of the same scene shows where that point's feature matches there. The pictures are
drawn by `fit3d_hf.viz` (`viz.feature_panel`), as the demo's are; this module only reads images,
runs the model and lays out the page. `write_space` writes a folder that is a Hugging Face Space of
the app (`fit3d space`), pushable as is with `fit3d push --repo_type space`.

gradio is an optional dependency (`pip install 'fit3d_hf[app]'`), imported only by `build_app`:
everything else here runs without it, and nothing else in the package imports it.
"""

import importlib.metadata
import json
import math
import os
import shutil
import string
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers import PreTrainedConfig

from . import __version__, backbones
from .io import atomic_directory
from .modeling_fit3d import FiT3DModel
from .viz import Match, feature_panel

# (name shown, FiT3DModelOutput field): the three feature sources compared side by side.
SOURCES = (
    ("original", "original_feature_maps"),
    ("FiT3D (concat)", "feature_maps"),
    ("fine-tuned", "finetuned_feature_maps"),
)
# The default long side of the views fed to the model: the backbone's native size, at most this
# (DINOv2's native 518 px is slow on a CPU; the embedded backbone's is 160 px).
MAX_DEFAULT_LONG_SIDE = 448
# Tiles are enlarged by an integer factor until their long side is at least this many pixels, so
# a small view (160x120) is not shown as a thumbnail; one patch stays one flat block.
DISPLAY_LONG_SIDE = 320
# Procedural rooms shown as examples: the demo's unseen test rooms (seeds 1003 and 1004 at its
# default settings: 16 views of 160x120), two neighbouring views of each.
EXAMPLE_ROOM_SEEDS = (1003, 1004)
EXAMPLE_ROOM_SIZE = dict(num_views=16, height=120, width=160)
EXAMPLE_VIEW_PAIRS = ((0, 1), (4, 5))
SPACE_TEMPLATE_DIR = Path(__file__).resolve().parent / "space_template"
INSTALL_HINT = "pip install 'fit3d_hf[app]'"


def load_fit3d_model(source: str | os.PathLike) -> FiT3DModel:
    """Load a FiT3D model (a `save_pretrained` folder or a Hub id) in float32, eval mode, for the app.

    Raises:
        ValueError: naming `source` when it is a file, a folder without `config.json`, or a model of
            another type (a plain backbone: pair it first with `FiT3DModel.from_backbone`).
    """
    if Path(source).exists():
        check_fit3d_folder(Path(source))
    else:
        # A Hub id: only its config.json is fetched before the weights.
        model_type = PreTrainedConfig.get_config_dict(str(source))[0].get("model_type")
        if model_type != "fit3d":
            raise ValueError(f"{source} is not a FiT3D model: its config.json has model_type {model_type!r}, not 'fit3d'")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # float32: half precision is slow or unsupported on CPUs; the app's models are small.
    return FiT3DModel.from_pretrained(source, dtype=torch.float32).to(device).eval()


def check_fit3d_folder(path: Path) -> None:
    """Raise a ValueError naming `path` unless it is a FiT3D model folder (config.json with model_type
    'fit3d', and weights); reads only the config."""
    if not path.is_dir():
        raise ValueError(f"{path} is a file, not a FiT3D model folder (a folder with config.json and model.safetensors)")
    if not (path / "config.json").is_file():
        raise ValueError(
            f"{path} is not a FiT3D model folder: it has no config.json (folders written by `fit3d finetune`, "
            "`fit3d convert` or `fit3d demo` (its model/) are)"
        )
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type != "fit3d":
        raise ValueError(
            f"{path} is not a FiT3D model: its config.json has model_type {model_type!r}, not 'fit3d' "
            "(a plain backbone has no fine-tuned copy to compare with: pair it with `FiT3DModel.from_backbone` "
            "and fine-tune it, or run `fit3d demo`)"
        )
    if not any(path.glob("*.safetensors")):
        raise ValueError(f"{path} is not a FiT3D model folder: it has no *.safetensors weights")


def default_long_side(model: FiT3DModel) -> int:
    """The long side of the views fed to `model` by default: its native image size, at most `MAX_DEFAULT_LONG_SIDE`."""
    native = model.config.backbone_config.image_size
    native = max(native) if isinstance(native, (list, tuple)) else native
    return min(int(native), MAX_DEFAULT_LONG_SIDE)


def read_image(path: str | os.PathLike, long_side: int) -> tuple[Image.Image, tuple[int, int]]:
    """An image file as RGB, upright (EXIF orientation applied), roughly downscaled towards `long_side`.

    Returns:
        the image (for JPEG decoded at a reduced scale when it is much larger than `long_side`:
        a 48-megapixel photo is not decoded in full) and the file's original size (W, H), upright.

    Raises:
        ValueError: naming the file when Pillow cannot read it as an image, or it is too large to decode.
    """
    name = Path(path).name
    try:
        with Image.open(path) as image:
            width, height = upright_size(image)
            image.draft("RGB", (long_side, long_side))
            return ImageOps.exif_transpose(image).convert("RGB"), (width, height)
    except Image.DecompressionBombError as error:
        raise ValueError(f"{name} is too large to decode safely ({error}); downscale it first") from error
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"{name} is not an image that Pillow can read; upload a PNG or JPEG file") from error


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(W, H) of an opened image as shown, after its EXIF orientation (read from the header, nothing decoded)."""
    width, height = image.size
    # EXIF orientations 5 to 8 rotate by 90 degrees: width and height swap.
    return (height, width) if image.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (width, height)


def view_size(width: int, height: int, long_side: int, patch_size: int) -> tuple[int, int]:
    """(H, W) fed to the model for an image of `width` x `height`: downscaled (never enlarged) so that its long
    side is at most `long_side`, then each side rounded down to a multiple of the patch size (`backbones.input_size`)."""
    scale = min(1.0, long_side / max(width, height))
    return backbones.input_size(max(1, round(height * scale)), max(1, round(width * scale)), patch_size)


@dataclass
class ViewFeatures:
    """The views fed to the model and each source's features of them.

    Args:
        images: `[V, 3, H, W]` in [0, 1], H and W multiples of the patch size.
        sources: name (see `SOURCES`) → feature maps `[V, C_s, H/p, W/p]`, float32 on the CPU.
        notes: what was done to the inputs (downscaled, stretched), for the user.
    """

    images: torch.Tensor
    sources: dict[str, torch.Tensor]
    notes: list[str] = field(default_factory=list)


def compute_features(model: FiT3DModel, paths: list[str | os.PathLike], long_side: int | None = None) -> ViewFeatures:
    """Read one or more views of a scene and run the model on them in one batch.

    The first view sets the size (`view_size`); further views are resized to it, with a note when
    their aspect ratio differs (the cross-view match needs one feature grid).

    Raises:
        ValueError: naming the file that is not an image or is smaller than one patch.
    """
    if not paths:
        raise ValueError("no image given")
    long_side = long_side or default_long_side(model)
    patch = backbones.patch_size_of(model.config)
    notes, tensors, size = [], [], None
    for index, path in enumerate(paths):
        name = Path(path).name
        image, (width, height) = read_image(path, long_side)
        if min(width, height) < patch:
            raise ValueError(f"{name} is {width}x{height} px, smaller than one {patch}-pixel patch of the model")
        if size is None:
            size = view_size(width, height, long_side, patch)
            if max(width, height) > long_side:
                notes.append(
                    f"{name}: {width}x{height} px downscaled to {size[1]}x{size[0]} px (long side at most {long_side} px)"
                )
        elif abs(math.log((width / height) / (size[1] / size[0]))) > 0.02:
            notes.append(f"view {index + 1} ({name}, {width}x{height} px) stretched to view 1's {size[1]}x{size[0]} px")
        resized = image.resize((size[1], size[0]), Image.Resampling.BICUBIC, reducing_gap=3.0)
        tensors.append(torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).float() / 255)
    images = torch.stack(tensors)
    device = next(model.parameters()).device
    with torch.inference_mode():
        output = model(backbones.normalize(images, model.config).to(device))
    sources = {name: getattr(output, attribute).float().cpu() for name, attribute in SOURCES}
    return ViewFeatures(images=images, sources=sources, notes=notes)


@dataclass
class AppPictures:
    """What the app shows for one request.

    Args:
        pictures: source name → `uint8` array `[H', W', 3]` (`viz.feature_panel`'s picture): rows PCA,
            k-means, similarity; one column per view.
        matches: source name → the point's cell in view 1, then the best match in each other view.
        notes: what was done to the inputs.
    """

    pictures: dict[str, np.ndarray]
    matches: dict[str, list[Match]]
    notes: list[str]


def display_scale(height: int, width: int) -> int:
    """The integer enlargement that brings a tile's long side to at least `DISPLAY_LONG_SIDE` pixels."""
    return max(1, math.ceil(DISPLAY_LONG_SIDE / max(height, width)))


def draw_pictures(features: ViewFeatures, point: tuple[float, float] = (0.5, 0.5), k: int = 6) -> AppPictures:
    """Each source's `viz.feature_panel` for a point given as fractions (x, y) of view 1's width and height."""
    height, width = features.images.shape[-2:]
    x, y = (min(max(float(f), 0.0), 1.0) for f in point)
    scale = display_scale(height, width)
    pictures, matches = {}, {}
    for name, maps in features.sources.items():
        panel, matches[name] = feature_panel(features.images, maps, (x * width, y * height), k=k, scale=scale)
        pictures[name] = (panel.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return AppPictures(pictures=pictures, matches=matches, notes=list(features.notes))


def feature_pictures(
    model: FiT3DModel,
    paths: list[str | os.PathLike],
    *,
    point: tuple[float, float] = (0.5, 0.5),
    k: int = 6,
    long_side: int | None = None,
) -> AppPictures:
    """`compute_features` then `draw_pictures`: what the app shows for one or two views of a scene."""
    return draw_pictures(compute_features(model, paths, long_side), point, k)


def describe(result: AppPictures, features: ViewFeatures, patch: int) -> str:
    """The Markdown under the pictures: the size used, the notes, and where the point matches in the other views."""
    views, _, height, width = features.images.shape
    lines = [f"Views of {width}x{height} px: {width // patch}x{height // patch} patches of {patch} px."]
    lines += [f"- {note}" for note in result.notes]
    if views > 1:
        lines.append("\nBest match of the point in view 2 (cosine similarity):")
        for name, matches in result.matches.items():
            match = matches[1]
            lines.append(f"- {name}: x {match.x:.0f}, y {match.y:.0f} px ({match.similarity:.3f})")
    return "\n".join(lines)


def example_views(folder: str | os.PathLike | None = None) -> list[list[str]]:
    """PNG files of two neighbouring views of each example room, generated once into `folder`.

    Args:
        folder: where to keep them (default: a folder in the system's temporary directory, named
            after the package version); made atomically, reused when it exists.

    Returns:
        `[[view_1, view_2], ...]`, one pair per room of `EXAMPLE_ROOM_SEEDS`.
    """
    from .scenes.synthetic import make_room

    folder = Path(folder or Path(tempfile.gettempdir()) / f"fit3d_hf-{__version__}-app-examples")
    names = [[f"room_{seed:04d}_view_{v:03d}.png" for v in pair] for seed in EXAMPLE_ROOM_SEEDS for pair in EXAMPLE_VIEW_PAIRS]
    if not all((folder / name).is_file() for pair in names for name in pair):
        with atomic_directory(folder, overwrite=True) as staging:
            for seed in EXAMPLE_ROOM_SEEDS:
                room = make_room(seed, **EXAMPLE_ROOM_SIZE)
                for pair in EXAMPLE_VIEW_PAIRS:
                    for view in pair:
                        pixels = (room.image(view).permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
                        Image.fromarray(pixels).save(staging / f"room_{seed:04d}_view_{view:03d}.png")
    return [[str(folder / name) for name in pair] for pair in names]


def build_app(model: FiT3DModel, *, long_side: int | None = None, examples: bool = True):
    """The Gradio app for `model` (needs gradio: `pip install 'fit3d_hf[app]'`).

    Args:
        model: a FiT3DModel (`load_fit3d_model`, or `FiT3DModel.from_backbone(...)` in tests).
        long_side: default long side of the views fed to the model (default: `default_long_side`).
        examples: offer the procedural-room examples (`example_views`).

    Returns:
        a `gradio.Blocks`; `.launch(server_name="127.0.0.1")` serves it. Its API endpoint
        `/features` takes (view_1, view_2 or None, k, point_x, point_y, long_side) and returns one
        picture per source (see `SOURCES`) and the notes as Markdown.
    """
    try:
        import gradio as gr
    except ImportError as error:
        raise ImportError(f"the FiT3D app needs gradio: {INSTALL_HINT}") from error

    model = model.eval()
    patch = backbones.patch_size_of(model.config)
    long_side = long_side or default_long_side(model)
    cache: dict[tuple, ViewFeatures] = {}  # the last request's features: a click only redraws

    # The events take the uploads unprocessed (gradio's file data: a dict with the uploaded file's
    # "path", which gradio has checked to be an upload) so that this module reads them: a file that is
    # not an image gets read_image's message naming it, not gradio's internal preprocessing error.
    def show(view_1, view_2, k, point_x, point_y, side, progress=gr.Progress()):  # noqa: B008 (gradio's idiom)
        if not view_1:
            return *([None] * len(SOURCES)), "Upload an image or pick an example below."
        paths = [view_1["path"]] + ([view_2["path"]] if view_2 else [])
        key = (tuple(paths), int(side))
        try:
            if key not in cache:
                progress(0.1, desc="features")
                cache.clear()
                cache[key] = compute_features(model, paths, int(side))
            progress(0.6, desc="pictures")
            features = cache[key]
            result = draw_pictures(features, (point_x, point_y), int(k))
        except ValueError as error:
            raise gr.Error(str(error)) from error
        return *(result.pictures[name] for name, _ in SOURCES), describe(result, features, patch)

    def pick_point(view_1, event: gr.SelectData):
        with Image.open(view_1["path"]) as image:
            width, height = upright_size(image)
        x, y = event.index
        return x / width, y / height

    name = getattr(model.config, "_name_or_path", "") or "a FiT3D model"
    name = Path(name).name if Path(name).is_absolute() else name  # a folder: its name, not where it lies
    # No usage analytics: the app runs offline and sends nothing anywhere.
    with gr.Blocks(title="FiT3D features", analytics_enabled=False) as app:
        gr.Markdown(
            f"## FiT3D features: {name}\n"
            f"Backbone `{backbones.family_of(model.config)}`, {backbones.hidden_size_of(model.config)} channels, "
            f"patch {patch} px; assembly `{model.config.assembly}`. Each picture shows one feature source: its **PCA** "
            "(first three components as RGB), its **k-means** clusters, and the **cosine similarity** to the "
            "point you click in view 1 (a cross), with the **best match** marked in view 2, another view of "
            "the same scene. PCA, clusters and colour scales are fitted over both views together."
        )
        with gr.Row():
            view_1 = gr.Image(
                label="view 1 (click a point)",
                type="filepath",
                image_mode=None,
                sources=["upload", "clipboard"],
                elem_id="view-1",
            )
            view_2 = gr.Image(
                label="view 2 (optional): another view of the scene",
                type="filepath",
                image_mode=None,
                sources=["upload", "clipboard"],
                elem_id="view-2",
            )
        with gr.Row():
            k = gr.Slider(2, 12, value=6, step=1, label="k-means clusters")
            point_x = gr.Slider(0, 1, value=0.5, step=0.001, label="point x (fraction of the width)", elem_id="point-x")
            point_y = gr.Slider(0, 1, value=0.5, step=0.001, label="point y (fraction of the height)", elem_id="point-y")
            side = gr.Slider(4 * patch, 1024, value=long_side, step=patch, label="long side fed to the model (px)")
        button = gr.Button("Show features", variant="primary")
        with gr.Row():
            pictures = [
                gr.Image(
                    label=f"{source}: PCA · k-means · similarity",
                    type="numpy",
                    format="png",
                    interactive=False,
                    elem_id=f"picture-{index}",
                )
                for index, (source, _) in enumerate(SOURCES)
            ]
        notes = gr.Markdown(elem_id="notes")
        if examples:
            gr.Examples(
                examples=example_views(),
                inputs=[view_1, view_2],
                label="Procedural rooms made by fit3d_hf (unseen in the demo's fine-tuning): two views each",
                cache_examples=False,
            )
        inputs, outputs = [view_1, view_2, k, point_x, point_y, side], [*pictures, notes]
        gr.on(
            [button.click, view_1.change, view_2.change, k.release, point_x.release, point_y.release, side.release],
            show,
            inputs,
            outputs,
            api_name="features",
            concurrency_id="features",
            trigger_mode="always_last",
            preprocess=False,
        )
        view_1.select(pick_point, [view_1], [point_x, point_y], api_visibility="private", preprocess=False).then(
            show, inputs, outputs, api_visibility="private", concurrency_id="features", preprocess=False
        )
    return app


def space_requirements(package_requirement: str | None = None) -> str:
    """The Space's requirements.txt.

    Without `package_requirement`, fit3d_hf is vendored (copied beside app.py by `write_space`) and
    the file lists its dependencies as installed here; otherwise the file installs the package from
    `package_requirement` (e.g. `fit3d_hf @ git+https://github.com/<org>/fit3d_hf@v0.1.0`). gradio
    itself is not listed: the Space installs the README's `sdk_version`.
    """
    header = [f"# Written by `fit3d space` (fit3d_hf {__version__}). gradio comes from the README's sdk_version."]
    if package_requirement:
        return "\n".join(header + [package_requirement]) + "\n"
    try:
        requires = importlib.metadata.requires("fit3d_hf") or []
    except importlib.metadata.PackageNotFoundError as error:
        raise ValueError(
            "fit3d_hf is not installed as a distribution, so its dependencies are unknown: `pip install -e .` "
            "it, or pass package_requirement"
        ) from error
    dependencies = [line for line in requires if "extra ==" not in line]
    return "\n".join(header + [f"# fit3d_hf=={__version__} is vendored in ./fit3d_hf; its dependencies:"] + dependencies) + "\n"


def write_space(
    model: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    package_requirement: str | None = None,
    title: str = "FiT3D features",
    overwrite: bool = False,
) -> Path:
    """Write a folder that can be pushed as a Hugging Face Space as is: the app for `model`.

    Files: `app.py` (`build_app(load_fit3d_model(...))`), `requirements.txt` (`space_requirements`),
    `README.md` with the Space metadata (sdk gradio, sdk_version = the installed gradio, app_file,
    models), and `fit3d_hf/` (the package, vendored: it is not on PyPI) unless `package_requirement`
    says where to install it from. A model folder is copied into `model/` (only read, never
    written); a Hub id is loaded by the Space at start-up and listed under `models`.

    Args:
        model: a FiT3D model folder or a Hub id.
        output_dir: the Space folder (written atomically; it must not hold files unless `overwrite`).
        package_requirement: a pip requirement for fit3d_hf instead of vendoring it.
        title: the Space's title.

    Raises:
        ValueError: naming `model` when it is neither a FiT3D model folder nor a valid Hub id.
    """
    from huggingface_hub import SpaceCard, SpaceCardData
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        gradio_version = importlib.metadata.version("gradio")
    except importlib.metadata.PackageNotFoundError as error:
        raise ValueError(f"a Space records the gradio version it was tested with; install it first: {INSTALL_HINT}") from error
    local = Path(model).exists()
    if local:
        check_fit3d_folder(Path(model))
        model_expression, models = 'Path(__file__).resolve().parent / "model"', None
    else:
        try:
            validate_repo_id(str(model))
        except HFValidationError as error:
            raise ValueError(f"{model} is neither a folder nor a Hub model id ({error})") from error
        model_expression, models = repr(str(model)), [str(model)]
    card_data = SpaceCardData(
        title=title,
        sdk="gradio",
        sdk_version=gradio_version,
        app_file="app.py",
        python_version=f"{sys.version_info.major}.{sys.version_info.minor}",  # the Python it was written with
        models=models,
        license="apache-2.0",
        tags=["fit3d", "image-feature-extraction", "3d-aware-fine-tuning"],
        emoji="🧊",
        colorFrom="indigo",
        colorTo="green",
        pinned=False,
    )
    ignore = shutil.ignore_patterns(".*", "*.tmp", "__pycache__", "*.pyc", "checkpoint*")
    with atomic_directory(output_dir, overwrite=overwrite) as staging:
        app_template = string.Template((SPACE_TEMPLATE_DIR / "app.py.template").read_text())
        (staging / "app.py").write_text(app_template.substitute(version=__version__, model=model_expression))
        (staging / "requirements.txt").write_text(space_requirements(package_requirement))
        card = SpaceCard.from_template(
            card_data,
            template_path=str(SPACE_TEMPLATE_DIR / "README.md"),
            model=str(model) if not local else f"the model folder `{Path(model).name}` (copied into `model/`)",
            version=__version__,
            vendored=package_requirement is None,
        )
        (staging / "README.md").write_text(str(card) + "\n")
        if local:
            shutil.copytree(model, staging / "model", ignore=ignore)
        if package_requirement is None:
            shutil.copytree(Path(__file__).resolve().parent, staging / "fit3d_hf", ignore=ignore)
    return Path(output_dir)
