"""vpipe subclip: planning on the frame/keyframe grid, exact and keyframe cuts, bad inputs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import synth

from pipeline import media
from pipeline.cli import main
from pipeline.errors import UsageError
from pipeline.subclip import SubclipOptions, keyframe_fallback, plan_subclips

FPS = 25


@pytest.fixture(scope="module")
def source(media_dir: Path) -> Path:
    """14 s, frame-numbered, keyframes exactly every 2 s, beeps at 2.5 s and 7.0 s."""
    return synth.make_video(
        media_dir / "source.mp4", duration_s=14.0, gop=50, extra=["-sc_threshold", "0"],
        beeps_at=(2.5, 7.0),
    )


def grid(n: int, fps: float = FPS, key_every: int = 50) -> media.FrameTimes:
    t = np.arange(n) / fps
    return media.FrameTimes(times=t, keyframe=np.arange(n) % key_every == 0, end_s=n / fps)


def spans(clips) -> list[tuple[float, float]]:
    return [(round(c.start_s, 6), round(c.end_s, 6)) for c in clips]


def manifest(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]


def read_cv2(path: Path) -> list[int]:
    cap = cv2.VideoCapture(str(path))
    idx = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        idx.append(synth.frame_index(frame))
    cap.release()
    return idx


def read_av(path: Path) -> tuple[list[int], list[float]]:
    with av.open(str(path)) as c:
        frames = [(synth.frame_index(f.to_ndarray(format="rgb24")), f.time)
                  for f in c.decode(video=0)]
    return [i for i, _ in frames], [t for _, t in frames]


def beep_onsets(path: Path, rate: int = 16000) -> tuple[list[float], int]:
    """Beep start times in a clip's audio (loud after 50 ms of quiet), and its sample count."""
    x = np.concatenate([d for _, _, d in media.decode(path, sampler=None, audio_rate_hz=rate)])
    loud = np.flatnonzero(np.abs(x.astype(np.int32)) > 2000)
    gaps = np.flatnonzero(np.diff(loud) > rate // 20) + 1
    return ([loud[i] / rate for i in [0, *gaps]] if len(loud) else []), len(x)


# --------------------------------------------------------------------------- planning


def test_plan_exact_snaps_to_the_next_frame_and_drops_a_short_last_clip() -> None:
    opts = SubclipOptions(count=3, duration_s=4, start_s=1.01)
    # 10 s: [1.04, 5.04), [5.04, 9.04), then 0.96 s left <= half of 4 s: dropped.
    assert spans(plan_subclips(grid(250), opts, "v")) == [(1.04, 5.04), (5.04, 9.04)]
    clips = plan_subclips(grid(250), SubclipOptions(count=3, duration_s=4, start_s=1), "v")
    assert [c.clip_id for c in clips] == ["v_0", "v_1"]


def test_plan_keeps_a_last_clip_over_the_min_fraction() -> None:
    opts = SubclipOptions(count=3, duration_s=4, start_s=1, min_fraction=0.2)
    assert spans(plan_subclips(grid(250), opts, "v"))[-1] == (9.0, 10.0)


def test_plan_with_gap_leaves_the_gap_out() -> None:
    opts = SubclipOptions(count=3, duration_s=2, start_s=0, gap_s=1)
    assert spans(plan_subclips(grid(250), opts, "v")) == [(0, 2), (3, 5), (6, 8)]


def test_plan_keyframe_snaps_to_nearest_keyframes_without_overlap() -> None:
    opts = SubclipOptions(count=3, duration_s=3, start_s=1.5, mode="keyframe")
    # keyframes every 2 s: 1.5 -> 2, 4.5 -> 4, 7.5 -> 8, 10.5 -> 10
    assert spans(plan_subclips(grid(350), opts, "v")) == [(2, 4), (4, 8), (8, 10)]


def test_options_are_checked() -> None:
    for bad in ({"mode": "fast"}, {"count": 0}, {"min_fraction": 2}, {"start_s": -1}):
        with pytest.raises(UsageError):
            SubclipOptions(**bad)


# --------------------------------------------------------------------------- cutting


def test_exact_clips_start_at_0_are_frame_accurate_and_decode_fully(
    source: Path, tmp_path: Path
) -> None:
    out = tmp_path / "clips"
    code = main(["subclip", str(source), "-o", str(out), "--count", "3", "--duration", "4",
                 "--start", "1.01", "--workers", "1", "--quiet"])
    assert code == 0
    recs = manifest(out)
    assert [r["id"] for r in recs] == ["source_0", "source_1", "source_2"]
    assert [(r["start"], r["end"], r["duration"]) for r in recs] == [
        (1.04, 5.04, 4.0), (5.04, 9.04, 4.0), (9.04, 13.04, 4.0)
    ]
    for r in recs:
        assert r["status"] == "ok" and r["mode"] == "exact" and r["item"] == "source"
        assert r["source"] == "source" and r["source_path"] == str(source)
        assert r["n_frames"] == 100 and r["has_audio"]
        clip = out / r["path"]
        assert clip == out / "source" / f"{r['id']}.mp4"
        first = round(r["start"] * FPS)
        expected = list(range(first, first + 100))
        assert read_cv2(clip) == expected  # OpenCV reads every frame, in order
        idx, times = read_av(clip)
        assert idx == expected and times[0] == 0.0
        assert media.probe(clip).has_audio


def test_exact_clips_keep_the_audio_in_sync(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "clips"
    main(["subclip", str(source), "-o", str(out), "--count", "2", "--duration", "4",
          "--start", "1", "--workers", "1", "--quiet"])
    # beeps at 2.5 s and 7.0 s of the source -> 1.5 s into clip 0, 2.0 s into clip 1
    for r, beep in zip(manifest(out), (1.5, 2.0), strict=True):
        onsets, n = beep_onsets(out / r["path"])
        assert n == pytest.approx(4 * 16000, abs=16)
        assert onsets == pytest.approx([beep], abs=0.005)


def test_keyframe_mode_cuts_on_keyframes_without_overlap(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "kf"
    code = main(["subclip", str(source), "-o", str(out), "--count", "3", "--duration", "3",
                 "--start", "1.5", "--mode", "keyframe", "--workers", "1", "--quiet"])
    assert code == 0
    recs = manifest(out)
    assert [(r["start"], r["end"]) for r in recs] == [(2, 4), (4, 8), (8, 10)]
    previous_last = None
    for r in recs:
        assert r["mode"] == "keyframe"
        idx = read_cv2(out / r["path"])
        assert idx == list(range(round(r["start"] * FPS), round(r["end"] * FPS)))
        av_idx, times = read_av(out / r["path"])
        assert av_idx == idx and times[0] == 0.0
        if previous_last is not None:
            assert idx[0] == previous_last + 1  # no overlap, nothing lost between clips
        previous_last = idx[-1]
    # the audio is copied in sync: source beeps at 2.5 s and 7.0 s
    assert [beep_onsets(out / r["path"])[0] for r in recs] == [
        pytest.approx([0.5], abs=0.03), pytest.approx([3.0], abs=0.03), []
    ]
    assert not list((out / "source").glob(".seg*"))  # the unused segments are gone


def test_flv_and_unicode_names_with_spaces(media_dir: Path, tmp_path: Path) -> None:
    src_dir = tmp_path / "in put"
    flv = synth.make_video(src_dir / "my trailer é.flv", duration_s=5.0, vcodec="flv",
                           acodec="libmp3lame")
    out = tmp_path / "out dir"
    for mode in ("exact", "keyframe"):
        code = main(["subclip", str(src_dir), "-o", str(out / mode), "--count", "2",
                     "--duration", "2", "--start", "0.5", "--mode", mode, "--workers", "1",
                     "-q"])
        assert code == 0
        recs = manifest(out / mode)
        assert [r["id"] for r in recs] == ["my-trailer-é_0", "my-trailer-é_1"]
        assert all(r["source_path"] == str(flv) and r["has_audio"] for r in recs)
        for r in recs:
            # flv video cannot be stream-copied into mp4: keyframe mode re-encodes it
            assert r["mode"] == "exact"
            assert len(read_cv2(out / mode / r["path"])) == r["n_frames"] == 50


def test_fewer_clips_than_asked_are_said(tmp_path: Path, capsys) -> None:
    """5 s of video, 3 x 2 s asked from 0: the third would be 1 s, at --min-fraction 0.5."""
    src = synth.make_video(tmp_path / "five.mp4", duration_s=5.0)
    assert main(["subclip", str(src), "-o", str(tmp_path / "o"), "--count", "3", "--duration",
                 "2", "--start", "0", "--workers", "1", "-q"]) == 0
    assert len(manifest(tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert f"vpipe subclip: {src}: note: 2 of 3 clips: the video ends at 5.00s" in err
    assert main(["subclip", str(src), "-o", str(tmp_path / "p"), "--count", "2", "--duration",
                 "2", "--start", "0", "--workers", "1", "-q"]) == 0
    assert "note" not in capsys.readouterr().err  # all it asked for


def test_no_audio_source_gives_clips_without_audio(tmp_path: Path) -> None:
    src = synth.make_video(tmp_path / "silent.mp4", duration_s=4.0, audio=False)
    out = tmp_path / "o"
    assert main(["subclip", str(src), "-o", str(out), "--count", "1", "--duration", "2",
                 "--start", "1", "-q"]) == 0
    (r,) = manifest(out)
    assert r["has_audio"] is False and not media.probe(out / r["path"]).has_audio


def test_bad_inputs_are_recorded_and_the_rest_is_done(
    source: Path, tmp_path: Path, capsys
) -> None:
    d = tmp_path / "trailers"
    d.mkdir()
    shutil.copy(source, d / "good.mp4")
    (d / "readme.txt").write_text("these are trailers\n")
    (d / "empty.mp4").write_bytes(b"")
    synth.make_truncated(source, d / "cut.mp4")
    synth.make_video(d / "short.mp4", duration_s=2.0)
    out = tmp_path / "clips"
    code = main(["subclip", str(d), "-o", str(out), "--count", "2", "--duration", "3",
                 "--start", "1", "--workers", "2"])
    assert code == 1
    recs = {r["id"]: r for r in manifest(out)}
    assert recs["good_0"]["status"] == recs["good_1"]["status"] == "ok"
    assert recs["readme"]["status"] == "skipped" and "not a video" in recs["readme"]["error"]
    assert recs["empty"]["status"] == "failed" and "empty file" in recs["empty"]["error"]
    assert recs["cut"]["status"] == "failed" and "truncated" in recs["cut"]["error"]
    assert recs["short"]["status"] == "failed" and "too short" in recs["short"]["error"]
    err = capsys.readouterr().err
    for name in ("readme.txt", "empty.mp4", "cut.mp4", "short.mp4"):
        (line,) = [ln for ln in err.splitlines() if name in ln]
        assert line.startswith("vpipe subclip: ") and line.count(name) == 1
    assert "1 video done (2 clips), 0 already done, 1 skipped, 3 failed" in err
    assert not list(out.glob(".*"))  # no temp folders left by the failed sources


def test_only_skipped_inputs_exit_0(source: Path, tmp_path: Path) -> None:
    d = tmp_path / "trailers"
    d.mkdir()
    shutil.copy(source, d / "good.mp4")
    (d / "good.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    code = main(["subclip", str(d), "-o", str(tmp_path / "o"), "--count", "1", "--duration",
                 "2", "--start", "0", "-q"])
    assert code == 0
    recs = {r["id"]: r["status"] for r in manifest(tmp_path / "o")}
    assert recs == {"good_0": "ok", "good-2": "skipped"}


@pytest.mark.parametrize(
    "args",
    [
        ["--mode", "fast"],
        ["--min-fraction", "1.5"],
        ["--count", "0"],
        ["--no-such-option"],
    ],
)
def test_usage_errors_exit_2(source: Path, tmp_path: Path, args) -> None:
    assert main(["subclip", str(source), "-o", str(tmp_path / "o"), *args]) == 2


def test_missing_input_exits_2(tmp_path: Path, capsys) -> None:
    assert main(["subclip", str(tmp_path / "nope.mp4"), "-o", str(tmp_path / "o")]) == 2
    assert "nope.mp4: no such file or folder" in capsys.readouterr().err


# --------------------------------------------------------------------------- keyframe edge cases


def first_audio_pts(path: Path) -> int:
    with av.open(str(path)) as c:
        return next(p.pts for p in c.demux(audio=0) if p.size)


# Audio samples (16 kHz) of the two keyframe clips [0, 2) and [2, 4) s. The segment muxer cuts
# the packet stream (ordered by dts) at each keyframe, so a clip holds the 1024-sample AAC
# packets (44.1 kHz, priming packet at -1024) that start before the next keyframe's dts:
# without B-frames that is 2.0 s (88200): packets up to 88064 -> audio [0, 89088) in clip 0,
# [89088 - 88200 = 888 (silence before it), 177152 - 88200) in clip 1. With B-frames the
# keyframe's dts is 2 frames (0.08 s) before its pts: 84672 -> packets up to 83968, audio
# [0, 84992) in clip 0; clip 1 from 88200 (earlier samples hidden by an edit list) to 173056.
AUDIO_SAMPLES = {
    "ultrafast": [round(89088 / 44100 * 16000), round((177152 - 88200) / 44100 * 16000)],
    "veryfast": [round(84992 / 44100 * 16000), round((173056 - 88200) / 44100 * 16000)],
}


@pytest.mark.parametrize("preset", ["ultrafast", "veryfast"])  # without / with B-frames
def test_keyframe_clip_from_the_first_frame_of_an_aac_source_starts_at_0_in_sync(
    media_dir: Path, tmp_path: Path, preset: str
) -> None:
    # AAC priming: the source's first audio packet lies 1024 samples before the video.
    src = synth.make_video(
        media_dir / f"primed-{preset}.mp4", duration_s=6.0, gop=25, beeps_at=(0.5, 2.5),
        extra=["-sc_threshold", "0", "-preset", preset],
    )
    assert first_audio_pts(src) == -1024
    out = tmp_path / "kf"
    code = main(["subclip", str(src), "-o", str(out), "--mode", "keyframe", "--count", "2",
                 "--duration", "2", "--start", "0", "--workers", "1", "-q"])
    assert code == 0
    recs = manifest(out)
    assert [(r["start"], r["end"], r["n_frames"], r["mode"]) for r in recs] == [
        (0.0, 2.0, 50, "keyframe"), (2.0, 4.0, 50, "keyframe")
    ]
    for r, first, samples in zip(recs, (0, 50), AUDIO_SAMPLES[preset], strict=True):
        clip = out / r["path"]
        assert read_cv2(clip) == list(range(first, first + 50))
        idx, times = read_av(clip)
        assert idx == list(range(first, first + 50)) and times[0] == 0.0
        # beeps at 0.5 s and 2.5 s of the source: 0.5 s into each clip
        onsets, n = beep_onsets(clip)
        assert onsets == pytest.approx([0.5], abs=0.005)
        assert n == samples


def test_keyframe_mode_on_a_source_whose_video_starts_after_its_audio(
    media_dir: Path, tmp_path: Path
) -> None:
    base = synth.make_video(media_dir / "late-base.mp4", duration_s=6.0, gop=25,
                            beeps_at=(0.5, 2.5), extra=["-sc_threshold", "0"])
    src = tmp_path / "late.mp4"  # the same streams, the video delayed by 0.2 s
    subprocess.run([synth.ffmpeg_exe(), "-v", "error", "-itsoffset", "0.2", "-i", str(base),
                    "-i", str(base), "-map", "0:v", "-map", "1:a", "-c", "copy", str(src)],
                   check=True)
    assert media.frame_times(src).times[0] == pytest.approx(0.2)
    out = tmp_path / "kf"
    assert main(["subclip", str(src), "-o", str(out), "--mode", "keyframe", "--count", "2",
                 "--duration", "2", "--start", "0", "-q"]) == 0
    recs = manifest(out)
    assert [(r["start"], r["end"], r["n_frames"]) for r in recs] == [(0.2, 2.2, 50), (2.2, 4.2, 50)]
    # the beep at 0.5 s of the audio is 0.3 s after the first video frame
    assert [beep_onsets(out / r["path"])[0] for r in recs] == [
        pytest.approx([0.3], abs=0.005), pytest.approx([0.3], abs=0.005)
    ]
    for r, first in zip(recs, (0, 50), strict=True):
        idx, times = read_av(out / r["path"])
        assert idx == list(range(first, first + 50)) and times[0] == 0.0


def test_keyframe_clip_that_is_the_whole_video(source: Path, tmp_path: Path) -> None:
    # one clip over the whole 14 s source: no split point for the segment muxer
    out = tmp_path / "kf"
    assert main(["subclip", str(source), "-o", str(out), "--mode", "keyframe", "--count", "1",
                 "--duration", "14", "--start", "0", "-q"]) == 0
    (r,) = manifest(out)
    assert (r["start"], r["end"], r["n_frames"], r["mode"]) == (0.0, 14.0, 350, "keyframe")
    assert read_cv2(out / r["path"]) == list(range(350))


def test_keyframe_fallback_reasons() -> None:
    kf = SubclipOptions(count=1, duration_s=2, start_s=1, mode="keyframe")
    assert keyframe_fallback(grid(250, key_every=50), kf, "v") is None
    assert keyframe_fallback(grid(250, key_every=1000), kf, "v") == (
        "keyframe mode cannot cut this video: a single keyframe (at 0.00s); "
        "cut in exact mode (re-encoded) instead"
    )
    # keyframes at 0 s and 4 s of 10 s: a clip from 8 s snaps to the end; exact mode can cut it
    late = SubclipOptions(count=1, duration_s=1, start_s=8, mode="keyframe")
    assert keyframe_fallback(sparse(), late, "v") == (
        "keyframe mode cannot cut this video: no subclip fits between its keyframes "
        "(at 0, 4 s); cut in exact mode (re-encoded) instead"
    )
    # nothing fits in exact mode either: no fallback, the usual "too short" follows
    assert keyframe_fallback(grid(25, key_every=1000), kf, "v") is None


def sparse() -> media.FrameTimes:
    t = np.arange(250) / FPS
    return media.FrameTimes(times=t, keyframe=np.isin(np.arange(250), [0, 100]), end_s=10.0)


def test_keyframe_mode_on_a_single_keyframe_source_cuts_exactly_with_a_note(
    media_dir: Path, tmp_path: Path, capsys
) -> None:
    src = synth.make_video(media_dir / "onekey.mp4", duration_s=6.0, gop=1000,
                           beeps_at=(2.5,), extra=["-sc_threshold", "0"])
    assert len(media.frame_times(src).keyframe_times) == 1
    out = tmp_path / "kf"
    code = main(["subclip", str(src), "-o", str(out), "--mode", "keyframe", "--count", "2",
                 "--duration", "2", "--start", "1", "--workers", "1"])
    assert code == 0
    recs = manifest(out)
    note = ("keyframe mode cannot cut this video: a single keyframe (at 0.00s); "
            "cut in exact mode (re-encoded) instead")
    assert [(r["start"], r["end"], r["n_frames"], r["mode"], r["note"]) for r in recs] == [
        (1.0, 3.0, 50, "exact", note), (3.0, 5.0, 50, "exact", note)
    ]
    for r, first in zip(recs, (25, 75), strict=True):
        assert read_cv2(out / r["path"]) == list(range(first, first + 50))
    assert beep_onsets(out / recs[0]["path"])[0] == pytest.approx([1.5], abs=0.005)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"vpipe subclip: {src}: note: {note}"
    assert "1 video done (2 clips), 0 already done, 0 skipped, 0 failed" in err[-1]


def test_soundtrack_longer_than_video_is_not_truncation(tmp_path: Path) -> None:
    # The container's duration is the 6 s soundtrack's; the 3 s picture is complete.
    vid = synth.make_video(tmp_path / "v.mp4", duration_s=3.0, audio=False)
    src = synth.with_soundtrack(vid, tmp_path / "long_audio.mp4", 6)
    info = media.probe(src)
    assert info.duration_s > 5.9 and info.video_end_s == 3.0
    out = tmp_path / "clips"
    assert main(["subclip", str(src), "-o", str(out), "--count", "2", "--duration", "1",
                 "--start", "0", "--quiet"]) == 0
    recs = manifest(out)
    assert [(r["id"], r["status"], r["start"], r["end"]) for r in recs] == [
        ("long_audio_0", "ok", 0.0, 1.0), ("long_audio_1", "ok", 1.0, 2.0)]
    # Each line names the file it was made from as `input` (not `label`: no training label).
    assert {r["input"] for r in recs} == {str(src)} and not any("label" in r for r in recs)


@pytest.mark.parametrize("mode, rotation", [("exact", 0), ("keyframe", 90)])
def test_a_portrait_phone_video_is_recorded_upright(tmp_path: Path, mode: str, rotation: int):
    # 160x120 frames stored sideways with a 90° display rotation: a 120x160 portrait video.
    # Exact mode re-encodes upright frames; keyframe mode copies the sideways ones and their
    # rotation. Either way the record gives the size a player shows.
    flat = synth.make_video(tmp_path / "flat.mp4", duration_s=3.0, audio=False)
    src = tmp_path / "portrait.mp4"
    subprocess.run([media.ffmpeg_exe(), "-y", "-v", "error", "-display_rotation", "90", "-i",
                    str(flat), "-c", "copy", str(src)], check=True)
    out = tmp_path / mode
    assert main(["subclip", str(src), "-o", str(out), "--count", "1", "--duration", "2",
                 "--start", "0", "--mode", mode, "--quiet"]) == 0
    (rec,) = manifest(out)
    assert (rec["width"], rec["height"], rec["rotation"]) == (120, 160, rotation)
    assert media.display_rotation(out / rec["path"]) == rotation


@pytest.mark.parametrize("fmt", ["mpegts", "vob"])
def test_exact_clips_of_an_mpeg_ts_or_ps_source_have_every_frame(
    media_dir: Path, tmp_path: Path, fmt: str
) -> None:
    # .ts/.mts/.vob have no seek index: ffmpeg's input seek landed on a packet after the
    # keyframe the clip needs and its first frames were lost ("written clip starts at 0.160s").
    base = synth.make_video(media_dir / "ts-base.mp4", duration_s=4.0, beeps_at=(1.0, 3.0))
    src = tmp_path / f"cam.{fmt}"
    codec = ["-c", "copy"] if fmt == "mpegts" else ["-c:v", "mpeg2video", "-c:a", "mp2"]
    subprocess.run([synth.ffmpeg_exe(), "-v", "error", "-i", str(base), *codec, "-f", fmt,
                    str(src)], check=True)
    frames = media.frame_times(src)
    out = tmp_path / "clips"
    for mode in ("exact", "keyframe"):  # keyframe mode cuts a program stream exactly
        assert main(["subclip", str(src), "-o", str(out / mode), "--count", "3", "--duration",
                     "1", "--start", "0.5", "--mode", mode, "--workers", "1", "-q"]) == 0
    recs = manifest(out / "exact")
    # the first frame at or after 0.5, 1.5, 2.5 s of the container (the video starts later)
    firsts = [int(np.searchsorted(frames.times, t - 1e-6)) for t in (0.5, 1.5, 2.5)]
    assert [r["start"] for r in recs] == [round(frames.times[n], 6) for n in firsts]
    assert manifest(out / "keyframe")[0]["mode"] == ("keyframe" if fmt == "mpegts" else "exact")
    for r, first in zip(recs, firsts, strict=True):
        assert r["n_frames"] == 25
        assert read_cv2(out / "exact" / r["path"]) == list(range(first, first + 25))
        idx, times = read_av(out / "exact" / r["path"])
        assert idx == list(range(first, first + 25)) and times[0] == 0.0
    # the beeps at 1.0 s and 3.0 s of the video, in sync
    for r, beep in ((recs[0], 1.0), (recs[2], 3.0)):
        t0 = frames.times[firsts[recs.index(r)]] - frames.times[0]
        assert beep_onsets(out / "exact" / r["path"])[0] == pytest.approx([beep - t0], abs=0.01)


def test_keyframe_mode_does_not_cut_at_open_gop_keyframes(tmp_path: Path) -> None:
    # x265's CRA keyframes (open GOP) are followed by frames shown before them that need the
    # previous GOP: a clip copied from there started at -0.080s and the source failed.
    src = synth.make_video(
        tmp_path / "open.mp4", duration_s=4.0, vcodec="libx265", audio=False,
        extra=["-pix_fmt", "yuv420p", "-x265-params",
               "log-level=error:keyint=25:min-keyint=25:scenecut=0:open-gop=1"],
    )
    with av.open(str(src)) as c:  # the source has keyframes with frames shown before them
        pkts = [(p.pts, p.is_keyframe) for p in c.demux(video=0) if p.size]
    open_keys = [t for i, (t, k) in enumerate(pkts) if k and any(q < t for q, _ in pkts[i:])]
    assert open_keys
    keys = media.frame_times(src).keyframe_times
    assert not set(np.round(keys * 12800)) & set(open_keys)  # time base 1/12800
    out = tmp_path / "kf"
    assert main(["subclip", str(src), "-o", str(out), "--mode", "keyframe", "--count", "2",
                 "--duration", "1", "--start", "0.5", "--workers", "1", "-q"]) == 0
    prev = -1
    for r in manifest(out):
        idx, times = read_av(out / r["path"])
        assert times[0] == 0.0 and idx == list(range(idx[0], idx[0] + r["n_frames"]))
        assert read_cv2(out / r["path"]) == idx and idx[0] > prev
        prev = idx[-1]


# --------------------------------------------------------------------------- damaged sources


@pytest.fixture(scope="module")
def busy_source(media_dir: Path) -> Path:
    """12 s of testsrc2 + a tone, a keyframe every second: its frames fill the file, so bytes
    overwritten at x% of it land in the media data at about x% of its time."""
    return synth.make_lavfi_video(media_dir / "busy" / "busy.mp4", duration_s=12.0,
                                  size=(320, 240), gop=25)


DAMAGE_ARGS = ["--count", "2", "--duration", "5", "--start", "1"]


@pytest.fixture(scope="module")
def clean_cuts(busy_source: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """busy_source cut in each mode, as the damaged copies are."""
    out = tmp_path_factory.mktemp("clean-cuts")
    for mode in ("exact", "keyframe"):
        assert main(["subclip", str(busy_source), "-o", str(out / mode), *DAMAGE_ARGS,
                     "--mode", mode, "-q"]) == 0
    return {mode: out / mode for mode in ("exact", "keyframe")}


def decoded(path: Path, start_s: float = 0.0, end_s: float = np.inf) -> dict:
    """The decoded video and audio frames of a file shown in [start_s, end_s), by (kind,
    pts), decoded as a cutter does: from the keyframe before start_s. A damaged packet's
    frames are absent (PyAV raises for them; a player would skip or conceal them)."""
    out = {}
    with av.open(str(path)) as c:
        c.streams.video[0].thread_type = "AUTO"
        if start_s > 0:
            c.seek(round(start_s * 1e6))  # backward, to a keyframe
        for packet in c.demux():
            if packet.pts is not None and packet.pts * packet.time_base > end_s + 1:
                break
            try:
                frames = packet.decode()
            except av.error.FFmpegError:
                continue
            for f in frames:
                if start_s - 1e-6 <= f.time < end_s - 1e-6:
                    kind = packet.stream.type
                    out[kind, f.pts] = (f.to_ndarray() if kind == "audio"
                                        else f.to_ndarray(format="gray"))
    return out


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# (where, bytes): the issue's recipe; 100 bytes that decode without any error (only a decoder
# told to look closer marks the frame); 100 bytes in an audio packet.
DAMAGE = {"20KB-at-40%": (0.40, 20_000), "silent-100B-at-53%": (0.53, 100),
          "audio-100B-at-30%": (0.30, 100)}


@pytest.mark.parametrize("mode", ["exact", "keyframe"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_source_fails_the_clips_it_reaches_and_keeps_the_intact_ones(
    busy_source: Path, clean_cuts: dict[str, Path], tmp_path: Path, capsys, mode: str,
    damage: str
) -> None:
    at, n_bytes = DAMAGE[damage]
    src = synth.make_damaged(busy_source, tmp_path / "in" / "busy.mp4", at=at, n_bytes=n_bytes)
    code = main(["subclip", str(src), "-o", str(tmp_path / "out"), *DAMAGE_ARGS, "--mode", mode,
                 "-q"])
    clean, recs = manifest(clean_cuts[mode]), manifest(tmp_path / "out")
    assert [r["id"] for r in recs] == [r["id"] for r in clean] == ["busy_0", "busy_1"]
    # Which clips the damage reaches: their span decodes otherwise from the damaged source.
    reached = [not same(decoded(busy_source, c["start"], c["end"]),
                        decoded(src, c["start"], c["end"])) for c in clean]
    assert reached.count(True) == 1  # one clip damaged, one intact: both outcomes are tested
    assert code == 1
    err = capsys.readouterr().err.splitlines()
    for c, r, bad in zip(clean, recs, reached, strict=True):
        if bad:
            assert r["status"] == "failed" and r["error"].startswith(f"{src}: damaged ")
            assert f"in clip {r['id']} ({c['start']:.2f}-{c['end']:.2f}s), not kept" in r["error"]
            assert err.count(f"vpipe subclip: {r['error']}") == 1
            assert not (tmp_path / "out" / "busy" / f"{r['id']}.mp4").exists()
        else:
            # Kept only when intact: the same pictures and sound as the clean source's clip.
            assert r["status"] == "ok" and (r["start"], r["end"]) == (c["start"], c["end"])
            assert same(decoded(clean_cuts[mode] / c["path"]),
                        decoded(tmp_path / "out" / r["path"]))
    # The next stage sees only the intact clip.
    assert main(["extract-frames", str(tmp_path / "out"), "-o", str(tmp_path / "media"),
                 "--no-audio", "-q"]) == 0
    kept = [r["id"] for r, bad in zip(recs, reached, strict=True) if not bad]
    assert [json.loads(x)["id"] for x in (tmp_path / "media" / "manifest.jsonl").read_text()
            .splitlines()] == kept


def test_the_issue_recipe_through_the_cli_names_the_file_and_the_damage(
    busy_source: Path, tmp_path: Path
) -> None:
    # 20 KB overwritten at 40%: `vpipe subclip` used to exit 0 with both clips ok, one of them
    # missing frames. A real process, as a user runs it.
    src = synth.make_damaged(busy_source, tmp_path / "busy.mp4")
    out = tmp_path / "clips"
    proc = subprocess.run([sys.executable, "-m", "pipeline", "subclip", str(src), "-o", str(out),
                           *DAMAGE_ARGS], capture_output=True, text=True)
    assert proc.returncode == 1
    (line,) = [ln for ln in proc.stderr.splitlines() if "damaged" in ln]
    # The frames lost, from the two sources' own decoding: clip 0's frames the damaged source
    # does not give at all.
    clean, damaged = decoded(busy_source, 1.0, 6.0), decoded(src, 1.0, 6.0)
    lost = sum(1 for k in clean if k[0] == "video" and k not in damaged)
    assert lost > 0
    assert line.startswith(f"vpipe subclip: {src}: damaged video data at 4.")
    assert f"({lost} of 125 frames lost)" in line
    assert line.endswith(", in clip busy_0 (1.00-6.00s), not kept")
    # The source counts as failed (it is redone by the next run); its intact clip is kept.
    assert "0 videos done (1 clip), 0 already done, 0 skipped, 1 failed" in proc.stderr
    statuses = {r["id"]: r["status"] for r in manifest(out)}
    assert statuses == {"busy_0": "failed", "busy_1": "ok"}


def test_damage_that_reaches_every_clip_fails_the_source_and_writes_nothing(
    busy_source: Path, tmp_path: Path
) -> None:
    src = synth.make_damaged(busy_source, tmp_path / "busy.mp4")
    out = tmp_path / "clips"
    # One clip, over the damage at ~4.8 s.
    assert main(["subclip", str(src), "-o", str(out), "--count", "1", "--duration", "5",
                 "--start", "2", "-q"]) == 1
    (r,) = manifest(out)
    assert (r["id"], r["status"]) == ("busy", "failed")
    assert r["error"].startswith(f"{src}: damaged video data at 4.")
    assert r["error"].count(str(src)) == 1
    assert not (out / "busy").exists() and not list(out.glob(".*"))


# --------------------------------------------------------------------------- recorded bounds


@pytest.mark.parametrize("mode", ["exact", "keyframe"])
def test_adjacent_clips_end_where_the_next_starts_on_the_source_frame_grid(
    media_dir: Path, tmp_path: Path, mode: str
) -> None:
    # 60 fps (with B-frames) in a millisecond time base: frames last 16 or 17 ms, so a clip's
    # last frame duration is a rounding; measured from it, keyframe clip 0 ended at 5.334 and
    # clip 1 started at 5.333 (issue 11, item 6: "end <= next start", as the contract says).
    base = synth.make_video(media_dir / "v60.mp4", duration_s=8.0, fps=60, gop=64,
                            extra=["-sc_threshold", "0"])
    src = tmp_path / "ms.mp4"
    subprocess.run([media.ffmpeg_exe(), "-v", "error", "-i", str(base), "-c", "copy",
                    "-video_track_timescale", "1000", str(src)], check=True)
    grid = media.frame_times(src)
    assert len(set(np.round(np.diff(grid.times), 3))) == 2  # 0.016 and 0.017
    out = tmp_path / "clips"
    assert main(["subclip", str(src), "-o", str(out), "--count", "3", "--duration", "2",
                 "--start", "1", "--mode", mode, "-q"]) == 0
    recs = manifest(out)
    assert len(recs) == 3 and all(r["mode"] == mode for r in recs)
    for a, b in zip(recs, recs[1:], strict=False):
        assert a["end"] == b["start"]  # adjacent: no overlap, no gap
    times = [round(float(t), 6) for t in grid.times] + [round(grid.end_s, 6)]
    for r in recs:
        # start and end are source frame times: the clip's first frame and the one after its
        # last; the written file holds exactly the frames between.
        first = times.index(r["start"])
        assert r["end"] == times[first + r["n_frames"]]
        assert r["duration"] == round(r["end"] - r["start"], 6)
        assert len(media.frame_times(out / r["path"]).times) == r["n_frames"]
        # The sound ends with the picture: exactly in exact mode (the declared length, AAC
        # padding aside); a stream copy keeps whole AAC frames, at most one past the end.
        _, n = beep_onsets(out / r["path"])
        want = r["duration"] * 16000
        if mode == "exact":
            assert abs(n - want) <= 16
        else:
            assert n <= want + 1024 / 44100 * 16000
