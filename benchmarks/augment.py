"""Augmented views against none, side by side in one run, on a set with few training sources.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/augment.py [--train-per-class 2]
        [--test-per-class 10] [--views 4] [--seeds 0 1 2]

The set: one 2-second video per source, a coloured square (red, green or blue: the label)
moving over a grey Game-of-Life texture that differs per source (lavfi ``life`` with its own
seed, density and grey),
at its own position and speed. The label does not depend on what the views change (a flip, a
rotation, a crop, noise). Whole sources are split: ``--train-per-class`` training and one
validation source per class, ``--test-per-class`` test sources. Frames at 2 fps, 112 px;
features from resnet18, with random weights unless ``--image-weights`` gives a file
(pretrained weights cannot be downloaded here: the figures then say how views change what a
model learns from random features, not what pretrained ones would give); vpipe train's
defaults for classification. For each seed: the same
sources and split trained without views and with ``--views`` views of every clip (the
training clips' views trained on), for each ``--augment`` spec. Prints test accuracy per seed
and the mean.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import subprocess
import tempfile
import time
from pathlib import Path

from pipeline.cli import main
from pipeline.media import ffmpeg_exe

COLOURS = {"red": "0xD03030", "green": "0x30B030", "blue": "0x3040D0"}
# Label-preserving transforms, and the same with a crop and colour jitter (which can cut the
# square out of a view, or move its colour: the label then no longer holds for that view).
SPECS = ["hflip,rotate=15,noise=0.03,speed=0.8-1.2",
         "hflip,rotate=15,crop=0.75,jitter=0.15,noise=0.03"]


def make_source(path: Path, colour: str, seed: int) -> None:
    rng = random.Random(seed)
    x0, y0 = rng.randint(5, 60), rng.randint(5, 60)
    vx, vy = rng.uniform(-15, 15), rng.uniform(-15, 15)
    side = rng.randint(30, 44)
    life = (f"life=s=112x112:r=10:ratio={rng.uniform(0.2, 0.6):.2f}:seed={seed}:"
            f"mold=10:life_color=0x{rng.randint(0x40, 0xC0) * 0x010101:06X}:"
            "death_color=0x202020[bg]")
    # (overlay, not drawbox: drawbox's x and y do not follow t)
    square = f"color=c={COLOURS[colour]}:s={side}x{side}:r=10[sq]"
    move = f"[bg][sq]overlay=x='{x0}+{vx:.2f}*t':y='{y0}+{vy:.2f}*t':shortest=1[out0]"
    graph = f"{life};{square};{move}"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i", graph, "-t", "2",
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "20",
                    str(path)], check=True)


def main_(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-per-class", type=int, default=2)
    ap.add_argument("--test-per-class", type=int, default=10)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--augment", nargs="+", default=SPECS, help="the specs compared")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--image-weights", default="none",
                    help="resnet18 weights (a state-dict file; default none: random weights)")
    args = ap.parse_args(argv)
    per_class = args.train_per_class + 1 + args.test_per_class
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "videos").mkdir()
        rows, n = [], 0
        for colour in COLOURS:
            for k in range(per_class):
                name = f"{colour}{k:02d}"
                make_source(root / "videos" / f"{name}.mp4", colour, seed=1000 + n)
                n += 1
                split = ("train" if k < args.train_per_class else
                         "val" if k == args.train_per_class else "test")
                rows.append((name, colour, split))
        with (root / "labels.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "label", "split"])
            w.writerows(rows)
        t = time.perf_counter()
        stores = {"no views": []}
        stores.update({spec: ["--augment", spec, "--views", str(args.views)]
                       for spec in args.augment})
        for k, views in enumerate(stores.values()):
            # The clips' own frames are the same bytes with or without views (tested), so the
            # stores hold the same features for them.
            assert main(["extract-frames", str(root / "videos"), "-o", str(root / f"m{k}"),
                         "--fps", "2", "--size", "112", "--no-audio", *views, "-q"]) == 0
            assert main(["features", str(root / f"m{k}"), "-o", str(root / f"f{k}"),
                         "--image-model", "resnet18", "--image-weights", args.image_weights,
                         "--audio-model", "none", "-q"]) == 0
        prep = time.perf_counter() - t
        print(f"{3 * per_class} sources ({args.train_per_class} train, 1 val, "
              f"{args.test_per_class} test per class), {args.views} views of each clip (the "
              f"training clips' trained on); image weights {args.image_weights}; frames and "
              f"features {prep:.0f} s")
        print("| seed | " + " | ".join(f"test accuracy, {name}" for name in stores) + " |")
        print("|---" * (len(stores) + 1) + "|")
        results = []
        for seed in args.seeds:
            acc = []
            for k in range(len(stores)):
                out = root / f"run-{seed}-{k}"
                assert main(["train", str(root / f"f{k}"), "--labels", str(root / "labels.csv"),
                             "-o", str(out), "--seed", str(seed), "--device", "cpu",
                             "-q"]) == 0
                s = json.loads((out / "summary.json").read_text())
                acc.append(s["test"]["accuracy"])
                if k:
                    assert s["views"]["trained_on"] == args.views * 3 * args.train_per_class
            results.append(acc)
            print(f"| {seed} | " + " | ".join(f"{a:.3f}" for a in acc) + " |", flush=True)
        means = [sum(r[k] for r in results) / len(results) for k in range(len(stores))]
        print("| mean | " + " | ".join(f"{m:.3f}" for m in means) + " |")

if __name__ == "__main__":
    main_()
