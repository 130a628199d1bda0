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
from pipeline.ids import view_id
from pipeline.media import augment
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
    augment: str | None = None  # the --augment spec (media.augment)
    views: int = 0  # augmented views per clip, besides the clip itself
    augment_seed: int = 0

    def __post_init__(self) -> None:
        if self.views < 0:
            raise UsageError(f"--views must be >= 0 (got {self.views})")
        if self.views and not self.augment:
            raise UsageError("--views needs --augment SPEC (e.g. --augment hflip,rotate=10)")
        if self.augment and not self.views:
            raise UsageError("--augment makes --views K views of each clip: give --views")
        if self.views and "speed" in self.augmenter().names and not self.fps:
            raise UsageError("--augment speed needs --fps (a view's frames are sampled at "
                             "its own times)")
        if self.views and not self.audio and self.augmenter().names <= augment.AUDIO_ONLY:
            raise UsageError(f"--augment {self.augment}: changes only the audio, and --no-audio "
                             "writes none: every view would be a copy of its clip")
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

    def augmenter(self) -> augment.Augment:
        return augment.Augment.parse(self.augment or "", self.augment_seed)

    def params(self) -> dict:
        """The parameters recorded in vpipe.json (only those that shape the outputs)."""
        p = asdict(self)
        if self.views:
            p["augment"] = self.augmenter().describe()
        else:  # no views: exactly the parameters of a run before views existed
            for k in ("augment", "views", "augment_seed"):
                p.pop(k)
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
    if opts.views and opts.augmenter().names <= augment.AUDIO_ONLY:
        silent = sorted({r["view_of"] for r in ok_records(out_dir)
                         if r.get("view_of") and not r.get("has_audio")})
        if silent:  # each such view is its clip's frames again, under another id
            print(f"vpipe {stage}: warning: --augment {opts.augment} changes only the audio: "
                  f"the views of {plural(len(silent), 'clips')} without audio are copies of "
                  f"their clip (e.g. {', '.join(silent[:3])})", file=sys.stderr)
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


def extract_clip(item: Item, *, out_dir: Path, opts: FrameOptions) -> dict | list[dict]:
    """Work for one clip: decode once, write frames and audio.wav, return its record; with
    ``views``, each view too (decoded again: a view's frames may be sampled at other times),
    the clip's records then a list, the clip's first."""
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
    rec = _extract(clip, info, start, end, out_dir, opts)
    if not opts.views:
        return rec
    aug = opts.augmenter()
    views = [_extract(clip, info, start, end, out_dir, opts, k, aug.draw(clip.clip_id, k))
             for k in range(1, opts.views + 1)]
    return [rec, *views]


def _extract(clip: ClipRef, info: media.MediaInfo, start: float, end: float, out_dir: Path,
             opts: FrameOptions, k: int = 0, values: dict | None = None) -> dict:
    """Decode the clip once into ``OUT/<id>/``: the clip itself, or its view ``k`` drawn as
    ``values`` (frames transformed, sampled at ``speed`` x their times, audio to match)."""
    item_id = view_id(clip.clip_id, k) if k else clip.clip_id
    speed = (values or {}).get("speed", 1.0)
    # The wav ends where the clip's picture does, as subclip cuts it: a soundtrack longer than
    # the picture, or the AAC frame a stream copy keeps past a keyframe clip's end, is cut.
    duration = (end - start) / speed
    max_samples = round(duration * opts.sample_rate_hz) if end > start else None
    want_audio = opts.audio and info.has_audio
    sampler = opts.sampler() if opts.frames else None
    if sampler is not None and speed != 1.0:  # the view's frame at t shows the clip's at f t
        sampler = media.FrameSampler(fps=opts.fps / speed, size=sampler.size,
                                     upscale=sampler.upscale)
    frame_view = augment.FrameView(values, clip.clip_id, k, opts.augment_seed) if k else None
    ext = opts.format
    timestamps: list[float] = []
    n_samples = 0
    with atomic_path(out_dir / item_id) as tmp:
        frames_dir = tmp / "frames"  # empty for extract-audio: one layout for readers
        frames_dir.mkdir(parents=True)
        wav = _open_wav(tmp / "audio.wav", opts.sample_rate_hz) if want_audio else None
        held: list = []  # a view's audio, changed as a whole before it is written
        try:
            for kind, t, data in media.decode(
                clip.path,
                sampler=sampler,
                audio_rate_hz=opts.sample_rate_hz if want_audio else None,
                span=clip.span,
                duration_s=clip.duration_s,
            ):
                if kind == "frame":
                    if frame_view is not None:
                        data = frame_view(data, len(timestamps))
                    _save_image(data, frames_dir / f"{len(timestamps):06d}.{ext}", opts)
                    if speed != 1.0:  # the k-th time of the source's k f/fps: k/fps
                        t = round(t * opts.fps / speed) / opts.fps
                    timestamps.append(t)
                elif k:
                    held.append(data)
                else:
                    if max_samples is not None:
                        data = data[: max(0, max_samples - n_samples)]
                    wav.writeframesraw(data.tobytes())
                    n_samples += len(data)
            if wav is not None and k:
                samples = _view_audio(held, tmp, speed, max_samples, opts, values, clip, k)
                wav.writeframesraw(samples.tobytes())
                n_samples = len(samples)
        finally:
            if wav is not None:
                wav.close()  # fixes the header's length fields
        if opts.frames and not timestamps:
            raise MediaError(f"{clip.path}: no frames decoded")
    return {
        "id": item_id,
        "item": clip.clip_id,
        "source": clip.source,
        "start": round(start, 6),
        "end": round(start + duration, 6),
        "fps": round(info.fps, 6),
        "n_frames": len(timestamps),
        "timestamps": timestamps,
        "frames_dir": f"{item_id}/frames",
        "frame_format": ext if opts.frames else None,
        "has_audio": want_audio,
        "audio": f"{item_id}/audio.wav" if want_audio else None,
        "sample_rate": opts.sample_rate_hz if opts.audio else None,
        "n_samples": n_samples,
        **({"source_identity": clip.identity} if clip.identity is not None else {}),
        **({"view_of": clip.clip_id, "view": k, "augment": values} if k else {}),
    }


def _view_audio(held: list, tmp: Path, speed: float, max_samples: int | None,
                opts: FrameOptions, values: dict, clip: ClipRef, k: int):
    """A view's samples: the clip's, time-stretched to its speed, then its gain and noise."""
    import numpy as np

    samples = np.concatenate(held) if held else np.zeros(0, np.int16)
    if speed != 1.0 and len(samples):
        raw, stretched = tmp / "audio.unstretched.wav", tmp / "audio.stretched.wav"
        with _open_wav(raw, opts.sample_rate_hz) as w:  # 0.25 s more: atempo's last window
            w.writeframesraw(samples.tobytes() + bytes(2 * (opts.sample_rate_hz // 4)))
        augment.stretch(raw, stretched, speed, opts.sample_rate_hz)
        with wave.open(str(stretched), "rb") as r:
            samples = np.frombuffer(r.readframes(r.getnframes()), np.int16)
        raw.unlink()
        stretched.unlink()
    if max_samples is not None:
        samples = samples[:max_samples]
    return augment.audio_view(samples, values, clip.clip_id, k, opts.augment_seed)


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
