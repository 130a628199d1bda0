"""Benchmark: `vpipe features --video-model` against its floor, and its memory against clip length.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/video_features.py [--model r2plus1d_18]
        [--seconds 12] [--short 30] [--long 600] [--memory-stride 0] [--sweep 1,2,4]
        [--precisions fp32] [--only speed|memory] [--work DIR]

Speed. One testsrc2 clip (320x240, 30 frames/s) of ``--seconds``; the stage encodes it with
``--video-model MODEL --video-weights none`` (its default window: 16 frames at 15/s for the
torchvision Kinetics weights) beside an image model that costs next to nothing
(mobilenet_v3_small, ``--fps 0.1``) and no audio. Its floor is the sum of (a) decoding the clip
at the model's rate alone (``media.decode``, nothing else) and (b) the model alone on the same
number of windows at its best windows-per-call and precision, swept here (uint8 windows already
cropped, normalised per call as the stage does). The figure is frames/s at the model's rate:
the stage's over its wall time less the process's fixed cost (a run on a 1-window clip,
measured the same way), against the floor's.

Memory. The stage's peak resident size (the process and its loader worker apart, ru_maxrss)
on a ``--short`` and a ``--long`` clip, at the model's own windows (``--memory-stride 0``, the
default: what a user gets; the 10-minute clip takes ~7.5 minutes on 2 cores) or with windows
every ``--memory-stride`` frames (a few model calls: quicker, but the short clip then makes too
few calls to reach the heap's steady state). The model process's peak is also sampled once a
second (``VmHWM``), so that the report says when the peak was reached and what it was at each
quarter of the run: does memory grow with the clip, or level off?
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

RUN_ONE = """
import json, resource, sys, time
t = time.perf_counter()
from pipeline.cli import main
code = main(sys.argv[1:])
wall = time.perf_counter() - t
main_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
worker_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"code": code, "wall_s": wall, "peak_mb": max(main_kb, worker_kb) / 1024,
                  "main_mb": main_kb / 1024, "worker_mb": worker_kb / 1024}))
"""


def stage(clip: Path, out: Path, model: str, precision: str, *extra: str) -> dict:
    """One `vpipe features` process on ``clip``: its wall time and peak memory, and the model
    process's peak (MB) sampled each second as ``course`` [(seconds, MB), ...]."""
    argv = ["features", str(clip.parent), "-o", str(out), "--from-video", "--fps", "0.1",
            "--image-model", "mobilenet_v3_small", "--image-weights", "none",
            "--audio-model", "none", "--video-model", model, "--video-weights", "none",
            "--precision", precision, "--workers", "1", "-q", "--overwrite", *extra]
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-c", RUN_ONE, *argv], stdout=subprocess.PIPE,
                                stderr=err, text=True, cwd=ROOT)
        course, t0 = [], time.perf_counter()
        while proc.poll() is None:
            hwm = peak_kb(proc.pid)
            if hwm is not None:
                course.append((round(time.perf_counter() - t0, 1), round(hwm / 1024, 1)))
            time.sleep(1.0)
        out_text = proc.stdout.read()
        if proc.returncode:
            err.seek(0)
            raise SystemExit(err.read()[-2000:])
    return {**json.loads(out_text.strip().splitlines()[-1]), "course": course}


def peak_kb(pid: int) -> int | None:
    """A live process's peak resident size so far (kB), or None once it has gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def clip_of(folder: Path, seconds: float) -> Path:
    from synth import make_lavfi_video

    return make_lavfi_video(folder / f"c{seconds:g}" / "clip.mp4", duration_s=seconds,
                            size=(320, 240), fps=30)


def decode_alone(clip: Path, fps: float) -> tuple[float, int]:
    """Seconds to decode ``clip`` at ``fps`` (frames converted to RGB, nothing else)."""
    from pipeline.media import FrameSampler, decode

    t = time.perf_counter()
    n = sum(1 for kind, _, _ in decode(clip, sampler=FrameSampler(fps=fps)) if kind == "frame")
    return time.perf_counter() - t, n


def model_alone(model: str, windows: int, sweep: list[int], precisions: list[str]) -> dict:
    """Seconds for ``windows`` windows through the model alone, per (windows a call,
    precision), the best kept."""
    import torch

    from pipeline.features.encoders.torchvision_video import TorchvisionVideo
    from pipeline.features.options import FeatureOptions

    opts = FeatureOptions(from_video=True, video_model=model, video_weights="none")
    enc = TorchvisionVideo.load(model, opts, TorchvisionVideo.resolve(model, opts, []))
    t, (h, w) = enc.windowing.frames, enc.preprocessing.crop_size
    x = torch.randint(0, 256, (max(sweep), t, 3, h, w), dtype=torch.uint8)
    timings = {}
    for precision in precisions:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
        net = enc.model.to(dtype)
        with torch.inference_mode():
            net(enc.preprocessing.normalize(x[:1], dtype))  # warm-up
            for b in sweep:
                start = time.perf_counter()
                net(enc.preprocessing.normalize(x[:b], dtype))
                per_window = (time.perf_counter() - start) / b
                timings[f"{precision} x{b}"] = per_window
                if precision == "bf16" and per_window > 10 * min(timings.values()):
                    break  # no faster at a larger batch: a CPU without fast bf16 Conv3d
    best = min(timings, key=timings.get)
    return {"per_window_s": timings, "best": best,
            "seconds": timings[best] * windows, "frames": t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="r2plus1d_18")
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument("--short", type=float, default=30.0)
    ap.add_argument("--long", type=float, default=600.0)
    ap.add_argument("--memory-stride", type=int, default=0, help="0: the model's own windows")
    ap.add_argument("--sweep", default="1,2,4")
    # bf16 is left out by default: on this CPU one r2plus1d_18 window takes 129 s in bf16.
    ap.add_argument("--precisions", default="fp32")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--only", choices=("speed", "memory"), default=None)
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="vpipe-video-bench-"))
    report: dict = {"model": a.model}

    if a.only != "memory":
        report["speed"] = speed(work, a)
    if a.only != "speed":
        report["memory"] = memory(work, a)
    print(json.dumps(report, indent=1))


def speed(work: Path, a: argparse.Namespace) -> dict:
    clip, tiny = clip_of(work, a.seconds), clip_of(work, 1.1)
    fixed = stage(tiny, work / "f-tiny", a.model, "fp32")
    run = stage(clip, work / "f-speed", a.model, "auto")
    info = json.loads((work / "f-speed" / "vpipe.json").read_text())
    # The fixed cost's run encodes windows too: the difference is the others'.
    windows = info["video"]["windows"]
    tiny_windows = json.loads((work / "f-tiny" / "vpipe.json").read_text())["video"]["windows"]
    fps = info["params"]["video_fps"]
    dec_s, n_frames = decode_alone(clip, fps)
    alone = model_alone(a.model, windows - tiny_windows, [int(b) for b in a.sweep.split(",")],
                        a.precisions.split(","))
    used = (windows - tiny_windows) * alone["frames"]  # frames the model sees, beyond tiny's
    stage_s = run["wall_s"] - fixed["wall_s"]
    floor_s = dec_s * (windows - tiny_windows) / windows + alone["seconds"]
    out = {
        "clip_s": a.seconds, "frames_at_rate": n_frames, "windows": windows,
        "stage_wall_s": round(run["wall_s"], 2), "fixed_cost_s": round(fixed["wall_s"], 2),
        "decode_alone_s": round(dec_s, 2), "model_alone": alone,
        "stage_frames_per_s": round(used / stage_s, 2),
        "floor_frames_per_s": round(used / floor_s, 2),
        "floor_over_stage": round(stage_s / floor_s, 3),
    }
    print(json.dumps(out, indent=1), flush=True)
    return out


def memory(work: Path, a: argparse.Namespace) -> dict:
    out = {}
    stride = ["--video-stride", str(a.memory_stride)] if a.memory_stride else []
    for seconds in (a.short, a.long):
        c = clip_of(work, seconds)
        r = stage(c, work / f"f-mem{seconds:g}", a.model, "auto", *stride)
        info = json.loads((work / f"f-mem{seconds:g}" / "vpipe.json").read_text())
        course = r["course"]
        quarters = [course[min(len(course) - 1, len(course) * q // 4)][1] for q in (1, 2, 3)]
        out[f"{seconds:g}s"] = {
            "windows": info["video"]["windows"], "main_mb": round(r["main_mb"], 1),
            "worker_mb": round(r["worker_mb"], 1), "wall_s": round(r["wall_s"], 1),
            "main_mb_at_quarters": quarters if course else None,
            "main_peak_reached_s": next((t for t, mb in course if mb >= course[-1][1]), None)
            if course else None,
        }
        print(seconds, out[f"{seconds:g}s"], flush=True)
    short, long = out[f"{a.short:g}s"], out[f"{a.long:g}s"]
    out["long_over_short"] = {k: round(long[k] / short[k], 3) for k in ("main_mb", "worker_mb")}
    return out


if __name__ == "__main__":
    main()
