"""Benchmark of `vpipe features` against the model's own ceiling and the seed-style loop.

Prints, in one run:
  (a) the model alone (as the stage builds it) swept over batch size, memory layout and
      precision on random tensors, before and after (b), best of the two; its best
      configuration is the ceiling,
  (b) the features stage with its defaults (or the options given), frames/s over the whole
      `extract_features` call and in steady state (the difference of that run and a 9-frame
      one), with the model-call size it chose,
  (c) the seed-style way: PIL load + the weights' transforms + one ResNet call per frame,
  (d) --pairs rounds of (b) each beside the best configuration of (a) alone, measured next to
      each other, so that a change in the machine's load hits both alike,
and the ratios b/a, b/c and each round's of (d). Frames are JPEGs at the size
`vpipe extract-frames` writes by default (short side 256) unless --size says otherwise.
Weights are random (same speed as the published ones, and no download needed)::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/features.py --frames 384
"""

from __future__ import annotations

import argparse
import os
import shutil
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


def sweep(model_name: str, weights: Path, batches: Sequence[int], precisions: Sequence[str],
          seconds: float, rounds: int = 2,
          layouts: Sequence[str] = ("contiguous", "channels_last"), quiet: bool = False,
          ) -> dict[tuple[str, str, int], float]:
    """The model alone (as the stage builds it: BatchNorm folded) over precision x memory
    layout x batch size, frames/s, best of ``rounds`` interleaved rounds (so that a change in
    the machine's load hits every configuration alike)."""
    import torch

    from pipeline.device import autocast_dtype
    from pipeline.features.encoders import load_image_encoder
    from pipeline.features.weights import resolve_image_weights

    models = {}
    for prec in precisions:
        for layout in layouts:
            enc = load_image_encoder(model_name, str(weights),
                                     resolve_image_weights(model_name, str(weights)))
            m = enc.model
            if (cast := autocast_dtype(prec)) is not None:
                m.to(cast)
            if layout == "channels_last":
                m.to(memory_format=torch.channels_last)
            models[prec, layout] = m
    best: dict[tuple[str, str, int], float] = {}
    for _ in range(rounds):
        for (prec, layout), m in models.items():
            for b in batches:
                x = torch.randn(b, 3, 224, 224)
                if (cast := autocast_dtype(prec)) is not None:
                    x = x.to(cast)
                if layout == "channels_last":
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.inference_mode():
                    m(x)  # warm-up: kernel choice, allocations
                    n, t0 = 0, time.perf_counter()
                    while n == 0 or time.perf_counter() - t0 < seconds:
                        m(x)
                        n += b
                fps = n / (time.perf_counter() - t0)
                key = (prec, layout, b)
                best[key] = max(best.get(key, 0.0), fps)
                if not quiet:
                    print(f"  sweep {prec} {layout} batch {b}: {fps:.1f} frames/s", flush=True)
    return best


def compile_break_even(model_name: str, weights: Path, batch: int, precision: str,
                       seconds: float) -> dict[str, float]:
    """torch.compile of the stage's model at one call size: compile seconds, eager and
    compiled frames/s, and the frames a run needs before the compile has paid for itself."""
    import torch

    from pipeline.features import FeatureOptions, load_encoders

    def rate(m, x) -> float:
        with torch.inference_mode():
            m(x)
            n, t0 = 0, time.perf_counter()
            while n == 0 or time.perf_counter() - t0 < seconds:
                m(x)
                n += batch
        return n / (time.perf_counter() - t0)

    opts = FeatureOptions(image_model=model_name, image_weights=str(weights), audio_model="none",
                          device="cpu", precision=precision, batch_size=batch)
    enc = load_encoders(opts)
    x = torch.randn(batch, 3, 224, 224)
    if (cast := next(enc.image.model.parameters()).dtype) != torch.float32:
        x = x.to(cast)
    if enc.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    eager = rate(enc.image.model, x)
    compiled = torch.compile(enc.image.model, dynamic=False)
    t0 = time.perf_counter()
    with torch.inference_mode():
        compiled(x)
    compile_s = time.perf_counter() - t0
    fast = rate(compiled, x)
    gain = 1 / eager - 1 / fast  # seconds saved per frame
    return {"compile_s": compile_s, "eager": eager, "compiled": fast,
            "break_even_frames": compile_s / gain if gain > 0 else float("inf")}


def stage_rate(media: Path, out: Path, opts, n_frames: int) -> tuple[float, float, dict]:
    """Frames/s of one whole `extract_features` call, its CPU ms/frame, and what it recorded
    about its model calls (``model_batch``)."""
    import json

    from pipeline.features import extract_features

    t0, c0 = time.perf_counter(), cpu_seconds()
    extract_features([media], out, opts, quiet=True)
    dt = time.perf_counter() - t0
    info = json.loads((out / "vpipe.json").read_text())
    return n_frames / dt, (cpu_seconds() - c0) / n_frames * 1e3, info.get("model_batch", {})


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--frames", type=int, default=384, help="frames for (b)")
    ap.add_argument("--clips", type=int, default=8)
    ap.add_argument("--seed-frames", type=int, default=48, help="frames for (c)")
    ap.add_argument("--size", default="455x256", help="frame size WxH")
    ap.add_argument("--batch-size", type=int, default=0, help="the stage's (0: its default)")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--precision", nargs="+", default=["auto"], help="the stage's")
    ap.add_argument("--sweep-batches", default="1,4,8,16,32")
    ap.add_argument("--sweep-precisions", default=None,
                    help="default: fp32, plus bf16 where the CPU has native bf16")
    ap.add_argument("--sweep-seconds", type=float, default=2.0)
    ap.add_argument("--pairs", type=int, default=3,
                    help="rounds of the stage (first --precision) beside the best model-alone "
                    "configuration, each giving a ratio of two adjacent measurements")
    ap.add_argument("--compile", action="store_true",
                    help="also measure torch.compile's break-even (compiles for minutes)")
    a = ap.parse_args(argv)

    import torch
    import torchvision

    from pipeline.device import cpu_has_bf16
    from pipeline.features import FeatureOptions
    from pipeline.features.options import loader_workers

    workers = loader_workers() if a.workers is None else a.workers
    size = tuple(int(v) for v in a.size.split("x"))
    precisions = (a.sweep_precisions.split(",") if a.sweep_precisions
                  else ["fp32", "bf16"] if cpu_has_bf16() else ["fp32"])
    print(f"# {a.model}, {workers} loader worker(s), frames {a.size}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, native bf16: "
          f"{cpu_has_bf16()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        per_clip = -(-a.frames // a.clips)
        media = make_frames(tmp / "media", a.clips, per_clip, size)
        small = make_frames(tmp / "small", 1, 9, size)  # the fixed cost: a 9-frame run
        n_frames = a.clips * per_clip
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
        print(f"(c) seed-style: {seed:.1f} frames/s", flush=True)

        batches = [int(b) for b in a.sweep_batches.split(",")]
        ceiling = sweep(a.model, weights, batches, precisions, a.sweep_seconds, rounds=1)

        def stage(prec: str, name: str) -> tuple[float, float, float, dict, float]:
            """(b): whole-call and steady frames/s (the difference of the big and a 9-frame
            run: the fixed cost out), CPU ms/frame, the model calls, the 9-frame run's s."""
            opts = FeatureOptions(
                image_model=a.model, image_weights=str(weights), audio_model="none",
                batch_size=a.batch_size, workers=workers, device="cpu", precision=prec,
            )
            for d in (tmp / name, tmp / f"{name}-small"):
                shutil.rmtree(d, ignore_errors=True)
            big, cpu_b, chosen = stage_rate(media, tmp / name, opts, n_frames)
            small_rate, _, _ = stage_rate(small, tmp / f"{name}-small", opts, 9)
            t_small = 9 / small_rate
            steady = (n_frames - 9) / max(n_frames / big - t_small, 1e-9)
            return big, steady, cpu_b, chosen, t_small

        rows = []
        for prec in a.precision:
            big, steady, cpu_b, chosen, t_small = stage(prec, f"out-{prec}")
            rows.append((prec, big, steady, cpu_b, chosen, t_small))
            print(f"(b) stage {prec}: {big:.1f} frames/s whole call, {steady:.1f} steady, "
                  f"9-frame run {t_small:.2f} s, model calls {chosen}", flush=True)
        # The sweep again, after the stage: the ceiling is the best of both rounds.
        for k, v in sweep(a.model, weights, batches, precisions, a.sweep_seconds,
                          rounds=1).items():
            ceiling[k] = max(ceiling[k], v)
        top = max(ceiling, key=ceiling.get)
        # Paired rounds: the stage and the best configuration alone measured next to each
        # other, so that the machine's changing load hits both alike (this machine's share of
        # its host varies by 10-30% over minutes; the table's ceiling is a best of two).
        pairs = []
        for _ in range(a.pairs):
            big, steady, *_ = stage(a.precision[0], "pair")
            alone = sweep(a.model, weights, [top[2]], [top[0]], n_frames / big / 2, rounds=1,
                          layouts=[top[1]], quiet=True)[top]
            pairs.append((steady, alone))
            print(f"(pair) stage steady {steady:.1f}, model alone {alone:.1f} frames/s: "
                  f"{steady / alone:.2f}", flush=True)
        compiled = (compile_break_even(a.model, weights, top[2], top[0], a.sweep_seconds * 2)
                    if a.compile else None)

    print()
    print("| model alone | " + " | ".join(f"batch {b}" for b in batches) + " |")
    print("|---|" + "---|" * len(batches))
    for prec in precisions:
        for layout in ("contiguous", "channels_last"):
            cells = " | ".join(f"{ceiling[prec, layout, b]:.1f}" for b in batches)
            print(f"| {prec} {layout} | {cells} |")
    top = max(ceiling, key=ceiling.get)
    print(f"\nbest model-alone configuration: {top[0]} {top[1]} batch {top[2]}: "
          f"{ceiling[top]:.1f} frames/s")
    print()
    print("| stage precision | (b) whole call | (b) steady | b steady / best model | "
          "b / (c) seed | 9-frame run s | model calls |")
    print("|---|---|---|---|---|---|---|")
    for prec, big, steady, _cpu, chosen, t_small in rows:
        print(f"| {prec} | {big:.1f} | {steady:.1f} | {steady / ceiling[top]:.2f} | "
              f"{big / seed:.2f} | {t_small:.2f} | size {chosen.get('size')} "
              f"({chosen.get('chosen')}) |")
    if pairs:
        ratios = sorted(st / al for st, al in pairs)
        print(f"\npaired rounds (stage steady / best configuration alone, measured next to "
              f"each other): {', '.join(f'{r:.2f}' for r in ratios)}; median "
              f"{ratios[len(ratios) // 2]:.2f}")
    print(f"\nframes/s; (b) over {n_frames} frames in {a.clips} clips (steady: minus a 9-frame "
          f"run), (c) over {len(paths)} frames (fp32, as the seed script ran)")
    if compiled is not None:
        print(f"\ntorch.compile at batch {top[2]} ({top[0]}): compile "
              f"{compiled['compile_s']:.1f} s, eager {compiled['eager']:.1f} vs compiled "
              f"{compiled['compiled']:.1f} frames/s: "
              f"pays off after {compiled['break_even_frames']:.0f} frames")


if __name__ == "__main__":
    main()
