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

from pipeline.shards.index import parse_index
from pipeline.shards.schema import (
    MAX_OPEN_SHARDS,
    MODALITIES,
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

    def open(self) -> h5py.File:
        if self.file is None:
            f = open_shard(self.path)
            try:
                for m in MODALITIES:
                    self.offsets[m] = read_dataset(f, f"{m}/offsets")
                self.start = read_dataset(f, "start")
                self.end = read_dataset(f, "end")
                self.row_of = {c: i for i, c in enumerate(read_dataset(f, "clip_ids"))}
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
        return read_dataset(self.open(), key, sel)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class FeatureStore:
    """Read access to a feature folder: ``store[clip_id]``, iteration, sources, selection.

    Only the index is read on open (rebuilt in memory from the shards, with a note, when it
    is torn, lacks a field or misses a shard); a shard file is opened on first use and kept
    open (the MAX_OPEN_SHARDS most recently used), its /clip_ids decide each clip's row, and a
    clip read is one slice per dataset (each chunk checked by its fletcher32 checksum).
    """

    max_open_shards = MAX_OPEN_SHARDS

    def __init__(self, folder: str | os.PathLike, rows: Sequence[dict] | None = None,
                 noted: set[str] | None = None) -> None:
        self.folder = Path(folder)
        self._noted = set() if noted is None else noted  # notes said once per store
        if rows is None:
            rows = self._index_rows()
        self._rows = {r["clip_id"]: r for r in rows}
        self._by_shard: dict[str, list[str]] | None = None
        self._shards: dict[str, _Shard] = {}
        self._open: OrderedDict[str, _Shard] = OrderedDict()  # open shards, least recent first

    def _note(self, text: str) -> None:
        if text not in self._noted:
            self._noted.add(text)
            print(f"vpipe: note: {text}", file=sys.stderr)

    def _index_rows(self) -> list[dict]:
        """The index's rows, or the shards' own when the index cannot be trusted whole."""
        paths = shard_paths(self.folder)
        rows, problems = parse_index(self.folder)
        names = {p.name for p in paths}
        for r in rows:
            if r["shard"] not in names:  # deleted: its clips cannot be had from the others
                open_shard(self.folder / r["shard"])  # raises, naming it and the fix
        unlisted = sorted(names - {r["shard"] for r in rows})
        if unlisted and not problems:
            problems = [f"{self.folder / 'index.jsonl'}: {unlisted[0]} is not in it"]
        if problems and paths:
            self._note(f"{problems[0]}; reading the clips from the shards instead (`vpipe "
                       "features` on this folder again rewrites the index)")
            rows = [r for p in paths for r in index_rows(p)]
        return rows

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
            self._check_rows(sh, name)
            while len(self._open) > self.max_open_shards:
                self._open.popitem(last=False)[1].close()
        return sh

    def _check_rows(self, sh: _Shard, name: str) -> None:
        """Correct index rows that disagree with the shard's /clip_ids, and say so."""
        if self._by_shard is None:  # once per store: a check per shard open stays O(its clips)
            self._by_shard = {}
            for c, r in self._rows.items():
                self._by_shard.setdefault(r["shard"], []).append(c)
        wrong = [c for c in self._by_shard.get(name, []) if self._rows[c]["row"] != sh.row(c)]
        for c in wrong:
            self._rows[c] = {**self._rows[c], "row": sh.row(c)}
        if wrong:
            self._note(f"{sh.path}: index.jsonl gives {len(wrong)} clip(s) another row than the "
                       f"shard's /clip_ids (e.g. {wrong[0]}); using the shard's (`vpipe "
                       "features` on this folder again rewrites the index)")

    def __getitem__(self, clip_id: str) -> ClipFeatures:
        r = self._rows[clip_id]
        sh = self._shard(r["shard"])
        i = sh.row(clip_id)
        arrays = {}
        for m in MODALITIES:
            a, b = int(sh.offsets[m][i]), int(sh.offsets[m][i + 1])
            arrays[m] = sh.read(f"{m}/features", slice(a, b))
            arrays[f"{m}_timestamps"] = sh.read(f"{m}/timestamps", slice(a, b))
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
            data = {m: sh.read(f"{m}/features") for m in MODALITIES}
            ts = {m: sh.read(f"{m}/timestamps") for m in MODALITIES}
            for r in sorted(rows, key=lambda r: sh.row(r["clip_id"])):
                i = sh.row(r["clip_id"])
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
        return FeatureStore(self.folder, [self._rows[c] for c in clip_ids], self._noted)

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
