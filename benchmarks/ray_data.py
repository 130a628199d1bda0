"""Why `features --engine ray` uses plain tasks and actors, not Ray Data: the two side by side.

    PYTHONPATH=DIR_WITH_PYARROW_AND_PANDAS .venv/bin/python benchmarks/ray_data.py [--clips 24]

Ray Data needs ``ray[data]`` (pyarrow and pandas, not in vpipe's install). Both ways run
vpipe's own pieces on the same local Ray cluster (this machine's cores) over the same
extract-frames folder (synthetic 224 px JPEG frames, 10 a clip), resnet18 in fp32 with seeded
random weights: chunks of clips decoded by :func:`~pipeline.features.on_ray.decode_chunk` in
CPU tasks, embedded by an actor that loaded the encoders once. (a) is ``vpipe features --engine
ray`` end to end (shards, index and manifest written); (b) is the same decode and embed as a
Ray Data pipeline, ``from_items(chunks).map_batches(decode).map_batches(Embedder,
concurrency=1)``, iterated to the end without writing anything (what it would still have to
add). The local engine is printed as the reference; each Ray way is timed --repeat times,
alternated, and the best kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def make_frames(folder: Path, n_clips: int, per_clip: int) -> Path:
    from test_features import make_media

    return make_media(folder, {f"c_{i}": (per_clip, None) for i in range(n_clips)},
                      size=(298, 224))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", type=int, default=24)
    ap.add_argument("--frames", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args(argv)
    import ray
    import ray.data

    from pipeline.cli import main as vpipe
    from pipeline.features.encoders.loaded import load_encoders
    from pipeline.features.on_ray import chunks, decode_chunk
    from pipeline.features.options import FeatureOptions
    from pipeline.features.sources import Decoding, source_for

    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="vpipe-raydata-"))
    try:
        media = make_frames(work / "media", a.clips, a.frames)
        common = ["--image-model", "resnet18", "--image-weights", "none", "--audio-model",
                  "none", "--precision", "fp32", "--shard-size", "4", "-q"]
        t0 = time.perf_counter()
        assert vpipe(["features", str(media), "-o", str(work / "local"), *common]) == 0
        local_s = time.perf_counter() - t0

        ray.init(num_cpus=cores, include_dashboard=False, logging_level="error")
        ray.get(ray.remote(lambda: 0).remote())
        ray.data.DataContext.get_current().enable_progress_bars = False

        opts = FeatureOptions(image_model="resnet18", image_weights="none", audio_model="none",
                              precision="fp32", device="cpu", shard_size=4)
        source = source_for([media], opts)
        jobs = source.clips()
        for job in jobs:
            source.prepare(job)
        groups = chunks(jobs, opts.shard_size, None)
        dec = dataclasses.replace(Decoding.of(load_encoders(opts)), pin_memory=False)

        def decode(batch: dict) -> dict:
            out = [decode_chunk(source, [jobs[j] for j in g], dec, opts)
                   for g in batch["chunk"]]
            return {"batches": np.array(out, dtype=object), "chunk": batch["chunk"]}

        class Embedder:
            def __init__(self) -> None:
                import torch

                torch.set_num_threads(max(1, cores - 1))
                self.enc = load_encoders(opts)

            def __call__(self, batch: dict) -> dict:
                from pipeline.features.embed import embed_batches

                rows = []
                for g, bs in zip(batch["chunk"], batch["batches"], strict=True):
                    members = [dataclasses.replace(jobs[j], rows=[], times=[]) for j in g]
                    rows.append(sum(c.image.shape[0] for _, c, e in
                                    embed_batches(bs, members, self.enc) if e is None))
                return {"frames": np.array(rows)}

        def with_data() -> int:
            ds = ray.data.from_items([{"chunk": g} for g in groups])
            ds = ds.map_batches(decode, batch_size=1, num_cpus=1)
            ds = ds.map_batches(Embedder, batch_size=1, concurrency=1,
                                num_cpus=max(0, cores - 1))
            return sum(int(r["frames"]) for r in ds.iter_rows())

        # Alternated, best of --repeat each: this machine is noisy.
        tasks_s = data_s = float("inf")
        for k in range(a.repeat):
            t0 = time.perf_counter()
            assert vpipe(["features", str(media), "-o", str(work / f"ray{k}"), *common,
                          "--engine", "ray"]) == 0
            tasks_s = min(tasks_s, time.perf_counter() - t0)
            t0 = time.perf_counter()
            frames = with_data()
            data_s = min(data_s, time.perf_counter() - t0)
        ray.shutdown()
        n = a.clips * a.frames
        assert frames == n, (frames, n)
        print(f"{a.clips} clips x {a.frames} frames (224x298 JPEG), resnet18 fp32, {cores} cores,"
              f" {len(groups)} chunks")
        print(f"{'local engine':<34}{local_s:>7.2f} s  {n / local_s:>6.1f} frames/s")
        print(f"{'tasks + actor (vpipe --engine ray)':<34}{tasks_s:>7.2f} s  {n / tasks_s:>6.1f}"
              f" frames/s  (shards written)")
        print(f"{'Ray Data map_batches + actor':<34}{data_s:>7.2f} s  {n / data_s:>6.1f}"
              f" frames/s  (nothing written)   Data/tasks time {data_s / tasks_s:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
