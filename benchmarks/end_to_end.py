"""End-to-end benchmark: `vpipe run` against a seed-style script on the same inputs, same run,
whole processes on both sides (start-up, imports and model loading count).

    .venv/bin/python benchmarks/end_to_end.py [--work DIR] [--only demo|trailer|six] [--keep]

Workloads, each taken from videos to frame features (and 16 kHz PCM):
  demo     the demo's 24 synthetic trailers (10 s, 160x120): 2 x 4 s subclips from 1 s, every
           10th frame, ResNet-18
  trailer  one 150 s 720p trailer (ffmpeg testsrc2 + tone, x264 with B-frames): 3 x 30 s
           subclips from 10 s, every 45th frame, ResNet-50 (the trailer-rating workflow)
  six      six such trailers
vpipe runs the stages through `vpipe run` on a generated workflow as a user runs the shipped
ones: subclip in ranges mode (frame-exact ranges of the source, no video written), then
extract-frames (frames at the default 256 px short side + the 16 kHz wav) and features, with
its defaults (model-call size and precision chosen on the machine); and, for reference, the
same with exact-mode subclips (frame-exact clips, re-encoded). The seed-style script is the
research code made to work: moviepy re-encoding each subclip (`subclipped` + `write_videofile`
with its defaults: its `ffmpeg_extract_subclip` stream copy keeps the source's timestamps and
OpenCV then loses frames), an OpenCV read loop writing every Nth frame at full size, moviepy's
audio to a 16 kHz wav, one ResNet call per frame after PIL load + the weights' transforms.
Weights are random on both sides (same speed as the published ones). Prints per-stage seconds
and the seed/vpipe ratios.
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

[features]
image-model = "{model}"
image-weights = "none"
audio-model = "none"
"""

WORKLOADS = {
    "demo": dict(count=2, duration=4, start=1, every=10, model="resnet18"),
    "trailer": dict(count=3, duration=30, start=10, every=45, model="resnet50"),
    "six": dict(count=3, duration=30, start=10, every=45, model="resnet50"),
}
N_TRAILERS = {"trailer": 1, "six": 6}


def make_inputs(name: str, folder: Path) -> Path:
    """The videos of a workload, made once per work folder."""
    videos = folder / "videos"
    if name == "demo":
        from pipeline.demo import make_dataset

        make_dataset(folder, 24)
        return folder / "trailers"
    import synth

    first = videos / "trailer-1.mp4"
    if not first.exists():  # x264 veryfast: B-frames, as in real trailers
        synth.make_lavfi_video(first, duration_s=150, preset="veryfast")
    for k in range(2, N_TRAILERS[name] + 1):  # the others: copies (the work is the same)
        if not (videos / f"trailer-{k}.mp4").exists():
            shutil.copy(first, videos / f"trailer-{k}.mp4")
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


def seed_subclips(video: Path, out_dir: Path, n: int, duration: float, base: float
                  ) -> list[Path]:
    """The seed's subclips made to work: moviepy cuts and re-encodes each, with its defaults."""
    from moviepy import VideoFileClip

    out_dir.mkdir(parents=True, exist_ok=True)
    clips = []
    with VideoFileClip(str(video)) as src:
        for k in range(n):
            start = base + k * duration
            if start >= src.duration:
                break
            out = out_dir / f"{video.stem}_{k}.mp4"
            sub = src.subclipped(start, min(start + duration, src.duration))
            sub.write_videofile(str(out), logger=None)
            clips.append(out)
    return clips


def seed_audio(clip: Path, out: Path) -> None:
    """The seed's audio: moviepy writes the clip's soundtrack as a 16 kHz 16-bit wav."""
    from moviepy import AudioFileClip

    out.parent.mkdir(parents=True, exist_ok=True)
    with AudioFileClip(str(clip)) as a:
        a.write_audiofile(str(out), fps=16000, nbytes=2, codec="pcm_s16le", logger=None)


def run_seed(name: str, inputs: Path, work: Path) -> dict[str, float]:
    """The seed-style script (run in a fresh process by :func:`seed_in_child`)."""
    from media import seed_frames

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
    t = time.perf_counter()
    for clip in clips:
        seed_frames(clip, out / "frames" / clip.stem, w["every"])
    times["extract-frames"] = time.perf_counter() - t
    t = time.perf_counter()
    for clip in clips:
        seed_audio(clip, out / "audio" / f"{clip.stem}.wav")
    times["audio"] = time.perf_counter() - t
    t = time.perf_counter()
    import torch  # timed, as vpipe's features stage imports torch when it starts
    import torchvision
    from features import seed_features

    model = getattr(torchvision.models, w["model"])(weights=None)
    model.fc = torch.nn.Identity()  # global-pool features, as vpipe stores them
    model.eval()
    for clip in clips:
        seed_features(sorted((out / "frames" / clip.stem).glob("*.jpg")), model)
    times["features"] = time.perf_counter() - t
    times["frames"] = sum(1 for _ in (out / "frames").rglob("*.jpg"))
    times["clips"] = len(clips)
    return times


def best(runs: list[dict]) -> dict:
    """Per key, the smallest time over the runs (counts are equal between runs)."""
    return {k: min(r.get(k, float("nan")) for r in runs) for k in runs[0]}


def seed_in_child(name: str, inputs: Path, work: Path) -> dict:
    """:func:`run_seed` in a fresh Python process, like vpipe's: start-up counts on both sides."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--seed-child", name, str(inputs),
                           str(work)], check=True, stdout=subprocess.PIPE, text=True)
    times = json.loads(proc.stdout.strip().splitlines()[-1])
    times["total"] = time.perf_counter() - t0
    return times


def main() -> None:
    if sys.argv[1:2] == ["--seed-child"]:
        name, inputs, work = sys.argv[2:5]
        print(json.dumps(run_seed(name, Path(inputs), Path(work))))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temp dir)")
    ap.add_argument("--only", choices=sorted(WORKLOADS), default=None, help="one workload")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of each side; the best time per stage is shown (default 1)")
    ap.add_argument("--no-exact", action="store_true", help="skip the exact-mode reference")
    args = ap.parse_args()
    # Warm the page cache for the big libraries once, so whichever side runs first does not
    # pay for reading torch from disk.
    subprocess.run([sys.executable, "-c", "import torch, torchvision, cv2, av, moviepy, h5py"],
                   check=True)
    root = args.work or Path(tempfile.mkdtemp(prefix="vpipe-e2e-"))
    print(f"{os.cpu_count()} CPU cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
          flush=True)
    modes = ["ranges"] + ([] if args.no_exact else ["exact"])
    for name in [args.only] if args.only else list(WORKLOADS):
        work = root / name
        work.mkdir(parents=True, exist_ok=True)
        print(f"\n== {name}: {WORKLOADS[name]}", flush=True)
        inputs = make_inputs(name, work)
        runs: dict[str, list[dict]] = {m: [] for m in [*modes, "seed"]}
        for _ in range(max(1, args.repeat)):  # interleaved, so drift in load hits all sides
            for m in modes:
                runs[m].append(run_vpipe(name, inputs, work, m))
                print(f"  vpipe {m}: {runs[m][-1]}", flush=True)
            runs["seed"].append(seed_in_child(name, inputs, work))
            print(f"  seed: {runs['seed'][-1]}", flush=True)
        got = {m: best(r) for m, r in runs.items()}
        seed = got["seed"]
        print(f"frames through {WORKLOADS[name]['model']}: "
              + ", ".join(f"{m} {got[m]['frames']}" for m in got) + f"; seed clips {seed['clips']}")
        head = [f"vpipe {m}" for m in modes] + ["seed"] + [f"seed/{m}" for m in modes]
        print(f"{'stage (seconds)':30s}" + "".join(f"{h:>13s}" for h in head))
        for stage in ("subclip", "extract-frames", "audio", "features", "total"):
            label = "total (wall, with start-up)" if stage == "total" else stage
            nan = float("nan")
            # vpipe writes the wav in extract-frames (one decode): its audio has no own time.
            ours = [got[m].get(stage, nan) if stage != "audio" else nan for m in modes]
            b = seed[stage]
            print(f"{label:30s}" + "".join(f"{a:13.2f}" for a in ours) + f"{b:13.2f}"
                  + "".join(f"{b / a:12.2f}x" for a in ours))
    if not args.keep and args.work is None:
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"\nwork folder: {root}")


if __name__ == "__main__":
    main()
