"""Where the frames of ``vpipe features`` come from: one class per kind of input.

A source lists the clips of its inputs as :class:`ClipJob` s, checks each one before work starts
(:meth:`prepare`), and streams their frames as uint8 :class:`Batch` es that mix clips, each
saying which clips it completed (with their VGGish examples, or the error that failed them). The
stage loop (:mod:`.stage`) is the same for every source; a new kind of input is a new class here.

- :class:`FrameFolders`: the JPEG/PNG frames and ``audio.wav`` of ``vpipe extract-frames``,
  decoded, resized and cropped in DataLoader worker processes; a clip's wav is made into its
  VGGish examples there too, by the worker that decodes the clip's last frame.
- :class:`DecodedVideos` (``--from-video``): clips (a subclip output folder, or videos) decoded
  by :func:`pipeline.media.decode` in the loader workers, no intermediate files (a ranges-mode
  clip: just its range of the source).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from pipeline.errors import MediaError, UsageError, VpipeError
from pipeline.features.encoders import Preprocessing
from pipeline.features.encoders.loaded import Encoders
from pipeline.features.options import FeatureOptions
from pipeline.records import OK, read_manifest, read_run_info
from pipeline.runner import Item

TIMESTAMPS = "seconds from clip start, per frame"


@dataclass
class ClipJob:
    """One clip to encode: its record (id, source, start, end...), where its frames come from,
    and the rows computed so far."""

    item: Item
    rec: dict
    ref: Any  # the source's own: frame files + wav, or the clip's video
    frames: list[Path] = field(default_factory=list)
    audio_path: Path | None = None
    rows: list[np.ndarray] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    error: str | None = None
    title: str | None = None  # with --text: the clip's title, after the cut (None: it has none)
    # With a video encoder: (rows, start, end) of its windows so far, and (padded, dropped).
    video: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    video_counts: tuple[int, int] = (0, 0)

    @property
    def id(self) -> str:
        return self.item.id


@dataclass(frozen=True)
class Decoding:
    """What decoding needs to know of the encoders: the image preprocessing, the audio
    encoder's input (PCM and wavs to its examples; None: no audio), and whether batches go to
    a GPU (pinned memory). Sent to Ray decode tasks instead of the models."""

    preprocessing: Preprocessing
    audio: Any
    pin_memory: bool = False
    video: Any = None  # the video encoder's input (windows of frames at its rate), or None

    @classmethod
    def of(cls, enc: Encoders) -> Decoding:
        return cls(enc.image.preprocessing, enc.audio_input, enc.device.type == "cuda",
                   enc.video_input)


@dataclass
class Batch:
    """Frames of one model call, ``owners[k]`` the job index of frame k, and the clips whose
    last frame was in it or before: ``(job index, VGGish examples or None, error or None)``."""

    images: torch.Tensor
    owners: np.ndarray
    times: np.ndarray
    done: list[tuple[int, Any, str | None]]
    # (job index, VideoWindows) made since the last batch: a clip's windows as they complete.
    video: list[tuple[int, Any]] = field(default_factory=list)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding is per-process work; the model owns the other threads


# --------------------------------------------------------------------------- frame folders


class FrameFolders:
    """The clips of ``vpipe extract-frames`` output folder(s): frame files and audio.wav."""

    def __init__(self, inputs: Sequence[Path]) -> None:
        self.inputs = list(inputs)

    def clips(self) -> list[ClipJob]:
        """The ok clips of every input folder, in manifest order (ids unique across them)."""
        out: list[ClipJob] = []
        seen: dict[str, Path] = {}
        for folder in self.inputs:
            if not (folder / "manifest.jsonl").is_file():
                raise UsageError(
                    f"{folder}: not an extract-frames output folder (no manifest.jsonl); "
                    "for videos or a subclip output folder, add --from-video"
                )
            records = [r for r in read_manifest(folder).values() if r.get("status") == OK]
            _check_frames_folder(folder, records)
            for rec in records:
                if rec["id"] in seen:
                    raise UsageError(
                        f"clip id {rec['id']!r} is in both {seen[rec['id']]} and {folder}"
                    )
                seen[rec["id"]] = folder
                out.append(ClipJob(Item(rec["id"], str(folder / rec["id"])), rec, folder))
        return out

    def prepare(self, job: ClipJob) -> None:
        """Check the clip's record and files; a MediaError names what is wrong."""
        rec, folder = job.rec, job.ref
        for key in ("frames_dir", "n_frames", "timestamps"):
            if key not in rec:
                raise MediaError(f"the input manifest record has no {key!r}")
        paths = frame_files(rec, folder)
        ts = np.asarray(rec["timestamps"], dtype="f8")
        if ts.shape[0] != len(paths):
            raise MediaError(f"{len(paths)} frames but {ts.shape[0]} timestamps in the manifest")
        for p in paths:
            if not p.is_file():
                raise MediaError(f"{p}: frame file missing")
        audio = folder / rec["audio"] if rec.get("has_audio") and rec.get("audio") else None
        if audio is not None and not audio.is_file():
            raise MediaError(f"{audio}: audio file missing")
        job.frames, job.audio_path = paths, audio

    def batches(self, jobs: list[ClipJob], dec: Decoding, opts: FeatureOptions
                ) -> Iterator[Batch]:
        """Every frame of ``jobs`` in order, decoded in loader workers; a clip is done once the
        batch holding its last frame is out. Its VGGish examples are read from its wav by the
        worker that decodes its last frame (here for a clip without frames)."""
        counts = np.array([len(j.frames) for j in jobs], dtype=np.int64)
        owner = np.repeat(np.arange(len(jobs)), counts)
        times = np.array([float(t) for j in jobs for t in j.rec["timestamps"]], np.float64)
        remaining = counts.copy()
        audio: dict[int, tuple[Any, str | None]] = {}  # by job: what a worker made of its wav
        nxt = 0

        def completed() -> list[tuple[int, Any, str | None]]:
            nonlocal nxt
            done = []
            while nxt < len(jobs) and remaining[nxt] == 0:
                job = jobs[nxt]
                ex, error = audio.pop(nxt) if nxt in audio else clip_audio(job, dec.audio)
                done.append((nxt, None, job.error) if job.error is not None
                            else (nxt, ex, error))
                nxt += 1
            return done

        done = completed()  # clips without frames
        paths = [str(p) for j in jobs for p in j.frames]
        if not paths:
            c = dec.preprocessing.crop_size
            yield Batch(torch.zeros((0, 3, c, c), dtype=torch.uint8), owner, times, done)
            return
        last = np.cumsum(counts) - 1  # a clip's last frame, where its audio is read
        wavs = {int(last[j]): job for j, job in enumerate(jobs) if counts[j]}
        pos = 0
        for imgs, errors, wav_out in _frame_loader(paths, dec, opts, wavs):
            n = imgs.shape[0]
            own = owner[pos : pos + n]
            for k in range(n):
                if errors[k] and jobs[own[k]].error is None:
                    jobs[own[k]].error = errors[k]
                if wav_out[k] is not None:
                    audio[int(own[k])] = wav_out[k]
            np.subtract.at(remaining, own, 1)
            yield Batch(imgs, own, times[pos : pos + n], done + completed())
            done = []
            pos += n

    def params(self) -> dict:
        """What of the inputs decides the output: the frames are part of it, so inputs
        re-extracted with other options (same folder, --overwrite) are not resumed onto."""
        return {"from_video": False, "fps": None, "every": None,
                "frames": [(read_run_info(p) or {}).get("params") for p in self.inputs]}

    def image_attrs(self, attrs: dict) -> dict:
        """The /image attributes with how the frames were sampled (from their extract-frames
        run)."""
        sampling: dict[str, Any] = {"timestamps": f"{TIMESTAMPS} (from its manifest)"}
        views = None
        for folder in self.inputs:
            info = read_run_info(folder)
            if info:
                params = dict(info.get("params", {}))
                # Augmented views are items of their own, not how a clip's frames are sampled
                # (features of new videos, made without views, are the run's).
                if params.get("views"):
                    views = {k: params.pop(k) for k in ("augment", "views", "augment_seed")}
                sampling = {"stage": info.get("stage"), "params": params, **sampling}
                break
        return {**attrs, "sampling": sampling, **({"views": views} if views else {})}


def _check_frames_folder(folder: Path, records: list[dict]) -> None:
    """Refuse, before anything is created, a folder whose clips have no frame folders: a
    subclip output folder would otherwise fail every clip one by one."""
    info = read_run_info(folder) or {}
    stage = info.get("stage")
    no_frames = bool(records) and not any("frames_dir" in r for r in records)
    if stage == "subclip" or (no_frames and all("path" in r for r in records)):
        raise UsageError(
            f"{folder} is a `vpipe subclip` folder: run `vpipe extract-frames` on it first, "
            "or add --from-video"
        )
    if no_frames:
        made_by = f"`vpipe {stage}`" if stage else "an unknown stage"
        raise UsageError(
            f"{folder}: not an extract-frames output folder (made by {made_by}, its clips have "
            "no frames_dir): run `vpipe extract-frames` first"
        )


def frame_files(rec: dict, folder: Path) -> list[Path]:
    """The frame files a record names: ``frames_dir/000000.<ext>`` … in order."""
    frames = folder / rec["frames_dir"]
    ext = {"jpeg": "jpg", None: "jpg"}.get(rec.get("frame_format"), rec.get("frame_format"))
    if int(rec["n_frames"]) and not (frames / f"000000.{ext}").exists():
        found = sorted(frames.glob("000000.*"))
        ext = found[0].suffix[1:] if found else ext
    return [frames / f"{i:06d}.{ext}" for i in range(int(rec["n_frames"]))]


def clip_audio(job: ClipJob, audio: Any) -> tuple[Any, str | None]:
    """A clip's audio examples from its wav (None without an audio encoder or a wav), or the
    error that fails the clip: a wav unlike its record (cut short...), named, as one
    unreadable."""
    if audio is None or job.audio_path is None:
        return None, None
    try:
        rec = job.rec
        return audio.from_wav(job.audio_path, rec.get("n_samples"), rec.get("sample_rate")), None
    except VpipeError as e:
        return None, str(e)
    except Exception as e:  # an unreadable wav fails this clip only
        return None, f"{job.audio_path}: cannot read audio ({type(e).__name__}: {e})"


class FrameFiles(torch.utils.data.Dataset):
    """Frame files → (uint8 tensor (3, crop, crop), error or None, the clip's audio or None);
    runs in loader workers. ``wavs``: the clip whose audio is read with frame i, by i (its last
    frame): its examples (:func:`clip_audio`) travel with that frame."""

    def __init__(self, paths: Sequence[str], preprocessing: Preprocessing,
                 wavs: dict[int, ClipJob] | None = None, audio: Any = None) -> None:
        self.paths = list(paths)
        self.pre = preprocessing
        self.wavs = (wavs or {}) if audio is not None else {}
        self.audio = audio

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str | None, Any]:
        job = self.wavs.get(i)
        wav = clip_audio(job, self.audio) if job is not None else None
        try:
            return self.pre.load_uint8(self.paths[i]), None, wav
        except Exception as e:  # a corrupt frame fails its clip, not the run
            c = self.pre.crop_size
            blank = torch.zeros((3, c, c), dtype=torch.uint8)
            return blank, f"{self.paths[i]}: cannot read frame ({e})", wav


def stack_frames(batch: list[tuple[torch.Tensor, str | None, Any]]
                 ) -> tuple[torch.Tensor, list[str | None], list[Any]]:
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch], [b[2] for b in batch]


def _frame_loader(paths: Sequence[str], dec: Decoding, opts: FeatureOptions,
                  wavs: dict[int, ClipJob]) -> DataLoader:
    """A DataLoader over frame files in order, batches mixing clips, workers prefetching (and
    reading each clip's wav with its last frame)."""
    w = opts.workers if len(paths) > opts.batch_size else 0  # a tiny job: no process start-up
    return DataLoader(
        FrameFiles(paths, dec.preprocessing, wavs, dec.audio),
        batch_size=opts.batch_size,
        shuffle=False,
        num_workers=w,
        collate_fn=stack_frames,
        pin_memory=dec.pin_memory,
        worker_init_fn=_worker_init if w else None,
        persistent_workers=bool(w),
        prefetch_factor=4 if w else None,
    )


# --------------------------------------------------------------------------- decoded videos


class DecodedVideos:
    """``--from-video``: the clips of subclip output folder(s) and of videos/folders (found as
    extract-frames finds them), decoded in the loader workers."""

    def __init__(self, inputs: Sequence[Path], opts: FeatureOptions) -> None:
        self.inputs = list(inputs)
        self.fps, self.every = opts.sampling()

    def clips(self) -> list[ClipJob]:
        from pipeline.clips import find_clips

        out = []
        for ref in find_clips(self.inputs):
            info = ref.source_ref.info if ref.source_ref is not None else None
            end = ref.end_s if ref.end_s is not None else (info.duration_s if info else None)
            rec = {"id": ref.clip_id, "source": ref.source, "start": ref.start_s or 0.0,
                   "end": end}
            out.append(ClipJob(Item(ref.clip_id, str(ref.path)), rec, ref))
        return out

    def prepare(self, job: ClipJob) -> None:
        """The Skip/MediaError its probe or a missing file calls for."""
        ref = job.ref
        if ref.source_ref is not None:
            ref.source_ref.raise_problem()
        else:
            ref.check_source()

    def batches(self, jobs: list[ClipJob], dec: Decoding, opts: FeatureOptions
                ) -> Iterator[Batch]:
        if not jobs:
            return
        clips = [(j, str(job.ref.path), job.ref.span, job.ref.duration_s, clip_length(job.rec))
                 for j, job in enumerate(jobs)]
        w = min(opts.workers, len(jobs))
        stream = VideoFrameStream(clips, dec.preprocessing, opts.batch_size, self.fps,
                                  self.every, dec.audio, dec.video)
        loader = DataLoader(
            stream,
            batch_size=None,  # the workers batch frames themselves (a worker's clips mix)
            num_workers=w,
            pin_memory=dec.pin_memory,
            worker_init_fn=_worker_init if w else None,
            prefetch_factor=4 if w else None,
        )
        for imgs, owners, times, events, video in loader:
            yield Batch(imgs, owners, times, [(j, ex, err) for j, _n, ex, err in events], video)

    def params(self) -> dict:
        return {"from_video": True, "fps": self.fps, "every": self.every, "frames": None}

    def image_attrs(self, attrs: dict) -> dict:
        sampling = {
            "stage": "features --from-video",
            "from_video": True,
            "params": {"fps": self.fps, "every": self.every, "size": None},
            "decode": "pipeline.media.decode (PyAV, rgb24), no intermediate files",
            "timestamps": f"{TIMESTAMPS} (media.iter_frames)",
        }
        pre = {**attrs.get("preprocessing", {}), "decode": "PyAV rgb24 frame -> PIL, RGB"}
        return {**attrs, "sampling": sampling, "preprocessing": pre}


def clip_length(rec: dict) -> float | None:
    """A clip's seconds as its record says (a plain video's: its probed duration), or None."""
    return rec["end"] - rec["start"] if rec.get("end") is not None else None


def iter_video_batches(
    clips: Sequence[tuple[int, str, tuple[float, float] | None, float | None, float | None]],
    preprocessing: Preprocessing,
    batch_size: int,
    fps: float | None,
    every: int | None,
    audio: Any,
    video: Any = None,
) -> Iterator[tuple]:
    """Decode clips ``(index, path, span, duration to decode, length)`` (this loader worker's
    share) into batches ``(uint8 frames, owner clip, timestamps, events, video windows)``; an
    event ``(clip, n_frames, audio examples, error)`` follows the clip's last frame, so a
    failed clip fails alone. With a video encoder (``video``), the same decode gives its
    frames, cut into windows as they complete (none ending after the clip's length)."""
    from PIL import Image

    from pipeline import media
    from pipeline.features.encoders.video import WindowStream

    info = torch.utils.data.get_worker_info()
    mine = clips if info is None else clips[info.id :: info.num_workers]
    sampler = media.FrameSampler(fps=fps, every=every)
    c = preprocessing.crop_size
    imgs: list[torch.Tensor] = []
    owners: list[int] = []
    times: list[float] = []
    events: list[tuple] = []

    def batch() -> tuple:
        x = torch.stack(imgs) if imgs else torch.zeros((0, 3, c, c), dtype=torch.uint8)
        return (x, np.array(owners, np.int64), np.array(times, np.float64), list(events),
                windows.take() if windows is not None else [])

    # With a video encoder, its frames (at its rate) come from the same decode as the image's.
    also = media.FrameSampler(fps=video.windowing.fps) if video is not None else None
    windows = WindowStream(video) if video is not None else None
    for j, path, span, duration_s, length in mine:
        n, pcm = 0, []
        if windows is not None:
            windows.start(j, length)
        try:
            for kind, t, data in media.decode(
                path, sampler=sampler, audio_rate_hz=audio.rate_hz if audio else None,
                span=span, duration_s=duration_s, also=also,
            ):
                if kind == "audio":
                    pcm.append(data)
                    continue
                if kind == "also":
                    if windows.push(data, t):  # a batch's worth of windows: hand them over
                        yield batch()
                        imgs, owners, times, events = [], [], [], []
                    continue
                # Through PIL, as the JPEG path and the weights' own transforms resize.
                imgs.append(preprocessing.uint8_from_image(Image.fromarray(data)))
                owners.append(j)
                times.append(t)
                n += 1
                if len(imgs) == batch_size:
                    yield batch()
                    imgs, owners, times, events = [], [], [], []
            # The same examples as from these samples written to a wav (both paths agree).
            ex = audio.from_pcm(np.concatenate(pcm), audio.rate_hz) if pcm else None
            if windows is not None:
                windows.finish()
            events.append((j, n, ex, None))
            continue
        except VpipeError as e:
            error = str(e)
        except Exception as e:  # one odd clip must not stop the others
            error = f"{path}: cannot decode ({type(e).__name__}: {e})"
        if windows is not None:
            windows.fail()
        events.append((j, n, None, error))
    if imgs or events:
        yield batch()


class VideoFrameStream(IterableDataset):
    """The loader's dataset for --from-video: each worker decodes its share of the clips."""

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __iter__(self) -> Iterator[tuple]:
        return iter_video_batches(*self.args)


def source_for(inputs: Sequence[str | os.PathLike], opts: FeatureOptions
               ) -> FrameFolders | DecodedVideos:
    """The source the options ask for."""
    paths = [Path(p) for p in inputs]
    return DecodedVideos(paths, opts) if opts.from_video else FrameFolders(paths)
