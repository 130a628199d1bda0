"""vpipe subclip --mode ranges: clips as ranges of their source, decoded from it by the next stages.

The source has sparse keyframes (every 50 frames = 2 s) and the clips start mid-GOP, so every
decode seeks to a keyframe before the start and drops frames up to it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import synth
from PIL import Image
from test_features import args as features_args
from test_features import assert_close, reference_from_frames

from pipeline import media
from pipeline.cli import main
from pipeline.records import read_manifest

RATE = 16000
# --count 2 --duration 2 --start 1.5 on a 25 fps grid: frames 38..87 and 88..137 (1.52 s on).
PLAN = ["--count", "2", "--duration", "2", "--start", "1.5"]


@pytest.fixture(scope="module")
def sparse(media_dir: Path) -> Path:
    """7 s, frame-numbered, a keyframe every 2 s only, beeps at 1.6 s and 4.0 s (AAC 44.1 kHz)."""
    return synth.make_video(media_dir / "sparse.mp4", duration_s=7.0, gop=50,
                            extra=["-sc_threshold", "0"], beeps_at=(1.6, 4.0))


def whole(path: Path):
    """The whole source decoded: its frames (every one) and its 16 kHz audio."""
    frames = [d for _k, _t, d in media.decode(path, sampler=media.FrameSampler(every=1))]
    pcm = np.concatenate([d for _k, _t, d in media.decode(path, sampler=None,
                                                          audio_rate_hz=RATE)])
    return frames, pcm


def source_index(grid: media.FrameTimes, start_s: float, t: float) -> int:
    """The source frame on screen at clip time t."""
    return int(np.searchsorted(grid.times, start_s + t + 1e-6, side="right")) - 1


@pytest.mark.parametrize("sampler", [media.FrameSampler(every=1), media.FrameSampler(every=7),
                                     media.FrameSampler(fps=3)], ids=["every1", "every7", "fps3"])
def test_span_frames_are_the_sources_own_frames_mid_gop(sparse: Path, sampler) -> None:
    grid = media.frame_times(sparse)
    frames, _ = whole(sparse)
    start, end = float(grid.times[37]), float(grid.times[101])  # keyframes at 0, 50, 100
    got = [(t, d) for _k, t, d in media.decode(sparse, sampler=sampler, span=(start, end))]
    n = 101 - 37
    if sampler.every:
        assert [t for t, _ in got] == [round(i / 25, 6) for i in range(0, n, sampler.every)]
    else:  # 2.56 s of clip: ticks 0, 1/3 ... 7/3
        assert [t for t, _ in got] == [round(k / 3, 6) for k in range(8)]
    for t, d in got:
        i = source_index(grid, start, t)
        assert synth.frame_index(d) == i
        np.testing.assert_array_equal(d, frames[i])  # bit-identical to the whole decode


def test_span_audio_is_the_sources_samples_over_the_range(sparse: Path) -> None:
    """Samples round(start*16000) .. + round((end-start)*16000) of the whole source's audio."""
    grid = media.frame_times(sparse)
    _, pcm = whole(sparse)
    start, end = float(grid.times[37]), float(grid.times[101])
    got = np.concatenate([d for _k, _t, d in media.decode(sparse, sampler=None,
                                                          audio_rate_hz=RATE, span=(start, end))])
    first = round(start * RATE)
    assert len(got) == round((end - start) * RATE) == 40960
    np.testing.assert_array_equal(got, pcm[first:first + len(got)])
    assert np.abs(got[round(0.1 * RATE):round(0.15 * RATE)]).max() > 1000  # the 1.6 s beep


def test_span_on_an_mpeg_ts_with_b_frames_seeks_without_an_index(media_dir: Path) -> None:
    """MPEG-TS has no seek index (a seek lands on any packet) and starts its clock at 1.4 s;
    B-frames put packets out of display order. Frames and audio still equal the whole decode."""
    src = synth.make_video(media_dir / "sparse.ts", duration_s=8.0, gop=50,
                           extra=["-sc_threshold", "0", "-bf", "2"], beeps_at=(2.5,))
    grid = media.frame_times(src)
    frames, pcm = whole(src)
    v0 = float(grid.times[0])  # the whole decode's audio sample 0 is the first video frame
    assert v0 > 0.01
    for a, b in ((37, 101), (120, 180), (0, 30)):
        start, end = float(grid.times[a]), float(grid.times[b])
        got = list(media.decode(src, sampler=media.FrameSampler(every=3), span=(start, end),
                                audio_rate_hz=RATE))
        picked = [d for k, _t, d in got if k == "frame"]
        assert [synth.frame_index(d) for d in picked] == list(range(a, b, 3))
        for d, i in zip(picked, range(a, b, 3), strict=True):
            np.testing.assert_array_equal(d, frames[i])
        audio = np.concatenate([d for k, _t, d in got if k == "audio"])
        first = round((start - v0) * RATE)
        assert len(audio) == round((end - start) * RATE)
        np.testing.assert_array_equal(audio, pcm[first:first + len(audio)])


def subclip(src: Path, out: Path, *extra: str) -> int:
    return main(["subclip", str(src), "-o", str(out), *PLAN, "-q", *extra])


def test_ranges_writes_no_video_records_the_source_and_resumes(sparse: Path, tmp_path: Path,
                                                              capsys) -> None:
    out = tmp_path / "r"
    assert subclip(sparse, out, "--mode", "ranges") == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.jsonl", "vpipe.json"]
    recs = [r for r in read_manifest(out).values()]
    st = sparse.stat()
    assert [(r["id"], r["start"], r["end"], r["first_frame"], r["last_frame"], r["n_frames"])
            for r in recs] == [("sparse_0", 1.52, 3.52, 38, 87, 50),
                               ("sparse_1", 3.52, 5.52, 88, 137, 50)]
    for r in recs:
        assert (r["mode"], r["path"], r["source"]) == ("ranges", None, "sparse")
        assert r["source_path"] == str(sparse.resolve())
        assert (r["source_bytes"], r["source_mtime_ns"]) == (st.st_size, st.st_mtime_ns)
        assert r["output_bytes"] == {} and r["has_audio"] is True
    capsys.readouterr()
    assert main(["subclip", str(sparse), "-o", str(out), *PLAN, "--mode", "ranges"]) == 0
    assert "0 videos done (0 clips), 1 already done" in capsys.readouterr().err
    assert subclip(sparse, out, "--mode", "exact") == 2  # other parameters: refused


def test_ranges_pipeline_equals_exact_pipeline_but_for_the_encode(sparse: Path, tmp_path: Path
                                                                  ) -> None:
    """Same ids, bounds, frame selection, timestamps and audio length; ranges frames are the
    source's own decoded frames (png: lossless), exact ones a re-encode of them."""
    grid = media.frame_times(sparse)
    frames, pcm = whole(sparse)
    media_of = {}
    for mode in ("ranges", "exact"):
        assert subclip(sparse, tmp_path / mode, "--mode", mode) == 0
        media_of[mode] = tmp_path / f"{mode}-media"
        assert main(["extract-frames", str(tmp_path / mode), "-o", str(media_of[mode]),
                     "--every", "7", "--size", "0", "--format", "png", "-q"]) == 0
    r, e = (read_manifest(media_of[m]) for m in ("ranges", "exact"))
    keys = ("start", "end", "n_frames", "timestamps", "n_samples", "has_audio")
    assert list(r) == list(e) == ["sparse_0", "sparse_1"]
    for cid in r:
        assert {k: r[cid][k] for k in keys} == {k: e[cid][k] for k in keys}
        assert r[cid]["n_frames"] == 8 and r[cid]["n_samples"] == 2 * RATE
        for n, t in enumerate(r[cid]["timestamps"]):
            i = source_index(grid, r[cid]["start"], t)
            png = np.asarray(Image.open(media_of["ranges"] / cid / "frames" / f"{n:06d}.png"))
            np.testing.assert_array_equal(png, frames[i])
            exact = np.asarray(Image.open(media_of["exact"] / cid / "frames" / f"{n:06d}.png"))
            assert synth.frame_index(exact) == synth.frame_index(png) == i
        import soundfile as sf

        wav, rate = sf.read(media_of["ranges"] / cid / "audio.wav", dtype="int16")
        first = round(r[cid]["start"] * RATE)
        assert rate == RATE
        np.testing.assert_array_equal(wav, pcm[first:first + len(wav)])
    # extract-audio on ranges: the same samples
    audio = tmp_path / "audio"
    assert main(["extract-audio", str(tmp_path / "ranges"), "-o", str(audio), "-q"]) == 0
    for cid in r:
        a = (audio / cid / "audio.wav").read_bytes()
        assert a == (media_of["ranges"] / cid / "audio.wav").read_bytes()


LOOP_FRAMES, LOOP_GAP_S = 50, 0.008


@pytest.fixture(scope="module")
def looped(media_dir: Path) -> Path:
    """12 s, frame-numbered, as a file looped from a 2 s piece whose soundtrack outlasts its
    picture: each loop's 50 frames 8 ms later than the last's, so frame i is at i/25 +
    (i // 50) * 0.008 s, off the 40 ms grid (in a 1/90000 time base, which holds them)."""
    setpts = f"settb=1/90000,setpts=N/25/TB+floor(N/{LOOP_FRAMES})*{LOOP_GAP_S}/TB"
    return synth.make_video(media_dir / "looped.mp4", duration_s=12.0, extra=[
        "-vf", setpts, "-fps_mode", "passthrough", "-enc_time_base", "1/90000"])


@pytest.fixture(scope="module")
def looped_clips(looped: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The looped video's subclip folders, exact and ranges: 3 x 3 s from 1 s."""
    d = tmp_path_factory.mktemp("looped")
    for mode in ("exact", "ranges"):
        assert main(["subclip", str(looped), "-o", str(d / mode), "--count", "3", "--duration",
                     "3", "--start", "1", "--mode", mode, "-q"]) == 0
    return {mode: d / mode for mode in ("exact", "ranges")}


def test_one_sample_time_is_one_source_frame_in_exact_and_ranges_mode(
        looped: Path, looped_clips: dict[str, Path], tmp_path: Path) -> None:
    """Off the grid, exact clips keep their source's frame times (an exact cut used to put
    them on the grid of the frame rate: frame k at another time than the source's frame, so a
    sample time picked a frame 40 ms away), and their last frame lasts until the recorded end,
    as a range's does (an exact clip's lasted what its file said: a sample more or less)."""
    grid = media.frame_times(looped)
    i = np.arange(len(grid.times))
    np.testing.assert_allclose(grid.times, i / 25 + (i // LOOP_FRAMES) * LOOP_GAP_S, atol=2e-5)
    got = {}
    for mode, clips in looped_clips.items():
        assert main(["extract-frames", str(clips), "-o", str(tmp_path / f"{mode}-m"),
                     "--fps", "5", "--size", "0", "--format", "png", "--no-audio", "-q"]) == 0
        got[mode] = read_manifest(tmp_path / f"{mode}-m")
    clips = read_manifest(looped_clips["exact"])
    assert list(got["exact"]) == list(got["ranges"]) == ["looped_0", "looped_1", "looped_2"]
    for cid, rec in got["ranges"].items():
        start, end = rec["start"], rec["end"]
        inside = grid.times[(grid.times >= start - 1e-6) & (grid.times < end - 1e-6)] - start
        # The exact clip's frames are at the source's times, from its start.
        np.testing.assert_allclose(media.frame_times(looped_clips["exact"] / clips[cid]["path"])
                                   .times, inside, atol=2e-5)
        # Ticks k/5 before the last quarter of the last frame, which lasts until the end.
        n = int(np.ceil((inside[-1] + 0.75 * (end - start - inside[-1])) * 5))
        assert got["exact"][cid]["timestamps"] == rec["timestamps"] == [k / 5 for k in range(n)]
        for mode in ("exact", "ranges"):
            frames = tmp_path / f"{mode}-m" / cid / "frames"
            seen = [synth.frame_index(np.asarray(Image.open(frames / f"{k:06d}.png")))
                    for k in range(n)]
            assert seen == [source_index(grid, start, t) for t in rec["timestamps"]], mode
    # In looped_0 and looped_2 the 8 ms gap follows the last frame: it lasts 48 ms, to the
    # end, and tick 3.0, 32 ms after it, is still that frame (an exact clip said 40 ms: none).
    assert [len(r["timestamps"]) for r in got["ranges"].values()] == [16, 15, 16]


def test_features_from_video_samples_exact_and_ranges_clips_alike(
        looped_clips: dict[str, Path], tmp_path: Path, weights) -> None:
    """The same sample times for both kinds of clip through features --from-video too."""
    from pipeline.shards import open_features

    times = {}
    for mode, clips in looped_clips.items():
        out = tmp_path / mode
        assert main(features_args(clips, out, weights, "--from-video", "--fps", "5",
                                  "--audio-model", "none")) == 0
        with open_features(out) as store:
            times[mode] = {cid: store[cid].image_timestamps.tolist() for cid in store.clip_ids}
    assert times["exact"] == times["ranges"]
    assert [len(times["ranges"][f"looped_{k}"]) for k in range(3)] == [16, 15, 16]


def test_a_changed_or_missing_source_fails_its_clips_alone(sparse: Path, numbered_video: Path,
                                                           tmp_path: Path, capsys) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    a, b = shutil.copy(sparse, videos / "a.mp4"), shutil.copy(numbered_video, videos / "b.mp4")
    clips = tmp_path / "clips"
    assert main(["subclip", str(videos), "-o", str(clips), *PLAN, "--mode", "ranges",
                 "-q"]) == 0
    with open(a, "ab") as f:
        f.write(b"\0" * 10)  # rewritten since subclip
    capsys.readouterr()
    assert main(["extract-frames", str(clips), "-o", str(tmp_path / "m"), "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("a.mp4: source of ranges clip a_" in e for e in err)
    assert "changed since subclip" in err[0]
    recs = read_manifest(tmp_path / "m")
    assert [recs[c]["status"] for c in ("a_0", "a_1", "b_0", "b_1")] == [
        "failed", "failed", "ok", "ok"]
    os.rename(b, videos / "moved.mp4")
    assert main(["extract-frames", str(clips), "-o", str(tmp_path / "m2"), "-q"]) == 1
    err = capsys.readouterr().err
    assert f"{Path(b).resolve()}: source of ranges clip b_0 is missing" in err


def test_segments_in_ranges_mode(sparse: Path, tmp_path: Path) -> None:
    seg = tmp_path / "seg.csv"
    seg.write_text("source,start,end,id\nsparse,1.0,2.0,x\nsparse,1.5,3.0,y\nsparse,9,10,z\n")
    out = tmp_path / "s"
    assert main(["subclip", str(sparse), "-o", str(out), "--segments", str(seg),
                 "--mode", "ranges", "-q"]) == 1  # z is past the end
    assert sorted(p.name for p in out.iterdir()) == ["manifest.jsonl", "vpipe.json"]
    recs = read_manifest(out)
    assert [(recs[c]["first_frame"], recs[c]["last_frame"], recs[c]["asked_start"])
            for c in ("x", "y")] == [(25, 49, 1.0), (38, 74, 1.5)]  # overlapping: fine
    assert recs["z"]["status"] == "failed"


def test_features_from_video_decodes_the_range(sparse: Path, tmp_path: Path, weights) -> None:
    from pipeline.shards import open_features

    clips = tmp_path / "clips"
    assert subclip(sparse, clips, "--mode", "ranges") == 0
    out = tmp_path / "f"
    assert main(features_args(clips, out, weights, "--from-video", "--every", "10")) == 0
    grid = media.frame_times(sparse)
    frames, _ = whole(sparse)
    with open_features(out) as store:
        assert sorted(store.clip_ids) == ["sparse_0", "sparse_1"]
        for cid, first in (("sparse_0", 38), ("sparse_1", 88)):
            c = store[cid]
            np.testing.assert_array_equal(c.image_timestamps, np.arange(0, 50, 10) / 25)
            picked = [frames[first + k] for k in range(0, 50, 10)]
            assert_close(c.image, reference_from_frames(picked, weights["image"]))
            assert c.audio.shape == (2, 128)  # 2.0 s at 16 kHz
            assert c.start == float(grid.times[first])
    info = json.loads((out / "vpipe.json").read_text())
    assert info["params"]["from_video"] is True


def test_a_replaced_source_is_planned_and_extracted_again(sparse: Path, tmp_path: Path,
                                                          capsys) -> None:
    """Same parameters again after the source was rewritten: subclip and extract-frames redo
    its clips (the records named the old file) instead of calling them done."""
    src = Path(shutil.copy(sparse, tmp_path / "v.mp4"))
    clips, frames = tmp_path / "clips", tmp_path / "frames"
    steps = (["subclip", str(src), "-o", str(clips), *PLAN, "--mode", "ranges"],
             ["extract-frames", str(clips), "-o", str(frames), "--every", "25", "--size", "0",
              "--format", "png", "--no-audio"])
    for cmd in steps:
        assert main(cmd) == 0
    synth.make_video(src, duration_s=7.0, gop=50, color=(200, 40, 40), audio=False)
    capsys.readouterr()
    for cmd in steps:
        assert main(cmd) == 0
    err = capsys.readouterr().err
    assert "1 video done (2 clips), 0 already done" in err
    assert read_manifest(clips)["v_0"]["source_bytes"] == src.stat().st_size
    png = np.asarray(Image.open(frames / "v_0" / "frames" / "000000.png"))
    assert np.abs(png[-5, 5].astype(int) - (200, 40, 40)).max() <= 12  # the new video's colour
