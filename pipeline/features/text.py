"""The text modality's input side: a titles file read and matched to clips (the encoder that
turns each title into per-token features is :mod:`.encoders.hf_text`).

Titles come as a CSV ``id,text`` (a source id, inherited by its clips, or a clip id) or as the
tagging research's TSV lines ``name \\t title \\t tags`` (the file name's stem gives the source
id).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UsageError
from pipeline.files import csv_rows, read_user_text
from pipeline.ids import sanitize_id

# Multilingual (about 100 languages, Chinese included), so titles of any language get a
# meaningful encoding; the research setup's Chinese-only ERNIE 1.0 works by name too.
DEFAULT_TEXT_MODEL = "bert-base-multilingual-cased"
DEFAULT_MAX_CHARS = 50  # the research setup's cut


@dataclass(frozen=True)
class Titles:
    """The titles a file gives, by id, and how many of its lines had an empty title."""

    by_id: dict[str, str]
    empty: int
    path: str


def read_titles(path: str | Path) -> Titles:
    """Read a titles file (CSV ``id,text`` or TSV ``name \\t title \\t tags``); UsageError on
    missing columns or one id given two different titles. A BOM and CRLF line ends are fine."""
    p = Path(path)
    try:
        raw = read_user_text(p)  # a BOM is not part of the first id; not UTF-8: one line
    except OSError as e:
        raise UsageError(f"--text {p}: cannot read: {e.strerror or e}") from None
    lines = raw.splitlines()  # \r\n, \n and \r alike
    first = next((ln for ln in lines if ln.strip()), "")
    if not first:
        raise UsageError(f"--text {p}: no titles in the file")
    rows = _tsv_rows(p, lines) if "\t" in first else _csv_rows(p, raw)
    by_id: dict[str, str] = {}
    where: dict[str, int] = {}
    empty = 0
    for line_no, key, text in rows:
        text = " ".join(text.split())  # inner newlines and runs of spaces: one space
        if not text:
            empty += 1
            continue
        if key in by_id and by_id[key] != text:
            raise UsageError(
                f"--text {p}: id {key!r} has two different titles (line {where[key]}: "
                f"{by_id[key]!r}; line {line_no}: {text!r})"
            )
        by_id.setdefault(key, text)
        where.setdefault(key, line_no)
    return Titles(by_id, empty, str(p))


def _tsv_rows(p: Path, lines: list[str]) -> list[tuple[int, str, str]]:
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) < 2:
            raise UsageError(
                f"--text {p}: line {i} has {len(cols)} column(s); expected name<TAB>title<TAB>tags"
            )
        out.append((i, sanitize_id(Path(cols[0].strip()).stem), cols[1]))
    return out


def _csv_rows(p: Path, raw: str) -> list[tuple[int, str, str]]:
    records = csv_rows(p, raw)
    _, row = next(records, (1, []))
    header = [h.strip().lower() for h in row]
    if "id" not in header or "text" not in header:
        raise UsageError(
            f"--text {p}: the header {','.join(header)!r} lacks the columns id and text "
            "(or give the TSV form name<TAB>title<TAB>tags)"
        )
    i_id, i_text = header.index("id"), header.index("text")
    out = []
    for line, row in records:
        if not any(c.strip() for c in row):
            continue
        if len(row) <= max(i_id, i_text):
            raise UsageError(
                f"--text {p}: line {line} has {len(row)} column(s); "
                f"expected {len(header)} ({','.join(header)})"
            )
        out.append((line, row[i_id].strip(), row[i_text]))
    return out


def cut(text: str, max_chars: int) -> str:
    """The title as the encoder sees it: its first ``max_chars`` characters (0: all)."""
    return text[:max_chars] if max_chars > 0 else text


@dataclass(frozen=True)
class TitleMatch:
    """Each clip's title (clips without one absent), and the file's ids that matched no clip."""

    by_clip: dict[str, str]
    unmatched: list[str]


def match_titles(titles: Titles, clips: Sequence[tuple[str, str]], max_chars: int,
                 views: dict[str, str] | None = None) -> TitleMatch:
    """Give each ``(clip_id, source_id)`` its title: the clip's own, else its source's; an
    augmented view (``views``: its id -> its clip's) has its clip's."""
    used: set[str] = set()
    by_clip: dict[str, str] = {}
    for clip_id, source_id in clips:
        own = (views or {}).get(clip_id, clip_id)
        key = own if own in titles.by_id else source_id
        if key in titles.by_id:
            by_clip[clip_id] = cut(titles.by_id[key], max_chars)
            used.add(key)
    return TitleMatch(by_clip, sorted(set(titles.by_id) - used))
