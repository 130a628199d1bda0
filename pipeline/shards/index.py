"""``index.jsonl``: clip id -> shard, row and sequence lengths, a cache of what the shards hold
(rebuilt from the complete shards at each run's start, so it never disagrees with them)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from pipeline.errors import UsageError
from pipeline.files import atomic_write_text
from pipeline.shards.schema import INDEX, index_rows, shard_paths


def rebuild_index(folder: str | os.PathLike) -> list[dict]:
    """Rewrite ``index.jsonl`` from the complete shards; returns its rows."""
    rows = []
    for p in shard_paths(folder):
        try:
            rows += index_rows(p)
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
