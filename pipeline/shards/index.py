"""``index.jsonl``: clip id -> shard, row and sequence lengths, a cache of what the shards hold
(rebuilt from the complete shards at each run's start, so it never disagrees with them)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from pipeline.files import atomic_write_text
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
    with (Path(folder) / INDEX).open("ab", buffering=0) as f:
        f.write(text.encode("utf-8"))


# What a reader takes from an index line (source too: `sources()` needs it before any shard).
INDEX_FIELDS = ("clip_id", "shard", "row", "source", "n_frames", "n_audio")


def parse_index(folder: str | os.PathLike) -> tuple[list[dict], list[str]]:
    """The usable lines of ``index.jsonl`` and what is wrong with the others (a torn last
    line, a line lacking a field), without raising."""
    path = Path(folder) / INDEX
    if not path.exists():
        return [], [f"{path}: missing"]
    rows, problems = [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        return [], [f"{path}: unreadable ({type(e).__name__}: {e})"]
    for k, line in enumerate(lines, 1):
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
            rows.append(r)
    return rows, problems


def read_index(folder: str | os.PathLike) -> list[dict]:
    path = Path(folder) / INDEX
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
