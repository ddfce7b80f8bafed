"""Stage I: lifting backbone features into feature Gaussians (fit3d_hf.lift)."""

import json
import math
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fit3d_hf.backbones import build_backbone, tiny_config
from fit3d_hf.lift import FeatureGaussians, LiftConfig, lift_scene, lift_scenes
from fit3d_hf.lift.config import CPU_PRESET, PAPER_PRESET
from fit3d_hf.lift.initialization import (
    camera_extent,
    initial_parameters,
    initial_points,
    knn_scale,
    random_points_in_camera_bounds,
    visible_in_any_view,
)
from fit3d_hf.lift.loop import _make_strategy, _means_lr
from fit3d_hf.lift.losses import training_loss
from fit3d_hf.lift.views import load_views, usable_views
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
    # Module fixtures run before the autouse one: one thread here too, so resumed runs compare bit for bit.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gaussians = lift_scene(scene, tiny_backbone(), tiny_config_for_tests(), output_dir=out, progress=False)
    finally:
        torch.set_num_threads(threads)
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
    paper = parsed("lift_paper.yaml")
    assert paper == LiftConfig.paper_preset(backend="gsplat")
    assert all(type(getattr(paper, k)) is type(getattr(LiftConfig.paper_preset(), k)) for k in PAPER_PRESET)


def test_paper_protocol_is_the_official_stage_one():
    from fit3d_hf.commands import parse_args
    from fit3d_hf.commands.lift import LiftArguments, main
    from fit3d_hf.commands.scene_args import SceneArguments

    paper = LiftConfig.paper_preset()
    # The official data settings; every optimisation value is the defaults' (the official ones).
    assert (paper.init_points, paper.train_on, paper.near_plane) == (0, "all", 0.2)
    assert (paper.input_size_rule, paper.normalization) == ("floor", "imagenet")
    assert {k: v for k, v in vars(paper).items() if k not in PAPER_PRESET} == {
        k: v for k, v in vars(LiftConfig()).items() if k not in PAPER_PRESET
    }
    assert (LiftConfig().iterations, LiftConfig().reset_opacity_every, LiftConfig().lr_features) == (30_000, 3_000, 6.25e-5)

    def parsed(*argv: str) -> LiftConfig:
        protocols = {"paper": PAPER_PRESET, "cpu": CPU_PRESET}
        args = (LiftArguments, LiftConfig, SceneArguments)
        return parse_args(args, ["--output_dir", "unused", *argv], prog="test", description="", protocols=protocols)[1]

    assert parsed("--protocol", "paper") == paper
    assert parsed("--protocol=cpu") == LiftConfig.cpu_preset()
    # --config and flags override the protocol's values.
    assert parsed("--protocol", "paper", "--iterations", "10", "--near_plane", "0.5") == LiftConfig.paper_preset(
        iterations=10, near_plane=0.5
    )
    with pytest.raises(SystemExit):
        main(["--protocol", "unknown", "--output_dir", "unused"])


def test_config_rejects_bad_data_settings():
    for bad in (dict(init_points=-1), dict(train_on="test"), dict(near_plane=0.0), dict(input_size_rule="ceil")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            LiftConfig(**bad)
    with pytest.raises(ValueError, match="normalization"):
        LiftConfig(normalization="clip")


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
    assert report["backend"] == "torch"  # "auto" on CPU
    # Losses wait on the device between checks (every 100 steps by default): every step's is recorded.
    assert len(report["loss_history"]) == TINY_STEPS and all(math.isfinite(v) for v in report["loss_history"])
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
    assert sorted(p.name for p in checkpoint_dir.iterdir()) == ["provenance.json", "step_0000010.pt"]
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
    with pytest.raises(ValueError, match=r"lifting checkpoint .* other settings .*backbone\.weights_sha256"):
        lift_scene(scene, tiny_backbone(48), config, output_dir=tmp_path, progress=False)


@pytest.mark.parametrize("check_every,found_at", [(1, 8), (4, 8), (100, 10)])
def test_nan_parameters_stop_and_keep_the_last_good_checkpoint(tmp_path, check_every, found_at):
    """Found at the next check (every `check_every` steps, and before the checkpoint of step 10)."""
    scene, config = tiny_room(), tiny_config_for_tests(check_every=check_every)

    def poison(step, params):
        if step == 7:
            with torch.no_grad():
                params["opacities"][:3] = float("nan")

    with pytest.raises(FloatingPointError, match=rf"room_0000.*\['opacities'\].*step {found_at}\b.*step_0000005\.pt"):
        lift_scene(scene, tiny_backbone(), config, output_dir=tmp_path, callback=poison, progress=False)
    checkpoint = tmp_path / ".checkpoints" / scene.scene_id / "step_0000005.pt"
    state = torch.load(checkpoint, weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["params"].values())
    assert not (tmp_path / f"{scene.scene_id}.safetensors").exists()


def test_nan_loss_names_its_step_and_view(tmp_path, monkeypatch):
    import fit3d_hf.lift.loop as loop

    def nan_at_step_6(params, decoder_weight, views, row, sh_degree, config):
        loss, terms, info = training_loss(params, decoder_weight, views, row, sh_degree, config)
        calls.append(row)
        return (loss * float("nan") if len(calls) == 7 else loss), terms, info

    calls = []
    monkeypatch.setattr(loop, "training_loss", nan_at_step_6)
    scene = tiny_room()
    with pytest.raises(FloatingPointError, match=r"room_0000.*loss is nan at step 6 \(view \d+\).*step_0000005\.pt"):
        lift_scene(scene, tiny_backbone(), tiny_config_for_tests(), output_dir=tmp_path, progress=False)


def test_gsplat_backend_that_cannot_run_fails_before_any_work(tmp_path, monkeypatch):
    import fit3d_hf.lift.loop as loop

    def must_not_run(*args):
        raise AssertionError("views were loaded")

    monkeypatch.setattr(loop, "_prepare_views", must_not_run)
    with pytest.raises(RuntimeError, match="backend='gsplat' needs CUDA tensors"):
        lift_scene(tiny_room(), tiny_backbone(), tiny_config_for_tests(backend="gsplat"), output_dir=tmp_path, progress=False)


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
    with pytest.raises(
        ValueError, match=r"room_0000\.json was made with other settings .*lift_config\.feature_dim: 16 there, 8 now"
    ):
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


def test_command_loads_gsplat_in_the_main_process_first(monkeypatch, tmp_path):
    """gsplat's first-use build happens once, before the other processes touch it (here: one process, stand-ins)."""
    import contextlib

    from accelerate import Accelerator

    import fit3d_hf.commands.lift as command

    events = []

    @contextlib.contextmanager
    def goes_first(name):
        events.append(f"enter {name}")
        yield
        events.append(f"exit {name}")

    monkeypatch.setattr(Accelerator, "main_process_first", lambda self: goes_first("main"))
    monkeypatch.setattr(Accelerator, "local_main_process_first", lambda self: goes_first("local main"))
    monkeypatch.setattr(command, "resolve_backend", lambda backend, device, dtype: "gsplat")
    monkeypatch.setattr(command, "load_gsplat_extension", lambda: events.append("load gsplat"))
    monkeypatch.setattr(command, "lift_scenes", lambda *args, **kwargs: events.append("lift") or [])
    argv = ["--output_dir", str(tmp_path), "--backbone", "tiny:dinov2", "--synthetic_rooms", "1",
            "--synthetic_views", "2", "--synthetic_height", "16", "--synthetic_width", "16"]  # fmt: skip
    command.main(argv)
    assert events == ["enter main", "enter local main", "load gsplat", "exit local main", "exit main", "lift"]


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


def test_paper_protocol_lifts_every_view_from_every_point(tmp_path):
    """The paper preset end to end on a tiny room: all points, all views, near plane and normalisation recorded."""
    scene = tiny_room()
    config = tiny_config_for_tests(**PAPER_PRESET, iterations=6, max_gaussians=0, refine_start=10**6)
    gaussians = lift_scene(scene, tiny_backbone(), config, output_dir=tmp_path, progress=False)
    report = json.loads((tmp_path / f"{scene.scene_id}.json").read_text())
    assert report["num_train_views"] == scene.num_views and report["eval_split"] == "train"
    assert gaussians.num_gaussians == len(scene.points) == 1500  # no densification ran: one Gaussian per point
    assert report["normalization"] == "imagenet" and gaussians.metadata["normalization"] == "imagenet"
    loaded = FeatureGaussians.load(tmp_path / f"{scene.scene_id}.safetensors")
    assert loaded.near_plane == 0.2
    # A rerun of another normalisation must not reuse these scenes.
    with pytest.raises(ValueError, match="normalization 'imagenet'.*normalization 'family'"):
        lift_scenes([scene], tiny_backbone(), replace(config, normalization="family"), output_dir=tmp_path)


def test_initial_points_all_or_a_subset():
    scene = tiny_room()
    generator = torch.Generator().manual_seed(0)
    points, colors = initial_points(scene, 0, generator)
    assert torch.equal(points, scene.points) and torch.equal(colors, scene.point_colors)
    subset, _ = initial_points(scene, 100, generator)
    assert len(subset) == 100 and all((scene.points == p).all(-1).any() for p in subset[:5])
    scene.points = None  # without points: random ones, as many as asked (random_points for "all")
    assert len(initial_points(scene, 0, generator, random_points=50)[0]) == 50
    assert len(initial_points(scene, 30, generator, random_points=50)[0]) == 30


def test_usable_views_train_or_all():
    scene = tiny_room()
    train, test = usable_views(scene, holdout_every=8)
    assert (train, test) == (scene.train_views, scene.test_views) and test
    assert usable_views(scene, holdout_every=8, train_on="all") == (list(range(scene.num_views)), [])


def test_backbone_input_is_floored_and_normalised_as_configured():
    """876x584 -> 868x574 at patch 14 (floor, official) or 882x588 (nearest); ImageNet or the family's statistics."""
    from fit3d_hf import backbones

    assert backbones.input_size(584, 876, 14) == (574, 868) and (574 // 14, 868 // 14) == (41, 62)
    assert backbones.input_size(584, 876, 14, rule="nearest") == (588, 882)
    scene = tiny_room()  # 40x56: floor gives a 2x4 grid at patch 14, nearest 3x4
    torch.manual_seed(0)
    clip = build_backbone(tiny_config("clip", patch_size=14))
    views = scene.train_views[:2]
    assert load_views(scene, views, clip, 1).targets.shape[-2:] == (2, 4)
    assert load_views(scene, views, clip, 1, size_rule="nearest").targets.shape[-2:] == (3, 4)
    family = load_views(scene, views, clip, 1).targets
    imagenet = load_views(scene, views, clip, 1, normalization="imagenet").targets
    assert (family - imagenet).abs().max() > 1e-3
    assert backbones.normalization_of(clip.config) == "family"  # the backbone itself is left unchanged
    backbones.set_normalization(clip.config, "imagenet")
    assert torch.equal(load_views(scene, views, clip, 1).targets, imagenet)


def test_near_plane_culls_gaussians_in_front_of_it():
    """One Gaussian 0.1 in front of the camera: rendered with near plane 0.01, not with the official 0.2."""
    params = initial_parameters(torch.tensor([[0.0, 0.0, 0.1]]), None, sh_degree=0, feature_dim=4, opacity=0.9)
    params["scales"] = torch.full((1, 3), math.log(0.05))
    intrinsics = torch.tensor([[[20.0, 0, 16], [0, 20.0, 16], [0, 0, 1]]])
    alphas = {}
    for near in (0.01, 0.2):
        gaussians = FeatureGaussians(params, torch.zeros(8, 4, 3, 3), {"near_plane": str(near)})
        alphas[near] = gaussians.render(intrinsics, torch.eye(4)[None], 32, 32)[2].max().item()
    assert alphas[0.01] > 0.5 and alphas[0.2] == 0
