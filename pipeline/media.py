"""Everything vpipe knows about ffmpeg and PyAV: find the binary, probe files, list frame and
keyframe times, find videos in folders, and decode a clip in one pass into sampled RGB frames
and resampled PCM audio. The stages never import ``av`` or call ffmpeg themselves.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import subprocess
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import MediaError, NotAVideo, Skip, UsageError

# Demuxers that open still images or text as a one-frame "video": not videos for vpipe.
_STILL_FORMATS = {"image2", "tty", "apng"}
# Files a folder scan never treats as candidates (vpipe's own records).
_RECORD_FILES = {"manifest.jsonl", "vpipe.json", "index.jsonl"}
# Containers without an index or header durations (MPEG transport and program streams: .ts,
# .m2ts, .mts, .mpg, .vob): seeking lands on any packet, not on a keyframe, and stream durations
# are guesses from the last packets' times (an audio packet holds many frames: short by ~0.3 s).
UNINDEXED_FORMATS = {"mpegts", "mpeg"}


# --------------------------------------------------------------------------- ffmpeg binary


# Which ffmpeg binary vpipe runs: unset or "bundled" (the default), "system", or a path.
FFMPEG_ENV = "VPIPE_FFMPEG"
_FFMPEG_CHOICES = f"set {FFMPEG_ENV} to bundled, system or the path of an ffmpeg binary"


@dataclass(frozen=True)
class FFmpeg:
    """The ffmpeg binary vpipe runs and where the choice came from (recorded in vpipe.json)."""

    path: str
    source: str  # "bundled" (imageio-ffmpeg's), "system" (first on PATH) or FFMPEG_ENV (a path)
    version: str


def locate_ffmpeg(env: Mapping[str, str]) -> FFmpeg:
    """The ffmpeg that ``env[VPIPE_FFMPEG]`` chooses; a choice that is missing or does not run
    is a UsageError naming the variable.

    The default is imageio-ffmpeg's static build, not an ffmpeg on PATH, so that outputs are
    the same on every machine: a distribution's older ffmpeg (Debian 12's 5.1) cuts AAC a few
    samples differently and lacks options of newer builds.
    """
    choice = env.get(FFMPEG_ENV, "").strip() or "bundled"
    named = f"{FFMPEG_ENV}={choice}"
    if choice == "bundled":
        path, source = _bundled_ffmpeg(), "bundled"
        if path is None:
            raise UsageError(
                f"imageio-ffmpeg holds no ffmpeg binary for this platform: {_FFMPEG_CHOICES}"
            )
        named = f"imageio-ffmpeg's {path}"
    elif choice == "system":
        path, source = shutil.which("ffmpeg", path=env.get("PATH")), "system"
        if path is None:
            raise UsageError(f"{named}: no ffmpeg on PATH; {_FFMPEG_CHOICES}")
    else:
        path, source = shutil.which(choice, path=env.get("PATH")), FFMPEG_ENV
        if path is None:
            raise UsageError(f"{named}: not found or not executable; {_FFMPEG_CHOICES}")
    return FFmpeg(path, source, _ffmpeg_version_of(path, named))


def _bundled_ffmpeg() -> str | None:
    """The binary inside the imageio-ffmpeg wheel (its own finder would fall back to PATH)."""
    from importlib.resources import files

    folder = Path(str(files("imageio_ffmpeg") / "binaries"))
    found = sorted(p for p in folder.glob("ffmpeg*") if os.access(p, os.X_OK))
    return str(found[0]) if found else None


def _ffmpeg_version_of(path: str, named: str) -> str:
    """``ffmpeg -version``'s version (e.g. ``n9.0.2-17-g2a571b6068``); not runnable: UsageError."""
    try:
        proc = subprocess.run([path, "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UsageError(f"{named}: cannot run it ({e}); {_FFMPEG_CHOICES}") from None
    first = proc.stdout.splitlines()[0] if proc.stdout.strip() else ""
    parts = first.split()
    if proc.returncode != 0 or parts[:2] != ["ffmpeg", "version"] or len(parts) < 3:
        err = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        said = first or (err[-1] if err else f"exit status {proc.returncode}")
        raise UsageError(f"{named}: not a working ffmpeg ({said}); {_FFMPEG_CHOICES}")
    return parts[2]


@functools.lru_cache(maxsize=1)
def chosen_ffmpeg() -> FFmpeg:
    """The ffmpeg this process runs, chosen once from the environment (see locate_ffmpeg)."""
    return locate_ffmpeg(os.environ)


def ffmpeg_exe() -> str:
    """The path of the ffmpeg binary vpipe runs (imageio-ffmpeg's unless VPIPE_FFMPEG says)."""
    return chosen_ffmpeg().path


def ffmpeg_version() -> str:
    """The version string of :func:`ffmpeg_exe` (e.g. ``n9.0.2-17-g2a571b6068``)."""
    return chosen_ffmpeg().version


def media_versions() -> dict[str, str]:
    """Versions of the media libraries and which ffmpeg runs, for ``vpipe.json``."""
    import av

    ff = chosen_ffmpeg()
    return {
        "ffmpeg": ff.version, "ffmpeg_source": ff.source, "ffmpeg_path": ff.path,
        "pyav": av.__version__,
    }


def run_ffmpeg(args: Sequence[str], *, what: str) -> None:
    """Run ffmpeg quietly; a failure raises MediaError with ffmpeg's last message line."""
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-y", "-v", "error", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        raise MediaError(f"{what}: ffmpeg failed: {lines[-1] if lines else proc.returncode}")


# --------------------------------------------------------------------------- probing


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


# Leading bytes of video containers: a file that starts like one but does not open is damaged,
# not "some other kind of file".
def _looks_like_video_container(head: bytes) -> bool:
    if len(head) >= 12 and head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
        return True
    return (
        head.startswith((b"\x1a\x45\xdf\xa3", b"FLV", b"OggS", b"\x00\x00\x01\xba", b"0&\xb2u"))
        or (head[:4] == b"RIFF" and head[8:12] in (b"AVI ", b"AVIX"))
        or (len(head) > 188 and head[0] == 0x47 and head[188] == 0x47)
    )


def _open(path: Path):
    """av.open with vpipe's error kinds (empty / damaged container / not a media file)."""
    import av

    try:
        if path.stat().st_size == 0:
            raise MediaError(f"{path}: empty file (0 bytes)")
        with path.open("rb") as f:
            head = f.read(200)
    except OSError as e:
        raise MediaError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return av.open(str(path), metadata_errors="ignore")
    except av.error.FFmpegError as e:
        if _looks_like_video_container(head):
            raise MediaError(
                f"{path}: truncated or corrupt video file ({_av_reason(e)})"
            ) from None
        raise NotAVideo(f"{path}: not a video (no media format recognised)") from None


def _av_reason(e: Exception) -> str:
    msg = getattr(e, "strerror", None) or str(e)
    return str(msg).split(":")[0].strip().rstrip(".")


def _video_stream(container, path: Path):
    import av

    for s in container.streams.video:
        if not (s.disposition & av.stream.Disposition.attached_pic):
            return s
    raise NotAVideo(f"{path}: not a video (no video stream in this {container.format.name} file)")


def probe(path: str | os.PathLike) -> MediaInfo:
    """Probe a file with PyAV; raise NotAVideo or MediaError (one line naming the file)."""
    path = Path(path)
    with _open(path) as c:
        fmt = c.format.name
        if fmt in _STILL_FORMATS or fmt.endswith("_pipe"):
            raise NotAVideo(f"{path}: not a video (a still image or text file: {fmt})")
        v = _video_stream(c, path)
        cc = v.codec_context
        rate = v.average_rate or v.guessed_rate or v.base_rate
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
    d = _demux_video(path)
    if d is None:
        raise MediaError(f"{path}: no video frames with usable timestamps")
    pts, key, last_dur, tb = d
    with _open(path) as c:
        start = c.start_time / 1e6 if c.start_time is not None else 0.0
    t = pts.astype(np.float64) * tb - start
    if last_dur <= 0:
        last_dur = float(np.median(np.diff(t))) if len(t) > 1 else 0.0
    return FrameTimes(times=t, keyframe=key, end_s=float(t[-1] + last_dur))


def _quarter_turns(frame) -> int:
    """Quarter turns counter-clockwise a player applies to a decoded frame (0-3): phone videos
    store portrait frames sideways with a display matrix."""
    return round((getattr(frame, "rotation", 0) or 0) / 90) % 4


def display_rotation(path: str | os.PathLike) -> int:
    """Degrees (0, 90, 180, 270; counter-clockwise) a player turns the stored frames by.
    Decodes the first frame."""
    import av

    path = Path(path)
    with _open(path) as c:
        try:
            frame = next(c.decode(video=0), None)
        except av.error.FFmpegError as e:
            raise MediaError(f"{path}: unreadable video data ({_av_reason(e)})") from None
    return _quarter_turns(frame) * 90


def upright_size(width: int, height: int, rotation: int) -> tuple[int, int]:
    """The (width, height) a player shows for stored frames of width x height."""
    return (height, width) if rotation % 180 == 90 else (width, height)


def keyframe_times(path: str | os.PathLike) -> list[float]:
    """Times (seconds from the container start) of the video keyframes, from demuxing only."""
    return frame_times(path).keyframe_times.tolist()


def _demux_video(path: Path):
    """(sorted pts, keyframe flags, last frame's duration s, time base) or None if pts unusable."""
    import av

    with _open(path) as c:
        v = _video_stream(c, path)
        tb = float(v.time_base)
        try:
            rows = [(p.pts, p.is_keyframe, p.duration or 0) for p in c.demux(v) if p.size]
        except av.error.FFmpegError as e:
            raise MediaError(f"{path}: unreadable video data ({_av_reason(e)})") from None
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


# --------------------------------------------------------------------------- finding videos


def find_videos(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Candidate files: given files as they are, folders searched recursively (sorted).

    Which candidates are videos is decided later by :func:`probe`, not by extension. Hidden
    files and folders (temp files of interrupted writes among them), vpipe's record files and
    vpipe output folders inside a searched folder (``-o`` under the input) are not searched.
    A missing path, or a folder without any file to consider, is a usage error.
    """
    out: list[Path] = []
    seen: set[Path] = set()
    for p in map(Path, paths):
        if p.is_dir():
            found = []
            for root, dirs, files in os.walk(p):
                dirs[:] = [
                    d for d in dirs
                    if not d.startswith(".") and not (Path(root, d) / "vpipe.json").exists()
                ]
                found += [
                    Path(root, f) for f in files
                    if not f.startswith(".") and f not in _RECORD_FILES
                ]
            found.sort()
            if not found:  # a wrong path far more often than a folder meant to be empty
                raise UsageError(f"{p}: no files in this folder")
        elif p.is_file():
            found = [p]
        else:
            raise UsageError(f"{p}: no such file or folder")
        for f in found:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                out.append(f)
    return out


@dataclass(frozen=True)
class SourceRef:
    """A candidate input after probing: its source id, and either its MediaInfo or the reason
    it cannot be used (``skip``: not a video, found in a folder; ``fail``: anything else)."""

    path: Path
    source_id: str
    info: MediaInfo | None
    problem: str | None = None  # "skip" | "fail"
    message: str | None = None

    def raise_problem(self) -> None:
        """Raise the recorded problem as Skip or MediaError (inside a stage's work)."""
        if self.problem == "skip":
            raise Skip(self.message)
        if self.problem == "fail":
            raise MediaError(self.message)


def scan_sources(paths: Iterable[str | os.PathLike]) -> list[SourceRef]:
    """Find and probe the candidates in ``paths``; give each a unique source id.

    Videos get their ids first, so a poster ``a.jpg`` beside ``a.mp4`` cannot take the id
    ``a``. A non-video named on the command line fails; one found in a folder is skipped.
    """
    from pipeline.ids import unique_ids

    explicit = {Path(p).resolve() for p in paths if Path(p).is_file()}
    probed: list[tuple[Path, MediaInfo | None, str | None, str | None]] = []
    for f in find_videos(paths):
        try:
            probed.append((f, probe(f), None, None))
        except NotAVideo as e:
            kind = "fail" if f.resolve() in explicit else "skip"
            probed.append((f, None, kind, str(e)))
        except MediaError as e:
            probed.append((f, None, "fail", str(e)))
        except Exception as e:  # one odd file must not stop the scan of the others
            probed.append((f, None, "fail", f"{f}: cannot probe ({type(e).__name__}: {e})"))
    ordered = sorted(probed, key=lambda x: x[1] is None)  # stable: videos first
    ids = unique_ids([p[0] for p in ordered])
    sid_of = dict(zip((p[0] for p in ordered), ids, strict=True))
    return [SourceRef(f, sid_of[f], info, kind, msg) for f, info, kind, msg in probed]


# --------------------------------------------------------------------------- decoding


def scaled_size(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """(w, h) with the short side set to ``short_side`` and the aspect ratio kept."""
    if not short_side:
        return width, height
    if width <= height:
        return short_side, max(1, round(height * short_side / width))
    return max(1, round(width * short_side / height)), short_side


@dataclass(frozen=True)
class FrameSampler:
    """Which decoded frames to keep: by time (``fps``) or by count (``every``); ``size`` is
    the short side of the output (None or 0 = original)."""

    fps: float | None = None
    every: int | None = None
    size: int | None = None

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
) -> Iterator[tuple[str, float, np.ndarray]]:
    """One demux/decode pass over a clip yielding ``("frame", t, rgb)`` for sampled frames and
    ``("audio", t, int16 mono samples)`` chunks resampled to ``audio_rate_hz``.

    Times are seconds from the first video frame (the clip start); the audio is aligned to it
    (padded or cut at the start, cut to the stream's declared length at the end). Frames that
    the sampler drops are never converted or scaled, and when the frames to keep are known
    from a demux pass, the non-reference ones among the others are not even decoded.
    """
    import av

    path = Path(path)
    c = _open(path)
    try:
        v = _video_stream(c, path)
        a = c.streams.audio[0] if (audio_rate_hz and c.streams.audio) else None
        streams = ([v] if sampler is not None else []) + ([a] if a is not None else [])
        if not streams:
            return
        v.thread_type = "AUTO"  # frame threads: decoding is the cost here
        origin = float(v.start_time * v.time_base) if v.start_time is not None else 0.0
        frames = _FramePicker(sampler, origin, v) if sampler is not None else None
        audio = _AudioAligner(a, audio_rate_hz, origin) if a is not None else None
        plan = _plan_samples(path, sampler, origin) if sampler is not None else None
        if plan is not None:
            frames.plan = plan
        ctx = v.codec_context
        try:
            for packet in c.demux(*streams):
                if plan is not None and packet.stream is v and packet.pts is not None:
                    # Frames no reference depends on are not even decoded unless sampled.
                    ctx.skip_frame = "DEFAULT" if packet.pts in plan else "NONREF"
                for frame in packet.decode():
                    if packet.stream is v:
                        yield from frames.push(frame)
                    else:
                        yield from audio.push(frame)
            if frames is not None:
                yield from frames.flush()
                frames.check_complete(path, c)
            if audio is not None:
                yield from audio.flush()
                if frames is None:
                    _check_complete(path, c, audio.n / audio.rate + origin, a)
        except av.error.FFmpegError as e:
            raise MediaError(f"{path}: decoding failed ({_av_reason(e)})") from None
    finally:
        c.close()


def _plan_samples(path: Path, s: FrameSampler, origin: float) -> dict[int, list[float]] | None:
    """Which frames (by pts) the sampler keeps, and their timestamps, from a demux pass.

    Knowing them before decoding lets the decoder skip the other non-reference frames. Same
    rules as the streaming picker; None (no plan: decode all) when pts are missing or repeated.
    """
    d = _demux_video(path)
    if d is None:
        return None
    pts, _, last_dur, tb = d
    times = pts.astype(np.float64) * tb - origin
    if s.every is not None:
        return {int(p): [round(float(t), 6)] for p, t in zip(pts[:: s.every],
                                                             times[:: s.every], strict=True)}
    frame_s = float(np.median(np.diff(times))) if len(times) > 1 else last_dur or 0.04
    tol = 1e-6 + 1e-3 * frame_s
    end = times[-1] + 0.75 * (last_dur or frame_s)
    plan: dict[int, list[float]] = {}
    k = 0
    while k / s.fps < end:
        j = max(0, int(np.searchsorted(times, k / s.fps + tol, side="right")) - 1)
        plan.setdefault(int(pts[j]), []).append(round(k / s.fps, 6))
        k += 1
    return plan


class _FramePicker:
    """Applies a FrameSampler to decoded frames in order (keeps one frame back for --fps)."""

    def __init__(self, sampler: FrameSampler, origin: float, stream) -> None:
        self.s = sampler
        self.origin = origin
        self.stream = stream
        self.index = 0  # decoded frames so far
        self.k = 0  # next tick for --fps
        self.prev = None  # (t, frame) the last frame seen, on screen until the next one
        rate = stream.average_rate or stream.guessed_rate
        self.frame_s = 1.0 / float(rate) if rate else 0.04
        self.last_t = -self.frame_s  # so a stream without pts starts at t = 0
        self.plan: dict[int, list[float]] | None = None  # pts -> timestamps, when planned

    def _rgb(self, frame) -> np.ndarray:
        w, h = scaled_size(frame.width, frame.height, self.s.size)
        if (w, h) == (frame.width, frame.height):
            rgb = frame.to_ndarray(format="rgb24")
        else:
            rgb = frame.reformat(w, h, "rgb24", interpolation="AREA").to_ndarray()
        # Output frames upright, as players show them. The short side is the same before
        # and after, so scaling first is fine.
        turns = _quarter_turns(frame)
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
                    yield "frame", tick, rgb if n == 0 else rgb.copy()
            return
        if self.s.every is not None:
            if i % self.s.every == 0:
                yield "frame", round(t, 6), self._rgb(frame)
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
            yield "frame", round(self.k / self.s.fps, 6), rgb
            self.k += 1

    def flush(self) -> Iterator[tuple[str, float, np.ndarray]]:
        if self.plan is None and self.s.fps is not None and self.prev is not None:
            dur = self.prev[1].duration
            tb = self.prev[1].time_base
            frame_s = float(dur * tb) if dur and tb else self.frame_s
            # A tick in the last quarter of the last frame is the clip's end, not a frame.
            yield from self._emit_until(self.prev[0] + 0.75 * frame_s)

    def check_complete(self, path: Path, container) -> None:
        if self.index == 0:
            raise MediaError(f"{path}: no decodable video frames")
        _check_complete(
            path, container, self.last_t + self.origin + self.frame_s, self.stream
        )


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


def _check_complete(path: Path, container, end_s: float, stream=None) -> None:
    """A stream whose data stops well before its declared duration was cut short."""
    declared = declared_end(container, stream)
    start = container.start_time / 1e6 if container.start_time else 0.0
    seen = end_s - start
    if declared > 0 and seen < declared - max(1.0, 0.05 * declared):
        raise MediaError(
            f"{path}: truncated (media data ends at {seen:.2f}s of the {declared:.2f}s declared)"
        )


class _AudioAligner:
    """Resamples to mono s16 at ``rate`` and aligns sample 0 with the clip start."""

    def __init__(self, stream, rate: int, origin: float) -> None:
        import av

        self.rate = rate
        self.origin = origin
        self.resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
        self.n = 0  # samples emitted
        self.skip = 0  # samples still to drop at the start (audio began before the video)
        self.started = False
        self.limit = None  # declared end of the audio stream, in output samples
        guessed = stream.container.format.name in UNINDEXED_FORMATS  # no declared length
        if stream.duration is not None and stream.time_base is not None and not guessed:
            a0 = float(stream.start_time * stream.time_base) if stream.start_time else 0.0
            end = a0 + float(stream.duration * stream.time_base) - origin
            self.limit = max(0, round(end * rate))

    def push(self, frame) -> Iterator[tuple[str, float, np.ndarray]]:
        if not self.started:
            self.started = True
            offset = (float(frame.time) - self.origin) if frame.time is not None else 0.0
            if offset > 0:  # the audio starts after the video: silence until it does
                yield from self._out(np.zeros(round(offset * self.rate), np.int16))
            else:
                self.skip = round(-offset * self.rate)
        for out in self.resampler.resample(frame):
            yield from self._out(out.to_ndarray().reshape(-1))

    def flush(self) -> Iterator[tuple[str, float, np.ndarray]]:
        for out in self.resampler.resample(None):
            yield from self._out(out.to_ndarray().reshape(-1))

    def _out(self, x: np.ndarray) -> Iterator[tuple[str, float, np.ndarray]]:
        if self.skip:
            cut = min(self.skip, len(x))
            x, self.skip = x[cut:], self.skip - cut
        if self.limit is not None:
            x = x[: max(0, self.limit - self.n)]
        if len(x):
            t = self.n / self.rate
            self.n += len(x)
            yield "audio", t, x.astype(np.int16, copy=False)


def snap_down_us(t: float) -> str:
    """``t`` floored to the microsecond, as ffmpeg's time syntax (ffmpeg parses µs exactly)."""
    return f"{math.floor(t * 1e6 + 1e-3) / 1e6:.6f}"
