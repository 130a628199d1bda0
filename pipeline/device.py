"""Where models run: the one device and precision choice of ``vpipe features`` and ``train``.

``--device auto`` is the first CUDA device when there is one, else the CPU; ``--precision
auto`` is fp16 on CUDA, bf16 on a CPU with native bf16 (AVX512-BF16 or AMX), else fp32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from pipeline.errors import UsageError
from pipeline.runner import usable_cores

DEVICE_CHOICES = "auto, cpu or cuda[:N]"
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def default_threads() -> int:
    """torch's intra-op threads for a sequence model: half the cores this process may use, 1
    to 4. A small LSTM gains little from more, and torch's default (every core) makes it
    crawl when anything else runs: on a busy 2-core machine, 131.8 ms a step with 2 threads
    against 11.5 ms with 1 (hidden 16; hidden 512: 3230 against 2196 ms)."""
    return max(1, min(4, usable_cores() // 2))


@contextlib.contextmanager
def torch_threads(n: int = 0) -> Iterator[int]:
    """Run the block with ``n`` torch threads (0: :func:`default_threads`), then restore."""
    if n < 0:
        raise UsageError("--threads must be 0 (auto) or more")
    before = torch.get_num_threads()
    use = n or default_threads()
    torch.set_num_threads(use)
    try:
        yield use
    finally:
        torch.set_num_threads(before)


def pick_device(name: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; CUDA asked for without one is a usage error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name!r}: use {DEVICE_CHOICES}") from None
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r}: use {DEVICE_CHOICES}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available")
    return dev


def check_device_name(name: str) -> None:
    """Refuse a device name that can never work, without looking for the device itself."""
    if name not in ("auto", "cpu") and not name.startswith("cuda"):
        raise UsageError(f"--device {name!r}: use {DEVICE_CHOICES}")


def cpu_has_bf16() -> bool:
    """True when the CPU runs bf16 matmuls natively (AVX512-BF16 or AMX)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def pick_precision(precision: str, device: torch.device) -> str:
    """fp32, fp16 or bf16. ``auto``: fp16 on CUDA; bf16 on a CPU with native bf16, else fp32.

    Measured on a 2-core AVX512-BF16 CPU: ResNet-50 bf16 autocast ran 2.5x faster than fp32
    (24.8 vs 10.1 frames/s, batch 16), so ``auto`` takes it there; bf16 changes the numbers.
    """
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision!r}: use {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type == "cuda":
            return "fp16"
        return "bf16" if cpu_has_bf16() else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise UsageError("--precision fp16 needs a CUDA device; use bf16 or fp32 on a CPU")
    return precision


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The half dtype of a precision name, None for fp32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
