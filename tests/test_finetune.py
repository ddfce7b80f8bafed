import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from transformers import AutoImageProcessor

from fit3d_hf import FiT3DModel, backbones, hub
from fit3d_hf import finetune as finetune_module
from fit3d_hf.backbones import weights_checksum
from fit3d_hf.commands import finetune as finetune_command
from fit3d_hf.finetune import FinetuneConfig, finetune, masked_l1, random_hflip
from fit3d_hf.scenes import synthetic
from fit3d_hf.targets import load_targets, render_targets

ROOT = Path(__file__).resolve().parents[1]
PATCH = 8


def tiny_backbone(seed: int, hidden_size: int = 32):
    torch.manual_seed(seed)
    return backbones.build_backbone(backbones.tiny_config("dinov2", patch_size=PATCH, hidden_size=hidden_size)).eval()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    # Each finetune() builds an Accelerator; the state is a process-wide singleton.
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def targets_dir(tmp_path_factory):
    """8 views whose targets are the fine-tuned backbone's own blurred features: learnable (the
    targets record the backbone; fine-tuning refuses targets of another one)."""
    room = synthetic.make_room(3, num_views=9, height=32, width=48, test_every=100)
    path = tmp_path_factory.mktemp("targets") / "targets"
    render_targets([room], tiny_backbone(seed=0), path, target_source="single_view_blur")
    return path


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("backbone") / "student"
    tiny_backbone(seed=0).save_pretrained(path)
    return path


def fast_config(**overrides) -> FinetuneConfig:
    values = dict(learning_rate=1e-3, logging_steps=1, checkpointing_steps=0, per_device_batch_size=2)
    return FinetuneConfig(**{**values, **overrides})


def test_masked_l1_matches_formula():
    out = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])  # [1, 2, 1, 2]
    target = torch.zeros_like(out)
    mask = torch.tensor([[[1.0, 0.0]]])
    # Only the first position counts: (|1| + |3|) / (1 * 2 channels).
    assert masked_l1(out, target, mask).item() == pytest.approx(2.0)
    assert masked_l1(out, target, torch.zeros_like(mask)).item() == 0.0
    out = torch.randn(2, 5, 3, 4, requires_grad=True)
    target, mask = torch.randn(2, 5, 3, 4), (torch.rand(2, 3, 4) > 0.5).float()
    expected = ((out - target).abs() * mask[:, None]).sum() / (mask.sum() * 5)
    assert torch.allclose(masked_l1(out, target, mask), expected)


def test_flip_is_joint():
    images = torch.arange(2 * 3 * 4 * 8, dtype=torch.float32).view(2, 3, 4, 8)
    targets = images[:, :, ::2, ::2].clone()  # a grid "aligned" with the image
    masks = targets[:, 0].clone()
    flipped = random_hflip(images, targets, masks, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(flipped[0], images.flip(-1))
    assert torch.equal(flipped[1], targets.flip(-1)) and torch.equal(flipped[2], masks.flip(-1))
    kept = random_hflip(images, targets, masks, 0.0, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(kept, (images, targets, masks)))
    mixed = random_hflip(images, targets, masks, 0.5, torch.Generator().manual_seed(3))
    for i in range(2):
        flipped_image = torch.equal(mixed[0][i], images[i].flip(-1))
        assert torch.equal(mixed[1][i], targets[i].flip(-1) if flipped_image else targets[i])


def test_loss_decreases_and_only_the_copy_trains(tmp_path, targets_dir):
    backbone = tiny_backbone(seed=0)
    original = weights_checksum(backbone)
    # A datasets.Dataset and a backbone model, as Python callers pass them.
    result = finetune(load_targets(targets_dir), backbone, tmp_path / "run", fast_config(num_epochs=4))
    model = result.model
    assert weights_checksum(backbone) == original  # the given backbone is copied, not trained
    losses = [loss for _, loss in result.losses]
    assert result.global_step == 16 and len(losses) == 16
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4
    assert weights_checksum(model.original) == original
    assert weights_checksum(model.finetuned) != original
    assert result.rank_checksums == [weights_checksum(model.finetuned)]
    # The saved folder holds the trained model, the image processor `fit3d convert` writes, and the run's record.
    saved = FiT3DModel.from_pretrained(result.output_dir)
    assert weights_checksum(saved.finetuned) == weights_checksum(model.finetuned)
    assert weights_checksum(saved.original) == original
    assert (
        AutoImageProcessor.from_pretrained(result.output_dir).to_dict() == backbones.make_image_processor(model.config).to_dict()
    )
    info = json.loads((result.output_dir / finetune_module.TRAINING_INFO_FILE).read_text())
    assert info == json.loads(json.dumps(result.training_info))
    assert info["dataset"] is None and info["global_step"] == 16
    assert not (result.output_dir / "README.md").exists()  # cards are the caller's (fit3d_hf.hub)


@pytest.mark.parametrize("streaming", [False, True])
def test_resume_after_kill_reproduces_uninterrupted_weights(tmp_path, targets_dir, backbone_dir, monkeypatch, streaming):
    dataset = str(targets_dir)  # folders and specs, as the command passes them
    # 4 steps per epoch: resumes mid-epoch 0, crosses into 1; a stream replays its epoch to the checkpoint.
    config = fast_config(max_steps=7, checkpointing_steps=3, streaming=streaming, shuffle_buffer_size=4)
    uninterrupted = finetune(dataset, str(backbone_dir), tmp_path / "a", config)
    AcceleratorState._reset_state(reset_partial_state=True)

    calls = {"n": 0}
    real_loss = finetune_module.masked_l1

    def killed_at_step_5(*args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("killed")
        return real_loss(*args)

    monkeypatch.setattr(finetune_module, "masked_l1", killed_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        finetune(dataset, str(backbone_dir), tmp_path / "b", config)
    monkeypatch.setattr(finetune_module, "masked_l1", real_loss)
    AcceleratorState._reset_state(reset_partial_state=True)
    checkpoints = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert checkpoints == ["step_00000003"]  # nothing half-written

    resumed = finetune(dataset, str(backbone_dir), tmp_path / "b", config, resume_from_checkpoint="latest")
    assert resumed.global_step == 7
    assert weights_checksum(resumed.model.finetuned) == weights_checksum(uninterrupted.model.finetuned)
    assert resumed.losses == uninterrupted.losses  # the log before the kill comes from the checkpoint
    # The final save keeps the checkpoints beside the model (a later run can still resume).
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step_00000003", "step_00000006"]
    assert (tmp_path / "b" / "model.safetensors").is_file()


def test_streamed_epochs_and_accumulation_count_optimizer_steps(tmp_path, targets_dir):
    # 8 views, batch 1, 2 batches accumulated per step: 4 optimizer steps per epoch.
    config = fast_config(per_device_batch_size=1, gradient_accumulation_steps=2, num_epochs=2, streaming=True)
    result = finetune(str(targets_dir), tiny_backbone(seed=0), tmp_path / "run", config)
    assert result.global_step == 8 and [step for step, _ in result.losses] == list(range(1, 9))
    info = result.training_info
    assert info["effective_batch_size"] == 2 and info["num_views"] == 8
    assert "accumulated" in hub.finetune_card_extra(info)["training"]
    assert weights_checksum(result.model.finetuned) != weights_checksum(result.model.original)


def test_gradient_checkpointing_trains_the_same_weights(tmp_path, targets_dir):
    plain = finetune(targets_dir, tiny_backbone(seed=0), tmp_path / "a", fast_config(max_steps=2))
    AcceleratorState._reset_state(reset_partial_state=True)
    checkpointed = finetune(
        targets_dir, tiny_backbone(seed=0), tmp_path / "b", fast_config(max_steps=2, gradient_checkpointing=True)
    )
    for a, b in zip(plain.model.finetuned.parameters(), checkpointed.model.finetuned.parameters()):
        torch.testing.assert_close(a, b)


def test_unused_parameters_are_frozen_not_searched_by_ddp():
    torch.manual_seed(0)
    backbone = backbones.build_backbone(backbones.tiny_config("dinov2", patch_size=PATCH, hidden_size=32, use_mask_token=True))
    # DINOv2's mask token gets no gradient from the patch features: frozen, so DDP needs no find_unused_parameters.
    assert finetune_module._freeze_unused_parameters(backbone) == ["embeddings.mask_token"]
    assert (
        not backbone.embeddings.mask_token.requires_grad and backbone.embeddings.patch_embeddings.projection.weight.requires_grad
    )
    assert all(parameter.grad is None for parameter in backbone.parameters())


def test_accumulation_steps_below_one_refused(tmp_path, targets_dir):
    with pytest.raises(ValueError, match="gradient_accumulation_steps is 0"):
        finetune(targets_dir, tiny_backbone(seed=0), tmp_path / "run", fast_config(gradient_accumulation_steps=0))


STREAM_SCRIPT = """
import hashlib, json, sys
from accelerate import PartialState
from fit3d_hf import finetune as finetune_module
from fit3d_hf.finetune import FinetuneConfig, finetune

seen = []
collate = finetune_module.collate_training_rows


def recording(rows):  # every view this process trains on, by the hash of its target
    batch = collate(rows)
    seen.extend(hashlib.sha256(target.numpy().tobytes()).hexdigest() for target in batch["targets"])
    return batch


finetune_module.collate_training_rows = recording
dataset, backbone, output_dir = sys.argv[1:4]
config = FinetuneConfig(
    streaming=True, num_epochs=2, per_device_batch_size=2, shuffle_buffer_size=4, learning_rate=1e-3,
    logging_steps=1, checkpointing_steps=0, flip_probability=0.0,
)
result = finetune(dataset, backbone, output_dir, config)
with open(f"{output_dir}.rank{PartialState().process_index}.json", "w") as f:
    json.dump({"seen": seen, "global_step": result.global_step}, f)
"""


@pytest.mark.slow
def test_two_cpu_processes_stream_every_view_once_per_epoch(tmp_path, targets_dir, backbone_dir):
    import hashlib

    export = hub.export_for_hub(targets_dir, tmp_path / "export", num_shards=2)  # the Hub layout: parquet shards
    script = tmp_path / "stream.py"
    script.write_text(STREAM_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    config = str(ROOT / "fit3d_hf" / "configs" / "accelerate_cpu_2proc.yaml")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, str(script)]
    run = subprocess.run(
        [*command, str(export), str(backbone_dir), str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    targets = load_targets(targets_dir).with_format("numpy")["target"]
    views = sorted(hashlib.sha256(target.astype("float16").tobytes()).hexdigest() for target in targets)
    ranks = [json.loads((tmp_path / f"run.rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["global_step"] for r in ranks] == [4, 4]  # 8 views / (2 processes x 2) per epoch, 2 epochs
    for epoch in (0, 1):
        # 4 views per process per epoch, the two processes' parts disjoint: each view exactly once.
        assert sorted(ranks[0]["seen"][4 * epoch : 4 * epoch + 4] + ranks[1]["seen"][4 * epoch : 4 * epoch + 4]) == views
    info = json.loads((tmp_path / "run" / "fit3d_finetune.json").read_text())
    assert info["num_processes"] == 2 and info["rank_checksums"][0] == info["rank_checksums"][1]


def test_wrong_target_width_refused_before_training(tmp_path, targets_dir):
    with pytest.raises(ValueError, match=r"targets are 32-dimensional .* backbone is 48 wide"):
        finetune(targets_dir, tiny_backbone(seed=0, hidden_size=48), tmp_path / "run", fast_config())
    assert not (tmp_path / "run").exists()


def test_command_saves_model_processor_card_and_pushes(tmp_path, targets_dir, backbone_dir, monkeypatch):
    uploads = []
    monkeypatch.setattr(hub, "create_repo", lambda *args, **kwargs: None)
    monkeypatch.setattr(hub, "upload_folder", lambda **kwargs: uploads.append(kwargs) or "commit")
    out = tmp_path / "model"
    finetune_command.main(
        [
            "--config",
            str(ROOT / "recipes" / "configs" / "finetune_cpu.yaml"),
            "--dataset",
            str(targets_dir),
            "--backbone",
            str(backbone_dir),
            "--output_dir",
            str(out),
            "--max_steps",
            "2",
            "--push_to_hub",
            "me/fit3d-tiny",
        ]
    )
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "fit3d_finetune.json"} <= set(
        os.listdir(out)
    )
    info = json.loads((out / "fit3d_finetune.json").read_text())
    assert info["global_step"] == 2 and info["num_processes"] == 1
    loaded = FiT3DModel.from_pretrained(out)
    assert weights_checksum(loaded.original) == weights_checksum(tiny_backbone(seed=0))
    assert weights_checksum(loaded.finetuned) == info["rank_checksums"][0] != weights_checksum(loaded.original)
    processor = AutoImageProcessor.from_pretrained(out)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, 50), torch.linspace(0, 1, 70), indexing="ij")
    image = torch.stack([ys, xs, ys * xs])  # smooth, so resize implementations agree
    expected = backbones.normalize(torch.nn.functional.interpolate(image[None], size=(32, 48), mode="bilinear"), loaded.config)
    assert torch.allclose(processor(image, do_rescale=False, return_tensors="pt")["pixel_values"], expected, atol=0.05)
    assert "fine-tuned for 2 steps" in (out / "README.md").read_text()
    # A published config names no folder of this machine (the backbone was a local folder).
    assert json.loads((out / "config.json").read_text())["backbone_config"].get("_name_or_path", "") == ""
    assert 'from_pretrained("me/fit3d-tiny")' in (out / "README.md").read_text()  # the usage snippet names the repo
    assert uploads and uploads[0]["repo_id"] == "me/fit3d-tiny" and Path(uploads[0]["folder_path"]) == out


@pytest.mark.slow
def test_two_cpu_processes_hold_identical_weights(tmp_path, targets_dir, backbone_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "recipes" / "configs" / "accelerate_cpu_2proc.yaml"),
        str(ROOT / "recipes" / "finetune.py"),
        "--config",
        str(ROOT / "recipes" / "configs" / "finetune_cpu.yaml"),
        "--dataset",
        str(targets_dir),
        "--backbone",
        str(backbone_dir),
        "--output_dir",
        str(tmp_path / "ddp"),
        "--max_steps",
        "2",
    ]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    info = json.loads((tmp_path / "ddp" / "fit3d_finetune.json").read_text())
    assert info["num_processes"] == 2  # not the silent single process of `--cpu`
    assert info["rank_checksums"][0] == info["rank_checksums"][1]
    # The weights moved, and the saved ones are the ones every rank held.
    saved = FiT3DModel.from_pretrained(tmp_path / "ddp")
    assert weights_checksum(saved.finetuned) == info["rank_checksums"][0] != weights_checksum(saved.original)


def test_unavailable_tracker_refused(tmp_path, targets_dir, backbone_dir):
    from accelerate.tracking import get_available_trackers

    missing = next(
        name for name in ("wandb", "comet_ml", "aim", "mlflow", "clearml") if name not in map(str, get_available_trackers())
    )
    with pytest.raises(ValueError, match=f"--report_to '{missing}' is not installed"):
        finetune(targets_dir, str(backbone_dir), tmp_path / "r", fast_config(report_to=missing))


def test_paper_preset_is_the_default_and_the_recipe():
    from fit3d_hf.commands import parse_args
    from fit3d_hf.commands.finetune import FinetuneArguments
    from fit3d_hf.finetune import PAPER_PRESET

    paper = FinetuneConfig.paper_preset()
    assert paper == FinetuneConfig()  # the defaults are the paper's
    assert (paper.learning_rate, paper.per_device_batch_size, paper.mixed_precision, paper.max_grad_norm) == (1e-5, 2, "no", 0.1)

    def parsed(*argv: str) -> FinetuneConfig:
        protocols = {"paper": PAPER_PRESET}
        return parse_args((FinetuneArguments, FinetuneConfig), list(argv), prog="t", description="", protocols=protocols)[1]

    recipe = parsed("--config", str(ROOT / "recipes" / "configs" / "finetune_paper.yaml"))
    assert {k: getattr(recipe, k) for k in PAPER_PRESET} == PAPER_PRESET
    cpu = parsed("--config", str(ROOT / "recipes" / "configs" / "finetune_cpu.yaml"), "--dataset", "d", "--output_dir", "o")
    assert parsed("--protocol", "paper", "--dataset", "d", "--output_dir", "o").learning_rate == 1e-5 != cpu.learning_rate


def test_soft_mask_weights_the_loss():
    out = torch.tensor([[[[1.0, 2.0, 4.0]]]])  # [1, 1, 1, 3]
    mask = torch.tensor([[[1.0, 0.5, 0.0]]])
    # (1 * 1 + 2 * 0.5 + 4 * 0) / (1.5 weight * 1 channel)
    assert masked_l1(out, torch.zeros_like(out), mask).item() == pytest.approx(2 / 1.5)


def test_paper_targets_fine_tune_with_their_normalisation(tmp_path):
    """A CLIP backbone on targets made with ImageNet normalisation and the soft mask: the saved model and its
    processor record ImageNet's statistics (as a converted official checkpoint); asking for another is refused."""
    torch.manual_seed(0)
    clip = backbones.build_backbone(backbones.tiny_config("clip", patch_size=PATCH, hidden_size=32)).eval()
    room = synthetic.make_room(3, num_views=4, height=32, width=48)
    path = tmp_path / "targets"
    render_targets([room], clip, path, target_source="single_view_blur", mask="soft", views="all", normalization="imagenet")
    result = finetune(path, clip, tmp_path / "run", fast_config(max_steps=2))
    assert result.training_info["normalization"] == "imagenet" and result.training_info["effective_batch_size"] == 2
    saved = FiT3DModel.from_pretrained(result.output_dir)
    assert backbones.normalization_of(saved.config) == "imagenet" and backbones.normalization_of(clip.config) == "family"
    processor = AutoImageProcessor.from_pretrained(result.output_dir)
    assert tuple(processor.image_mean) == backbones.IMAGENET_MEAN and tuple(processor.image_std) == backbones.IMAGENET_STD
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(ValueError, match="targets were made with 'imagenet' input normalisation"):
        finetune(path, clip, tmp_path / "other", fast_config(max_steps=1, normalization="family"))
