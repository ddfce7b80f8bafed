import json

import pytest
import yaml

from fit3d_hf import hub
from fit3d_hf.evaluation.report import results_table


def _results(tmp_path):
    rows = []
    for source, base in (("original", 0.50), ("fit3d", 0.56), ("blur_control", 0.505)):
        for metric, offset, hib in (("mean_iou", 0.0, True), ("rmse", 0.3, False)):
            values = [base + offset, base + offset + 0.01, base + offset - 0.01]
            rows.append(
                dict(
                    dataset="synthetic",
                    split="test",
                    task="segmentation" if metric == "mean_iou" else "depth",
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


def test_write_model_card_fills_model_index(tmp_path):
    results_path, _ = _results(tmp_path)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(
        json.dumps(
            {
                "model_type": "fit3d",
                "assembly": "concat",
                "backbone_config": {"model_type": "dinov2", "hidden_size": 384, "patch_size": 14},
            }
        )
    )
    out = hub.write_model_card(
        model_dir, eval_results_path=results_path, extra={"base_model": "facebook/dinov2-small", "training": "300 steps"}
    )
    assert out == model_dir / "README.md"
    text = out.read_text()
    header = yaml.safe_load(text.split("---")[1])
    assert header["base_model"] == "facebook/dinov2-small"
    metrics = header["model-index"][0]["results"]
    values = {(m["task"]["type"], m["metrics"][0]["type"]): m["metrics"][0]["value"] for m in metrics}
    assert values[("image-segmentation", "mean_iou")] == pytest.approx(0.56)
    assert values[("depth-estimation", "rmse")] == pytest.approx(0.86)
    assert "`concat`" in text and "dinov2" in text and "300 steps" in text
    assert "blur_control" in text  # the controls are in the card's table


def test_write_model_card_without_results_and_errors(tmp_path):
    out = hub.write_model_card(tmp_path)
    assert "No benchmark was run" in out.read_text()
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
