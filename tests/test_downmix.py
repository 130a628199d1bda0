"""The mono PCM vpipe decodes is ffmpeg's standard ``-ac 1`` downmix whatever the channel layout,
so a 5.1 soundtrack and its own stereo fold-down come out at the same level."""

from __future__ import annotations

import json
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest

from pipeline import media
from pipeline.cli import main

RATE_HZ = 16000
SOURCE_RATE_HZ = 48000
# 48 AAC frames of 1024 samples exactly: the last frame has no padding past the stream's end,
# so vpipe (PyAV) and the ffmpeg binary feed the resampler the same samples up to the very last.
N_SOURCE = 48 * 1024
N = N_SOURCE * RATE_HZ // SOURCE_RATE_HZ  # 16384 output samples: 0.9765625 Hz per FFT bin
AMPLITUDE = 0.2  # per channel: the 7.1 downmix peaks at 0.2 * 4.41 = 0.88, under full scale

CHANNELS = {
    "mono": ["FC"],
    "stereo": ["FL", "FR"],
    "5.1": ["FL", "FR", "FC", "LFE", "BL", "BR"],
    "7.1": ["FL", "FR", "FC", "LFE", "BL", "BR", "SL", "SR"],
}
# What libswresample's default matrix (center and surround mix levels -3 dB, LFE mix level 0)
# gives each channel for a mono output, before any normalisation: fronts at -3 dB, the centre
# at 0 dB, surrounds at -6 dB, LFE dropped. A mono source passes through unchanged.
WEIGHT = {"FL": 2**-0.5, "FR": 2**-0.5, "FC": 1.0, "LFE": 0.0,
          "BL": 0.5, "BR": 0.5, "SL": 0.5, "SR": 0.5}


def tone_hz(i: int, name: str) -> float:
    """Channel i's tone: a whole number of periods in the clip (an exact FFT bin at 16 kHz),
    a different one per channel; the LFE's low enough for AAC's LFE channel to carry it."""
    return 62.5 if name == "LFE" else 250.0 * (i + 1)


def soundtrack(path: Path, layout: str, exprs: list[str], bitrate: str = "768k") -> Path:
    """A 1.024 s clip (small grey video) whose audio has ``layout`` and channel i = exprs[i]."""
    expr = "|".join(exprs)
    cmd = [media.ffmpeg_exe(), "-y", "-v", "error",
           "-f", "lavfi", "-i", "color=c=gray:s=64x48:r=25:d=1.04",
           "-f", "lavfi", "-i",
           f"aevalsrc=exprs='{expr}':c={layout}:s={SOURCE_RATE_HZ},atrim=end_sample={N_SOURCE}",
           "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
           "-c:a", "aac", "-b:a", bitrate, str(path)]
    subprocess.run(cmd, check=True)
    return path


def tones(path: Path, layout: str) -> Path:
    names = CHANNELS[layout]
    exprs = [f"{AMPLITUDE}*sin(2*PI*{tone_hz(i, c)}*t)" for i, c in enumerate(names)]
    return soundtrack(path, layout, exprs)


def vpipe_mono(path: Path) -> np.ndarray:
    chunks = [x for kind, _, x in media.decode(path, sampler=None, audio_rate_hz=RATE_HZ)
              if kind == "audio"]
    return np.concatenate(chunks)


def ffmpeg_float(path: Path, *args: str) -> np.ndarray:
    """The ffmpeg binary's own decode of ``path`` to 16 kHz float (``args``: -ac 1, -af ...)."""
    cmd = [media.ffmpeg_exe(), "-v", "error", "-i", str(path), *args, "-ar", str(RATE_HZ),
           "-f", "f32le", "-"]
    return np.frombuffer(subprocess.run(cmd, capture_output=True, check=True).stdout, np.float32)


def ffmpeg_ac1(path: Path) -> np.ndarray:
    """``ffmpeg -ac 1`` in float (its level the same for every layout: for an integer output
    libswresample would scale the matrix down by the number of channels), put in s16 as
    libswresample does: rounded to nearest, saturated at full scale."""
    x = ffmpeg_float(path, "-ac", "1").astype(np.float64)
    return np.clip(np.rint(x * 32768), -32768, 32767).astype(np.int16)


def amplitude_at(x: np.ndarray, hz: float) -> float:
    """Amplitude (full scale 1) of the ``hz`` component of a clip holding whole periods of it."""
    spectrum = np.fft.rfft(x.astype(np.float64) / 32768)
    return float(2 * abs(spectrum[round(hz * len(x) / RATE_HZ)]) / len(x))


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean((x.astype(np.float64) / 32768) ** 2)))


@pytest.mark.parametrize("layout", list(CHANNELS))
def test_mono_is_ffmpegs_ac1_downmix(layout: str, tmp_path: Path) -> None:
    # vpipe's decoder is PyAV's libavcodec/libswresample, the reference the ffmpeg binary's
    # own (another build, possibly another version): float results that differ in the last
    # bit can round to s16 one step apart, never more.
    src = tones(tmp_path / f"{layout}.mp4", layout)
    got, want = vpipe_mono(src), ffmpeg_ac1(src)
    assert got.dtype == np.int16 and len(got) == len(want) == N
    assert int(np.abs(got.astype(np.int32) - want).max()) <= 1


@pytest.mark.parametrize("layout", list(CHANNELS))
def test_each_channel_has_the_standard_downmix_weight(layout: str, tmp_path: Path) -> None:
    src = tones(tmp_path / f"{layout}.mp4", layout)
    x = vpipe_mono(src)
    for i, name in enumerate(CHANNELS[layout]):
        got = amplitude_at(x, tone_hz(i, name))
        assert got == pytest.approx(WEIGHT[name] * AMPLITUDE, abs=0.001), name
    if "LFE" in CHANNELS[layout]:
        # The LFE tone is in the file (so its zero weight is the downmix's, not the encoder's).
        lfe = ffmpeg_float(src, "-af", "pan=mono|c0=LFE")
        assert amplitude_at(np.rint(lfe * 32768), 62.5) == pytest.approx(AMPLITUDE, abs=0.001)


def test_51_and_its_stereo_fold_down_extract_at_the_same_level(tmp_path: Path) -> None:
    # The case: a corpus mixing 5.1 trailers and stereo ones. The fold-down is ffmpeg's
    # (-ac 2, the same standard matrix), so both hold the same mono mix: same wav level
    # (s16 matrix normalisation made the 5.1 one 2.4x quieter).
    surround = tones(tmp_path / "surround.mp4", "5.1")
    fold = tmp_path / "fold.mp4"
    subprocess.run([media.ffmpeg_exe(), "-y", "-v", "error", "-i", str(surround),
                    "-c:v", "copy", "-ac", "2", "-c:a", "aac", "-b:a", "256k", str(fold)],
                   check=True)
    out = tmp_path / "audio"
    assert main(["extract-audio", str(surround), str(fold), "-o", str(out), "-q"]) == 0
    lines = (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    level = {}
    for rec in map(json.loads, lines):
        with wave.open(str(out / rec["audio"])) as w:
            assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, RATE_HZ)
            level[rec["id"]] = rms(np.frombuffer(w.readframes(w.getnframes()), np.int16))
    # Each channel's tone at its weight: sqrt(sum of (w * a)^2 / 2) = 0.0926 for the 5.1.
    derived = AMPLITUDE * np.sqrt(sum(WEIGHT[c] ** 2 for c in CHANNELS["5.1"]) / 2)
    assert level["surround"] == pytest.approx(derived, rel=0.01)
    assert level["fold"] / level["surround"] == pytest.approx(1.0, abs=0.01)


def test_a_downmix_past_full_scale_saturates(tmp_path: Path) -> None:
    # Loud, identical stereo channels: 0.9 on each is 0.9 * 2 * 0.707 = 1.27 in mono, past
    # full scale. The s16 samples stop at the rails, as ffmpeg's do; none wraps around.
    src = soundtrack(tmp_path / "loud.mp4", "stereo", ["0.9*sin(2*PI*500*t)"] * 2)
    got, want = vpipe_mono(src), ffmpeg_ac1(src)
    assert (int(got.max()), int(got.min())) == (32767, -32768)
    assert int(np.abs(got.astype(np.int32) - want).max()) <= 1
