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

from pipeline.media.ffmpeg import ffmpeg_exe
from pipeline.records import LOCK, FolderInUse, Run, read_manifest

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
