"""Benchmark: does `vpipe export`'s memory stay flat as the feature store grows?

    .venv/bin/python benchmarks/export_memory.py [--sizes 1000 5000] [--formats npz npy parquet
        webdataset] [--shard-size 256] [--work DIR]

For each store size (synthetic: ShardWriter with random arrays, 16 image rows of 256 floats,
4 audio rows of 128 and 8 text rows of 32 per clip, 256 clips a shard) and each format, one
process exports the whole store and reports:

- ``traced peak``: the peak of Python's own allocations during the export (tracemalloc: NumPy
  arrays, lists, dicts, the manifest's records), above what the process held before it;
- ``arrow peak``: the peak of pyarrow's memory pool (its buffers are not traced by tracemalloc);
- ``RSS growth``: the process's peak resident size (ru_maxrss) minus its size after the
  imports, before the export: everything, HDF5's and the C libraries' buffers included.

Target: the figures at the large size within 1.5x of the small one, far below the store's size
(memory holds one clip, or one group of ``--shard-size`` clips, never the store). What does grow
with the store is the bookkeeping every stage keeps (the index's columns, the list of work items,
the manifest's records: well under 1 KB a clip), which the per-clip figure below shows.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ("npz", "npy", "parquet", "webdataset")
ROWS = {"image": (16, 256), "audio": (4, 128), "text": (8, 32)}
CLIPS_A_SHARD = 256


def make_store(folder: Path, n: int, seed: int = 0) -> int:
    """A feature folder of ``n`` synthetic clips; returns its size in bytes."""
    from pipeline.shards import ClipFeatures, ShardWriter, rebuild_index, shard_name

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    (ti, di), (ta, da), (tt, dt) = ROWS["image"], ROWS["audio"], ROWS["text"]
    writer = None
    for k in range(n):
        if k % CLIPS_A_SHARD == 0:
            if writer is not None:
                writer.close()
            writer = ShardWriter(folder / shard_name(k // CLIPS_A_SHARD), image_dim=di,
                                 audio_dim=da, text_dim=dt, attrs={})
        writer.add(ClipFeatures(
            f"src{k // 4:06d}_{k % 4}", f"src{k // 4:06d}", 0.0, 8.0,
            rng.standard_normal((ti, di), np.float32), np.arange(ti) * 0.5,
            rng.standard_normal((ta, da), np.float32), np.arange(ta) * 0.96,
            rng.standard_normal((tt, dt), np.float32), "a title"))
    writer.close()
    rebuild_index(folder)
    return sum(p.stat().st_size for p in folder.iterdir())


def child(store: str, out: str, fmt: str, shard_size: int) -> None:
    """One export in this process; prints its figures as JSON."""
    import tracemalloc

    from pipeline.export import ExportOptions, export_features
    from pipeline.export.tables import require

    require(fmt)  # the library's import is not the export's memory
    if fmt in ("parquet", "webdataset"):
        import pyarrow  # noqa: F401  (imported in both, so RSS baselines compare)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    t0 = time.perf_counter()
    export_features(store, out, ExportOptions(fmt, shard_size=shard_size), quiet=True)
    seconds = time.perf_counter() - t0
    _, traced = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    arrow = 0
    if "pyarrow" in sys.modules:
        arrow = sys.modules["pyarrow"].default_memory_pool().max_memory() or 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "traced": traced, "arrow": arrow,
                      "rss_growth": (peak - before) * 1024}))


def measure(store: Path, out: Path, fmt: str, shard_size: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(store), str(out), fmt, str(shard_size)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2",
                              "PATH": "/usr/bin:/bin"})
    if res.returncode:
        raise SystemExit(f"{fmt} export failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000])
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    ap.add_argument("--shard-size", type=int, default=CLIPS_A_SHARD,
                    help="clips per parquet file / tar shard")
    ap.add_argument("--work", type=Path, help="keep the stores and exports here")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        store, out, fmt, size = args.child
        child(store, out, fmt, int(size))
        return
    sys.path.insert(0, str(ROOT))
    work = args.work or Path(tempfile.mkdtemp(prefix="vpipe-export-mem-"))
    mb = 1 / 2**20
    print("| format | clips | store MB | s | traced peak MB | arrow peak MB | RSS growth MB |")
    print("|---|---|---|---|---|---|---|")
    rows = {}
    try:
        for n in args.sizes:
            store = work / f"store-{n}"
            size = make_store(store, n)
            for fmt in args.formats:
                r = measure(store, work / f"out-{n}-{fmt}", fmt, args.shard_size)
                rows[fmt, n] = r
                print(f"| {fmt} | {n} | {size * mb:.1f} | {r['seconds']:.1f} | "
                      f"{r['traced'] * mb:.1f} | {r['arrow'] * mb:.1f} | "
                      f"{r['rss_growth'] * mb:.1f} |", flush=True)
                shutil.rmtree(work / f"out-{n}-{fmt}", ignore_errors=True)
        small, large = min(args.sizes), max(args.sizes)
        for fmt in args.formats:
            a, b = rows[fmt, small], rows[fmt, large]
            per_clip = (b["traced"] - a["traced"]) / (large - small)
            print(f"{fmt}: traced peak x{b['traced'] / max(a['traced'], 1):.2f}, RSS growth "
                  f"x{b['rss_growth'] / max(a['rss_growth'], 1):.2f} for x{large / small:g} "
                  f"clips ({per_clip:.0f} traced bytes per added clip)")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
