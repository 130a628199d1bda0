"""`vpipe predict RUN VIDEOS...`: new videos through the stages the run's features were made
with (read back from the stage folders), equal to the same stages run by hand; refused before
any stage runs when those stages cannot be reproduced.

The project is test_workflow's in small: four 2 s colour videos (64x48), two 0.8 s subclips each,
every 5th frame, resnet18 with weights from a state-dict file, a small LSTM for 3 epochs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import synth

from pipeline.cli import command, main
from pipeline.workflow.replay import Recorded, refusals, split_command

SOURCES = {"dark": (30, 30, 30), "red": (200, 40, 40), "green": (40, 200, 40), "light": (220,) * 3}

WORKFLOW = """\
name = "tiny"
inputs = ["videos"]
labels = "labels.csv"
work_dir = "w"

[subclip]
count = 2
duration = 0.8
start = 0.2

[extract-frames]
every = 5
size = 64
no-audio = true

[features]
image-model = "resnet18"
image-weights = "weights/resnet18.pth"
audio-model = "none"
batch-size = 8
workers = 0

[train]
task = "regression"
epochs = 3
hidden = 16
val-fraction = 0.25
test-fraction = 0.25
device = "cpu"
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, weights: dict[str, Path]) -> Path:
    """The project after `vpipe run` (relative paths, run from its own folder)."""
    root = tmp_path_factory.mktemp("project")
    for name, rgb in SOURCES.items():
        synth.make_video(root / "videos" / f"{name}.mp4", duration_s=2.0, size=(64, 48),
                         color=rgb, audio=False)
    (root / "labels.csv").write_text("id,label\ndark,1\nred,2\ngreen,3\nlight,4\n")
    (root / "weights").mkdir()
    shutil.copy(weights["image"], root / "weights" / "resnet18.pth")
    (root / "tiny.toml").write_text(WORKFLOW)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        assert main(["run", "tiny.toml", "--quiet"]) == 0
    return root


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A video the run never saw, in a folder of its own."""
    d = tmp_path_factory.mktemp("new")
    return synth.make_video(d / "blue.mp4", duration_s=2.0, size=(64, 48), color=(40, 40, 200),
                            audio=False)


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_predict_videos_equals_the_stages_by_hand(project, fresh, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # not the project: the recorded paths must still resolve
    run = project / "w" / "train"
    assert main(["predict", str(run), str(fresh), "-o", "auto.jsonl"]) == 0
    err = capsys.readouterr().err
    assert "vpipe predict [1/3] subclip" in err and "vpipe predict [3/3] features" in err
    assert f"--image-weights {project / 'weights' / 'resnet18.pth'}" in err

    w = str(project / "weights" / "resnet18.pth")
    assert main(["subclip", str(fresh), "-o", "h/sub", "--count", "2", "--duration", "0.8",
                 "--start", "0.2", "-q"]) == 0
    assert main(["extract-frames", "h/sub", "-o", "h/frames", "--every", "5", "--size", "64",
                 "--no-audio", "-q"]) == 0
    assert main(["features", "h/frames", "-o", "h/feat", "--image-model", "resnet18",
                 "--image-weights", w, "--audio-model", "none", "--batch-size", "8",
                 "--workers", "0", "-q"]) == 0
    assert main(["predict", str(run), "h/feat", "-o", "hand.jsonl", "-q"]) == 0

    auto, hand = lines(tmp_path / "auto.jsonl"), lines(tmp_path / "hand.jsonl")
    assert [(p["level"], p["id"]) for p in auto] == [(p["level"], p["id"]) for p in hand]
    assert [p["id"] for p in auto] == ["blue_0", "blue_1", "blue"]
    for a, h in zip(auto, hand, strict=True):
        assert a["prediction"] == pytest.approx(h["prediction"], rel=1e-6, abs=1e-6)
        assert a["split"] is None  # a new video belongs to no split of the run
    caches = list((run / "predict-cache").iterdir())
    assert len(caches) == 1 and (caches[0] / "features" / "index.jsonl").is_file()

    # The same command again: its stages find their work done, the predictions are the same.
    capsys.readouterr()
    assert main(["predict", str(run), str(fresh), "-o", "again.jsonl"]) == 0
    err = capsys.readouterr().err
    assert "0 done, 2 already done" in err or "up to date" in err
    assert lines(tmp_path / "again.jsonl") == auto
    assert len(list((run / "predict-cache").iterdir())) == 1


def test_predict_refuses_weights_that_changed(project, fresh, tmp_path, capsys):
    import torch
    import torchvision

    run, wfile = project / "w" / "train", project / "weights" / "resnet18.pth"
    before = wfile.read_bytes()
    try:
        torch.manual_seed(7)
        torch.save(torchvision.models.resnet18().state_dict(), wfile)
        code = main(["predict", str(run), str(fresh), "-o", str(tmp_path / "p.jsonl"),
                     "--work-dir", str(tmp_path / "work")])
    finally:
        wfile.write_bytes(before)
    assert code == 2
    err = capsys.readouterr().err
    assert "image weights" in err and "would not be the ones the run learned from" in err
    assert not (tmp_path / "work").exists() and not (tmp_path / "p.jsonl").exists()


def test_predict_refuses_when_a_stage_folder_is_gone(project, fresh, tmp_path, capsys):
    run, frames = project / "w" / "train", project / "w" / "extract-frames"
    frames.rename(frames.with_name("moved"))
    try:
        code = main(["predict", str(run), str(fresh), "-o", str(tmp_path / "p.jsonl")])
    finally:
        frames.with_name("moved").rename(frames)
    assert code == 2
    err = capsys.readouterr().err
    assert f"made from {frames}, which is gone" in err


def test_titles_for_a_run_without_them_refused(project, fresh, tmp_path, capsys):
    (tmp_path / "t.csv").write_text("id,text\nblue,a blue video\n")
    code = main(["predict", str(project / "w" / "train"), str(fresh), "-o",
                 str(tmp_path / "p.jsonl"), "--titles", str(tmp_path / "t.csv")])
    assert code == 2
    assert "made without features --text" in capsys.readouterr().err


def test_no_videos_refused(project, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(["predict", str(project / "w" / "train"), str(tmp_path / "empty"), "-o",
                 str(tmp_path / "p.jsonl")])
    assert code == 2
    assert "empty: no files in this folder" in capsys.readouterr().err


def test_recorded_commands_split_by_the_cli_option_table():
    sub = command().commands["subclip"]
    pos, opts = split_command(sub, ["a.mp4", "-o", "out", "--count=3", "b", "--overwrite",
                                    "--mode", "exact"])
    assert pos == ["a.mp4", "b"]
    assert opts == [("-o", "out"), ("--count", "3"), ("--overwrite",), ("--mode", "exact")]


def test_what_new_videos_cannot_reproduce_is_said():
    seg = Recorded("subclip", Path("s"), [], ["--segments", "/d/segs.csv"])
    text = Recorded("features", Path("f"), [], ["--text", "/d/titles.csv"])
    why = refusals([seg, text], titles=None)
    assert len(why) == 2
    assert "segments file (/d/segs.csv)" in why[0]
    assert "--text CSV" in why[1]
    assert refusals([text], titles="new.csv") == []


def test_outputs_that_would_overwrite_an_input_or_the_run_are_refused(project, fresh, tmp_path,
                                                                       capsys):
    run = project / "w" / "train"
    video = tmp_path / "x.mp4"
    shutil.copy(fresh, video)
    assert main(["predict", str(run), str(video), "-o", str(video)]) == 2
    assert "that is an input" in capsys.readouterr().err
    assert video.stat().st_size == fresh.stat().st_size
    before = (run / "vpipe.json").read_bytes()
    assert main(["predict", str(run), str(project / "w" / "features"), "-o",
                 str(run / "vpipe.json")]) == 2
    assert "a file of the run" in capsys.readouterr().err
    assert (run / "vpipe.json").read_bytes() == before
    # A feature folder and videos together: one or the other.
    assert main(["predict", str(run), str(project / "w" / "features"), str(fresh), "-o",
                 str(tmp_path / "p.jsonl")]) == 2
    assert "not both" in capsys.readouterr().err


def test_a_work_dir_of_other_videos_is_refused_and_failed_videos_exit_1(project, fresh, tmp_path,
                                                                       capsys):
    run = project / "w" / "train"
    new = tmp_path / "new"
    new.mkdir()
    shutil.copy(fresh, new / "blue.mp4")
    (new / "broken.mp4").write_bytes(b"not a video at all")
    # Named on the command line, a file that is no video fails (found in a folder: skipped).
    code = main(["predict", str(run), str(new / "blue.mp4"), str(new / "broken.mp4"), "-o",
                 str(tmp_path / "p.jsonl"), "--work-dir", str(tmp_path / "wd")])
    err = capsys.readouterr().err
    assert code == 1 and "broken.mp4" in err and "some videos failed" in err
    assert {p["source"] if p["level"] == "clip" else p["id"]
            for p in lines(tmp_path / "p.jsonl")} == {"blue"}
    # The same folder for other videos would mix their clips into these predictions.
    assert main(["predict", str(run), str(fresh), "-o", str(tmp_path / "q.jsonl"),
                 "--work-dir", str(tmp_path / "wd")]) == 2
    assert "holds the stages of other videos" in capsys.readouterr().err


def test_a_dangling_link_among_the_videos_is_one_failed_line(project, fresh, tmp_path, capsys):
    # Regression (issue 24, 9): FileNotFoundError from the cache key, and nothing predicted.
    run = project / "w" / "train"
    new = tmp_path / "new"
    new.mkdir()
    shutil.copy(fresh, new / "blue.mp4")
    (new / "gone.mp4").symlink_to(tmp_path / "moved.mp4")
    (tmp_path / "named.mp4").symlink_to(tmp_path / "deleted.mp4")
    (tmp_path / "loop.mp4").symlink_to("loop.mp4")
    code = main(["predict", str(run), str(new), str(tmp_path / "named.mp4"),
                 str(tmp_path / "loop.mp4"), "-o", str(tmp_path / "p.jsonl"), "--work-dir",
                 str(tmp_path / "wd")])
    err = capsys.readouterr().err
    assert code == 1, err
    assert f"{new / 'gone.mp4'}: broken symbolic link (to {tmp_path / 'moved.mp4'})" in err
    assert f"{tmp_path / 'named.mp4'}: broken symbolic link (to {tmp_path / 'deleted.mp4'})" in err
    assert f"{tmp_path / 'loop.mp4'}: symbolic link loop" in err
    assert "some videos failed" in err and "Traceback" not in err
    assert {p["source"] if p["level"] == "clip" else p["id"]
            for p in lines(tmp_path / "p.jsonl")} == {"blue"}
