"""``vpipe extract-frames`` and ``vpipe extract-audio``: sampled frames and PCM audio per clip.

Inputs are a ``vpipe subclip`` output folder (its manifest gives the clips with their source
and times; a ranges-mode clip is its source's range, decoded from the source) or any
videos/folders. Each clip is decoded once (media.decode): the sampled frames
are written as images, the audio as a 16 kHz mono s16 wav, into ``OUT/<clip_id>/`` under a temp
name that is renamed when the clip is complete. Frames come out upright: a display rotation
(portrait phone videos store frames sideways) is applied, as players do.
"""

from __future__ import annotations

import functools
import os
import sys
import wave
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline import media
from pipeline.clips import ClipRef, find_clips
from pipeline.errors import MediaError, UsageError, plural
from pipeline.files import atomic_path
from pipeline.records import Run, ok_records
from pipeline.runner import Item, Summary, run_items

FORMATS = ("jpg", "png")


@dataclass(frozen=True)
class FrameOptions:
    """What to extract: frames by time (``fps``) or count (``every``), and/or audio."""

    fps: float | None = 1.0
    every: int | None = None
    size: int = 256  # short side in pixels; 0 keeps the original size
    upscale: bool = False  # also scale up frames whose short side is under size
    format: str = "jpg"
    quality: int = 90  # jpg quality 1..100 (png is lossless)
    sample_rate_hz: int = 16000
    frames: bool = True
    audio: bool = True

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise UsageError(f"--format must be jpg or png (got {self.format!r})")
        if not 1 <= self.quality <= 100:
            raise UsageError(f"--quality must be within 1..100 (got {self.quality})")
        if self.size < 0:
            raise UsageError(f"--size must be >= 0 (got {self.size})")
        if self.audio and self.sample_rate_hz < 1000:
            raise UsageError(f"--sample-rate must be >= 1000 Hz (got {self.sample_rate_hz})")
        if self.frames:
            self.sampler()  # validates fps/every
        elif not self.audio:
            raise UsageError("nothing to extract (no frames and --no-audio)")

    def sampler(self) -> media.FrameSampler:
        return media.FrameSampler(fps=self.fps, every=self.every, size=self.size or None,
                                  upscale=self.upscale)

    def params(self) -> dict:
        """The parameters recorded in vpipe.json (only those that shape the outputs)."""
        p = asdict(self)
        if not self.frames:
            for k in ("fps", "every", "size", "upscale", "format", "quality"):
                p.pop(k)
        if not self.audio:
            p.pop("sample_rate_hz")
        return p


def extract_frames(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    opts: FrameOptions,
    *,
    workers: int = 1,
    overwrite: bool = False,
    quiet: bool = False,
    stage: str = "extract-frames",
    engine: Any = None,
) -> Summary:
    """The stage: frames (and audio) of every clip in ``inputs`` into ``out_dir``, on
    ``engine`` (:mod:`pipeline.engine`; default: ``workers`` local processes)."""
    clips = find_clips(inputs)
    run = Run(
        Path(out_dir), stage, opts.params(), overwrite=overwrite,
        versions=media.media_versions(), outputs=clip_outputs, inputs=inputs,
    ).open()
    for c in clips:
        # A clip re-cut since (subclip rerun with --overwrite) is not finished: redo it.
        old = run.previous.get(c.clip_id)
        if old and c.start_s is not None and (old.get("start"), old.get("end")) != (
            round(c.start_s, 6), round(c.end_s, 6)
        ):
            run.forget(c.clip_id)
        elif old and c.identity is not None and old.get("source_identity") != c.identity:
            run.forget(c.clip_id)  # a ranges clip whose source was replaced since
    items = [Item(c.clip_id, str(c.path), c) for c in clips]
    work = functools.partial(extract_clip, out_dir=Path(out_dir), opts=opts)
    summary = run_items(run, items, work, workers=workers, quiet=quiet, engine=engine)
    if opts.frames and opts.every:
        note = mixed_rates_note(ok_records(out_dir), opts.every)
        if note:
            print(f"vpipe {stage}: warning: {note}", file=sys.stderr)
    return summary


def mixed_rates_note(records: Sequence[dict], every: int) -> str | None:
    """What ``--every N`` means when the clips have different frame rates: a frame every N
    frames is a frame every N / fps seconds, so not the same times in every clip."""
    rates: dict[float, int] = {}
    for r in records:
        if r.get("fps"):
            rates[round(float(r["fps"]), 3)] = rates.get(round(float(r["fps"]), 3), 0) + 1
    if len(rates) < 2:
        return None
    shown = ", ".join(f"{every / fps:.2f} s at {fps:g} fps ({plural(n, 'clips')})"
                      for fps, n in sorted(rates.items()))
    return (f"--every {every} counts frames, and these clips have {len(rates)} frame rates: "
            f"a frame every {shown}; --fps samples every clip at the same times")


def extract_audio(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    sample_rate_hz: int = 16000,
    workers: int = 1,
    overwrite: bool = False,
    quiet: bool = False,
    engine: Any = None,
) -> Summary:
    """The audio half alone: ``OUT/<clip_id>/audio.wav`` per clip (n_frames 0)."""
    opts = FrameOptions(fps=None, frames=False, audio=True, sample_rate_hz=sample_rate_hz)
    return extract_frames(
        inputs, out_dir, opts, workers=workers, overwrite=overwrite, quiet=quiet,
        stage="extract-audio", engine=engine,
    )


def clip_outputs(rec: dict) -> list[str]:
    """What a clip's record names (checked on resume): its frames folder and its wav."""
    return [rec[k] for k in ("frames_dir", "audio") if rec.get(k)]


def extract_clip(item: Item, *, out_dir: Path, opts: FrameOptions) -> dict:
    """Work for one clip: decode once, write frames and audio.wav, return its record."""
    clip: ClipRef = item.data
    if clip.source_ref is not None:
        clip.source_ref.raise_problem()
        info = clip.source_ref.info
    else:
        clip.check_source()
        info = media.probe(clip.path)
    if clip.start_s is not None:
        start, end = clip.start_s, clip.end_s
    else:  # a whole video: its picture's span (a live-written file declares no end)
        start = info.video_start_s
        # An MPEG-TS/PS declares no durations, only guesses: its frames say where it ends.
        end = info.video_end_s if info.container not in media.UNINDEXED_FORMATS else 0.0
        end = end or _demuxed_end(clip.path)
    # The wav ends where the clip's picture does, as subclip cuts it: a soundtrack longer than
    # the picture, or the AAC frame a stream copy keeps past a keyframe clip's end, is cut.
    max_samples = round((end - start) * opts.sample_rate_hz) if end > start else None
    want_audio = opts.audio and info.has_audio
    ext = opts.format
    timestamps: list[float] = []
    n_samples = 0
    with atomic_path(out_dir / clip.clip_id) as tmp:
        frames_dir = tmp / "frames"  # empty for extract-audio: one layout for readers
        frames_dir.mkdir(parents=True)
        wav = _open_wav(tmp / "audio.wav", opts.sample_rate_hz) if want_audio else None
        try:
            for kind, t, data in media.decode(
                clip.path,
                sampler=opts.sampler() if opts.frames else None,
                audio_rate_hz=opts.sample_rate_hz if want_audio else None,
                span=clip.span,
                duration_s=clip.duration_s,
            ):
                if kind == "frame":
                    _save_image(data, frames_dir / f"{len(timestamps):06d}.{ext}", opts)
                    timestamps.append(t)
                else:
                    if max_samples is not None:
                        data = data[: max(0, max_samples - n_samples)]
                    wav.writeframesraw(data.tobytes())
                    n_samples += len(data)
        finally:
            if wav is not None:
                wav.close()  # fixes the header's length fields
        if opts.frames and not timestamps:
            raise MediaError(f"{clip.path}: no frames decoded")
    return {
        "id": clip.clip_id,
        "item": clip.clip_id,
        "source": clip.source,
        "start": round(start, 6),
        "end": round(end, 6),
        "fps": round(info.fps, 6),
        "n_frames": len(timestamps),
        "timestamps": timestamps,
        "frames_dir": f"{clip.clip_id}/frames",
        "frame_format": ext if opts.frames else None,
        "has_audio": want_audio,
        "audio": f"{clip.clip_id}/audio.wav" if want_audio else None,
        "sample_rate": opts.sample_rate_hz if opts.audio else None,
        "n_samples": n_samples,
        **({"source_identity": clip.identity} if clip.identity is not None else {}),
    }


def _open_wav(path: Path, rate: int) -> wave.Wave_write:
    w = wave.open(str(path), "wb")
    w.setnchannels(1)
    w.setsampwidth(2)
    w.setframerate(rate)
    return w


def _demuxed_end(path: Path) -> float:
    """End of the last video frame by demuxing; 0.0 where packets carry no times (a raw
    elementary stream such as .h264)."""
    try:
        return media.frame_times(path).end_s
    except MediaError:
        return 0.0


def _save_image(rgb, path: Path, opts: FrameOptions) -> None:
    from PIL import Image

    img = Image.fromarray(rgb)
    if opts.format == "jpg":
        img.save(path, format="JPEG", quality=opts.quality)
    else:
        img.save(path, format="PNG", compress_level=3)  # level 3: near-best size, much faster
