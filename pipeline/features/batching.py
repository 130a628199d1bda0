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
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

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

    def expect(self, n_frames: int) -> None:
        """The run's frame count, once known: a short run keeps the default size, untuned."""
        if self.size is None and n_frames < TUNE_FROM_FRAMES:  # read at call time (tests)
            self.size = self.default()
            self._short = n_frames

    def run(self, imgs: Any, call: Callable[[Any], np.ndarray]) -> np.ndarray:
        """``call`` over ``imgs`` (a loader batch) in calls of the current size; while tuning,
        each call is timed towards its size's figure."""
        out, i, n = [], 0, int(imgs.shape[0])
        while i < n:
            b = self.size or self._plan[0]
            chunk = imgs[i:i + b]
            t0 = time.perf_counter()
            if self.compiled and chunk.shape[0] < b:
                pad = chunk.new_zeros((b - chunk.shape[0], *chunk.shape[1:]))
                out.append(call(torch.cat([chunk, pad]))[: chunk.shape[0]])
            else:
                out.append(call(chunk))
            dt = time.perf_counter() - t0
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
