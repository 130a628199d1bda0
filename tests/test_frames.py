"""vpipe extract-frames / extract-audio: exact frame sampling, audio, the manifest contract."""

from __future__ import annotations

import json
import wave
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import synth
from PIL import Image

from pipeline import media
from pipeline.cli import main
from pipeline.errors import UsageError
from pipeline.frames import FrameOptions

CONTRACT = {
    "id", "status", "error", "item", "source", "start", "end", "n_frames", "timestamps",
    "frames_dir", "frame_format", "has_audio", "audio", "sample_rate", "n_samples",
}


def make_vfr_video(path: Path, times: list[float], size=(160, 120)) -> Path:
    """A frame-numbered video whose frame i is shown from ``times[i]`` (variable rate)."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = size[0], size[1], "yuv420p"
        s.time_base = s.codec_context.time_base = Fraction(1, 1000)
        s.options = {"crf": "18", "preset": "veryfast"}
        for i, t in enumerate(times):
            f = av.VideoFrame.from_ndarray(synth.numbered_frame(i, size), format="rgb24")
            f.pts, f.time_base = round(t * 1000), Fraction(1, 1000)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def manifest(out: Path) -> dict[str, dict]:
    lines = (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    return {r["id"]: r for r in map(json.loads, lines)}


def frame_indices(out: Path, rec: dict) -> list[int]:
    files = sorted((out / rec["frames_dir"]).iterdir())
    assert [f.name for f in files] == [
        f"{i:06d}.{rec['frame_format']}" for i in range(rec["n_frames"])
    ]
    return [synth.frame_index(np.asarray(Image.open(f).convert("RGB"))) for f in files]


def wav_samples(path: Path) -> tuple[np.ndarray, int, int, int]:
    with wave.open(str(path)) as w:
        x = np.frombuffer(w.readframes(w.getnframes()), np.int16)
        return x, w.getframerate(), w.getnchannels(), w.getsampwidth()


def beep_onsets(x: np.ndarray, rate: int) -> list[float]:
    """Start times of the beeps: loud samples after more than 50 ms of quiet."""
    loud = np.flatnonzero(np.abs(x.astype(np.int32)) > 2000)
    gaps = np.flatnonzero(np.diff(loud) > rate // 20) + 1
    return [loud[i] / rate for i in [0, *gaps]] if len(loud) else []


def test_fps_2_frames_are_those_at_k_over_2(numbered_video: Path, tmp_path: Path) -> None:
    out = tmp_path / "media"
    code = main(["extract-frames", str(numbered_video), "-o", str(out), "--fps", "2",
                 "--size", "0", "--workers", "1", "-q"])
    assert code == 0
    rec = manifest(out)["numbered"]
    assert CONTRACT <= set(rec)
    assert rec["timestamps"] == [k / 2 for k in range(16)]
    assert frame_indices(out, rec) == [int(k * 25 / 2) for k in range(16)]
    assert Image.open(out / "numbered/frames/000000.jpg").size == (160, 120)
    assert (rec["source"], rec["start"], rec["end"]) == ("numbered", 0.0, 8.0)
    assert (rec["frames_dir"], rec["frame_format"]) == ("numbered/frames", "jpg")


def test_every_45_keeps_frames_0_45_90(numbered_video: Path, tmp_path: Path) -> None:
    out = tmp_path / "media"
    assert main(["extract-frames", str(numbered_video), "-o", str(out), "--every", "45",
                 "--size", "60", "--format", "png", "--no-audio", "-q"]) == 0
    rec = manifest(out)["numbered"]
    assert frame_indices(out, rec) == [0, 45, 90, 135, 180]
    assert rec["timestamps"] == pytest.approx([0, 1.8, 3.6, 5.4, 7.2])
    assert Image.open(out / "numbered/frames/000000.png").size == (80, 60)
    assert rec["has_audio"] is False and rec["audio"] is None and rec["n_samples"] == 0
    assert not (out / "numbered" / "audio.wav").exists()


def test_small_videos_are_not_scaled_up_unless_asked(numbered_video: Path, tmp_path: Path):
    """160x120 at the default --size 256 stays 160x120; --upscale makes it 341x256."""
    for extra, size in (([], (160, 120)), (["--upscale"], (341, 256))):
        out = tmp_path / f"media{len(extra)}"
        assert main(["extract-frames", str(numbered_video), "-o", str(out), "--fps", "1",
                     "--no-audio", "-q", *extra]) == 0
        assert Image.open(out / "numbered/frames/000000.jpg").size == size
        params = json.loads((out / "vpipe.json").read_text())["params"]
        assert params["size"] == 256 and params["upscale"] == bool(extra)


def test_audio_wav_has_the_expected_length_and_beeps(numbered_video: Path, tmp_path: Path):
    out = tmp_path / "media"
    main(["extract-frames", str(numbered_video), "-o", str(out), "--fps", "1", "-q"])
    rec = manifest(out)["numbered"]
    assert rec["has_audio"] and rec["audio"] == "numbered/audio.wav"
    assert (rec["sample_rate"], rec["n_samples"]) == (16000, 8 * 16000)
    x, rate, channels, width = wav_samples(out / rec["audio"])
    assert (len(x), rate, channels, width) == (8 * 16000, 16000, 1, 2)
    assert beep_onsets(x, 16000) == pytest.approx([1.0, 5.0], abs=0.002)


def test_sample_rate_option(numbered_video: Path, tmp_path: Path) -> None:
    out = tmp_path / "a"
    assert main(["extract-audio", str(numbered_video), "-o", str(out), "--sample-rate",
                 "8000", "-q"]) == 0
    rec = manifest(out)["numbered"]
    assert CONTRACT <= set(rec)
    assert (rec["n_frames"], rec["timestamps"], rec["n_samples"]) == (0, [], 8 * 8000)
    assert rec["frames_dir"] == "numbered/frames" and rec["frame_format"] is None
    assert list((out / "numbered" / "frames").iterdir()) == []  # same layout, no frames
    assert wav_samples(out / rec["audio"])[1] == 8000


def test_from_a_subclip_folder_keeps_source_and_times(numbered_video: Path, tmp_path: Path):
    clips = tmp_path / "clips"
    assert main(["subclip", str(numbered_video), "-o", str(clips), "--count", "2",
                 "--duration", "3", "--start", "1", "-q"]) == 0
    out = tmp_path / "media"
    assert main(["extract-frames", str(clips), "-o", str(out), "--fps", "2", "-q"]) == 0
    recs = manifest(out)
    assert list(recs) == ["numbered_0", "numbered_1"]
    for k, rec in enumerate(recs.values()):
        start = 1 + 3 * k
        assert (rec["source"], rec["start"], rec["end"]) == ("numbered", start, start + 3)
        assert rec["timestamps"] == [i / 2 for i in range(6)]
        # frame on screen at t seconds into the clip = source frame 25 * (start + t)
        assert frame_indices(out, rec) == [int(25 * (start + i / 2)) for i in range(6)]
        assert rec["n_samples"] == pytest.approx(3 * 16000, abs=16)


def test_variable_frame_rate_uses_the_stream_timestamps(tmp_path: Path) -> None:
    times = [i * 0.1 for i in range(20)] + [2 + i / 30 for i in range(60)]  # 10 fps, 30 fps
    vfr = make_vfr_video(tmp_path / "vfr.mp4", times)
    got = list(media.iter_frames(vfr, fps=4))
    ticks = [k / 4 for k in range(16)]
    assert [t for t, _ in got] == ticks
    on_screen = [max(i for i, t0 in enumerate(times) if t0 <= t + 1e-9) for t in ticks]
    assert [synth.frame_index(x) for _, x in got] == on_screen


def test_no_audio_clip_is_not_an_error(tmp_path: Path) -> None:
    src = synth.make_video(tmp_path / "silent.mp4", duration_s=2.0, audio=False)
    out = tmp_path / "m"
    assert main(["extract-frames", str(src), "-o", str(out), "-q"]) == 0
    rec = manifest(out)["silent"]
    assert rec["status"] == "ok" and rec["n_frames"] == 2
    assert (rec["has_audio"], rec["audio"], rec["n_samples"]) == (False, None, 0)


def test_bad_inputs_fail_with_one_line_each(numbered_video: Path, tmp_path: Path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    synth.make_truncated(numbered_video, d / "cut.mp4")
    (d / "notes.txt").write_text("hello")
    (d / "zero.mkv").write_bytes(b"")
    out = tmp_path / "m"
    assert main(["extract-frames", str(d), "-o", str(out), "--workers", "2"]) == 1
    recs = manifest(out)
    assert {k: r["status"] for k, r in recs.items()} == {
        "cut": "failed", "notes": "skipped", "zero": "failed"
    }
    err = capsys.readouterr().err.splitlines()
    assert sum("cut.mp4: truncated or corrupt" in ln for ln in err) == 1
    assert sum("zero.mkv: empty file" in ln for ln in err) == 1


def test_options_are_checked(numbered_video: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "m")
    assert main(["extract-frames", str(numbered_video), "-o", out, "--fps", "1",
                 "--every", "2"]) == 2
    assert main(["extract-frames", str(numbered_video), "-o", out, "--format", "gif"]) == 2
    assert main(["extract-frames", str(numbered_video), "-o", out, "--quality", "0"]) == 2
    with pytest.raises(UsageError):
        FrameOptions(fps=None, every=None)


def test_a_frames_folder_is_not_taken_for_videos(numbered_video: Path, tmp_path: Path, capsys):
    out = tmp_path / "m"
    assert main(["extract-frames", str(numbered_video), "-o", str(out), "-q"]) == 0
    assert main(["extract-frames", str(out), "-o", str(tmp_path / "m2"), "-q"]) == 2
    assert "this is the output of `vpipe extract-frames`" in capsys.readouterr().err


def _remux(src: Path, dst: Path, *args: str) -> Path:
    import subprocess

    cmd = [media.ffmpeg_exe(), "-y", "-v", "error", *args, "-i", str(src)]
    subprocess.run([*cmd, "-c", "copy", str(dst)], check=True)
    return dst


def test_rotated_video_frames_come_out_upright(tmp_path: Path) -> None:
    # A phone video: 160x120 frames stored sideways with a 90° display rotation.
    flat = synth.make_video(tmp_path / "flat.mp4", duration_s=1.0, audio=False)
    rot = _remux(flat, tmp_path / "portrait.mp4", "-display_rotation", "90")
    assert main(["extract-frames", str(rot), "-o", str(tmp_path / "o"), "--fps", "1",
                 "--size", "0", "--format", "png", "--quiet"]) == 0
    got = np.asarray(Image.open(tmp_path / "o/portrait/frames/000000.png"))
    assert got.shape == (160, 120, 3)  # upright: taller than wide
    ref = next(av.open(str(flat)).decode(video=0)).to_ndarray(format="rgb24")
    assert np.array_equal(got, np.rot90(ref, 1))  # 90° counter-clockwise, as players show it
    assert synth.frame_index(np.rot90(got, -1)) == 0


@pytest.mark.parametrize("audio_s", [6.0, 1.0])
def test_audio_longer_or_shorter_than_video_is_not_truncation(
    tmp_path: Path, audio_s: float
) -> None:
    # Soundtracks that end apart from the picture used to fail as "truncated" (the container's
    # duration, the longer stream, was compared with the other stream's data).
    vid = synth.make_video(tmp_path / "v.mp4", duration_s=3.0, audio=False)
    src = synth.with_soundtrack(vid, tmp_path / "mixed.mp4", audio_s, rate=16000)
    assert main(["extract-frames", str(src), "-o", str(tmp_path / "f"), "--fps", "1",
                 "--quiet"]) == 0
    assert main(["extract-audio", str(src), "-o", str(tmp_path / "a"), "--quiet"]) == 0
    (rf,) = [json.loads(x) for x in (tmp_path / "f/manifest.jsonl").read_text().splitlines()]
    (ra,) = [json.loads(x) for x in (tmp_path / "a/manifest.jsonl").read_text().splitlines()]
    assert rf["status"] == ra["status"] == "ok"
    assert rf["timestamps"] == [0.0, 1.0, 2.0]
    assert (rf["start"], rf["end"]) == (ra["start"], ra["end"]) == (0.0, 3.0)
    # The audio is the stream's own length (aac priming trimmed) up to the picture's end:
    # a longer soundtrack is cut there, as subclip cuts a clip's (issue 11, item 6).
    assert rf["n_samples"] == ra["n_samples"]
    if audio_s > 3.0:
        assert ra["n_samples"] == 3 * 16000
    else:
        assert abs(ra["n_samples"] - audio_s * 16000) <= 1024


def test_mpegts_audio_is_not_cut_to_the_guessed_stream_duration(tmp_path: Path) -> None:
    # A .ts declares no durations: ffmpeg guesses them from the last packets' times, and an
    # audio packet holds many frames, so the wav lost its last ~0.3 s (3.72 s of 4.02 s).
    vid = synth.make_video(tmp_path / "v.mp4", duration_s=4.0, beeps_at=(1.0, 3.0))
    src = _remux(vid, tmp_path / "cam.ts")
    with av.open(str(src)) as c:
        a, v = c.streams.audio[0], c.streams.video[0]
        decoded_s = sum(f.samples for f in c.decode(audio=0)) / a.sample_rate
        lead_s = float((v.start_time - a.start_time) * a.time_base)  # audio before the video
    assert decoded_s - float(a.duration * a.time_base) > 0.2  # the guess is short
    assert main(["extract-audio", str(src), "-o", str(tmp_path / "a"), "--quiet"]) == 0
    rec = manifest(tmp_path / "a")["cam"]
    # The clip is the picture's span in the container (its audio leads by lead_s), and the
    # wav runs to its end: the audio decoded after the first frame, cut at the last frame's end.
    video_end = media.frame_times(src).end_s
    assert (rec["start"], rec["end"]) == (round(lead_s, 6), round(video_end, 6))
    assert rec["n_samples"] == round((rec["end"] - rec["start"]) * 16000)
    assert rec["n_samples"] <= round((decoded_s - lead_s) * 16000) + 2
    x, *_ = wav_samples(tmp_path / "a" / rec["audio"])
    assert beep_onsets(x, 16000) == pytest.approx([1.0, 3.0], abs=0.002)


def test_a_whole_video_without_a_declared_duration_records_its_true_end(tmp_path: Path) -> None:
    # Regression: a webm written live (no duration in its header) was recorded with end 0.0.
    import subprocess

    src = synth.make_video(tmp_path / "v.mp4", duration_s=2.0, audio=False)
    raw = tmp_path / "live.webm"
    subprocess.run([media.ffmpeg_exe(), "-y", "-v", "error", "-i", str(src), "-c:v", "libvpx",
                    "-deadline", "realtime", "-live", "1", str(raw)], check=True)
    assert media.probe(raw).duration_s == 0.0
    assert main(["extract-frames", str(raw), "-o", str(tmp_path / "f"), "--fps", "1",
                 "--quiet"]) == 0
    (rec,) = [json.loads(x) for x in (tmp_path / "f/manifest.jsonl").read_text().splitlines()]
    assert rec["status"] == "ok" and rec["start"] == 0.0
    assert rec["end"] == pytest.approx(2.0, abs=0.05)
    assert rec["timestamps"] == [0.0, 1.0]


# --------------------------------------------------------------------------- the wav ends with it


def test_a_soundtrack_longer_than_the_picture_is_cut_at_the_recorded_end(tmp_path: Path) -> None:
    # 5 s of video with 30 s of audio: the record said end 5.0 and the wav held 30 s (issue 11,
    # item 6). A real process, as a user runs it.
    import subprocess
    import sys

    vid = synth.make_video(tmp_path / "v.mp4", duration_s=5.0, audio=False)
    src = synth.with_soundtrack(vid, tmp_path / "long.mp4", 30)
    assert media.probe(src).duration_s > 29.9
    for stage, out in (("extract-frames", tmp_path / "f"), ("extract-audio", tmp_path / "a")):
        subprocess.run([sys.executable, "-m", "pipeline", stage, str(src), "-o", str(out), "-q"],
                       check=True)
        rec = manifest(out)["long"]
        assert (rec["status"], rec["start"], rec["end"]) == ("ok", 0.0, 5.0)
        assert rec["n_samples"] == round((rec["end"] - rec["start"]) * 16000) == 80000
        x, *_ = wav_samples(out / rec["audio"])
        assert len(x) == rec["n_samples"]
        assert np.abs(x[-160:].astype(int)).max() > 1000  # the tone runs to the end


def test_a_whole_video_whose_picture_starts_after_its_sound(numbered_video: Path, tmp_path: Path):
    # The same streams with the video delayed 0.2 s: the clip is the picture's span, 0.2..8.2 s
    # of the container, and the wav is its sound, from the first frame on (the 8 s of sound
    # end 0.2 s before the picture does: nothing is made up after that).
    import subprocess

    src = tmp_path / "late.mp4"
    subprocess.run([media.ffmpeg_exe(), "-v", "error", "-itsoffset", "0.2", "-i",
                    str(numbered_video), "-i", str(numbered_video), "-map", "0:v", "-map", "1:a",
                    "-c", "copy", str(src)], check=True)
    assert main(["extract-frames", str(src), "-o", str(tmp_path / "f"), "--fps", "1",
                 "-q"]) == 0
    rec = manifest(tmp_path / "f")["late"]
    assert (rec["start"], rec["end"]) == (pytest.approx(0.2), pytest.approx(8.2))
    assert rec["n_samples"] == round((8.0 - rec["start"]) * 16000)
    assert frame_indices(tmp_path / "f", rec) == [25 * i for i in range(8)]
    x, *_ = wav_samples(tmp_path / "f" / rec["audio"])
    # beeps at 1.0 and 5.0 s of the sound = 0.8 and 4.8 s after the first frame
    assert beep_onsets(x, 16000) == pytest.approx([0.8, 4.8], abs=0.002)


def test_keyframe_clips_audio_is_cut_to_the_clip(media_dir: Path, tmp_path: Path) -> None:
    # A stream copy keeps whole AAC frames: keyframe clip 0 of [0, 2) s held 2.020 s of sound.
    src = synth.make_video(media_dir / "kf-ultrafast.mp4", duration_s=6.0, gop=25,
                           extra=["-sc_threshold", "0", "-preset", "ultrafast"])
    clips = tmp_path / "clips"
    assert main(["subclip", str(src), "-o", str(clips), "--mode", "keyframe", "--count", "2",
                 "--duration", "2", "--start", "0", "-q"]) == 0
    raw = [sum(len(d) for _, _, d in media.decode(clips / "kf-ultrafast" / f"kf-ultrafast_{k}.mp4",
                                                  sampler=None, audio_rate_hz=16000))
           for k in range(2)]
    assert raw[0] > 2 * 16000  # what the copy holds: past the clip's end
    assert main(["extract-audio", str(clips), "-o", str(tmp_path / "a"), "-q"]) == 0
    for k, rec in enumerate(manifest(tmp_path / "a").values()):
        assert (rec["start"], rec["end"]) == (2.0 * k, 2.0 * k + 2)
        assert rec["n_samples"] == min(raw[k], round((rec["end"] - rec["start"]) * 16000))
        assert len(wav_samples(tmp_path / "a" / rec["audio"])[0]) == rec["n_samples"]


def test_every_over_mixed_frame_rates_is_said(tmp_path: Path, capsys) -> None:
    """--every N is N / fps seconds: 2 s apart at 25 fps (every 50), 1.67 s at 30 fps."""
    src = tmp_path / "src"
    synth.make_video(src / "pal.mp4", duration_s=2.0, fps=25, size=(64, 48), audio=False)
    synth.make_video(src / "ntsc.mp4", duration_s=2.0, fps=30, size=(64, 48), audio=False)
    assert main(["extract-frames", str(src), "-o", str(tmp_path / "e"), "--every", "50",
                 "--no-audio", "-q"]) == 0
    err = capsys.readouterr().err
    assert "warning: --every 50 counts frames, and these clips have 2 frame rates" in err
    assert "1.67 s at 30 fps (1 clip)" in err and "2.00 s at 25 fps (1 clip)" in err
    rates = sorted(r["fps"] for r in map(json.loads, (tmp_path / "e" / "manifest.jsonl")
                                         .read_text().splitlines()))
    assert rates == [25.0, 30.0]
    # Sampling by time, or one frame rate: nothing to say.
    assert main(["extract-frames", str(src), "-o", str(tmp_path / "f"), "--fps", "1",
                 "--no-audio", "-q"]) == 0
    assert main(["extract-frames", str(src / "pal.mp4"), "-o", str(tmp_path / "g"),
                 "--every", "50", "--no-audio", "-q"]) == 0
    assert "warning" not in capsys.readouterr().err
