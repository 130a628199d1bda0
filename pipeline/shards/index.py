"""``index.jsonl``: clip id -> shard, row and sequence lengths, a cache of what the shards hold
(rebuilt from the complete shards at each run's start, so it never disagrees with them)."""

from __future__ import annotations

import json
import os
from array import array
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from pipeline.files import append_bytes, atomic_write_text
from pipeline.shards.schema import INDEX, index_rows, shard_paths


def rebuild_index(folder: str | os.PathLike) -> list[dict]:
    """Rewrite ``index.jsonl`` from the complete shards; returns its rows."""
    rows = [r for p in shard_paths(folder) for r in index_rows(p)]  # DamagedFeatures if not
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic_write_text(Path(folder) / INDEX, text)
    return rows


def add_to_index(folder: str | os.PathLike, rows: Sequence[dict]) -> None:
    """Append a just-finished shard's rows to ``index.jsonl`` (rebuilt at each run's start).

    One O_APPEND write, not a rebuild: rereading every shard after each new one made a run
    quadratic in the number of shards (``--shard-size 1``: ~1 s per shard at 1000 shards).
    """
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    append_bytes(Path(folder) / INDEX, text.encode("utf-8"))


# What a reader takes from an index line (source too: `sources()` needs it before any shard).
INDEX_FIELDS = ("clip_id", "shard", "row", "source", "n_frames", "n_audio")


def parse_index(folder: str | os.PathLike) -> tuple[list[dict], list[str]]:
    """The usable lines of ``index.jsonl`` and what is wrong with the others (a torn last
    line, a line lacking a field), without raising."""
    problems: list[str] = []
    return list(_usable_lines(Path(folder) / INDEX, problems)), problems


def read_columns(folder: str | os.PathLike) -> tuple[IndexColumns, list[str]]:
    """As :func:`parse_index`, the usable lines as columns (no dict per clip is kept)."""
    problems: list[str] = []
    return IndexColumns.from_rows(_usable_lines(Path(folder) / INDEX, problems)), problems


def _usable_lines(path: Path, problems: list[str]) -> Iterator[dict]:
    """Each good line of an index file, one at a time; the bad ones described in ``problems``."""
    if not path.exists():
        problems.append(f"{path}: missing")
        return
    try:
        f = path.open(encoding="utf-8")
        with f:
            for k, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                except ValueError as e:
                    problems.append(f"{path}: unreadable (JSONDecodeError: {e}) at line {k}")
                    continue
                lacking = [x for x in INDEX_FIELDS if not isinstance(r, dict) or x not in r]
                if lacking:
                    problems.append(f"{path}: line {k} lacks {', '.join(lacking)}")
                else:
                    yield r
    except (OSError, UnicodeDecodeError) as e:
        problems.append(f"{path}: unreadable ({type(e).__name__}: {e})")


class IndexColumns:
    """The index held as columns: ~40 bytes a clip where a dict per clip took ~800.

    ``ids`` are utf-8 bytes in index order with an argsort beside them (a lookup is a binary
    search); shard and source are codes into their name lists; ``row``, ``n_frames``, ``n_audio``
    int32, and ``n_video`` where the store has video (None where it has not). A clip id listed
    twice keeps its last line (the last shard written wins).
    """

    def __init__(self, ids: np.ndarray, shard: np.ndarray, row: np.ndarray, source: np.ndarray,
                 n_frames: np.ndarray, n_audio: np.ndarray, shard_names: list[str],
                 source_names: list[str], n_video: np.ndarray | None = None) -> None:
        self.ids, self.shard, self.row, self.source = ids, shard, row, source
        self.n_frames, self.n_audio, self.n_video = n_frames, n_audio, n_video
        self.shard_names, self.source_names = shard_names, source_names
        self._sorted = np.argsort(ids, kind="stable").astype(np.int32)

    @classmethod
    def from_rows(cls, rows: Iterable[dict]) -> IndexColumns:
        """From index rows (dicts with INDEX_FIELDS), one at a time."""
        ids: list[bytes] = []
        cols = {k: array("i") for k in ("shard", "row", "source", "n_frames", "n_audio",
                                        "n_video")}
        video = False
        codes: dict[str, dict[str, int]] = {"shard": {}, "source": {}}
        for r in rows:
            ids.append(str(r["clip_id"]).encode("utf-8", "surrogateescape"))
            for k in ("shard", "source"):
                cols[k].append(codes[k].setdefault(str(r[k]), len(codes[k])))
            for k in ("row", "n_frames", "n_audio"):
                cols[k].append(int(r[k]))
            video = video or "n_video" in r
            cols["n_video"].append(int(r.get("n_video", 0)))
        arr = {k: np.frombuffer(v, dtype=np.int32) if len(v) else np.zeros(0, np.int32)
               for k, v in cols.items()}
        id_arr = np.array(ids, dtype=f"S{max(map(len, ids), default=1)}")
        # A clip id listed twice: keep its last line, in the place of its first.
        _, first = np.unique(id_arr, return_index=True)
        if len(first) < len(id_arr):
            _, last_rev = np.unique(id_arr[::-1], return_index=True)
            keep = (len(id_arr) - 1 - last_rev)[np.argsort(first)]  # both sorted by id
            id_arr, arr = id_arr[keep], {k: v[keep] for k, v in arr.items()}
        return cls(id_arr, arr["shard"], arr["row"], arr["source"], arr["n_frames"],
                   arr["n_audio"], list(codes["shard"]), list(codes["source"]),
                   arr["n_video"] if video else None)

    def __len__(self) -> int:
        return len(self.ids)

    def position(self, clip_id: str) -> int | None:
        """The clip's position in index order, or ``None``."""
        key = clip_id.encode("utf-8", "surrogateescape")
        if len(key) > self.ids.dtype.itemsize or not len(self.ids):
            return None
        j = int(np.searchsorted(self.ids, key, sorter=self._sorted))
        if j < len(self.ids) and self.ids[self._sorted[j]] == key:
            return int(self._sorted[j])
        return None

    def positions(self, clip_ids: Iterable[str]) -> np.ndarray:
        """Positions of ``clip_ids`` (KeyError naming the first unknown one)."""
        out = array("i")
        for c in clip_ids:
            i = self.position(c)
            if i is None:
                raise KeyError(c)
            out.append(i)
        return np.frombuffer(out, dtype=np.int32) if len(out) else np.zeros(0, np.int32)

    def clip_id(self, i: int) -> str:
        return self.ids[i].decode("utf-8", "surrogateescape")

    def clip_ids(self) -> list[str]:
        return [x.decode("utf-8", "surrogateescape") for x in self.ids.tolist()]

    def shard_of(self, i: int) -> str:
        return self.shard_names[self.shard[i]]

    def source_of(self, i: int) -> str:
        return self.source_names[self.source[i]]

    def row_dict(self, i: int) -> dict:
        """One clip's index row, as ``index.jsonl`` has it."""
        return {"clip_id": self.clip_id(i), "source": self.source_of(i),
                "shard": self.shard_of(i), "row": int(self.row[i]),
                "n_frames": int(self.n_frames[i]), "n_audio": int(self.n_audio[i]),
                **({"n_video": int(self.n_video[i])} if self.n_video is not None else {})}

    def take(self, positions: np.ndarray) -> IndexColumns:
        """The rows at ``positions``, in that order (the name lists are shared)."""
        p = np.asarray(positions, dtype=np.int64)
        return IndexColumns(self.ids[p], self.shard[p], self.row[p], self.source[p],
                            self.n_frames[p], self.n_audio[p], self.shard_names,
                            self.source_names,
                            None if self.n_video is None else self.n_video[p])

    def nbytes(self) -> int:
        arrays = (self.ids, self.shard, self.row, self.source, self.n_frames, self.n_audio,
                  self._sorted, *(() if self.n_video is None else (self.n_video,)))
        return sum(a.nbytes for a in arrays)


def read_index(folder: str | os.PathLike) -> list[dict]:
    path = Path(folder) / INDEX
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
