import json

import pytest
import yaml
from huggingface_hub import ModelCard, parse_eval_result_entries
from huggingface_hub.utils import filter_repo_objects

from fit3d_hf import hub
from fit3d_hf.evaluation.report import results_table


def _results(tmp_path, dataset="synthetic"):
    rows = []
    for source, base in (("original", 0.50), ("fit3d", 0.56), ("blur_control", 0.505)):
        for metric, offset, hib in (
            ("mean_iou", 0.0, True),
            ("mean_accuracy", 0.1, True),
            ("overall_accuracy", 0.2, True),
            ("rmse", 0.3, False),
        ):
            values = [base + offset, base + offset + 0.01, base + offset - 0.01]
            rows.append(
                dict(
                    dataset=dataset,
                    split="test",
                    task="depth" if metric == "rmse" else "segmentation",
                    metric=metric,
                    source=source,
                    values=values,
                    mean=sum(values) / 3,
                    std=0.01,
                    higher_is_better=hib,
                )
            )
    results = {
        "fit3d_hf_version": "0.1.0",
        "protocol": {"seeds": [0, 1, 2], "resolution": [96, 128]},
        "sources": {"blur_control": {"role": "control"}, "original": {"role": "baseline"}, "fit3d": {"role": "fit3d"}},
        "results": rows,
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    return path, results


def test_results_table_orders_sources_and_marks_spread(tmp_path):
    _, results = _results(tmp_path)
    table = results_table(results)
    header = next(line for line in table.splitlines() if line.startswith("| task"))
    assert header.index("original") < header.index("fit3d") < header.index("blur_control")
    miou = next(line for line in table.splitlines() if "mIoU" in line)
    # fit3d is 0.06 above the baseline (> spread 0.01); the control only 0.005 (< spread)
    assert "(+0.0600)" in miou and "(+0.0600 ≈)" not in miou
    assert "(+0.0050 ≈)" in miou
    assert "RMSE ↓" in table


def _model_dir(tmp_path, backbone_config):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    config = {"model_type": "fit3d", "assembly": "concat", "backbone_config": backbone_config}
    (model_dir / "config.json").write_text(json.dumps(config))
    return model_dir


def test_model_card_header_is_what_the_hub_reads(tmp_path):
    results_path, _ = _results(tmp_path)
    model_dir = _model_dir(tmp_path, {"model_type": "dinov2", "hidden_size": 384, "patch_size": 14})
    out = hub.write_model_card(
        model_dir, eval_results_path=results_path, extra={"base_model": "facebook/dinov2-small", "training": "300 steps"}
    )
    assert out == model_dir / "README.md"
    card = ModelCard.load(out)  # huggingface_hub's parser, model-index included
    data = card.data.to_dict()
    assert data["pipeline_tag"] == "image-feature-extraction" and data["library_name"] == "transformers"
    assert data["base_model"] == "facebook/dinov2-small" and data["base_model_relation"] == "finetune"
    assert data["license"] == "apache-2.0"  # DINOv2's
    assert "feature-extraction" not in data["tags"] and {"fit3d", "dinov2"} <= set(data["tags"])
    values = {(r.task_type, r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert values[("image-segmentation", "synthetic", "mean_iou")] == pytest.approx(0.56)
    assert values[("depth-estimation", "synthetic", "rmse")] == pytest.approx(0.86)
    # One metric type per task and dataset: mean and overall accuracy are told apart.
    keys = [(r.task_type, r.dataset_type, r.metric_type) for r in card.data.eval_results]
    assert len(keys) == len(set(keys)) == 4
    text = card.text
    assert "`concat`" in text and "dinov2" in text and "300 steps" in text
    assert "blur_control" in text  # the controls are in the card's table
    assert "docs/" not in text  # no document the model repo does not have
    assert "[fit3d_hf](https://github.com/ywyue/FiT3D)" not in text and "(https://github.com/ywyue/FiT3D)" in text
    assert not (model_dir / hub.EVAL_RESULTS_DIR).exists()  # procedural rooms are no Hub dataset


@pytest.mark.parametrize(
    ("backbone_config", "base_model", "license"),
    [
        ({"model_type": "vit", "hidden_size": 768}, None, "cc-by-nc-4.0"),  # the paper's MAE
        ({"model_type": "vit_mae"}, None, "cc-by-nc-4.0"),
        ({"model_type": "dinov2", "fit3d_family": "deit3"}, None, "apache-2.0"),
        ({"model_type": "clip_vision_model"}, "openai/clip-vit-base-patch16", "mit"),
        ({"model_type": "dinov3_vit"}, None, "other"),
        ({"model_type": "vit", "_name_or_path": "tiny:mae (random init, seed 0)"}, None, "apache-2.0"),
    ],
)
def test_licence_follows_the_backbone(tmp_path, backbone_config, base_model, license):
    model_dir = _model_dir(tmp_path, backbone_config)
    extra = {"base_model": base_model} if base_model else {}
    data = ModelCard.load(hub.write_model_card(model_dir, extra=extra)).data.to_dict()
    assert data["license"] == license
    if license == "other":
        assert data["license_name"] == "dinov3-license" and data["license_link"].startswith("https://")
    assert (
        hub.write_model_card(model_dir, extra={**extra, "license": "mit"})
        and ModelCard.load(model_dir / "README.md").data.license == "mit"
    )


def test_hub_datasets_get_eval_results_files(tmp_path):
    results_path, _ = _results(tmp_path, dataset="me/segbench")
    model_dir = _model_dir(tmp_path, {"model_type": "dinov2"})
    card = ModelCard.load(hub.write_model_card(model_dir, eval_results_path=results_path))
    assert card.data.datasets == ["me/segbench"]
    assert {r.dataset_type for r in card.data.eval_results} == {"me/segbench"}  # model-index for older readers
    files = sorted((model_dir / hub.EVAL_RESULTS_DIR).iterdir())
    assert [f.name for f in files] == ["me__segbench.yaml"]
    entries = parse_eval_result_entries(yaml.safe_load(files[0].read_text()))  # huggingface_hub's parser
    assert {e.task_id: e.value for e in entries} == pytest.approx(
        {
            "segmentation_mean_iou": 0.56,
            "segmentation_mean_accuracy": 0.66,
            "segmentation_overall_accuracy": 0.76,
            "depth_rmse": 0.86,
        }
    )
    assert all(e.dataset_id == "me/segbench" and "3 probe seeds" in e.notes for e in entries)
    # .eval_results/ is uploaded with the model (only temporary files are not).
    assert list(filter_repo_objects([f"{hub.EVAL_RESULTS_DIR}/me__segbench.yaml"], ignore_patterns=hub.UPLOAD_IGNORE_PATTERNS))
    assert not list(
        filter_repo_objects([".README.md.tmp-12", "checkpoints/step_1/x"], ignore_patterns=hub.UPLOAD_IGNORE_PATTERNS)
    )
    # A card written without those results drops them.
    hub.write_model_card(model_dir)
    assert not (model_dir / hub.EVAL_RESULTS_DIR).exists()


def test_duplicate_results_rows_are_refused(tmp_path):
    _, results = _results(tmp_path)
    results["results"].append(dict(results["results"][4]))  # a second fit3d mIoU row
    with pytest.raises(ValueError, match="several rows"):
        hub.eval_results_from(results)


def test_write_model_card_without_results_and_errors(tmp_path):
    out = hub.write_model_card(tmp_path)
    assert "No benchmark was run" in out.read_text()
    assert "license" not in ModelCard.load(out).data.to_dict()  # no config: the licence cannot be told
    with pytest.raises(FileNotFoundError, match="nope"):
        hub.write_model_card(tmp_path / "nope")
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="missing keys"):
        hub.write_model_card(tmp_path, eval_results_path=bad)


def test_push_to_hub_stops_at_network_boundary(tmp_path, monkeypatch):
    calls = {}
    monkeypatch.setattr(hub, "create_repo", lambda repo_id, **kw: calls.setdefault("create", (repo_id, kw)))

    def fake_upload(**kw):
        calls["upload"] = kw
        calls["files"] = sorted(p.name for p in (tmp_path / "model").iterdir())
        return type("Info", (), {"commit_url": "https://hf.co/u/m/commit/abc"})()

    monkeypatch.setattr(hub, "upload_folder", fake_upload)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    with pytest.raises(ValueError, match="not a model folder"):
        hub.push_to_hub(model_dir / "..", "u/m")
    (model_dir / "config.json").write_text("{}")
    (model_dir / "model.safetensors").write_bytes(b"0")
    (model_dir / "README.md").write_text("card")
    url = hub.push_to_hub(model_dir, "u/m", private=True, token="t")
    assert url.endswith("abc")
    assert calls["create"] == ("u/m", {"token": "t", "private": True, "repo_type": "model", "exist_ok": True})
    assert calls["upload"]["repo_id"] == "u/m" and calls["upload"]["folder_path"] == str(model_dir)
    assert calls["files"] == ["README.md", "config.json", "model.safetensors"]
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "data-00000-of-00001.arrow").write_bytes(b"0")
    hub.push_to_hub(data_dir, "u/d", repo_type="dataset")
    assert calls["upload"]["repo_type"] == "dataset"
    with pytest.raises(ValueError, match="repo_type"):
        hub.push_to_hub(data_dir, "u/d", repo_type="notebook")


def test_push_command_passes_arguments(tmp_path, monkeypatch):
    from fit3d_hf.commands import push

    sent = {}
    monkeypatch.setattr(
        hub, "push_to_hub", lambda folder, repo_id, **kw: sent.update(folder=folder, repo_id=repo_id, **kw) or "url"
    )
    push.main(["--folder", str(tmp_path), "--repo_id", "me/data", "--repo_type", "dataset", "--private"])
    assert sent == {
        "folder": str(tmp_path),
        "repo_id": "me/data",
        "repo_type": "dataset",
        "private": True,
        "token": None,
        "commit_message": None,
    }
