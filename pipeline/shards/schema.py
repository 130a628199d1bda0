"""The shard format: names, constants, one clip's features, attributes, a shard's rows.

The layout itself is in the package docstring (and README "HDF5 schema").
"""

from __future__ import annotations

import json
import os
import re
import resource
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.errors import UsageError

SCHEMA_VERSION = 2  # 2: every dataset with data carries an HDF5 fletcher32 checksum
CHECKSUMS = "fletcher32"  # root attribute "checksums" of a shard written with them
INDEX = "index.jsonl"
SHARD_RE = re.compile(r"^shard-(\d{5})\.h5$")
MODALITIES = ("image", "audio")
# The title's token features: a group only in shards made with ``vpipe features --text``;
# rows per clip, no timestamps, and the text each clip was given in /text/strings.
TEXT = "text"
# Clip-level video features: a group only in shards made with ``vpipe features --video-model``;
# one row per window, each with its true start and end (seconds from the clip start), and per
# clip the frames of padding its one window got (a clip shorter than a window) and the windows
# dropped at its end (cut short by it).
VIDEO = "video"


def _open_shard_cap() -> int:
    """How many shard files a reader keeps open: a quarter of the process's file limit, from
    64 to 512 (an open shard holds ~1 MB of HDF5 caches). A store of 100k clips has ~400
    shards, and shuffled reads past the cap reopen a file for almost every clip."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 512
    return max(64, min(512, soft // 4))


MAX_OPEN_SHARDS = _open_shard_cap()


RECOVER = ("delete it and run again the `vpipe features` command that made this folder (same "
           "inputs and options): it recomputes that shard's clips")


class DamagedFeatures(UsageError):
    """A shard that cannot be read or fails its checksum (the message names it and the fix)."""


def open_shard(path: Path) -> h5py.File:
    """A shard opened for reading; a missing or unreadable file is :class:`DamagedFeatures`."""
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise DamagedFeatures(f"{path}: shard listed in index.jsonl but not on disk; run again "
                              "the `vpipe features` command that made this folder (same inputs "
                              "and options): it recomputes its clips") from None
    except OSError as e:
        raise DamagedFeatures(f"{path}: damaged shard, cannot be read ({e}); {RECOVER}") from None


def read_dataset(f: h5py.File, key: str, sel: Any = (), ds: h5py.Dataset | None = None
                 ) -> np.ndarray:
    """``f[key][sel]`` (``ds``: that dataset, already looked up); a failed checksum or a damaged
    dataset is :class:`DamagedFeatures`."""
    try:
        ds = f[key] if ds is None else ds
        return ds.asstr()[sel] if h5py.check_string_dtype(ds.dtype) else ds[sel]
    except (OSError, KeyError) as e:
        why = ("fails its fletcher32 checksum (changed after it was written)"
               if "filter returned failure" in str(e) else f"cannot be read ({e})")
        raise DamagedFeatures(f"{f.filename}: damaged shard, /{key} {why}; {RECOVER}") from None


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
    # The title's token features (tokens, dim) and the title as encoded (after the cut); a clip
    # without a title, or a store without text, has (0, dim) rows and "".
    text: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    text_string: str = ""
    view_of: str = ""  # the clip this is an augmented view of ("" for a clip)
    # The windows' features (V, dim), their start and end times, the frames of padding (a clip
    # shorter than one window) and the windows dropped (cut short by the clip's end); a store
    # without video has (0, 0) rows.
    video: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    video_start: np.ndarray = field(default_factory=lambda: np.zeros(0))
    video_end: np.ndarray = field(default_factory=lambda: np.zeros(0))
    video_padded: int = 0
    video_dropped: int = 0

    @property
    def video_times(self) -> np.ndarray:
        """(V, 2): each window's start and end, seconds from the clip start."""
        return np.stack([self.video_start, self.video_end], axis=1).reshape(-1, 2)

    def n(self, modality: str) -> int:
        return int(getattr(self, modality).shape[0])

    def __repr__(self) -> str:
        """A line to read, not the arrays: ``ClipFeatures('t_0', source='t', 10.0-40.0 s,
        image (30, 2048), audio (31, 128))``."""
        parts = [f"{m} {tuple(getattr(self, m).shape)}" for m in ("image", "audio", "text", "video")
                 if getattr(self, m).shape[0]]
        return (f"ClipFeatures({self.clip_id!r}, source={self.source!r}, "
                f"{self.start:g}-{self.end:g} s, {', '.join(parts) or 'no rows'})")


def attr_value(v: Any) -> Any:
    """HDF5 attributes hold scalars and strings: dicts and lists are stored as JSON text."""
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, sort_keys=True)
    if v is None:
        return "none"
    return v


def read_attrs(obj: h5py.HLObject) -> dict[str, Any]:
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



def index_rows(path: Path) -> list[dict]:
    """The index rows of one shard, read from its own datasets."""
    with open_shard(path) as f:
        ids = read_dataset(f, "clip_ids")
        src = read_dataset(f, "source")
        views = read_dataset(f, "view_of") if "view_of" in f else None
        off = {m: read_dataset(f, f"{m}/offsets") for m in MODALITIES}
        video = read_dataset(f, f"{VIDEO}/offsets") if VIDEO in f else None
    rows = [
        {
            "clip_id": cid,
            "source": src[i],
            "shard": path.name,
            "row": i,
            "n_frames": int(off["image"][i + 1] - off["image"][i]),
            "n_audio": int(off["audio"][i + 1] - off["audio"][i]),
            **({"view_of": views[i]} if views is not None and views[i] else {}),
        }
        for i, cid in enumerate(ids)
    ]
    if video is not None:  # only with video: the rows of other stores stay as they were
        for i, r in enumerate(rows):
            r["n_video"] = int(video[i + 1] - video[i])
    return rows


def video_counts(paths: list[Path]) -> dict[str, int]:
    """What the shards' /video groups hold: windows, clips padded to one window, windows
    dropped at a clip's end (``vpipe.json``'s ``video``, for either engine)."""
    out = {"windows": 0, "padded_clips": 0, "dropped_windows": 0}
    for path in paths:
        with open_shard(path) as f:
            if VIDEO not in f:
                continue
            out["windows"] += int(f[VIDEO]["features"].shape[0])
            out["padded_clips"] += int(np.count_nonzero(read_dataset(f, f"{VIDEO}/padded")))
            out["dropped_windows"] += int(read_dataset(f, f"{VIDEO}/dropped").sum())
    return out


def shard_paths(folder: str | os.PathLike) -> list[Path]:
    """The complete shards of a feature folder, in order (temp files are never matched)."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if SHARD_RE.match(p.name)) if folder.is_dir() else []


def next_shard_number(folder: str | os.PathLike) -> int:
    nums = [int(SHARD_RE.match(p.name).group(1)) for p in shard_paths(folder)]
    return max(nums) + 1 if nums else 0
