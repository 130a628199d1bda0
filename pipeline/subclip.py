"""``vpipe subclip``: cut each source video into non-overlapping subclips.

Per source: probe it, list its frame times (demux only), plan the clips on that frame grid
(exact mode) or keyframe grid (keyframe mode), cut them all in one ffmpeg process, then measure
each written clip. Keyframe mode falls back to exact mode, with a note on stderr and in the
records, for a source whose keyframes cannot place the clips (e.g. a single keyframe). Clips
land in ``OUT/<source_id>/<clip_id>.mp4``; the source folder is written under a temp name and
renamed, so a source is either complete or absent. With ``--segments`` the clips are the given
ranges instead (``pipeline.segments``; they may overlap), cut by the same two cutters.
Ranges mode plans as exact mode does and writes no video: each record names the source (path,
size, mtime) and the clip's frames on its grid, and the next stages decode that range from the
source (``media.decode_span``); the output folder holds only its manifest and vpipe.json.

A clip is kept only when it holds exactly its planned frames and its span of the source decodes
without damage (checked when an exact cut's decoders said anything, and for every stream copy,
which decodes nothing); a damaged clip is a failed record naming where, the intact ones stay ok.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import media
from pipeline.errors import MediaError, Skip, TooShort, UsageError
from pipeline.files import atomic_path, sha256_of
from pipeline.records import FAILED, Run
from pipeline.runner import Item, Summary, run_items
from pipeline.segments import Segment, plan_segments, read_segments, segments_by_video

MODES = ("ranges", "exact", "keyframe")
# A written clip's frame times may differ from the source's (less the start) by this much: one
# tick of MPEG's 90 kHz clock, the most that rounding a timestamp moves a frame; plus one tick
# of the written file's own clock where a muxer chose a coarser one (ffmpeg 5.1 copying a
# millisecond clock into mp4's 1/15360 s).
_SAME_TIME_S = 1.2e-5


@dataclass(frozen=True)
class SubclipOptions:
    """What to cut: ``count`` clips of ``duration_s`` from ``start_s``, ``gap_s`` apart."""

    count: int = 3
    duration_s: float = 30.0
    start_s: float = 10.0
    gap_s: float = 0.0
    mode: str = "exact"  # the shipped workflows use "ranges"; a bare `vpipe subclip` makes files
    min_fraction: float = 0.5
    crf: int = 18
    preset: str = "ultrafast"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"--mode must be one of {', '.join(MODES)} (got {self.mode!r})")
        if self.count < 1 or not self.duration_s > 0:
            raise UsageError("--count must be >= 1 and --duration > 0")
        if self.start_s < 0 or self.gap_s < 0:
            raise UsageError("--start and --gap must be >= 0")
        if not 0 <= self.min_fraction <= 1:
            raise UsageError("--min-fraction must be between 0 and 1")


@dataclass(frozen=True)
class Subclip:
    """One planned clip: times in the source (seconds from its start) on its frame grid."""

    clip_id: str
    start_s: float
    end_s: float


def plan_subclips(
    frames: media.FrameTimes, opts: SubclipOptions, source_id: str
) -> list[Subclip]:
    """Place the clips on the source's frame grid (exact) or keyframe grid (keyframe).

    Boundaries snap to a frame at or after the requested time (exact) or to the nearest
    keyframe (keyframe); both snaps are monotone, so clip k ends where clip k+1 may start at
    the earliest: clips never overlap. A clip at or under ``min_fraction`` of the requested
    duration (the source's end cut it short) is dropped, as in the seed.
    """
    end = frames.end_s
    on_frames = opts.mode != "keyframe"  # ranges: the frames exact mode would cut at
    grid = frames.times if on_frames else frames.keyframe_times
    grid = np.append(grid, end)

    def snap(t: float) -> float:
        if on_frames:
            i = int(np.searchsorted(grid, t - 1e-6, side="left"))
            return float(grid[min(i, len(grid) - 1)])
        return float(grid[int(np.argmin(np.abs(grid - t)))])

    clips: list[Subclip] = []
    for k in range(opts.count):
        want = opts.start_s + k * (opts.duration_s + opts.gap_s)
        if want >= end:
            break
        s, e = snap(want), min(snap(want + opts.duration_s), end)
        if e - s <= opts.min_fraction * opts.duration_s or e <= s:
            continue
        clips.append(Subclip(f"{source_id}_{len(clips)}", s, e))
    return clips


def subclip_videos(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    opts: SubclipOptions,
    *,
    segments: str | os.PathLike | None = None,
    workers: int = 1,
    overwrite: bool = False,
    quiet: bool = False,
    engine: Any = None,
) -> Summary:
    """The stage: every video found in ``inputs`` → subclips in ``out_dir`` (resumable); with
    ``segments`` (a CSV of source,start,end[,id]) the given ranges instead of the plan. On
    ``engine`` (:mod:`pipeline.engine`; default: ``workers`` local processes)."""
    params = asdict(opts)
    by_video = None
    if segments is not None:
        rows = read_segments(segments)  # a bad file is exit 2 before any video is probed
    sources = media.scan_sources(inputs)
    if segments is not None:
        by_video, unknown = segments_by_video(rows, sources)
        if unknown:
            print(f"vpipe subclip: {segments}: {len(unknown)} sources match no video among the "
                  f"inputs (e.g. {', '.join(unknown[:3])})", file=sys.stderr)
        params = {**params, "segments": str(Path(segments).resolve()),
                  "segments_sha256": sha256_of(segments)}
    run = Run(
        Path(out_dir), "subclip", params, overwrite=overwrite,
        versions=media.media_versions(), outputs=clip_files,
        inputs=[*inputs, *([segments] if segments is not None else [])],
    ).open()
    for s in sources:
        if _source_changed(run.previous_records(s.source_id), s.path):
            run.forget(s.source_id)  # a ranges record names the file as it was: plan it again
    items = [Item(s.source_id, str(s.path), s) for s in sources]
    work = functools.partial(cut_source, out_dir=Path(out_dir), opts=opts, segments=by_video,
                             segments_file=str(segments))
    return run_items(run, items, work, workers=workers, quiet=quiet, units=("videos", "clips"),
                     engine=engine)


def _source_changed(records: list[dict], path: Path) -> bool:
    """A ranges record of this source whose size/mtime are not the file's any more."""
    ranges = [r for r in records if r.get("mode") == "ranges" and r.get("status") == "ok"]
    if not ranges:
        return False
    try:
        now = source_identity(path)
    except OSError:
        return True
    keys = ("source_path", "source_bytes", "source_mtime_ns")
    return any({k: r.get(k) for k in keys} != now for r in ranges)


def clip_files(rec: dict) -> list[str]:
    """What a clip record's item wrote (checked on resume): the clip file."""
    return [rec["path"]] if rec.get("path") else []


def cut_source(item: Item, *, out_dir: Path, opts: SubclipOptions,
               segments: dict[str, list[Segment]] | None = None,
               segments_file: str = "") -> list[dict]:
    """Work for one source: write its folder of clips, return one manifest record per clip."""
    src: media.SourceRef = item.data
    if segments is not None and not segments.get(src.source_id):
        raise Skip(f"{src.path}: no segment of it in {segments_file}")
    src.raise_problem()
    info = src.info
    frames = media.frame_times(src.path)
    # Against the video stream's own declared end: a soundtrack longer than the picture
    # makes the container's duration longer without the file being cut short.
    declared = info.video_end_s or info.duration_s
    if frames.end_s < declared - max(1.0, 0.05 * declared):
        raise MediaError(
            f"{src.path}: truncated (media data ends at {frames.end_s:.2f}s of the "
            f"{declared:.2f}s declared)"
        )
    if opts.mode == "keyframe" and not media.copyable_to_mp4(info):
        opts = replace(opts, mode="exact")  # cannot be stream-copied: re-encode
    if segments is not None:
        return cut_segments(src, frames, segments[src.source_id], out_dir, opts, segments_file)
    note = None
    if opts.mode == "ranges":
        clips = plan_subclips(frames, opts, src.source_id)
        if not clips:
            raise TooShort(_too_short(src, frames, opts))
        if len(clips) < opts.count:
            report_note("subclip", str(src.path), shortfall(len(clips), frames.end_s, opts))
        return range_records(clips, src, frames)
    if opts.mode == "keyframe":
        note = keyframe_fallback(frames, opts, src.source_id)
        if note:
            opts = replace(opts, mode="exact")
            report_note("subclip", str(src.path), note)
    clips = plan_subclips(frames, opts, src.source_id)
    if not clips:
        raise TooShort(_too_short(src, frames, opts))
    if len(clips) < opts.count:
        report_note("subclip", str(src.path), shortfall(len(clips), frames.end_s, opts))
    mode = opts.mode
    folder = out_dir / src.source_id
    records, errors = [], []
    with atomic_path(folder) as tmp:
        tmp.mkdir(parents=True)
        if mode == "exact":
            suspects = media.cut_exact(src.path, info, frames, clips, tmp,
                                       preset=opts.preset, crf=opts.crf)
        else:
            media.cut_keyframes(src.path, info, frames, clips, tmp)
            suspects = {c.clip_id for c in clips}  # a stream copy decodes nothing: check all
        for clip in clips:
            rec = _measure(tmp / f"{clip.clip_id}.mp4", clip, src, mode, frames,
                           check=clip.clip_id in suspects)
            if note:
                rec["note"] = note
            if rec.get("status") == FAILED:
                errors.append(rec.pop("cause"))
            records.append(rec)
        if len(errors) == len(records):  # nothing to keep: the source failed
            raise MediaError(f"{src.path}: " + "; ".join(errors))
    return records


def _too_short(src: media.SourceRef, frames: media.FrameTimes, opts: SubclipOptions) -> str:
    need = opts.start_s + opts.min_fraction * opts.duration_s
    return (f"{src.path}: too short ({frames.end_s:.2f}s): the first subclip from "
            f"{opts.start_s:g}s needs more than {need:g}s of video")


def source_identity(path: Path) -> dict:
    """What a ranges record keeps of its source to tell, later, that it is the same file: its
    absolute path, size and modification time (a stat, not a digest: sources are large)."""
    st = path.stat()
    return {"source_path": str(path.resolve()), "source_bytes": st.st_size,
            "source_mtime_ns": st.st_mtime_ns}


def range_records(clips: list[Subclip], src: media.SourceRef, frames: media.FrameTimes
                  ) -> list[dict]:
    """Ranges mode: one record per planned clip, nothing written. The bounds are frame times
    of the source's grid (as an exact cut's), with the clip's first and last frame index on
    it; ``n_frames`` is what the range holds."""
    info = src.info
    rotation = media.display_rotation(src.path)
    width, height = media.upright_size(info.width, info.height, rotation)
    ident = source_identity(src.path)
    records = []
    for clip in clips:
        inside = np.flatnonzero(
            (frames.times >= clip.start_s - 1e-6) & (frames.times < clip.end_s - 1e-6))
        records.append({
            "id": clip.clip_id,
            "item": src.source_id,
            "source": src.source_id,
            **ident,
            "path": None,
            "start": round(clip.start_s, 6),
            "end": round(clip.end_s, 6),
            "duration": round(clip.end_s - clip.start_s, 6),
            "mode": "ranges",
            "first_frame": int(inside[0]),
            "last_frame": int(inside[-1]),
            "n_frames": len(inside),
            "fps": round(info.fps, 6),
            "width": width,
            "height": height,
            "rotation": rotation,
            "has_audio": info.has_audio,
        })
    return records


def cut_segments(src: media.SourceRef, frames: media.FrameTimes, segs: list[Segment],
                 out_dir: Path, opts: SubclipOptions, segments_file: str) -> list[dict]:
    """Cut the given segments of one source (they may overlap): each is a clip record with
    the asked and the true bounds, or a failed record saying why it cannot be cut."""
    planned, problems = plan_segments(
        frames, segs, "exact" if opts.mode == "ranges" else opts.mode)
    clips = [Subclip(*c) for c in planned]
    asked = {s.clip_id: s for s in segs}
    if opts.mode == "ranges":
        records = range_records(clips, src, frames) if clips else []
    else:
        records = _cut_segment_files(src, frames, clips, out_dir, opts)
    for cid, why in problems.items():
        records.append({
            "id": cid, "item": src.source_id, "status": FAILED,
            "error": f"{segments_file}:{asked[cid].line}: {cid}: {why}, not cut",
            "source": src.source_id, "source_path": str(src.path),
        })
    for rec in records:
        seg = asked[rec["id"]]
        rec.update({"asked_start": seg.start_s, "asked_end": seg.end_s, "segments_line": seg.line})
    order = {s.clip_id: k for k, s in enumerate(segs)}
    return sorted(records, key=lambda r: order[r["id"]])


def _cut_segment_files(src: media.SourceRef, frames: media.FrameTimes, clips: list[Subclip],
                       out_dir: Path, opts: SubclipOptions) -> list[dict]:
    records = []
    with atomic_path(out_dir / src.source_id) as tmp:
        tmp.mkdir(parents=True)
        suspects: set[str] = set()
        if clips and opts.mode == "exact":
            suspects = media.cut_exact(src.path, src.info, frames, clips, tmp,
                                       preset=opts.preset, crf=opts.crf)
        elif clips:
            for group in _disjoint_groups(clips):  # the segment muxer cuts a partition
                media.cut_keyframes(src.path, src.info, frames, group, tmp)
            suspects = {c.clip_id for c in clips}
        for clip in clips:
            rec = _measure(tmp / f"{clip.clip_id}.mp4", clip, src, opts.mode, frames,
                           check=clip.clip_id in suspects)
            rec.pop("cause", None)
            records.append(rec)
    return records


def _disjoint_groups(clips: list[Subclip]) -> list[list[Subclip]]:
    """Overlapping clips split into groups of clips that do not overlap (first fit)."""
    groups: list[list[Subclip]] = []
    for c in sorted(clips, key=lambda c: (c.start_s, c.end_s)):
        for g in groups:
            if g[-1].end_s <= c.start_s:
                g.append(c)
                break
        else:
            groups.append([c])
    return groups


def keyframe_fallback(frames: media.FrameTimes, opts: SubclipOptions, source_id: str) -> str | None:
    """Why keyframe mode cannot cut this source as asked (None: it can).

    Clips can only start at keyframes: with a single keyframe the only stream-copied clip
    would be the whole video, whatever ``--start``/``--duration`` say; and keyframes may be
    too sparse to place any clip at all. Either way the source is cut in exact mode instead,
    provided exact mode can place a clip (else the usual "too short" applies).
    """
    keys = frames.keyframe_times
    exact = replace(opts, mode="exact")
    if not plan_subclips(frames, exact, source_id):
        return None
    if len(keys) < 2:
        why = f"a single keyframe (at {keys[0]:.2f}s)" if len(keys) else "no keyframe"
    elif not plan_subclips(frames, opts, source_id):
        shown = ", ".join(f"{t:g}" for t in keys[:8]) + (", ..." if len(keys) > 8 else "")
        why = f"no subclip fits between its keyframes (at {shown} s)"
    else:
        return None
    return (
        f"keyframe mode cannot cut this video: {why}; "
        "cut in exact mode (re-encoded) instead"
    )


def shortfall(made: int, end_s: float, opts: SubclipOptions) -> str:
    """Why a source gave fewer clips than --count asked (the video ends before them)."""
    return (f"{made} of {opts.count} clips: the video ends at {end_s:.2f}s, and a clip at or "
            f"under --min-fraction {opts.min_fraction:g} of --duration {opts.duration_s:g}s "
            "is not made")


def report_note(stage: str, label: str, message: str) -> None:
    """One stderr line that is not an error (the run goes on as decided), like report_error's."""
    print(f"vpipe {stage}: {label}: note: {message}", file=sys.stderr)


def _measure(
    path: Path, clip: Subclip, src: media.SourceRef, mode: str, frames: media.FrameTimes,
    *, check: bool,
) -> dict:
    """The clip's manifest record, measured from the written file, or a failed record (its
    file removed) when the source's data for it is damaged.

    The written clip must hold exactly the source frames of [start, end): its bounds are then
    those frames' times on the source's own grid, so a clip ends where the next one starts
    (``end <= next start``) and not where the last frame's rounded duration says. ``check``
    (the cut's decoder said something, or a stream copy that decoded nothing) decodes the
    clip's span to find damage; a frame count that is not the plan's does too.
    """
    # The clip's frames on the source's grid, as times from its start.
    planned_times = frames.times[
        (frames.times >= clip.start_s - 1e-6) & (frames.times < clip.end_s - 1e-6)] - clip.start_s
    planned = len(planned_times)
    try:
        written = media.frame_times(path)
    except MediaError as e:
        if mode == "exact":  # vpipe's own encode: damage in the source, or a bug
            damage = media.decoding_damage(src.path, frames, clip.start_s, clip.end_s)
            if damage is None:
                raise
            return _failed(path, clip, src, mode, damage.describe())
        # A stream copy of damaged data may not even open.
        why = str(e).removeprefix(f"{path}: ")
        return _failed(path, clip, src, mode,
                       f"damaged data (the copied clip is unreadable: {why})")
    if abs(written.times[0]) > 1e-3:
        raise MediaError(f"{path.name}: written clip starts at {written.times[0]:.3f}s, not 0")
    n_frames = len(written.times)
    damage = None
    if check or n_frames != planned:
        # Exact mode decoded the source: look there. A stream copy's damage is in the copy.
        damage = (media.decoding_damage(src.path, frames, clip.start_s, clip.end_s)
                  if mode == "exact" else media.decoding_damage(path, written))
    if damage is not None:
        return _failed(path, clip, src, mode,
                       damage.describe(0.0 if mode == "exact" else clip.start_s))
    if n_frames != planned:
        return _failed(path, clip, src, mode,
                       f"the written clip has {n_frames} frames, the source {planned} in its span")
    # Frame k at the source's time for it, less the start: a sample time then means one source
    # frame whether the clip is read from this file or as a range of its source.
    moved = float(np.abs((written.times - written.times[0]) - planned_times).max())
    probed = media.probe(path)
    if moved > _SAME_TIME_S + float(probed.video_time_base or 0):
        raise MediaError(f"{path.name}: the written clip's frame times are up to "
                         f"{moved * 1e3:.3f} ms off the source's")
    rotation = media.display_rotation(path)
    width, height = media.upright_size(probed.width, probed.height, rotation)
    return {
        "id": clip.clip_id,
        "item": src.source_id,
        "source": src.source_id,
        "source_path": str(src.path),
        "path": f"{src.source_id}/{path.name}",
        "start": round(clip.start_s, 6),
        "end": round(clip.end_s, 6),
        "duration": round(clip.end_s - clip.start_s, 6),
        "mode": mode,
        "n_frames": n_frames,
        "fps": round(probed.fps, 6),
        # As players show it: a stream copy keeps a phone video's sideways frames + rotation.
        "width": width,
        "height": height,
        "rotation": rotation,
        "has_audio": probed.has_audio,
    }


def _failed(path: Path, clip: Subclip, src: media.SourceRef, mode: str, why: str) -> dict:
    """The failed record of a clip whose source data is damaged; its written file is removed
    (``cause`` is popped by the caller: the source's error when no clip is kept)."""
    cause = f"{why}, in clip {clip.clip_id} ({clip.start_s:.2f}-{clip.end_s:.2f}s)"
    path.unlink(missing_ok=True)
    return {
        "id": clip.clip_id, "item": src.source_id, "status": FAILED,
        "error": f"{src.path}: {cause}, not kept", "cause": cause,
        "source": src.source_id, "source_path": str(src.path),
        "start": round(clip.start_s, 6), "end": round(clip.end_s, 6), "mode": mode,
    }
