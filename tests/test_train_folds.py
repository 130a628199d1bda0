"""`vpipe train --folds K`: k-fold cross-validation by source, through the real CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.shards import open_features
from pipeline.train.labels import fold_groups
from pipeline.train.synthetic import make_feature_set

N_SOURCES = 7  # 3 folds of 3, 2 and 2 sources
TINY = ["--epochs", "2", "--hidden", "8", "--batch-size", "8", "--threads", "1", "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("folds-set")
    csv_path, _ = make_feature_set(root / "feats", "regression", n_sources=N_SOURCES,
                                   clips_per_source=2, dim=8, n_shards=2, seed=3)
    return root / "feats", csv_path


def folds_args(store, out: Path, *extra: str, folds: int = 3) -> list[str]:
    folder, csv_path = store
    return ["train", str(folder), "--labels", str(csv_path), "-o", str(out), "--folds",
            str(folds), *TINY, *extra]


@pytest.fixture(scope="module")
def done(store, tmp_path_factory) -> Path:
    """One finished 3-fold run (tests that change it work on a copy)."""
    out = tmp_path_factory.mktemp("folds-run") / "cv"
    assert main(folds_args(store, out)) == 0
    return out


def read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_every_source_is_tested_exactly_once_across_the_folds(store, done):
    folder, _ = store
    source_of = open_features(folder).source_of()
    tested: list[str] = []
    for k in (1, 2, 3):
        splits = read(done / f"fold-{k}" / "splits.json")
        side = {s: {source_of[c] for c in splits[s]} for s in ("train", "val", "test")}
        assert not (side["test"] & side["val"]) and not (side["test"] & side["train"])
        assert not (side["val"] & side["train"])
        assert len(side["val"]) == 1  # round(0.15 * the other 4 or 5 sources), at least 1
        assert side["train"] | side["val"] | side["test"] == set(source_of.values())
        tested += sorted(side["test"])
        # The summary lists the same sources as the fold's own splits.
        assert read(done / "summary.json")["per_fold"][k - 1]["sources"] == {
            s: sorted(v) for s, v in side.items()}
    assert sorted(tested) == sorted(set(source_of.values()))  # each once
    assert len(tested) == N_SOURCES
    # The groups are the seed's deal (--seed 0): the same seed, the same folds.
    groups = fold_groups(list(source_of.values()), 3, seed=0)
    assert [sorted(g) for g in groups] == [
        sorted({source_of[c] for c in read(done / f"fold-{k}" / "splits.json")["test"]})
        for k in (1, 2, 3)
    ]


def test_summary_mean_and_std_are_those_of_the_folds_own_summaries(done):
    s = read(done / "summary.json")
    folds = [read(done / f"fold-{k}" / "summary.json") for k in (1, 2, 3)]
    assert s["folds"] == 3 and s["task"] == "regression" and s["main_metric"] == "mse"
    assert s["n_sources"] == N_SOURCES and s["n_clips"] == 2 * N_SOURCES
    for name in ("mse", "mae", "rmse", "pearson_r"):
        clip = [f["test"][name] for f in folds]
        src = [f["test"]["source"][name] for f in folds]
        assert s["mean"]["test"][name] == pytest.approx(sum(clip) / 3, rel=1e-12)
        assert s["mean"]["test"]["source"][name] == pytest.approx(sum(src) / 3, rel=1e-12)
        m = sum(clip) / 3
        assert s["std"]["test"][name] == pytest.approx(
            (sum((x - m) ** 2 for x in clip) / 3) ** 0.5, rel=1e-9)
        assert s["std"]["test"]["source"][name] == pytest.approx(float(np.std(src)), rel=1e-9)
    base = [f["baseline"]["test"]["mse"] for f in folds]
    assert s["mean"]["baseline"]["mse"] == pytest.approx(sum(base) / 3, rel=1e-12)
    sbase = [f["baseline"]["test"]["source"]["mse"] for f in folds]
    assert s["mean"]["baseline"]["source"]["mse"] == pytest.approx(sum(sbase) / 3, rel=1e-12)
    for k, f in enumerate(folds, start=1):  # each fold's own figures, carried as they are
        assert s["per_fold"][k - 1]["test"] == f["test"]
        assert s["per_fold"][k - 1]["baseline"] == f["baseline"]["test"]
        assert s["per_fold"][k - 1]["warnings"] == f["warnings"]
        # A fold's test split is small: its warning names --folds, not --test-fraction.
        assert any("use fewer --folds" in w for w in f["warnings"])
    assert any(w.startswith("folds 2, 3: the test split holds 2 sources") for w in s["warnings"])
    info = read(done / "vpipe.json")
    assert info["params"]["folds"] == 3 and info["params"]["fold"] == 0
    assert info["result"]["mean"] == s["mean"]["test"]["mse"]
    assert info["counts"]["done"] == sum(f["epochs_run"] for f in folds)
    assert read(done / "fold-2" / "config.json")["config"]["fold"] == 2


def test_out_of_fold_predictions_are_each_clips_testing_fold(store, done, tmp_path):
    folder, _ = store
    lines = [json.loads(x) for x in (done / "predictions.jsonl").read_text().splitlines()]
    clips = [x for x in lines if x["level"] == "clip"]
    sources = [x for x in lines if x["level"] == "source"]
    assert len(clips) == 2 * N_SOURCES and len({x["id"] for x in clips}) == 2 * N_SOURCES
    assert len(sources) == N_SOURCES and {x["split"] for x in lines} == {"test"}
    for k in (1, 2, 3):
        test = read(done / f"fold-{k}" / "splits.json")["test"]
        mine = {x["id"]: x for x in clips if x["fold"] == k}
        assert sorted(mine) == sorted(test)
        # The figures `vpipe predict` gives with that fold's run (to float rounding: its
        # batches hold other clips beside these).
        p = tmp_path / f"p{k}.jsonl"
        assert main(["predict", str(done / f"fold-{k}"), str(folder), "-o", str(p)]) == 0
        by_id = {x["id"]: x for x in map(json.loads, p.read_text().splitlines())
                 if x["level"] == "clip"}
        for cid, x in mine.items():
            assert x["prediction"] == pytest.approx(by_id[cid]["prediction"], rel=1e-5)
            assert by_id[cid]["split"] == "test"


def test_the_same_command_again_retrains_nothing(store, done, tmp_path, capsys):
    out = tmp_path / "cv"
    shutil.copytree(done, out)
    weights = {p: p.read_bytes() for p in out.glob("fold-*/*.pt")}
    assert len(weights) == 6
    capsys.readouterr()
    assert main(folds_args(store, out)) == 0
    err = capsys.readouterr().err
    assert [f"fold-{k} is already complete" in err for k in (1, 2, 3)] == [True] * 3
    assert "epoch 1/2" not in err
    assert "over 3 folds" in err and "fold 2/3: best epoch" in err
    assert {p: p.read_bytes() for p in out.glob("fold-*/*.pt")} == weights
    counts = read(out / "vpipe.json")["counts"]
    assert counts["done"] == 0 and counts["folds_already_done"] == 3
    assert read(out / "summary.json")["mean"] == read(done / "summary.json")["mean"]


def test_an_unfinished_fold_is_trained_and_the_finished_ones_kept(store, done, tmp_path):
    out = tmp_path / "cv"
    shutil.copytree(done, out)
    shutil.rmtree(out / "fold-3")
    (out / "summary.json").unlink()
    kept = (out / "fold-1" / "best.pt").read_bytes()
    assert main(folds_args(store, out, "--quiet")) == 0
    counts = read(out / "vpipe.json")["counts"]
    assert (counts["folds_done"], counts["folds_already_done"]) == (1, 2)
    assert (out / "fold-1" / "best.pt").read_bytes() == kept
    # Training is seeded: fold 3 trained again gives the figures it gave the first time.
    assert read(out / "summary.json")["mean"] == read(done / "summary.json")["mean"]


def test_more_folds_than_sources_is_refused_in_one_line(store, tmp_path, capsys):
    folder, csv_path = store
    out = tmp_path / "cv"
    args = ["train", str(folder), "--labels", str(csv_path), "-o", str(out), *TINY]
    assert main([*args, "--folds", str(N_SOURCES + 1)]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("vpipe: error")]
    assert err == [f"vpipe: error: --folds {N_SOURCES + 1}: needs 2 to {N_SOURCES} folds (the "
                   f"labelled clips come from {N_SOURCES} source videos; each fold tests on "
                   "whole ones)"]
    assert main([*args, "--folds", "1"]) == 2
    assert "--folds must be at least 2" in capsys.readouterr().err
    assert not out.exists()


def test_other_options_into_a_folds_run_are_refused(store, done, tmp_path, capsys):
    folder, csv_path = store
    out = tmp_path / "cv"
    shutil.copytree(done, out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    args = folds_args(store, out)
    capsys.readouterr()
    assert main(folds_args(store, out, folds=4)) == 2
    assert "a run with other options is there (folds: 3 -> 4)" in capsys.readouterr().err
    assert main([*args, "--lr", "0.01"]) == 2
    assert "(lr: 0.0003 -> 0.01); use --overwrite" in capsys.readouterr().err
    assert main([*args, "--epochs", "3"]) == 2
    assert "use --resume to continue it with these" in capsys.readouterr().err
    single = ["train", str(folder), "--labels", str(csv_path), "-o", str(out), *TINY]
    assert main(single) == 2  # a single run into a folds folder
    assert f"{out}: holds a --folds 3 run" in capsys.readouterr().err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert main([*args, "--resume", "--epochs", "3", "--quiet"]) == 0  # train longer: allowed
    assert [read(out / f"fold-{k}" / "summary.json")["epochs_run"] for k in (1, 2, 3)] == [3] * 3
    assert main(folds_args(store, out, "--overwrite", "--quiet", folds=2)) == 0  # start again
    assert sorted(p.name for p in out.glob("fold-*")) == ["fold-1", "fold-2"]
    assert read(out / "summary.json")["folds"] == 2


def test_evaluate_and_predict_given_a_folds_run_name_a_fold(store, done, tmp_path, capsys):
    folder, csv_path = store
    capsys.readouterr()
    assert main(["predict", str(done), str(folder), "-o", str(tmp_path / "p.jsonl")]) == 2
    err = capsys.readouterr().err
    assert f"use one fold's run, e.g. {done / 'fold-1'}" in err
    assert main(["evaluate", str(done), str(folder), "--labels", str(csv_path)]) == 2
    assert f"e.g. {done / 'fold-1'}" in capsys.readouterr().err
    assert main(["evaluate", str(done / "fold-1"), str(folder), "--labels", str(csv_path),
                 "--split", "test"]) == 0
    got = json.loads(capsys.readouterr().out)["metrics"]
    assert got["mse"] == pytest.approx(read(done / "fold-1" / "summary.json")["test"]["mse"])


@pytest.mark.parametrize("task", ["classification", "multilabel"])
def test_folds_work_for_classification_and_multilabel(task, tmp_path):
    csv_path, _ = make_feature_set(tmp_path / "f", task, n_sources=6, clips_per_source=2, dim=8,
                                   seed=2)
    out = tmp_path / "cv"
    assert main(["train", str(tmp_path / "f"), "--labels", str(csv_path), "-o", str(out),
                 "--folds", "2", "--quiet", *TINY]) == 0
    s = read(out / "summary.json")
    name = s["main_metric"]
    folds = [read(out / f"fold-{k}" / "summary.json")["test"] for k in (1, 2)]
    assert s["mean"]["test"][name] == pytest.approx((folds[0][name] + folds[1][name]) / 2)
    assert s["mean"]["test"]["source"][name] == pytest.approx(
        (folds[0]["source"][name] + folds[1]["source"][name]) / 2)
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len([x for x in preds if x["level"] == "clip"]) == 12
    assert ("prediction" if task == "classification" else "tags") in preds[0]


def test_folds_refuse_a_split_column_and_the_caption_task(store, tmp_path, capsys):
    folder, csv_path = store
    rows = csv_path.read_text().splitlines()
    with_split = tmp_path / "split.csv"
    with_split.write_text("\n".join([rows[0] + ",split", *(r + ",train" for r in rows[1:])]))
    args = ["train", str(folder), "-o", str(tmp_path / "cv"), "--folds", "3", *TINY]
    assert main([*args, "--labels", str(with_split)]) == 2
    assert "--folds makes its own splits: the labels CSV has a split column" in (
        capsys.readouterr().err)
    assert main([*args, "--labels", str(csv_path), "--task", "caption"]) == 2
    assert "--folds is not supported with --task caption" in capsys.readouterr().err
    assert not (tmp_path / "cv").exists()


def test_fold_groups_are_disjoint_near_equal_and_drawn_by_the_seed():
    sources = [f"s{i}" for i in range(10)]
    groups = fold_groups(sources, 3, seed=0)
    assert sorted(len(g) for g in groups) == [3, 3, 4]
    assert sorted(s for g in groups for s in g) == sorted(sources)
    assert fold_groups(list(reversed(sources)), 3, seed=0) == groups  # order-free
    assert fold_groups(sources, 3, seed=1) != groups


def test_a_workflow_sets_folds_in_its_train_table(store, tmp_path, monkeypatch, capsys):
    folder, csv_path = store
    (tmp_path / "wf.toml").write_text(
        f'inputs = ["{folder}"]\nlabels = "{csv_path}"\nwork_dir = "work"\n\n[train]\n'
        'folds = 3\nepochs = 1\nhidden = 8\nthreads = 1\ndevice = "cpu"\n', encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert main(["run", "wf.toml", "--quiet"]) == 0
    run = tmp_path / "work" / "train"
    assert [(run / f"fold-{k}" / "best.pt").is_file() for k in (1, 2, 3)] == [True] * 3
    assert read(run / "vpipe.json")["params"]["folds"] == 3
