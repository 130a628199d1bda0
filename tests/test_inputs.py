"""Odd inputs: symlinked files, link loops, file names that are not UTF-8 (issue 11, 5 and 7),
FIFOs and devices (issue 24, 10)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.errors import MediaError
from pipeline.media import find_videos, probe, scan_sources
from pipeline.records import read_manifest

CUT = ["--count", "1", "--duration", "2", "--start", "0", "--quiet"]


def test_each_symlink_name_is_its_own_source_and_one_path_twice_is_one(numbered_video, tmp_path):
    # Regression: 9 links to 3 files were deduplicated by their target into 3 sources.
    files = tmp_path / "files"
    files.mkdir()
    for k in range(3):
        shutil.copy(numbered_video, files / f"f{k}.mp4")
    links = tmp_path / "links"
    links.mkdir()
    for k in range(9):
        os.symlink(files / f"f{k % 3}.mp4", links / f"l{k}.mp4")
    ids = sorted(s.source_id for s in scan_sources([links]))
    assert ids == [f"l{k}" for k in range(9)]
    one = links / "l0.mp4"
    assert find_videos([one, str(one), links / "." / "l0.mp4"]) == [one]


def test_a_link_loop_in_a_folder_is_one_line_and_the_good_file_is_cut(
    numbered_video, tmp_path, capsys
):
    # Regression: a looping link raised RuntimeError and stopped every stage.
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(numbered_video, src / "good.mp4")
    os.symlink("loop.mp4", src / "loop.mp4")
    os.symlink(src, src / "back")  # a folder link to its own parent
    out = tmp_path / "out"
    assert main(["subclip", str(src), "-o", str(out), *CUT]) == 1
    recs = read_manifest(out)
    assert recs["good_0"]["status"] == "ok" and (out / "good" / "good_0.mp4").is_file()
    assert recs["loop"]["status"] == "failed" and "symbolic link loop" in recs["loop"]["error"]
    assert recs["back"]["status"] == "failed"
    err = capsys.readouterr().err.splitlines()
    assert len([e for e in err if "loop" in e]) == 2


def test_a_file_name_that_is_not_utf8_is_recorded_and_read_back(numbered_video, tmp_path):
    # Regression: UnicodeEncodeError in the manifest append; every re-run crashed again.
    src = tmp_path / "in"
    src.mkdir()
    name = os.fsdecode(b"caf\xe9.mp4")  # Latin-1 bytes: a lone surrogate in Python
    shutil.copy(numbered_video, src / name)
    out = tmp_path / "out"
    assert main(["subclip", str(src), "-o", str(out), *CUT]) == 0
    text = (out / "manifest.jsonl").read_bytes().decode("utf-8")  # still valid UTF-8
    assert "\\udce9" in text
    (rec,) = read_manifest(out).values()
    assert rec["status"] == "ok" and rec["id"] == "caf_0"
    assert Path(rec["source_path"]).name == name and Path(rec["source_path"]).exists()
    assert main(["subclip", str(src), "-o", str(out), *CUT]) == 0  # resumes, no crash
    assert main(["extract-frames", str(out), "-o", str(tmp_path / "media"), "--quiet"]) == 0


def vpipe(*args: str) -> subprocess.CompletedProcess:
    """The CLI in a fresh process, with a timeout: a FIFO read by mistake would wait forever."""
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True,
                          text=True, timeout=120)


def test_a_fifo_or_a_device_is_one_failed_line_and_never_read(numbered_video, tmp_path):
    # Regression (issue 24, 10): a FIFO and a link to /dev/zero were "empty file (0 bytes)" in
    # a folder and "no such file or folder" (exit 2, nothing cut) given by name.
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(numbered_video, src / "good.mp4")
    os.mkfifo(src / "pipe.mp4")
    os.symlink("/dev/zero", src / "zero.mp4")
    given = tmp_path / "given.mp4"
    os.mkfifo(given)
    out = tmp_path / "out"
    r = vpipe("subclip", str(src), str(given), "-o", str(out), *CUT)
    assert r.returncode == 1, r.stderr
    recs = read_manifest(out)
    assert recs["good_0"]["status"] == "ok"
    fifo = "not a regular file: a FIFO (named pipe)"
    device = "not a regular file: a character device"
    assert {k: (r["status"], r["error"]) for k, r in recs.items() if k != "good_0"} == {
        "pipe": ("failed", f"{src / 'pipe.mp4'}: {fifo}"),
        "zero": ("failed", f"{src / 'zero.mp4'}: {device}"),
        "given": ("failed", f"{given}: {fifo}"),
    }
    assert len([x for x in r.stderr.splitlines() if "not a regular file" in x]) == 3
    # extract-frames and the probe of any other stage say the same, without opening it.
    frames = tmp_path / "frames"
    r = vpipe("extract-frames", str(given), str(src / "good.mp4"), "-o", str(frames), "-q")
    assert r.returncode == 1 and f"{given}: {fifo}" in r.stderr, r.stderr
    assert read_manifest(frames)["good"]["status"] == "ok"
    with pytest.raises(MediaError, match="not a regular file: a character device"):
        probe(src / "zero.mp4")
