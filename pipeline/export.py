"""``vpipe export``: a feature folder as plain NumPy files, one per clip (or per clip and array),
for tools that want files rather than HDF5 shards.

``npz`` (default): ``OUT/<clip_id>.npz`` holding ``image``, ``image_timestamps``, ``audio``,
``audio_timestamps`` and the clip's ``source``, ``start``, ``end``. ``npy``: one file per array,
``OUT/<clip_id>_<array>.npy``, as video_features names its outputs. Each file is written under a
temporary name and renamed; the manifest (one record per clip) makes a re-run resume, and the
features' own attributes (models, weights, sampling) are the run's parameters, so exporting
other features into the same folder is refused without ``--overwrite``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import UsageError
from pipeline.files import atomic_path
from pipeline.records import OK, Run
from pipeline.runner import Item, Summary, run_items
from pipeline.shards import FeatureStore, open_features

FORMATS = ("npz", "npy")
ARRAYS = ("image", "image_timestamps", "audio", "audio_timestamps")


@dataclass(frozen=True)
class ExportOptions:
    format: str = "npz"
    compress: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise UsageError(f"--format {self.format!r}: use npz or npy")
        if self.compress and self.format != "npz":
            raise UsageError("--compress is for --format npz")


def files_of(clip_id: str, fmt: str) -> list[str]:
    """The files one clip is written as."""
    if fmt == "npz":
        return [f"{clip_id}.npz"]
    return [f"{clip_id}_{a}.npy" for a in ARRAYS]


def export_features(folder: str | os.PathLike, out_dir: str | os.PathLike,
                    opts: ExportOptions, *, overwrite: bool = False,
                    quiet: bool = False) -> Summary:
    """The stage: every clip of the feature folder ``folder`` into ``out_dir`` (resumable)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such feature folder")
    with open_features(folder) as store:
        params = {"format": opts.format, "compress": opts.compress,
                  "features": str(folder.resolve()), "features_attrs": store.attrs()}
        ids = store.clip_ids
    run = Run(Path(out_dir), "export", params, overwrite=overwrite,
              outputs=lambda rec: rec.get("files", []), inputs=[folder]).open()
    items = [Item(c, f"{folder}:{c}", None) for c in ids]
    work = functools.partial(export_clip, folder=str(folder), out_dir=Path(out_dir), opts=opts)
    try:
        return run_items(run, items, work, workers=1, quiet=quiet)
    finally:
        _store.cache_clear()


@functools.lru_cache(maxsize=1)
def _store(folder: str) -> FeatureStore:
    return open_features(folder)  # one per process, for all the clips it exports


def export_clip(item: Item, *, folder: str, out_dir: Path, opts: ExportOptions) -> dict:
    """Write one clip's files; its record names them."""
    clip = _store(folder)[item.id]
    arrays = {a: np.asarray(getattr(clip, a)) for a in ARRAYS}
    names = files_of(item.id, opts.format)
    if opts.format == "npz":
        meta = {"source": np.asarray(clip.source), "start": np.float64(clip.start),
                "end": np.float64(clip.end)}
        with atomic_path(out_dir / names[0]) as tmp, tmp.open("wb") as f:
            (np.savez_compressed if opts.compress else np.savez)(f, **arrays, **meta)
    else:
        for a, name in zip(ARRAYS, names, strict=True):
            with atomic_path(out_dir / name) as tmp, tmp.open("wb") as f:
                np.save(f, arrays[a])
    return {"id": item.id, "status": OK, "error": None, "source": clip.source,
            "start": clip.start, "end": clip.end, "files": names,
            "n_frames": clip.n("image"), "n_audio": clip.n("audio")}
