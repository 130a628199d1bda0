"""Where models run: the one device and precision choice of ``vpipe features`` and ``train``.

``--device auto`` is the current CUDA device when there is one, else the CPU (with a warning
when an NVIDIA driver is there but CUDA is not usable: a driver older than the CUDA build of
torch, say). A CUDA device chosen is made the current one (``torch.cuda.set_device``), so that
nothing else (the loader's pinning thread, the RNG the trainer saves) lands on GPU 0.
``--precision auto`` is bf16 on GPUs of compute capability 8.0 or newer (Ampere on: the same
speed as fp16, without fp16's overflow in whole transformer models), fp16 before them, bf16 on
a CPU with native bf16 (AVX512-BF16 or AMX), else fp32; ``fp32`` on CUDA means IEEE fp32 (no
TF32). :func:`describe_device` is what a run records of the device it used.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import UsageError
from pipeline.runner import usable_cores

DEVICE_CHOICES = "auto, cpu or cuda[:N]"
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
BF16_CAPABILITY = (8, 0)  # Ampere: bf16 tensor cores, as fast as fp16


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
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; CUDA asked for without one is a usage error.
    A CUDA device comes back with its index, made the process's current device."""
    if name == "auto":
        if not torch.cuda.is_available():
            warn_cuda_unusable()
            return torch.device("cpu")
        name = "cuda"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name!r}: use {DEVICE_CHOICES}") from None
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r}: use {DEVICE_CHOICES}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = cuda_unusable_reason()
            raise UsageError(f"--device {name}: no CUDA device is available"
                             + (f" ({why})" if why else ""))
        dev = cuda_device(dev.index, torch.cuda.device_count(), torch.cuda.current_device())
        torch.cuda.set_device(dev)
    return dev


def cuda_device(index: int | None, count: int, current: int) -> torch.device:
    """``cuda:index`` (``current`` without one) among ``count`` visible GPUs."""
    i = current if index is None else index
    if not 0 <= i < count:
        raise UsageError(f"--device cuda:{i}: there are {count} CUDA device(s) "
                         f"(cuda:0 to cuda:{count - 1})")
    return torch.device("cuda", i)


def nvidia_driver() -> str | None:
    """The NVIDIA kernel driver's version when one is loaded (``/proc/driver/nvidia``, else
    what ``nvidia-smi`` says where a container hides the former); None without one."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return _smi_driver()
    m = re.search(r"Kernel Module(?: for \S+)?\s+([0-9][0-9.]*)", text)
    return m.group(1) if m else "unknown version"


def _smi_driver() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = r.stdout.split()
    return lines[0] if r.returncode == 0 and lines else None


def fallback_reason(driver: str | None, torch_cuda: str | None, error: str | None) -> str | None:
    """Why CUDA is unusable although an NVIDIA driver is there (None: no driver, nothing to
    say). ``torch_cuda``: the CUDA version torch was built for (None: a CPU build); ``error``:
    what initialising CUDA said."""
    if driver is None:
        return None
    if torch_cuda is None:
        return f"NVIDIA driver {driver} found, but this torch is a CPU-only build"
    why = (error or "").strip().splitlines()[0] if error and error.strip() else "no GPU visible"
    return (f"NVIDIA driver {driver} found, but CUDA {torch_cuda} (this torch's build, which "
            f"needs a recent enough driver) is not usable: {why}")


def cuda_unusable_reason() -> str | None:
    """:func:`fallback_reason` on this machine."""
    driver = nvidia_driver()
    if driver is None:
        return None
    error = None
    if torch.version.cuda is not None:
        try:
            torch.cuda.init()
        except Exception as e:  # torch says why: driver too old, no device, ...
            error = str(e)
    return fallback_reason(driver, torch.version.cuda, error)


_warned: set[str] = set()


def warn_cuda_unusable() -> None:
    """One line on stderr, once per process, when ``--device auto`` falls back to the CPU on
    a machine with an NVIDIA driver."""
    why = cuda_unusable_reason()
    if why and why not in _warned:
        _warned.add(why)
        print(f"vpipe: warning: running on the CPU: {why}", file=sys.stderr, flush=True)


def check_device_name(name: str) -> None:
    """Refuse a device name that can never work, without looking for the device itself."""
    if name not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", name):
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


def pick_precision(precision: str, device: torch.device,
                   capability: tuple[int, int] | None = None) -> str:
    """fp32, fp16 or bf16. ``auto``: on CUDA, bf16 from compute capability 8.0 (Ampere) on,
    else fp16; on a CPU, bf16 with native bf16, else fp32. ``capability``: the GPU's (read
    from the device when not given).

    Measured on a 2-core AVX512-BF16 CPU: ResNet-50 bf16 autocast ran 2.5x faster than fp32
    (24.8 vs 10.1 frames/s, batch 16), so ``auto`` takes it there; bf16 changes the numbers.
    """
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision!r}: use {', '.join(PRECISIONS)}")
    if device.type == "cuda":
        cap = capability or torch.cuda.get_device_capability(device)
        if precision == "auto":
            return "bf16" if cap >= BF16_CAPABILITY else "fp16"
        if precision == "bf16" and cap < BF16_CAPABILITY:
            raise UsageError(f"--precision bf16 needs a GPU of compute capability 8.0 or newer "
                             f"(Ampere on); this one is {cap[0]}.{cap[1]}: use fp16 or fp32")
        return precision
    if precision == "auto":
        return "bf16" if cpu_has_bf16() else "fp32"
    if precision == "fp16":
        raise UsageError("--precision fp16 needs a CUDA device; use bf16 or fp32 on a CPU")
    return precision


def cuda_math(precision: str, fixed_shapes: bool) -> dict[str, Any]:
    """Set CUDA's math for a run of ``precision``: ``fp32`` is IEEE fp32 (TF32 off in matmuls
    and cuDNN, where torch's default has it on in convolutions); half precisions leave torch's
    defaults. ``fixed_shapes`` (every call the same size, as image batches): cuDNN picks its
    fastest kernels by timing them (``cudnn.benchmark``). Returns what was set, for the run's
    record."""
    if precision == "fp32":
        if hasattr(torch.backends.cudnn, "conv"):  # torch >= 2.9: the new flags only, as
            # mixing them with the legacy allow_tf32 is an error there
            torch.backends.cuda.matmul.fp32_precision = "ieee"
            torch.backends.cudnn.conv.fp32_precision = "ieee"
            torch.backends.cudnn.rnn.fp32_precision = "ieee"
        else:  # pragma: no cover - torch < 2.9
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = fixed_shapes
    return {"tf32": precision != "fp32", "cudnn_benchmark": fixed_shapes}


def describe_device(device: torch.device) -> dict[str, Any]:
    """What a run records of its device: for CUDA the GPU's name, compute capability, memory,
    the driver and the CUDA and cuDNN versions torch uses; for the CPU its model and cores."""
    if device.type != "cuda":
        return {"type": "cpu", "name": cpu_name(), "cores": usable_cores(),
                "native_bf16": cpu_has_bf16()}
    props = torch.cuda.get_device_properties(device)
    return {
        "type": "cuda",
        "index": device.index,
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "driver": nvidia_driver(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "visible_devices": torch.cuda.device_count(),
    }


def cpu_name() -> str | None:
    """The CPU's model name, as /proc/cpuinfo gives it."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return m.group(1).strip() if m else None


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The half dtype of a precision name, None for fp32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
