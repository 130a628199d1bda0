"""``vpipe features``: frame and audio features of every clip into HDF5 shards.

The *plan* reads the extract-frames manifest(s), drops the clips already in complete shards and
fails at once the clips whose frame files are missing. The *loader* (a torch DataLoader over the
frames of all remaining clips, in order) decodes, resizes and crops JPEGs in worker processes and
hands over uint8 batches that mix clips. The *encoder* loop normalises each batch in one op, runs
the ResNet, and scatters rows back to their clips; a clip whose frames are all done gets its
VGGish rows and goes into the current :class:`~pipeline.shards.ShardWriter`. A shard is renamed
into place when its last clip is written, then the index and the manifest lines follow, so an
interrupted run loses at most the shard in progress.

With ``--from-video`` the inputs are clips (a subclip output folder, or videos/folders) and the
loader's workers decode them directly, no JPEGs: that path lives in
:mod:`pipeline.features_video`, imported only when asked for.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import Skip, UsageError, VpipeError
from pipeline.records import (
    FAILED,
    OK,
    SKIPPED,
    Run,
    Summary,
    progress,
    read_manifest,
    read_run_info,
    report_error,
)

STAGE = "features"
SHARD_MAX_BYTES = 1 << 30  # a shard closes at this estimated size even below --shard-size


def default_workers() -> int:
    """Loader processes: one core is left to the model (its threads use the rest)."""
    return max(1, min(4, (os.cpu_count() or 2) - 1))


@dataclass(frozen=True)
class FeatureOptions:
    """Everything that decides the contents of the shards, plus how fast they are made."""

    image_model: str = "resnet50"
    image_weights: str = "imagenet"
    audio_model: str = "vggish"
    audio_weights: str = "release"
    audio_postprocess: bool = True
    audio_pca: str = "release"
    dtype: str = "float32"
    compression: str = "none"
    shard_size: int = 256
    # --from-video: decode the clips themselves, sampling frames as extract-frames does.
    from_video: bool = False
    fps: float | None = None
    every: int | None = None
    # Speed only: not part of the recorded parameters.
    batch_size: int = 32
    workers: int = field(default_factory=default_workers)
    device: str = "auto"
    precision: str = "auto"

    def check(self) -> None:
        if self.audio_model not in ("vggish", "none"):
            raise UsageError(f"--audio-model {self.audio_model!r}: use vggish or none")
        if self.dtype not in ("float32", "float16"):
            raise UsageError(f"--dtype {self.dtype!r}: use float32 or float16")
        if self.compression not in ("none", "gzip", "lzf"):
            raise UsageError(f"--compression {self.compression!r}: use none, gzip or lzf")
        if self.precision not in ("auto", "fp32", "fp16", "bf16"):
            raise UsageError(f"--precision {self.precision!r}: use auto, fp32, fp16 or bf16")
        if self.shard_size < 1 or self.batch_size < 1:
            raise UsageError("--shard-size and --batch-size must be at least 1")
        if self.from_video:
            self.sampler()  # validates fps/every
        elif self.fps is not None or self.every is not None:
            raise UsageError("--fps/--every sample frames from videos: they need --from-video")

    def sampling(self) -> tuple[float | None, int | None]:
        """(fps, every) for --from-video: extract-frames' default (1 frame/s) when neither."""
        if self.fps is None and self.every is None:
            return 1.0, None
        return self.fps, self.every

    def sampler(self) -> Any:
        from pipeline.media import FrameSampler

        fps, every = self.sampling()
        return FrameSampler(fps=fps, every=every)


@dataclass
class ClipJob:
    """One clip to encode: its input record, frame files, and the rows computed so far."""

    rec: dict
    frame_paths: list[Path]
    timestamps: np.ndarray
    audio_path: Path | None
    group: int = 0
    last_in_group: bool = False
    feats: np.ndarray | None = None
    remaining: int = 0
    error: str | None = None

    @property
    def id(self) -> str:
        return self.rec["id"]


# --------------------------------------------------------------------------- plan


def read_inputs(inputs: Sequence[str | os.PathLike]) -> list[tuple[dict, Path]]:
    """The ok clips of extract-frames output folder(s), each with the folder it lives in."""
    out: list[tuple[dict, Path]] = []
    seen: dict[str, Path] = {}
    for folder in map(Path, inputs):
        if not (folder / "manifest.jsonl").is_file():
            raise UsageError(
                f"{folder}: not an extract-frames output folder (no manifest.jsonl); "
                "for videos or a subclip output folder, add --from-video"
            )
        records = [r for r in read_manifest(folder).values() if r.get("status") == OK]
        _check_frames_folder(folder, records)
        for rec in records:
            if rec["id"] in seen:
                raise UsageError(f"clip id {rec['id']!r} is in both {seen[rec['id']]} and {folder}")
            seen[rec["id"]] = folder
            out.append((rec, folder))
    return out


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


def make_job(rec: dict, folder: Path) -> ClipJob:
    """A clip's job, or a ValueError naming what is wrong with its record or files."""
    for key in ("frames_dir", "n_frames", "timestamps"):
        if key not in rec:
            raise ValueError(f"the input manifest record has no {key!r}")
    paths = frame_files(rec, folder)
    ts = np.asarray(rec["timestamps"], dtype="f8")
    if ts.shape[0] != len(paths):
        raise ValueError(f"{len(paths)} frames but {ts.shape[0]} timestamps in the manifest")
    for p in paths:
        if not p.is_file():
            raise ValueError(f"{p}: frame file missing")
    audio = folder / rec["audio"] if rec.get("has_audio") and rec.get("audio") else None
    if audio is not None and not audio.is_file():
        raise ValueError(f"{audio}: audio file missing")
    return ClipJob(rec, paths, ts, audio, remaining=len(paths))


def assign_shards(jobs: list[ClipJob], shard_size: int, bytes_per_row: int) -> None:
    """Group clips into shards of ``shard_size`` clips, closing early near SHARD_MAX_BYTES."""
    group = size = count = 0
    for job in jobs:
        est = (len(job.frame_paths) + int(job.rec.get("n_samples") or 0) // 15360) * bytes_per_row
        if count and (count >= shard_size or size + est > SHARD_MAX_BYTES):
            group, size, count = group + 1, 0, 0
        job.group, size, count = group, size + est, count + 1
    for a, b in zip(jobs, jobs[1:], strict=False):
        a.last_in_group = a.group != b.group
    if jobs:
        jobs[-1].last_in_group = True


# --------------------------------------------------------------------------- loader


class FrameDataset:
    """Frame files → (uint8 tensor (3, crop, crop), error or None); runs in loader workers."""

    def __init__(self, paths: Sequence[str], preprocessing: Any) -> None:
        self.paths = list(paths)
        self.pre = preprocessing

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Any, str | None]:
        import torch

        try:
            return self.pre.load_uint8(self.paths[i]), None
        except Exception as e:  # a corrupt frame fails its clip, not the run
            c = self.pre.crop_size
            blank = torch.zeros((3, c, c), dtype=torch.uint8)
            return blank, f"{self.paths[i]}: cannot read frame ({e})"


def collate(batch: list[tuple[Any, str | None]]) -> tuple[Any, list[str | None]]:
    import torch

    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]


def _worker_init(_: int) -> None:
    import torch

    torch.set_num_threads(1)  # decoding is per-process work; the model owns the other threads


def make_loader(paths: Sequence[str], preprocessing: Any, opts: FeatureOptions, pin: bool):
    """A DataLoader over frame files in order, batches mixing clips, workers prefetching."""
    from torch.utils.data import DataLoader

    w = opts.workers if len(paths) > opts.batch_size else 0  # a tiny job: no process start-up
    return DataLoader(
        FrameDataset(paths, preprocessing),
        batch_size=opts.batch_size,
        shuffle=False,
        num_workers=w,
        collate_fn=collate,
        pin_memory=pin,
        worker_init_fn=_worker_init if w else None,
        persistent_workers=bool(w),
        prefetch_factor=4 if w else None,
    )


# --------------------------------------------------------------------------- the stage


@dataclass
class Encoders:
    image: Any
    audio: Any
    device: Any
    precision: str

    def run_params(self, opts: FeatureOptions, inputs: Sequence[Path]) -> dict:
        """Parameters that decide the output (a re-run with others is refused)."""
        keep = (
            "image_model",
            "audio_model",
            "audio_postprocess",
            "dtype",
            "compression",
            "shard_size",
        )
        audio = self.audio
        fps, every = opts.sampling() if opts.from_video else (None, None)
        return {
            "inputs": [str(Path(p).resolve()) for p in inputs],
            **{k: v for k, v in asdict(opts).items() if k in keep},
            "image_weights": _identity(self.image.weights),
            "audio_weights": _identity(audio.weights) if audio else None,
            "audio_pca": _identity(audio.pca_info) if audio and audio.pca_info else None,
            "precision": self.precision,
            "from_video": opts.from_video,
            "fps": fps,
            "every": every,
            # The frames are part of what decides the features: inputs re-extracted with other
            # options (same folder, --overwrite) must not resume onto the old clips' rows.
            "frames": None if opts.from_video else [_frames_params(p) for p in inputs],
        }

    def embed_images(self, imgs: Any) -> np.ndarray:
        """A batch of uint8 images (N, 3, crop, crop) -> float32 features (N, dim): normalised
        as the weights' preset says, cast to the precision, channels-last where it pays."""
        import torch

        from pipeline.models import autocast_dtype

        x = self.image.preprocessing.normalize(imgs.to(self.device, non_blocking=True))
        cast = autocast_dtype(self.precision)
        if cast is not None:
            x = x.to(cast)
        if self.device.type == "cuda" or cast is not None:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return self.image.model(x).float().cpu().numpy()


def _frames_params(folder: Path) -> dict | None:
    """The options of the extract-frames run that made ``folder`` (None: no vpipe.json)."""
    return (read_run_info(folder) or {}).get("params")


def _identity(w: Any) -> dict:
    """Weights as a resume key: a file by its content, so moving it does not block a resume."""
    return {k: v for k, v in w.attrs().items() if not (w.kind == "file" and k == "name")}


def load_encoders(opts: FeatureOptions) -> Encoders:
    """Models, weights, device and precision: all resolved before any shard is started."""
    import torch

    from pipeline.models import (
        autocast_dtype,
        load_audio_encoder,
        load_image_encoder,
        pick_device,
        pick_precision,
        resolve_weights,
    )

    opts.check()
    device = pick_device(opts.device)
    precision = pick_precision(opts.precision, device)
    want_audio = opts.audio_model == "vggish"
    # Every weights file is looked for first: one error lists all the missing ones.
    image_w, audio_w = resolve_weights(
        opts.image_model,
        opts.image_weights,
        (opts.audio_weights, opts.audio_postprocess, opts.audio_pca) if want_audio else None,
    )
    image = load_image_encoder(opts.image_model, opts.image_weights, image_w)
    audio = None
    if want_audio:
        audio = load_audio_encoder(
            opts.audio_weights, opts.audio_postprocess, opts.audio_pca, audio_w
        )
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    image.model.to(device)
    if audio is not None:
        audio.model.to(device)
        audio.pca = audio.pca and (audio.pca[0].to(device), audio.pca[1].to(device))
    cast = autocast_dtype(precision)
    if cast is not None:
        # Half-precision weights rather than autocast: the BN-folded convs are all there is,
        # and autocast would re-cast every weight at every call (bf16, 2 cores: +7%).
        image.model.to(cast)
    if device.type == "cuda" or cast is not None:
        image.model.to(memory_format=torch.channels_last)  # bf16, 2 cores: +28%
    return Encoders(image, audio, device, precision)


def extract_features(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    opts: FeatureOptions,
    *,
    overwrite: bool = False,
    quiet: bool = False,
    on_shard: Callable[[Path], None] | None = None,
) -> Summary:
    """Encode every ok clip of the extract-frames folder(s) ``inputs`` into shards in ``out_dir``.

    ``on_shard`` is called with each finished shard (tests use it to interrupt a run).
    """
    import torch

    from pipeline import shards

    inputs = [Path(p) for p in inputs]
    opts.check()
    video: Any = None
    if opts.from_video:
        from pipeline import features_video as video  # only this path needs the decoder side
    clips: list[tuple[dict, Any]] = (
        video.read_video_inputs(inputs) if video else read_inputs(inputs)
    )
    enc = load_encoders(opts)
    out = Path(out_dir)
    params = enc.run_params(opts, inputs)
    info = read_run_info(out) if out.is_dir() else None
    if overwrite and info is not None and info.get("params") != _canonical(params):
        for p in shards.shard_paths(out):
            p.unlink()
    versions = {"torch": torch.__version__, "h5py": shards.h5py.__version__}
    run = Run(out, STAGE, params, overwrite=overwrite, versions=versions).open()

    in_shards = {r["clip_id"]: r for r in shards.rebuild_index(out)}
    jobs: list[Any] = []
    for rec, folder in clips:
        if rec["id"] in in_shards:
            run.summary.resumed += 1
            if run.previous.get(rec["id"], {}).get("status") != OK:  # crashed before recording
                run.record(_ok_record(rec, in_shards[rec["id"]]))
                run.summary.done -= 1
            continue
        if opts.from_video:
            try:
                jobs.append(video.make_video_job(rec, folder))
            except Skip as e:
                run.record({"id": rec["id"], "status": SKIPPED, "error": str(e),
                            "source": rec.get("source")})
            except VpipeError as e:
                _fail(run, rec, str(e))
            continue
        try:
            jobs.append(make_job(rec, folder))
        except ValueError as e:
            _fail(run, rec, str(e))
    itemsize = np.dtype(opts.dtype).itemsize
    try:
        if opts.from_video:
            video.encode_videos(jobs, enc, opts, run, out, quiet=quiet, on_shard=on_shard)
        else:
            assign_shards(jobs, opts.shard_size, enc.image.dim * itemsize)
            _encode(jobs, enc, opts, run, out, inputs=inputs, quiet=quiet, on_shard=on_shard)
    finally:
        summary = run.close([rec["id"] for rec, _ in clips])
    if not quiet:
        print(summary.line(), file=sys.stderr)
    return summary


def _canonical(params: dict) -> dict:
    import json

    return json.loads(json.dumps(params, default=str))


def _ok_record(rec: dict, row: dict) -> dict:
    return {
        "id": rec["id"],
        "status": OK,
        "source": rec.get("source"),
        "start": rec.get("start"),
        "end": rec.get("end"),
        "shard": row["shard"],
        "row": row["row"],
        "n_frames": row["n_frames"],
        "n_audio": row["n_audio"],
    }


def _fail(run: Run, rec: dict, message: str) -> None:
    run.record({"id": rec["id"], "status": FAILED, "error": message, "source": rec.get("source")})
    report_error(STAGE, rec["id"], message)


def _encode(
    jobs: list[ClipJob],
    enc: Encoders,
    opts: FeatureOptions,
    run: Run,
    out: Path,
    *,
    inputs: Sequence[Path],
    quiet: bool,
    on_shard: Callable[[Path], None] | None,
) -> None:
    """Stream all frames through the ResNet; write clips and shards as they complete."""
    from pipeline import shards
    from pipeline.models import autocast_dtype

    pre, dev = enc.image.preprocessing, enc.device
    # Frame k of the stream belongs to clip owner[k], as its row k - first[owner[k]].
    counts = np.array([len(job.frame_paths) for job in jobs], dtype=np.int64)
    owner = np.repeat(np.arange(len(jobs)), counts)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(jobs) else counts
    paths = [str(p) for job in jobs for p in job.frame_paths]
    cast = autocast_dtype(enc.precision)
    number = shards.next_shard_number(out)
    writer: shards.ShardWriter | None = None
    members: list[ClipJob] = []
    attrs = {
        "image": {**enc.image.attrs(), "sampling": _sampling(inputs), "precision": enc.precision},
        "audio": {**enc.audio.attrs(), "precision": enc.precision}
        if enc.audio
        else {"model": "none", "dim": 0},
    }
    audio_dim = 128 if enc.audio else 0

    def finish(job: ClipJob) -> None:
        nonlocal writer, number, members
        clip = None
        if job.error is None:
            try:
                clip = _clip_features(job, enc, cast)
            except Exception as e:  # an unreadable wav fails this clip only
                job.error = f"{job.audio_path}: cannot read audio ({type(e).__name__}: {e})"
        if clip is not None:
            if writer is None:
                writer = shards.ShardWriter(
                    out / shards.shard_name(number),
                    image_dim=enc.image.dim,
                    audio_dim=audio_dim,
                    attrs=attrs,
                    dtype=opts.dtype,
                    compression=None if opts.compression == "none" else opts.compression,
                )
            writer.add(clip)
            members.append(job)
        if job.error is not None:
            _fail(run, job.rec, job.error)
        job.feats = None  # free the rows: they are in the shard now
        if job.last_in_group and writer is not None:
            w, writer = writer, None
            rows = w.close()
            shards.add_to_index(out, rows)
            number += 1
            index = {r["clip_id"]: r for r in rows}
            for m in members:
                run.record(_ok_record(m.rec, index[m.id]))
            members = []
            if on_shard is not None:
                on_shard(w.path)

    bar = progress(total=len(paths), desc=STAGE, quiet=quiet)
    nxt = 0
    try:
        while nxt < len(jobs) and jobs[nxt].remaining == 0:
            finish(jobs[nxt])
            nxt += 1
        if paths:
            pos = 0
            for imgs, errors in make_loader(paths, pre, opts, pin=dev.type == "cuda"):
                y = enc.embed_images(imgs)
                for k in range(y.shape[0]):
                    j = int(owner[pos + k])
                    job = jobs[j]
                    if job.feats is None:  # rows only for clips in flight, not all at once
                        job.feats = np.empty((len(job.frame_paths), enc.image.dim), np.float32)
                    job.feats[pos + k - first[j]] = y[k]
                    job.remaining -= 1
                    if errors[k] and job.error is None:
                        job.error = errors[k]
                pos += y.shape[0]
                bar.update(y.shape[0])
                while nxt < len(jobs) and jobs[nxt].remaining == 0:
                    finish(jobs[nxt])
                    nxt += 1
    finally:
        bar.close()
        if writer is not None:
            writer.abort()


def _clip_features(job: ClipJob, enc: Encoders, cast: Any):
    """The ClipFeatures of a clip whose frame rows are done: adds its VGGish rows."""
    import torch

    from pipeline.models import audio_examples
    from pipeline.shards import ClipFeatures

    audio = np.zeros((0, 128 if enc.audio else 0), np.float32)
    audio_ts = np.zeros(0)
    if enc.audio is not None and job.audio_path is not None:
        ex, audio_ts = audio_examples(job.audio_path)
        with torch.autocast(enc.device.type, dtype=cast or torch.float32, enabled=cast is not None):
            audio = enc.audio.embed(ex.to(enc.device))
    r = job.rec
    return ClipFeatures(
        job.id,
        str(r.get("source") or job.id),
        float(r.get("start") or 0.0),
        float(r.get("end") or 0.0),
        job.feats if job.feats is not None else np.zeros((0, enc.image.dim), np.float32),
        job.timestamps,
        audio,
        audio_ts,
    )


def _sampling(inputs: Sequence[Path]) -> dict:
    """How the frames were sampled, from the extract-frames run that made them."""
    for folder in inputs:
        info = read_run_info(folder)
        if info:
            return {
                "stage": info.get("stage"),
                "params": info.get("params", {}),
                "timestamps": "seconds from clip start, per frame (from its manifest)",
            }
    return {"timestamps": "seconds from clip start, per frame (from its manifest)"}
