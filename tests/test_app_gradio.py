"""The app served on 127.0.0.1 and driven through its API with gradio_client, and the Space's app.py."""

import runpy

import numpy as np
import pytest
from PIL import Image

from fit3d_hf import FiT3DModel, app
from fit3d_hf.backbone_specs import load_backbone_spec

gr = pytest.importorskip("gradio", reason="the app needs gradio (pip install '.[app]')")
from gradio_client import Client, handle_file  # noqa: E402
from test_app import folder_state  # noqa: E402


def _view(path, width, height, seed):
    # A smooth picture with some texture: features vary across it, so no picture comes back flat.
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin(x / 9.0) * np.cos(y / 7.0)], axis=-1)
    noise = np.random.default_rng(seed).normal(0, 0.05, (height, width, 3))
    Image.fromarray((np.clip(base + noise, 0, 1) * 255).astype(np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The app of a saved model folder on 127.0.0.1 (a free port), with the folder's state before."""
    model_dir = tmp_path_factory.mktemp("model")
    FiT3DModel.from_backbone(load_backbone_spec("embedded")[0]).save_pretrained(model_dir)
    before = folder_state(model_dir)
    demo = app.build_app(app.load_fit3d_model(model_dir), examples=False)
    demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        yield demo, model_dir, before
    finally:
        demo.close()


def test_gradio_client_gets_three_pictures_of_the_right_size(served, tmp_path):
    demo, model_dir, before = served
    assert demo.local_url.startswith("http://127.0.0.1:")
    client = Client(demo.local_url, verbose=False)
    view_1, view_2 = _view(tmp_path / "a.png", 640, 480, 0), _view(tmp_path / "b.png", 640, 480, 1)
    *pictures, notes = client.predict(handle_file(view_1), handle_file(view_2), 5, 0.25, 0.75, 160, api_name="/features")
    assert len(pictures) == len(app.SOURCES) == 3
    # Views of 160x120 px enlarged twice: rows PCA, k-means, similarity; columns the two views.
    for path in pictures:
        with Image.open(path) as picture:
            assert picture.size == (2 * 320 + 4, 3 * 240 + 2 * 4)
            assert np.asarray(picture).std() > 10
    assert "a.png: 640x480 px downscaled to 160x120 px" in notes and "Best match of the point in view 2" in notes
    # One view, another long side: one column of 320x240 tiles (no enlargement).
    *pictures, notes = client.predict(handle_file(view_1), None, 3, 0.5, 0.5, 320, api_name="/features")
    with Image.open(pictures[1]) as picture:
        assert picture.size == (320, 3 * 240 + 2 * 4)
    assert "Best match" not in notes
    assert folder_state(model_dir) == before  # the app never writes into the model folder


def test_gradio_client_gets_a_clear_message_for_a_file_that_is_no_image(served, tmp_path):
    demo, _, _ = served
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    client = Client(demo.local_url, verbose=False)
    with pytest.raises(Exception, match="notes.txt is not an image that Pillow can read"):
        client.predict(handle_file(str(text)), None, 6, 0.5, 0.5, 160, api_name="/features")


def test_the_space_app_builds_the_app_of_its_model(tmp_path):
    model_dir = tmp_path / "model"
    FiT3DModel.from_backbone(load_backbone_spec("embedded")[0]).save_pretrained(model_dir)
    space = app.write_space(model_dir, tmp_path / "space", package_requirement="fit3d_hf")
    namespace = runpy.run_path(str(space / "app.py"), run_name="space_app")  # not "__main__": no launch
    assert isinstance(namespace["demo"], gr.Blocks)
    assert namespace["MODEL"] == space / "model"
