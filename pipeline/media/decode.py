"""One decoding pass over a clip: the frames a FrameSampler keeps, scaled, as RGB arrays, and its
audio resampled to mono PCM, exactly in time."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import MediaError, UsageError
from pipeline.media.audio import AudioAligner
from pipeline.media.probe import (
    UNINDEXED_FORMATS,
    av_reason,
    declared_end,
    demux_video,
    open_container,
    quarter_turns,
    video_stream,
)


def scaled_size(width: int, height: int, short_side: int | None, upscale: bool = False
                ) -> tuple[int, int]:
    """(w, h) with the short side set to ``short_side`` and the aspect ratio kept; a frame whose
    short side is already at or under it is kept as it is unless ``upscale``."""
    if not short_side or (min(width, height) <= short_side and not upscale):
        return width, height
    if width <= height:
        return short_side, max(1, round(height * short_side / width))
    return max(1, round(width * short_side / height)), short_side


@dataclass(frozen=True)
class FrameSampler:
    """Which decoded frames to keep: by time (``fps``) or by count (``every``); ``size`` is
    the short side of the output (None or 0 = original), reached by scaling down only unless
    ``upscale``."""

    fps: float | None = None
    every: int | None = None
    size: int | None = None
    upscale: bool = False

    def __post_init__(self) -> None:
        if (self.fps is None) == (self.every is None):
            raise UsageError("choose one way to sample frames: fps or every")
        if self.fps is not None and not self.fps > 0:
            raise UsageError(f"--fps must be > 0 (got {self.fps})")
        if self.every is not None and self.every < 1:
            raise UsageError(f"--every must be >= 1 (got {self.every})")


def iter_frames(
    path: str | os.PathLike,
    *,
    fps: float | None = None,
    every: int | None = None,
    size: int | None = None,
) -> Iterator[tuple[float, np.ndarray]]:
    """Decode once and yield ``(seconds from clip start, RGB uint8 HxWx3)`` for sampled frames.

    ``fps``: the frame on screen at each t = k/fps (timestamp k/fps); ``every``: frames 0, N,
    2N… (timestamp = their pts). ``size``: short side of the output (None/0 = original).
    """
    sampler = FrameSampler(fps=fps, every=every, size=size)
    for kind, t, data in decode(path, sampler=sampler):
        if kind == "frame":
            yield t, data


def decode(
    path: str | os.PathLike,
    *,
    sampler: FrameSampler | None,
    audio_rate_hz: int | None = None,
    span: tuple[float, float] | None = None,
    duration_s: float | None = None,
    also: FrameSampler | None = None,
) -> Iterator[tuple[str, float, np.ndarray]]:
    """One demux/decode pass over a clip yielding ``("frame", t, rgb)`` for sampled frames and
    ``("audio", t, int16 mono samples)`` chunks resampled to ``audio_rate_hz`` (mono is a
    stereo track's channel mean, any other layout's stereo fold-down averaged the same way:
    :class:`~pipeline.media.audio.AudioAligner`).

    Times are seconds from the first video frame (the clip start); the audio is aligned to it
    (padded or cut at the start, cut to the stream's declared length at the end). Frames that
    the sampler drops are never converted or scaled, and when the frames to keep are known
    from a demux pass, the non-reference ones among the others are not even decoded.

    ``span`` = (start_s, end_s), seconds from the container start on the file's frame grid
    (:func:`frame_times`): the clip is that range of the file, not the whole file
    (:func:`decode_span`); times are then seconds from its first frame. ``duration_s``: where
    the clip ends, from its first frame, when its cut says so (a subclip's end - start): its
    last frame is on screen until then, as in a span, and no audio is given past it; without
    it, the last frame lasts what the file says.

    ``also``: a second sampler over the same decoded frames (another rate, for another
    encoder), its frames yielded as ``("also", t, rgb)``: one decode serves both.
    """
    import av

    if span is not None:
        yield from decode_span(path, span, sampler=sampler, audio_rate_hz=audio_rate_hz,
                               also=also)
        return
    path = Path(path)
    c = open_container(path)
    try:
        v = video_stream(c, path)
        a = c.streams.audio[0] if (audio_rate_hz and c.streams.audio) else None
        streams = ([v] if sampler is not None else []) + ([a] if a is not None else [])
        if not streams:
            return
        v.thread_type = "AUTO"  # frame threads: decoding is the cost here
        origin = float(v.start_time * v.time_base) if v.start_time is not None else 0.0
        frames = _FramePicker(sampler, origin, v, duration_s) if sampler is not None else None
        second = _FramePicker(also, origin, v, duration_s, "also") if also is not None else None
        audio = AudioAligner(a, audio_rate_hz, origin, duration_s) if a is not None else None
        demuxed = demux_video(path) if sampler is not None else None
        plan = _plan_samples(demuxed, sampler, origin, duration_s) if demuxed else None
        if plan is not None:
            frames.plan = plan
            if second is not None:
                second.plan = _plan_samples(demuxed, also, origin, duration_s)
        wanted = plan if second is None or plan is None else {**second.plan, **plan}
        ctx = v.codec_context
        try:
            for packet in c.demux(*streams):
                if plan is not None and packet.stream is v and packet.pts is not None:
                    # Frames no reference depends on are not even decoded unless sampled.
                    ctx.skip_frame = "DEFAULT" if packet.pts in wanted else "NONREF"
                for frame in packet.decode():
                    if packet.stream is v:
                        yield from frames.push(frame)
                        if second is not None:
                            yield from second.push(frame)
                    else:
                        yield from audio.push(frame)
            if frames is not None:
                yield from frames.flush()
                if second is not None:
                    yield from second.flush()
                frames.check_complete(path, c)
            if audio is not None:
                yield from audio.flush()
                if frames is None:
                    _check_complete(path, c, audio.n / audio.rate + origin, a)
        except av.error.FFmpegError as e:
            raise MediaError(f"{path}: decoding failed ({av_reason(e)})") from None
    finally:
        c.close()


def _last_frame_s(last_t: float, duration_s: float | None, own_s: float) -> float:
    """How long the last frame (at ``last_t``) is on screen: until the clip's end when known,
    else its own duration."""
    return duration_s - last_t if duration_s is not None and duration_s > last_t else own_s


def _plan_samples(d: tuple | None, s: FrameSampler, origin: float,
                  duration_s: float | None = None) -> dict[int, list[float]] | None:
    """Which frames (by pts) the sampler keeps, and their timestamps, from a demux pass
    (``d``: :func:`demux_video`'s, None when pts are missing or repeated).

    Knowing them before decoding lets the decoder skip the other non-reference frames. Same
    rules as the streaming picker; None (no plan: decode all) when pts are missing or repeated.
    """
    if d is None:
        return None
    pts, _, last_dur, tb = d
    times = pts.astype(np.float64) * tb - origin
    if s.every is not None:
        return {int(p): [round(float(t), 6)] for p, t in zip(pts[:: s.every],
                                                             times[:: s.every], strict=True)}
    frame_s = float(np.median(np.diff(times))) if len(times) > 1 else last_dur or 0.04
    tol = 1e-6 + 1e-3 * frame_s
    end = times[-1] + 0.75 * _last_frame_s(times[-1], duration_s, last_dur or frame_s)
    plan: dict[int, list[float]] = {}
    k = 0
    while k / s.fps < end:
        j = max(0, int(np.searchsorted(times, k / s.fps + tol, side="right")) - 1)
        plan.setdefault(int(pts[j]), []).append(round(k / s.fps, 6))
        k += 1
    return plan


class _FramePicker:
    """Applies a FrameSampler to decoded frames in order (keeps one frame back for --fps)."""

    def __init__(self, sampler: FrameSampler, origin: float, stream,
                 duration_s: float | None = None, kind: str = "frame") -> None:
        self.s = sampler
        self.kind = kind  # what its frames are yielded as
        self.origin = origin
        self.duration_s = duration_s
        self.stream = stream
        self.index = 0  # decoded frames so far
        self.k = 0  # next tick for --fps
        self.prev = None  # (t, frame) the last frame seen, on screen until the next one
        rate = stream.average_rate or stream.guessed_rate
        self.frame_s = 1.0 / float(rate) if rate else 0.04
        self.last_t = -self.frame_s  # so a stream without pts starts at t = 0
        self.plan: dict[int, list[float]] | None = None  # pts -> timestamps, when planned

    def _rgb(self, frame) -> np.ndarray:
        w, h = scaled_size(frame.width, frame.height, self.s.size, self.s.upscale)
        if (w, h) == (frame.width, frame.height):
            rgb = frame.to_ndarray(format="rgb24")
        else:
            rgb = frame.reformat(w, h, "rgb24", interpolation="AREA").to_ndarray()
        # Output frames upright, as players show them. The short side is the same before
        # and after, so scaling first is fine.
        turns = quarter_turns(frame)
        return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb

    def _time(self, frame) -> float:
        t = frame.time
        # A frame without pts (rare raw streams) continues the previous one's clock.
        return self.last_t + self.frame_s if t is None else float(t) - self.origin

    def push(self, frame) -> Iterator[tuple[str, float, np.ndarray]]:
        t = self._time(frame)
        self.last_t = t
        i = self.index
        self.index += 1
        if self.plan is not None:
            ticks = self.plan.pop(frame.pts, ())
            if ticks:
                rgb = self._rgb(frame)
                for n, tick in enumerate(ticks):  # a frame on screen at several ticks
                    yield self.kind, tick, rgb if n == 0 else rgb.copy()
            return
        if self.s.every is not None:
            if i % self.s.every == 0:
                yield self.kind, round(t, 6), self._rgb(frame)
            return
        # The frame on screen at tick time k/fps is the last one whose pts <= k/fps; a tiny
        # tolerance absorbs pts rounding in coarse time bases.
        tol = 1e-6 + 1e-3 * self.frame_s
        if self.prev is not None:
            yield from self._emit_until(t - tol)
        self.prev = (t, frame)

    def _emit_until(self, limit: float) -> Iterator[tuple[str, float, np.ndarray]]:
        """Emit ticks k/fps < limit with the previous frame (converted once, reused)."""
        rgb = None
        while self.k / self.s.fps < limit:
            rgb = self._rgb(self.prev[1]) if rgb is None else rgb.copy()
            yield self.kind, round(self.k / self.s.fps, 6), rgb
            self.k += 1

    def flush(self) -> Iterator[tuple[str, float, np.ndarray]]:
        if self.plan is None and self.s.fps is not None and self.prev is not None:
            dur = self.prev[1].duration
            tb = self.prev[1].time_base
            frame_s = float(dur * tb) if dur and tb else self.frame_s
            frame_s = _last_frame_s(self.prev[0], self.duration_s, frame_s)
            # A tick in the last quarter of the last frame is the clip's end, not a frame.
            yield from self._emit_until(self.prev[0] + 0.75 * frame_s)

    def check_complete(self, path: Path, container) -> None:
        if self.index == 0:
            raise MediaError(f"{path}: no decodable video frames")
        _check_complete(
            path, container, self.last_t + self.origin + self.frame_s, self.stream
        )



def _check_complete(path: Path, container, end_s: float, stream=None) -> None:
    """A stream whose data stops well before its declared duration was cut short."""
    declared = declared_end(container, stream)
    start = container.start_time / 1e6 if container.start_time else 0.0
    seen = end_s - start
    if declared > 0 and seen < declared - max(1.0, 0.05 * declared):
        raise MediaError(
            f"{path}: truncated (media data ends at {seen:.2f}s of the {declared:.2f}s declared)"
        )


def decode_span(
    path: str | os.PathLike,
    span: tuple[float, float],
    *,
    sampler: FrameSampler | None,
    audio_rate_hz: int | None = None,
    also: FrameSampler | None = None,
) -> Iterator[tuple[str, float, np.ndarray]]:
    """:func:`decode` of the range [start_s, end_s) of a file, as if it were a clip cut there
    frame-exactly: the frames of the file's grid in the range, sampled from the first of them
    (``every`` counts the range's frames, ``fps`` ticks from its start), times from its start.

    Video: one seek to the keyframe at or before the start, a demux of the range (which frames
    it holds, so the sampler's plan and the non-reference skips work as in :func:`decode`),
    then a second seek and the decode, frames before the start dropped, stopping once a packet
    is decoded at or after the end. The frames are the file's own decoded frames, bit-identical
    to decoding the whole file. Audio: the file's audio as :func:`decode` gives it for the
    whole file (decoded and resampled from the stream's start, so that the resampler's phase
    and history are the same computation), samples ``round((start_s - v0) * rate)`` on, for
    ``round((end_s - start_s) * rate)`` samples, with v0 the first video frame's time.
    """
    path = Path(path)
    start_s, end_s = span
    if sampler is not None:
        yield from _SpanFrames(path, start_s, end_s, sampler, also).run()
    if audio_rate_hz:
        yield from _span_audio(path, start_s, end_s, audio_rate_hz)


def _span_audio(path: Path, start_s: float, end_s: float, rate: int
                ) -> Iterator[tuple[str, float, np.ndarray]]:
    with open_container(path) as c:
        if not c.streams.audio:
            return
        v = video_stream(c, path)
        c0 = c.start_time / 1e6 if c.start_time is not None else 0.0
        v0 = (float(v.start_time * v.time_base) if v.start_time is not None else 0.0) - c0
    first = round((start_s - v0) * rate)
    n = round((end_s - start_s) * rate)
    at = 0  # the whole file's sample index of the chunk's first sample
    out = 0  # samples of the range given
    chunks = decode(path, sampler=None, audio_rate_hz=rate)
    try:
        for _kind, _t, x in chunks:
            lo, hi = max(first - at, 0), min(first + n - at, len(x))
            at += len(x)
            if hi > lo:
                yield "audio", out / rate, x[lo:hi]
                out += hi - lo
            if at >= first + n:
                break
    finally:
        chunks.close()


class _SpanFrames:
    """The video half of :func:`decode_span`."""

    def __init__(self, path: Path, start_s: float, end_s: float, sampler: FrameSampler,
                 also: FrameSampler | None = None) -> None:
        self.path, self.start_s, self.end_s, self.s = path, start_s, end_s, sampler
        self.also = also  # decode's second sampler: its frames come as "also"

    def _seek(self, c, v, key_pts: int | None) -> None:
        """To the keyframe at or before the start; a file without a seek index (MPEG-TS/PS)
        may land on any packet, so there the seek aims a second before it."""
        target = self.start_pts if key_pts is None else key_pts
        if c.format.name in UNINDEXED_FORMATS:
            target -= round(1.0 / self.tb)
        c.seek(max(target, v.start_time or 0), stream=v, backward=True, any_frame=False)

    def _range_packets(self, c, v):
        """(pts sorted, keyframe pts at or before the start) of the range, by demuxing only;
        the keyframe is None when the seek landed past it (then everything is read from 0)."""
        import av

        key, pts = None, []
        try:
            for p in c.demux(v):
                if p.pts is None or not p.size:
                    continue
                if p.is_keyframe and p.pts <= self.start_pts:
                    key = p.pts
                if p.dts is not None and p.dts >= self.end_pts:
                    break
                if self.start_pts <= p.pts < self.end_pts:
                    pts.append(p.pts)
        except av.error.FFmpegError as e:
            raise MediaError(f"{self.path}: unreadable video data ({av_reason(e)})") from None
        return sorted(pts), key

    def _plan(self, pts: list[int], s: FrameSampler) -> dict[int, list[float]]:
        times = [round(p * self.tb - self.c0 - self.start_s, 6) for p in pts]
        if s.every is not None:
            return {p: [t] for p, t in zip(pts[:: s.every], times[:: s.every], strict=True)}
        arr = np.asarray(times)
        frame_s = float(np.median(np.diff(arr))) if len(arr) > 1 else self.end_rel
        tol = 1e-6 + 1e-3 * frame_s
        # As decode: a tick in the last quarter of the last frame is the clip's end.
        end = arr[-1] + 0.75 * (self.end_rel - arr[-1])
        plan: dict[int, list[float]] = {}
        k = 0
        while k / s.fps < end:
            j = max(0, int(np.searchsorted(arr, k / s.fps + tol, side="right")) - 1)
            plan.setdefault(pts[j], []).append(round(k / s.fps, 6))
            k += 1
        return plan

    def run(self) -> Iterator[tuple[str, float, np.ndarray]]:

        c = open_container(self.path)
        try:
            v = video_stream(c, self.path)
            self.tb = float(v.time_base)
            self.c0 = c.start_time / 1e6 if c.start_time is not None else 0.0
            # Grid times are rounded to the µs: the pts of a frame is the nearest one.
            self.start_pts = round((self.start_s + self.c0) / self.tb - 1e-3)
            self.end_pts = round((self.end_s + self.c0) / self.tb - 1e-3)
            self.end_rel = self.end_s - self.start_s
            self._seek(c, v, None)
            pts, key = self._range_packets(c, v)
            if key is None or not pts or pts[0] < self.start_pts:
                c.seek(0)  # from the first packet
                pts, key = self._range_packets(c, v)
            if not pts:
                raise MediaError(f"{self.path}: no video frames in "
                                 f"{self.start_s:.3f}-{self.end_s:.3f}s")
            plans = [(_FramePicker(self.s, 0.0, v), self._plan(pts, self.s))]
            if self.also is not None:
                plans.append((_FramePicker(self.also, 0.0, v, kind="also"),
                              self._plan(pts, self.also)))
            n_wanted = sum(len(t) for _, plan in plans for t in plan.values())
            v.thread_type = "AUTO"
            self._seek(c, v, key)
            if not (yield from self._decode(c, v, key, plans)):
                c.seek(0)  # the seek went past the keyframe (a file without a seek index)
                yield from self._decode(c, v, key, plans)
            if any(plan for _, plan in plans):
                missing = sum(len(t) for _, plan in plans for t in plan.values())
                raise MediaError(
                    f"{self.path}: {missing} of the {n_wanted} sampled frames of "
                    f"{self.start_s:.3f}-{self.end_s:.3f}s did not decode"
                )
        finally:
            c.close()

    def _decode(self, c, v, key: int, plans: list[tuple[_FramePicker, dict]]):
        """Decode from the keyframe packet ``key`` to the range's end, yielding each picker's
        planned frames; returns False (nothing yielded) when the demuxer starts past that
        packet."""
        import av

        ctx = v.codec_context
        started = False
        try:
            for packet in c.demux(v):
                if packet.pts is None:
                    continue
                if not started:
                    if packet.dts is not None and packet.dts > key:
                        return False
                    if not (packet.is_keyframe and packet.pts == key):
                        continue  # (an unindexed file's seek lands before the keyframe)
                    started = True
                if packet.dts is not None and packet.dts >= self.end_pts:
                    break  # every frame shown before the end is decoded before this one
                wanted = any(packet.pts in plan for _, plan in plans)
                ctx.skip_frame = "DEFAULT" if wanted else "NONREF"
                for frame in packet.decode():
                    for picker, plan in plans:
                        yield from self._emit(picker, plan, frame)
            ctx.skip_frame = "DEFAULT"
            for frame in v.decode(None):  # the frames the decoder holds back
                for picker, plan in plans:
                    yield from self._emit(picker, plan, frame)
        except av.error.FFmpegError as e:
            raise MediaError(f"{self.path}: decoding failed ({av_reason(e)})") from None
        return started

    @staticmethod
    def _emit(picker: _FramePicker, plan: dict[int, list[float]], frame
              ) -> Iterator[tuple[str, float, np.ndarray]]:
        ticks = plan.pop(frame.pts, ())
        if ticks:
            rgb = picker._rgb(frame)
            for n, tick in enumerate(ticks):
                yield picker.kind, tick, rgb if n == 0 else rgb.copy()
