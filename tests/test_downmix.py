"""The mono PCM vpipe decodes: a stereo track's channel mean (VGGish's own input convention), any
other layout's standard stereo fold-down (``ffmpeg -ac 2``) averaged the same way, so a 5.1
soundtrack and its own stereo fold-down come out at the same level; a mono track unchanged. Every
path that makes mono audio (decode, decode_span, extract-frames, extract-audio, features
--from-video) gives the same samples."""

from __future__ import annotations

import json
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest
from test_features import args as features_args
from test_features import reference_audio

from pipeline import media
from pipeline.cli import main
from pipeline.records import read_manifest
from pipeline.shards import open_features

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
# libswresample's default stereo fold-down (center and surround mix levels -3 dB, LFE mix
# level 0, no normalisation in float) puts FL in L and FR in R at 1, the centre in both at
# -3 dB, each surround in its side at -3 dB, and drops the LFE. The mean of L and R: fronts
# at 1/2, the centre at 0.707 (it is in both), surrounds at 0.354, LFE 0. A mono source
# passes through unchanged.
MEAN_WEIGHT = {"FL": 0.5, "FR": 0.5, "FC": 2**-0.5, "LFE": 0.0,
               "BL": 2**-1.5, "BR": 2**-1.5, "SL": 2**-1.5, "SR": 2**-1.5}


def weight(layout: str, name: str) -> float:
    """Channel ``name``'s weight in the mono vpipe makes of ``layout``."""
    return 1.0 if layout == "mono" else MEAN_WEIGHT[name]


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


def ffmpeg_fold_mean(path: Path, layout: str) -> np.ndarray:
    """The mean of ``ffmpeg -ac 2``'s two channels in float (for an integer output
    libswresample would scale its matrix down by the number of channels), a mono source as it
    is, put in s16 as libswresample does: rounded to nearest, saturated at full scale."""
    if layout == "mono":
        x = ffmpeg_float(path, "-ac", "1").astype(np.float64)
    else:
        x = ffmpeg_float(path, "-ac", "2").astype(np.float64).reshape(-1, 2).mean(axis=1)
    return np.clip(np.rint(x * 32768), -32768, 32767).astype(np.int16)


def amplitude_at(x: np.ndarray, hz: float) -> float:
    """Amplitude (full scale 1) of the ``hz`` component of a clip holding whole periods of it."""
    spectrum = np.fft.rfft(x.astype(np.float64) / 32768)
    return float(2 * abs(spectrum[round(hz * len(x) / RATE_HZ)]) / len(x))


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean((x.astype(np.float64) / 32768) ** 2)))


@pytest.mark.parametrize("layout", list(CHANNELS))
def test_mono_is_the_mean_of_ffmpegs_stereo_fold_down(layout: str, tmp_path: Path) -> None:
    # vpipe's decoder is PyAV's libavcodec/libswresample, the reference the ffmpeg binary's
    # own (another build, possibly another version): float results that differ in the last
    # bit can round to s16 one step apart, never more.
    src = tones(tmp_path / f"{layout}.mp4", layout)
    got, want = vpipe_mono(src), ffmpeg_fold_mean(src, layout)
    assert got.dtype == np.int16 and len(got) == len(want) == N
    assert int(np.abs(got.astype(np.int32) - want).max()) <= 1


@pytest.mark.parametrize("layout", list(CHANNELS))
def test_each_channel_has_the_standard_downmix_weight(layout: str, tmp_path: Path) -> None:
    src = tones(tmp_path / f"{layout}.mp4", layout)
    x = vpipe_mono(src)
    for i, name in enumerate(CHANNELS[layout]):
        got = amplitude_at(x, tone_hz(i, name))
        assert got == pytest.approx(weight(layout, name) * AMPLITUDE, abs=0.001), name
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
    # Each channel's tone at its weight: sqrt(sum of (w * a)^2 / 2) = 0.158 for the 5.1.
    derived = AMPLITUDE * np.sqrt(sum(weight("5.1", c) ** 2 for c in CHANNELS["5.1"]) / 2)
    assert level["surround"] == pytest.approx(derived, rel=0.01)
    assert level["fold"] / level["surround"] == pytest.approx(1.0, abs=0.01)


def test_a_downmix_past_full_scale_saturates(tmp_path: Path) -> None:
    # Loud, identical 5.1 channels: 0.9 on each is 0.9 * (0.5 * 2 + 0.707 + 0.354 * 2) = 2.17
    # in mono, past full scale. The s16 samples stop at the rails; none wraps around.
    src = soundtrack(tmp_path / "loud.mp4", "5.1", ["0.9*sin(2*PI*500*t)"] * 6)
    got, want = vpipe_mono(src), ffmpeg_fold_mean(src, "5.1")
    assert (int(got.max()), int(got.min())) == (32767, -32768)
    assert int(np.abs(got.astype(np.int32) - want).max()) <= 1


# ------------------------------------------------------------------ stereo: the channel mean
STEREO_S = 4.0
# Left and right: other tones at other levels, so a mix that favours one side shows.
LEFT, RIGHT = (0.3, 440.0), (0.1, 1000.0)


@pytest.fixture(scope="module")
def stereo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray]:
    """A 4 s video whose soundtrack is 16 kHz s16 stereo PCM (lossless, at the rate vpipe
    extracts: no resampling), with the stereo wav it was muxed from and its samples (n, 2)."""
    d = tmp_path_factory.mktemp("stereo")
    t = np.arange(round(STEREO_S * RATE_HZ)) / RATE_HZ
    lr = np.stack([a * np.sin(2 * np.pi * hz * t) for a, hz in (LEFT, RIGHT)], axis=1)
    pcm = np.rint(lr * 32768).astype(np.int16)
    wav = d / "stereo.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(RATE_HZ)
        w.writeframes(pcm.tobytes())
    video = d / "stereo.mkv"
    subprocess.run([media.ffmpeg_exe(), "-y", "-v", "error",
                    "-f", "lavfi", "-i", f"testsrc=s=64x48:r=25:d={STEREO_S}", "-i", str(wav),
                    "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
                    "-c:a", "copy", str(video)], check=True)
    return video, wav, pcm


def channel_mean(pcm: np.ndarray) -> np.ndarray:
    """(L + R) / 2 of int16 samples, exactly (half steps kept)."""
    return pcm.astype(np.int32).sum(axis=1) / 2


def assert_is_the_mean(got: np.ndarray, pcm: np.ndarray) -> None:
    """``got`` is (L + R) / 2 to the nearest s16 step, sample for sample."""
    assert got.dtype == np.int16 and len(got) == len(pcm)
    assert float(np.abs(got - channel_mean(pcm)).max()) <= 0.5


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, RATE_HZ)
        return np.frombuffer(w.readframes(w.getnframes()), np.int16)


def test_stereo_mono_is_the_channel_mean_in_decode_and_decode_span(stereo) -> None:
    video, _wav, pcm = stereo
    got = vpipe_mono(video)
    assert_is_the_mean(got, pcm)
    # The level VGGish's input code gives it (np.mean over the channels), not 3 dB above.
    assert rms(got) / rms(channel_mean(pcm)) == pytest.approx(1.0, abs=1e-4)
    span = np.concatenate([x for _k, _t, x in media.decode_span(
        video, (1.0, 3.0), sampler=None, audio_rate_hz=RATE_HZ)])
    assert_is_the_mean(span, pcm[RATE_HZ:3 * RATE_HZ])


def test_stereo_mono_is_the_channel_mean_in_every_stage(stereo, tmp_path: Path) -> None:
    """extract-frames (a whole video and a ranges clip) and extract-audio write the mean."""
    video, _wav, pcm = stereo
    whole = tmp_path / "whole"
    assert main(["extract-frames", str(video), "-o", str(whole), "--fps", "1", "-q"]) == 0
    assert_is_the_mean(read_wav(whole / "stereo" / "audio.wav"), pcm)
    clips = tmp_path / "clips"
    assert main(["subclip", str(video), "-o", str(clips), "--mode", "ranges", "--count", "1",
                 "--duration", "2", "--start", "1", "-q"]) == 0
    assert read_manifest(clips)["stereo_0"]["start"] == 1.0
    for stage in ("extract-frames", "extract-audio"):
        out = tmp_path / stage
        assert main([stage, str(clips), "-o", str(out), "-q"]) == 0
        assert_is_the_mean(read_wav(out / "stereo_0" / "audio.wav"), pcm[RATE_HZ:3 * RATE_HZ])


def test_vggish_input_is_torchvggishs_own_for_the_same_stereo_file(stereo, tmp_path: Path,
                                                                   weights) -> None:
    """VGGish's examples of vpipe's mono against torchvggish's own wavfile_to_examples on the
    stereo soundtrack (np.mean over the channels): the same mel magnitudes, to the s16
    rounding of the mean (vpipe's mono was sqrt(2) louder: 0.41 of the peak apart). And
    features --from-video's rows are those of the mean's samples, exactly."""
    from torchvggish import vggish_input, vggish_params

    from pipeline.features.encoders.vggish import audio_examples

    video, wav, pcm = stereo
    ours = audio_examples(vpipe_mono(video), RATE_HZ)[0].numpy()[:, 0]
    theirs = vggish_input.wavfile_to_examples(str(wav), return_tensor=False)
    assert ours.shape == theirs.shape == (4, 96, 64)  # 4.0 s: four 0.96 s examples
    # The examples are log(mel + offset): back to mel magnitudes, where a level shows.
    mel_ours, mel_theirs = (np.exp(x) - vggish_params.LOG_OFFSET for x in (ours, theirs))
    assert np.abs(mel_ours - mel_theirs).max() <= 1e-3 * mel_theirs.max()
    out = tmp_path / "f"
    assert main(features_args(video, out, weights, "--from-video", "--fps", "1",
                              "--no-audio-postprocess")) == 0
    mean = tmp_path / "mean.wav"
    with wave.open(str(mean), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE_HZ)
        w.writeframes(np.rint(channel_mean(pcm)).astype(np.int16).tobytes())
    with open_features(out) as store:
        np.testing.assert_array_equal(store["stereo"].audio,
                                      reference_audio(mean, weights, postprocess=False))
