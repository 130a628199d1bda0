"""How many frames go into one call of the image model: chosen on the machine, from the run's
own first frames, unless ``--batch-size`` says.

On a CPU a small batch beats a large one (measured on 2-core Xeons: ResNet-50 bf16 channels
last, 77 frames/s at batch 8 against 58 at 32), on a GPU a large one does, and which size wins
depends on the CPU, the model and the precision. So with ``--batch-size 0`` (the default) the
first frames of a run go through the model in calls of each candidate size, timed (the frames
are the run's own: nothing is computed twice), and the rest of the run uses the fastest size
per frame; a run of fewer than ``TUNE_FROM_FRAMES`` frames keeps a measured default. The
loader still hands over batches of :attr:`ModelBatch.loader_batch` frames; a batch is cut into
calls of the chosen size. What was measured and chosen goes into ``vpipe.json``
(``model_batch``).

A call too large for the GPU's memory (``torch.OutOfMemoryError``) is not the end of the run:
the call size is halved and the call retried, down to one frame (:func:`halved`), and the size
used is recorded; :class:`CallSize` does the same for calls that are all of one clip's items
(an audio encoder's examples). The time the model calls take, against the loader's pace, is
:class:`LoaderMeter`'s to compare (``throughput`` in ``vpipe.json``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from pipeline.errors import VpipeError

# Candidate sizes per device type, tried in this order; the loader's batch is the largest.
CANDIDATES = {"cpu": (4, 8, 16, 32), "cuda": (32, 64, 128, 256)}
# Calls per candidate: the first warms up (kernel choice, allocations), the others are timed.
WARMUP, TIMED = 1, 2
# The size a run too short to tune uses (measured, benchmarks/README.md), and how short that
# is: the tuning calls must be a small part of the run, as each first call of a size is slow.
DEFAULT = {"cpu": 8, "cuda": 128}
TUNE_FROM_FRAMES = 1000


class ModelBatch:
    """The model-call size of one run: fixed (``size``), or tuned on the first frames."""

    def __init__(self, device_type: str, size: int = 0, compiled: bool = False) -> None:
        self.device_type = device_type
        # A compiled model is compiled again for every new input shape: one size, no tuning,
        # and a short last call padded to it.
        self.compiled = compiled
        if compiled and size == 0:
            size = DEFAULT.get(device_type, DEFAULT["cpu"])
        self.candidates = CANDIDATES.get(device_type, CANDIDATES["cpu"]) if size == 0 else ()
        self.loader_batch = size or max(self.candidates)
        self.size = size or None  # None while tuning
        # Round robin, so that a change in the machine's load hits every size alike.
        self._plan = [b for _ in range(WARMUP + TIMED) for b in self.candidates]
        self._calls: dict[int, int] = {}
        self._ms: dict[int, list[float]] = {}
        self._short: int | None = None
        self.out_of_memory: list[int] = []  # the call sizes that did not fit, in order
        self.frames, self.seconds = 0, 0.0  # every call's, for the run's throughput

    def expect(self, n_frames: int) -> None:
        """The run's frame count, once known: a short run keeps the default size, untuned."""
        if self.size is None and n_frames < TUNE_FROM_FRAMES:  # read at call time (tests)
            self.size = self.default()
            self._short = n_frames

    def run(self, imgs: Any, call: Callable[[Any], np.ndarray]) -> np.ndarray:
        """``call`` over ``imgs`` (a loader batch) in calls of the current size; while tuning,
        each call is timed towards its size's figure. A call that runs out of memory is made
        again at half the size, which the rest of the run keeps."""
        out, i, n = [], 0, int(imgs.shape[0])
        while i < n:
            b = self.size or self._plan[0]
            chunk = imgs[i:i + b]
            t0 = time.perf_counter()
            try:
                if self.compiled and chunk.shape[0] < b:
                    pad = chunk.new_zeros((b - chunk.shape[0], *chunk.shape[1:]))
                    out.append(call(torch.cat([chunk, pad]))[: chunk.shape[0]])
                else:
                    out.append(call(chunk))
            except torch.OutOfMemoryError:
                failed = True
            else:
                failed = False
            if failed:  # out of the except block: its traceback no longer holds the tensors
                self.size = halved(b, "frames in one image model call")
                self.out_of_memory.append(b)
                continue
            dt = time.perf_counter() - t0
            self.frames += int(chunk.shape[0])
            self.seconds += dt
            if self.size is None and chunk.shape[0] == b:
                self._observe(b, dt)
            i += b
        return out[0] if len(out) == 1 else np.concatenate(out)

    def _observe(self, b: int, seconds: float) -> None:
        self._plan.pop(0)
        self._calls[b] = self._calls.get(b, 0) + 1
        if self._calls[b] > WARMUP:  # a timed call, not a warm-up
            self._ms.setdefault(b, []).append(seconds * 1e3 / b)
        if not self._plan:
            self.size = min(self._ms, key=lambda s: min(self._ms[s]))

    def report(self) -> dict[str, Any]:
        """What the run used, for ``vpipe.json``: the size, how it was chosen, the timings."""
        if self.out_of_memory:
            return {"size": self.size, "chosen": "halved after running out of memory",
                    "out_of_memory_at": self.out_of_memory}
        if self.compiled:
            return {"size": self.size, "chosen": "--compile: one size (the given or the default)",
                    "compiled": True}
        if not self.candidates:
            return {"size": self.size, "chosen": "--batch-size"}
        if self._short is not None:
            return {"size": self.size, "chosen": f"default for a short run ({self._short} "
                    f"frames < {TUNE_FROM_FRAMES})"}
        return {
            "size": self.size,  # None: the run ended before every size was timed
            "chosen": "fastest per frame on the run's first frames" if self.size
            else "the run ended while sizes were being timed",
            "candidates": list(self.candidates),
            "ms_per_frame": {str(b): round(min(v), 2) for b, v in sorted(self._ms.items())},
        }

    def default(self) -> int:
        """The size of a run too short to tune."""
        return DEFAULT.get(self.device_type, DEFAULT["cpu"])


class OutOfMemory(VpipeError):
    """A single item is too large for the device's memory: nothing smaller can be tried."""


def halved(size: int, what: str) -> int:
    """The call size after ``size`` ran out of memory: half of it (the device's cached blocks
    released first); a call of one item that does not fit is one clear error."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if size <= 1:
        raise OutOfMemory(f"out of memory with 1 of the {what}: the model does not fit in the "
                          "device's memory with a single input (free the GPU, or use a "
                          "smaller model or --device cpu)")
    return size // 2


class CallSize:
    """Calls of all of one input's items at once (``limit`` None), or of at most ``limit``
    after a call ran out of memory; the limit holds for the rest of the run."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.limit: int | None = None
        self.out_of_memory: list[int] = []

    def run(self, x: torch.Tensor, call: Callable[[torch.Tensor], np.ndarray]) -> np.ndarray:
        out, i, n = [], 0, int(x.shape[0])
        if n == 0:
            return call(x)
        while i < n:
            b = n - i if self.limit is None else min(self.limit, n - i)
            try:
                out.append(call(x[i:i + b]))
            except torch.OutOfMemoryError:
                failed = True
            else:
                failed = False
            if failed:
                self.limit = halved(b, self.what)
                self.out_of_memory.append(b)
                continue
            i += b
        return out[0] if len(out) == 1 else np.concatenate(out)

    def report(self) -> dict[str, Any] | None:
        """None while every call fitted."""
        if not self.out_of_memory:
            return None
        return {"size": self.limit, "out_of_memory_at": self.out_of_memory}


class LoaderMeter:
    """The loader's batches, passed on, with the seconds spent waiting for each: set against
    the model's seconds, they say whether the model waited for the loader."""

    def __init__(self, batches: Any, workers: int) -> None:
        self.batches, self.workers = batches, workers
        self.wait, self.started = 0.0, time.perf_counter()
        self.ended: float | None = None

    def __iter__(self) -> Any:
        it = iter(self.batches)
        self.started = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                self.ended = time.perf_counter()
                self.wait += self.ended - t0
                return
            self.wait += time.perf_counter() - t0
            yield batch

    def report(self, model: ModelBatch) -> dict[str, Any]:
        """What the loader delivered (frames over the run's seconds) against what the model
        consumed (frames over the seconds of its calls), and the time spent waiting for the
        loader: a model much faster than the frames come, waiting most of the time, is
        starved."""
        wall = (self.ended or time.perf_counter()) - self.started
        frames = model.frames

        def rate(seconds: float) -> float | None:
            return round(frames / seconds, 1) if seconds > 0 and frames else None

        return {
            "loader_workers": self.workers,
            "frames": frames,
            "seconds": round(wall, 3),
            "loader_frames_per_s": rate(wall),
            "model_frames_per_s": rate(model.seconds),
            "model_seconds": round(model.seconds, 3),
            "waiting_for_loader_s": round(self.wait, 3),
        }
