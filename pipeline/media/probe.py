"""What a file is: a video or not, its streams, duration, size and rotation, its frame and
keyframe grids (by demuxing only), and whether a span of it decodes without damage."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import MediaError, NotAVideo
from pipeline.files import not_regular

# Demuxers that open still images or text as a one-frame "video": not videos for vpipe.
STILL_FORMATS = {"image2", "tty", "apng"}
# Files a folder scan never treats as candidates (vpipe's own records).
RECORD_FILES = {"manifest.jsonl", "vpipe.json", "index.jsonl"}
# Containers without an index or header durations (MPEG transport and program streams: .ts,
# .m2ts, .mts, .mpg, .vob): seeking lands on any packet, not on a keyframe, and stream durations
# are guesses from the last packets' times (an audio packet holds many frames: short by ~0.3 s).
UNINDEXED_FORMATS = {"mpegts", "mpeg"}


@dataclass(frozen=True)
class MediaInfo:
    """What a probe tells about a video file. Times are seconds from the container start."""

    path: Path
    container: str
    duration_s: float
    fps: float
    width: int
    height: int
    n_frames: int | None
    video_codec: str
    has_audio: bool
    audio_codec: str | None = None
    audio_sample_rate_hz: int | None = None
    audio_channels: int | None = None
    start_s: float = 0.0  # container start time (ffmpeg's -ss and our times count from it)
    video_end_s: float = 0.0  # declared end of the video stream, from the container start
    video_start_s: float = 0.0  # first video frame, from the container start (audio may lead)
    video_time_base: Fraction | None = None  # the unit of the video stream's timestamps


# Leading bytes of video containers: a file that starts like one but does not open is damaged,
# not "some other kind of file".
def looks_like_video_container(head: bytes) -> bool:
    if len(head) >= 12 and head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
        return True
    return (
        head.startswith((b"\x1a\x45\xdf\xa3", b"FLV", b"OggS", b"\x00\x00\x01\xba", b"0&\xb2u"))
        or (head[:4] == b"RIFF" and head[8:12] in (b"AVI ", b"AVIX"))
        or (len(head) > 188 and head[0] == 0x47 and head[188] == 0x47)
    )


def open_container(path: Path):
    """av.open with vpipe's error kinds (empty / damaged container / not a media file)."""
    import av

    try:
        st = path.stat()
        kind = not_regular(st.st_mode)
        if kind is not None:  # never opened: a FIFO would wait for a writer, /dev/zero never ends
            raise MediaError(f"{path}: not a regular file: {kind}")
        if st.st_size == 0:
            raise MediaError(f"{path}: empty file (0 bytes)")
        with path.open("rb") as f:
            head = f.read(200)
    except OSError as e:
        raise MediaError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return av.open(str(path), metadata_errors="ignore")
    except av.error.FFmpegError as e:
        if looks_like_video_container(head):
            raise MediaError(
                f"{path}: truncated or corrupt video file ({av_reason(e)})"
            ) from None
        raise NotAVideo(f"{path}: not a video (no media format recognised)") from None


def av_reason(e: Exception) -> str:
    msg = getattr(e, "strerror", None) or str(e)
    return str(msg).split(":")[0].strip().rstrip(".")


def video_stream(container, path: Path):
    import av

    for s in container.streams.video:
        if not (s.disposition & av.stream.Disposition.attached_pic):
            return s
    raise NotAVideo(f"{path}: not a video (no video stream in this {container.format.name} file)")


def stream_rate(v: Any) -> Any:
    """A video stream's frame rate: the stream's own (FFmpeg's guess from r_frame_rate) where
    the average over its frames agrees within 1% (so every clip cut from a 25 fps source says
    25, not 24.95 or 24.951 as averages over a few seconds do), else the average (a variable
    rate); 0 when the file says neither."""
    avg, nominal = v.average_rate, v.guessed_rate or v.base_rate
    if avg and nominal and abs(float(avg) / float(nominal) - 1) <= 0.01:
        return nominal
    return avg or nominal


def probe(path: str | os.PathLike) -> MediaInfo:
    """Probe a file with PyAV; raise NotAVideo or MediaError (one line naming the file)."""
    path = Path(path)
    with open_container(path) as c:
        fmt = c.format.name
        if fmt in STILL_FORMATS or fmt.endswith("_pipe"):
            raise NotAVideo(f"{path}: not a video (a still image or text file: {fmt})")
        v = video_stream(c, path)
        cc = v.codec_context
        rate = stream_rate(v)
        start = c.start_time / 1e6 if c.start_time is not None else 0.0
        if c.duration is not None:
            duration = c.duration / 1e6
        elif v.duration is not None and v.time_base is not None:
            duration = float(v.duration * v.time_base)
        else:
            duration = 0.0
        a = c.streams.audio[0] if c.streams.audio else None
        if not cc.width or not cc.height:
            raise MediaError(f"{path}: video stream without a frame size (corrupt header)")
        return MediaInfo(
            path=path,
            container=fmt,
            duration_s=duration,
            fps=float(rate) if rate else 0.0,
            width=cc.width,
            height=cc.height,
            n_frames=v.frames or None,
            video_codec=cc.name,
            has_audio=a is not None,
            audio_codec=a.codec_context.name if a is not None else None,
            audio_sample_rate_hz=a.codec_context.sample_rate if a is not None else None,
            audio_channels=a.codec_context.channels if a is not None else None,
            start_s=start,
            video_end_s=declared_end(c, v) or duration,
            video_start_s=(
                max(0.0, float(v.start_time * v.time_base) - start)
                if v.start_time is not None and v.time_base is not None else 0.0
            ),
            video_time_base=v.time_base,
        )


@dataclass(frozen=True)
class FrameTimes:
    """Presentation times of every video frame (sorted, seconds from the container start)."""

    times: np.ndarray  # float64
    keyframe: np.ndarray  # bool, same length: keyframes a stream copy can cut at (closed GOP)
    end_s: float  # end of the last frame

    @property
    def keyframe_times(self) -> np.ndarray:
        return self.times[self.keyframe]


def frame_times(path: str | os.PathLike) -> FrameTimes:
    """Demux (no decoding) the video stream and return every frame's time and keyframe flag."""
    path = Path(path)
    d = demux_video(path)
    if d is None:
        raise MediaError(f"{path}: no video frames with usable timestamps")
    pts, key, last_dur, tb = d
    with open_container(path) as c:
        start = c.start_time / 1e6 if c.start_time is not None else 0.0
    t = pts.astype(np.float64) * tb - start
    if last_dur <= 0:
        last_dur = float(np.median(np.diff(t))) if len(t) > 1 else 0.0
    return FrameTimes(times=t, keyframe=key, end_s=float(t[-1] + last_dur))


def quarter_turns(frame) -> int:
    """Quarter turns counter-clockwise a player applies to a decoded frame (0-3): phone videos
    store portrait frames sideways with a display matrix."""
    return round((getattr(frame, "rotation", 0) or 0) / 90) % 4


def display_rotation(path: str | os.PathLike) -> int:
    """Degrees (0, 90, 180, 270; counter-clockwise) a player turns the stored frames by.
    Decodes the first frame."""
    import av

    path = Path(path)
    with open_container(path) as c:
        try:
            frame = next(c.decode(video=0), None)
        except av.error.FFmpegError as e:
            raise MediaError(f"{path}: unreadable video data ({av_reason(e)})") from None
    return quarter_turns(frame) * 90


def upright_size(width: int, height: int, rotation: int) -> tuple[int, int]:
    """The (width, height) a player shows for stored frames of width x height."""
    return (height, width) if rotation % 180 == 90 else (width, height)


def keyframe_times(path: str | os.PathLike) -> list[float]:
    """Times (seconds from the container start) of the video keyframes, from demuxing only."""
    return frame_times(path).keyframe_times.tolist()


def demux_video(path: Path):
    """(sorted pts, keyframe flags, last frame's duration s, time base) or None if pts unusable."""
    import av

    with open_container(path) as c:
        v = video_stream(c, path)
        tb = float(v.time_base)
        try:
            rows = [(p.pts, p.is_keyframe, p.duration or 0) for p in c.demux(v) if p.size]
        except av.error.FFmpegError as e:
            raise MediaError(f"{path}: unreadable video data ({av_reason(e)})") from None
    if not rows or any(r[0] is None for r in rows):
        return None
    # An open-GOP keyframe (HEVC CRA, MPEG-2 I-frame) is followed in decoding order by frames
    # shown before it that need the previous GOP: a stream copy cut there loses them. Only a
    # keyframe after which no earlier frame is decoded is a keyframe here (a place to cut).
    shown_later = math.inf
    for i in range(len(rows) - 1, -1, -1):
        if rows[i][1] and shown_later < rows[i][0]:
            rows[i] = (rows[i][0], False, rows[i][2])
        shown_later = min(shown_later, rows[i][0])
    rows.sort(key=lambda r: r[0])
    pts = np.array([r[0] for r in rows], np.int64)
    if len(np.unique(pts)) != len(pts):
        return None
    return pts, np.array([r[1] for r in rows], bool), rows[-1][2] * tb, tb

def declared_end(container, stream) -> float:
    """The stream's declared end in seconds from the container start (the container's
    duration when the stream declares none; 0.0 when neither is known).

    Per stream, because audio and video often end apart (a soundtrack longer or shorter than
    the picture) and the container's duration is the longer of them.
    """
    start = container.start_time / 1e6 if container.start_time else 0.0
    dur = None
    if stream is not None and stream.duration and stream.time_base:
        dur = float(stream.duration * stream.time_base)
    elif stream is not None and stream.metadata.get("DURATION"):  # matroska/webm track tag
        try:
            h, m, sec = stream.metadata["DURATION"].split(":")
            dur = int(h) * 3600 + int(m) * 60 + float(sec)
        except ValueError:
            dur = None
    if dur is None:
        return container.duration / 1e6 if container.duration else 0.0
    s0 = float(stream.start_time * stream.time_base) if stream.start_time is not None else start
    return s0 - start + dur


# Decoders are asked to flag what a sane encoder never writes, not only what they cannot
# decode: random bytes inside an H.264 slice often decode "cleanly" into wrong pictures, and only
# this level marks those frames corrupt. It changes no decoded picture.
ERR_DETECT = "aggressive"


@dataclass(frozen=True)
class Damage:
    """What decoding a span of a file met: where (seconds from the container start) and how
    many of the span's frames the decoder could not give."""

    video: tuple[float, float] | None  # first and last time with a video decoding error
    audio: tuple[float, float] | None
    frames_lost: int
    frames_expected: int

    def describe(self, shift_s: float = 0.0) -> str:
        """One clause for an error line (times moved by ``shift_s``: a clip's place in its
        source)."""
        def at(span: tuple[float, float]) -> str:
            a, b = (f"{t + shift_s:.2f}" for t in span)
            return f"{a}s" if a == b else f"{a}-{b}s"

        parts = []
        if self.video is not None:
            what = (f"{self.frames_lost} of {self.frames_expected} frames lost"
                    if self.frames_lost else "frames decoded with errors")
            parts.append(f"damaged video data at {at(self.video)} ({what})")
        if self.audio is not None:
            parts.append(f"damaged audio data at {at(self.audio)}")
        return ", ".join(parts)


def decoding_damage(
    path: str | os.PathLike,
    frames: FrameTimes,
    start_s: float = 0.0,
    end_s: float = math.inf,
) -> Damage | None:
    """Decode the span [start_s, end_s) of a file (its video from the keyframe it needs, and
    its audio) and say where the decoders met damage; None when every frame decoded cleanly.

    ``frames`` is the file's frame grid (:func:`frame_times`): the span's frames are expected
    from it, so a frame the decoder drops without a word counts too. Damage is a packet the
    decoder refuses, a frame it marks corrupt (concealed, or flagged by ERR_DETECT) or a frame
    missing. A damaged frame between the keyframe and ``start_s`` counts: the span's frames
    are predicted from it.
    """
    path = Path(path)
    keys = frames.keyframe_times
    before = keys[keys <= start_s + 1e-6]
    key_s = float(before[-1]) if len(before) else float(frames.times[0])
    want = (frames.times >= start_s - 1e-6) & (frames.times < end_s - 1e-6)
    with open_container(path) as c:
        v = video_stream(c, path)
        origin = c.start_time / 1e6 if c.start_time is not None else 0.0
        tb = float(v.time_base)
        expected = {round((float(t) + origin) / tb): float(t) for t in frames.times[want]}
        span = _SpanDecoder(c, v, origin, start_s, end_s)
        seek_s = key_s - 1.0  # a seek in a file without an index lands on any packet
        found = seek_s > 0 and span.run(round((key_s + origin) / tb), seek_to=seek_s + origin)
        if not found:  # from the start (or a seek that went past the keyframe)
            span = _SpanDecoder(c, v, origin, start_s, end_s)
            c.seek(0)
            span.run(round((key_s + origin) / tb), seek_to=None)
    lost = [t for p, t in expected.items() if p not in span.decoded]
    video_bad = [t for t in span.video_bad if t < end_s] + lost
    audio_bad = [t for t in span.audio_bad if start_s - 1e-6 <= t < end_s]
    if not video_bad and not audio_bad:
        return None
    return Damage(
        video=(min(video_bad), max(video_bad)) if video_bad else None,
        audio=(min(audio_bad), max(audio_bad)) if audio_bad else None,
        frames_lost=len(lost),
        frames_expected=len(expected),
    )


class _SpanDecoder:
    """One pass of :func:`decoding_damage`: decodes from the keyframe packet to the span's end
    and collects the pts decoded and the times of errors."""

    def __init__(self, container, video, origin: float, start_s: float, end_s: float) -> None:
        self.c, self.v = container, video
        self.a = container.streams.audio[0] if container.streams.audio else None
        self.origin, self.start_s, self.end_s = origin, start_s, end_s
        self.decoded: set[int] = set()
        self.video_bad: list[float] = []
        self.audio_bad: list[float] = []

    def _secs(self, pts, time_base) -> float:
        return float(pts * time_base) - self.origin

    def run(self, key_pts: int, *, seek_to: float | None) -> bool:
        """Decode from the keyframe packet at ``key_pts``; False if the demuxer, after the
        seek, started past it (nothing decoded then)."""
        import av

        v = self.v
        v.thread_type = "AUTO"
        v.codec_context.options = {"err_detect": ERR_DETECT}
        if seek_to is not None:
            try:
                self.c.seek(round(seek_to / float(v.time_base)), stream=v, backward=True)
            except av.error.FFmpegError:
                return False
        streams = [v] if self.a is None else [v, self.a]
        started = video_done = False
        audio_done = self.a is None
        packets = self.c.demux(*streams)
        last_t = self.start_s
        while True:
            try:
                packet = next(packets, None)
            except av.error.FFmpegError:
                # The demuxer cannot read on (damaged data where it expects a packet): the
                # frames after it are missing, counted as lost.
                self.video_bad.append(last_t)
                return True
            if packet is None:
                break
            if packet.pts is None:
                continue
            t = last_t = self._secs(packet.pts, packet.time_base)
            if packet.stream is v:
                if not started:
                    if packet.pts > key_pts:
                        return False
                    if not (packet.is_keyframe and packet.pts == key_pts):
                        continue
                    started = True
                if video_done:
                    continue
                dts = packet.dts if packet.dts is not None else packet.pts
                if self._secs(dts, packet.time_base) >= self.end_s:
                    # Every frame shown before end_s is decoded before this packet.
                    video_done = True
                    if audio_done:
                        break
                    continue
            elif audio_done or t < self.start_s - 0.5:  # nothing in the span needs it
                continue
            elif t >= self.end_s:
                audio_done = True
                if video_done:
                    break
                continue
            try:
                got = packet.decode()
            except av.error.FFmpegError:
                (self.video_bad if packet.stream is v else self.audio_bad).append(t)
                continue
            for f in got:
                self._frame(f, packet.stream is v, t)
        if started:
            try:
                for f in v.codec_context.decode(None):  # the frames the decoder holds back
                    self._frame(f, True, self.end_s)
            except av.error.FFmpegError:
                self.video_bad.append(last_t)
        return started

    def _frame(self, f, is_video: bool, packet_t: float) -> None:
        tb = f.time_base or (self.v if is_video else self.a).time_base
        t = self._secs(f.pts, tb) if f.pts is not None else packet_t
        if is_video:
            if f.pts is not None:
                self.decoded.add(int(f.pts))
            if f.is_corrupt:
                self.video_bad.append(t)
        elif f.is_corrupt:
            self.audio_bad.append(t)
