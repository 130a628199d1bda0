"""Benchmark of vpipe's per-item costs as a dataset grows: is each one flat from 1k to 100k items?

    .venv/bin/python benchmarks/scale.py [--sizes 1000 10000 100000] [--only ROW ...] [--work DIR]

Rows, each timed in its own process (seconds, seconds per item, peak RSS of that process):

- ``runner``: ``run_items`` over N items with a trivial work function (each writes one small
  file that its record names), first run and a resume of the finished run;
- ``store``: ``open_features`` and reading every clip, shard by shard (iteration), and the
  same clips by id in shuffled order (random access);
- ``inspect``: ``vpipe inspect`` of the store (every shard's checksums verified);
- ``train`` / ``train-stream``: ``vpipe train --epochs 1`` to the end of its first epoch (one
  label per source, 4 clips a source; in RAM and ``--stream``), then the same command again
  (a finished run: reported, nothing trained);
- ``rerun``: ``vpipe run`` of a finished extract-frames -> features workflow again (every clip
  already done; its frame folders exist with the sizes recorded).

The stores are synthetic (ShardWriter with random arrays: 4 image rows of 64 floats and 2 audio
rows of 128 per clip, 256 clips a shard as ``vpipe features`` writes): the costs measured are
the bookkeeping around the features, not the models. Target: s/item at 100k within 1.5x of 1k.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("runner", "store", "inspect", "train", "train-stream", "rerun")
CLIPS_PER_SOURCE = 4
SHARD_SIZE = 256


# --------------------------------------------------------------------------- synthetic data


def clip_id(k: int) -> str:
    return f"src{k // CLIPS_PER_SOURCE:06d}_{k % CLIPS_PER_SOURCE}"


def make_store(folder: Path, n: int) -> None:
    """A feature folder of ``n`` clips, with its index, manifest and vpipe.json."""
    from pipeline.records import Run
    from pipeline.shards import ShardWriter, shard_name
    from pipeline.shards.index import rebuild_index
    from pipeline.shards.schema import ClipFeatures

    rng = np.random.default_rng(0)
    run = Run(folder, "features", {"synthetic": True}, outputs=lambda r: [r["shard"]]).open()
    attrs = {"image": {"model": "synthetic", "weights": "random", "layer": "none",
                       "preprocessing": "none", "sampling": "none"},
             "audio": {"model": "synthetic", "weights": "random", "sample_rate": 16000,
                       "window_s": 0.96, "hop_s": 0.96, "postprocess": False}}
    for s in range(0, n, SHARD_SIZE):
        w = ShardWriter(folder / shard_name(s // SHARD_SIZE), image_dim=64, audio_dim=128,
                        attrs=attrs)
        for k in range(s, min(n, s + SHARD_SIZE)):
            cid = clip_id(k)
            w.add(ClipFeatures(
                cid, cid.split("_")[0], 0.0, 2.0,
                rng.standard_normal((4, 64), dtype=np.float32), np.arange(4) * 0.5,
                rng.standard_normal((2, 128), dtype=np.float32), np.arange(2) * 0.96,
            ))
        rows = w.close()
        for r in rows:
            run.record_item(r["clip_id"], [{"id": r["clip_id"], "source": r["source"],
                                             **{k: r[k] for k in ("shard", "row")}}])
    run.close()
    rebuild_index(folder)


def make_labels(path: Path, n: int) -> None:
    sources = sorted({clip_id(k).split("_")[0] for k in range(n)})
    rng = random.Random(0)
    path.write_text("id,label\n" + "".join(f"{s},{rng.uniform(1, 5):.3f}\n" for s in sources),
                    encoding="utf-8")


def make_workflow(work: Path, n: int) -> Path:
    """A finished extract-frames -> features workflow over ``n`` clips: a subclip folder's
    manifest (the inputs), the extract-frames folder (a 1-frame folder per clip, as recorded),
    and the features folder."""
    from pipeline.frames import clip_outputs
    from pipeline.records import Run

    clips = work / "clips"
    run = Run(clips, "subclip", {"synthetic": True}).open()
    for s in range(0, n, CLIPS_PER_SOURCE):
        src = clip_id(s).split("_")[0]
        run.record_item(src, [
            {"id": clip_id(k), "source": src, "path": f"{src}/{clip_id(k)}.mp4",
             "start": 2.0 * (k - s), "end": 2.0 * (k - s + 1)}
            for k in range(s, min(n, s + CLIPS_PER_SOURCE))])
    run.close()
    media = work / "wf" / "extract-frames"
    # The parameters extract-frames records for these options, so the re-run resumes.
    from pipeline.frames import FrameOptions
    opts = FrameOptions(every=10, fps=None, audio=False)
    run = Run(media, "extract-frames", opts.params(), outputs=clip_outputs).open()
    for k in range(n):
        cid = clip_id(k)
        (media / cid / "frames").mkdir(parents=True)
        (media / cid / "frames" / "000000.jpg").write_bytes(b"\xff\xd8" + bytes(98))
        start = 2.0 * (k % CLIPS_PER_SOURCE)
        run.record_item(cid, [{"id": cid, "source": cid.split("_")[0], "start": start,
                               "end": start + 2.0, "n_frames": 1, "timestamps": [0.0],
                               "frames_dir": f"{cid}/frames", "frame_format": "jpg",
                               "has_audio": False, "audio": None}])
    run.close(item_order=[clip_id(k) for k in range(n)])
    wf = work / "scale.toml"
    wf.write_text(f'name = "scale"\ninputs = ["{clips}"]\nwork_dir = "{work / "wf"}"\n\n'
                  "[extract-frames]\nevery = 10\nno-audio = true\n\n"
                  '[features]\nimage-model = "resnet18"\nimage-weights = "none"\n'
                  'audio-model = "none"\n', encoding="utf-8")
    return wf


# --------------------------------------------------------------------------- one measurement


def _trivial(item, out: Path) -> dict:
    (out / f"{item.id}.bin").write_bytes(b"x" * 64)
    return {"id": item.id, "file": f"{item.id}.bin"}


def measure(row: str, n: int, data: Path) -> dict[str, float]:
    """Run one row in this process; returns named timings in seconds."""
    import functools

    from pipeline.cli import main

    t: dict[str, float] = {}
    if row == "runner":
        from pipeline.records import Run
        from pipeline.runner import Item, run_items

        out = data / "runner"
        shutil.rmtree(out, ignore_errors=True)
        items = [Item(f"item{k}", f"in/{k}") for k in range(n)]
        work = functools.partial(_trivial, out=out)
        for name in ("first run", "resume"):
            t0 = time.perf_counter()
            run_items(Run(out, "bench", {}, outputs=lambda r: [r["file"]]).open(), items, work,
                      quiet=True)
            t[name] = time.perf_counter() - t0
    elif row == "store":
        from pipeline.shards import open_features

        t0 = time.perf_counter()
        store = open_features(data / "features")
        t["open"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        frames = sum(c.n("image") for c in store)
        t["read all (iteration)"] = time.perf_counter() - t0
        assert frames == 4 * n, frames
        ids = store.clip_ids
        random.Random(0).shuffle(ids)
        t0 = time.perf_counter()
        for cid in ids:
            store[cid]
        t["read all (by id, shuffled)"] = time.perf_counter() - t0
    elif row == "inspect":
        t0 = time.perf_counter()
        with open(os.devnull, "w") as null:
            saved, sys.stdout = sys.stdout, null
            try:
                code = main(["inspect", str(data / "features")])
            finally:
                sys.stdout = saved
        assert code == 0
        t["inspect"] = time.perf_counter() - t0
    elif row in ("train", "train-stream"):
        out = data / row
        shutil.rmtree(out, ignore_errors=True)
        args = ["train", str(data / "features"), "--labels", str(data / "labels.csv"), "-o",
                str(out), "--epochs", "1", "--hidden", "16", "--device", "cpu", "--quiet",
                *(["--stream"] if row == "train-stream" else [])]
        for name in ("train 1 epoch", "again (finished)"):
            t0 = time.perf_counter()
            assert main(args) == 0
            t[name] = time.perf_counter() - t0
    elif row == "rerun":
        t0 = time.perf_counter()
        assert main(["run", str(data / "scale.toml"), "--quiet"]) == 0
        t["vpipe run (finished)"] = time.perf_counter() - t0
    return t


def _child(row: str, n: int, data: Path) -> None:
    t = measure(row, n, data)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"timings": t, "peak_mb": peak}))


def run_child(row: str, n: int, data: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, __file__, "--child", row, str(n), str(data)],
                       capture_output=True, text=True, env=env, cwd=data)
    if p.returncode != 0:
        raise SystemExit(f"{row} at {n}: failed\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--only", nargs="+", choices=ROWS, default=list(ROWS))
    ap.add_argument("--work", type=Path, default=None, help="keep the data here")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        _child(a.child[0], int(a.child[1]), Path(a.child[2]))
        return
    base = a.work or Path(tempfile.mkdtemp(prefix="vpipe-scale-"))
    table: dict[str, dict[int, tuple[float, float]]] = {}
    for n in a.sizes:
        data = base / f"n{n}"
        if not (data / "ready").exists():
            shutil.rmtree(data, ignore_errors=True)
            data.mkdir(parents=True)
            t0 = time.perf_counter()
            make_store(data / "features", n)
            make_labels(data / "labels.csv", n)
            make_workflow(data, n)
            (data / "ready").touch()
            print(f"# {n} items: data made in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        if "rerun" in a.only:  # the features step of the workflow reads this store
            wf_features = data / "wf" / "features"
            if not wf_features.exists():
                _features_for_workflow(data, wf_features)
        for row in a.only:
            r = run_child(row, n, data)
            for name, sec in r["timings"].items():
                table.setdefault(f"{row}: {name}", {})[n] = (sec, r["peak_mb"])
            print(f"# {row} {n}: {r}", file=sys.stderr)
    sizes = a.sizes
    # Per-item cost of the largest size against each smaller one (1.0: flat). The smallest
    # size carries each process's start-up (torch alone is seconds), so the ratio against the
    # next size says more about growth.
    head = " | ".join(f"{n:,} items: s (us/item), peak MB" for n in sizes)
    ratios = " | ".join(f"per item {sizes[-1]:,} / {n:,}" for n in sizes[:-1])
    print(f"| row | {head} | {ratios} |")
    print("|---|" + "---|" * (2 * len(sizes) - 1))
    for name, by_n in table.items():
        cells = [f"{by_n[n][0]:.2f} ({by_n[n][0] / n * 1e6:.0f}), {by_n[n][1]:.0f}"
                 for n in sizes if n in by_n]
        last = by_n[sizes[-1]][0] / sizes[-1]
        rs = [f"{last / (by_n[n][0] / n):.2f}" for n in sizes[:-1]]
        print(f"| {name} | {' | '.join(cells)} | {' | '.join(rs)} |")
    if a.work is None:
        shutil.rmtree(base, ignore_errors=True)


def _features_for_workflow(data: Path, folder: Path) -> None:
    """The workflow's features folder: the synthetic store, recorded as made by the command
    the workflow plans for it (so `vpipe run` finds it finished, as after a real run)."""
    import shlex

    from pipeline.records import now_iso, write_run_info

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "pipeline", "run", str(data / "scale.toml"), "--dry-run"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=data, check=True)
    (line,) = [x for x in p.stdout.splitlines() if x.startswith("vpipe features ")]
    shutil.copytree(data / "features", folder)
    saved, sys.argv = sys.argv, shlex.split(line)
    try:
        write_run_info(folder, "features", {"ended": now_iso(), "counts": {"failed": 0}}, {})
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
