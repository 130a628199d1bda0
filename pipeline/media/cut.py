"""Cutting clips out of a source with the ffmpeg binary: re-encoded frame-accurately
(:func:`cut_exact`) or stream-copied at keyframes (:func:`cut_keyframes`).

A clip is anything with ``clip_id``, ``start_s`` and ``end_s`` (seconds from the container start,
on the source's frame or keyframe grid); each is written as ``<out>/<clip_id>.mp4``.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from pipeline.errors import MediaError
from pipeline.media.ffmpeg import run_ffmpeg
from pipeline.media.probe import ERR_DETECT, UNINDEXED_FORMATS, FrameTimes, MediaInfo

# Codecs an mp4 can hold as they are (keyframe mode copies streams; others are re-encoded).
MP4_VIDEO = {"h264", "hevc", "mpeg4", "av1", "libdav1d", "vp9", "mpeg2video", "mjpeg"}
MP4_AUDIO = {"aac", "mp3", "mp3float", "opus", "flac", "ac3", "alac"}
# Exact mode re-encodes this many clips per ffmpeg process (each input decodes only its span).
_CLIPS_PER_PROCESS = 4
# Exact cuts of a source without a seek index (UNINDEXED_FORMATS) seek this many seconds
# before the keyframe the clip's first frame needs, and drop the frames before it after decoding.
_SEEK_MARGIN_S = 1.0
# The decoders of an exact cut flag damage as decoding_damage's do ("corrupt decoded frame").
_ERR_DETECT = ["-err_detect:v", ERR_DETECT]


class Clip(Protocol):
    """What the cutters need of a planned clip (subclip's ``Subclip``)."""

    clip_id: str
    start_s: float
    end_s: float


def copyable_to_mp4(info: MediaInfo) -> bool:
    """Whether :func:`cut_keyframes` can stream-copy this source into mp4 (an MPEG program
    stream leaves most video packets without a pts, which the segment muxer cannot place)."""
    return info.video_codec in MP4_VIDEO and info.container != "mpeg"


def snap_down_us(t: float) -> str:
    """``t`` floored to the microsecond, as ffmpeg's time syntax (ffmpeg parses µs exactly)."""
    return f"{math.floor(t * 1e6 + 1e-3) / 1e6:.6f}"


def cut_exact(
    src: Path,
    info: MediaInfo,
    frames: FrameTimes,
    clips: Sequence[Clip],
    out: Path,
    *,
    preset: str,
    crf: int,
) -> set[str]:
    """Re-encode each clip frame-accurately; one ffmpeg process per group of clips, each
    clip an input seeked to its first frame so only its own span is decoded. Returns the
    clips of the groups whose ffmpeg said anything at warning level (its decoders report
    damaged input there): those are checked."""
    keys = frames.keyframe_times
    suspects: set[str] = set()
    for g in range(0, len(clips), _CLIPS_PER_PROCESS):
        group = clips[g : g + _CLIPS_PER_PROCESS]
        args: list[str] = []
        trims: list[list[str]] = []
        for c in group:
            # The start is an exact frame time floored to the microsecond: that frame is kept
            # and becomes t=0; the duration ends just before the next clip's first frame.
            start, length = snap_down_us(c.start_s), snap_down_us(c.end_s - c.start_s)
            if info.container in UNINDEXED_FORMATS:
                # ffmpeg's input seek in these lands on any packet, not on a keyframe, and
                # the frames up to the next keyframe would be lost.
                before = keys[keys <= c.start_s + 1e-6]
                seek = max(0.0, (before[-1] if len(before) else 0.0) - _SEEK_MARGIN_S)
                seek_s = snap_down_us(seek)
                args += [*_ERR_DETECT, "-ss", seek_s, "-i", str(src)]
                trims.append(["-ss", snap_down_us(c.start_s - float(seek_s)), "-t", length])
            else:
                args += [*_ERR_DETECT, "-ss", start, "-t", length, "-i", str(src)]
                trims.append([])
        for i, c in enumerate(group):
            args += ["-map", f"{i}:v:0", "-map", f"{i}:a:0?", "-sn", "-dn", *trims[i]]
            if info.width % 2 or info.height % 2:  # yuv420p needs even sizes
                args += ["-vf", "crop=trunc(iw/2)*2:trunc(ih/2)*2:0:0"]
            args += ["-c:v", "libx264", "-preset", preset, "-crf", str(crf)]
            args += ["-pix_fmt", "yuv420p", "-fps_mode", "passthrough"]
            if info.video_time_base:
                # Every frame keeps its source time, less the start: left to itself, ffmpeg
                # encodes in 1/(frame rate) and rounds each frame's time onto that grid, so a
                # source whose frames are off it (a looped file: 10.7 ms later after each
                # loop) gave clips whose frame k was at another time than the source's.
                tb = info.video_time_base
                args += ["-enc_time_base:v", f"{tb.numerator}/{tb.denominator}"]
            if info.has_audio:  # (an unused -b:a is a warning, and warnings are checked)
                args += ["-c:a", "aac", "-b:a", "128k"]
            args += ["-movflags", "+faststart"]
            args += ["-f", "mp4", str(out / f"{c.clip_id}.mp4")]
        if run_ffmpeg(args, what=f"{src}: cutting subclips", loglevel="warning"):
            suspects.update(c.clip_id for c in group)
    return suspects


def cut_keyframes(
    src: Path, info: MediaInfo, frames: FrameTimes, clips: Sequence[Clip], out: Path
) -> None:
    """Stream-copy the whole source once through the segment muxer, split at the clips'
    keyframe boundaries, and keep the segments that are clips (the rest is deleted)."""
    # Times as the segment muxer sees them: ffmpeg counts from the container start, and the
    # offset below moves the first video frame to 0 (a source whose audio starts first).
    t0 = float(frames.times[0])
    bounds = sorted({t for c in clips for t in (c.start_s, c.end_s)})
    bounds = [b - t0 for b in bounds if t0 < b < frames.end_s]
    half_frame = 0.5 / info.fps if info.fps else 0.01
    # Read no further than a second past the last clip: the rest would only be discarded.
    read_s = max(c.end_s for c in clips) + 1.0
    args = ["-t", f"{read_s:.6f}", "-i", str(src), "-map", "0:v:0", "-map", "0:a:0?"]
    args += ["-sn", "-dn", "-c:v", "copy"]
    args += ["-c:a", "copy" if info.audio_codec in MP4_AUDIO else "aac"]
    if t0 > 0:
        args += ["-output_ts_offset", f"{-t0:.6f}"]
    # Each segment's timestamps restart at its first keyframe (-reset_timestamps). Audio that
    # precedes that keyframe (AAC priming, packets interleaved before a B-frame keyframe) keeps
    # its negative time: mp4 stores it behind an edit list, so the clip still starts at 0 with
    # the audio in sync. The default (shift everything to non-negative) would move the video
    # start instead: "written clip starts at 0.023s".
    args += ["-f", "segment", "-avoid_negative_ts", "disabled", "-segment_format", "mp4"]
    args += ["-reset_timestamps", "1", "-segment_time_delta", f"{half_frame:.6f}"]
    if bounds:
        args += ["-segment_times", ",".join(f"{b:.6f}" for b in bounds)]
    else:  # one segment: the clip is the whole video (a time ffmpeg parses as a duration)
        args += ["-segment_time", f"{read_s + 1.0:.6f}"]
    args += [str(out / ".seg%05d.mp4")]
    run_ffmpeg(args, what=f"{src}: cutting subclips")
    for c in clips:
        seg = out / f".seg{bisect_right(bounds, c.start_s - t0):05d}.mp4"
        if not seg.exists():
            raise MediaError(f"{src}: the segment for {c.clip_id} was not written")
        seg.rename(out / f"{c.clip_id}.mp4")
    for leftover in out.glob(".seg*.mp4"):
        leftover.unlink()
