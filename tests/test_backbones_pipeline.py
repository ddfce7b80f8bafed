"""Every supported backbone type through the whole pipeline: lift -> render targets -> fine-tune -> evaluate.

A tiny random backbone of each family (`--backbone tiny:<family>`) on a small procedural room, with
the tiniest settings. The room is 48x64: a non-square grid that is not the backbone's native 4x4
(3x4 at patch 16, 3x5 at patch 14).
"""

import pytest
import torch
from accelerate.state import AcceleratorState

from fit3d_hf import backbones
from fit3d_hf.backbone_specs import load_backbone_spec
from fit3d_hf.evaluation.benchmark import BenchmarkConfig, benchmark_on_scenes
from fit3d_hf.finetune import FinetuneConfig, finetune
from fit3d_hf.lift import LiftConfig, lift_scenes
from fit3d_hf.modeling_fit3d import FiT3DModel
from fit3d_hf.scenes import synthetic
from fit3d_hf.targets import render_targets, targets_metadata

torch.set_num_threads(1)

HEIGHT, WIDTH = 48, 64
LIFT = dict(
    iterations=4, init_points=500, max_gaussians=800, checkpoint_every=100, feature_dim=8, refine_start=3000,
    refine_every=5000, reset_opacity_every=10**6, lr_features=2.5e-3, lr_decoder=2.5e-3,
)  # fmt: skip


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield  # each finetune() builds an Accelerator; its state is a process-wide singleton
    AcceleratorState._reset_state(reset_partial_state=True)


def run_pipeline(family: str, tmp_path, evaluate: bool) -> None:
    room = synthetic.make_room(0, num_views=5, height=HEIGHT, width=WIDTH, num_points=800)
    backbone, name = load_backbone_spec(f"tiny:{family}", seed=0)
    untouched = backbones.weights_checksum(backbone)
    patch, width = backbones.patch_size_of(backbone.config), backbones.hidden_size_of(backbone.config)
    grid = tuple(side // patch for side in backbones.input_size(HEIGHT, WIDTH, patch))  # the floor rule

    reports = lift_scenes([room], backbone, LiftConfig(**LIFT), output_dir=tmp_path / "lifted")
    assert reports[0]["backbone"] == name
    targets = render_targets([room], backbone, tmp_path / "targets", gaussians_dir=tmp_path / "lifted")
    assert tuple(targets[0]["target"].shape) == (width, *grid) and tuple(targets[0]["mask"].shape) == grid
    assert targets_metadata(targets)["backbone"]["family"] == family

    # The backbone goes in as a saved folder, as `--backbone <folder>` does.
    backbone.save_pretrained(tmp_path / "backbone")
    config = FinetuneConfig(max_steps=2, per_device_batch_size=2, learning_rate=1e-3, checkpointing_steps=0, logging_steps=1)
    result = finetune(tmp_path / "targets", str(tmp_path / "backbone"), tmp_path / "model", config)
    assert result.global_step == 2 and backbones.weights_checksum(backbone) == untouched

    model = FiT3DModel.from_pretrained(tmp_path / "model").eval()
    assert backbones.family_of(model.config) == family
    crop = backbones.input_size(HEIGHT, WIDTH, patch)  # rounded down: 48x64, or 42x56 at patch 14
    images = backbones.normalize(room.images([0, 1])[:, :, : crop[0], : crop[1]], model.config)
    with torch.no_grad():
        output = model(images)
        expected = backbones.extract_features(backbone, images)
    assert output.feature_maps.shape == (2, 2 * width, crop[0] // patch, crop[1] // patch)
    # The original half is the untouched backbone's (prefix tokens dropped, the patch grid in order).
    torch.testing.assert_close(output.feature_maps[:, :width], expected.feature_maps, rtol=0, atol=0)
    torch.testing.assert_close(output.cls_token, expected.cls_token, rtol=0, atol=0)
    assert (output.finetuned_feature_maps - expected.feature_maps).abs().max() > 0  # the copy was trained

    if evaluate:
        probe_rooms = synthetic.make_rooms(2, seed=50, num_views=4, height=HEIGHT, width=WIDTH)
        benchmark = BenchmarkConfig.cpu_preset(
            image_height=HEIGHT, image_width=WIDTH, seg_iterations=2, depth_iterations=2, seeds=[0], progress=False,
            seg_warmup_iterations=1, depth_warmup_iterations=1, depth_sig_warmup_iterations=1,
        )  # fmt: skip
        results = benchmark_on_scenes({"original": model.original, "fit3d": model}, probe_rooms[:1], probe_rooms[1:], benchmark)
        rows = {(r["source"], r["task"]) for r in results["results"]}
        assert {("fit3d", "segmentation"), ("fit3d", "depth"), ("original", "correspondence")} <= rows


# One family beyond the paper's in the default suite; every family in the slow one.
@pytest.mark.parametrize("family", ["dinov3"])
def test_pipeline_lift_render_finetune(family, tmp_path):
    run_pipeline(family, tmp_path, evaluate=False)


@pytest.mark.slow
@pytest.mark.parametrize("family", backbones.FAMILIES)
def test_whole_pipeline_every_family(family, tmp_path):
    run_pipeline(family, tmp_path, evaluate=True)
