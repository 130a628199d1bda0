"""A feature set whose captions follow a grammar of its content, with combinations held out.

Each clip is a colour x shape x direction of motion x tone: the colour and shape are constant
image features (one-hot, with noise), the direction a ramp on image feature 7 (up: right, down:
left), the tone one of two audio features. Its captions: "a red circle moves left with a high
tone" and "the red circle is moving left with a high tone". Whole combinations are held out
for val and test, so a model can only score there by composing what it learnt of each part.
"""

from __future__ import annotations

import csv
import itertools
import random
from pathlib import Path

import numpy as np

from pipeline.shards import ClipFeatures, ShardWriter, rebuild_index, shard_name

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right")
TONES = ("high", "low")
IMAGE_DIM, AUDIO_DIM = 16, 8


def captions_of(colour: str, shape: str, direction: str, tone: str) -> list[str]:
    return [f"A {colour} {shape} moves {direction} with a {tone} tone.",
            f"The {colour} {shape} is moving {direction} with a {tone} tone"]


def make_caption_set(folder: Path, *, per_combo: int = 3, n_val: int = 6, n_test: int = 8,
                     seed: int = 0) -> tuple[Path, dict[str, str], dict[str, list[str]]]:
    """Shards in ``folder`` and ``captions.csv`` beside it; returns (csv, split of each source,
    references of each source)."""
    rng = np.random.default_rng(seed)
    combos = list(itertools.product(COLOURS, SHAPES, DIRECTIONS, TONES))
    random.Random(seed).shuffle(combos)
    side = {c: "val" for c in combos[:n_val]}
    side.update({c: "test" for c in combos[n_val : n_val + n_test]})
    folder.mkdir(parents=True, exist_ok=True)
    attrs = {"image": {"model": "synthetic", "weights": "none", "layer": "none"},
             "audio": {"model": "synthetic", "weights": "none"}}
    w = ShardWriter(folder / shard_name(0), image_dim=IMAGE_DIM, audio_dim=AUDIO_DIM, attrs=attrs)
    splits, refs = {}, {}
    for n, combo in enumerate(combos):
        colour, shape, direction, tone = combo
        for k in range(per_combo):
            src = f"clip{n:02d}{k}"
            t = int(rng.integers(8, 13))
            x = rng.normal(0, 0.3, (t, IMAGE_DIM)).astype(np.float32)
            x[:, COLOURS.index(colour)] += 2.0
            x[:, 4 + SHAPES.index(shape)] += 2.0
            x[:, 7] += np.linspace(-2, 2, t) * (1 if direction == "right" else -1)
            a_len = t // 2
            audio = rng.normal(0, 0.3, (a_len, AUDIO_DIM)).astype(np.float32)
            audio[:, TONES.index(tone)] += 2.0
            w.add(ClipFeatures(src, src, 0.0, t * 0.5, x, np.arange(t) * 0.5, audio,
                               np.arange(a_len) * 0.96))
            splits[src] = side.get(combo, "train")
            refs[src] = captions_of(*combo)
    w.close()
    rebuild_index(folder)
    path = folder.parent / "captions.csv"
    write_captions(path, refs, splits)
    return path, splits, refs


def write_captions(path: Path, refs: dict[str, list[str]], splits: dict[str, str] | None = None):
    with path.open("w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["id", "caption"] + (["split"] if splits else []))
        for i, caps in refs.items():
            for c in caps:
                out.writerow([i, c] + ([splits[i]] if splits else []))
    return path
