"""Synthetic media for tests and benchmarks, made with ffmpeg so every expectation is exact.

``make_video`` writes a frame-numbered video: the top half of each frame shows the frame index
as 12 black/white blocks (robust to lossy coding and resizing; ``frame_index`` reads it back),
the bottom half a solid colour; the audio is silence with 1 kHz beeps at known times (or a
steady tone).
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.media import ffmpeg_exe  # the binary vpipe runs, so tests make media with it

BITS = 12


def numbered_frame(i: int, size: tuple[int, int], color=(40, 120, 200)) -> np.ndarray:
    w, h = size
    img = np.empty((h, w, 3), np.uint8)
    img[:] = color
    top = h // 2
    for b in range(BITS):
        x0, x1 = b * w // BITS, (b + 1) * w // BITS
        img[:top, x0:x1] = 255 if (i >> (BITS - 1 - b)) & 1 else 0
    return img


def frame_index(rgb: np.ndarray) -> int:
    """Read back the index drawn by :func:`numbered_frame` (any size, RGB or BGR)."""
    h, w = rgb.shape[:2]
    y = h // 4
    i = 0
    for b in range(BITS):
        x = (2 * b + 1) * w // (2 * BITS)
        i = (i << 1) | int(rgb[y, x].mean() > 127)
    return i


def audio_expr(beeps_at: Sequence[float], beep_s: float, tone_hz: float | None) -> str:
    if tone_hz:
        return f"0.5*sin(2*PI*{tone_hz}*t)"
    if not beeps_at:
        return "0"
    gate = "+".join(f"between(t,{t0},{t0 + beep_s})" for t0 in beeps_at)
    return f"0.5*sin(2*PI*1000*t)*({gate})"


def make_video(
    path: str | Path,
    *,
    duration_s: float = 4.0,
    fps: float = 25,
    size: tuple[int, int] = (160, 120),
    color: tuple[int, int, int] = (40, 120, 200),
    audio: bool = True,
    beeps_at: Sequence[float] = (1.0,),
    beep_s: float = 0.1,
    tone_hz: float | None = None,
    audio_rate: int = 44100,
    vcodec: str = "libx264",
    acodec: str = "aac",
    gop: int | None = None,
    extra: Sequence[str] = (),
) -> Path:
    """Write a frame-numbered video (see module doc); returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = int(round(duration_s * fps))
    w, h = size
    cmd = [ffmpeg_exe(), "-y", "-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24"]
    cmd += ["-s", f"{w}x{h}", "-r", str(fps), "-i", "-"]
    if audio:
        expr = audio_expr(beeps_at, beep_s, tone_hz)
        cmd += ["-f", "lavfi", "-i", f"aevalsrc=exprs='{expr}':s={audio_rate}:d={duration_s}"]
    cmd += ["-c:v", vcodec]
    if vcodec in ("libx264", "mpeg4", "flv"):
        cmd += ["-pix_fmt", "yuv420p"]
    if vcodec == "libx264":
        cmd += ["-preset", "veryfast", "-crf", "18"]
    if vcodec in ("mpeg4", "flv"):
        cmd += ["-q:v", "2"]
    if gop:
        cmd += ["-g", str(gop)]
    if audio:
        cmd += ["-c:a", acodec]
        if acodec in ("libmp3lame",):
            cmd += ["-ar", "44100"]
    cmd += [*extra, str(path)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE)
    assert proc.stdin is not None
    for i in range(n):
        proc.stdin.write(numbered_frame(i, size, color).tobytes())
    proc.stdin.close()
    if proc.wait() != 0:
        raise RuntimeError(f"ffmpeg failed writing {path}")
    return path


def with_soundtrack(video: str | Path, dst: str | Path, audio_s: float,
                    rate: int | None = None) -> Path:
    """``video``'s picture (copied) with a sine soundtrack of ``audio_s`` seconds (AAC): longer
    or shorter than the picture, as real files have."""
    sine = f"sine=d={audio_s}" + (f":r={rate}" if rate else "")
    subprocess.run([ffmpeg_exe(), "-y", "-v", "error", "-i", str(video), "-f", "lavfi", "-i",
                    sine, "-map", "0:v", "-map", "1:a", "-c:v", "copy", "-c:a", "aac",
                    str(dst)], check=True)
    return Path(dst)


def make_lavfi_video(
    path: str | Path,
    *,
    duration_s: float,
    size: tuple[int, int] = (1280, 720),
    fps: float = 25,
    tone_hz: float = 440,
    preset: str = "ultrafast",
    gop: int | None = None,
) -> Path:
    """A larger test clip from ffmpeg's testsrc2 + a sine tone (for benchmarks, and for damage:
    its frames fill the file, so bytes overwritten at x% of it hit the data at ~x% of its time)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    cmd = [ffmpeg_exe(), "-y", "-v", "error"]
    cmd += ["-f", "lavfi", "-i", f"testsrc2=s={w}x{h}:r={fps}:d={duration_s}"]
    cmd += ["-f", "lavfi", "-i", f"sine=f={tone_hz}:r=44100:d={duration_s}"]
    cmd += ["-c:v", "libx264", "-preset", preset, "-pix_fmt", "yuv420p", "-c:a", "aac"]
    if gop:
        cmd += ["-g", str(gop), "-sc_threshold", "0"]
    cmd += [str(path)]
    subprocess.run(cmd, check=True)
    return path


def make_truncated(src: str | Path, dst: str | Path, keep: float = 0.4) -> Path:
    """Copy the first ``keep`` fraction of a file's bytes (a download cut short)."""
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * keep)])
    return Path(dst)


def make_damaged(src: str | Path, dst: str | Path, *, at: float = 0.4, n_bytes: int = 20_000,
                 seed: int = 0) -> Path:
    """Copy a file with ``n_bytes`` random bytes written over it from ``at`` of its size (a
    disk or transfer error inside the media data; the file still opens)."""
    data = bytearray(Path(src).read_bytes())
    i = int(len(data) * at)
    noise = np.random.default_rng(seed).integers(0, 256, n_bytes, np.uint8)
    data[i : i + n_bytes] = noise.tobytes()
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    Path(dst).write_bytes(bytes(data))
    return Path(dst)
