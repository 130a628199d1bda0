"""The feature store: HDF5 shards in a ragged layout, their index, and the reader API.

One shard holds many clips. Per modality, the rows of all clips are concatenated in one 2-D
dataset and ``offsets`` (n+1, int64) says where each clip's rows start and end, so a shard with
thousands of clips is a handful of HDF5 objects (see README "HDF5 schema")::

    /clip_ids (n,) utf-8      /source (n,) utf-8      /start (n,) /end (n,) float64
    /image/features (F, D)    /image/timestamps (F,)  /image/offsets (n+1,)
    /audio/features (A, 128)  /audio/timestamps (A,)  /audio/offsets (n+1,)

A shard is written under a temporary name and renamed when complete. ``index.jsonl`` maps each
clip id to its shard and row; it is rebuilt from the complete shards, so it never disagrees with
them.
"""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline import __version__
from pipeline.errors import UsageError
from pipeline.files import atomic_write_text, temp_name
from pipeline.records import now_iso

SCHEMA_VERSION = 1
INDEX = "index.jsonl"
SHARD_RE = re.compile(r"^shard-(\d{5})\.h5$")
MODALITIES = ("image", "audio")
MAX_OPEN_SHARDS = 64  # a reader keeps this many shard files open (default fd limit: 1024)


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.h5"


@dataclass
class ClipFeatures:
    """The features of one clip; a modality with no rows has shape (0, dim)."""

    clip_id: str
    source: str
    start: float
    end: float
    image: np.ndarray
    image_timestamps: np.ndarray
    audio: np.ndarray
    audio_timestamps: np.ndarray

    def n(self, modality: str) -> int:
        return int(getattr(self, modality).shape[0])


def _attr_value(v: Any) -> Any:
    """HDF5 attributes hold scalars and strings: dicts and lists are stored as JSON text."""
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, sort_keys=True)
    if v is None:
        return "none"
    return v


def _read_attrs(obj: h5py.HLObject) -> dict[str, Any]:
    out = {}
    for k, v in obj.attrs.items():
        if isinstance(v, bytes):
            v = v.decode()
        if isinstance(v, str) and v[:1] in "{[":
            try:
                v = json.loads(v)
            except json.JSONDecodeError:
                pass
        elif isinstance(v, np.generic):
            v = v.item()
        out[k] = v
    return out


class ShardWriter:
    """Append clips to one shard; ``close()`` renames the finished file into place.

    ``attrs`` maps a modality ("image", "audio") to its attributes (model, weights, dim, …);
    both groups are always created (a modality not computed has dim 0 and no rows).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        image_dim: int,
        audio_dim: int = 128,
        attrs: dict[str, dict[str, Any]] | None = None,
        root_attrs: dict[str, Any] | None = None,
        dtype: str = "float32",
        compression: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.tmp = temp_name(self.path)
        self.dtype = np.dtype(dtype)
        self.dims = {"image": int(image_dim), "audio": int(audio_dim)}
        self.clips: list[ClipFeatures | None] = []
        self._meta: list[tuple[str, str, float, float]] = []
        self._rows = {m: 0 for m in MODALITIES}
        self._offsets: dict[str, list[int]] = {m: [0] for m in MODALITIES}
        self.tmp.unlink(missing_ok=True)
        self._f = h5py.File(self.tmp, "w")
        self._f.attrs.update(
            {
                "schema_version": SCHEMA_VERSION,
                "vpipe_version": __version__,
                "created": now_iso(),
                **{k: _attr_value(v) for k, v in (root_attrs or {}).items()},
            }
        )
        opts = {"compression": compression} if compression else {}
        for m in MODALITIES:
            g = self._f.create_group(m)
            dim = self.dims[m]
            if dim:
                g.create_dataset(
                    "features",
                    shape=(0, dim),
                    maxshape=(None, dim),
                    dtype=self.dtype,
                    chunks=(256, dim),
                    **opts,
                )
            else:  # a modality not computed: no rows ever, so no chunked (resizable) layout
                g.create_dataset("features", shape=(0, 0), dtype=self.dtype)
            g.create_dataset("timestamps", shape=(0,), maxshape=(None,), dtype="f8", chunks=(4096,))
            for k, v in {"dim": dim, **(attrs or {}).get(m, {})}.items():
                g.attrs[k] = _attr_value(v)

    def __len__(self) -> int:
        return len(self._meta)

    @property
    def n_rows(self) -> int:
        return sum(self._rows.values())

    def add(self, clip: ClipFeatures) -> int:
        """Write one clip's rows; returns its row number in the shard."""
        for m in MODALITIES:
            feats = np.asarray(getattr(clip, m), dtype=self.dtype)
            ts = np.asarray(getattr(clip, f"{m}_timestamps"), dtype="f8")
            n = feats.shape[0]
            if n and feats.shape[1] != self.dims[m]:
                raise ValueError(f"{clip.clip_id}: {m} dim {feats.shape[1]} != {self.dims[m]}")
            if ts.shape[0] != n:
                raise ValueError(f"{clip.clip_id}: {n} {m} rows but {ts.shape[0]} timestamps")
            if n:
                g = self._f[m]
                a = self._rows[m]
                g["features"].resize(a + n, axis=0)
                g["features"][a : a + n] = feats
                g["timestamps"].resize(a + n, axis=0)
                g["timestamps"][a : a + n] = ts
            self._rows[m] += n
            self._offsets[m].append(self._rows[m])
        self._meta.append((clip.clip_id, clip.source, float(clip.start), float(clip.end)))
        return len(self._meta) - 1

    def close(self) -> list[dict]:
        """Finish the shard, rename it into place; returns its index rows."""
        f = self._f
        s = h5py.string_dtype("utf-8")
        ids = [m[0] for m in self._meta]
        f.create_dataset("clip_ids", data=np.array(ids, dtype=object), dtype=s)
        f.create_dataset("source", data=np.array([m[1] for m in self._meta], dtype=object), dtype=s)
        f.create_dataset("start", data=np.array([m[2] for m in self._meta], dtype="f8"))
        f.create_dataset("end", data=np.array([m[3] for m in self._meta], dtype="f8"))
        for m in MODALITIES:
            f[m].create_dataset("offsets", data=np.array(self._offsets[m], dtype="i8"))
        f.close()
        os.replace(self.tmp, self.path)
        return _index_rows(self.path)

    def abort(self) -> None:
        """Drop the unfinished shard (nothing half-written is left behind)."""
        try:
            self._f.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def _index_rows(path: Path) -> list[dict]:
    with h5py.File(path, "r") as f:
        ids = f["clip_ids"].asstr()[:]
        src = f["source"].asstr()[:]
        off = {m: f[m]["offsets"][:] for m in MODALITIES}
    return [
        {
            "clip_id": cid,
            "source": src[i],
            "shard": path.name,
            "row": i,
            "n_frames": int(off["image"][i + 1] - off["image"][i]),
            "n_audio": int(off["audio"][i + 1] - off["audio"][i]),
        }
        for i, cid in enumerate(ids)
    ]


def shard_paths(folder: str | os.PathLike) -> list[Path]:
    """The complete shards of a feature folder, in order (temp files are never matched)."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if SHARD_RE.match(p.name)) if folder.is_dir() else []


def next_shard_number(folder: str | os.PathLike) -> int:
    nums = [int(SHARD_RE.match(p.name).group(1)) for p in shard_paths(folder)]
    return max(nums) + 1 if nums else 0


def rebuild_index(folder: str | os.PathLike) -> list[dict]:
    """Rewrite ``index.jsonl`` from the complete shards; returns its rows."""
    rows = []
    for p in shard_paths(folder):
        try:
            rows += _index_rows(p)
        except (OSError, KeyError) as e:  # damaged after it was written (a cut copy, a disk)
            raise UsageError(
                f"{p}: damaged shard, cannot be read ({e}); delete it and run again to "
                "recompute its clips"
            ) from None
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic_write_text(Path(folder) / INDEX, text)
    return rows


def add_to_index(folder: str | os.PathLike, rows: Sequence[dict]) -> None:
    """Append a just-finished shard's rows to ``index.jsonl`` (rebuilt at each run's start).

    One O_APPEND write, not a rebuild: rereading every shard after each new one made a run
    quadratic in the number of shards (``--shard-size 1``: ~1 s per shard at 1000 shards).
    """
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with (Path(folder) / INDEX).open("ab", buffering=0) as f:
        f.write(text.encode("utf-8"))


def read_index(folder: str | os.PathLike) -> list[dict]:
    path = Path(folder) / INDEX
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


# --------------------------------------------------------------------------- reader


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

    def __init__(self, folder: str | os.PathLike, rows: Sequence[dict] | None = None) -> None:
        self.folder = Path(folder)
        if rows is None:
            rows = read_index(self.folder)
            if not rows and shard_paths(self.folder):
                rows = [r for p in shard_paths(self.folder) for r in _index_rows(p)]
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
        return _read_attrs(f if modality is None else f[modality])

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
            while len(self._open) > MAX_OPEN_SHARDS:
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


# --------------------------------------------------------------------------- validation

ROOT_ATTRS = ("schema_version", "vpipe_version", "created")
GROUP_ATTRS = {
    "image": ("model", "weights", "layer", "dim", "preprocessing", "sampling"),
    "audio": ("model", "weights", "sample_rate", "window_s", "hop_s", "postprocess", "dim"),
}


def _check_shard(path: Path, rows: list[dict]) -> tuple[dict, list[str]]:
    """Facts about one shard and what is wrong with it (against its index rows)."""
    problems: list[str] = []
    facts: dict[str, Any] = {"clips": 0, "image": 0, "audio": 0, "dims": {}, "models": {}}
    name = path.name
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        return facts, [f"{name}: cannot open ({e})"]
    with f:
        missing = [k for k in ("clip_ids", "source", "start", "end") if k not in f]
        missing += [f"{m}/{d}" for m in MODALITIES for d in ("features", "timestamps", "offsets")
                    if m not in f or d not in f[m]]
        if missing:
            return facts, [f"{name}: missing datasets {', '.join(missing)}"]
        ids = list(f["clip_ids"].asstr()[:])
        n = len(ids)
        facts["clips"] = n
        for k in ("source", "start", "end"):
            if f[k].shape[0] != n:
                problems.append(f"{name}: /{k} has {f[k].shape[0]} entries for {n} clips")
        problems += [f"{name}: root attribute {a!r} missing"
                     for a in ROOT_ATTRS if a not in f.attrs]
        for m in MODALITIES:
            g = f[m]
            off = g["offsets"][:]
            rows_m = g["features"].shape[0]
            facts[m] = rows_m
            facts["dims"][m] = int(g["features"].shape[1])
            attrs = _read_attrs(g)
            facts["models"][m] = attrs.get("model")
            if attrs.get("model", "none") != "none":
                problems += [f"{name}: /{m} attribute {a!r} missing"
                             for a in GROUP_ATTRS[m] if a not in attrs]
            if off.shape[0] != n + 1:
                problems.append(f"{name}: /{m}/offsets: {off.shape[0]} entries, not {n + 1}")
            elif off[0] != 0 or np.any(np.diff(off) < 0):
                problems.append(f"{name}: /{m}/offsets not monotone from 0")
            elif off[-1] != rows_m:
                problems.append(f"{name}: /{m}/offsets ends at {off[-1]}, features have {rows_m}")
            if g["timestamps"].shape[0] != rows_m:
                problems.append(f"{name}: /{m} has {rows_m} rows, {g['timestamps'].shape[0]} times")
            if int(attrs.get("dim", -1)) != facts["dims"][m]:
                problems.append(f"{name}: /{m} dim attribute {attrs.get('dim')} != "
                                f"{facts['dims'][m]}")
            if off.shape[0] == n + 1:
                counts = np.diff(off)
                key = "n_frames" if m == "image" else "n_audio"
                for r in rows:
                    i = r["row"]
                    if i < n and int(counts[i]) != r[key]:
                        problems.append(f"{name}: {r['clip_id']}: index {key} {r[key]} != "
                                        f"{int(counts[i])}")
        index_ids = [None] * n
        for r in rows:
            if 0 <= r["row"] < n:
                index_ids[r["row"]] = r["clip_id"]
            else:
                problems.append(f"{name}: index row {r['row']} of {r['clip_id']} out of range")
        if index_ids != ids:
            problems.append(f"{name}: clip ids differ from index.jsonl")
    return facts, problems


def validate(folder: str | os.PathLike) -> tuple[dict[str, Any], list[str]]:
    """Summary of a feature folder and every inconsistency between its shards and its index."""
    folder = Path(folder)
    paths = shard_paths(folder)
    problems: list[str] = []
    try:
        index = read_index(folder)
    except (ValueError, UnicodeDecodeError) as e:  # a damaged index is a finding, not a crash
        problems.append(f"{folder / INDEX}: unreadable ({type(e).__name__}: {e})")
        index = []
    good = [r for r in index if isinstance(r, dict) and {"clip_id", "shard", "row"} <= r.keys()]
    if len(good) != len(index):
        problems.append(f"{folder / INDEX}: a line lacks clip_id/shard/row")
        index = good
    if not (folder / INDEX).exists():
        problems.append(f"{folder / INDEX}: missing")
    by_shard: dict[str, list[dict]] = {}
    for r in index:
        by_shard.setdefault(r["shard"], []).append(r)
    names = {p.name for p in paths}
    problems += [f"{s}: in index.jsonl but not on disk" for s in by_shard if s not in names]
    ids = [r["clip_id"] for r in index]
    if len(ids) != len(set(ids)):
        problems.append("index.jsonl: a clip id appears more than once")
    summary: dict[str, Any] = {"folder": str(folder), "shards": len(paths), "clips": 0,
                               "frames": 0, "audio_rows": 0, "dims": {}, "models": {},
                               "bytes": sum(p.stat().st_size for p in paths)}
    for p in paths:
        facts, probs = _check_shard(p, by_shard.get(p.name, []))
        problems += probs
        summary["clips"] += facts["clips"]
        summary["frames"] += facts["image"]
        summary["audio_rows"] += facts["audio"]
        for m in MODALITIES:
            for key in ("dims", "models"):
                if m in facts[key]:
                    old = summary[key].setdefault(m, facts[key][m])
                    if old != facts[key][m]:
                        problems.append(f"{p.name}: /{m} {key[:-1]} {facts[key][m]} != {old}")
    if summary["clips"] != len(index):
        problems.append(f"index.jsonl has {len(index)} clips, shards hold {summary['clips']}")
    # Model attributes from the first shard that opens (a damaged one is reported above).
    summary["image_attrs"], summary["audio_attrs"] = {}, {}
    for p in paths:
        try:
            with h5py.File(p, "r") as f:
                summary["image_attrs"] = _read_attrs(f["image"])
                summary["audio_attrs"] = _read_attrs(f["audio"])
            break
        except (OSError, KeyError):
            continue
    return summary, problems
