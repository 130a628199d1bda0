"""Benchmark: where the wav -> log-mel step of frame folders runs, side by side in one run.

`vpipe features` on extract-frames folders reads each clip's wav into VGGish's log-mel
examples. It used to do so in the process that runs the models, when the batch holding the
clip's last frame came out of the loader; it now does so in the loader worker that decodes that
frame. This runs the features stage both ways on the same folders (the old way by a source
that hands the loader no audio input and reads the wavs itself, as the old code did), --pairs
rounds alternating, and prints frames/s, the main process's CPU seconds and the ratio; the two
feature stores must be equal, array for array. Weights are random (resnet18, raw VGGish): the
speed is the published ones'. Clips default to the LRCN set-up: 30 s of audio and 20 frames
(every 45th at 30 fps) each::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/wav_workers.py [--clips 24] [--pairs 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from features import make_frames  # noqa: E402


def add_audio(folder: Path, seconds: float) -> None:
    """A 16 kHz s16 wav of ``seconds`` in each clip of ``folder``, recorded in its manifest."""
    import json

    import soundfile as sf

    rng = np.random.default_rng(1)
    lines = []
    for line in (folder / "manifest.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("status") == "ok":
            n = int(seconds * 16000)
            t = np.arange(n) / 16000
            wave = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(n)
            sf.write(folder / rec["id"] / "audio.wav", (wave * 32767).astype(np.int16), 16000,
                     subtype="PCM_16")
            rec.update(has_audio=True, audio=f"{rec['id']}/audio.wav", n_samples=n)
        lines.append(json.dumps(rec))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")


def main_process_wavs():
    """A frame-folder source that reads the wavs in this process, as before the change."""
    from pipeline.features.sources import FrameFolders, clip_audio

    class MainProcessWavs(FrameFolders):
        def batches(self, jobs, dec, opts):
            audio = dec.audio
            for b in super().batches(jobs, dataclasses.replace(dec, audio=None), opts):
                b.done = [(j, *clip_audio(jobs[j], audio)) if err is None else (j, ex, err)
                          for j, ex, err in b.done]
                yield b

    return MainProcessWavs


def run(media: Path, out: Path, opts, old: bool) -> tuple[float, float]:
    """Seconds of one `extract_features` call and this process's CPU seconds in it."""
    from pipeline.features import extract_features, stage

    source_for = stage.source_for
    if old:
        stage.source_for = lambda inputs, o: main_process_wavs()(inputs)
    try:
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        extract_features([media], out, opts, quiet=True)
        dt = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        stage.source_for = source_for
    return dt, (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)


def same_features(a: Path, b: Path) -> bool:
    from pipeline.shards import open_features

    with open_features(a) as x, open_features(b) as y:
        return x.clip_ids == y.clip_ids and all(
            np.array_equal(x[c].image, y[c].image) and np.array_equal(x[c].audio, y[c].audio)
            for c in x.clip_ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clips", type=int, default=24)
    ap.add_argument("--frames", type=int, default=20, help="per clip")
    ap.add_argument("--audio-s", type=float, default=30.0, help="seconds of audio per clip")
    ap.add_argument("--size", default="455x256")
    ap.add_argument("--workers", type=int, default=1, help="loader workers")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--pairs", type=int, default=2)
    a = ap.parse_args()
    from pipeline.features.options import FeatureOptions

    w, h = (int(v) for v in a.size.split("x"))
    work = Path(tempfile.mkdtemp(prefix="wav-workers-"))
    try:
        media = make_frames(work / "media", a.clips, a.frames, (w, h))
        add_audio(media, a.audio_s)
        opts = FeatureOptions(image_model="resnet18", image_weights="none",
                              audio_weights="none", audio_postprocess=False, device="cpu",
                              precision="fp32", batch_size=a.batch_size, workers=a.workers)
        n = a.clips * a.frames
        print(f"{a.clips} clips x {a.frames} frames ({w}x{h} JPEG) + {a.audio_s:g} s wav, "
              f"resnet18 + VGGish (random), batch {a.batch_size}, {a.workers} loader worker(s)")
        res: dict[str, list[tuple[float, float]]] = {"main process": [], "loader workers": []}
        for r in range(a.pairs):
            for name, old in (("main process", True), ("loader workers", False)):
                out = work / f"{name.split()[0]}-{r}"
                res[name].append(run(media, out, opts, old))
            if not same_features(work / f"main-{r}", work / f"loader-{r}"):
                raise SystemExit("the two feature stores differ")
        print(f"{'log-mel in':<16}{'frames/s (best)':>16}{'main CPU s (min)':>18}")
        for name, runs in res.items():
            best, cpu = min(dt for dt, _ in runs), min(c for _, c in runs)
            print(f"{name:<16}{n / best:>16.1f}{cpu:>18.2f}")
        ratio = [o[0] / nw[0] for o, nw in zip(res["main process"], res["loader workers"],
                                                strict=True)]
        print("loader workers / main process, speed, each round: "
              + ", ".join(f"{x:.2f}x" for x in ratio) + "; feature stores equal")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
