"""Reading a feature folder: :class:`FeatureStore`, what the trainer and users share."""

from __future__ import annotations

import os
import sys
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.ids import VIEW_MARK, view_of
from pipeline.shards.index import IndexColumns, read_columns
from pipeline.shards.schema import (
    MAX_OPEN_SHARDS,
    MODALITIES,
    TEXT,
    VIDEO,
    ClipFeatures,
    DamagedFeatures,
    index_rows,
    open_shard,
    read_attrs,
    read_dataset,
    shard_paths,
)


@dataclass
class _Shard:
    path: Path
    file: h5py.File | None = None
    offsets: dict[str, np.ndarray] = field(default_factory=dict)
    start: np.ndarray | None = None
    end: np.ndarray | None = None
    row_of: dict[str, int] = field(default_factory=dict)  # from the shard's own /clip_ids
    text_strings: list[str] | None = None  # None: a shard without /text
    text_dim: int = 0
    video_padded: np.ndarray | None = None  # None: a shard without /video
    video_dropped: np.ndarray | None = None
    # Datasets looked up once: h5py's path lookup cost more than the read of a clip's rows.
    datasets: dict[str, h5py.Dataset] = field(default_factory=dict)

    def open(self) -> h5py.File:
        if self.file is None:
            f = open_shard(self.path)
            try:
                for m in MODALITIES:
                    self.offsets[m] = read_dataset(f, f"{m}/offsets")
                self.start = read_dataset(f, "start")
                self.end = read_dataset(f, "end")
                self.row_of = {c: i for i, c in enumerate(read_dataset(f, "clip_ids"))}
                if TEXT in f:
                    self.offsets[TEXT] = read_dataset(f, f"{TEXT}/offsets")
                    self.text_strings = list(read_dataset(f, f"{TEXT}/strings"))
                    self.text_dim = int(f[TEXT]["features"].shape[1])
                if VIDEO in f:
                    self.offsets[VIDEO] = read_dataset(f, f"{VIDEO}/offsets")
                    self.video_padded = read_dataset(f, f"{VIDEO}/padded")
                    self.video_dropped = read_dataset(f, f"{VIDEO}/dropped")
            except DamagedFeatures:
                f.close()
                raise
            self.file = f
        return self.file

    def row(self, clip_id: str) -> int:
        """The clip's row, by the shard's /clip_ids (the index is only a cache of it)."""
        if clip_id not in self.row_of:
            raise DamagedFeatures(
                f"{self.path}: index.jsonl places {clip_id} in this shard but its /clip_ids "
                "lack it; run `vpipe features` on the folder again to rebuild the index")
        return self.row_of[clip_id]

    def read(self, key: str, sel: Any = ()) -> np.ndarray:
        f = self.open()
        ds = self.datasets.get(key)
        if ds is None:
            ds = f.get(key)
            if not isinstance(ds, h5py.Dataset):
                return read_dataset(f, key, sel)  # raises, naming the shard and the dataset
            self.datasets[key] = ds
        return read_dataset(f, key, sel, ds)

    def close(self) -> None:
        self.datasets.clear()
        if self.file is not None:
            self.file.close()
            self.file = None


class FeatureStore:
    """Read access to a feature folder: ``store[clip_id]``, iteration, sources, selection.

    Only the index is read on open, into columns (:class:`IndexColumns`, ~40 bytes a clip;
    rebuilt in memory from the shards, with a note, when it is torn, lacks a field or misses a
    shard); a shard file is opened on first use and kept open (the ``max_open_shards`` most
    recently used), its /clip_ids decide each clip's row, and a clip read is one slice per
    dataset (each chunk checked by its fletcher32 checksum).
    """

    max_open_shards = MAX_OPEN_SHARDS

    def __init__(self, folder: str | os.PathLike, rows: Sequence[dict] | IndexColumns | None = None,
                 noted: set[str] | None = None) -> None:
        self.folder = Path(folder)
        self._noted = set() if noted is None else noted  # notes said once per store
        if rows is None:
            rows = self._index_columns()
        self._cols = rows if isinstance(rows, IndexColumns) else IndexColumns.from_rows(rows)
        self._checked: set[int] = set()  # shard codes whose rows were checked against the shard
        self._shards: dict[str, _Shard] = {}
        self._open: OrderedDict[str, _Shard] = OrderedDict()  # open shards, least recent first

    def _note(self, text: str) -> None:
        if text not in self._noted:
            self._noted.add(text)
            print(f"vpipe: note: {text}", file=sys.stderr)

    def _index_columns(self) -> IndexColumns:
        """The index, or the shards' own rows when the index cannot be trusted whole."""
        paths = shard_paths(self.folder)
        cols, problems = read_columns(self.folder)
        names = {p.name for p in paths}
        for name in cols.shard_names:
            if name not in names:  # deleted: its clips cannot be had from the others
                open_shard(self.folder / name)  # raises, naming it and the fix
        unlisted = sorted(names - set(cols.shard_names))
        if unlisted and not problems:
            problems = [f"{self.folder / 'index.jsonl'}: {unlisted[0]} is not in it"]
        if problems and paths:
            self._note(f"{problems[0]}; reading the clips from the shards instead (`vpipe "
                       "features` on this folder again rewrites the index)")
            cols = IndexColumns.from_rows(r for p in paths for r in index_rows(p))
        return cols

    # -- metadata ------------------------------------------------------------------------------

    @property
    def clip_ids(self) -> list[str]:
        return self._cols.clip_ids()

    def info(self, clip_id: str) -> dict:
        """The index row of a clip: shard, row, source, n_frames, n_audio."""
        return self._cols.row_dict(self._position(clip_id))

    def column(self, name: str) -> np.ndarray | list[str]:
        """One index column for all clips, in ``clip_ids`` order: ``n_frames``, ``n_audio``,
        ``row`` (and ``n_video`` with video) as arrays; ``source``, ``shard`` as lists of
        names."""
        c = self._cols
        if name in ("source", "shard"):
            names = c.source_names if name == "source" else c.shard_names
            return [names[k] for k in getattr(c, name).tolist()]
        return getattr(c, name).copy()

    def source_of(self) -> dict[str, str]:
        """Clip id → its source id."""
        return dict(zip(self.clip_ids, self.column("source"), strict=True))

    def views(self) -> dict[str, str]:
        """Augmented view id -> the clip it is a view of (``extract-frames --views``; the ids
        say it: ``<clip_id>~<k>``, and the shards record it in ``/view_of``)."""
        return {cid: view_of(cid) for cid in self.clip_ids if VIEW_MARK in cid}

    def sources(self) -> dict[str, list[str]]:
        """Source id → its clip ids, in index order."""
        out: dict[str, list[str]] = {}
        for cid, src in zip(self.clip_ids, self.column("source"), strict=True):
            out.setdefault(src, []).append(cid)
        return out

    def attrs(self, modality: str | None = None) -> dict[str, Any]:
        """Attributes of the first shard's root (``None``) or of a modality group."""
        if not len(self._cols):
            return {}
        f = self._shard(self._cols.shard_of(0)).open()
        if modality is not None and modality not in f:
            return {}  # /text in a store made without --text
        return read_attrs(f if modality is None else f[modality])

    def dim(self, modality: str) -> int:
        return int(self.attrs(modality).get("dim", 0))

    def text_string(self, clip_id: str) -> str:
        """The title a clip was given ("" without one), read without its features."""
        pos = self._position(clip_id)
        sh = self._shard(self._cols.shard_of(pos))
        return sh.text_strings[sh.row(clip_id)] if sh.text_strings is not None else ""

    @property
    def has_text(self) -> bool:
        """Whether the store was made with ``vpipe features --text`` (its shards have /text)."""
        return self.dim(TEXT) > 0

    @property
    def has_video(self) -> bool:
        """Whether the store was made with ``vpipe features --video-model`` (/video)."""
        return self.dim(VIDEO) > 0

    @property
    def modalities(self) -> list[str]:
        """The modalities its shards hold, in schema order: the timed ones (``MODALITIES``,
        each with timestamps, in every shard), ``text`` when made with ``--text`` and
        ``video`` (windows with start/end times) when made with ``--video-model``. What
        export and the Dataset go through, so that a new modality needs no change there."""
        return [*MODALITIES, *([TEXT] if self.has_text else []),
                *([VIDEO] if self.has_video else [])]

    def __len__(self) -> int:
        return len(self._cols)

    def __contains__(self, clip_id: object) -> bool:
        return isinstance(clip_id, str) and self._cols.position(clip_id) is not None

    def _position(self, clip_id: str) -> int:
        i = self._cols.position(clip_id)
        if i is None:
            raise KeyError(clip_id)
        return i

    # -- data ----------------------------------------------------------------------------------

    def _shard(self, name: str) -> _Shard:
        """The shard, opened; at most ``max_open_shards`` stay open (the least recently used is
        closed), so a store of thousands of small shards does not run out of file handles."""
        if name not in self._shards:
            self._shards[name] = _Shard(self.folder / name)
        sh = self._shards[name]
        if name in self._open:
            self._open.move_to_end(name)
        else:
            sh.open()
            self._open[name] = sh
            self._check_rows(sh, name)
            while len(self._open) > self.max_open_shards:
                self._open.popitem(last=False)[1].close()
        return sh

    def _check_rows(self, sh: _Shard, name: str) -> None:
        """Correct index rows that disagree with the shard's /clip_ids, and say so (once per
        shard: the check costs O(the shard's clips))."""
        c = self._cols
        code = c.shard_names.index(name) if name in c.shard_names else -1
        if code < 0 or code in self._checked:
            return
        self._checked.add(code)
        mine = np.flatnonzero(c.shard == code)
        true_rows = np.array([sh.row(c.clip_id(i)) for i in mine], dtype=np.int32)
        wrong = mine[c.row[mine] != true_rows]
        if len(wrong):
            c.row[mine] = true_rows
            self._note(f"{sh.path}: index.jsonl gives {len(wrong)} clip(s) another row than the "
                       f"shard's /clip_ids (e.g. {c.clip_id(int(wrong[0]))}); using the shard's "
                       "(`vpipe features` on this folder again rewrites the index)")

    def _clip(self, sh: _Shard, i: int, pos: int, data: dict | None = None) -> ClipFeatures:
        arrays = {}
        for m in MODALITIES:
            a, b = int(sh.offsets[m][i]), int(sh.offsets[m][i + 1])
            if data is None:
                arrays[m] = sh.read(f"{m}/features", slice(a, b))
                arrays[f"{m}_timestamps"] = sh.read(f"{m}/timestamps", slice(a, b))
            else:
                arrays[m] = data[m][a:b]
                arrays[f"{m}_timestamps"] = data[f"{m}_timestamps"][a:b]
        if sh.text_strings is not None:
            a, b = int(sh.offsets[TEXT][i]), int(sh.offsets[TEXT][i + 1])
            key = f"{TEXT}/features"
            arrays[TEXT] = sh.read(key, slice(a, b)) if data is None else data[TEXT][a:b]
            arrays["text_string"] = sh.text_strings[i]
        if sh.video_padded is not None:
            a, b = int(sh.offsets[VIDEO][i]), int(sh.offsets[VIDEO][i + 1])
            for key, name in (("features", VIDEO), ("start", "video_start"),
                              ("end", "video_end")):
                k = f"{VIDEO}/{key}"
                arrays[name] = sh.read(k, slice(a, b)) if data is None else data[k][a:b]
            arrays["video_padded"] = int(sh.video_padded[i])
            arrays["video_dropped"] = int(sh.video_dropped[i])
        cid = self._cols.clip_id(pos)
        return ClipFeatures(cid, self._cols.source_of(pos), float(sh.start[i]),
                            float(sh.end[i]), **arrays, view_of=view_of(cid) or "")

    def __getitem__(self, clip_id: str) -> ClipFeatures:
        pos = self._position(clip_id)
        sh = self._shard(self._cols.shard_of(pos))
        return self._clip(sh, sh.row(clip_id), pos)

    def _by_shard(self) -> list[np.ndarray]:
        """Positions grouped by shard, shards in the order of their first clip in the index."""
        c = self._cols
        order = np.argsort(c.shard, kind="stable")  # index order within a shard
        bounds = np.flatnonzero(np.diff(c.shard[order])) + 1
        groups = np.split(order, bounds) if len(order) else []
        return sorted(groups, key=lambda g: int(g[0]))

    def clip_ids_in_read_order(self) -> list[str]:
        """The clip ids in the order iteration yields them (by shard, then row), from the
        index alone: nothing is read."""
        c = self._cols
        return [c.clip_id(int(p)) for g in self._by_shard()
                for p in g[np.argsort(c.row[g], kind="stable")]]

    def __iter__(self) -> Iterator[ClipFeatures]:
        """All clips, shard by shard; each shard's datasets are read whole, once."""
        c = self._cols
        for group in self._by_shard():
            sh = self._shard(c.shard_of(int(group[0])))  # corrects the rows if they are wrong
            data = {}
            for m in MODALITIES:
                data[m] = sh.read(f"{m}/features")
                data[f"{m}_timestamps"] = sh.read(f"{m}/timestamps")
            if sh.text_strings is not None:
                data[TEXT] = sh.read(f"{TEXT}/features")
            if sh.video_padded is not None:
                for key in ("features", "start", "end"):
                    data[f"{VIDEO}/{key}"] = sh.read(f"{VIDEO}/{key}")
            for pos in group[np.argsort(c.row[group], kind="stable")]:
                yield self._clip(sh, int(c.row[pos]), int(pos), data)

    def select(self, clip_ids: Iterable[str]) -> FeatureStore:
        """A view on some clips (unknown ids raise KeyError)."""
        return FeatureStore(self.folder, self._cols.take(self._cols.positions(clip_ids)),
                            self._noted)

    def close(self) -> None:
        for sh in self._shards.values():
            sh.close()
        self._open.clear()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_features(folder: str | os.PathLike) -> FeatureStore:
    """Open the feature folder written by ``vpipe features``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such feature folder")
    return FeatureStore(folder)
