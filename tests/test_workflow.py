"""`vpipe run`: workflow files checked against the real commands, run end to end, resumed after a
kill, and equal to the commands `--dry-run` prints.

The media are four 2 s frame-numbered videos (64x48, 25 fps); the workflow cuts two 0.8 s subclips
from each (20 frames), keeps every 5th frame (4 per clip), runs resnet18 with its seeded random
initialisation and trains a small LSTM for 3 epochs, so one full run takes seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import synth

from pipeline.cli import main
from pipeline.records import read_manifest
from pipeline.shards import open_features, read_index

REPO = Path(__file__).resolve().parent.parent
VPIPE = str(Path(sys.executable).parent / "vpipe")
SOURCES = {"dark": (30, 30, 30), "red": (200, 40, 40), "green": (40, 200, 40), "light": (220,) * 3}

TINY = """\
# a tiny workflow for the tests
name = "tiny"
inputs = ["videos"]
labels = "labels.csv"
work_dir = "work"

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
image-weights = "none"
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

[predict]
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with videos/, labels.csv (rating = brightness rank) and tiny.toml."""
    root = tmp_path_factory.mktemp("project")
    for name, rgb in SOURCES.items():
        synth.make_video(
            root / "videos" / f"{name}.mp4", duration_s=2.0, size=(64, 48), color=rgb, audio=False
        )
    ratings = {"dark": 1.0, "red": 2.0, "green": 3.0, "light": 4.0}
    (root / "labels.csv").write_text(
        "id,label\n" + "".join(f"{k},{v}\n" for k, v in ratings.items()), encoding="utf-8"
    )
    (root / "tiny.toml").write_text(TINY, encoding="utf-8")
    return root


def vpipe_run(project: Path, *args: str, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.chdir(project)
    return main(["run", "tiny.toml", *args])


def outputs(work: Path) -> dict:
    """The parts of a run's outputs that must not depend on how the run got there."""
    clips = {
        i: (r["status"], r["start"], r["end"]) for i, r in read_manifest(work / "subclip").items()
    }
    frames = {
        i: (r["n_frames"], r["timestamps"])
        for i, r in read_manifest(work / "extract-frames").items()
    }
    with open_features(work / "features") as store:
        feats = {c.clip_id: c.image for c in store}
    preds = [json.loads(x) for x in (work / "train" / "predictions.jsonl").read_text().splitlines()]
    return {
        "clips": clips,
        "frames": frames,
        "features": feats,
        "predictions": {(p["level"], p["id"]): p["prediction"] for p in preds},
    }


def assert_same(a: dict, b: dict) -> None:
    assert a["clips"] == b["clips"]
    assert a["frames"] == b["frames"]
    assert sorted(a["features"]) == sorted(b["features"])
    for cid, x in a["features"].items():
        np.testing.assert_allclose(x, b["features"][cid], rtol=1e-4, atol=1e-5)
    assert sorted(a["predictions"]) == sorted(b["predictions"])
    for k, v in a["predictions"].items():
        assert v == pytest.approx(b["predictions"][k], rel=1e-4, abs=1e-5)


@pytest.fixture(scope="module")
def first_run(project: Path) -> dict:
    """One uninterrupted run of tiny.toml into project/work (the reference outputs)."""
    mp = pytest.MonkeyPatch()
    try:
        assert vpipe_run(project, "--quiet", monkeypatch=mp) == 0
    finally:
        mp.undo()
    return outputs(project / "work")


# --------------------------------------------------------------------------- planning


@pytest.mark.parametrize("name", ["trailer-rating", "video-tagging", "video-tagging-notext",
                                  "demo", "captioning"])
def test_shipped_workflows_match_the_real_commands(name: str, capsys: pytest.CaptureFixture):
    assert main(["run", str(REPO / "workflows" / f"{name}.toml"), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(x.startswith("vpipe ") for x in lines)
    assert [shlex.split(x)[1] for x in lines][-2:] == ["train", "predict"]


def test_trailer_rating_dry_run_is_the_lrcn_setup(capsys: pytest.CaptureFixture):
    wf = REPO / "workflows" / "trailer-rating.toml"
    assert main(["run", str(wf), "--dry-run", "--input", "my trailers", "--work-dir", "w"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        "vpipe subclip 'my trailers' -o w/subclip --count 3 --duration 30 "
        "--start 10 --min-fraction 0.5 --mode ranges"
    )
    assert lines[1] == "vpipe extract-frames w/subclip -o w/extract-frames --every 45 --no-audio"
    assert lines[2].startswith(
        "vpipe features w/extract-frames -o w/features --image-model resnet50"
    )
    assert "--labels ratings.csv -o w/train --task regression --model lstm" in lines[3]
    assert lines[4] == "vpipe predict w/train w/features -o w/train/predictions.jsonl"


def test_set_from_until_and_lists(
    project: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    rc = vpipe_run(
        project,
        "--dry-run",
        "--from",
        "extract-frames",
        "--until",
        "train",
        "--set",
        'train.modalities=["image"]',
        "--set",
        "train.bidirectional=true",
        "--set",
        "features.image-model=resnet34",
        "--work-dir",
        "elsewhere",
        monkeypatch=monkeypatch,
    )
    # --from needs the outputs of the stages before it: elsewhere/subclip does not exist.
    assert rc == 2
    assert (
        "--from extract-frames: elsewhere/subclip (the output of subclip) does not exist"
        in capsys.readouterr().err
    )
    rc = vpipe_run(
        project,
        "--dry-run",
        "--until",
        "train",
        "--set",
        'train.modalities=["image"]',
        "--set",
        "train.bidirectional=true",
        "--set",
        "features.image-model=resnet34",
        monkeypatch=monkeypatch,
    )
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert [shlex.split(x)[1] for x in lines] == ["subclip", "extract-frames", "features", "train"]
    assert "--image-model resnet34" in lines[2]
    assert lines[3].endswith("--modalities image --bidirectional")


BAD = [
    ("[subclip]\ncount = 2\n\n[extract-frame]\nevery = 3\n", 8, "unknown stage [extract-frame]"),
    ("[subclip]\ncount = 2\ncuont = 3\n", 7, "unknown option 'cuont' for [subclip]"),
    ("[subclip]\ncount = 0\n", 6, "Invalid value for '--count'"),
    ('[subclip]\ncount = "three"\n', 6, "Invalid value for '--count'"),
    ('[subclip]\n[features]\nimage-model = "resnet18"\n', 6, "[features] needs a media folder"),
    ('[subclip]\ninputs = "x"\n', 6, "'inputs' is set by the workflow"),
    ('[extract-frames]\nno-audio = "yes"\n', 6, "no-audio is a switch"),
    ("bogus = 1\n[subclip]\n", 5, "unknown setting 'bogus'"),
    ('engine = "spark"\n[subclip]\n', 5, "engine = 'spark': use \"local\" or \"ray\""),
    ('ray_address = "10.0.0.1:6379"\n[subclip]\n', 5, 'ray_address is for engine = "ray"'),
]


@pytest.mark.parametrize(("body", "line", "message"), BAD)
def test_invalid_workflow_fails_before_any_stage_runs(
    tmp_path: Path,
    body: str,
    line: int,
    message: str,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
):
    (tmp_path / "videos").mkdir()
    head = 'inputs = ["videos"]\nwork_dir = "work"\n\n# stages\n'
    (tmp_path / "bad.toml").write_text(head + body, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert main(["run", "bad.toml"]) == 2
    err = capsys.readouterr().err
    assert f"bad.toml:{line}: " in err and message in err
    assert not (tmp_path / "work").exists()


def test_engine_goes_to_the_stages_that_take_it(tmp_path: Path, capsys, monkeypatch) -> None:
    """`vpipe run --engine ray` (or engine = "ray" in the file) reaches the media and feature
    stages, with the address; train, which runs on this machine, gets neither."""
    (tmp_path / "wf.toml").write_text(
        'inputs = ["videos"]\nengine = "ray"\nlabels = "l.csv"\n[subclip]\n[extract-frames]\n'
        '[features]\n[train]\n', encoding="utf-8")
    (tmp_path / "videos").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["run", "wf.toml", "--dry-run", "--ray-address", "10.0.0.1:6379"]) == 0
    lines = capsys.readouterr().out.splitlines()
    ray_words = "--engine ray --ray-address 10.0.0.1:6379"
    assert [ray_words in x for x in lines] == [True, True, True, False]
    assert main(["run", "wf.toml", "--dry-run", "--engine", "local"]) == 0
    assert "ray" not in capsys.readouterr().out


def test_not_toml_and_bad_set_are_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture):
    wf = tmp_path / "wf.toml"
    wf.write_text('inputs = "v"\n[subclip\n', encoding="utf-8")
    assert main(["run", str(wf)]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    wf.write_text('inputs = "v"\n[subclip]\n', encoding="utf-8")
    assert main(["run", str(wf), "--set", "subclip.colour=3", "--dry-run"]) == 2
    assert "--set subclip.colour: unknown option 'colour'" in capsys.readouterr().err
    assert main(["run", str(wf), "--set", "features.x=3"]) == 2
    assert "no stage [features]" in capsys.readouterr().err
    # Regression (issue 24, 9): a Latin-1 comment raised UnicodeDecodeError.
    wf.write_bytes('# caf\xe9\ninputs = "v"\n[subclip]\n'.encode("latin-1"))
    assert main(["run", str(wf), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "wf.toml: not UTF-8 text (byte 0xe9 at offset 5, line 1)" in err[0]


# --------------------------------------------------------------------------- running


@pytest.mark.slow
def test_run_reaches_the_end_and_rerun_is_up_to_date(
    project: Path,
    first_run: dict,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
):
    work = project / "work"
    # 4 videos x 2 subclips of 0.8 s = 20 frames, every 5th: frames 0, 5, 10, 15.
    assert len(first_run["clips"]) == 8
    assert all(s == "ok" for s, _, _ in first_run["clips"].values())
    assert {n for n, _ in first_run["frames"].values()} == {4}
    assert {x.shape for x in first_run["features"].values()} == {(4, 512)}
    assert len(first_run["predictions"]) == 8 + 4  # per clip and per source
    # Each stage recorded the equivalent command, as --dry-run prints it.
    info = json.loads((work / "features" / "vpipe.json").read_text())
    assert info["command"][:4] == ["vpipe", "features", "work/extract-frames", "-o"]

    capsys.readouterr()
    assert vpipe_run(project, monkeypatch=monkeypatch) == 0
    err = capsys.readouterr().err
    assert "[2/5] extract-frames: up to date" in err
    assert "[3/5] features: up to date" in err
    assert "[4/5] train: up to date" in err  # its finished run was made by the same command
    assert_same(outputs(work), first_run)


@pytest.mark.slow
def test_dry_run_commands_run_by_hand_give_the_same_outputs(
    project: Path,
    first_run: dict,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
):
    assert vpipe_run(project, "--dry-run", "--work-dir", "by-hand", monkeypatch=monkeypatch) == 0
    commands = capsys.readouterr().out.splitlines()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for cmd in commands:
        words = shlex.split(cmd)
        subprocess.run([VPIPE, *words[1:], "--quiet"], cwd=project, env=env, check=True)
    assert_same(outputs(project / "by-hand"), first_run)


def _children(pid: int) -> list[int]:
    """Pids of the processes ``pid`` started (Linux /proc)."""
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            kids += [int(x) for x in (task / "children").read_text().split()]
    return kids


def _alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped by init counts as ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.slow
@pytest.mark.parametrize("marker", ["subclip/manifest.jsonl", "train/config.json"])
def test_killed_in_a_stage_then_rerun_gives_the_same_outputs(
    project: Path, first_run: dict, marker: str
):
    work = f"killed-{marker.split('/')[0]}"
    cmd = [VPIPE, "run", "tiny.toml", "--work-dir", work, "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=project, env=env)
    target = project / work / marker
    deadline = time.time() + 120
    while not (target.exists() and target.stat().st_size) and time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.005)
    helpers = _children(proc.pid)  # subclip's pool workers (ffmpeg runs under them)
    assert helpers or marker.startswith("train")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (project / work / "train" / "predictions.jsonl").exists()
    # Regression: pool workers outlived a killed run, sleeping forever under init.
    deadline = time.time() + 10
    while any(_alive(p) for p in helpers) and time.time() < deadline:
        time.sleep(0.1)
    assert not [p for p in helpers if _alive(p)]

    rerun = subprocess.run(
        cmd[:-1], cwd=project, env=env, check=True, stderr=subprocess.PIPE, text=True
    )
    if marker.startswith("train"):
        # The earlier stages are done; the same train command continues (or restarts) its run
        # by itself: no --resume, no --overwrite, and the record counts the 3 epochs.
        assert "extract-frames: up to date" in rerun.stderr
        line = next(x for x in rerun.stderr.splitlines() if x.startswith("vpipe run [4/5] train"))
        assert f"-o {work}/train" in line
        assert "--resume" not in line and "--overwrite" not in line
        info = json.loads((project / work / "train" / "vpipe.json").read_text())
        assert info["ended"] is not None and info["stage"] == "train"
        assert info["counts"]["done"] + info["counts"]["already_done"] == 3
    assert not list((project / work).glob(".*.vpipe-run.json"))  # no file beside the stages
    assert_same(outputs(project / work), first_run)


@pytest.mark.slow
def test_a_stage_with_failed_items_lets_the_next_stages_go_on(
    project: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    broken = project / "more"
    broken.mkdir(exist_ok=True)
    synth.make_truncated(project / "videos" / "red.mp4", broken / "cut.mp4", keep=0.3)
    rc = vpipe_run(
        project,
        "--input",
        "videos",
        "--input",
        "more",
        "--work-dir",
        "partial",
        "--until",
        "extract-frames",
        monkeypatch=monkeypatch,
    )
    assert rc == 1
    err = capsys.readouterr().err
    assert "cut.mp4" in err
    assert [x.split()[:2] for x in err.splitlines() if x.startswith("  ")] == [
        ["subclip", "some"],
        ["extract-frames", "ok"],
    ]
    frames = read_manifest(project / "partial" / "extract-frames")
    assert len([r for r in frames.values() if r["status"] == "ok"]) == 8
    assert not (project / "partial" / "features").exists()


@pytest.mark.slow
def test_overwrite_with_changed_options_redoes_the_stages_after_it(
    project: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    args = ("--work-dir", "redo", "--until", "features", "--quiet")
    assert vpipe_run(project, *args, monkeypatch=monkeypatch) == 0
    assert (
        vpipe_run(project, *args, "--set", "extract-frames.every=10", monkeypatch=monkeypatch) == 2
    )  # other options: refused without --overwrite
    assert "use --overwrite" in capsys.readouterr().err
    rc = vpipe_run(
        project,
        "--work-dir",
        "redo",
        "--until",
        "features",
        "--overwrite",
        "--set",
        "extract-frames.every=10",
        monkeypatch=monkeypatch,
    )
    assert rc == 0
    assert "features: removing redo/features" in capsys.readouterr().err
    with open_features(project / "redo" / "features") as store:
        # 20 frames per clip, every 10th: frames 0 and 10, not the 4 frames of before.
        assert len(store) == 8 and {c.image.shape[0] for c in store} == {2}


@pytest.mark.slow
def test_train_is_redone_only_when_its_options_or_its_features_change(
    project: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    def run(*extra: str) -> tuple[int, str, dict]:
        capsys.readouterr()
        rc = vpipe_run(project, "--work-dir", "retrain", *extra, monkeypatch=monkeypatch)
        err = capsys.readouterr().err
        info = json.loads((project / "retrain" / "train" / "vpipe.json").read_text())
        return rc, err, info

    def train_line(err: str) -> str:
        return next(x for x in err.splitlines() if x.startswith("vpipe run [4/5] train"))

    rc, _, first = run("--quiet")
    assert rc == 0 and first["params"]["hidden"] == 16
    # Other train options: train itself refuses them without --overwrite (exit 2).
    rc, err, _ = run("--set", "train.hidden=8")
    assert rc == 2 and "hidden: 16 -> 8" in err and "use --overwrite" in err
    rc, err, info = run("--overwrite", "--set", "train.hidden=8")
    assert rc == 0 and "--overwrite" in train_line(err)
    assert info["params"]["hidden"] == 8
    assert info["counts"] == {"done": 3, "already_done": 0, "skipped": 0, "failed": 0}
    # The same again, --overwrite or not: the finished run is up to date, nothing retrained.
    rc, err, again = run("--overwrite", "--set", "train.hidden=8")
    assert rc == 0 and "[4/5] train: up to date" in err
    assert again["ended"] == info["ended"]
    # An earlier stage redone (other frames, so other features): train starts again.
    rc, err, redone = run(
        "--overwrite", "--set", "train.hidden=8", "--set", "extract-frames.every=10"
    )
    assert rc == 0 and "--overwrite" in train_line(err)
    assert redone["counts"]["done"] == 3 and redone["counts"]["already_done"] == 0
    assert redone["params"]["features_fingerprint"] != info["params"]["features_fingerprint"]


def test_a_deleted_middle_folder_is_remade_without_retraining(
    project: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    # Regression: once extract-frames was remade, every later stage counted as changed, so a
    # finished train run was retrained although the features had nothing new.
    work = project / "remade"
    assert vpipe_run(project, "--work-dir", "remade", "--quiet", monkeypatch=monkeypatch) == 0
    trained = json.loads((work / "train" / "vpipe.json").read_text())
    shutil.rmtree(work / "extract-frames")
    capsys.readouterr()
    assert vpipe_run(project, "--work-dir", "remade", monkeypatch=monkeypatch) == 0
    err = capsys.readouterr().err
    assert "vpipe extract-frames: 8 done, 0 already done" in err
    assert "vpipe features: 0 done, 8 already done" in err
    assert "[4/5] train: up to date" in err
    assert json.loads((work / "train" / "vpipe.json").read_text())["ended"] == trained["ended"]


def test_outputs_deleted_inside_finished_stages_are_made_again(
    project: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    # Regression (issue 11, 3): a finished stage whose files were deleted was "up to date".
    work = project / "damaged"
    assert vpipe_run(project, "--work-dir", "damaged", "--quiet", monkeypatch=monkeypatch) == 0
    before = outputs(work)
    jpeg = work / "extract-frames" / "red_1" / "frames" / "000001.jpg"
    jpeg.unlink()
    (shard,) = (work / "features").glob("shard-*.h5")
    shard.unlink()
    capsys.readouterr()
    assert vpipe_run(project, "--work-dir", "damaged", monkeypatch=monkeypatch) == 0
    err = capsys.readouterr().err
    changed = "damaged/extract-frames/red_1/frames: recorded output changed"
    assert changed in err and "; redoing red_1" in err
    assert "vpipe extract-frames: 1 done, 7 already done" in err
    assert "vpipe features: 8 done, 0 already done" in err  # its only shard was gone
    assert jpeg.is_file() and shard.is_file()
    assert_same(outputs(work), before)


def test_a_bad_option_is_reported_before_missing_inputs(tmp_path: Path, capsys) -> None:
    wf = tmp_path / "bad.toml"
    wf.write_text('name = "bad"\n\n[subclip]\ncuont = 3\n', encoding="utf-8")
    assert main(["run", str(wf)]) == 2
    err = capsys.readouterr().err
    assert f"{wf}:4: unknown option 'cuont' for [subclip]" in err
    wf.write_text('name = "bad"\n\n[subclip]\ncount = 3\n', encoding="utf-8")
    assert main(["run", str(wf)]) == 2
    assert "no inputs" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()


def test_unusable_weights_stop_the_run_at_features(tmp_path: Path, capsys, monkeypatch) -> None:
    """Regression: a weights file that does not fit exited 1 ("some items failed"), so the run
    went on to train on a feature folder that was never made and failed there instead."""
    media = tmp_path / "media"
    (media / "a_0" / "frames").mkdir(parents=True)
    rec = {"id": "a_0", "status": "ok", "source": "a", "n_frames": 0, "timestamps": [],
           "frames_dir": "a_0/frames", "has_audio": False}
    (media / "manifest.jsonl").write_text(json.dumps(rec) + "\n", encoding="utf-8")
    bad = tmp_path / "r34.pth"
    import torch
    import torchvision

    torch.save(torchvision.models.resnet34().state_dict(), bad)
    (tmp_path / "labels.csv").write_text("id,label\na,1\n", encoding="utf-8")
    (tmp_path / "wf.toml").write_text(
        'inputs = ["media"]\nlabels = "labels.csv"\n\n[features]\nimage-model = "resnet18"\n'
        f'image-weights = "{bad.name}"\naudio-model = "none"\n\n[train]\nepochs = 1\n',
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)
    assert main(["run", "wf.toml"]) == 2
    err = capsys.readouterr().err
    assert f"vpipe: error: {bad}: does not fit resnet18 (" in err
    assert "features  stopped" in err and "train     not run" in err
    assert not (tmp_path / "work" / "wf" / "train").exists()
    # Weights merely missing offline exit 1 (the stage's contract), said before any stage
    # runs (the planner looks for them), so nothing is started for want of them.
    shutil.rmtree(tmp_path / "work", ignore_errors=True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    for var in ("https_proxy", "HTTPS_PROXY"):  # any download attempt is refused at once
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    wf = (tmp_path / "wf.toml").read_text(encoding="utf-8")
    (tmp_path / "wf.toml").write_text(wf.replace(bad.name, "imagenet"), encoding="utf-8")
    assert main(["run", "wf.toml"]) == 1
    err = capsys.readouterr().err
    assert "vpipe: error: wf.toml:4: [features] " in err and "weights are not in the cache" in err
    assert "--set features.image-weights=none" in err  # the hint in the workflow's words
    assert not (tmp_path / "work").exists()
    assert main(["run", "wf.toml", "--dry-run"]) == 0  # a dry run looks for no weights


def test_conflicting_options_fail_before_any_stage_runs(tmp_path: Path, capsys,
                                                        monkeypatch) -> None:
    """Regression: offline overrides gave features --audio-weights none with the release PCA,
    which stopped the run only after extract-frames had run (hours on a real corpus)."""
    (tmp_path / "videos").mkdir()
    (tmp_path / "wf.toml").write_text(
        'inputs = ["videos"]\n[extract-frames]\nfps = 1\n\n[features]\n'
        'image-weights = "none"\naudio-weights = "none"\n', encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert main(["run", "wf.toml"]) == 2
    err = capsys.readouterr().err
    assert "wf.toml:5: [features] --audio-weights none with the release PCA" in err
    assert not (tmp_path / "work").exists()
    assert main(["run", "wf.toml", "--set", "features.audio-postprocess=false", "--dry-run"]) == 0


def test_a_set_that_conflicts_with_the_file_fails_the_dry_run(tmp_path: Path, capsys,
                                                              monkeypatch) -> None:
    # Regression (issue 27, 3.3): --dry-run passed fps beside the file's every; the real run
    # cut the subclips first and then stopped at "give --fps or --every, not both".
    (tmp_path / "videos").mkdir()
    (tmp_path / "wf.toml").write_text(
        'inputs = ["videos"]\n[subclip]\n\n[extract-frames]\nevery = 45\n', encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    for extra in (["--dry-run"], []):
        assert main(["run", "wf.toml", "--set", "extract-frames.fps=2", *extra]) == 2
        err = capsys.readouterr().err
        assert "wf.toml:4: [extract-frames] give --fps or --every, not both" in err
        assert not (tmp_path / "work").exists()
    # A key unset by --set STAGE.OPTION= (nothing after =): the other one then holds alone.
    assert main(["run", "wf.toml", "--set", "extract-frames.every=", "--set",
                 "extract-frames.fps=2", "--dry-run"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "extract-frames" in x)
    assert "--fps 2" in line and "--every" not in line
    assert main(["run", "wf.toml", "--set", "extract-frames.fps=", "--dry-run"]) == 2
    assert "[extract-frames] in wf.toml has no fps to unset" in capsys.readouterr().err


def test_a_switch_is_written_with_its_on_name_and_its_off_name_reads_the_same(
        tmp_path: Path, capsys, monkeypatch) -> None:
    (tmp_path / "media").mkdir()
    monkeypatch.chdir(tmp_path)
    lines = []
    for spelled in ("audio-postprocess = false", "no-audio-postprocess = true"):
        (tmp_path / "wf.toml").write_text(f'inputs = ["media"]\n[features]\n{spelled}\n',
                                          encoding="utf-8")
        assert main(["run", "wf.toml", "--dry-run"]) == 0
        lines.append(capsys.readouterr().out.strip().splitlines()[-1])
    assert lines[0] == lines[1] and "--no-audio-postprocess" in lines[0]
    # Both spellings in one table: one line; --set replaces (or unsets) either spelling.
    (tmp_path / "wf.toml").write_text('inputs = ["media"]\n[features]\naudio-postprocess = true\n'
                                      'no-audio-postprocess = true\n', encoding="utf-8")
    assert main(["run", "wf.toml", "--dry-run"]) == 2
    assert "audio-postprocess and no-audio-postprocess set the same option; keep one" in \
        capsys.readouterr().err
    (tmp_path / "wf.toml").write_text('inputs = ["media"]\n[features]\n'
                                      'no-audio-postprocess = true\n', encoding="utf-8")
    assert main(["run", "wf.toml", "--dry-run", "--set", "features.audio-postprocess=true"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "--audio-postprocess" in line and "--no-audio-postprocess" not in line
    assert main(["run", "wf.toml", "--dry-run", "--set", "features.audio-postprocess="]) == 0
    assert "audio-postprocess" not in capsys.readouterr().out.strip().splitlines()[-1]


@pytest.mark.slow
@pytest.mark.parametrize("marker", ["extract-frames/manifest.jsonl", "features/index.jsonl"])
def test_ctrl_c_in_a_stage_is_not_finished_and_the_rerun_completes_it(
    project: Path, first_run: dict, marker: str
):
    """Regression: Ctrl-C stamped the stage as ended, so the rerun called it up to date and
    trained on the clips done before the interrupt. SIGINT goes to the whole process group,
    as a terminal sends it."""
    stage = marker.split("/")[0]
    work = f"ctrl-c-{stage}"
    cmd = [VPIPE, "run", "tiny.toml", "--work-dir", work, "--set", "features.shard-size=1",
           "--set", "features.batch-size=1", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=project, env=env, start_new_session=True,
                            stderr=subprocess.PIPE, text=True)
    target = project / work / marker
    deadline = time.time() + 120
    while not (target.exists() and target.stat().st_size) and time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    said = [x for x in err.splitlines() if x.startswith(f"vpipe {stage}: interrupted after ")]
    assert said and said[0].endswith("; the same command resumes"), err
    info = json.loads((project / work / stage / "vpipe.json").read_text())
    assert info["ended"] is None and info["interrupted"], info
    folder = project / work / stage
    # What survived: the clip folders recorded; for features, the clips of the shards in place
    # (a shard's manifest lines follow its rename, so the interrupt may fall between them).
    done = len(read_index(folder) if stage == "features" else read_manifest(folder))
    assert 0 < done < 8  # the interrupt came mid-stage
    assert not (project / work / "train").exists()

    rerun = subprocess.run(cmd[:-1], cwd=project, env=env, stderr=subprocess.PIPE, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{stage}: up to date" not in rerun.stderr
    info = json.loads((project / work / stage / "vpipe.json").read_text())
    assert info["ended"] and info["interrupted"] is None
    assert info["counts"]["already_done"] == done and info["counts"]["done"] == 8 - done
    assert_same(outputs(project / work), first_run)


def test_a_stage_another_workflow_finished_the_same_way_is_reused(project: Path, tmp_path,
                                                                   monkeypatch, capsys) -> None:
    """Issue 27 (3.9): a second workflow with the same subclip and extract-frames as a first
    one reuses the first one's frames (hard links, said in the log) and makes its own
    features; the folder is then its own: the first one redone or deleted leaves it whole."""
    root = tmp_path / "two"
    root.mkdir()
    (root / "videos").symlink_to(project / "videos")
    shutil.copy(project / "labels.csv", root)
    first = TINY.replace('work_dir = "work"', 'work_dir = "work/a"').replace(
        'name = "tiny"', 'name = "a"')
    second = first.replace('work_dir = "work/a"', 'work_dir = "work/b"').replace(
        'name = "a"', 'name = "b"').replace("batch-size = 8", "batch-size = 8\nshard-size = 2")
    (root / "a.toml").write_text(first, encoding="utf-8")
    (root / "b.toml").write_text(second, encoding="utf-8")
    monkeypatch.chdir(root)
    assert main(["run", "a.toml", "--until", "features", "--quiet"]) == 0
    frames_a = root / "work" / "a" / "extract-frames"
    before = (frames_a / "vpipe.json").read_text()
    capsys.readouterr()
    assert main(["run", "b.toml", "--until", "features"]) == 0
    err = capsys.readouterr().err
    frames_b = root / "work" / "b" / "extract-frames"
    assert f"extract-frames: reused {frames_a}" in err
    assert not frames_b.is_symlink() and (frames_a / "vpipe.json").read_text() == before
    info = json.loads((frames_b / "vpipe.json").read_text())
    assert info["reused_from"] == str(frames_a.resolve()) and info["workflow"] == "b"
    assert json.loads(before)["workflow"] == "a"  # each stage records the workflow that ran it
    jpgs = sorted(p.relative_to(frames_a) for p in frames_a.rglob("*.jpg"))
    assert jpgs and jpgs == sorted(p.relative_to(frames_b) for p in frames_b.rglob("*.jpg"))
    assert all((frames_a / j).stat().st_ino == (frames_b / j).stat().st_ino for j in jpgs)
    # The subclip step ran (the first step always does); the features are b's own.
    with open_features(root / "work" / "b" / "features") as b, \
            open_features(root / "work" / "a" / "features") as a:
        assert {c.clip_id: c.image.tolist() for c in a} == {c.clip_id: c.image.tolist() for c in b}
    assert main(["run", "b.toml", "--until", "features"]) == 0  # again: its own, up to date
    err = capsys.readouterr().err
    assert "extract-frames: up to date" in err and "features: up to date" in err
    # a redone with other frames, then deleted: b's frames are as they were, still up to date.
    frames = {j: (frames_b / j).read_bytes() for j in jpgs}
    assert main(["run", "a.toml", "--until", "extract-frames", "--set", "extract-frames.size=48",
                 "--overwrite", "--quiet"]) == 0
    shutil.rmtree(root / "work" / "a")
    assert {j: (frames_b / j).read_bytes() for j in jpgs} == frames
    assert main(["run", "b.toml", "--until", "features"]) == 0
    assert "features: up to date" in capsys.readouterr().err
    # The same workflow in another work folder is a fresh run, not a reuse.
    assert main(["run", "b.toml", "--until", "extract-frames", "--work-dir", "work/b2"]) == 0
    assert "reused" not in capsys.readouterr().err
