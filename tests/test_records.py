"""Run records through the media stages: resume, refusal on changed parameters, --overwrite,
atomic outputs, and a run killed part-way that a second run completes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import synth

from pipeline.cli import main
from pipeline.files import atomic_path
from pipeline.records import Run, ok_records, read_manifest, read_run_info
from pipeline.runner import Item, run_items

SUBCLIP = ["--count", "2", "--duration", "2", "--start", "0.5", "--workers", "1", "-q"]
VPIPE = [sys.executable, "-c", "import sys; from pipeline.cli import main; sys.exit(main())"]


@pytest.fixture(scope="module")
def trailers(media_dir: Path) -> Path:
    """Four small sources: enough items for a run to be caught half-way."""
    d = media_dir / "trailers"
    for i in range(4):
        synth.make_video(d / f"t{i}.mp4", duration_s=5.0, color=(60 * i, 100, 150))
    return d


def lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]


def fingerprint(out: Path) -> dict[str, tuple]:
    """What must be equal between an interrupted+resumed run and an uninterrupted one."""
    return {
        r["id"]: (r["status"], r["start"], r["end"], r["n_frames"], (out / r["path"]).is_file())
        for r in read_manifest(out).values()
    }


def test_second_run_resumes_and_does_nothing(trailers: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "clips"
    assert main(["subclip", str(trailers), "-o", str(out), *SUBCLIP]) == 0
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.mp4")}
    assert main(["subclip", str(trailers), "-o", str(out), "--count", "2", "--duration", "2",
                 "--start", "0.5", "--workers", "2"]) == 0
    assert "0 videos done (0 clips), 4 already done, 0 skipped, 0 failed" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.mp4")} == mtimes
    assert len(lines(out)) == 8  # compacted: one line per clip
    info = read_run_info(out)
    assert info["stage"] == "subclip" and info["params"]["count"] == 2
    assert info["versions"]["ffmpeg"] and info["ended"] and info["counts"]["already_done"] == 4


def test_changed_parameters_are_refused_unless_overwrite(trailers: Path, tmp_path: Path,
                                                         capsys) -> None:
    out = tmp_path / "clips"
    assert main(["subclip", str(trailers), "-o", str(out), *SUBCLIP]) == 0
    before = fingerprint(out)
    capsys.readouterr()
    changed = ["--count", "1", "--duration", "2", "--start", "0.5", "-q"]
    assert main(["subclip", str(trailers), "-o", str(out), *changed]) == 2
    err = capsys.readouterr().err
    assert "other parameters (count: 2 -> 1)" in err and "--overwrite" in err
    assert fingerprint(out) == before  # nothing touched
    assert main(["subclip", str(trailers), "-o", str(out), *changed, "--overwrite"]) == 0
    assert sorted(fingerprint(out)) == ["t0_0", "t1_0", "t2_0", "t3_0"]
    assert read_run_info(out)["params"]["count"] == 1
    # A folder made by another stage is refused too.
    assert main(["extract-frames", str(trailers), "-o", str(out), "-q"]) == 2


def test_a_lost_item_is_redone_and_only_that_one(trailers: Path, tmp_path: Path) -> None:
    out = tmp_path / "clips"
    assert main(["subclip", str(trailers), "-o", str(out), *SUBCLIP]) == 0
    expected = fingerprint(out)
    # Simulate a crash while t2 was being written: its records are missing, a temp folder
    # and a torn manifest line are left behind.
    kept = [r for r in lines(out) if r["item"] != "t2"]
    text = "".join(json.dumps(r) + "\n" for r in kept) + '{"id": "t2_0", "sta'
    (out / "manifest.jsonl").write_text(text)
    shutil.rmtree(out / "t2")
    (out / ".t2.tmp-999").mkdir()
    (out / ".t2.tmp-999" / "t2_0.mp4").write_bytes(b"half")
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.rglob("*.mp4")}
    assert main(["subclip", str(trailers), "-o", str(out), *SUBCLIP]) == 0
    assert fingerprint(out) == expected
    assert not (out / ".t2.tmp-999").exists()
    redone = {p.name for p in out.rglob("*.mp4") if p.stat().st_mtime_ns != mtimes.get(p.name)}
    assert redone == {"t2_0.mp4", "t2_1.mp4"}


def test_a_killed_run_resumed_equals_an_uninterrupted_run(trailers: Path, tmp_path: Path):
    fresh, killed = tmp_path / "fresh", tmp_path / "killed"
    assert main(["subclip", str(trailers), "-o", str(fresh), *SUBCLIP]) == 0
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen([*VPIPE, "subclip", str(trailers), "-o", str(killed), *SUBCLIP],
                            env=env, start_new_session=True)
    deadline = time.time() + 60
    manifest = killed / "manifest.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if manifest.exists() and manifest.read_text().count("\n") >= 2:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: ffmpeg children too
    proc.wait()
    assert main(["subclip", str(trailers), "-o", str(killed), *SUBCLIP]) == 0
    assert fingerprint(killed) == fingerprint(fresh)
    assert not [p for p in killed.rglob(".*") if ".tmp-" in p.name]


def test_extract_frames_resumes_per_clip(trailers: Path, tmp_path: Path) -> None:
    out = tmp_path / "media"
    args = ["extract-frames", str(trailers), "-o", str(out), "--fps", "2", "--size", "32", "-q"]
    assert main(args) == 0
    first = read_manifest(out)
    shutil.rmtree(out / "t1")
    recs = [r for r in lines(out) if r["id"] != "t1"]
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert main(args) == 0
    again = read_manifest(out)
    assert again == first and len(list((out / "t1" / "frames").iterdir())) == 10


def test_a_failed_source_fixed_later_leaves_no_stale_record(tmp_path: Path) -> None:
    d = tmp_path / "in"
    d.mkdir()
    (d / "late.mp4").write_bytes(b"")  # still downloading: empty
    out = tmp_path / "clips"
    assert main(["subclip", str(d), "-o", str(out), *SUBCLIP]) == 1
    assert read_manifest(out)["late"]["status"] == "failed"
    synth.make_video(d / "late.mp4", duration_s=5.0)
    assert main(["subclip", str(d), "-o", str(out), *SUBCLIP]) == 0
    assert sorted(read_manifest(out)) == ["late_0", "late_1"]
    assert [r["id"] for r in lines(out)] == ["late_0", "late_1"]


def test_superseded_records_are_dropped_even_without_close(tmp_path: Path) -> None:
    run = Run(tmp_path, "demo", {"a": 1}).open()
    run.record_item("src", [{"id": "src", "item": "src", "status": "failed", "error": "x"}])
    run.record_item("src", [{"id": "src_0", "item": "src"}, {"id": "src_1", "item": "src"}])
    del run  # no close(): as after a crash, which takes the process and its folder lock
    assert sorted(read_manifest(tmp_path)) == ["src_0", "src_1"]
    reopened = Run(tmp_path, "demo", {"a": 1}).open()
    assert reopened.finished("src")


def test_run_items_records_errors_and_exit_code(tmp_path: Path) -> None:
    from pipeline.errors import MediaError, Skip

    def work(item: Item) -> dict:
        if item.id == "bad":
            raise MediaError("bad.mp4: truncated")
        if item.id == "odd":
            raise Skip("odd.txt: not a video")
        return {"value": 1}

    run = Run(tmp_path, "demo", {}).open()
    items = [Item(i, f"{i}.mp4") for i in ("a", "bad", "odd")]
    summary = run_items(run, items, work, quiet=True)
    assert (summary.done, summary.failed, summary.skipped, summary.exit_code) == (1, 1, 1, 1)
    assert [r["id"] for r in ok_records(tmp_path)] == ["a"]


def test_atomic_path_leaves_nothing_when_the_block_fails(tmp_path: Path) -> None:
    target = tmp_path / "clip"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "000000.jpg").write_bytes(b"x")
        raise RuntimeError("killed half-way")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "000000.jpg").write_bytes(b"x")
    assert [p.name for p in target.iterdir()] == ["000000.jpg"]


def test_frames_of_clips_cut_again_are_redone(trailers: Path, tmp_path: Path) -> None:
    clips, out = tmp_path / "clips", tmp_path / "media"
    one = trailers / "t0.mp4"
    assert main(["subclip", str(one), "-o", str(clips), *SUBCLIP]) == 0
    assert main(["extract-frames", str(clips), "-o", str(out), "--fps", "1", "-q"]) == 0
    assert read_manifest(out)["t0_1"]["start"] == 2.52
    later = ["--count", "2", "--duration", "2", "--start", "1", "-q", "--overwrite"]
    assert main(["subclip", str(one), "-o", str(clips), *later]) == 0
    assert main(["extract-frames", str(clips), "-o", str(out), "--fps", "1", "-q"]) == 0
    assert [(r["start"], r["end"]) for r in read_manifest(out).values()] == [(1, 3), (3, 5)]


def test_an_item_whose_last_record_was_torn_is_not_finished(tmp_path: Path) -> None:
    # Regression (issue 11, 3): a torn last line lost clip src_2 for good; the re-run said done.
    run = Run(tmp_path, "demo", {"a": 1}).open()
    run.record_item("src", [{"id": f"src_{k}", "item": "src"} for k in range(3)])
    run.record_item("one", [{"id": "one_0", "item": "one"}])
    run.close()
    manifest = tmp_path / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    assert [json.loads(x).get("item_records") for x in lines] == [3, 3, 3, None]
    # The last line of src's group cut in half by a crash (one's line after it).
    manifest.write_text("\n".join([*lines[:2], lines[2][:20], lines[3]]) + "\n")
    reopened = Run(tmp_path, "demo", {"a": 1}).open()
    assert not reopened.finished("src") and reopened.finished("one")
    reopened.close()


def test_subclip_redoes_a_source_whose_last_clip_record_was_torn(numbered_video, tmp_path):
    out = tmp_path / "out"
    cut = ["--count", "3", "--duration", "2", "--start", "0", "--quiet"]
    assert main(["subclip", str(numbered_video), "-o", str(out), *cut]) == 0
    manifest = out / "manifest.jsonl"
    whole = manifest.read_bytes()
    manifest.write_bytes(whole[: whole.rindex(b"\n", 0, len(whole) - 1) + 30])
    assert main(["subclip", str(numbered_video), "-o", str(out), *cut]) == 0
    assert sorted(read_manifest(out)) == ["numbered_0", "numbered_1", "numbered_2"]
    assert manifest.read_bytes() == whole


def test_outputs_are_recorded_with_their_sizes_and_checked_on_resume(tmp_path: Path) -> None:
    out = tmp_path / "out"

    def files(rec: dict) -> list[str]:
        return [rec["file"], rec["folder"]]

    run = Run(out, "demo", {}, outputs=files).open()
    (out / "a.bin").write_bytes(b"x" * 10)
    (out / "a").mkdir()
    (out / "a" / "1").write_bytes(b"y" * 3)
    (out / "a" / "2").write_bytes(b"z" * 4)
    (written,) = run.record_item("a", [{"id": "a", "file": "a.bin", "folder": "a"}])
    run.record_item("b", [{"id": "b", "status": "failed", "error": "bad", "file": "b.bin"}])
    run.close()
    assert written["output_bytes"] == {"a.bin": 10, "a": 7}
    assert "output_bytes" not in read_manifest(out)["b"]  # a failure wrote nothing to check

    def reopened() -> Run:
        r = Run(out, "demo", {}, outputs=files).open()
        r.close()
        return r

    assert reopened().finished("a")
    (out / "a" / "2").unlink()
    assert not reopened().finished("a")
    assert reopened().changed_outputs("a") == (
        f"{out / 'a'}: recorded output changed (7 bytes written, 3 now)"
    )
    (out / "a" / "2").write_bytes(b"z" * 4)
    (out / "a.bin").unlink()
    assert reopened().changed_outputs("a") == f"{out / 'a.bin'}: recorded output is missing"


def test_deleted_clip_frames_and_wav_are_redone_on_resume(trailers: Path, tmp_path: Path,
                                                         capsys) -> None:
    # Regression (issue 11, 3): a removed clip, JPEG or wav was "already done", files missing.
    clips, media = tmp_path / "clips", tmp_path / "media"
    subclip = ["subclip", str(trailers), "-o", str(clips), *SUBCLIP]
    frames = ["extract-frames", str(clips), "-o", str(media), "--fps", "2", "-q"]
    assert main(subclip) == 0 and main(frames) == 0
    cut, extracted = fingerprint(clips), read_manifest(media)
    made = [*clips.rglob("*.mp4"), *media.glob("*/*/*"), *media.glob("*/*.wav")]
    mtimes = {p: p.stat().st_mtime_ns for p in made}
    (clips / "t1" / "t1_0.mp4").unlink()
    (media / "t2_1" / "frames" / "000002.jpg").unlink()
    (media / "t3_0" / "audio.wav").unlink()
    capsys.readouterr()
    assert main(subclip) == 0
    err = capsys.readouterr().err
    gone = clips / "t1" / "t1_0.mp4"
    assert f"vpipe subclip: {gone}: recorded output is missing; redoing t1" in err
    assert read_run_info(clips)["counts"]["already_done"] == 3
    assert fingerprint(clips) == cut
    assert main(frames) == 0
    err = capsys.readouterr().err
    assert f"{media / 't2_1' / 'frames'}: recorded output changed" in err
    assert f"{media / 't3_0' / 'audio.wav'}: recorded output is missing; redoing t3_0" in err
    assert read_manifest(media) == extracted  # the same records, sizes included
    changed = {p.relative_to(tmp_path).as_posix() for p, t in mtimes.items()
               if not p.exists() or p.stat().st_mtime_ns != t}
    # Only the damaged items were made again (a re-cut clip of the same bounds: same frames).
    assert {c.split("/")[1] for c in changed} == {"t1", "t2_1", "t3_0"}
    assert main(frames) == 0
    assert read_run_info(media)["counts"] == {**read_run_info(media)["counts"], "done": 0}


# --------------------------------------------------------------------------- damaged or lost state


def test_a_deleted_run_info_resumes_the_same_parameters_and_refuses_others(
    trailers: Path, tmp_path: Path, capsys
) -> None:
    # Regression (issue 24, 2): without vpipe.json other parameters were let through, "8 already
    # done", and the folder kept 2 s clips under a record of 1 s ones.
    out = tmp_path / "clips"
    assert main(["subclip", str(trailers), "-o", str(out), *SUBCLIP]) == 0
    digests = {r["params_digest"] for r in lines(out)}
    assert len(digests) == 1 and len(digests.pop()) == 16
    (out / "vpipe.json").unlink()
    assert main(["subclip", str(trailers), "-o", str(out), *SUBCLIP[:-1]]) == 0
    assert "0 videos done (0 clips), 4 already done" in capsys.readouterr().err
    (out / "vpipe.json").unlink()
    other = ["--count", "3", "--duration", "1", "--start", "0.5", "-q"]
    assert main(["subclip", str(trailers), "-o", str(out), *other]) == 2
    err = capsys.readouterr().err
    assert err == (f"vpipe: error: {out}: vpipe.json is missing, and 8 record(s) of "
                   "manifest.jsonl were made with other parameters; use --overwrite to redo "
                   "it, or choose another --out\n")
    assert not (out / "vpipe.json").exists()
    assert main(["subclip", str(trailers), "-o", str(out), *other, "--overwrite"]) == 0
    assert {r["duration"] for r in read_manifest(out).values()} == {1.0}
    assert read_run_info(out)["params"]["duration_s"] == 1.0


def test_records_without_a_digest_and_without_run_info_are_refused(tmp_path: Path) -> None:
    from pipeline.errors import ParamsChanged

    (tmp_path / "manifest.jsonl").write_text('{"id": "a", "status": "ok"}\n')
    with pytest.raises(ParamsChanged, match=r"1 record\(s\) of manifest.jsonl were made with "
                                            "unrecorded parameters"):
        Run(tmp_path, "demo", {"a": 1}).open()


@pytest.mark.parametrize("damage", [b'{"stage": "subclip", "params": ', b"\xff\xfe{", b"[1, 2]",
                                    b"null", b'{"stage": "subclip", "params": "zz"}'])
def test_a_damaged_run_info_is_one_line_and_overwrite_redoes_the_folder(
    trailers: Path, tmp_path: Path, capsys, damage: bytes
) -> None:
    # Regression (issue 24, 9): a cut-off vpipe.json was a JSONDecodeError traceback in
    # subclip, extract-frames, features and train.
    one = trailers / "t0.mp4"
    clips, frames = tmp_path / "clips", tmp_path / "frames"
    assert main(["subclip", str(one), "-o", str(clips), *SUBCLIP]) == 0
    assert main(["extract-frames", str(clips), "-o", str(frames), "--fps", "1", "-q"]) == 0
    (clips / "vpipe.json").write_bytes(damage)
    capsys.readouterr()
    for cmd in (["subclip", str(one), "-o", str(clips), *SUBCLIP],
                ["extract-frames", str(clips), "-o", str(tmp_path / "f2"), "--fps", "1", "-q"]):
        assert main(cmd) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"vpipe: error: {clips / 'vpipe.json'}: damaged (")
        assert err.count("\n") == 1 and "use --overwrite to redo the folder" in err
        assert not (tmp_path / "f2").exists()
    if damage.endswith(b": "):
        assert "the end of the file: cut off" in err
    assert main(["subclip", str(one), "-o", str(clips), *SUBCLIP, "--overwrite"]) == 0
    assert read_run_info(clips)["params"]["count"] == 2 and len(read_manifest(clips)) == 2


def test_a_garbled_middle_line_is_said_and_its_item_redone(tmp_path: Path, capsys) -> None:
    run = Run(tmp_path, "demo", {"a": 1}).open()
    for i in ("a", "b", "c"):
        run.record_item(i, [{"id": i}])
    run.close()
    manifest = tmp_path / "manifest.jsonl"
    first, second, third = manifest.read_text().splitlines()
    manifest.write_text("\n".join([first, second.replace('"b"', '"b', 1), third]) + "\n")
    capsys.readouterr()
    reopened = Run(tmp_path, "demo", {"a": 1}).open()
    err = capsys.readouterr().err
    assert err.startswith(f"vpipe: {manifest} line 2: damaged record (")
    assert err.endswith("; ignored (its item is redone, or missing from the next stage)\n")
    assert reopened.finished("a") and not reopened.finished("b") and reopened.finished("c")
    reopened.close()
    assert sorted(read_manifest(tmp_path)) == ["a", "c"]  # compacted: the damage is gone
    assert capsys.readouterr().err == ""


def test_a_torn_last_line_is_cut_off_silently(tmp_path: Path, capsys) -> None:
    run = Run(tmp_path, "demo", {"a": 1}).open()
    run.record_item("a", [{"id": "a"}])
    del run  # killed: no close
    manifest = tmp_path / "manifest.jsonl"
    whole = manifest.read_bytes()
    manifest.write_bytes(whole + b'{"id": "b", "sta')
    reopened = Run(tmp_path, "demo", {"a": 1}).open()
    assert manifest.read_bytes() == whole and not reopened.finished("b")
    reopened.record_item("b", [{"id": "b"}])
    reopened.close()
    assert sorted(read_manifest(tmp_path)) == ["a", "b"]
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- output folders


def test_an_output_folder_that_is_holds_or_sits_in_an_input_is_refused(
    trailers: Path, tmp_path: Path, capsys
) -> None:
    # Regression (issue 24, 4): `subclip IN -o IN` cut clips into IN, and again took them for
    # sources (clips of clips); `-o /` wrote a manifest and folders into /.
    videos = tmp_path / "videos"
    shutil.copytree(trailers, videos)
    before = sorted(p.relative_to(videos) for p in videos.rglob("*"))
    blank = tmp_path / "a-file"
    blank.write_text("x")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    cases = {
        str(videos): "that is an input",
        str(videos / "clips"): f"inside the input folder {videos}: the same command again "
                               "would read its outputs as inputs",
        str(tmp_path): f"holds the input {videos}",
        "/": "the root of a file system",
        str(blank): "an existing file, not a folder",
        # a file where the folder's parent would be: one line, not a NotADirectoryError
        str(blank / "clips"): f"{blank} is a file, not a folder",
        str(dangling): f"a link to {tmp_path / 'nowhere'}, which does not exist",
    }
    for out, why in cases.items():
        assert main(["subclip", str(videos), "-o", out, *SUBCLIP]) == 2, out
        assert capsys.readouterr().err == f"vpipe: error: -o {out}: {why}; choose " + (
            "a folder of its own\n" if out == "/" else "another --out\n")
    assert sorted(p.relative_to(videos) for p in videos.rglob("*")) == before
    assert not Path("/manifest.jsonl").exists() and blank.read_text() == "x"
    # A file among the inputs: its own folder holds it.
    assert main(["subclip", str(videos / "t0.mp4"), "-o", str(videos), *SUBCLIP]) == 2
    assert f"holds the input {videos / 't0.mp4'}" in capsys.readouterr().err


def test_a_file_name_with_a_newline_is_quoted_on_its_one_line(tmp_path: Path, capsys) -> None:
    videos = tmp_path / "in"
    videos.mkdir()
    bad = videos / "bad\nname\r.mp4"
    bad.write_bytes(b"not a video at all")
    assert main(["subclip", str(videos), "-o", str(tmp_path / "out"), *SUBCLIP]) == 0  # skipped
    err = capsys.readouterr().err
    failed = [x for x in err.splitlines() if "bad" in x]
    assert len(failed) == 1 and repr(str(bad)) in failed[0], err
    assert "\r" not in err


def test_ctrl_c_while_the_command_starts_is_one_line_and_exit_130(
    trailers: Path, tmp_path: Path
) -> None:
    # Regression (issue 24, 9): Ctrl-C in the first half second was a traceback from imports.
    # A SIGINT that comes before the interpreter has started is CPython's own affair (it has
    # no handler yet): such a try is repeated later; every one that reaches vpipe must hold.
    reached = 0
    for delay_s in (0.05, 0.1, 0.15, 0.2, 0.3, 0.45, 0.6, 0.8):
        cmd = [sys.executable, "-m", "pipeline", "subclip", str(trailers), "-o",
               str(tmp_path / f"out-{delay_s}"), *SUBCLIP]
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        time.sleep(delay_s)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        if proc.returncode == -signal.SIGINT or "init_import_site" in err:
            continue  # before Python could raise KeyboardInterrupt anywhere
        if proc.returncode == 0 and not err:
            break  # done before the signal came: later tries would be too
        assert proc.returncode == 130, err
        assert "Traceback" not in err and len(err.splitlines()) == 1, err
        assert err.startswith("vpipe subclip: interrupted"), err
        reached += 1
    assert reached >= 2
