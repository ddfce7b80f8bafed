"""Every refused input of issue #17, one row each: the bad input, the message that names it, the exit
code, and what must not have been written or changed. Commands run in-process through
`fit3d_hf.cli.main`; one subprocess shows the real exit code without a traceback.

To add a case: write a `setup(tmp, assets)` that makes the bad input under `tmp` (copies of the
module's `assets` if it needs artifacts), and a `Case` row with the command line.
"""

import hashlib
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from PIL import Image

from fit3d_hf import FiT3DModel, backbones
from fit3d_hf.backbone_specs import load_backbone_spec
from fit3d_hf.cli import main
from fit3d_hf.errors import USER_ERROR_EXIT_CODE, ProvenanceError, ResultsError, UserError
from fit3d_hf.io import LOCK_FILE
from fit3d_hf.lift.state import checkpoint_dir, lift_provenance, write_run_record
from fit3d_hf.scenes import load_scene, load_scenes, synthetic

ROOT = Path(__file__).resolve().parents[1]
PATCH = 8
ROOM = ["--synthetic_rooms", "1", "--synthetic_views", "4", "--synthetic_height", "32", "--synthetic_width", "48"]
LIFT = ["--iterations", "4", "--init_points", "200", "--feature_dim", "8", "--checkpoint_every", "2"]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def tiny_backbone(seed: int):
    torch.manual_seed(seed)
    return backbones.build_backbone(backbones.tiny_config("dinov2", patch_size=PATCH))


def run(argv: list[str]) -> tuple[int, str]:
    """`fit3d argv` in this process: (exit code, stderr is read by the caller through capsys)."""
    try:
        main([str(a) for a in argv])
    except SystemExit as exit_info:
        return exit_info.code, ""
    return 0, ""


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Artifacts made once, copied by the cases that need them: two backbones, and of the first one
    lifted Gaussians, a targets dataset and a FiT3D model made by `fit3d finetune` (with its checkpoints)."""
    root = tmp_path_factory.mktemp("assets")
    tiny_backbone(0).save_pretrained(root / "bb")
    tiny_backbone(1).save_pretrained(root / "bb_other")
    assert run(["lift", "--output_dir", root / "lifted", "--backbone", root / "bb", *ROOM, *LIFT])[0] == 0
    # Four lifting steps cover too little to fine-tune on: the fine-tuning targets are the single-view control's.
    argv = ["render", "--output_dir", root / "targets", "--backbone", root / "bb", "--target_source", "single_view_blur", *ROOM]
    assert run(argv)[0] == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    argv = [
        "finetune", "--dataset", root / "targets", "--backbone", root / "bb", "--output_dir", root / "model",
        "--max_steps", "2", "--per_device_batch_size", "1", "--checkpointing_steps", "1", "--logging_steps", "1",
    ]  # fmt: skip
    assert run(argv)[0] == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    return root


def write_capture(folder: Path, *, views: int = 3, **frame_overrides) -> dict:
    """A transforms.json capture of a procedural room (PNG images) in `folder`; returns its JSON."""
    room = synthetic.make_room(7, num_views=views, height=32, width=48, num_points=300)
    (folder / "images").mkdir(parents=True)
    frames = []
    flip = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64))
    for i in range(views):
        Image.fromarray((room.image(i).permute(1, 2, 0) * 255).round().byte().numpy()).save(folder / "images" / f"{i}.png")
        c2w = torch.linalg.inv(room.world_to_camera[i].double()) @ flip
        frames.append({"file_path": f"images/{i}.png", "transform_matrix": c2w.tolist(), **frame_overrides})
    K = room.intrinsics[0]
    meta = {"fl_x": K[0, 0].item(), "fl_y": K[1, 1].item(), "cx": 24.0, "cy": 16.0, "w": 48, "h": 32, "frames": frames}
    (folder / "transforms.json").write_text(json.dumps(meta))
    return meta


def edit_capture(folder: Path, edit: Callable[[dict], object]) -> None:
    meta = json.loads((folder / "transforms.json").read_text())
    meta = edit(meta) or meta
    (folder / "transforms.json").write_text(json.dumps(meta))


def write_colmap(model: Path, images: Path, names: list[str], camera: str = "PINHOLE 48 32 40 40 24 16") -> None:
    """A COLMAP text model (identity poses) whose images are `names` under `images` (written when missing)."""
    model.mkdir(parents=True)
    images.mkdir(parents=True, exist_ok=True)
    for name in names:
        if not (images / name).exists() and ".." not in name:
            Image.new("RGB", (48, 32), (90, 120, 150)).save(images / name)
    (model / "cameras.txt").write_text(f"1 {camera}\n")
    lines = [f"{i + 1} 1 0 0 0 0 0 {i * 0.1} 1 {name}\n\n" for i, name in enumerate(names)]
    (model / "images.txt").write_text("".join(lines))


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` and its hash: a folder a refused command must leave unchanged."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def results_json(path: Path, value: float, weights: str | None = None) -> Path:
    row = dict(
        dataset="synthetic", split="test", task="depth", metric="rmse", source="fit3d", values=[value], mean=value, std=0.0
    )
    results = {"protocol": {}, "sources": {"fit3d": {"role": "fit3d"}}, "results": [row]}
    if weights is not None:
        results["provenance"] = {"model": {"weight_files_sha256": weights}}
    path.write_text(json.dumps(results))
    return path


def hf_dataset(path: Path, *, labels: int = 1, depth: float = 2.0, splits: bool = True) -> Path:
    rows = {
        "image": [Image.new("RGB", (16, 16), (i * 40, 80, 120)) for i in range(4)],
        "semantics": [np.full((16, 16), labels, dtype=np.uint8) for _ in range(4)],
        "depth": [np.full((16, 16), depth, dtype=np.float32) for _ in range(4)],
    }
    data = datasets.Dataset.from_dict(rows)
    (datasets.DatasetDict(train=data, test=data) if splits else data).save_to_disk(str(path))
    return path


@dataclass
class Case:
    """One refused input: `setup(tmp, assets)` makes it, `argv(tmp, assets)` is the fit3d command line."""

    id: str
    argv: Callable[[Path, Path], list]
    message: str
    setup: Callable[[Path, Path], None] = lambda tmp, assets: None
    code: int = USER_ERROR_EXIT_CODE
    unwritten: tuple[str, ...] = ("out",)  # under tmp: must not exist afterwards
    unchanged: tuple[str, ...] = ()  # under tmp: made by setup, must be byte-identical afterwards
    extra: dict = field(default_factory=dict)


def lift(*options) -> Callable[[Path, Path], list]:
    return lambda tmp, assets: ["lift", "--output_dir", tmp / "out", "--backbone", "tiny:dinov2", *LIFT, *options]


def lift_capture(*options) -> Callable[[Path, Path], list]:
    return lift("--scenes", "{tmp}/cap", *options)


def copy_asset(name: str, to: str = "out"):
    return lambda tmp, assets: shutil.copytree(assets / name, tmp / to)


def capture_with(edit: Callable[[dict], object]):
    def setup(tmp, assets):
        write_capture(tmp / "cap")
        edit_capture(tmp / "cap", edit)

    return setup


def frame0(**values) -> Callable[[dict], None]:
    return lambda meta: meta["frames"][0].update(values)


def without_file_path(meta):
    del meta["frames"][1]["file_path"]


def lifted_with_seed_0(tmp, assets):
    """An interrupted lift of room_0000 (seed 0): its provenance and a checkpoint file."""
    scene = synthetic.make_room(0, num_views=4, height=32, width=48)
    backbone, _ = load_backbone_spec("tiny:dinov2", 0)
    from fit3d_hf.lift import LiftConfig

    config = LiftConfig(iterations=4, init_points=200, feature_dim=8, checkpoint_every=2)
    folder = checkpoint_dir(tmp / "out", scene.scene_id)
    write_run_record(folder, lift_provenance(scene, backbone, config, seed=0))
    (folder / "step_0000002.pt").write_bytes(b"a checkpoint of the first run")


def live_lock(tmp, assets):
    (tmp / "out").mkdir()
    holder = {"pid": os.getppid(), "host": socket.gethostname(), "started": "earlier", "command": "fit3d lift (another run)"}
    (tmp / "out" / LOCK_FILE).write_text(json.dumps(holder))


def duplicate_names(tmp, assets):
    write_capture(tmp / "a" / "cap")
    write_capture(tmp / "b" / "cap")


def broken_weights(tmp, assets):
    shutil.copytree(assets / "bb", tmp / "bb")
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp / "bb" / "model.safetensors")
    weights.pop("embeddings.cls_token")
    save_file(weights, str(tmp / "bb" / "model.safetensors"), metadata={"format": "pt"})


def truncated_gaussians(tmp, assets):
    shutil.copytree(assets / "lifted", tmp / "lifted")
    truncate(tmp / "lifted" / "room_0000.safetensors")


def truncated_targets(tmp, assets):
    shutil.copytree(assets / "targets", tmp / "targets")
    truncate(next((tmp / "targets").glob("data-*.arrow")))


def truncated_model(tmp, assets):
    shutil.copytree(assets / "model", tmp / "model")
    truncate(tmp / "model" / "model.safetensors")


def card_folder(value: float, weights_of_other: bool = False):
    def setup(tmp, assets):
        shutil.copytree(assets / "model", tmp / "model")
        results_json(tmp / "results.json", value, weights="0" * 64 if weights_of_other else None)

    return setup


def colmap_capture(camera: str = "PINHOLE 48 32 40 40 24 16", names=("a.png", "b.png")):
    return lambda tmp, assets: write_colmap(tmp / "cap" / "sparse" / "0", tmp / "cap" / "images", list(names), camera)


def text_pth(tmp, assets):
    (tmp / "a.pth").write_text("not a checkpoint\n")


def pickle_pth(tmp, assets):
    torch.save({"pos_embed": torch.zeros(1), "extra": Path("x")}, tmp / "a.pth")


EVALUATE = ["evaluate", "--output_dir", "{tmp}/out"]
FINETUNE = ["finetune", "--output_dir", "{tmp}/out", "--per_device_batch_size", "1"]

CASES = [
    # 8. inputs whose exceptions did not name them
    Case("transforms-list", lift_capture(), r"transforms\.json: expected a JSON object", capture_with(lambda meta: [meta])),
    Case("camera-angle-0", lift_capture(), r"frame 0 .*camera_angle_x = 0; a field of view", capture_with(frame0(camera_angle_x=0, fl_x=None))),
    Case("matrix-not-numbers", lift_capture(), r"frame 0 .*transform_matrix is not a 4×4", capture_with(frame0(transform_matrix=[["a"] * 4] * 4))),
    Case("matrix-ragged", lift_capture(), r"frame 0 .*transform_matrix is not a 4×4", capture_with(frame0(transform_matrix=[[1, 0, 0], [0, 1]]))),
    Case("frame-without-file-path", lift_capture(), r"frame 1 has no file_path", capture_with(without_file_path)),
    Case("colmap-camera-params", lift_capture(), r"cameras\.txt \(camera 1\): a PINHOLE camera has 4 parameters, this one has 3", colmap_capture("PINHOLE 48 32 40 40 24")),
    Case("synthetic-views-0", lift(*ROOM[:2], "--synthetic_views", "0"), r"synthetic_views is 0, it must be at least 2"),
    Case("synthetic-height-0", lift(*ROOM[:2], "--synthetic_height", "0"), r"synthetic_height is 0, it must be at least 1"),
    Case("truncated-gaussians", lambda tmp, a: ["render", "--output_dir", tmp / "out", "--backbone", a / "bb", "--gaussians_dir", tmp / "lifted", *ROOM], r"room_0000\.safetensors: unreadable safetensors file", truncated_gaussians, unwritten=("out", "out.parts")),
    Case("truncated-arrow", lambda tmp, a: [*FINETUNE, "--dataset", tmp / "targets", "--backbone", a / "bb"], r"targets dataset .*targets: cannot be read", truncated_targets),
    Case("truncated-model", lambda tmp, a: [*EVALUATE, "--model", tmp / "model"], r"--model .*model: its weights cannot be read", truncated_model),
    Case("text-file-pth", lambda tmp, a: ["convert", "--family", "dinov2_small", "--original", tmp / "a.pth", "--finetuned", tmp / "a.pth", "--output", tmp / "out"], r"a\.pth: not a readable torch checkpoint", text_pth, code=1),
    Case("labels-beyond-num-labels", lambda tmp, a: [*EVALUATE, "--model", a / "model", "--dataset", "hf", "--hf_dataset", hf_dataset(tmp / "hf", labels=5), "--semantics_column", "semantics", "--num_labels", "2"], r"labels \[5\] in --semantics_column semantics are outside 0\.\.1"),
    # 9. misleading messages
    Case("missing-local-backbone", lift(*ROOM, "--backbone", "./no/such/backbone"), r"backbone \./no/such/backbone: no such file or folder"),
    Case("missing-hub-or-folder", lift(*ROOM, "--backbone", "runs/no-such-backbone"), r"backbone runs/no-such-backbone: no such local file or folder, and not loadable as a Hub id"),
    Case("missing-targets", lambda tmp, a: [*FINETUNE, "--dataset", "./no/targets", "--backbone", a / "bb"], r"targets dataset \./no/targets: no such file or folder"),
    Case("missing-model", lambda tmp, a: [*EVALUATE, "--model", "./no/model"], r"--model \./no/model: no such file or folder"),
    Case("hf-without-splits", lambda tmp, a: [*EVALUATE, "--model", a / "model", "--dataset", "hf", "--hf_dataset", hf_dataset(tmp / "hf", splits=False), "--semantics_column", "semantics", "--num_labels", "2"], r"is a single dataset without splits"),
    Case("skip-missing-hint", lift_capture(), r"Pass --skip_missing", lambda tmp, a: (write_capture(tmp / "cap"), (tmp / "cap" / "images" / "1.png").unlink())),
    Case("pickle-refused", lambda tmp, a: ["convert", "--family", "dinov2_small", "--original", tmp / "a.pth", "--finetuned", tmp / "a.pth", "--output", tmp / "out"], r"refused, it holds Python objects besides tensors; fit3d_hf loads checkpoints weights only", pickle_pth, code=1),
    # 10. paths in capture files stay inside the capture
    Case("file-path-outside", lift_capture(), r"transforms\.json: frame 0 file_path '\.\./secret\.png' points outside .*cap", capture_with(frame0(file_path="../secret.png"))),
    Case("file-path-absolute", lift_capture(), r"frame 0 file_path '/etc/secret\.png' points outside", capture_with(frame0(file_path="/etc/secret.png"))),
    Case("mask-path-outside", lift_capture(), r"frame 0 mask_path '\.\./mask\.png' points outside", capture_with(frame0(mask_path="../mask.png"))),
    Case("ply-path-outside", lift_capture(), r"ply_file_path '\.\./\.\./points\.ply' points outside", capture_with(lambda meta: meta.update(ply_file_path="../../points.ply"))),
    Case("colmap-name-outside", lift_capture(), r"images\.txt: image '\.\./\.\./secret\.png' points outside", colmap_capture(names=("a.png", "../../secret.png"))),
    # 5. scene ids unique across inputs
    Case("duplicate-scene-names", lift("--scenes", "{tmp}/a/cap", "{tmp}/b/cap"), r"b/cap and .*a/cap would both be scene 'cap'", duplicate_names),
    # 6. unusable output folder, found before any work
    Case("output-is-a-file", lift(*ROOM), r"--output_dir .*out is a file, not a folder", lambda tmp, a: (tmp / "out").write_text("x"), unwritten=(), unchanged=("out",)),
    Case("output-locked", lift(*ROOM), r"is being written by another run \(pid \d+ .*fit3d lift \(another run\)\)", live_lock, unwritten=(), unchanged=("out",)),
    # 7. empty results
    Case("lift-init-points-0", lift(*ROOM, "--init_points", "0"), r"init_points is 0: lifting starts from at least one Gaussian"),
    Case("finetune-max-steps-0", lambda tmp, a: [*FINETUNE, "--dataset", a / "targets", "--backbone", a / "bb", "--max_steps", "0"], r"max_steps is 0; it must be at least 1"),
    Case("all-invalid-depth", lambda tmp, a: [*EVALUATE, "--model", a / "model", "--dataset", "hf", "--hf_dataset", hf_dataset(tmp / "hf", depth=0.0), "--depth_column", "depth", "--max_depth", "10"], r"no pixel of --depth_column depth is a valid depth"),
    Case("card-nan", lambda tmp, a: ["card", "--model_dir", tmp / "model", "--results", tmp / "results.json"], r"results\.json holds results that are not numbers \(fit3d: depth rmse\)", card_folder(math.nan), unwritten=(), unchanged=("model",)),
    # 1./3. provenance between stages; --backbone
    Case("backbone-missing-weights", lift(*ROOM, "--backbone", "{tmp}/bb"), r"bb: its checkpoint lacks 1 weight\(s\) of the model \(embeddings\.cls_token\)", broken_weights),
    Case("render-other-backbone", lambda tmp, a: ["render", "--output_dir", tmp / "out", "--backbone", a / "bb_other", "--gaussians_dir", a / "lifted", *ROOM], r"room_0000\.safetensors was made with the backbone '.*bb' .* but this run uses '.*bb_other'", unwritten=("out", "out.parts")),
    Case("finetune-other-backbone", lambda tmp, a: [*FINETUNE, "--dataset", a / "targets", "--backbone", a / "bb_other"], r"the targets dataset .*targets was made with the backbone '.*bb' .* but this run uses '.*bb_other'"),
    Case("evaluate-other-baseline", lambda tmp, a: [*EVALUATE, "--model", a / "model", "--baseline", a / "bb_other"], r"--model .*model \(its original backbone\) was made with the backbone .* but this run uses '.*bb_other'"),
    Case("evaluate-plain-backbone", lambda tmp, a: [*EVALUATE, "--model", a / "bb"], r"--model .*bb is a 'dinov2' model, not a FiT3D model folder"),
    Case("card-other-weights", lambda tmp, a: ["card", "--model_dir", tmp / "model", "--results", tmp / "results.json"], r"results\.json was measured on other weights", card_folder(1.0, weights_of_other=True), unwritten=(), unchanged=("model",)),
    # 2. lift resume and reuse refuse other settings
    Case("lift-resume-other-seed", lift(*ROOM, "--seed", "1"), r"lifting checkpoint in .*room_0000 was made with other settings than this run \(.*seed: 0 there, 1 now", lifted_with_seed_0, unwritten=(), unchanged=("out",)),
    Case("lift-reuse-other-iterations", lambda tmp, a: ["lift", "--output_dir", tmp / "out", "--backbone", a / "bb", *ROOM, *LIFT, "--iterations", "5"], r"room_0000\.json was made with other settings .*lift_config\.iterations: 4 there, 5 now", copy_asset("lifted"), unwritten=(), unchanged=("out",)),
    # 4. fine-tuning into an existing folder
    Case("finetune-over-model", lambda tmp, a: [*FINETUNE, "--dataset", a / "targets", "--backbone", a / "bb"], r"already holds a fine-tuned model \(and its checkpoints\)", copy_asset("model"), unwritten=(), unchanged=("out",)),
    Case("finetune-over-checkpoints", lambda tmp, a: [*FINETUNE, "--dataset", a / "targets", "--backbone", a / "bb"], r"holds the checkpoints of an unfinished run \(step_00000002\); continue it with --resume_from_checkpoint latest", lambda tmp, a: (shutil.copytree(a / "model" / "checkpoints", tmp / "out" / "checkpoints")), unwritten=(), unchanged=("out",)),
    Case("finetune-resume-other-config", lambda tmp, a: [*FINETUNE, "--dataset", a / "targets", "--backbone", a / "bb", "--max_steps", "2", "--resume_from_checkpoint", "latest", "--learning_rate", "0.5"], r"the checkpoint .*step_00000002 was made with other settings than this run \(finetune_config\.learning_rate: 1e-05 there, 0\.5 now", copy_asset("model"), unwritten=(), unchanged=("out",)),
]  # fmt: skip


def _filled(argv: list, tmp: Path) -> list[str]:
    return [str(a).replace("{tmp}", str(tmp)) for a in argv]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_user_error(case: Case, tmp_path, assets, capsys):
    case.setup(tmp_path, assets)
    before = {
        name: snapshot(tmp_path / name) if (tmp_path / name).is_dir() else (tmp_path / name).read_bytes()
        for name in case.unchanged
    }
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(_filled(case.argv(tmp_path, assets), tmp_path))
    err, code = capsys.readouterr().err, exit_info.value.code
    if isinstance(code, str):  # sys.exit("message"): Python prints the message and exits with 1
        err, code = err + code, 1
    assert code == case.code, err
    assert re.search(case.message, err), err
    assert "Traceback" not in err
    for name in case.unwritten:
        assert not (tmp_path / name).exists(), f"{name} was written"
    for name, content in before.items():
        after = snapshot(tmp_path / name) if (tmp_path / name).is_dir() else (tmp_path / name).read_bytes()
        assert after == content, f"{name} was changed"


def test_help_of_no_controls_says_what_it_does(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    assert "--no_controls leaves them out" in capsys.readouterr().out.replace("\n", " ").replace("  ", " ")


def test_a_fit3d_folder_as_backbone_is_its_fine_tuned_backbone(assets):
    """Item 1: `--backbone <FiT3D model folder>` means its fine-tuned backbone (a second round), named so."""
    backbone, name = load_backbone_spec(str(assets / "model"))
    model = FiT3DModel.from_pretrained(assets / "model")
    assert name == f"{assets / 'model'} (fine-tuned backbone)" and backbone.config._name_or_path == name
    assert backbones.weights_checksum(backbone) == backbones.weights_checksum(model.finetuned)
    assert backbones.weights_checksum(backbone) != backbones.weights_checksum(model.original)


def test_debug_shows_the_traceback_and_internal_errors_keep_theirs(tmp_path, monkeypatch):
    argv = ["lift", "--output_dir", str(tmp_path / "out"), "--synthetic_rooms", "1", "--init_points", "0"]
    with pytest.raises(UserError, match="init_points is 0"):
        main([*argv, "--debug"])
    monkeypatch.setenv("FIT3D_DEBUG", "1")
    with pytest.raises(UserError, match="init_points is 0"):
        main(argv)
    monkeypatch.delenv("FIT3D_DEBUG")

    from fit3d_hf.commands import card

    def bug(argv):
        raise RuntimeError("a bug")

    monkeypatch.setattr(card, "main", bug)
    with pytest.raises(RuntimeError, match="a bug"):  # not a user error: the traceback stays
        main(["card", "--model_dir", str(tmp_path)])


def test_a_refused_input_exits_2_without_traceback_in_a_real_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FIT3D_DEBUG": ""}
    command = [
        sys.executable,
        "-m",
        "fit3d_hf.cli",
        "lift",
        "--output_dir",
        str(tmp_path / "out"),
        "--scenes",
        str(tmp_path / "nope"),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == USER_ERROR_EXIT_CODE, result.stderr[-2000:]
    assert "fit3d lift: error:" in result.stderr and "nope: no such folder" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_colmap_in_nerfstudio_layout_and_an_images_folder(tmp_path):
    """`<data>/colmap/sparse/0` with the images in `<data>/images` (ns-process-data), and `--images`."""
    write_colmap(tmp_path / "data" / "colmap" / "sparse" / "0", tmp_path / "data" / "images", ["a.png", "b.png"])
    scene = load_scene(tmp_path / "data")
    assert scene.files.image_paths == [tmp_path / "data" / "images" / n for n in ("a.png", "b.png")]
    assert load_scene(tmp_path / "data" / "colmap").files.image_paths == scene.files.image_paths
    # The images anywhere else: named with --images (one folder per scene folder).
    write_colmap(tmp_path / "cap" / "sparse" / "0", tmp_path / "elsewhere", ["a.png", "b.png"])
    (scene,) = load_scenes([tmp_path / "cap"], images=[tmp_path / "elsewhere"])
    assert scene.files.image_paths[0] == tmp_path / "elsewhere" / "a.png"
    with pytest.raises(ValueError, match="1 images folders for 2 scene folders"):
        load_scenes([tmp_path / "cap", tmp_path / "data"], images=[tmp_path / "elsewhere"])


def test_outside_paths_load_when_allowed(tmp_path):
    write_capture(tmp_path / "cap")
    shutil.copy(tmp_path / "cap" / "images" / "0.png", tmp_path / "shared.png")
    edit_capture(tmp_path / "cap", frame0(file_path="../shared.png"))
    scene = load_scene(tmp_path / "cap", allow_external_paths=True)
    assert scene.files.image_paths[0] == tmp_path / "cap" / ".." / "shared.png"


def test_stale_temporaries_are_removed_and_a_failed_render_leaves_no_parts(tmp_path, assets):
    """Item 11: what a killed run left (`.<name>.tmp-<pid>` of a dead process) goes on the next run;
    a render that fails before finishing a part leaves no `<output_dir>.parts/`."""
    shutil.copytree(assets / "lifted", tmp_path / "lifted")
    stale = tmp_path / "lifted" / ".room_0000.json.tmp-999999999"
    stale.write_text("half written")
    argv = ["lift", "--output_dir", tmp_path / "lifted", "--backbone", assets / "bb", *ROOM, *LIFT]
    assert run(argv)[0] == 0
    assert not stale.exists() and not (tmp_path / "lifted" / LOCK_FILE).exists()
    backbone = load_backbone_spec(str(assets / "bb"))[0]
    scene = synthetic.make_room(0, num_views=4, height=32, width=48)
    from fit3d_hf.targets import render_targets

    with pytest.raises(ValueError, match="is not a multiple of the patch size"):
        render_targets([scene], backbone, tmp_path / "t", gaussians_dir=tmp_path / "lifted", image_size=(30, 40))
    assert not (tmp_path / "t").exists() and not (tmp_path / "t.parts").exists()


def test_a_lock_of_a_finished_process_is_taken_over(tmp_path):
    from fit3d_hf.io import folder_lock

    (tmp_path / "out").mkdir()
    dead = {"pid": 999999999, "host": socket.gethostname(), "started": "long ago", "command": "fit3d lift"}
    (tmp_path / "out" / LOCK_FILE).write_text(json.dumps(dead))
    with folder_lock(tmp_path / "out"):
        assert json.loads((tmp_path / "out" / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (tmp_path / "out" / LOCK_FILE).exists()
    with folder_lock(tmp_path / "new"):  # made for the run, removed when nothing was written in it
        assert (tmp_path / "new").is_dir()
    assert not (tmp_path / "new").exists()


def test_results_that_are_not_numbers_are_refused_before_writing(tmp_path):
    from fit3d_hf.evaluation.benchmark import BenchmarkConfig, _check_results

    row = dict(task="depth", metric="rmse", source="fit3d", values=[1.0, math.nan])
    with pytest.raises(ResultsError, match=r"1 result\(s\) are not numbers \(fit3d: depth rmse\)"):
        _check_results({"results": [row]}, BenchmarkConfig(cache_dir=str(tmp_path)))
    with pytest.raises(ResultsError, match="no results"):
        _check_results({"results": []}, BenchmarkConfig(cache_dir=str(tmp_path)))


def test_targets_record_their_backbone_and_gaussians(assets):
    from fit3d_hf.targets import load_targets, targets_metadata

    provenance = targets_metadata(load_targets(assets / "targets"))["provenance"]
    assert provenance["backbone"]["weights_sha256"] == backbones.weights_checksum(load_backbone_spec(str(assets / "bb"))[0])
    info = json.loads((assets / "model" / "fit3d_finetune.json").read_text())
    assert info["provenance"]["backbone"] == provenance["backbone"]
    assert info["provenance"]["finetune_config"]["max_steps"] == 2
    lifted = json.loads((assets / "lifted" / "room_0000.json").read_text())["provenance"]
    assert lifted["seed"] == 0 and lifted["backbone"] == provenance["backbone"] and lifted["lift_config"]["iterations"] == 4
    with pytest.raises(ProvenanceError):
        from fit3d_hf.provenance import check_provenance

        check_provenance({**lifted, "seed": 1}, lifted, artifact="x", fix="y")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["lift", "--iterations", "0"], "iterations must be >= 1, got 0"),
        (["lift", "--config", "no-such.yaml"], "--config no-such.yaml: .*No such file"),
    ],
)
def test_values_a_config_refuses_are_usage_errors(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_a_folder_that_refuses_files_is_found_before_any_work(tmp_path, monkeypatch):
    """Item 6, read-only: root writes through permission bits, so the refusal is simulated where it is detected."""
    import fit3d_hf.io

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(fit3d_hf.io.tempfile, "mkstemp", refuse)
    with pytest.raises(SystemExit) as exit_info:
        main(["lift", "--output_dir", str(tmp_path / "out"), "--synthetic_rooms", "1"])
    assert exit_info.value.code == USER_ERROR_EXIT_CODE and not (tmp_path / "out").exists()
