"""Given segments for ``vpipe subclip --segments``, and MSVD's annotation file converted to them.

A segments CSV has the columns ``source,start,end`` and optionally ``id`` (times in seconds in the
source). ``source`` is a video's file stem or source id. Segments may overlap (ActivityNet
Captions gives each sentence its own). A row that cannot be cut (not a number, end <= start) is
kept with its problem, so that it fails as that segment's record and the others are cut.
MSVD's annotations (``VideoID,Start,End,WorkerID,Source,AnnotationTime,Language,Description``)
convert into a segments file and a captions file (``id,caption``) with :func:`convert_msvd`.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import media
from pipeline.errors import UsageError
from pipeline.files import atomic_path, csv_rows, read_user_text, table_records
from pipeline.ids import sanitize_id


@dataclass(frozen=True)
class Segment:
    """One row: the clip id, its source, the asked bounds, the CSV line, and why it cannot be
    cut (None when it can be tried)."""

    clip_id: str
    source: str
    start_s: float
    end_s: float
    line: int
    problem: str | None = None


def _number(text: str) -> float | None:
    try:
        x = float(text)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def clip_id_of(source: str, start: str, end: str) -> str:
    """MSVD's clip name, ``<source>_<start>_<end>`` (as written), made id-safe."""
    return sanitize_id(f"{source}_{start}_{end}")


def read_segments(path: str | Path) -> list[Segment]:
    """Read a segments CSV; a missing column or a repeated clip id is a usage error (exit 2),
    a row that cannot be cut is a :class:`Segment` with its ``problem``."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such segments file")
    out: list[Segment] = []
    seen: dict[str, int] = {}
    rows = table_records(path, read_user_text(path), "segments CSV", ("source", "start", "end"),
                         "source,start,end[,id]")
    for n, rec in rows:
        src = (rec.get("source") or "").strip()
        a, b = (rec.get("start") or "").strip(), (rec.get("end") or "").strip()
        if not src:
            raise UsageError(f"{path}:{n}: empty source")
        cid = sanitize_id((rec.get("id") or "").strip() or clip_id_of(src, a, b))
        if cid in seen:
            raise UsageError(f"{path}:{n}: clip id {cid!r} is also on line {seen[cid]}")
        seen[cid] = n
        start, end = _number(a), _number(b)
        problem = None
        if start is None or end is None:
            bad = a if start is None else b
            problem = f"{'start' if start is None else 'end'} {bad!r} is not a number"
        elif start < 0:
            problem = f"start {start:g} s is before the video's start"
        elif end <= start:
            problem = f"end {end:g} s is not after start {start:g} s"
        out.append(Segment(cid, src, start or 0.0, end or 0.0, n, problem))
    if not out:
        raise UsageError(f"{path}: no segment rows")
    return out


def plan_segments(
    frames: media.FrameTimes, segs: list[Segment], mode: str
) -> tuple[list[tuple[str, float, float]], dict[str, str]]:
    """(clip id, start, end) of ``segs`` on the frame grid (exact: from the first frame at or
    after the asked start to the first at or after the asked end) or the keyframe grid
    (nearest keyframes), and why each of the others cannot be cut (clip id -> reason)."""
    end = frames.end_s
    # Asked ends up to one frame past the last frame's end are the video's end (rounding).
    frame_s = float(np.median(np.diff(frames.times))) if len(frames.times) > 1 else 0.04
    grid = np.append(frames.times if mode == "exact" else frames.keyframe_times, end)
    clips, problems = [], {}
    for seg in segs:
        if seg.problem:
            problems[seg.clip_id] = seg.problem
            continue
        if seg.start_s >= end or seg.end_s > end + frame_s:
            problems[seg.clip_id] = (f"segment {seg.start_s:g}-{seg.end_s:g} s is outside the "
                                     f"video (it ends at {end:.3f} s)")
            continue
        if mode == "exact":
            s = float(grid[int(np.searchsorted(grid, seg.start_s - 1e-6))])
            e = float(grid[min(int(np.searchsorted(grid, seg.end_s - 1e-6)), len(grid) - 1)])
        else:
            s = float(grid[int(np.argmin(np.abs(grid - seg.start_s)))])
            e = float(grid[int(np.argmin(np.abs(grid - min(seg.end_s, end))))])
        if e <= s:
            why = "holds no frame" if mode == "exact" else (
                "has no keyframe-aligned clip (nearest keyframes meet); use --mode exact")
            problems[seg.clip_id] = f"segment {seg.start_s:g}-{seg.end_s:g} s {why}"
            continue
        clips.append((seg.clip_id, s, e))
    return clips, problems


def segments_by_video(segments: Iterable[Segment], sources) -> tuple[dict[str, list], list[str]]:
    """Source id -> its segments (``source`` matched by source id, else file stem); and the
    sources of the file that match no video."""
    by_key: dict[str, str] = {}
    for s in sources:
        by_key.setdefault(s.source_id, s.source_id)
    for s in sources:
        by_key.setdefault(Path(s.path).stem, s.source_id)
        by_key.setdefault(sanitize_id(Path(s.path).stem), s.source_id)
    out: dict[str, list] = {}
    unknown: list[str] = []
    for seg in segments:
        sid = by_key.get(seg.source) or by_key.get(sanitize_id(seg.source))
        if sid is None:
            if seg.source not in unknown:
                unknown.append(seg.source)
            continue
        out.setdefault(sid, []).append(seg)
    return out, unknown


MSVD_COLUMNS = ("VideoID", "Start", "End", "Language", "Description")


def convert_msvd(annotations: str | Path, out_dir: str | Path,
                 language: str = "English") -> tuple[Path, Path, int, int]:
    """MSVD's annotation CSV -> ``OUT/segments.csv`` (source,start,end,id, one row per clip)
    and ``OUT/captions.csv`` (id,caption, the descriptions in ``language``). Returns the two
    paths, the clip count and the caption count."""
    annotations, out_dir = Path(annotations), Path(out_dir)
    if not annotations.is_file():
        raise UsageError(f"{annotations}: no such annotations file")
    segs: dict[str, tuple[str, str, str]] = {}
    caps: list[tuple[str, str]] = []
    rows = csv_rows(annotations, read_user_text(annotations))
    _, header = next(rows, (1, []))
    missing = [c for c in MSVD_COLUMNS if c not in header]
    if missing:
        raise UsageError(f"{annotations}: not MSVD's layout (missing {','.join(missing)})")
    for _, row in rows:
        rec = dict(zip(header, row, strict=False))
        if (rec.get("Language") or "").strip() != language:
            continue
        vid, a, b = (rec.get(k, "").strip() for k in ("VideoID", "Start", "End"))
        text = " ".join((rec.get("Description") or "").split())
        if not vid or not text:
            continue
        cid = clip_id_of(vid, a, b)
        segs.setdefault(cid, (vid, a, b))
        caps.append((cid, text))
    if not caps:
        raise UsageError(f"{annotations}: no {language} descriptions")
    out_dir.mkdir(parents=True, exist_ok=True)
    seg_path, cap_path = out_dir / "segments.csv", out_dir / "captions.csv"
    with atomic_path(seg_path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["source", "start", "end", "id"])
        w.writerows([vid, a, b, cid] for cid, (vid, a, b) in segs.items())
    with atomic_path(cap_path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "caption"])
        w.writerows(caps)
    return seg_path, cap_path, len(segs), len(caps)
