"""One stage at a time in one output folder (issue 11, 11): real processes, a real kill -9."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.lock import LOCK, FolderInUse
from pipeline.media.ffmpeg import ffmpeg_exe
from pipeline.records import Run, read_manifest

CUT = ["--count", "2", "--duration", "2", "--start", "0", "--quiet"]


def vpipe(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args], env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kw,
    )


def slow_ffmpeg(tmp_path: Path) -> str:
    """An ffmpeg that waits a minute before cutting (answering -version at once), so the
    first copy is surely inside its run when the second starts."""
    script = tmp_path / "slow-ffmpeg"
    script.write_text(
        f'#!/bin/sh\ncase "$*" in *-version*) exec "{ffmpeg_exe()}" "$@";; esac\n'
        f'sleep 60\nexec "{ffmpeg_exe()}" "$@"\n'
    )
    script.chmod(0o755)
    return str(script)


def wait_for_lock(out: Path, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    end = time.time() + timeout_s
    while time.time() < end:
        lock = out / LOCK
        if lock.exists() and lock.read_text().strip() == str(proc.pid):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    pytest.fail("the first copy never took the lock")


@pytest.mark.slow
def test_a_second_copy_is_refused_naming_the_holder_and_a_killed_holder_blocks_nothing(
    numbered_video, tmp_path
):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(numbered_video, src / "a.mp4")
    out = tmp_path / "out"
    first = vpipe("subclip", str(src), "-o", str(out), *CUT,
                  env={"VPIPE_FFMPEG": slow_ffmpeg(tmp_path)})
    try:
        wait_for_lock(out, first)
        second = vpipe("subclip", str(src), "-o", str(out), *CUT)
        _, err = second.communicate(timeout=60)
        assert second.returncode == 2
        assert err.strip().splitlines() == [
            f"vpipe: error: {out}: another vpipe (pid {first.pid}) is writing into this "
            "folder; wait for it to end, or choose another --out"
        ]
        assert first.poll() is None  # the first copy's work was not disturbed
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # kill -9, its ffmpeg with it
        first.communicate()
    # The dead holder's lock (the file is still there, with its pid) blocks nothing.
    assert (out / LOCK).read_text().strip() == str(first.pid)
    again = vpipe("subclip", str(src), "-o", str(out), *CUT)
    _, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    ref = tmp_path / "ref"
    alone = vpipe("subclip", str(src), "-o", str(ref), *CUT)
    alone.communicate(timeout=120)
    recs, ref_recs = read_manifest(out), read_manifest(ref)
    assert sorted(recs) == sorted(ref_recs) == ["a_0", "a_1"]
    for rec in recs.values():
        assert rec["status"] == "ok"
        assert (out / rec["path"]).read_bytes() == (ref / rec["path"]).read_bytes()
    assert not (out / LOCK).exists()  # released, and removed, when the run ended


def test_a_lock_is_released_when_a_run_is_refused_or_closed(tmp_path):
    run = Run(tmp_path, "subclip", {"a": 1}).open()
    with pytest.raises(FolderInUse, match=f"pid {os.getpid()}"):
        Run(tmp_path, "subclip", {"a": 1}).open()
    run.close()
    Run(tmp_path, "subclip", {"a": 1}).open().close()
    # Refused for other parameters: the lock goes with the refusal.
    with pytest.raises(Exception, match="other parameters"):
        Run(tmp_path, "subclip", {"a": 2}).open()
    Run(tmp_path, "subclip", {"a": 1}).open().close()


# --------------------------------------------------------------------------- vpipe train

LONG = ["--epochs", "100000", "--patience", "100000", "--hidden", "8", "--device", "cpu", "-q"]


@pytest.fixture(scope="module")
def feature_set(tmp_path_factory) -> tuple[Path, Path]:
    from pipeline.train.synthetic import make_feature_set

    folder = tmp_path_factory.mktemp("lock-train") / "features"
    csv, _ = make_feature_set(folder, "classification", n_sources=8, seed=1)
    return folder, csv


def train_args(feature_set: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    folder, csv = feature_set
    return ["train", str(folder), "--labels", str(csv), "-o", str(out), *LONG, *extra]


def refused(out: Path, holder: subprocess.Popen, args: list[str]) -> None:
    """A second ``vpipe`` into ``out`` exits 2 at once, naming the holder's pid."""
    second = vpipe(*args)
    _, err = second.communicate(timeout=120)
    assert second.returncode == 2, err
    assert err.strip().splitlines() == [
        f"vpipe: error: {out}: another vpipe (pid {holder.pid}) is writing into this "
        "folder; wait for it to end, or choose another --out"
    ]
    assert holder.poll() is None  # the first copy's work was not disturbed


@pytest.mark.slow
def test_a_second_train_into_one_run_folder_is_refused_and_a_killed_holder_blocks_nothing(
    feature_set, tmp_path
):
    out = tmp_path / "run"
    first = vpipe(*train_args(feature_set, out))  # trains until killed
    try:
        wait_for_lock(out, first)
        refused(out, first, train_args(feature_set, out))
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate()
    assert (out / LOCK).read_text().strip() == str(first.pid)  # left by the killed holder
    again = vpipe(*train_args(feature_set, out, "--epochs", "2", "--overwrite"))
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert not (out / LOCK).exists()  # released, and removed, when the run ended


@pytest.mark.slow
def test_train_overwrite_clears_the_run_but_keeps_its_lock(feature_set, tmp_path):
    """--overwrite empties the folder of the earlier run, all but the lock it holds there: a
    lock file deleted under its holder would let a second copy in."""
    out = tmp_path / "run"
    assert main(train_args(feature_set, out, "--epochs", "1")) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    first = vpipe(*train_args(feature_set, out, "--overwrite"))
    try:
        end = time.time() + 120
        while time.time() < end:  # two epochs of the new run: the old one is gone
            m = out / "metrics.jsonl"
            if m.exists() and len(m.read_text().splitlines()) >= 2:
                break
            assert first.poll() is None, first.communicate()
            time.sleep(0.05)
        assert (out / LOCK).read_text().strip() == str(first.pid)
        refused(out, first, train_args(feature_set, out, "--overwrite"))
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate()


def test_train_is_refused_in_a_locked_folder_and_refused_input_leaves_no_folder(
    feature_set, tmp_path
):
    from pipeline.errors import UsageError
    from pipeline.lock import FolderLock
    from pipeline.train import TrainConfig, train

    folder, csv = feature_set
    out = tmp_path / "run"
    out.mkdir()
    lock = FolderLock(out)  # another run's lock: a second open file, refused as a process is
    with pytest.raises(FolderInUse, match=f"pid {os.getpid()}"):
        train(folder, csv, out, TrainConfig(epochs=1, device="cpu"), quiet=True)
    assert sorted(p.name for p in out.iterdir()) == [LOCK]  # nothing read or written there
    lock.release()
    with pytest.raises(UsageError, match="no such labels file"):
        train(folder, tmp_path / "missing.csv", tmp_path / "new", TrainConfig(), quiet=True)
    assert not (tmp_path / "new").exists()  # made for its lock, removed with it
