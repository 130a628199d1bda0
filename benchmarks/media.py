"""Benchmark of the media stages against the seed-style way, on one 150 s 720p trailer.

    .venv/bin/python benchmarks/media.py [--work DIR] [--duration 150] [--repeat N] [--keep]

Times, in the same run: ``vpipe subclip`` (3 x 30 s from 10 s, exact, keyframe and ranges mode) vs
moviepy 2.x's ``ffmpeg_extract_subclip`` (stream copy with -copyts), and ``vpipe
extract-frames --every 45`` vs an OpenCV ``cap.read()`` loop that keeps every 45th frame with
``cv2.imwrite``, and extract-frames against its floor: the same frames decoded alone by PyAV
(frame threads, frames discarded). Also counts how many frames OpenCV manages to read from
moviepy's subclips.
``seed_subclips`` and ``seed_frames`` are imported by the end-to-end benchmark.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

VPIPE = [sys.executable, "-m", "pipeline"]


# --------------------------------------------------------------------------- the seed's way


def seed_subclips(
    src: str | os.PathLike, out_dir: str | os.PathLike, n: int = 3, duration: float = 30,
    base: float = 10,
) -> list[Path]:
    """The seed's subclips: moviepy 2.x ffmpeg_extract_subclip, back to back from ``base``."""
    from moviepy.video.io.ffmpeg_tools import ffmpeg_extract_subclip

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clips = []
    for k in range(n):
        start = base + k * duration
        out = out_dir / f"{Path(src).stem}_{k}.mp4"
        ffmpeg_extract_subclip(str(src), start, start + duration, outputfile=str(out),
                               logger=None)
        clips.append(out)
    return clips


def _seed_read(clip: str | os.PathLike, out_dir: Path, frequency: int) -> tuple[int, int]:
    """The seed's frame loop: read every frame with OpenCV, write every ``frequency``th."""
    import cv2

    out_dir.mkdir(parents=True, exist_ok=True)
    cap = cv2.VideoCapture(str(clip))
    read = saved = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        if read % frequency == 0:
            cv2.imwrite(str(out_dir / f"{saved:06d}.jpg"), frame)
            saved += 1
        read += 1
    cap.release()
    return read, saved


def seed_frames(clip: str | os.PathLike, out_dir: str | os.PathLike, frequency: int = 45) -> int:
    """The seed's frame extraction for one clip; returns the number of frames written."""
    return _seed_read(clip, Path(out_dir), frequency)[1]


# --------------------------------------------------------------------------- the floor

# Decoding alone, as fast as PyAV goes: frame threads, every frame decoded and discarded (no
# conversion, no writing), in a fresh process like the vpipe commands it is compared with.
FLOOR = r"""
import sys, av
for spec in sys.argv[1:]:
    path, start, end = spec.split("|")
    with av.open(path) as c:
        v = c.streams.video[0]
        v.thread_type = "AUTO"
        if start:
            c.seek(int(float(start) / v.time_base), stream=v, backward=True)
        for f in c.decode(v):
            if end and f.time is not None and f.time >= float(end):
                break
"""


def decode_floor(spans: list[tuple[Path, float | None, float | None]]) -> float:
    """Best wall time of decoding ``spans`` (whole files when start/end are None) alone."""
    specs = [f"{p}|{'' if a is None else a}|{'' if b is None else b}" for p, a, b in spans]
    best = float("inf")
    for _ in range(REPEAT):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", FLOOR, *specs], check=True)
        best = min(best, time.perf_counter() - t)
    return best


# --------------------------------------------------------------------------- the benchmark


REPEAT = 1  # set by --repeat: each figure is the best of this many runs


def vpipe(*args: str) -> float:
    """Run a vpipe command as a user would (a fresh process, its -o folder removed first);
    return its best wall time."""
    out = Path(args[args.index("-o") + 1])
    best = float("inf")
    for _ in range(REPEAT):
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        subprocess.run([*VPIPE, *map(str, args), "--quiet"], check=True)
        best = min(best, time.perf_counter() - t)
    return best


def timed(fn, out_dir: Path, *args, **kw):
    """Best wall time of ``fn(*args, out_dir, **kw)`` over REPEAT runs, and its result."""
    best, out = float("inf"), None
    for _ in range(REPEAT):
        shutil.rmtree(out_dir, ignore_errors=True)
        t = time.perf_counter()
        out = fn(*args, out_dir, **kw)
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temp dir)")
    ap.add_argument("--duration", type=float, default=150, help="trailer length in seconds")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--repeat", type=int, default=1, help="report the best of N runs of each")
    ap.add_argument("--trailer-preset", default="veryfast",
                    help="x264 preset of the test trailer (veryfast: B-frames, like real "
                    "trailers; ultrafast: none)")
    args = ap.parse_args()
    global REPEAT
    REPEAT = max(1, args.repeat)

    import synth

    from pipeline import media

    work = args.work or Path(tempfile.mkdtemp(prefix="vpipe-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    trailer = work / "trailer.mp4"
    if not trailer.exists():
        print(f"making a {args.duration:g} s 720p test trailer ...", flush=True)
        synth.make_lavfi_video(trailer, duration_s=args.duration, preset=args.trailer_preset)
    info = media.probe(trailer)
    print(f"trailer: {info.width}x{info.height} {info.fps:g} fps {info.duration_s:.1f} s "
          f"(x264 {args.trailer_preset}), ffmpeg {media.ffmpeg_version()}, "
          f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}")
    shutil.rmtree(work / "opencv-count", ignore_errors=True)

    sub = ["--count", "3", "--duration", "30", "--start", "10"]
    t_exact = vpipe("subclip", trailer, "-o", work / "exact", *sub, "--mode", "exact")
    t_key = vpipe("subclip", trailer, "-o", work / "keyframe", *sub, "--mode", "keyframe")
    t_ranges = vpipe("subclip", trailer, "-o", work / "ranges", *sub, "--mode", "ranges")
    t_seed, seed_clips = timed(seed_subclips, work / "seed", trailer)
    clips = sorted((work / "exact" / "trailer").glob("*.mp4"))
    key_clips = sorted((work / "keyframe" / "trailer").glob("*.mp4"))
    every = ["--every", "45"]
    t_full = vpipe("extract-frames", work / "exact", "-o", work / "frames", *every,
                   "--size", "0", "--no-audio")
    t_256 = vpipe("extract-frames", work / "exact", "-o", work / "frames256", *every)
    t_kf_256 = vpipe("extract-frames", work / "keyframe", "-o", work / "frames-kf", *every)
    t_r_256 = vpipe("extract-frames", work / "ranges", "-o", work / "frames-r", *every)
    t_r_noaudio = vpipe("extract-frames", work / "ranges", "-o", work / "frames-r-na", *every,
                        "--no-audio")
    t_x_noaudio = vpipe("extract-frames", work / "exact", "-o", work / "frames-x-na", *every,
                        "--no-audio")
    # The floor: the same frames decoded alone (clip files; the source over each range).
    spans = [(trailer, 10.0 + 30 * k, 40.0 + 30 * k) for k in range(3)]
    floor_ranges = decode_floor(spans)
    floor_clips = decode_floor([(c, None, None) for c in clips])
    # The seed's loop over clips that OpenCV reads completely (vpipe's): a fair time.
    t_seed_frames = sum(
        timed(seed_frames, work / "seed-frames" / c.stem, c, frequency=45)[0] for c in clips
    )
    t_seed_all = t_seed + t_seed_frames
    rows = [
        ("subclip 3 x 30 s, exact (re-encode)", t_exact, t_seed),
        ("subclip 3 x 30 s, keyframe (stream copy)", t_key, t_seed),
        ("extract-frames --every 45, full size, no audio", t_full, t_seed_frames),
        ("extract-frames --every 45, 256 px + 16 kHz wav", t_256, t_seed_frames),
        ("end to end: exact + frames 256 + wav", t_exact + t_256, t_seed_all),
        ("end to end: keyframe + frames 256 + wav", t_key + t_kf_256, t_seed_all),
        ("subclip 3 x 30 s, ranges (no video written)", t_ranges, t_seed),
        ("extract-frames --every 45, 256 px + wav, ranges", t_r_256, t_seed_frames),
        ("end to end: ranges + frames 256 + wav", t_ranges + t_r_256, t_seed_all),
    ]
    print()
    print(f"{'work':50s} {'vpipe s':>8s} {'seed s':>8s} {'seed/vpipe':>11s}")
    for name, ours, seed in rows:
        print(f"{name:50s} {ours:8.2f} {seed:8.2f} {seed / ours:10.2f}x")

    print()
    print(f"{'extract-frames --every 45, 256 px, no audio':50s} {'vpipe s':>8s} {'floor s':>8s} "
          f"{'vpipe/floor':>11s}")
    for name, ours, floor in (("on exact clip files", t_x_noaudio, floor_clips),
                              ("on ranges of the source", t_r_noaudio, floor_ranges)):
        print(f"{name:50s} {ours:8.2f} {floor:8.2f} {ours / floor:10.2f}x")
    print("(floor: PyAV decoding the same spans alone, frame threads, frames discarded, in a "
          "fresh process)")

    # What OpenCV reads back from each tool's subclips (30 s at 25 fps = 750 frames).
    print()
    print("frames OpenCV reads from each subclip (expected 750):")
    for label, paths in (("vpipe exact", clips), ("vpipe keyframe", key_clips),
                         ("moviepy (-copyts)", seed_clips)):
        counts = [_seed_read(p, work / "opencv-count" / p.stem, 10**9)[0] for p in paths]
        print(f"  {label:18s} {counts}")
    if not args.keep and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"\nwork folder: {work}")


if __name__ == "__main__":
    main()
