"""pipeline.media: probing, "is it a video", frame/keyframe times, one-pass decoding."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import synth

from pipeline import media
from pipeline.errors import MediaError, NotAVideo, Skip, UsageError


@pytest.fixture(scope="module")
def gop_video(media_dir: Path) -> Path:
    """6 s at 25 fps with a keyframe every 25 frames exactly (no scene-cut keyframes)."""
    return synth.make_video(
        media_dir / "gop25.mp4", duration_s=6.0, gop=25, extra=["-sc_threshold", "0"]
    )


@pytest.fixture(scope="module")
def flv_video(media_dir: Path) -> Path:
    return synth.make_video(
        media_dir / "clip.flv", duration_s=4.0, vcodec="flv", acodec="libmp3lame",
        beeps_at=(1.0,),
    )


@pytest.fixture(scope="module")
def junk(media_dir: Path, numbered_video: Path) -> dict[str, Path]:
    """Files that are not (usable) videos, one per kind of problem."""
    d = media_dir / "junk"
    d.mkdir(exist_ok=True)
    (d / "empty.mp4").write_bytes(b"")
    (d / "notes.txt").write_text("not a video\n" * 20)
    (d / "labels.csv").write_text("id,label\nnumbered,3.5\n")
    from PIL import Image

    Image.fromarray(synth.numbered_frame(7, (64, 48))).save(d / "poster.jpg")
    synth.make_truncated(numbered_video, d / "cut.mp4", keep=0.4)
    wav = d / "tone.wav"
    subprocess.run(
        [synth.ffmpeg_exe(), "-y", "-v", "error", "-f", "lavfi", "-i", "sine=d=1", str(wav)],
        check=True,
    )
    return {p.stem: p for p in d.iterdir()}


# --------------------------------------------------------------------------- which ffmpeg

FAKE_FFMPEG = "#!/bin/sh\necho 'ffmpeg version 0.0-fake Copyright (c) nobody'\n"


def fake_ffmpeg(folder: Path, script: str = FAKE_FFMPEG) -> Path:
    """An executable named ``ffmpeg`` in ``folder`` that answers ``-version`` like one."""
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "ffmpeg"
    exe.write_text(script)
    exe.chmod(0o755)
    return exe


@pytest.fixture
def fresh_choice():
    """Let a test change VPIPE_FFMPEG for this process: the choice is made once per process."""
    media.chosen_ffmpeg.cache_clear()
    yield
    media.chosen_ffmpeg.cache_clear()


def test_bundled_ffmpeg_is_the_default_even_with_another_on_path(tmp_path: Path) -> None:
    import imageio_ffmpeg

    fake = fake_ffmpeg(tmp_path / "bin")
    ff = media.locate_ffmpeg({"PATH": str(fake.parent)})
    wheel = Path(imageio_ffmpeg.__file__).parent
    assert ff.source == "bundled" and Path(ff.path).parent == wheel / "binaries"
    assert ff.version != "0.0-fake"
    assert media.locate_ffmpeg({"PATH": str(fake.parent), "VPIPE_FFMPEG": "bundled"}) == ff


def test_vpipe_ffmpeg_chooses_the_one_on_path_or_a_path(tmp_path: Path) -> None:
    fake = fake_ffmpeg(tmp_path / "bin")
    on_path = media.locate_ffmpeg({"VPIPE_FFMPEG": "system", "PATH": str(fake.parent)})
    assert on_path == media.FFmpeg(str(fake), "system", "0.0-fake")
    given = media.locate_ffmpeg({"VPIPE_FFMPEG": str(fake), "PATH": ""})
    assert given == media.FFmpeg(str(fake), "VPIPE_FFMPEG", "0.0-fake")


@pytest.mark.parametrize(
    "choice, script, said",
    [
        ("system", None, "no ffmpeg on PATH"),
        ("{tmp}/missing/ffmpeg", None, "not found or not executable"),
        ("{tmp}/bin/ffmpeg", "", "not a working ffmpeg (exit status 1)"),
        ("{tmp}/bin/ffmpeg", "#!/bin/sh\necho 'no: bad option' >&2\nexit 1\n", "(no: bad option)"),
    ],
    ids=["system-none-on-path", "missing", "not-ffmpeg", "fails"],
)
def test_a_vpipe_ffmpeg_that_does_not_work_is_one_line_naming_the_variable(
    tmp_path: Path, choice: str, script: str | None, said: str
) -> None:
    if script is not None:
        fake_ffmpeg(tmp_path / "bin", script or "#!/bin/sh\nexit 1\n")
    choice = choice.format(tmp=tmp_path)
    with pytest.raises(UsageError) as e:
        media.locate_ffmpeg({"VPIPE_FFMPEG": choice, "PATH": str(tmp_path / "empty")})
    msg = str(e.value)
    assert msg.startswith(f"VPIPE_FFMPEG={choice}: ") and said in msg and "\n" not in msg


def test_a_bad_vpipe_ffmpeg_stops_a_stage_with_exit_2_before_any_work(
    numbered_video: Path, tmp_path: Path, monkeypatch, capsys, fresh_choice
) -> None:
    from pipeline.cli import main

    monkeypatch.setenv("VPIPE_FFMPEG", str(tmp_path / "nope"))
    assert main(["subclip", str(numbered_video), "-o", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"vpipe: error: VPIPE_FFMPEG={tmp_path / 'nope'}: not found or not executable; "
        "set VPIPE_FFMPEG to bundled, system or the path of an ffmpeg binary"
    )
    assert not (tmp_path / "out" / "manifest.jsonl").exists()


def test_vpipe_json_records_which_ffmpeg_ran_and_its_version(fresh_choice) -> None:
    import av

    versions = media.media_versions()
    ff = media.chosen_ffmpeg()
    assert versions == {
        "ffmpeg": ff.version, "ffmpeg_source": ff.source, "ffmpeg_path": ff.path,
        "pyav": av.__version__,
    }
    if "VPIPE_FFMPEG" not in os.environ:  # whatever ffmpeg is on PATH
        assert ff == media.locate_ffmpeg({"PATH": ""}) and ff.source == "bundled"


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="no system ffmpeg on PATH")
def test_vpipe_ffmpeg_system_cuts_with_it_and_records_it(
    numbered_video: Path, tmp_path: Path, monkeypatch, fresh_choice
) -> None:
    from pipeline.cli import main

    system = shutil.which("ffmpeg")
    first = subprocess.run([system, "-version"], capture_output=True, text=True).stdout
    monkeypatch.setenv("VPIPE_FFMPEG", "system")
    out = tmp_path / "out"
    args = ["--start", "1", "--duration", "2", "--count", "2", "-q", "--workers", "1"]
    assert main(["subclip", str(numbered_video), "-o", str(out), *args]) == 0
    versions = json.loads((out / "vpipe.json").read_text())["versions"]
    assert versions["ffmpeg_source"] == "system" and versions["ffmpeg_path"] == system
    assert versions["ffmpeg"] == first.split()[2]  # "ffmpeg version 5.1.6-0+deb12u1 ..."
    clips = [json.loads(ln) for ln in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(c["status"], c["start"]) for c in clips] == [("ok", 1.0), ("ok", 3.0)]


def test_probe_reads_streams_and_timing(numbered_video: Path) -> None:
    info = media.probe(numbered_video)
    assert (info.width, info.height, info.fps) == (160, 120, 25.0)
    assert info.duration_s == pytest.approx(8.0, abs=0.03)
    assert info.n_frames == 200
    assert info.video_codec == "h264" and info.container.startswith("mov,mp4")
    assert info.has_audio and info.audio_codec == "aac"
    assert (info.audio_sample_rate_hz, info.audio_channels) == (44100, 1)


def test_probe_flv_is_a_video(flv_video: Path) -> None:
    info = media.probe(flv_video)
    assert info.container == "flv" and info.video_codec == "flv" and info.has_audio


@pytest.mark.parametrize(
    ("name", "kind", "words"),
    [
        ("empty", MediaError, "empty file"),
        ("cut", MediaError, "truncated or corrupt"),
        ("notes", NotAVideo, "not a video"),
        ("labels", NotAVideo, "not a video"),
        ("poster", NotAVideo, "still image"),
        ("tone", NotAVideo, "no video stream"),
    ],
)
def test_probe_names_the_file_and_the_cause(junk, name, kind, words) -> None:
    with pytest.raises(kind) as e:
        media.probe(junk[name])
    msg = str(e.value)
    assert msg.startswith(str(junk[name])) and words in msg and "\n" not in msg


def test_frame_times_and_keyframes(gop_video: Path) -> None:
    ft = media.frame_times(gop_video)
    np.testing.assert_allclose(ft.times, np.arange(150) / 25, atol=1e-9)
    assert ft.end_s == pytest.approx(6.0)
    assert media.keyframe_times(gop_video) == pytest.approx([0, 1, 2, 3, 4, 5])


def test_find_videos_recursive_without_hidden_records_or_outputs(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    rels = ["x.mp4", "a/y.mkv", "a/b/z.txt", ".hidden.mp4", "a/.tmp/w.mp4", "manifest.jsonl",
            "clips/vpipe.json", "clips/x/x_0.mp4"]  # clips/: a vpipe output under the input
    for rel in rels:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"0")
    found = media.find_videos([tmp_path, tmp_path / "x.mp4"])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a/b/z.txt", "a/y.mkv", "x.mp4"]
    with pytest.raises(UsageError):
        media.find_videos([tmp_path / "missing"])


def test_scan_sources_gives_videos_their_stem_first(tmp_path: Path, numbered_video: Path) -> None:
    shutil.copy(numbered_video, tmp_path / "a.mp4")
    (tmp_path / "a.jpg").write_text("a poster that is not even an image")
    (tmp_path / "sub").mkdir()
    shutil.copy(numbered_video, tmp_path / "sub" / "a.mp4")
    refs = {r.path.relative_to(tmp_path).as_posix(): r for r in media.scan_sources([tmp_path])}
    assert refs["a.mp4"].source_id == "a" and refs["a.mp4"].info is not None
    assert refs["sub/a.mp4"].source_id == "a-2"
    assert refs["a.jpg"].source_id == "a-3" and refs["a.jpg"].problem == "skip"
    with pytest.raises(Skip):
        refs["a.jpg"].raise_problem()
    # Named on the command line, a non-video is a failure, not a skip.
    (explicit,) = media.scan_sources([tmp_path / "a.jpg"])
    assert explicit.problem == "fail"


def test_iter_frames_fps_2_picks_the_frame_on_screen_at_k_over_2(numbered_video: Path) -> None:
    got = list(media.iter_frames(numbered_video, fps=2))
    assert [t for t, _ in got] == [k / 2 for k in range(16)]
    # 25 fps: the frame on screen at t = k/2 is frame floor(12.5 k).
    assert [synth.frame_index(x) for _, x in got] == [int(12.5 * k) for k in range(16)]
    assert got[0][1].shape == (120, 160, 3) and got[0][1].dtype == np.uint8


def test_iter_frames_every_45_keeps_frames_0_45_90(numbered_video: Path) -> None:
    got = list(media.iter_frames(numbered_video, every=45, size=60))
    assert [synth.frame_index(x) for _, x in got] == [0, 45, 90, 135, 180]
    assert [t for t, _ in got] == pytest.approx([0, 1.8, 3.6, 5.4, 7.2])
    assert got[0][1].shape == (60, 80, 3)  # short side 60, 4:3 kept


def test_iter_frames_rejects_bad_sampling(numbered_video: Path) -> None:
    with pytest.raises(UsageError):
        list(media.iter_frames(numbered_video, fps=1, every=2))
    with pytest.raises(UsageError):
        list(media.iter_frames(numbered_video, fps=0))


def test_scaled_size_short_side() -> None:
    assert media.scaled_size(1280, 720, 256) == (455, 256)
    assert media.scaled_size(720, 1280, 256) == (256, 455)
    assert media.scaled_size(160, 120, 0) == (160, 120)
    assert media.scaled_size(176, 144, 256) == (176, 144)  # never scaled up by default
    assert media.scaled_size(176, 144, 144) == (176, 144)
    assert media.scaled_size(176, 144, 256, upscale=True) == (313, 256)


def _audio(path: Path, rate: int = 16000) -> np.ndarray:
    chunks = [d for _, _, d in media.decode(path, sampler=None, audio_rate_hz=rate)]
    return np.concatenate(chunks)


def _beeps(x: np.ndarray, rate: int) -> list[float]:
    """Start times of the beeps: loud samples after more than 50 ms of quiet."""
    loud = np.flatnonzero(np.abs(x.astype(np.int32)) > 2000)
    gaps = np.flatnonzero(np.diff(loud) > rate // 20) + 1
    return [loud[i] / rate for i in [0, *gaps]] if len(loud) else []


def test_decode_audio_length_and_beeps(numbered_video: Path) -> None:
    x = _audio(numbered_video)
    assert x.dtype == np.int16 and len(x) == 8 * 16000
    assert _beeps(x, 16000) == pytest.approx([1.0, 5.0], abs=0.002)


def test_decode_flv_audio_is_aligned_with_the_video(flv_video: Path) -> None:
    # The flv's video starts 25 ms after its audio: sample 0 is the first frame's time.
    x = _audio(flv_video, 8000)
    assert _beeps(x, 8000) == pytest.approx([1.0], abs=0.003)


def test_decoding_a_truncated_flv_fails_clearly(media_dir: Path, flv_video: Path) -> None:
    cut = synth.make_truncated(flv_video, media_dir / "cut.flv", keep=0.4)
    with pytest.raises(MediaError, match="truncated"):
        list(media.iter_frames(cut, fps=1))


@pytest.mark.parametrize("kind", ["ts", "h264"])
def test_sampling_is_the_same_for_mpegts_and_raw_h264(kind, numbered_video, media_dir) -> None:
    # .ts: timestamps start at 1.4 s (counted from the first frame); raw .h264: no timestamps
    # at all (frames are counted in decoding order).
    out = media_dir / f"numbered.{kind}"
    extra = ["-c", "copy"] if kind == "ts" else ["-an", "-c:v", "copy", "-bsf:v",
                                                  "h264_mp4toannexb"]
    subprocess.run([media.ffmpeg_exe(), "-y", "-v", "error", "-i", str(numbered_video), *extra,
                    str(out)], check=True)
    got = list(media.iter_frames(out, fps=2))
    assert [t for t, _ in got] == [k / 2 for k in range(16)]
    assert [synth.frame_index(x) for _, x in got] == [int(12.5 * k) for k in range(16)]
    got = list(media.iter_frames(out, every=45))
    assert [synth.frame_index(x) for _, x in got] == [0, 45, 90, 135, 180]


def test_fps_above_the_frame_rate_repeats_frames(numbered_video: Path) -> None:
    got = list(media.iter_frames(numbered_video, fps=50, size=24))
    assert len(got) == 400 and [t for t, _ in got[:3]] == [0.0, 0.02, 0.04]
    assert [synth.frame_index(x) for _, x in got] == [k // 2 for k in range(400)]
    assert got[0][1] is not got[1][1]  # repeats are copies, safe to modify


def test_an_input_folder_without_files_is_a_usage_error(tmp_path: Path, capsys) -> None:
    # Regression: `vpipe subclip empty/` reported "0 videos done" and exited 0.
    from pipeline.cli import main

    (tmp_path / "empty" / ".hidden").mkdir(parents=True)
    for stage in ("subclip", "extract-frames", "extract-audio"):
        assert main([stage, str(tmp_path / "empty"), "-o", str(tmp_path / stage), "-q"]) == 2
        err = capsys.readouterr().err
        assert err == f"vpipe: error: {tmp_path / 'empty'}: no files in this folder\n"
        assert not (tmp_path / stage).exists()


@pytest.mark.parametrize("pts, fps", [
    # 25 fps with one frame missing at 4 s: 249 frames in 10 s average 24.9, within 1% of the
    # stream's own 25 (clips of one such source used to report 24.95, 24.951, 25...).
    (r"if(gte(N\,100)\,N+1\,N)/25/TB", 25.0),
    # Truly variable: 25 fps for 2 s, then 5 fps: the average over the frames is the rate.
    (r"if(lt(N\,50)\,N/25\,2+(N-50)/5)/TB", None),
])
def test_a_streams_rate_is_its_own_unless_its_frames_say_otherwise(tmp_path: Path, pts: str,
                                                                    fps: float | None) -> None:
    out = tmp_path / "v.mp4"
    subprocess.run([media.ffmpeg_exe(), "-y", "-v", "error", "-f", "lavfi", "-i",
                    "testsrc=size=64x48:rate=25:duration=10", "-vf", f"setpts={pts}",
                    "-fps_mode", "passthrough", "-c:v", "libx264", "-pix_fmt", "yuv420p",
                    str(out)], check=True)
    info = media.probe(out)
    import av

    with av.open(str(out)) as c:
        average = float(c.streams.video[0].average_rate)
    if fps is not None:
        assert average != fps and abs(average / fps - 1) <= 0.01
        assert info.fps == fps
    else:
        assert info.fps == pytest.approx(average) and info.fps < 20
