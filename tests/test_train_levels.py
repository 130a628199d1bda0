"""Figures at two levels: per clip and per source (a source's clips' predictions averaged),
in summary.json, `vpipe evaluate` and the baseline; each prediction line names its split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.train.synthetic import make_feature_set


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_source_metrics_equal_a_hand_computation(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "features"
    csv_path, labels = make_feature_set(folder, "regression", n_sources=30, seed=3)
    run = tmp_path / "run"
    assert main(["train", str(folder), "--labels", str(csv_path), "-o", str(run), "--epochs",
                 "2", "--hidden", "8", "-q"]) == 0
    preds = tmp_path / "preds.jsonl"
    assert main(["predict", str(run), str(folder), "-o", str(preds)]) == 0
    lines = [json.loads(x) for x in preds.read_text().splitlines()]
    splits = json.loads((run / "splits.json").read_text())
    split_of = {c: s for s, ids in splits.items() for c in ids}
    clips = [x for x in lines if x["level"] == "clip"]
    assert all(x["split"] == split_of[x["id"]] for x in clips)
    summary = json.loads((run / "summary.json").read_text())
    for split in ("val", "test"):
        # By hand: each source's clip predictions averaged, its target its clips' mean label.
        mine = [x for x in clips if x["split"] == split]
        srcs = sorted({x["source"] for x in mine})
        pred = {s: np.mean([x["prediction"] for x in mine if x["source"] == s]) for s in srcs}
        true = {s: np.mean([float(labels[x["id"]]) for x in mine if x["source"] == s])
                for s in srcs}
        mse = float(np.mean([(pred[s] - true[s]) ** 2 for s in srcs]))
        fig = summary[split]["source"]
        assert fig["n_sources"] == len(srcs) == summary["n_sources"][split]
        assert fig["mse"] == pytest.approx(mse, rel=1e-4)
        assert summary[split]["mse"] != pytest.approx(fig["mse"])  # two levels, not one copied
        base = summary["baseline"][split]["source"]
        mean = np.mean([float(labels[c]) for c in splits["train"]])
        assert base["mse"] == pytest.approx(np.mean([(mean - true[s]) ** 2 for s in srcs]),
                                            rel=1e-4)
        assert {x["split"] for x in lines if x["level"] == "source" and x["id"] in srcs} == {
            split}
    capsys.readouterr()
    assert main(["evaluate", str(run), str(folder), "--labels", str(csv_path), "--split",
                 "test"]) == 0
    e = json.loads(capsys.readouterr().out)
    assert e["metrics"]["source"]["mse"] == pytest.approx(summary["test"]["source"]["mse"],
                                                          rel=1e-4)


def test_clips_the_run_never_saw_have_no_split(tmp_path: Path) -> None:
    """Labels for 14 of 20 sources: the other sources' clips are in no split (null)."""
    folder = tmp_path / "features"
    csv_path, labels = make_feature_set(folder, "classification", n_sources=20, seed=1)
    rows = csv_path.read_text().splitlines()
    head, body = rows[0], rows[1:]
    kept = sorted({r.split(",")[0].rsplit("_", 1)[0] for r in body})[:14]
    part = tmp_path / "part.csv"
    part.write_text("\n".join([head, *[r for r in body
                                        if r.split(",")[0].rsplit("_", 1)[0] in kept]]) + "\n")
    run = tmp_path / "run"
    assert main(["train", str(folder), "--labels", str(part), "-o", str(run), "--epochs",
                 "1", "--hidden", "8", "-q"]) == 0
    preds = tmp_path / "p.jsonl"
    assert main(["predict", str(run), str(folder), "-o", str(preds)]) == 0
    lines = [json.loads(x) for x in preds.read_text().splitlines()]
    sources = {x["id"]: x["split"] for x in lines if x["level"] == "source"}
    assert len(sources) == 20
    assert all((split is None) == (src not in kept) for src, split in sources.items())
    assert {s for s in sources.values() if s} <= {"train", "val", "test"}


def test_tiny_splits_and_a_model_under_its_baseline_are_said(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "features"
    csv_path, _ = make_feature_set(folder, "regression", n_sources=6, seed=2)
    run = tmp_path / "run"
    assert main(["train", str(folder), "--labels", str(csv_path), "-o", str(run), "--epochs",
                 "1", "--hidden", "4"]) == 0
    err = capsys.readouterr().err
    summary = json.loads((run / "summary.json").read_text())
    n = summary["n_sources"]
    assert n["test"] < 5 and n["val"] < 5
    for split in ("val", "test"):
        text = f"the {split} split holds {n[split]} source"
        assert any(w.startswith(text) for w in summary["warnings"])
        assert f"vpipe train: warning: {text}" in err
    assert f"per source ({n['test']})" in err


def test_a_model_that_does_not_beat_its_baseline_is_said() -> None:
    from pipeline.train.evaluation import caveats

    def summary(task: str, got: float, base: float) -> dict:
        return {"task": task, "n_sources": {"val": 9, "test": 9}, "val": {},
                "test": {"source": {"mse": got, "accuracy": got}},
                "baseline": {"test": {"source": {"mse": base, "accuracy": base}}}}

    assert caveats(summary("regression", 0.5, 1.0)) == []  # lower mse: better
    assert caveats(summary("regression", 1.2, 1.0)) == [
        "the model does not beat the trivial baseline on test per source (mse 1.2, baseline 1)"]
    assert caveats(summary("classification", 0.8, 0.5)) == []
    assert len(caveats(summary("classification", 0.5, 0.5))) == 1  # a tie does not beat it
