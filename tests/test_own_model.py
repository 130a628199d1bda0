"""`vpipe train --model package.module:ClassName`: a model defined outside vpipe (tests/
own_models.py) trained, resumed, evaluated and predicted with through the CLI, what it is
handed, and the refusals (a changed source, a class that is not a module, captions)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import own_models
import pytest
import torch

from pipeline.cli import main
from pipeline.files import sha256_of
from pipeline.train import TrainConfig
from pipeline.train.own_model import OwnModel
from pipeline.train.sequences import pad_batch
from pipeline.train.synthetic import make_feature_set

FAST = ["--hidden", "16", "--lr", "3e-3", "--batch-size", "16", "--val-fraction", "0.2",
        "--test-fraction", "0.2", "--threads", "1"]


@pytest.fixture(scope="module")
def regression(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("own") / "features"
    csv_path, _ = make_feature_set(folder, "regression", n_sources=40, audio_dim=4, seed=3)
    return folder, csv_path


def test_own_model_trains_evaluates_and_predicts_through_the_cli(regression, tmp_path,
                                                                  capsys) -> None:
    folder, labels = regression
    run = tmp_path / "run"
    cmd = ["train", str(folder), "--labels", str(labels), "-o", str(run), "--model",
           "own_models:MeanPool", "--epochs", "30", "--patience", "30", *FAST, "--quiet"]
    assert main(cmd) == 0
    summary = json.loads((run / "summary.json").read_text())
    # The target is the mean of image feature 0: mean pooling reads it off.
    assert summary["test"]["mse"] < 0.3 * summary["baseline"]["test"]["mse"]
    assert summary["model"] == "own_models:MeanPool"
    source = json.loads((run / "vpipe.json").read_text())["params"]["model_source"]
    assert (source["class"], source["file"]) == ("own_models:MeanPool", own_models.__file__)
    assert source["files"] == {own_models.__file__: sha256_of(Path(own_models.__file__))}
    capsys.readouterr()
    assert main(["evaluate", str(run), str(folder), "--labels", str(labels), "--split", "test",
                 "-o", str(tmp_path / "eval.json")]) == 0
    figures = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    assert figures["mse"] == pytest.approx(summary["test"]["mse"], rel=1e-5)
    assert main(["predict", str(run), str(folder), "-o", str(tmp_path / "pred.jsonl")]) == 0
    lines = (tmp_path / "pred.jsonl").read_text().splitlines()
    clips = [json.loads(line) for line in lines if json.loads(line)["level"] == "clip"]
    assert len(clips) == 80 and all(np.isfinite(c["prediction"]) for c in clips)


def test_what_the_model_is_handed_is_normalised_and_zero_padded() -> None:
    torch.manual_seed(0)
    net = OwnModel(own_models.Recorder({"image": 3, "audio": 2}, 1), {"image": 3, "audio": 2}, 1)
    mean, std = np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0, 4.0])
    net.set_normalisation({"image": (mean, std), "audio": (np.zeros(2), np.ones(2))})
    rng = np.random.default_rng(0)
    a = {"image": rng.random((4, 3), np.float32), "audio": np.zeros((0, 2), np.float32)}
    b = {"image": rng.random((2, 3), np.float32), "audio": rng.random((3, 2), np.float32)}
    net(pad_batch([a, b], ["image", "audio"]))
    x, n = own_models.Recorder.seen["image"]
    assert n.tolist() == [4, 2] and own_models.Recorder.seen["audio"][1].tolist() == [0, 3]
    torch.testing.assert_close(x[0], torch.as_tensor((a["image"] - mean) / std, dtype=x.dtype))
    torch.testing.assert_close(x[1, :2], torch.as_tensor((b["image"] - mean) / std,
                                                         dtype=x.dtype))
    assert not x[1, 2:].any() and not own_models.Recorder.seen["audio"][0][0].any()


def test_a_changed_source_is_refused_by_resume_evaluate_and_predict(regression, tmp_path,
                                                                    monkeypatch,
                                                                    capsys) -> None:
    folder, labels = regression
    pkg = tmp_path / "mine"
    pkg.mkdir()
    shutil.copy(own_models.__file__, pkg / "my_models.py")
    monkeypatch.syspath_prepend(str(pkg))
    run = tmp_path / "run"
    cmd = ["train", str(folder), "--labels", str(labels), "-o", str(run), "--model",
           "my_models:MeanPool", "--epochs", "2", *FAST, "--quiet"]
    assert main(cmd) == 0
    with open(pkg / "my_models.py", "a") as f:
        f.write("# changed after training\n")
    capsys.readouterr()
    assert main(cmd) == 2  # the same command: the recorded source is another
    assert "model_source" in capsys.readouterr().err
    assert main(["predict", str(run), str(folder), "-o", str(tmp_path / "pred.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "my_models.py has changed since this run was trained" in err[0]
    assert not (tmp_path / "pred.jsonl").exists()


@pytest.mark.parametrize("name, says", [
    ("own_models:NotAModule", "NotAModule in own_models is not a torch.nn.Module class"),
    ("own_models:Missing", "Missing in own_models is not found"),
    ("no_such_package.models:Net", "cannot import no_such_package.models"),
    ("own_models:NeedsMore", "NeedsMore(dims, n_outputs) failed"),
    ("own_models:TooWide", "TooWide.forward returned (2, 2) for a batch of 2 clips; the task "
                           "needs a tensor (2, 1)"),
    ("own_models:Tupled", "Tupled.forward returned tuple"),
    ("own_models:NoParameters", "NoParameters has no trainable parameters"),
    (".own_models:MeanPool", "give package.module:ClassName (an absolute module path"),
])
def test_a_class_that_cannot_be_used_is_one_line(regression, tmp_path, capsys, name,
                                                 says) -> None:
    folder, labels = regression
    code = main(["train", str(folder), "--labels", str(labels), "-o", str(tmp_path / "run"),
                 "--model", name, "--epochs", "1", *FAST, "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and says in err[0], err


def test_own_model_with_folds_and_not_with_captions(regression, tmp_path) -> None:
    folder, labels = regression
    assert main(["train", str(folder), "--labels", str(labels), "-o", str(tmp_path / "folds"),
                 "--model", "own_models:MeanPool", "--folds", "2", "--epochs", "2", *FAST,
                 "--quiet"]) == 0
    assert (tmp_path / "folds" / "fold-2" / "best.pt").exists()
    assert len((tmp_path / "folds" / "predictions.jsonl").read_text().splitlines()) >= 80
    from pipeline.errors import UsageError
    from pipeline.train.inputs import check_config

    with pytest.raises(UsageError, match="captions are vpipe's decoder"):
        check_config(TrainConfig(task="caption", model="own_models:MeanPool"))


def test_log_tensorboard_writes_each_epochs_figures_and_resume_goes_on(regression,
                                                                        tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder, labels = regression
    run = tmp_path / "run"
    cmd = ["train", str(folder), "--labels", str(labels), "-o", str(run), "--epochs", "2",
           "--patience", "9", *FAST, "--log", "tensorboard", "--quiet"]
    assert main(cmd) == 0
    assert main([*cmd[:cmd.index("--epochs") + 1], "3", *cmd[cmd.index("--epochs") + 2:],
                 "--resume"]) == 0
    history = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    board = EventAccumulator(str(run / "tensorboard"))
    board.Reload()
    assert {"train_loss", "val/mse", "val/loss"} <= set(board.Tags()["scalars"])
    for name, key in (("train_loss", "train_loss"), ("val/mse", "val_mse")):
        points = {e.step: e.value for e in board.Scalars(name)}
        want = {h["epoch"]: h[key] for h in history}
        assert points.keys() == want.keys() == {1, 2, 3}
        assert all(points[k] == pytest.approx(want[k], rel=1e-6) for k in want)


def test_log_takes_none_or_tensorboard(regression, tmp_path, capsys) -> None:
    folder, labels = regression
    assert main(["train", str(folder), "--labels", str(labels), "-o", str(tmp_path / "run"),
                 "--log", "wandb"]) == 2
    assert "--log 'wandb': choose none or tensorboard" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_changed_base_class_file_is_refused_too(regression, tmp_path, monkeypatch,
                                                  capsys) -> None:
    """The class's own file and its base classes' files are recorded (hostile pass: a base
    class edited after training changed predictions without a word)."""
    folder, labels = regression
    pkg = tmp_path / "src"
    pkg.mkdir()
    shutil.copy(own_models.__file__, pkg / "base_models.py")
    (pkg / "child_models.py").write_text(
        "from base_models import MeanPool\n\n\nclass Child(MeanPool):\n    pass\n")
    (pkg / "broken_models.py").write_text("raise RuntimeError('not today')\n")
    monkeypatch.syspath_prepend(str(pkg))
    run = tmp_path / "run"
    assert main(["train", str(folder), "--labels", str(labels), "-o", str(run), "--model",
                 "child_models:Child", "--epochs", "1", *FAST, "--quiet"]) == 0
    with open(pkg / "base_models.py", "a") as f:
        f.write("# the base changed\n")
    capsys.readouterr()
    assert main(["predict", str(run), str(folder), "-o", str(tmp_path / "p.jsonl")]) == 2
    assert "base_models.py has changed since this run was trained" in capsys.readouterr().err
    assert main(["train", str(folder), "--labels", str(labels), "-o", str(tmp_path / "r2"),
                 "--model", "broken_models:Net", *FAST, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "importing broken_models failed (RuntimeError: not today)" in err
    assert "PYTHONPATH" not in err


def test_a_nan_loss_stops_training_in_one_line(regression, tmp_path, capsys) -> None:
    """Hostile pass: a model whose output is NaN trained to the end, exit 0, `test mse nan`."""
    folder, labels = regression
    code = main(["train", str(folder), "--labels", str(labels), "-o", str(tmp_path / "run"),
                 "--model", "own_models:NotANumber", "--epochs", "3", *FAST, "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert "training loss nan at epoch 1: training stops" in err[0]
    assert not (tmp_path / "run" / "summary.json").exists()
