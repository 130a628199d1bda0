"""Source and clip ids: the sanitized file stem, made unique within a run.

One rule for every stage and for labels files, so a label written as a file stem finds the
clips that stem became (``vpipe train`` matches label ids through :func:`sanitize_id` too).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path


def sanitize_id(stem: str) -> str:
    """A file-system and HDF5 friendly id from a file stem (unicode letters kept, NFC)."""
    s = unicodedata.normalize("NFC", stem).strip()
    s = re.sub(r"[^\w.-]+", "-", s, flags=re.UNICODE).strip("-.")
    return s or "video"


def unique_ids(paths: Sequence[Path]) -> list[str]:
    """Sanitized stems, made unique (``name``, ``name-2``…) in input order."""
    used: set[str] = set()
    out = []
    for p in paths:
        base = cand = sanitize_id(Path(p).stem)
        n = 1
        while cand in used:
            n += 1
            cand = f"{base}-{n}"
        used.add(cand)
        out.append(cand)
    return out


VIEW_MARK = "~"  # never in an id sanitize_id makes: `<clip_id>~<k>` is a view of that clip


def view_id(clip_id: str, k: int) -> str:
    """The id of augmented view ``k`` (1..K) of a clip (``extract-frames --views``)."""
    return f"{clip_id}{VIEW_MARK}{k}"


def view_of(item_id: str) -> str | None:
    """The clip an item is an augmented view of, or None for a clip."""
    return item_id.split(VIEW_MARK, 1)[0] if VIEW_MARK in item_id else None
