"""Reading a feature folder: :class:`FeatureStore`, what the trainer and users share."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.shards.index import read_index
from pipeline.shards.schema import (
    MAX_OPEN_SHARDS,
    MODALITIES,
    ClipFeatures,
    index_rows,
    read_attrs,
    shard_paths,
)


@dataclass
class _Shard:
    path: Path
    file: h5py.File | None = None
    offsets: dict[str, np.ndarray] = field(default_factory=dict)
    start: np.ndarray | None = None
    end: np.ndarray | None = None

    def open(self) -> h5py.File:
        if self.file is None:
            self.file = h5py.File(self.path, "r")
            for m in MODALITIES:
                self.offsets[m] = self.file[m]["offsets"][:]
            self.start = self.file["start"][:]
            self.end = self.file["end"][:]
        return self.file

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class FeatureStore:
    """Read access to a feature folder: ``store[clip_id]``, iteration, sources, selection.

    Only the index is read on open; a shard file is opened on first use and kept open (the
    MAX_OPEN_SHARDS most recently used), and a clip read is one slice per dataset.
    """

    max_open_shards = MAX_OPEN_SHARDS

    def __init__(self, folder: str | os.PathLike, rows: Sequence[dict] | None = None) -> None:
        self.folder = Path(folder)
        if rows is None:
            rows = read_index(self.folder)
            if not rows and shard_paths(self.folder):
                rows = [r for p in shard_paths(self.folder) for r in index_rows(p)]
        self._rows = {r["clip_id"]: r for r in rows}
        self._shards: dict[str, _Shard] = {}
        self._open: OrderedDict[str, _Shard] = OrderedDict()  # open shards, least recent first

    # -- metadata ------------------------------------------------------------------------------

    @property
    def clip_ids(self) -> list[str]:
        return list(self._rows)

    def info(self, clip_id: str) -> dict:
        """The index row of a clip: shard, row, source, n_frames, n_audio."""
        return self._rows[clip_id]

    def sources(self) -> dict[str, list[str]]:
        """Source id → its clip ids, in index order."""
        out: dict[str, list[str]] = {}
        for cid, r in self._rows.items():
            out.setdefault(r["source"], []).append(cid)
        return out

    def attrs(self, modality: str | None = None) -> dict[str, Any]:
        """Attributes of the first shard's root (``None``) or of a modality group."""
        if not self._rows:
            return {}
        f = self._shard(next(iter(self._rows.values()))["shard"]).open()
        return read_attrs(f if modality is None else f[modality])

    def dim(self, modality: str) -> int:
        return int(self.attrs(modality).get("dim", 0))

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, clip_id: object) -> bool:
        return clip_id in self._rows

    # -- data ----------------------------------------------------------------------------------

    def _shard(self, name: str) -> _Shard:
        """The shard, opened; at most MAX_OPEN_SHARDS stay open (the least recently used is
        closed), so a store of thousands of small shards does not run out of file handles."""
        if name not in self._shards:
            self._shards[name] = _Shard(self.folder / name)
        sh = self._shards[name]
        if name in self._open:
            self._open.move_to_end(name)
        else:
            sh.open()
            self._open[name] = sh
            while len(self._open) > self.max_open_shards:
                self._open.popitem(last=False)[1].close()
        return sh

    def __getitem__(self, clip_id: str) -> ClipFeatures:
        r = self._rows[clip_id]
        sh = self._shard(r["shard"])
        f = sh.open()
        i = r["row"]
        arrays = {}
        for m in MODALITIES:
            a, b = int(sh.offsets[m][i]), int(sh.offsets[m][i + 1])
            arrays[m] = f[m]["features"][a:b]
            arrays[f"{m}_timestamps"] = f[m]["timestamps"][a:b]
        return ClipFeatures(
            clip_id, r["source"], float(sh.start[i]), float(sh.end[i]), **arrays
        )

    def __iter__(self) -> Iterator[ClipFeatures]:
        """All clips, shard by shard; each shard's datasets are read whole, once."""
        by_shard: dict[str, list[dict]] = {}
        for r in self._rows.values():
            by_shard.setdefault(r["shard"], []).append(r)
        for name, rows in by_shard.items():
            sh = self._shard(name)
            f = sh.open()
            data = {m: f[m]["features"][:] for m in MODALITIES}
            ts = {m: f[m]["timestamps"][:] for m in MODALITIES}
            for r in sorted(rows, key=lambda r: r["row"]):
                i = r["row"]
                arrays = {}
                for m in MODALITIES:
                    a, b = int(sh.offsets[m][i]), int(sh.offsets[m][i + 1])
                    arrays[m] = data[m][a:b]
                    arrays[f"{m}_timestamps"] = ts[m][a:b]
                yield ClipFeatures(
                    r["clip_id"], r["source"], float(sh.start[i]), float(sh.end[i]), **arrays
                )

    def select(self, clip_ids: Iterable[str]) -> FeatureStore:
        """A view on some clips (unknown ids raise KeyError)."""
        return FeatureStore(self.folder, [self._rows[c] for c in clip_ids])

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
