"""The video modality's shared parts: a clip's frames at the model's rate cut into windows of
``frames`` frames every ``stride`` frames (:func:`cut_windows`), the windows' preprocessing
split as the image one is (:class:`VideoPreprocessing`: resize and crop on uint8 frames in the
loader workers, scale and normalise batched beside the model), and :class:`VideoEncoder`, what
a video family (:mod:`.torchvision_video`) loads.

Windows: frame k of a clip at ``fps`` is the frame on screen at k/fps (``media.decode``'s
``--fps`` rule). Window i holds frames i*S .. i*S+T-1; its ``start`` is its first frame's time
and its ``end`` the end of its last frame (+1/fps, or the clip's end where that comes first).
A clip of fewer than T frames (but at least one) is one window, its last frame repeated up to
T (``padded``: how many repeats); the frames after the last whole window are dropped
(``dropped``: windows started but cut short).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch where a model runs: the CLI reads the families' options
    import torch
    from torch import nn

from pipeline.errors import UsageError
from pipeline.features.weights import WeightsInfo

# Frames (windows x T) a loader worker gathers before handing its windows over, and at most
# in one call of the video model.
WINDOW_BATCH_FRAMES = 128


@dataclass(frozen=True)
class VideoPreprocessing:
    """The weights' ``VideoClassification`` preset: resize (to height x width, or the shorter
    side), centre crop, ``/255``, normalise; torchvision resizes the uint8 frames with
    ``antialias=False`` for these weights, and so does this."""

    resize_size: tuple[int, ...]
    crop_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    antialias: bool = False
    preset: str = ""

    def attrs(self) -> dict[str, Any]:
        d = asdict(self)
        d["resize_size"], d["crop_size"] = list(self.resize_size), list(self.crop_size)
        return {**d, "decode": "PyAV rgb24 frame, uint8 tensor", "scale": "1/255",
                "layout": "N, C, T, H, W"}

    def uint8_frame(self, rgb: np.ndarray) -> torch.Tensor:
        """One decoded RGB frame (H, W, 3) resized and cropped as the preset does: (3, h, w)."""
        import torch
        import torchvision.transforms.functional as F
        from torchvision.transforms import InterpolationMode

        x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)
        x = F.resize(x, list(self.resize_size), interpolation=InterpolationMode(self.interpolation),
                     antialias=self.antialias)
        return F.center_crop(x, list(self.crop_size))

    def normalize(self, windows: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """uint8 windows (N, T, 3, h, w) -> normalised float (N, 3, T, h, w), batched."""
        import torch

        dtype = dtype or torch.float32
        x = windows.to(dtype) / 255
        mean = torch.tensor(self.mean, dtype=dtype, device=x.device).view(1, 1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=dtype, device=x.device).view(1, 1, 3, 1, 1)
        return ((x - mean) / std).permute(0, 2, 1, 3, 4)


def check_windowing(opts: Any) -> None:
    """UsageError for window options that cannot work (any video family's check)."""
    if not opts.from_video:
        raise UsageError("--video-model reads the clips' frames from video: add "
                         "--from-video (videos, or a `vpipe subclip` output folder)")
    for flag, v in (("--video-fps", opts.video_fps), ("--video-frames", opts.video_frames),
                    ("--video-stride", opts.video_stride)):
        if v is not None and not v > 0:
            raise UsageError(f"{flag} must be > 0 (got {v:g})")


@dataclass(frozen=True)
class Windowing:
    """How a clip becomes windows: frames at ``fps``, ``frames`` (T) a window, one every
    ``stride`` (S) frames."""

    fps: float
    frames: int
    stride: int

    def attrs(self) -> dict[str, Any]:
        return {"fps": self.fps, "frames": self.frames, "stride": self.stride}


@dataclass
class VideoWindows:
    """A clip's windows as uint8 (V, T, 3, h, w), their true times, and what was padded or
    dropped."""

    frames: Any  # torch.Tensor
    start: np.ndarray
    end: np.ndarray
    padded: int = 0
    dropped: int = 0


def window_starts(n_frames: int, w: Windowing) -> tuple[list[int], int, int]:
    """The first frame of each window of a clip of ``n_frames`` frames, the frames of padding
    and the windows dropped (started within the clip, cut short by its end)."""
    t, s = w.frames, w.stride
    if n_frames == 0:
        return [], 0, 0
    if n_frames < t:
        return [0], t - n_frames, 0
    starts = list(range(0, n_frames - t + 1, s))
    dropped = len(range(starts[-1] + s, n_frames, s))
    return starts, 0, dropped


class WindowCutter:
    """A clip's preprocessed frames (at ``w.fps``, in order, with their times) into windows as
    they complete, holding at most one window's frames: a long clip never sits in memory."""

    def __init__(self, w: Windowing, crop: tuple[int, int], until: float | None = None) -> None:
        self.w, self.crop = w, crop
        self.until = until  # the clip's length, where known: no window ends after it
        self.n = 0  # frames pushed
        self.next_start = 0  # the first frame of the next window
        self.buffer: list[tuple[Any, float]] = []  # frames from next_start on
        self.made = 0

    def push(self, frame: torch.Tensor, t: float) -> list[tuple[Any, float, float]]:
        """Add the next frame; returns the windows it completes: (T frames, start, end)."""
        i, self.n = self.n, self.n + 1
        if i < self.next_start:  # a stride longer than a window skips frames
            return []
        self.buffer.append((frame, t))
        if len(self.buffer) < self.w.frames:
            return []
        out = [self._window(self.buffer)]
        self.next_start += self.w.stride
        self.buffer = self.buffer[self.w.stride:]
        return out

    def _window(self, frames: list[tuple[Any, float]], padded: int = 0
                ) -> tuple[Any, float, float]:
        import torch

        self.made += 1
        stack = [f for f, _ in frames] + [frames[-1][0]] * padded
        end = frames[-1][1] + 1.0 / self.w.fps
        if self.until is not None and frames[-1][1] < self.until < end:
            end = self.until
        end = round(end, 6)
        return torch.stack(stack), frames[0][1], end

    def finish(self) -> tuple[list[tuple[Any, float, float]], int, int]:
        """The clip's end: its one padded window if it made none, and (padded, dropped)."""
        if self.made == 0 and self.buffer:
            padded = self.w.frames - len(self.buffer)
            return [self._window(self.buffer, padded)], padded, 0
        return [], 0, len(range(self.next_start, self.n, self.w.stride))


def windows_of(made: list[tuple[Any, float, float]], crop: tuple[int, int], w: Windowing,
               padded: int = 0, dropped: int = 0) -> VideoWindows:
    """Windows as :class:`WindowCutter` makes them, stacked into one :class:`VideoWindows`."""
    import torch

    if not made:
        frames = torch.zeros((0, w.frames, 3, *crop), dtype=torch.uint8)
    else:
        frames = torch.stack([x for x, _, _ in made])
    return VideoWindows(frames, np.array([s for _, s, _ in made], np.float64),
                        np.array([e for _, _, e in made], np.float64), padded, dropped)


def cut_windows(frames: list[torch.Tensor], times: list[float], w: Windowing,
                crop: tuple[int, int], until: float | None = None) -> VideoWindows:
    """A whole clip's preprocessed frames (at ``w.fps``, with their times) as windows; the
    clip lasts ``until`` seconds where known."""
    cutter = WindowCutter(w, crop, until)
    made = [x for f, t in zip(frames, times, strict=True) for x in cutter.push(f, t)]
    last, padded, dropped = cutter.finish()
    return windows_of(made + last, crop, w, padded, dropped)


class WindowStream:
    """A loader worker's side of the windows: each clip's windows as they complete (the frames
    preprocessed as they come), handed out with the worker's batches (:meth:`take`), so that
    a worker holds at most a batch's windows however long its clips are."""

    def __init__(self, video: VideoInput) -> None:
        self.video = video
        self.pending: dict[int, list] = {}  # clip -> windows made since the last take
        self.counts: dict[int, tuple[int, int]] = {}  # finished clip -> (padded, dropped)
        self.clip, self.cutter = -1, None

    def start(self, clip: int, until: float | None = None) -> None:
        """A new clip, ``until`` seconds long where known."""
        self.clip = clip
        self.cutter = WindowCutter(self.video.windowing, self.video.preprocessing.crop_size,
                                   until)

    def push(self, rgb: np.ndarray, t: float) -> bool:
        """A frame of the clip at the model's rate; True once a batch's windows are waiting."""
        made = self.cutter.push(self.video.preprocessing.uint8_frame(rgb), t)
        waiting = self.pending.setdefault(self.clip, [])
        waiting.extend(made)
        frames = sum(len(x) for x in self.pending.values()) * self.video.windowing.frames
        return frames >= WINDOW_BATCH_FRAMES

    def finish(self) -> None:
        last, padded, dropped = self.cutter.finish()
        self.pending.setdefault(self.clip, []).extend(last)
        self.counts[self.clip] = (padded, dropped)

    def fail(self) -> None:
        self.pending.pop(self.clip, None)

    def take(self) -> list[tuple[int, VideoWindows]]:
        """The windows made since the last take, per clip; a finished clip's last ones carry
        its padded/dropped counts."""
        w, crop = self.video.windowing, self.video.preprocessing.crop_size
        out = [(j, windows_of(made, crop, w, *self.counts.pop(j, (0, 0))))
               for j, made in self.pending.items()]
        self.pending = {}
        return out


@dataclass(frozen=True)
class VideoInput:
    """What loader workers need to make a clip's windows (sent to them instead of the model)."""

    preprocessing: VideoPreprocessing
    windowing: Windowing


@dataclass
class VideoEncoder:
    """A clip-level video encoder (windows in, one feature row per window out), with its
    preprocessing, windowing and provenance."""

    name: str
    model: nn.Module
    dim: int
    preprocessing: VideoPreprocessing
    windowing: Windowing
    weights: Any  # WeightsInfo, or an hf: model's HFModelInfo
    layer: str

    @property
    def input(self) -> VideoInput:
        return VideoInput(self.preprocessing, self.windowing)

    def attrs(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "weights": self.weights.attrs() if isinstance(self.weights, WeightsInfo)
            else self.weights.identity(),
            "layer": self.layer,
            "dim": self.dim,
            **self.windowing.attrs(),
            "preprocessing": self.preprocessing.attrs(),
        }
