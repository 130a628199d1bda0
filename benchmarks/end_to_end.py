"""End-to-end benchmark: `vpipe run` against a seed-style script on the same inputs, same run.

    .venv/bin/python benchmarks/end_to_end.py [--work DIR] [--only demo|trailer] [--keep]

Two workloads, each taken from videos to feature arrays:
  demo     the demo's 24 synthetic trailers (10 s, 160x120): 2 x 4 s subclips from 1 s, every
           10th frame, ResNet-18
  trailer  one 150 s 720p trailer (ffmpeg testsrc2 + tone): 3 x 30 s subclips from 10 s, every
           45th frame, ResNet-50 (the trailer-rating workflow)
vpipe runs the stages through `vpipe run` on a generated workflow, twice: subclip in exact mode
(the default: frame-accurate, re-encoded) and in keyframe mode (a stream copy, like moviepy's);
frames at the default 256 px, no audio. The seed-style script does what the research code did:
moviepy `ffmpeg_extract_subclip` per clip, an OpenCV read loop writing every Nth frame at full
size, and one ResNet call per frame after PIL load + the weights' transforms; its frame and
ResNet loops read vpipe's exact clips, as OpenCV cannot read moviepy's whole (counts printed).
Weights are random on both sides (same speed as the published ones). Prints per-stage seconds
and the seed/vpipe ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

WORKFLOW = """\
name = "bench-{name}"
inputs = ["{inputs}"]
work_dir = "{work}"

[subclip]
count = {count}
duration = {duration}
start = {start}
mode = "{mode}"

[extract-frames]
every = {every}
no-audio = true

[features]
image-model = "{model}"
image-weights = "none"
audio-model = "none"
"""

WORKLOADS = {
    "demo": dict(count=2, duration=4, start=1, every=10, model="resnet18"),
    "trailer": dict(count=3, duration=30, start=10, every=45, model="resnet50"),
}


def make_inputs(name: str, folder: Path) -> Path:
    """The videos of a workload, made once per work folder."""
    videos = folder / "videos"
    if name == "demo":
        from pipeline.demo import make_dataset

        make_dataset(folder, 24)
        return folder / "trailers"
    import synth

    trailer = videos / "trailer.mp4"
    if not trailer.exists():
        synth.make_lavfi_video(trailer, duration_s=150)
    return videos


def run_vpipe(name: str, inputs: Path, work: Path, mode: str) -> dict[str, float]:
    """`vpipe run` to the features stage in a fresh process; seconds per stage and in total."""
    wf = work / f"bench-{name}-{mode}.toml"
    out = work / f"vpipe-{mode}"
    wf.write_text(WORKFLOW.format(name=name, inputs=inputs, work=out, mode=mode,
                                  **WORKLOADS[name]), encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", str(wf)],
                          stderr=subprocess.PIPE, text=True)
    times = {"total": time.perf_counter() - t0, "exit": proc.returncode,
             "frames": sum(1 for _ in (out / "extract-frames").rglob("*.jpg"))}
    if proc.returncode:  # keep going: the table shows what did run
        print(f"vpipe run ({mode}) exit {proc.returncode}:\n{proc.stderr[-600:]}", flush=True)
    for m in re.finditer(r"^  (\S+)\s+(?:ok|some items failed)\s+([\d.]+)s", proc.stderr, re.M):
        times[m.group(1)] = float(m.group(2))
    return times


def count_frames(clip: Path) -> int:
    import cv2

    cap, n = cv2.VideoCapture(str(clip)), 0
    while cap.grab():
        n += 1
    return n


def run_seed(name: str, inputs: Path, work: Path, clips_ok: list[Path]) -> dict[str, float]:
    """The seed-style script (run in a fresh process by :func:`seed_in_child`).

    moviepy's cuts are timed, but OpenCV reads only part of them (-copyts timestamps), so the
    frame loop and the ResNet loop run on ``clips_ok`` (vpipe's exact clips, which decode
    fully): the same frames as vpipe's, so the times compare the same work.
    """
    from media import seed_frames, seed_subclips

    w = WORKLOADS[name]
    out = work / "seed"
    shutil.rmtree(out, ignore_errors=True)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    clips = []
    for video in sorted(inputs.glob("*.mp4")):
        clips += seed_subclips(video, out / "clips", n=w["count"], duration=w["duration"],
                               base=w["start"])
    times["subclip"] = time.perf_counter() - t0
    times["moviepy_read"] = sum(count_frames(c) for c in clips)
    times["exact_read"] = sum(count_frames(c) for c in clips_ok)
    t = time.perf_counter()
    for clip in clips_ok:
        seed_frames(clip, out / "frames" / clip.stem, w["every"])
    times["extract-frames"] = time.perf_counter() - t
    t = time.perf_counter()
    import torch  # timed, as vpipe's features stage imports torch when it starts
    import torchvision
    from features import seed_features

    model = getattr(torchvision.models, w["model"])(weights=None)
    model.fc = torch.nn.Identity()  # global-pool features, as vpipe stores them
    model.eval()
    for clip in clips_ok:
        seed_features(sorted((out / "frames" / clip.stem).glob("*.jpg")), model)
    times["features"] = time.perf_counter() - t
    times["frames"] = sum(1 for _ in (out / "frames").rglob("*.jpg"))
    return times


def best(runs: list[dict]) -> dict:
    """Per key, the smallest time over the runs (counts are equal between runs)."""
    return {k: min(r.get(k, float("nan")) for r in runs) for k in runs[0]}


def seed_in_child(name: str, inputs: Path, work: Path, clips_ok: list[Path]) -> dict:
    """:func:`run_seed` in a fresh Python process, like vpipe's: start-up counts on both sides."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--seed-child", name, str(inputs),
                           str(work), *map(str, clips_ok)], check=True, stdout=subprocess.PIPE,
                          text=True)
    times = json.loads(proc.stdout.strip().splitlines()[-1])
    times["total"] = time.perf_counter() - t0
    return times


def main() -> None:
    if sys.argv[1:2] == ["--seed-child"]:
        name, inputs, work, *clips = sys.argv[2:]
        print(json.dumps(run_seed(name, Path(inputs), Path(work), [Path(c) for c in clips])))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temp dir)")
    ap.add_argument("--only", choices=sorted(WORKLOADS), default=None, help="one workload")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--repeat", type=int, default=2,
                    help="runs of each side; the best time per stage is shown (default 2)")
    args = ap.parse_args()
    # Warm the page cache for the big libraries once, so whichever side runs first does not
    # pay for reading torch from disk.
    subprocess.run([sys.executable, "-c", "import torch, torchvision, cv2, av, moviepy, h5py"],
                   check=True)
    root = args.work or Path(tempfile.mkdtemp(prefix="vpipe-e2e-"))
    print(f"{os.cpu_count()} CPU cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
          flush=True)
    for name in [args.only] if args.only else list(WORKLOADS):
        work = root / name
        work.mkdir(parents=True, exist_ok=True)
        print(f"\n== {name}: {WORKLOADS[name]}", flush=True)
        inputs = make_inputs(name, work)
        runs: dict[str, list[dict]] = {"exact": [], "keyframe": [], "seed": []}
        for _ in range(max(1, args.repeat)):  # interleaved, so drift in load hits all sides
            runs["exact"].append(run_vpipe(name, inputs, work, "exact"))
            runs["keyframe"].append(run_vpipe(name, inputs, work, "keyframe"))
            clips_ok = sorted((work / "vpipe-exact" / "subclip").rglob("*.mp4"))
            runs["seed"].append(seed_in_child(name, inputs, work, clips_ok))
        exact, key, seed = (best(runs[k]) for k in ("exact", "keyframe", "seed"))
        print(f"OpenCV reads {seed['moviepy_read']:.0f} frames from moviepy's subclips, "
              f"{seed['exact_read']:.0f} from vpipe's exact ones")
        print(f"frames through {WORKLOADS[name]['model']}: vpipe exact {exact['frames']}, "
              f"keyframe {key['frames']} (exit {key['exit']}), seed {seed['frames']}")
        head = ["vpipe exact", "vpipe kf", "seed", "seed/exact", "seed/kf"]
        print(f"{'stage (seconds)':30s}" + "".join(f"{h:>12s}" for h in head))
        for stage in ("subclip", "extract-frames", "features", "total"):
            label = "total (wall, with start-up)" if stage == "total" else stage
            nan = float("nan")
            a, b = exact.get(stage) or nan, seed[stage]
            k = (key.get(stage) or nan) if key["frames"] else nan  # nan: keyframe mode failed
            print(f"{label:30s}{a:12.2f}{k:12.2f}{b:12.2f}{b / a:11.2f}x{b / k:11.2f}x")
    if not args.keep and args.work is None:
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"\nwork folder: {root}")


if __name__ == "__main__":
    main()
