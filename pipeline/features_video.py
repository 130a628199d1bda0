"""``vpipe features --from-video``: decode clips in the loader workers, no JPEG frames.

The inputs are clips (a subclip output folder, or videos/folders, found as extract-frames finds
them). Each loader worker decodes its share of the clips with ``pipeline.media.decode`` (sampled
frames plus 16 kHz mono audio, one pass), preprocesses the frames and builds VGGish's log-mel
examples; the encoder loop runs the models on the batches they hand over and writes clips into
shards in completion order. Imported by :func:`pipeline.features.extract_features` only when
``--from-video`` is given.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import VpipeError
from pipeline.features import (
    SHARD_MAX_BYTES,
    STAGE,
    Encoders,
    FeatureOptions,
    _fail,
    _ok_record,
    _worker_init,
)
from pipeline.records import Run, progress


@dataclass
class VideoJob:
    """One clip to decode and encode (--from-video): its record, file and rows so far."""

    rec: dict
    path: Path
    rows: list[np.ndarray] = field(default_factory=list)
    timestamps: list[float] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.rec["id"]


def read_video_inputs(inputs: Sequence[str | os.PathLike]) -> list[tuple[dict, Any]]:
    """The clips of subclip output folder(s) and of videos/folders, as extract-frames finds
    them, each as (record with id/source/start/end, its :class:`pipeline.frames.ClipRef`)."""
    from pipeline.frames import find_clips

    out: list[tuple[dict, Any]] = []
    for ref in find_clips(inputs):
        info = ref.source_ref.info if ref.source_ref is not None else None
        end = ref.end_s if ref.end_s is not None else (info.duration_s if info else None)
        rec = {"id": ref.clip_id, "source": ref.source, "start": ref.start_s or 0.0, "end": end}
        out.append((rec, ref))
    return out


def make_video_job(rec: dict, ref: Any) -> VideoJob:
    """A clip's job, or the Skip/MediaError its probe or missing file calls for."""
    from pipeline.errors import MediaError

    if ref.source_ref is not None:
        ref.source_ref.raise_problem()
    elif not Path(ref.path).is_file():
        raise MediaError(f"{ref.path}: subclip file missing (was its folder moved?)")
    return VideoJob(rec, Path(ref.path))


def pcm_examples(pcm: np.ndarray, rate: int) -> tuple[Any, np.ndarray]:
    """VGGish examples of int16 mono samples, exactly as :func:`pipeline.models.audio_examples`
    builds them from the same samples written to a wav (so both paths give equal rows)."""
    import torch
    from torchvggish import vggish_input
    from torchvggish import vggish_params as p

    empty = torch.zeros((0, 1, p.NUM_FRAMES, p.NUM_BANDS)), np.zeros(0)
    samples = pcm / 32768.0
    n = samples.shape[0] * p.SAMPLE_RATE / rate
    short = (
        p.EXAMPLE_WINDOW_SECONDS * p.SAMPLE_RATE
        + (p.STFT_WINDOW_LENGTH_SECONDS - p.STFT_HOP_LENGTH_SECONDS) * p.SAMPLE_RATE
    )
    if n < short:
        return empty
    try:
        ex = vggish_input.waveform_to_examples(samples, rate, return_tensor=False)
    except ValueError:
        return empty
    ex = torch.from_numpy(np.ascontiguousarray(ex, dtype=np.float32))[:, None]
    return ex, np.arange(ex.shape[0]) * p.EXAMPLE_HOP_SECONDS


AUDIO_RATE_HZ = 16000  # VGGish's rate: the decoder resamples to it, as extract-frames does


def iter_video_batches(
    clips: Sequence[tuple[int, str]],
    preprocessing: Any,
    batch_size: int,
    fps: float | None,
    every: int | None,
    audio: bool,
) -> Any:
    """Decode clips (this loader worker's share) into batches ``(uint8 frames, owner clip,
    timestamps, events)``; an event ``(clip, n_frames, audio examples, error)`` follows the
    clip's last frame, so a failed clip fails alone."""
    import torch
    from PIL import Image

    from pipeline import media

    info = torch.utils.data.get_worker_info()
    mine = clips if info is None else clips[info.id :: info.num_workers]
    sampler = media.FrameSampler(fps=fps, every=every)
    c = preprocessing.crop_size
    imgs: list[Any] = []
    owners: list[int] = []
    times: list[float] = []
    events: list[tuple] = []

    def batch() -> tuple:
        x = torch.stack(imgs) if imgs else torch.zeros((0, 3, c, c), dtype=torch.uint8)
        return x, np.array(owners, np.int64), np.array(times, np.float64), list(events)

    for j, path in mine:
        n, pcm = 0, []
        try:
            for kind, t, data in media.decode(
                path, sampler=sampler, audio_rate_hz=AUDIO_RATE_HZ if audio else None
            ):
                if kind == "audio":
                    pcm.append(data)
                    continue
                # Through PIL, as the JPEG path and the weights' own transforms resize.
                imgs.append(preprocessing.uint8_from_image(Image.fromarray(data)))
                owners.append(j)
                times.append(t)
                n += 1
                if len(imgs) == batch_size:
                    yield batch()
                    imgs, owners, times, events = [], [], [], []
            ex = pcm_examples(np.concatenate(pcm), AUDIO_RATE_HZ) if pcm else None
            events.append((j, n, ex, None))
        except VpipeError as e:
            events.append((j, n, None, str(e)))
        except Exception as e:  # one odd clip must not stop the others
            events.append((j, n, None, f"{path}: cannot decode ({type(e).__name__}: {e})"))
    if imgs or events:
        yield batch()


_STREAM_CLASS: Any = None


def _video_stream_class() -> Any:
    """The IterableDataset over :func:`iter_video_batches` (made on first use: torch is heavy)."""
    global _STREAM_CLASS
    if _STREAM_CLASS is None:
        from torch.utils.data import IterableDataset

        class VideoFrameStream(IterableDataset):
            def __init__(self, *args: Any) -> None:
                self.args = args

            def __iter__(self) -> Any:
                return iter_video_batches(*self.args)

        VideoFrameStream.__module__ = __name__
        VideoFrameStream.__qualname__ = "VideoFrameStream"
        _STREAM_CLASS = VideoFrameStream
    return _STREAM_CLASS


def __getattr__(name: str) -> Any:
    # Lets a spawned loader worker unpickle the stream class by name.
    if name == "VideoFrameStream":
        return _video_stream_class()
    raise AttributeError(name)


class _ShardSink:
    """Clips in completion order into shards of ``shard_size`` clips (or ~SHARD_MAX_BYTES);
    a shard's manifest lines are written once it is renamed into place."""

    def __init__(self, out: Path, enc: Encoders, opts: FeatureOptions, run: Run, attrs: dict,
                 on_shard: Callable[[Path], None] | None) -> None:
        from pipeline import shards

        self.out, self.enc, self.opts, self.run, self.attrs = out, enc, opts, run, attrs
        self.on_shard = on_shard
        self.number = shards.next_shard_number(out)
        self.writer: Any = None
        self.members: list[VideoJob] = []
        self.bytes = 0

    def add(self, job: VideoJob, clip: Any) -> None:
        from pipeline import shards

        if self.writer is None:
            self.writer = shards.ShardWriter(
                self.out / shards.shard_name(self.number),
                image_dim=self.enc.image.dim,
                audio_dim=128 if self.enc.audio else 0,
                attrs=self.attrs,
                dtype=self.opts.dtype,
                compression=None if self.opts.compression == "none" else self.opts.compression,
            )
        self.writer.add(clip)
        self.members.append(job)
        self.bytes += (clip.image.shape[0] + clip.audio.shape[0]) * self.enc.image.dim * np.dtype(
            self.opts.dtype
        ).itemsize
        if len(self.members) >= self.opts.shard_size or self.bytes >= SHARD_MAX_BYTES:
            self.close()

    def close(self) -> None:
        from pipeline import shards

        if self.writer is None:
            return
        w, self.writer = self.writer, None
        rows = w.close()
        shards.add_to_index(self.out, rows)
        self.number += 1
        self.bytes = 0
        index = {r["clip_id"]: r for r in rows}
        for m in self.members:
            self.run.record(_ok_record(m.rec, index[m.id]))
        self.members = []
        if self.on_shard is not None:
            self.on_shard(w.path)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


def _video_sampling(opts: FeatureOptions) -> dict:
    fps, every = opts.sampling()
    return {
        "stage": "features --from-video",
        "from_video": True,
        "params": {"fps": fps, "every": every, "size": None},
        "decode": "pipeline.media.decode (PyAV, rgb24), no intermediate files",
        "timestamps": "seconds from clip start, per frame (media.iter_frames)",
    }


def encode_videos(
    jobs: list[VideoJob],
    enc: Encoders,
    opts: FeatureOptions,
    run: Run,
    out: Path,
    *,
    quiet: bool,
    on_shard: Callable[[Path], None] | None,
) -> None:
    """Decode clips in loader workers and stream their frames through the ResNet in batches."""
    import torch
    from torch.utils.data import DataLoader

    from pipeline.models import autocast_dtype
    from pipeline.shards import ClipFeatures

    pre, dev = enc.image.preprocessing, enc.device
    cast = autocast_dtype(enc.precision)
    image_attrs = {
        **enc.image.attrs(),
        "sampling": _video_sampling(opts),
        "precision": enc.precision,
    }
    image_attrs["preprocessing"] = {
        **image_attrs.get("preprocessing", {}), "decode": "PyAV rgb24 frame -> PIL, RGB"
    }
    attrs = {
        "image": image_attrs,
        "audio": {**enc.audio.attrs(), "precision": enc.precision}
        if enc.audio
        else {"model": "none", "dim": 0},
    }
    sink = _ShardSink(out, enc, opts, run, attrs, on_shard)

    def finish(job: VideoJob, ex: Any, error: str | None) -> None:
        if error is None:
            audio = np.zeros((0, 128 if enc.audio else 0), np.float32)
            audio_ts = np.zeros(0)
            if enc.audio is not None and ex is not None:
                ex, audio_ts = ex
                on = cast is not None
                with torch.autocast(dev.type, dtype=cast or torch.float32, enabled=on):
                    audio = enc.audio.embed(ex.to(dev))
            r = job.rec
            image = np.stack(job.rows) if job.rows else np.zeros((0, enc.image.dim), np.float32)
            clip = ClipFeatures(job.id, str(r.get("source") or job.id), float(r["start"] or 0.0),
                                float(r["end"] or 0.0), image,
                                np.asarray(job.timestamps, np.float64), audio, audio_ts)
            sink.add(job, clip)
        else:
            _fail(run, job.rec, error)
        job.rows, job.timestamps = [], []

    fps, every = opts.sampling()
    clips = [(j, str(job.path)) for j, job in enumerate(jobs)]
    w = min(opts.workers, len(jobs))
    stream = _video_stream_class()(clips, pre, opts.batch_size, fps, every, enc.audio is not None)
    loader = DataLoader(
        stream,
        batch_size=None,  # the workers batch frames themselves (batches mix a worker's clips)
        num_workers=w,
        pin_memory=dev.type == "cuda",
        worker_init_fn=_worker_init if w else None,
        prefetch_factor=4 if w else None,
    )
    bar = progress(total=None, desc=STAGE, quiet=quiet)
    try:
        for imgs, owners, times, events in loader if jobs else ():
            if imgs.shape[0]:
                y = enc.embed_images(imgs)
                for k in range(y.shape[0]):
                    job = jobs[int(owners[k])]
                    job.rows.append(y[k])
                    job.timestamps.append(float(times[k]))
                bar.update(y.shape[0])
            for j, _n, ex, error in events:
                finish(jobs[j], ex, error)
        sink.close()
    finally:
        bar.close()
        sink.abort()
