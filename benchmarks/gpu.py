"""The GPU check: what a first run on a CUDA machine must show, in one script (under 10 minutes
on an H100), printed and written as JSON (``--out``, default ``gpu-benchmark.json``):

  env       driver, CUDA, cuDNN, the GPU, what ``--device auto`` and ``--precision auto`` pick
  models    each image model alone (ResNet-50, ViT-B/16, a CLIP ViT-B/32 image tower; random
            weights: the published ones' speed) in fp16/bf16 channels-last at batch 32-256,
            cudnn.benchmark on/off, --compile on/off (ResNet-50), peak memory
  loader    the loader alone (no model) at 4/8/15 workers, on 720p JPEGs and from a video
  features  `vpipe features` end to end on ~20k 720p JPEG frames (ResNet-50), GPU utilisation
            sampled (nvidia-smi), against the model alone: the goal is >= 5,000 frames/s and
            >= 0.8 of the model alone
  vggish    VGGish per clip (as the stage called it before) against one call of all (now)
  text      the title encoder (a BERT-base-sized model) in the run's precision
  accuracy  GPU fp16/bf16/fp32 against CPU fp32: ResNet-50 rows (max relative error, cosine),
            VGGish quantised values (mismatches)
  oom       the out-of-memory back-off: a call made too large for the GPU, halved
  ray       `vpipe features --engine ray` (a local one-GPU cluster) against the local engine
  train     the trainer's seconds per epoch on CPU and CUDA (lstm, attention, caption), and a
            CPU run resumed on CUDA

    .venv/bin/python benchmarks/gpu.py [--only env models ...] [--out FILE] [--work DIR]

On a machine without a usable CUDA device it stops at once with one line saying so (and why,
when an NVIDIA driver is there) and exits 1; nothing else is measured.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # synth, caption_synth
sys.path.insert(0, str(ROOT / "benchmarks"))  # features (make_frames)

GOAL_FPS, GOAL_SHARE = 5000.0, 0.8
SECTIONS = ("env", "models", "loader", "features", "vggish", "text", "accuracy", "oom", "ray",
            "train")


def rate(call: Callable[[], Any], items: int, seconds: float = 1.0) -> float:
    """Items/s of ``call`` (synchronised), after one warm-up call."""
    import torch

    call()
    torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while n == 0 or time.perf_counter() - t0 < seconds:
        call()
        n += items
    torch.cuda.synchronize()
    return round(n / (time.perf_counter() - t0), 1)


def env() -> dict[str, Any]:
    import torch

    from pipeline.device import describe_device, pick_device, pick_precision

    dev = pick_device("auto")
    return {"torch": torch.__version__, **describe_device(dev),
            "auto_device": str(dev), "auto_precision": pick_precision("auto", dev)}


# --------------------------------------------------------------------------- models alone


def clip_folder(work: Path) -> Path:
    """A CLIP ViT-B/32-sized model (random weights) saved as a local hf: folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = work / "clip-b32"
    if not folder.exists():
        CLIPModel(CLIPConfig()).save_pretrained(folder)
        CLIPImageProcessor().save_pretrained(folder)
    return folder


def image_encoders(name: str, precision: str, batch: int, compile_: bool = False,
                   device: str = "cuda"):
    from pipeline.features import FeatureOptions, load_encoders

    weights = "imagenet" if name.startswith("hf:") else "none"  # hf: brings its own
    opts = FeatureOptions(image_model=name, image_weights=weights, audio_model="none",
                          device=device, precision=precision, batch_size=batch, compile=compile_)
    return load_encoders(opts)


def model_alone(enc, batch: int, seconds: float = 1.0) -> dict[str, Any]:
    """frames/s and peak GiB of the image model as the stage calls it, on uint8 frames."""
    import torch

    crop = enc.image.preprocessing.crop_size
    x = torch.randint(0, 256, (batch, 3, crop, crop), dtype=torch.uint8).pin_memory()
    torch.cuda.reset_peak_memory_stats()
    fps = rate(lambda: enc._embed_call(x), batch, seconds)
    return {"frames_per_s": fps, "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def models(work: Path) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {}
    names = ["resnet50", "vit_b_16", f"hf:{clip_folder(work)}"]
    precisions = ["fp16"] + (["bf16"] if torch.cuda.get_device_capability() >= (8, 0) else [])
    for name in names:
        for prec in precisions:
            for batch in (32, 64, 128, 256):
                enc = image_encoders(name, prec, batch)  # cudnn.benchmark on (the stage's)
                key = f"{name.split('/')[-1]} {prec} b{batch}"
                out[key] = model_alone(enc, batch)
                if name == "resnet50":
                    torch.backends.cudnn.benchmark = False
                    out[key + " no-cudnn-benchmark"] = model_alone(enc, batch)
                print(f"  models {key}: {out[key]}", flush=True)
                del enc
                torch.cuda.empty_cache()
    for prec in precisions:  # --compile: one size; its compile time counted apart
        t0 = time.perf_counter()
        enc = image_encoders("resnet50", prec, 128, compile_=True)
        first = model_alone(enc, 128, seconds=0.1)
        out[f"resnet50 {prec} b128 compiled"] = {
            **model_alone(enc, 128), "compile_and_first_s": round(time.perf_counter() - t0, 1),
            "first_round": first}
        print(f"  models resnet50 {prec} compiled: {out[f'resnet50 {prec} b128 compiled']}")
    return out


# --------------------------------------------------------------------------- the loader


def make_jpegs(folder: Path, frames: int, unique: int = 200, per_clip: int = 250) -> Path:
    """An extract-frames folder of ``frames`` 720p JPEGs in clips of ``per_clip``: ``unique``
    made (benchmarks/features.py's smooth content plus noise), the rest copies of them
    (decoding costs the same)."""
    from features import make_frames  # benchmarks/features.py

    from pipeline.records import Run

    if (folder / "manifest.jsonl").exists():
        return folder
    seed = folder.parent / (folder.name + "-seed")
    if not seed.exists():
        make_frames(seed, n_clips=1, per_clip=unique, size=(1280, 720))
    src = sorted((seed / "bench_0" / "frames").glob("*.jpg"))
    run = Run(folder, "extract-frames", {"benchmark": True, "size": [1280, 720]}).open()
    for c in range(max(1, frames // per_clip)):
        d = folder / f"c{c}" / "frames"
        d.mkdir(parents=True)
        for i in range(per_clip):
            shutil.copyfile(src[(c * per_clip + i) % len(src)], d / f"{i:06d}.jpg")
        run.record({"id": f"c{c}", "source": "bench", "start": 0.0, "end": float(per_clip),
                    "n_frames": per_clip, "timestamps": [float(i) for i in range(per_clip)],
                    "frames_dir": f"c{c}/frames", "frame_format": "jpg", "has_audio": False,
                    "audio": None, "sample_rate": 16000, "n_samples": 0})
    run.close()
    return folder


def make_video(work: Path) -> Path:
    import synth

    d = work / "videos"
    if not (d / "v720.mp4").exists():
        d.mkdir(parents=True, exist_ok=True)
        synth.make_video(d / "v720.mp4", duration_s=60.0, fps=25, size=(1280, 720))
    return d


def loader_alone(inputs: Path, workers: int, from_video: bool) -> float:
    """Frames/s of the loader's batches with no model (the stage's source and decoding)."""
    import dataclasses

    from pipeline.features import FeatureOptions, load_encoders
    from pipeline.features.sources import Decoding, source_for

    opts = FeatureOptions(image_model="resnet50", image_weights="none", audio_model="none",
                          device="cuda", batch_size=256, workers=workers, from_video=from_video,
                          fps=25.0 if from_video else None)
    enc = load_encoders(opts)
    source = source_for([inputs], opts)
    jobs = source.clips()
    for job in jobs:
        source.prepare(job)
    t0, n = time.perf_counter(), 0
    for batch in source.batches(jobs, Decoding.of(enc), dataclasses.replace(opts)):
        n += int(batch.images.shape[0])
    return round(n / (time.perf_counter() - t0), 1)


def loader(work: Path) -> dict[str, Any]:
    jpegs = make_jpegs(work / "jpegs-5k", 5000)
    videos = make_video(work)
    out = {}
    for w in (4, 8, 15):
        out[f"jpeg720 w{w}"] = loader_alone(jpegs, w, False)
        out[f"video720 w{w}"] = loader_alone(videos, w, True)
        print(f"  loader {w} workers: {out[f'jpeg720 w{w}']} (jpeg), "
              f"{out[f'video720 w{w}']} (video) frames/s", flush=True)
    return out


# --------------------------------------------------------------------------- end to end


class Utilisation:
    """GPU utilisation (%) sampled every 0.5 s by nvidia-smi while the block runs."""

    def __enter__(self) -> Utilisation:
        self.samples: list[float] = []
        self.proc = None
        if shutil.which("nvidia-smi"):
            import torch

            self.proc = subprocess.Popen(
                ["nvidia-smi", f"--id={torch.cuda.current_device()}",
                 "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "500"],
                stdout=subprocess.PIPE, text=True)
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.strip().isdigit():
                self.samples.append(float(line))

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()

    def report(self) -> dict[str, Any] | None:
        if not self.samples:
            return None
        s = np.asarray(self.samples)
        return {"mean": round(float(s.mean()), 1), "median": float(np.median(s)), "n": len(s)}


def vpipe(*args: str) -> float:
    """Seconds of one `vpipe` command (a whole process)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline", *args], check=True, cwd=ROOT)
    return time.perf_counter() - t0


def features(work: Path, alone: dict[str, Any]) -> dict[str, Any]:
    frames = 20_000
    media = make_jpegs(work / "jpegs-20k", frames)
    out = work / "features-20k"
    shutil.rmtree(out, ignore_errors=True)
    with Utilisation() as gpu:
        seconds = vpipe("features", str(media), "-o", str(out), "--image-model", "resnet50",
                        "--image-weights", "none", "--audio-model", "none", "-q")
    info = json.loads((out / "vpipe.json").read_text())
    fps = round(frames / seconds, 1)
    prec = info["params"]["precision"]
    best = max((v["frames_per_s"] for k, v in alone.items()
                if k.startswith(f"resnet50 {prec} ") and "compiled" not in k), default=None)
    share = round(fps / best, 3) if best else None
    return {"frames": frames, "seconds": round(seconds, 1), "frames_per_s": fps,
            "precision": prec, "model_alone_best": best, "share_of_model_alone": share,
            "goal": f">= {GOAL_FPS:.0f} frames/s and >= {GOAL_SHARE} of the model alone",
            "goal_met": bool(fps >= GOAL_FPS and (share or 0) >= GOAL_SHARE),
            "gpu_utilisation": gpu.report(), "throughput": info.get("throughput"),
            "model_batch": info.get("model_batch"), "device": info.get("device")}


# --------------------------------------------------------------------------- audio and text


def random_vggish():
    """VGGish with seeded random weights and a random PCA (the tests' way)."""
    import torch
    from torchvggish.torchvggish import VGG, make_layers

    from pipeline.features.encoders.vggish import AudioEncoder
    from pipeline.features.weights import WeightsInfo

    torch.manual_seed(1)
    g = np.random.default_rng(2)
    pca = (torch.as_tensor(g.standard_normal((128, 128)) * 0.1).float(),
           torch.as_tensor(g.standard_normal((128, 1))).float())
    info = WeightsInfo(kind="random", name="random")
    return AudioEncoder(VGG(make_layers(), postprocess=False).eval(), info, pca, info)


def vggish() -> dict[str, Any]:
    """25 clips of 10 examples: one call each (the stage today) against one call of all."""
    import torch

    enc = random_vggish().to(torch.device("cuda"))
    clips = [torch.randn(10, 1, 96, 64) for _ in range(25)]
    out = {}
    for prec, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        with torch.autocast("cuda", dtype=dtype):
            out[f"{prec} per clip"] = rate(lambda: [enc.embed(c.cuda()) for c in clips], 250)
            out[f"{prec} batched"] = rate(lambda: enc.embed(torch.cat(clips).cuda()), 250)
    print(f"  vggish examples/s: {out}", flush=True)
    return out


def text() -> dict[str, Any]:
    """A BERT-base-sized encoder (random) on 256 titles of 24 tokens, in autocast."""
    import torch
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig()).eval().cuda()
    ids = torch.randint(1000, 20000, (256, 24), device="cuda")
    mask = torch.ones_like(ids)
    out = {}
    for prec, dtype in (("fp32", None), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        with torch.inference_mode(), torch.autocast("cuda", dtype=dtype or torch.float32,
                                                    enabled=dtype is not None):
            out[prec] = rate(lambda: model(input_ids=ids, attention_mask=mask), 256)
    print(f"  text titles/s: {out}", flush=True)
    return out


# --------------------------------------------------------------------------- accuracy


def image_rows(device: str, precision: str, x) -> np.ndarray:
    """ResNet-50 rows (seeded random weights, as the stage builds the model) of uint8 ``x``."""
    import torch

    from pipeline.features import FeatureOptions, load_encoders

    torch.manual_seed(0)
    enc = load_encoders(FeatureOptions(image_model="resnet50", image_weights="none",
                                       audio_model="none", device=device, precision=precision))
    return enc._embed_call(x)


def accuracy() -> dict[str, Any]:
    """GPU rows in fp32/fp16/bf16 against CPU fp32: ResNet-50 and VGGish (quantised)."""
    import torch

    x = torch.randint(0, 256, (64, 3, 224, 224), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0))
    ref = image_rows("cpu", "fp32", x)
    ex = torch.randn(200, 1, 96, 64, generator=torch.Generator().manual_seed(1))
    cpu_audio = random_vggish().embed(ex)
    gpu_audio = random_vggish().to(torch.device("cuda"))
    out: dict[str, Any] = {}
    precs = ["fp32", "fp16"] + (["bf16"] if torch.cuda.get_device_capability() >= (8, 0)
                                else [])
    for prec in precs:
        got = image_rows("cuda", prec, x)
        cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(prec)
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            audio = gpu_audio.embed(ex.cuda())
        out[prec] = {
            "image_max_rel_error": float(np.abs(got - ref).max() / np.abs(ref).max()),
            "image_min_cosine": float(cos.min()),
            "vggish_quantised_mismatch": float((audio != cpu_audio).mean()),
            "vggish_max_steps": float(np.abs(audio - cpu_audio).max()),
        }
        print(f"  accuracy {prec}: {out[prec]}", flush=True)
    return out


def oom() -> dict[str, Any]:
    """A call needing twice the free memory at 8 items: halved to a size that fits."""
    import torch

    from pipeline.features.batching import ModelBatch

    free, _ = torch.cuda.mem_get_info()
    per_item = free // 3

    def call(x):
        held = torch.empty(int(x.shape[0]) * per_item, dtype=torch.uint8, device="cuda")
        del held
        return x.numpy()

    batch = ModelBatch("cuda", size=8)
    t0 = time.perf_counter()
    batch.run(torch.zeros(64, 1), call)
    return {"size_used": batch.size, "out_of_memory_at": batch.out_of_memory,
            "seconds": round(time.perf_counter() - t0, 3), "ok": batch.size == 2}


# --------------------------------------------------------------------------- ray and train


def ray(work: Path) -> dict[str, Any]:
    """`vpipe features` on 5k 720p JPEGs: the local engine against --engine ray, whose local
    cluster (started by vpipe) has this machine's one GPU."""
    media = make_jpegs(work / "jpegs-5k", 5000)
    out = {}
    for engine in ("local", "ray"):
        dest = work / f"features-{engine}"
        shutil.rmtree(dest, ignore_errors=True)
        seconds = vpipe("features", str(media), "-o", str(dest), "--image-model", "resnet50",
                        "--image-weights", "none", "--audio-model", "none", "-q",
                        "--engine", engine)
        out[engine] = {"seconds": round(seconds, 1), "frames_per_s": round(5000 / seconds, 1)}
    # Which device each actor chose, and the decode tasks and bytes in flight the run sized.
    info = json.loads((work / "features-ray" / "vpipe.json").read_text()).get("engine", {})
    out["ray"].update(actors=info.get("actors"), decode=info.get("decode"))
    print(f"  ray: {out}", flush=True)
    return out


def epoch_seconds(folder: Path, labels: Path, out: Path, device: str, **cfg: Any) -> float:
    from pipeline.train import TrainConfig, train

    shutil.rmtree(out, ignore_errors=True)
    train(folder, labels, out, TrainConfig(device=device, epochs=3, patience=3, **cfg),
          quiet=True)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return round(float(np.median([json.loads(x)["seconds"] for x in lines[1:]])), 3)


def train(work: Path) -> dict[str, Any]:
    from caption_synth import make_caption_set

    from pipeline.train import TrainConfig
    from pipeline.train import train as run_train
    from pipeline.train.synthetic import make_feature_set

    cls, cap = work / "train-cls", work / "train-cap"
    for d in (cls, cap):
        shutil.rmtree(d, ignore_errors=True)
    cls_labels, _ = make_feature_set(cls, "multilabel", n_sources=2000, dim=2048, seed=0)
    cap_labels = make_caption_set(cap, per_combo=20)[0]
    out: dict[str, Any] = {}
    for device in ("cpu", "cuda"):
        for model in ("lstm", "attention"):
            out[f"{model} {device}"] = epoch_seconds(cls, cls_labels, work / "t", device,
                                                     model=model, hidden=256)
        out[f"caption {device}"] = epoch_seconds(cap, cap_labels, work / "t", device,
                                                 task="caption")
        print(f"  train seconds/epoch: {out}", flush=True)
    run = work / "resume"
    shutil.rmtree(run, ignore_errors=True)
    base = dict(model="attention", hidden=256, dropout=0.3)
    run_train(cls, cls_labels, run, TrainConfig(device="cpu", epochs=1, **base), quiet=True)
    s = run_train(cls, cls_labels, run, TrainConfig(device="cuda", epochs=2, **base),
                  resume=True, quiet=True)
    out["resume cpu->cuda"] = {"epochs_run": s["epochs_run"], "ok": s["epochs_run"] == 2}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--out", type=Path, default=Path("gpu-benchmark.json"))
    ap.add_argument("--work", type=Path, default=None, help="kept (default: a temp folder)")
    a = ap.parse_args(argv)
    import torch

    from pipeline.device import cuda_unusable_reason

    if not torch.cuda.is_available():
        why = cuda_unusable_reason()
        print(f"benchmarks/gpu.py: no CUDA device{f' ({why})' if why else ''}; nothing measured",
              file=sys.stderr)
        return 1
    work = a.work or Path(tempfile.mkdtemp(prefix="vpipe-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"env": env()}
    print(f"env: {results['env']}", flush=True)
    steps: dict[str, Callable[[], Any]] = {
        "models": lambda: models(work),
        "loader": lambda: loader(work),
        "features": lambda: features(work, results.get("models", {})),
        "vggish": vggish, "text": text, "accuracy": accuracy, "oom": oom,
        "ray": lambda: ray(work),
        "train": lambda: train(work),
    }
    for name, step in steps.items():
        if name not in a.only:
            continue
        t0 = time.perf_counter()
        try:
            results[name] = step()
        except Exception as e:  # one section failing must not lose the others' figures
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"{name} ({time.perf_counter() - t0:.0f} s): {results[name]}", flush=True)
        a.out.write_text(json.dumps(results, indent=1) + "\n")  # after each section
    if a.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print(f"written: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
