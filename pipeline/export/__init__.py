"""``vpipe export``: a feature folder as files other training stacks read, every modality it
holds (image, audio, and text when made with ``--text``; :mod:`pipeline.export.clips`).

``npz`` (default): ``OUT/<clip_id>.npz`` with each modality's rows, ``<m>_timestamps`` for the
timed ones, ``text_string`` with text, and the clip's ``source``, ``start``, ``end`` (``label``
with labels). ``npy``: one file per array, ``OUT/<clip_id>_<array>.npy``, as v-iashin/video_features
names its outputs. ``parquet`` and ``webdataset``: ``OUT/clips-NNNNN.parquet`` / ``.tar``, up to
``shard_size`` clips each, in the store's read order (:mod:`pipeline.export.tables`).

A stage like the others: a ``Run`` whose work items are clips (npz, npy) or groups of clips
(parquet, webdataset), each written under a temporary name and renamed, recorded in the manifest
so that a re-run resumes; the features' own attributes (models, weights, sampling) and the
labels' sha256 are the run's parameters, so exporting other features into the same folder is
refused without ``--overwrite``. Memory holds one clip, or one group of clips, at a time: never
the store (benchmarks/export_memory.py).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UsageError
from pipeline.export.clips import write_clip
from pipeline.export.tables import group_file, require, write_group
from pipeline.records import OK, DamagedRecord, Run, read_manifest
from pipeline.runner import Item, Summary, run_items
from pipeline.shards import FeatureStore, open_features

PER_CLIP = ("npz", "npy")
GROUPED = ("parquet", "webdataset")
FORMATS = (*PER_CLIP, *GROUPED)
SHARD_SIZE = 1000  # clips per parquet file / tar shard


@dataclass(frozen=True)
class ExportOptions:
    format: str = "npz"
    compress: bool = False
    shard_size: int = SHARD_SIZE

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise UsageError(f"--format {self.format!r}: use {', '.join(FORMATS)}")
        if self.compress and self.format != "npz":
            raise UsageError("--compress is for --format npz")
        if self.shard_size < 1:
            raise UsageError("--shard-size must be at least 1")


def export_features(folder: str | os.PathLike, out_dir: str | os.PathLike,
                    opts: ExportOptions, *, labels: Mapping[str, str] | None = None,
                    labels_file: str | os.PathLike | None = None, overwrite: bool = False,
                    quiet: bool = False) -> Summary:
    """The stage: every clip of the feature folder ``folder`` into ``out_dir`` (resumable).

    ``labels``: clip id -> label text (matched to the clips by the caller), written beside each
    clip's arrays (not with npy), their sha256 recorded; ``labels_file``: where they came from."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such feature folder")
    if labels is not None and opts.format == "npy":
        raise UsageError("--labels is for --format npz, parquet or webdataset (npy files hold "
                         "arrays only)")
    require(opts.format)  # a missing extra is said before anything is written
    with open_features(folder) as store:
        # The modalities: an export of before had no text rows, so it is not taken as done.
        params = {"format": opts.format, "compress": opts.compress,
                  "features": str(folder.resolve()), "features_attrs": store.attrs(),
                  "modalities": store.modalities}
        has_views = bool(store.views())
        if opts.format in GROUPED:
            params["shard_size"] = opts.shard_size
        if labels is not None:  # what was written: other labels are another export
            text = json.dumps(dict(labels), sort_keys=True, ensure_ascii=False)
            params["labels_sha256"] = hashlib.sha256(text.encode("utf-8")).hexdigest()
        if labels_file is not None:
            params["labels"] = str(Path(labels_file).resolve())
        items = _items(store, folder, opts)
        modalities, dims = store.modalities, {m: store.dim(m) for m in store.modalities}
    before = _previous_files(Path(out_dir)) if overwrite else []
    run = Run(Path(out_dir), "export", params, overwrite=overwrite,
              outputs=lambda rec: rec.get("files", []), inputs=[folder]).open()
    if run.reset:  # other options: what the previous export wrote goes, or readers mix both
        _remove(Path(out_dir), before)
    work = functools.partial(
        export_item, folder=str(folder), out_dir=Path(out_dir), opts=opts,
        modalities=modalities, dims=dims, labels=labels, attrs=params["features_attrs"],
        views=has_views)
    try:
        return run_items(run, items, work, workers=1, quiet=quiet)
    finally:
        _store.cache_clear()


def _previous_files(out: Path) -> list[str]:
    """The files a previous export recorded in ``out`` (none when there is no readable
    manifest: then nothing of it is known to be the export's)."""
    try:
        return [f for rec in read_manifest(out).values() for f in rec.get("files", [])]
    except (OSError, DamagedRecord):
        return []


def _remove(out: Path, files: list[str]) -> None:
    """Delete ``files`` (relative to ``out``) and the folders they leave empty."""
    for name in files:
        path = out / name
        if path.is_file() and out.resolve() in path.resolve().parents:
            path.unlink()
            if path.parent != out:
                with contextlib.suppress(OSError):  # not empty: another output is there
                    path.parent.rmdir()


def _items(store: FeatureStore, folder: Path, opts: ExportOptions) -> list[Item]:
    """A clip per item (npz, npy), or ``shard_size`` clips per item (the grouped formats), in
    the store's read order: shard by shard."""
    ids = store.clip_ids_in_read_order()
    if opts.format in PER_CLIP:
        return [Item(c, f"{folder}:{c}", None) for c in ids]
    n = opts.shard_size
    return [Item(group_file(k, opts.format), f"{folder}:{ids[a]}", ids[a: a + n])
            for k, a in enumerate(range(0, len(ids), n))]


@functools.lru_cache(maxsize=1)
def _store(folder: str) -> FeatureStore:
    """One store per process, for all the clips it exports. The items come in read order, so
    two open shards are enough: each open shard holds ~1 MB of HDF5 caches, and the reader's
    default cap (64 to 512 open) would let those pile up over a large store."""
    store = open_features(folder)
    store.max_open_shards = 2
    return store


def export_item(item: Item, *, folder: str, out_dir: Path, opts: ExportOptions,
                modalities: list[str], dims: dict[str, int],
                labels: Mapping[str, str] | None, attrs: dict, views: bool = False) -> dict:
    """Write one clip's files, or one group's file; its record names them. ``views``: the
    store holds augmented views (every parquet file then has a ``view_of`` column)."""
    store = _store(folder)
    if opts.format in PER_CLIP:
        clip = store[item.id]
        names = write_clip(clip, out_dir, opts.format, modalities, opts.compress, labels)
        # Only what a resume needs: the manifest keeps a record per clip in memory.
        return {"id": item.id, "status": OK, "error": None, "files": names}
    clips = [store[c] for c in item.data]
    write_group(out_dir / item.id, opts.format, clips, modalities, dims, labels, attrs, views)
    return {"id": item.id, "status": OK, "error": None, "files": [item.id],
            "clips": len(clips), "first": item.data[0], "last": item.data[-1]}
