"""Benchmark of `vpipe features` against the model's own throughput and the seed-style loop.

Prints, in one run and for each precision asked:
  (a) pure model throughput: the ResNet on random tensors at the same batch size,
  (b) the features stage end to end (frames/s over the whole `extract_features` call: model
      load, loader start-up, JPEG decode, preprocessing, inference, HDF5 writing),
  (c) the seed-style way: PIL load + the weights' transforms + one ResNet call per frame,
and the ratios b/a and b/c. Frames are JPEGs at the size `vpipe extract-frames` writes by
default (short side 256) unless --size says otherwise. Weights are random (same speed as the
published ones, and no download needed)::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/features.py --frames 384 --precision fp32 auto
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def seed_features(frame_paths: Sequence[str | os.PathLike], model) -> np.ndarray:
    """The seed script's way: for each frame, PIL load, transforms, one model call (fp32)."""
    import torch
    from PIL import Image
    from torchvision.models import ResNet50_Weights

    transform = ResNet50_Weights.IMAGENET1K_V1.transforms()
    rows = []
    with torch.no_grad():
        for p in frame_paths:
            x = transform(Image.open(p).convert("RGB"))[None]
            rows.append(model(x)[0].numpy())
    return np.stack(rows)


def make_frames(folder: Path, n_clips: int, per_clip: int, size: tuple[int, int]) -> Path:
    """An extract-frames style folder (manifest + JPEG frames), no audio."""
    from PIL import Image

    from pipeline.records import Run

    rng = np.random.default_rng(0)
    w, h = size
    run = Run(folder, "extract-frames", {"benchmark": True, "size": list(size)}).open()
    for c in range(n_clips):
        cid = f"bench_{c}"
        frames = folder / cid / "frames"
        frames.mkdir(parents=True)
        for i in range(per_clip):
            # Smooth content plus noise: JPEGs of a realistic size, not flat colour.
            base = Image.fromarray(rng.integers(0, 256, (9, 16, 3), dtype=np.uint8))
            arr = np.asarray(base.resize((w, h), Image.BICUBIC), dtype=np.int16)
            arr = (arr + rng.integers(-12, 12, arr.shape)).clip(0, 255).astype(np.uint8)
            Image.fromarray(arr).save(frames / f"{i:06d}.jpg", quality=90)
        run.record({
            "id": cid, "source": "bench", "start": 0.0, "end": float(per_clip),
            "n_frames": per_clip, "timestamps": [float(i) for i in range(per_clip)],
            "frames_dir": f"{cid}/frames", "frame_format": "jpg", "has_audio": False,
            "audio": None, "sample_rate": 16000, "n_samples": 0,
        })
    run.close()
    return folder


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the loader workers)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def model_throughput(
    model, batch: int, precision: str, seconds: float = 8.0
) -> tuple[float, float]:
    """Frames/s and CPU-ms/frame of the model alone on random input, run as the stage runs it."""
    import torch

    from pipeline.device import autocast_dtype

    cast = autocast_dtype(precision)
    x = torch.randn(batch, 3, 224, 224)
    if cast is not None:  # as the stage feeds it: weights and input in bf16, channels last
        x = x.to(cast).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        model(x)  # warm-up: first-call allocations and kernel selection
        n, t0, c0 = 0, time.perf_counter(), cpu_seconds()
        while time.perf_counter() - t0 < seconds:
            model(x)
            n += batch
    return n / (time.perf_counter() - t0), (cpu_seconds() - c0) / n * 1e3


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--frames", type=int, default=384, help="frames for (b)")
    ap.add_argument("--clips", type=int, default=8)
    ap.add_argument("--seed-frames", type=int, default=48, help="frames for (c)")
    ap.add_argument("--size", default="455x256", help="frame size WxH")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--precision", nargs="+", default=["fp32", "auto"])
    a = ap.parse_args(argv)

    import torch
    import torchvision

    from pipeline.features import FeatureOptions, extract_features, load_encoders
    from pipeline.features.options import loader_workers

    workers = loader_workers() if a.workers is None else a.workers
    size = tuple(int(v) for v in a.size.split("x"))
    print(f"# {a.model}, batch {a.batch_size}, {workers} loader worker(s), frames {a.size}, "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"torch threads {torch.get_num_threads()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        media = make_frames(tmp / "media", a.clips, -(-a.frames // a.clips), size)
        n_frames = a.clips * -(-a.frames // a.clips)
        torch.manual_seed(0)
        model = torchvision.models.get_model(a.model)
        model.fc = torch.nn.Identity()
        model.eval()
        weights = tmp / "weights.pth"
        torch.save(model.state_dict(), weights)

        paths = sorted(media.glob("*/frames/*.jpg"))[: a.seed_frames]
        t0 = time.perf_counter()
        seed_features(paths, model)
        seed = len(paths) / (time.perf_counter() - t0)

        rows = []
        for prec in a.precision:
            opts = FeatureOptions(
                image_model=a.model, image_weights=str(weights), audio_model="none",
                batch_size=a.batch_size, workers=workers, device="cpu", precision=prec,
            )
            enc = load_encoders(opts)  # (a) runs the very model the stage runs
            # (a) is measured before and after (b) and averaged: other load on a shared
            # machine then hits both figures alike.
            before, cpu_a1 = model_throughput(enc.image.model, a.batch_size, enc.precision)
            t0, c0 = time.perf_counter(), cpu_seconds()
            extract_features([media], tmp / f"out-{prec}", opts, quiet=True)
            e2e = n_frames / (time.perf_counter() - t0)
            cpu_b = (cpu_seconds() - c0) / n_frames * 1e3
            after, cpu_a2 = model_throughput(enc.image.model, a.batch_size, enc.precision)
            pure, cpu_a = (before + after) / 2, (cpu_a1 + cpu_a2) / 2
            rows.append((f"{prec} ({enc.precision})", pure, e2e, seed, cpu_a, cpu_b))
            print(f"{prec}: a={before:.2f}/{after:.2f} b={e2e:.2f} c={seed:.2f} "
                  f"cpu ms/frame a={cpu_a:.0f} b={cpu_b:.0f}", flush=True)

    print()
    print("| precision | (a) model only | (b) vpipe features | (c) seed-style | b/a | b/c "
          "| CPU ms/frame (a) / (b) |")
    print("|---|---|---|---|---|---|---|")
    for name, pure, e2e, seed, cpu_a, cpu_b in rows:
        print(f"| {name} | {pure:.1f} | {e2e:.1f} | {seed:.1f} | {e2e / pure:.2f} | "
              f"{e2e / seed:.2f} | {cpu_a:.0f} / {cpu_b:.0f} |")
    print(f"\nframes/s; (b) over {n_frames} frames in {a.clips} clips, (c) over {len(paths)} "
          "frames (fp32, as the seed script ran)")


if __name__ == "__main__":
    main()
