import json
from dataclasses import fields, replace

import pytest
import torch

from fit3d_hf.evaluation.replication import NO_EFFECT, ONE_REPLICATION
from fit3d_hf.pipeline import DemoConfig, DemoError, run_demo
from fit3d_hf.pipeline.config import STAGES, replication_config, replication_configs, room_seeds, stage_settings
from fit3d_hf.pipeline.report import results_grid, verdicts
from fit3d_hf.pipeline.rerun import prepare_run_folder, read_record, run_stage


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
    seeds = room_seeds(DemoConfig(num_train_scenes=3, num_probe_train_scenes=2, num_test_scenes=2, probe_scene_seed=1000))
    assert seeds == {"finetune": [0, 1, 2], "probe_train": [1000, 1001], "test": [1002, 1003]}
    with pytest.raises(DemoError, match=r"share seeds \[2\]"):
        room_seeds(DemoConfig(num_train_scenes=3, probe_scene_seed=2))


def test_command_parses_the_config_and_reports_refusals_as_exit_messages():
    from fit3d_hf.commands.demo import main

    # The seeds are checked before the backbone is loaded or anything is written.
    with pytest.raises(SystemExit, match=r"^fit3d demo: fine-tuning and probe rooms share seeds \[2\]"):
        main(["--num_train_scenes", "3", "--probe_scene_seed", "2", "--probe_seeds", "4", "5"])


def test_stage_settings_accumulate_along_the_stages():
    config = DemoConfig()
    lift = stage_settings(config, "lift", "backbone-a")
    evaluate = stage_settings(config, "evaluate", "backbone-a")
    assert lift["lift_iterations"] == 300 and lift["backbone_name"] == "backbone-a"
    assert "seg_iterations" not in lift  # a probe setting does not touch the lifted Gaussians
    assert lift.items() <= evaluate.items() and evaluate["probe_seeds"] == [0, 1, 2]
    # Every setting that is not about where or how fast the run goes belongs to some stage.
    every = set(stage_settings(config, STAGES[-1], "backbone-a"))
    assert every == {f.name for f in fields(DemoConfig)} - {"output_dir", "fresh", "workers"} | {"backbone_name"}
    with pytest.raises(ValueError, match="unknown stage 'train'"):
        stage_settings(config, "train", "backbone-a")


class Killed(Exception):
    """Stands for a run killed in the middle of a stage."""


def test_run_folder_refuses_other_settings_and_foreign_folders(tmp_path):
    out = tmp_path / "run"
    config = DemoConfig(output_dir=str(out))
    calls = []

    def work():
        calls.append(1)
        (out / "artifact").write_text("done")

    assert run_stage(prepare_run_folder(config), "lift", stage_settings(config, "lift", "backbone-a"), work)
    # Same settings: the folder is reused as it is and the complete stage is skipped.
    run_dir = prepare_run_folder(config)
    assert not run_stage(run_dir, "lift", stage_settings(config, "lift", "backbone-a"), work)
    assert calls == [1] and (out / "artifact").exists()
    other = DemoConfig(output_dir=str(out), lift_iterations=10)
    with pytest.raises(DemoError, match=r"lift stage was made with other settings \(lift_iterations: 300 -> 10\); add --fresh"):
        run_stage(run_dir, "lift", stage_settings(other, "lift", "backbone-a"), work)
    with pytest.raises(DemoError, match="backbone_name: 'backbone-a' -> 'backbone-b'"):
        run_stage(run_dir, "lift", stage_settings(config, "lift", "backbone-b"), work)
    assert calls == [1]
    # --fresh starts over with the new settings.
    fresh = DemoConfig(output_dir=str(out), lift_iterations=10, fresh=True)
    run_dir = prepare_run_folder(fresh)
    assert not (out / "artifact").exists()
    assert run_stage(run_dir, "lift", stage_settings(fresh, "lift", "backbone-a"), work)
    assert json.loads((out / "demo.json").read_text())["stages"]["lift"]["settings"]["lift_iterations"] == 10
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_text("x")
    with pytest.raises(DemoError, match="not a demo run folder"):
        prepare_run_folder(DemoConfig(output_dir=str(foreign), fresh=True))
    assert (foreign / "holiday.jpg").exists()
    # A run folder of the demo before stage records is refused, not misread.
    (out / "demo.json").write_text(json.dumps({"settings": {"lift_iterations": 10}}))
    with pytest.raises(DemoError, match="older fit3d demo"):
        prepare_run_folder(DemoConfig(output_dir=str(out), lift_iterations=10))


def test_interrupted_stage_resumes_with_its_settings_only(tmp_path):
    config = DemoConfig(output_dir=str(tmp_path / "run"))
    run_dir = prepare_run_folder(config)
    settings = stage_settings(config, "evaluate", "backbone-a")

    def killed():
        raise Killed

    with pytest.raises(Killed):
        run_stage(run_dir, "evaluate", settings, killed)
    assert read_record(run_dir)["stages"]["evaluate"] == {"settings": settings, "complete": False}
    # What the killed run left was made with these settings: other ones must not resume from it.
    other = stage_settings(replace(config, seg_iterations=5), "evaluate", "backbone-a")
    with pytest.raises(DemoError, match=r"evaluate stage was started with other settings \(seg_iterations: 200 -> 5\)"):
        run_stage(run_dir, "evaluate", other, killed)
    calls = []
    assert run_stage(run_dir, "evaluate", settings, lambda: calls.append(1))
    assert calls == [1] and read_record(run_dir)["stages"]["evaluate"]["complete"] is True


TINY_RUN = dict(
    num_train_scenes=1,
    num_probe_train_scenes=1,
    num_test_scenes=1,
    scene_views=6,
    lift_iterations=60,
    finetune_steps=4,
    finetune_batch_size=2,
    seg_iterations=10,
    depth_iterations=10,
    probe_seeds=[0, 1],
    workers=1,  # in this process, so that monkeypatching reaches every stage
)


def _tiny_backbone(tmp_path):
    from fit3d_hf.backbones import build_backbone
    from fit3d_hf.embedded import EmbeddedPretrainConfig, embedded_backbone_config

    torch.manual_seed(0)
    backbone_dir = tmp_path / "tiny-backbone"
    config = EmbeddedPretrainConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    build_backbone(embedded_backbone_config(config)).save_pretrained(backbone_dir)
    return backbone_dir


def test_tiny_demo_runs_end_to_end_and_resumes(tmp_path, capsys, monkeypatch):
    """The whole orchestration with a tiny random backbone and tiny schedules (about 20 s on 2 idle cores),
    killed once in the finetune stage and resumed."""
    from fit3d_hf.pipeline import demo

    backbone_dir = _tiny_backbone(tmp_path)
    out = tmp_path / "demo"
    config = DemoConfig(output_dir=str(out), backbone=str(backbone_dir), **TINY_RUN)

    # Killed after the control model is saved (with its checkpoints) and before its card.
    write_model_card = demo.write_model_card

    def killed_at_the_control(model_dir, **kwargs):
        if model_dir.name == "control_blur":
            raise Killed
        return write_model_card(model_dir, **kwargs)

    monkeypatch.setattr(demo, "write_model_card", killed_at_the_control)
    with pytest.raises(Killed):
        run_demo(config)
    monkeypatch.undo()
    assert read_record(out)["stages"]["finetune"]["complete"] is False
    assert (out / "control_blur" / "checkpoints").is_dir()
    capsys.readouterr()

    first = run_demo(config)
    printed = capsys.readouterr().out
    assert first.skipped == ["scenes", "lift", "render"]
    assert "finetune: started with these settings by a run that stopped: resuming" in printed
    assert f"{out / 'model'} exists: skipped" in printed
    assert f"resumed from {out / 'control_blur' / 'checkpoints' / 'step_00000004'} at step 4" in printed
    for path in (
        "model/model.safetensors",
        "model/README.md",
        "control_blur/model.safetensors",
        "control_blur/README.md",
        "eval/results.json",
        "pictures/features.png",
        "pictures/loss_finetune.png",
        "pictures/loss_lifting.png",
        "summary.md",
        "lifted/room_0000.json",
    ):
        assert (out / path).is_file(), path
    assert not (out / "control_blur" / "checkpoints").exists()
    assert first.paths["summary"] == out / "summary.md" and first.paths["features"] == out / "pictures" / "features.png"
    sources = set(first.results["sources"])
    assert sources == {"original", "fit3d", "finetuned_only", "concat_random", "blur_control"}
    assert len(first.verdicts) == 4 and all("n = 1" in line for line in first.verdicts)
    assert first.replications["n"] == 1 and len(first.replications["comparisons"]) == 4 * 3
    assert {c["verdict"] for c in first.replications["comparisons"]} == {ONE_REPLICATION}
    card = (out / "model" / "README.md").read_text()
    assert str(backbone_dir) in card and "model-index" in card
    assert all(line in card for line in first.verdicts) and "1 independent replication(s)" in card
    assert f"backbone {backbone_dir}" in printed and "spread over probe seeds only" in printed
    summary = (out / "summary.md").read_text()
    assert all(line in summary for line in verdicts(first.results)) and ONE_REPLICATION in summary

    # A rerun skips every stage, reports the same numbers and prints the same summary.
    second = run_demo(config)
    assert second.results == first.results and second.verdicts == first.verdicts
    assert second.skipped == list(STAGES)
    assert summary in capsys.readouterr().out and (out / "summary.md").read_text() == summary
    # A changed setting is refused at the first stage it changes, before any work.
    with pytest.raises(DemoError, match=r"evaluate stage was made with other settings \(seg_iterations: 10 -> 11\)"):
        run_demo(replace(config, seg_iterations=11))


def test_worker_processes_give_what_one_process_with_one_thread_gives(tmp_path):
    """The default on a multi-core machine: rooms lifted, fine-tunings run and probe seeds trained in
    one-thread worker processes (`pipeline.workers`); bit for bit what one process gives with one thread."""
    from safetensors.torch import load_file

    backbone_dir = _tiny_backbone(tmp_path)
    settings = {**TINY_RUN, "num_train_scenes": 2, "probe_scene_seed": 100, "backbone": str(backbone_dir)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the final probe pass (correspondence) runs in the demo's process
    try:
        one = run_demo(DemoConfig(output_dir=str(tmp_path / "one"), **settings))
        two = run_demo(DemoConfig(output_dir=str(tmp_path / "two"), **{**settings, "workers": 2}))
    finally:
        torch.set_num_threads(threads)
    for artifact in ("lifted/room_0000", "lifted/room_0001", "model/model", "control_blur/model"):
        weights = [load_file(tmp_path / run / f"{artifact}.safetensors") for run in ("one", "two")]
        assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    probed = [[r for r in run.results["results"] if r["task"] != "correspondence"] for run in (one, two)]
    assert probed[0] == probed[1] and len(probed[0]) > 0
    eval_dir = tmp_path / "two" / "eval"
    assert len(list((eval_dir / "cache" / "runs").glob("*.json"))) == 5 * 2 * 2  # sources x tasks x seeds
    assert not list(eval_dir.glob(".seed-*"))  # the workers' own reports are gone
    with pytest.raises(DemoError, match="--workers must be >= 0"):
        run_demo(DemoConfig(output_dir=str(tmp_path / "bad"), **{**settings, "workers": -1}))


def test_replications_take_disjoint_rooms_and_their_own_seed():
    config = DemoConfig(output_dir="run", replications=3, num_train_scenes=2, num_probe_train_scenes=2, num_test_scenes=1)
    first, second, third = replication_configs(config)
    assert first is config  # replication 0 is today's run
    assert (second.output_dir, second.scene_seed, second.probe_scene_seed, second.seed) == ("run/replications/01", 2, 1003, 1)
    assert room_seeds(third) == {"finetune": [4, 5], "probe_train": [1006, 1007], "test": [1008]} and third.seed == 2
    with pytest.raises(ValueError, match="replication 3 does not exist"):
        replication_config(config, 3)
    with pytest.raises(DemoError, match=r"reach the probe rooms .* move --probe_scene_seed above 11"):
        replication_configs(replace(config, replications=6, probe_scene_seed=10))
    with pytest.raises(DemoError, match="--replications must be >= 1"):
        replication_configs(replace(config, replications=0))


@pytest.mark.slow
def test_tiny_demo_replicates_into_sub_folders_and_resumes(tmp_path, capsys):
    """Two replications of the tiny run (about 40 s): each in its folder, verdicts across them; a rerun redoes
    nothing, and going back to one replication redoes only the verdicts, the card and the summary."""
    out = tmp_path / "demo"
    config = DemoConfig(output_dir=str(out), backbone=str(_tiny_backbone(tmp_path)), replications=2, **TINY_RUN)
    first = run_demo(config)
    assert (out / "eval" / "results.json").is_file() and (out / "pictures" / "features.png").is_file()
    second_run = out / "replications" / "01"
    assert (second_run / "eval" / "results.json").is_file() and (second_run / "model" / "model.safetensors").is_file()
    assert not (second_run / "pictures").exists()  # pictures, card and summary are made once, in the run folder
    assert read_record(second_run)["stages"]["scenes"]["settings"]["scene_seed"] == 1
    record = json.loads((out / "replications.json").read_text())
    assert record == first.replications and record["n"] == 2
    assert [(r["folder"], r["scene_seed"], r["probe_scene_seed"], r["seed"]) for r in record["replications"]] == [
        (".", 0, 1000, 0),
        ("replications/01", 1, 1002, 1),
    ]
    comparisons = record["comparisons"]
    assert len(comparisons) == 4 * 3
    blur_miou = next(c for c in comparisons if (c["a"], c["b"], c["metric"]) == ("finetuned_only", "blur_control", "mean_iou"))
    results = [json.loads((folder / "eval" / "results.json").read_text()) for folder in (out, second_run)]

    def mean(r, source):
        return next(row["mean"] for row in r["results"] if (row["source"], row["metric"]) == (source, "mean_iou"))

    assert blur_miou["differences"] == pytest.approx([mean(r, "finetuned_only") - mean(r, "blur_control") for r in results])
    for c in comparisons:
        assert c["n"] == 2 and c["ci_low"] <= c["mean"] <= c["ci_high"] and 0 < c["sign_p"] <= 1
        assert c["verdict"] == NO_EFFECT or not c["ci_low"] <= 0 <= c["ci_high"]
    summary = (out / "summary.md").read_text()
    assert "| finetuned_only − blur_control | mIoU ↑ | 2 |" in summary
    assert "2 independent replication(s)" in (out / "model" / "README.md").read_text()

    again = run_demo(config)
    assert again.replications == first.replications
    assert set(again.skipped) == set(STAGES) | {f"replications/01/{stage}" for stage in STAGES[:5]}
    capsys.readouterr()
    one = run_demo(replace(config, replications=1))
    assert "replicate: made with other settings (replications): redone" in capsys.readouterr().out
    assert one.replications["n"] == 1 and set(one.skipped) == set(STAGES) - {"replicate", "card", "summary"}
    assert (second_run / "eval" / "results.json").is_file()  # kept: adding it back costs nothing


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
    rows = {(r["source"], r["task"]) for r in run.results["results"]}
    for source in ("original", "fit3d", "finetuned_only", "concat_random", "blur_control"):
        assert {(source, "segmentation"), (source, "depth"), (source, "correspondence")} <= rows
