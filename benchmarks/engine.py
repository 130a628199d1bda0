"""Throughput of `--engine ray` against the local engine, stage by stage, side by side in one run.

    .venv/bin/python benchmarks/engine.py [--videos 8] [--duration 20] [--work DIR] [--keep]

Synthetic frame-numbered videos (320x240, 25 fps, a tone) through ``vpipe subclip`` (3 x 5 s
exact clips each), ``extract-frames --fps 2 --size 224`` and ``features`` (resnet18 with seeded
random weights, fp32, no audio model: the weights' values do not change the cost), run three
ways in this process: the local engine (``--workers`` = cores for the media stages, features'
default), Ray on a one-node cluster of
this machine's cores, and Ray on a two-node ``ray.cluster_utils.Cluster`` that splits the same
cores between two raylets (the multi-node path's overhead; it cannot add hardware). Cluster
start-up is timed apart from the stages. Every Ray output is checked equal to the local one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def make_videos(folder: Path, n: int, duration: float) -> Path:
    import synth

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        synth.make_video(folder / f"t{i:02d}.mp4", duration_s=duration, size=(320, 240),
                         beeps_at=(1.0 + i % 5,), color=(20 * i % 255, 120, 200))
    return folder


def stages(videos: Path, out: Path, engine: list[str]) -> list[tuple[str, list[str]]]:
    media_only = {"--workers", str(os.cpu_count() or 1)}
    clips, media, feats = out / "clips", out / "media", out / "features"
    return [
        ("subclip", ["subclip", str(videos), "-o", str(clips), "--count", "3", "--duration", "5",
                     "--start", "1", *engine]),
        ("extract-frames", ["extract-frames", str(clips), "-o", str(media), "--fps", "2",
                            "--size", "224", *engine]),
        # features' own default --workers (cores - 1 decoding processes) for the local engine
        ("features", ["features", str(media), "-o", str(feats), "--image-model", "resnet18",
                      "--image-weights", "none", "--audio-model", "none", "--precision", "fp32",
                      "--shard-size", "8", *[w for w in engine if w not in media_only]]),
    ]


def run_all(videos: Path, out: Path, engine: list[str]) -> dict[str, float]:
    from pipeline.cli import main

    times = {}
    for name, argv in stages(videos, out, engine):
        t0 = time.perf_counter()
        code = main([*argv, "-q"])
        times[name] = time.perf_counter() - t0
        if code != 0:
            raise SystemExit(f"{name} exited {code}")
    return times


def same(local: Path, other: Path) -> bool:
    import numpy as np

    from pipeline.shards import open_features

    for stage in ("clips", "media"):
        a, b = local / stage, other / stage
        fa = {p.relative_to(a): p for p in a.rglob("*") if p.is_file()
              and p.name not in ("vpipe.json", "manifest.jsonl")}
        fb = {p.relative_to(b): p for p in b.rglob("*") if p.is_file()
              and p.name not in ("vpipe.json", "manifest.jsonl")}
        if sorted(fa) != sorted(fb) or any(fa[k].read_bytes() != fb[k].read_bytes() for k in fa):
            return False
    with open_features(local / "features") as x, open_features(other / "features") as y:
        return sorted(x.clip_ids) == sorted(y.clip_ids) and all(
            np.array_equal(x[c].image, y[c].image) for c in x.clip_ids)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--videos", type=int, default=8)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args(argv)
    import ray
    from ray.cluster_utils import Cluster

    cores = os.cpu_count() or 1
    work = a.work or Path(tempfile.mkdtemp(prefix="vpipe-engine-"))
    try:
        videos = make_videos(work / "videos", a.videos, a.duration)
        rows: dict[str, dict[str, float]] = {}
        rows["local"] = run_all(videos, work / "local", ["--workers", str(cores)])

        t0 = time.perf_counter()
        ray.init(num_cpus=cores, include_dashboard=False, logging_level="error")
        ray.get(ray.remote(lambda: 0).remote())  # a worker up, as a first task would need
        start_one = time.perf_counter() - t0
        rows["ray, 1 node"] = run_all(videos, work / "ray1", ["--engine", "ray"])
        ray.shutdown()

        t0 = time.perf_counter()
        half = max(1, cores // 2)
        cluster = Cluster(initialize_head=True,
                          head_node_args={"num_cpus": half, "include_dashboard": False})
        cluster.add_node(num_cpus=max(1, cores - half))
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="error")
        ray.get(ray.remote(lambda: 0).remote())
        start_two = time.perf_counter() - t0
        rows["ray, 2 nodes"] = run_all(videos, work / "ray2", ["--engine", "ray"])
        ray.shutdown()
        cluster.shutdown()

        from pipeline.records import read_manifest

        n = {"subclip": len(read_manifest(work / "local" / "clips")),
             "extract-frames": sum(r.get("n_frames", 0)
                                   for r in read_manifest(work / "local" / "media").values())}
        n["features"] = n["extract-frames"]
        units = {"subclip": "clips", "extract-frames": "frames", "features": "frames"}
        print(f"{a.videos} videos x {a.duration:g} s, 320x240; {cores} cores "
              f"({os.uname().machine}); cluster start: 1 node {start_one:.1f} s, "
              f"2 nodes {start_two:.1f} s")
        print(f"{'stage':<16}{'engine':<14}{'seconds':>9}{'per s':>9}  {'vs local':>8}")
        for stage in ("subclip", "extract-frames", "features"):
            base = rows["local"][stage]
            for eng, t in rows.items():
                print(f"{stage:<16}{eng:<14}{t[stage]:>9.2f}{n[stage] / t[stage]:>9.1f}  "
                      f"{base / t[stage]:>7.2f}x  ({n[stage]} {units[stage]})")
        tot = {eng: sum(t.values()) for eng, t in rows.items()}
        print("all three      " + "  ".join(f"{e}: {s:.2f} s ({tot['local'] / s:.2f}x)"
                                            for e, s in tot.items()))
        print("outputs equal to local:",
              {e: same(work / "local", work / d) for e, d in (("ray, 1 node", "ray1"),
                                                              ("ray, 2 nodes", "ray2"))})
    finally:
        if not a.keep and a.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
