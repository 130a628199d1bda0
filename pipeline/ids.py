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
