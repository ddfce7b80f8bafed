"""Stage I: lifting backbone features into feature Gaussians (fit3d_hf.lift)."""

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fit3d_hf.backbones import build_backbone, tiny_config
from fit3d_hf.lift import FeatureGaussians, LiftConfig, lift_scene, lift_scenes
from fit3d_hf.lift.config import CPU_PRESET
from fit3d_hf.lift.gaussians import rasterize_params
from fit3d_hf.lift.initialization import (
    camera_extent,
    initial_parameters,
    knn_scale,
    random_points_in_camera_bounds,
    visible_in_any_view,
)
from fit3d_hf.lift.loop import _make_strategy, _means_lr
from fit3d_hf.lift.losses import training_loss
from fit3d_hf.lift.views import load_views
from fit3d_hf.scenes.synthetic import make_room
from fit3d_hf.splatting.ssim import ssim_map

ROOT = Path(__file__).resolve().parents[1]
TINY_STEPS = 24


def tiny_backbone(width: int = 32) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone(tiny_config("dinov2", hidden_size=width, patch_size=8))


def tiny_room(seed: int = 0):
    return make_room(seed, num_views=9, height=40, width=56, num_points=1500)


def tiny_config_for_tests(**overrides) -> LiftConfig:
    # Densify every 4 steps from step 4 on; no opacity reset (it needs hundreds of steps to recover from).
    values = dict(
        iterations=TINY_STEPS,
        init_points=1000,
        max_gaussians=1500,
        checkpoint_every=5,
        lr_features=2.5e-3,
        lr_decoder=2.5e-3,
        feature_dim=16,
        refine_start=3000,
        refine_every=5000,
        reset_opacity_every=10**6,
    )
    values.update(overrides)
    return LiftConfig(**values)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lifted(tmp_path_factory):
    """One tiny lifted room shared by the read-only tests."""
    out = tmp_path_factory.mktemp("lifted")
    scene = tiny_room()
    gaussians = lift_scene(scene, tiny_backbone(), tiny_config_for_tests(), output_dir=out, progress=False)
    return scene, gaussians, out


def test_schedules_scale_with_the_iteration_count():
    config = LiftConfig(iterations=600)
    strategy = _make_strategy(config)
    assert (strategy.refine_start_iter, strategy.refine_stop_iter) == (10, 300)
    assert (strategy.refine_every, strategy.reset_every) == (2, 60)
    assert config.scaled(config.sh_degree_every) == 20
    official = _make_strategy(LiftConfig())
    assert (official.refine_start_iter, official.refine_stop_iter, official.refine_every, official.reset_every) == (
        500,
        15_000,
        100,
        3_000,
    )
    assert (official.max_gaussians, _make_strategy(LiftConfig.cpu_preset()).max_gaussians) == (0, 20_000)
    # The means' lr decays exponentially from 1.6e-4 to 1.6e-6 times the extent over the run.
    assert _means_lr(0, config, 2.0) == pytest.approx(3.2e-4)
    assert _means_lr(300, config, 2.0) == pytest.approx(3.2e-5)
    assert _means_lr(600, config, 2.0) == pytest.approx(3.2e-6)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="sh_degree"):
        LiftConfig(sh_degree=4)
    with pytest.raises(ValueError, match="iterations"):
        LiftConfig(iterations=0)


def test_config_files_match_the_library_presets():
    from fit3d_hf.commands import parse_args
    from fit3d_hf.commands.lift import LiftArguments
    from fit3d_hf.commands.scene_args import SceneArguments

    def parsed(name: str) -> LiftConfig:
        argv = ["--config", str(ROOT / "recipes/configs" / name), "--output_dir", "unused"]
        return parse_args((LiftArguments, LiftConfig, SceneArguments), argv, prog="test", description="")[1]

    cpu = parsed("lift_cpu.yaml")
    assert cpu == LiftConfig.cpu_preset()
    assert all(type(getattr(cpu, k)) is type(getattr(LiftConfig(), k)) for k in CPU_PRESET)
    gpu = parsed("lift_scannetpp_gpu.yaml")
    assert gpu == LiftConfig(backend="gsplat")
    assert all(type(getattr(gpu, k)) is type(getattr(LiftConfig(), k)) for k in CPU_PRESET)


def test_structural_similarity_map():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 40)
    assert torch.allclose(ssim_map(x, x), torch.ones_like(x), atol=1e-5)
    noisy = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    assert ssim_map(x, noisy).mean() < 0.9
    assert ssim_map(x, (x + 0.05 * torch.randn_like(x)).clamp(0, 1)).mean() > ssim_map(x, noisy).mean()
    # A constant shift of a flat image keeps the structure term but lowers the luminance term.
    flat = torch.full((1, 1, 16, 16), 0.5, dtype=torch.float64)
    expected = (2 * 0.5 * 0.6 + 0.01**2) / (0.5**2 + 0.6**2 + 0.01**2)
    assert ssim_map(flat, flat + 0.1)[0, 0, 8, 8].item() == pytest.approx(expected, rel=1e-4)


def test_structural_similarity_equals_the_full_window():
    """The separable filter gives the 3DGS formula with its 11×11 window (zero padding), values and gradients."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 20, 27, dtype=torch.float64, requires_grad=True)
    y = torch.rand(2, 3, 20, 27, dtype=torch.float64)
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    window = (torch.outer(g, g) / g.sum() ** 2).expand(3, 1, 11, 11)

    def blur(t):
        return torch.nn.functional.conv2d(t, window, padding=5, groups=3)

    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y, cov = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2, blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    expected = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    (grad_expected,) = torch.autograd.grad(expected.sum(), x)
    got = ssim_map(x, y)
    (grad,) = torch.autograd.grad(got.sum(), x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, grad_expected, rtol=0, atol=1e-10)


def test_initial_gaussians_from_points_and_random():
    points = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [2, 2, 2]])
    # Point 0's three nearest neighbours are all at distance 1.
    assert knn_scale(points)[0].item() == pytest.approx(1.0)
    params = initial_parameters(points, torch.ones(5, 3), sh_degree=3, feature_dim=8, opacity=0.1)
    assert params["shN"].shape == (5, 15, 3) and params["features"].abs().sum() == 0
    assert torch.sigmoid(params["opacities"]).allclose(torch.full((5,), 0.1))
    assert "shN" not in initial_parameters(points, None, sh_degree=0, feature_dim=8, opacity=0.1)

    scene = tiny_room()
    generator = torch.Generator().manual_seed(0)
    centers = scene.camera_centers
    random_points = random_points_in_camera_bounds(
        500, centers, scene.intrinsics, scene.world_to_camera, scene.width, scene.height, generator
    )
    assert random_points.shape == (500, 3)
    assert visible_in_any_view(random_points, scene.intrinsics, scene.world_to_camera, scene.width, scene.height).all()
    extent = camera_extent(centers)
    assert ((random_points - centers.mean(0)).abs() <= extent + 1e-5).all()
    assert camera_extent(torch.tensor([[1.0, 0, 0], [-1.0, 0, 0]])) == pytest.approx(1.1)


def test_feature_loss_never_moves_geometry():
    scene = tiny_room()
    backbone = tiny_backbone()
    config = tiny_config_for_tests(rgb_l1_weight=0.0, ssim_weight=0.0)
    views = load_views(scene, scene.train_views, backbone, 1)
    points = scene.points[:500]
    params = {k: torch.nn.Parameter(v) for k, v in initial_parameters(points, None, 3, 16, 0.5).items()}
    with torch.no_grad():
        params["features"].normal_()
    decoder = torch.nn.Parameter(torch.randn(32, 16, 3, 3) * 0.1)
    loss, terms, _ = training_loss(params, decoder, views, 0, 3, config)
    assert terms["feature_l1"] > 0
    loss.backward()
    assert params["features"].grad.abs().sum() > 0 and decoder.grad.abs().sum() > 0
    for name in ("means", "quats", "scales", "opacities", "sh0", "shN"):
        grad = params[name].grad
        assert grad is None or grad.abs().max() == 0, name


def test_feature_loss_at_lower_resolution_equals_pooling_the_full_render():
    """The rasterizer's pooled feature pass gives the loss (and gradients) of rendering every pixel
    and adaptive-average-pooling, which is what training did before the fused pass."""
    scene = tiny_room()
    config = tiny_config_for_tests(feature_downscale=2)
    assert scene.height % 2 == 0 and scene.width % 2 == 0, "the fused pass needs sizes that divide"
    views = load_views(scene, scene.train_views[:1], tiny_backbone(), 1)
    params = {k: torch.nn.Parameter(v) for k, v in initial_parameters(scene.points[:500], None, 3, 16, 0.5).items()}
    with torch.no_grad():
        params["features"].normal_()
    decoder = torch.nn.Parameter(torch.randn(32, 16, 3, 3) * 0.1)
    loss, terms, _ = training_loss(params, decoder, views, 0, 3, config)
    fused = torch.autograd.grad(terms["feature_l1"], [params["features"], decoder])

    intrinsics, w2c = views.intrinsics[:1], views.world_to_camera[:1]
    _, _, meta = rasterize_params(params, intrinsics, w2c, scene.width, scene.height, 3, config.backend)
    size = (scene.height // 2, scene.width // 2)
    pooled = torch.nn.functional.adaptive_avg_pool2d(meta["features"].permute(0, 3, 1, 2), size)
    decoded = torch.nn.functional.conv2d(pooled, decoder, padding=1)
    target = torch.nn.functional.interpolate(views.targets[:1].float(), size=size, mode="bilinear", align_corners=False)
    reference = (decoded - target).abs().mean()
    assert terms["feature_l1"].item() == pytest.approx(reference.item(), rel=1e-5)
    for got, want in zip(fused, torch.autograd.grad(reference, [params["features"], decoder])):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_masked_pixels_count_in_no_loss():
    scene = tiny_room()
    views = load_views(scene, scene.train_views[:1], tiny_backbone(), 1)
    params = {k: torch.nn.Parameter(v) for k, v in initial_parameters(scene.points[:500], None, 3, 16, 0.5).items()}
    decoder = torch.nn.Parameter(torch.randn(32, 16, 3, 3) * 0.1)
    views.masks = torch.ones(1, 1, scene.height, scene.width)
    views.masks[..., : scene.width // 2] = 0
    config = tiny_config_for_tests(feature_downscale=1)
    before = training_loss(params, decoder, views, 0, 0, config)[1]
    views.images[..., : scene.width // 2] = 1 - views.images[..., : scene.width // 2]  # change only masked pixels
    after = training_loss(params, decoder, views, 0, 0, config)[1]
    assert after["l1"].item() == pytest.approx(before["l1"].item(), rel=1e-5)
    # SSIM's 11×11 window reaches 5 pixels into the masked half: compare the L1 and feature terms only.
    assert after["feature_l1"].item() == pytest.approx(before["feature_l1"].item(), rel=1e-5)


def test_artifact_roundtrip_and_render(lifted):
    scene, gaussians, out = lifted
    path = out / f"{scene.scene_id}.safetensors"
    report = json.loads((out / f"{scene.scene_id}.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == [f"{scene.scene_id}.json", f"{scene.scene_id}.safetensors"]
    loaded = FeatureGaussians.load(path)
    assert (loaded.feature_dim, loaded.out_dim, loaded.sh_degree) == (16, 32, 3)
    assert loaded.num_gaussians == gaussians.num_gaussians == report["num_gaussians"]
    assert loaded.metadata["scene_id"] == scene.scene_id and loaded.metadata["out_dim"] == "32"
    tensors = load_file(path)
    assert set(tensors) == {"means", "quats", "scales", "opacities", "sh0", "shN", "features", "decoder.weight"}
    assert tensors["decoder.weight"].shape == (32, 16, 3, 3)
    for key in ("backbone", "feature_dim", "out_dim", "iterations", "timings_s", "iterations_per_second", "loss_history"):
        assert key in report
    assert set(report["metrics"]) == {"psnr", "feature_l1", "feature_cosine"}
    assert report["eval_split"] == "held-out" and report["num_eval_views"] == len(scene.test_views)
    views = scene.test_views
    rgb, features, alphas = loaded.render(scene.intrinsics[views], scene.world_to_camera[views], scene.width, scene.height)
    assert rgb.shape == (len(views), 3, scene.height, scene.width)
    assert features.shape == (len(views), 16, scene.height, scene.width)
    assert alphas.shape == (len(views), 1, scene.height, scene.width)
    assert loaded.decode(features).shape == (len(views), 32, scene.height, scene.width)
    # The reported held-out PSNR is the artifact's, recomputed here from the loaded file.
    psnr = -10 * torch.log10(((rgb - scene.images(views)) ** 2).mean())
    assert psnr.item() == pytest.approx(report["metrics"]["psnr"], abs=0.02)
    with pytest.raises(ValueError, match="not a feature-Gaussians file"):
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, str(out.parent / "other.safetensors"))
        FeatureGaussians.load(out.parent / "other.safetensors")


class _Interrupt(Exception):
    pass


def _interrupt_at(stop: int):
    def callback(step, params):
        if step == stop:
            raise _Interrupt

    return callback


def test_resume_gives_the_same_artifact_as_an_uninterrupted_run(lifted, tmp_path):
    scene, _, reference_dir = lifted
    config = tiny_config_for_tests()
    with pytest.raises(_Interrupt):
        lift_scene(scene, tiny_backbone(), config, output_dir=tmp_path, callback=_interrupt_at(12), progress=False)
    checkpoint_dir = tmp_path / ".checkpoints" / scene.scene_id
    assert [p.name for p in checkpoint_dir.iterdir()] == ["step_0000010.pt"]
    assert not (tmp_path / f"{scene.scene_id}.safetensors").exists()
    lift_scene(scene, tiny_backbone(), config, output_dir=tmp_path, progress=False)
    report = json.loads((tmp_path / f"{scene.scene_id}.json").read_text())
    assert report["resumed_from_step"] == 10
    reference = load_file(reference_dir / f"{scene.scene_id}.safetensors")
    resumed = load_file(tmp_path / f"{scene.scene_id}.safetensors")
    assert reference.keys() == resumed.keys()
    for key in reference:
        assert torch.equal(reference[key], resumed[key]), key
    reference_report = json.loads((reference_dir / f"{scene.scene_id}.json").read_text())
    assert report["loss_history"] == reference_report["loss_history"] and len(report["loss_history"]) == TINY_STEPS
    assert not checkpoint_dir.exists()
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_resume_with_another_backbone_width_fails_clearly(tmp_path):
    scene, config = tiny_room(), tiny_config_for_tests()
    with pytest.raises(_Interrupt):
        lift_scene(scene, tiny_backbone(32), config, output_dir=tmp_path, callback=_interrupt_at(6), progress=False)
    with pytest.raises(ValueError, match=r"Cb=32.*Cb=48"):
        lift_scene(scene, tiny_backbone(48), config, output_dir=tmp_path, progress=False)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    scene, config = tiny_room(), tiny_config_for_tests()

    def poison(step, params):
        if step == 7:
            with torch.no_grad():
                params["opacities"][:3] = float("nan")

    with pytest.raises(FloatingPointError, match=r"room_0000.*step 8.*step_0000005\.pt"):
        lift_scene(scene, tiny_backbone(), config, output_dir=tmp_path, callback=poison, progress=False)
    checkpoint = tmp_path / ".checkpoints" / scene.scene_id / "step_0000005.pt"
    state = torch.load(checkpoint, weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["params"].values())
    assert not (tmp_path / f"{scene.scene_id}.safetensors").exists()


def test_scene_without_usable_views_is_refused(tmp_path):
    scene = tiny_room()
    scene.mask_data = torch.ones(scene.num_views, scene.height, scene.width)
    scene.mask_data[scene.train_views] = 0
    with pytest.raises(ValueError, match=r"room_0000.*no usable training views"):
        lift_scene(scene, tiny_backbone(), tiny_config_for_tests(), output_dir=tmp_path, progress=False)


def test_lift_scenes_splits_and_skips(tmp_path, lifted):
    scenes = [tiny_room(s) for s in range(3)]
    config = tiny_config_for_tests(iterations=6)
    backbone = tiny_backbone()
    first = lift_scenes(scenes, backbone, config, output_dir=tmp_path, process_index=0, num_processes=2)
    second = lift_scenes(scenes, backbone, config, output_dir=tmp_path, process_index=1, num_processes=2)
    assert [r["scene_id"] for r in first] == ["room_0000", "room_0002"]
    assert [r["scene_id"] for r in second] == ["room_0001"]
    assert {r["backbone"] for r in first + second} == {"dinov2"}  # backbone_specs.backbone_name of an unnamed model
    again = lift_scenes(scenes, backbone, config, output_dir=tmp_path, process_index=0, num_processes=1)
    assert [r["status"] for r in again] == ["skipped"] * 3
    with pytest.raises(ValueError, match="lifted with backbone"):
        lift_scenes(scenes, backbone, tiny_config_for_tests(iterations=6, feature_dim=8), output_dir=tmp_path)
    with pytest.raises(ValueError, match=r"\['room_0001'\] appear more than once"):
        lift_scenes([scenes[1], scenes[1]], backbone, config, output_dir=tmp_path / "other")


def test_command_help_explains_itself(capsys):
    from fit3d_hf.commands.lift import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "accelerate launch --config_file recipes/configs/accelerate_cpu_2proc.yaml" in text
    assert "--output_dir" in text and "--holdout_every" in text and "--max_gaussians" in text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_accelerate_two_cpu_processes_lift_every_scene_once(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "recipes/configs/accelerate_cpu_2proc.yaml"),
        "--main_process_port", str(_free_port()),
        str(ROOT / "recipes/lift.py"),
        "--output_dir", str(tmp_path), "--backbone", "tiny:dinov2", "--synthetic_rooms", "3",
        "--synthetic_views", "6", "--synthetic_height", "32", "--synthetic_width", "48",
        "--iterations", "4", "--init_points", "300", "--feature_dim", "8", "--checkpoint_every", "2",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*.json"))]
    assert [r["scene_id"] for r in reports] == ["room_0000", "room_0001", "room_0002"]
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
    # One table, printed by the main process, with one row per scene, each lifted (not skipped) once.
    assert result.stdout.count("| scene |") == 1
    assert sum(f"| room_000{i} | lifted |" in result.stdout for i in range(3)) == 3
    assert "process 1: scenes" in result.stderr and "process 0: scenes" in result.stderr


@pytest.mark.slow
def test_cpu_preset_quality_on_a_synthetic_room(tmp_path):
    """Held-out PSNR >= 25 dB and feature cosine >= 0.8 on a 160×120 room, CPU preset, one thread.

    One thread: with two, OpenMP threads spin-wait on a busy machine and the run gets slower.
    """
    started, cpu_started = time.perf_counter(), time.process_time()
    scene = make_room(0)
    lift_scene(scene, tiny_backbone(), LiftConfig.cpu_preset(), output_dir=tmp_path, progress=False)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    report = json.loads((tmp_path / f"{scene.scene_id}.json").read_text())
    print(
        f"\n{scene.scene_id}: {report['metrics']}, {report['num_gaussians']} Gaussians, {seconds:.1f} s wall, "
        f"{cpu_seconds:.1f} CPU-s, {report['iterations_per_second']:.2f} it/s"
    )
    assert report["metrics"]["psnr"] >= 25.0
    assert report["metrics"]["feature_cosine"] >= 0.8


@pytest.mark.slow
def test_lift_the_real_fox_capture(tmp_path, fox_path):
    """The real capture, downscaled, with random init in the camera bounds: finite, better than grey."""
    from fit3d_hf.scenes import load_scene

    scene = load_scene(fox_path, downscale=8, skip_missing=True)
    config = LiftConfig.cpu_preset(iterations=200)
    lift_scene(scene, tiny_backbone(), config, output_dir=tmp_path, progress=False)
    report = json.loads((tmp_path / f"{scene.scene_id}.json").read_text())
    assert report["eval_split"] == "held-out"
    assert report["metrics"]["psnr"] > 12 and math.isfinite(report["metrics"]["feature_cosine"])
