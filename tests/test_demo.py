import json

import pytest
import torch

from fit3d_hf.commands.demo import DemoArguments, prepare_run_folder, results_grid, room_seeds, verdicts


def _row(source, task, metric, mean, std, higher=True):
    return dict(
        dataset="synthetic",
        split="test",
        task=task,
        metric=metric,
        source=source,
        values=[mean],
        mean=mean,
        std=std,
        higher_is_better=higher,
    )


RESULTS = {
    "protocol": {"seeds": [0, 1, 2]},
    "sources": {
        name: {"role": role}
        for name, role in [
            ("original", "baseline"),
            ("fit3d", "fit3d"),
            ("finetuned_only", "control"),
            ("concat_random", "control"),
            ("blur_control", "control"),
        ]
    },
    "results": [
        _row("original", "segmentation", "mean_iou", 0.50, 0.01),
        _row("fit3d", "segmentation", "mean_iou", 0.55, 0.01),
        _row("concat_random", "segmentation", "mean_iou", 0.56, 0.02),
        _row("finetuned_only", "segmentation", "mean_iou", 0.53, 0.005),
        _row("blur_control", "segmentation", "mean_iou", 0.51, 0.005),
        _row("original", "depth", "rmse", 0.70, 0.01, higher=False),
        _row("fit3d", "depth", "rmse", 0.75, 0.01, higher=False),
    ],
}


def test_verdicts_separate_effects_from_seed_noise():
    lines = verdicts(RESULTS)
    headline, capacity, blur, alone = lines
    assert "mIoU +0.0500 (spread 0.0100: better)" in headline
    # Lower RMSE is better: +0.05 m is worse.
    assert "depth RMSE (m) +0.0500 (spread 0.0100: WORSE)" in headline
    assert "mIoU -0.0100 (spread 0.0200: no effect beyond the spread)" in capacity
    assert "mIoU +0.0200 (spread 0.0050: better)" in blur
    assert "depth" not in blur  # no depth rows for these sources: nothing is claimed
    assert alone.startswith("- fine-tuned alone vs the original backbone")


def test_results_grid_has_a_row_per_source_and_dashes_for_missing_metrics():
    grid = results_grid(RESULTS).splitlines()
    assert len(grid) == 2 + 5
    assert grid[3].startswith("| fit3d | fit3d | 0.5500 ± 0.0100 | 0.7500 ± 0.0100 | – |")


def test_room_seeds_are_disjoint_and_overlaps_are_refused():
    seeds = room_seeds(DemoArguments(num_train_scenes=3, num_probe_train_scenes=2, num_test_scenes=2, probe_scene_seed=1000))
    assert seeds == {"finetune": [0, 1, 2], "probe_train": [1000, 1001], "test": [1002, 1003]}
    with pytest.raises(SystemExit, match=r"share seeds \[2\]"):
        room_seeds(DemoArguments(num_train_scenes=3, probe_scene_seed=2))


def test_run_folder_refuses_other_settings_and_foreign_folders(tmp_path):
    out = tmp_path / "run"
    args = DemoArguments(output_dir=str(out))
    prepare_run_folder(args, "backbone-a")
    (out / "artifact").write_text("done")
    # Same settings: the folder is reused as it is (resume).
    prepare_run_folder(args, "backbone-a")
    assert (out / "artifact").exists()
    with pytest.raises(SystemExit, match=r"lift_iterations: 300 -> 10"):
        prepare_run_folder(DemoArguments(output_dir=str(out), lift_iterations=10), "backbone-a")
    with pytest.raises(SystemExit, match="backbone_name: 'backbone-a' -> 'backbone-b'"):
        prepare_run_folder(args, "backbone-b")
    # --fresh starts over with the new settings.
    prepare_run_folder(DemoArguments(output_dir=str(out), lift_iterations=10, fresh=True), "backbone-a")
    assert not (out / "artifact").exists()
    assert json.loads((out / "demo.json").read_text())["settings"]["lift_iterations"] == 10
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_text("x")
    with pytest.raises(SystemExit, match="not a demo run folder"):
        prepare_run_folder(DemoArguments(output_dir=str(foreign), fresh=True), "backbone-a")
    assert (foreign / "holiday.jpg").exists()


TINY_RUN = [
    "--num_train_scenes",
    "1",
    "--num_probe_train_scenes",
    "1",
    "--num_test_scenes",
    "1",
    "--scene_views",
    "6",
    "--lift_iterations",
    "60",
    "--finetune_steps",
    "4",
    "--finetune_batch_size",
    "2",
    "--seg_iterations",
    "10",
    "--depth_iterations",
    "10",
    "--probe_seeds",
    "0",
    "1",
]


def test_tiny_demo_runs_end_to_end_and_resumes(tmp_path, capsys):
    """The whole orchestration with a tiny random backbone and tiny schedules (about 15 s on 2 idle cores)."""
    from fit3d_hf.backbones import build_backbone
    from fit3d_hf.commands.demo import main
    from fit3d_hf.embedded import EmbeddedPretrainConfig, embedded_backbone_config

    torch.manual_seed(0)
    backbone_dir = tmp_path / "tiny-backbone"
    config = EmbeddedPretrainConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    build_backbone(embedded_backbone_config(config)).save_pretrained(backbone_dir)
    out = tmp_path / "demo"
    argv = ["--output_dir", str(out), "--backbone", str(backbone_dir), *TINY_RUN]
    first = main(argv)
    for path in (
        "model/model.safetensors",
        "model/README.md",
        "control_blur/model.safetensors",
        "eval/results.json",
        "pictures/features.png",
        "pictures/loss_finetune.png",
        "pictures/loss_lifting.png",
        "summary.md",
        "lifted/room_0000.json",
    ):
        assert (out / path).is_file(), path
    sources = set(first["results"]["sources"])
    assert sources == {"original", "fit3d", "finetuned_only", "concat_random", "blur_control"}
    assert len(first["verdicts"]) == 4
    card = (out / "model" / "README.md").read_text()
    assert str(backbone_dir) in card and "model-index" in card
    summary = capsys.readouterr().out
    assert f"backbone {backbone_dir}" in summary and "beyond the seed spread" in summary
    # A rerun skips every finished stage and reports the same numbers.
    second = main(argv)
    assert second["results"] == first["results"]
    assert second["timings"]["finetune"] < 5 and second["timings"]["evaluate"] < 5


@pytest.mark.slow
def test_default_demo_fine_tunes_and_reports_every_control(tmp_path):
    """`fit3d demo` with its defaults and the shipped embedded backbone (about 4 minutes on 2 cores)."""
    from safetensors.torch import load_file

    from fit3d_hf.commands.demo import main

    out = tmp_path / "fit3d-demo"
    run = main(["--output_dir", str(out)])
    assert "fit3d-embedded-vit-p8" in (out / "summary.md").read_text()
    weights = load_file(out / "model" / "model.safetensors")
    moved = [
        k
        for k in weights
        if k.startswith("finetuned.") and not torch.equal(weights[k], weights["original." + k[len("finetuned.") :]])
    ]
    assert moved, "fine-tuning did not change the backbone"
    rows = {(r["source"], r["task"]) for r in run["results"]["results"]}
    for source in ("original", "fit3d", "finetuned_only", "concat_random", "blur_control"):
        assert {(source, "segmentation"), (source, "depth"), (source, "correspondence")} <= rows
    assert run["timings"]["total_this_run"] < 600
