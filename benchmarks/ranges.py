"""Benchmark of ``vpipe subclip --mode ranges`` against ``--mode exact``, side by side in one run.

    .venv/bin/python benchmarks/ranges.py [--duration 60] [--repeat 1] [--work DIR --keep]

On one ffmpeg testsrc2 720p 25 fps video with a sine tone (x264 ultrafast, AAC): ``vpipe
subclip`` (3 x 30 s from 10 s, so 2 clips from a 60 s video) then ``vpipe extract-frames
--every 45`` (frames and 16 kHz audio), in each mode, each command a fresh process; prints
the wall seconds of each stage, their sum, and the bytes the subclip folder holds.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

VPIPE = [sys.executable, "-m", "pipeline"]


def best_time(args: list[str], repeat: int) -> float:
    """Best wall time of a vpipe command over ``repeat`` runs (its -o folder removed first)."""
    out = Path(args[args.index("-o") + 1])
    best = float("inf")
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        subprocess.run([*VPIPE, *args, "--quiet"], check=True)
        best = min(best, time.perf_counter() - t)
    return best


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=60, help="source length in seconds")
    ap.add_argument("--repeat", type=int, default=1, help="report the best of N runs of each")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    a = ap.parse_args()
    import synth

    work = a.work or Path(tempfile.mkdtemp(prefix="vpipe-ranges-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        src = synth.make_lavfi_video(work / "videos" / "trailer.mp4", duration_s=a.duration)
        print(f"source: {src.stat().st_size / 1e6:.1f} MB, {a.duration:g} s 1280x720 25 fps")
        rows = []
        for mode in ("ranges", "exact"):
            clips, frames = work / f"clips-{mode}", work / f"frames-{mode}"
            t_sub = best_time(["subclip", str(src), "-o", str(clips), "--mode", mode], a.repeat)
            t_fr = best_time(["extract-frames", str(clips), "-o", str(frames), "--every", "45"],
                             a.repeat)
            n = sum(1 for _ in frames.glob("*/frames/*.jpg"))
            rows.append((mode, t_sub, t_fr, folder_bytes(clips), n))
        print(f"{'mode':<8} {'subclip s':>10} {'extract-frames s':>17} {'total s':>8} "
              f"{'clips folder':>13} {'frames':>7}")
        for mode, t_sub, t_fr, size, n in rows:
            print(f"{mode:<8} {t_sub:>10.2f} {t_fr:>17.2f} {t_sub + t_fr:>8.2f} "
                  f"{size / 1e3:>10.1f} kB {n:>7}")
    finally:
        if not a.keep and a.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
