"""Feature folders whose labels are a known function of the sequences, for tests and demos.

regression: the target is the mean over time of image feature 0; classification: which temporal
pattern feature 1 follows (``up``, ``down``, ``bump``); multilabel: which short pulses occur
(tag ``a`` on image feature 2, ``b`` on feature 3, ``c`` on audio feature 0, or image feature 4
when there is no audio). A model that reads the sequence beats the trivial predictor widely.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from pipeline.shards import ClipFeatures, ShardWriter, rebuild_index, shard_name

PATTERNS = ("up", "down", "bump")
TAGS = ("a", "b", "c")


def _value_label(rng: np.random.Generator, x: np.ndarray, audio: np.ndarray) -> str:
    """regression: a shift of image feature 0; the label is its mean over time."""
    x[:, 0] += rng.uniform(-1.0, 1.0)
    return repr(float(x[:, 0].astype(np.float32).mean()))


def _pattern_label(rng: np.random.Generator, x: np.ndarray, audio: np.ndarray) -> str:
    """classification: the temporal pattern image feature 1 follows."""
    name = PATTERNS[int(rng.integers(len(PATTERNS)))]
    ramp = np.linspace(-1.5, 1.5, x.shape[0])
    x[:, 1] += {"up": ramp, "down": -ramp, "bump": 1.5 - np.abs(ramp) * 2}[name]
    return name


def _pulse_tags(rng: np.random.Generator, x: np.ndarray, audio: np.ndarray) -> str:
    """multilabel: which short pulses occur (``c`` on the audio when there is audio)."""
    present = [tag for tag in TAGS if rng.random() < 0.5] or [TAGS[int(rng.integers(3))]]
    for tag in present:
        if tag == "c" and audio.shape[0]:
            seq, col = audio, 0
        else:
            seq, col = x, {"a": 2, "b": 3, "c": 4}[tag]
        k = int(rng.integers(max(1, seq.shape[0] - 1)))
        seq[k : k + 2, col] += 2.5
    return "|".join(present)


# Per task: draw a label, imprint it on the sequences in place, return it as CSV text.
LABELLERS = {"regression": _value_label, "classification": _pattern_label,
             "multilabel": _pulse_tags}


def make_feature_set(
    folder: str | Path,
    task: str,
    *,
    n_sources: int = 40,
    clips_per_source: int = 2,
    dim: int = 16,
    audio_dim: int = 0,
    n_shards: int = 2,
    seed: int = 0,
    labels_csv: str | Path | None = None,
) -> tuple[Path, dict[str, str]]:
    """Write shards + index of synthetic clips and a labels CSV; returns (csv path, labels)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    attrs = {
        "image": {"model": "synthetic", "weights": "none", "layer": "none"},
        "audio": {"model": "synthetic", "weights": "none"},
    }
    writers = [
        # (ShardWriter cannot make a 0-wide dataset: "no audio" is a 128-wide one with no rows)
        ShardWriter(folder / shard_name(i), image_dim=dim, audio_dim=audio_dim or 128, attrs=attrs)
        for i in range(n_shards)
    ]
    labels: dict[str, str] = {}
    n = 0
    for s in range(n_sources):
        source = f"video{s:03d}"
        for k in range(clips_per_source):
            t = int(rng.integers(6, 15))
            x = rng.normal(0, 0.5, (t, dim)).astype(np.float32)
            a_len = t // 2 + 1 if audio_dim else 0
            audio = rng.normal(0, 0.5, (a_len, audio_dim or 128)).astype(np.float32)
            cid = f"{source}_{k}"
            labels[cid] = LABELLERS[task](rng, x, audio)
            writers[n % n_shards].add(
                ClipFeatures(
                    cid,
                    source,
                    10.0 + 30 * k,
                    40.0 + 30 * k,
                    x,
                    np.arange(t) * 0.5,
                    audio,
                    np.arange(a_len) * 0.96,
                )
            )
            n += 1
    for w in writers:
        w.close()
    rebuild_index(folder)
    csv_path = Path(labels_csv) if labels_csv else folder.parent / f"{folder.name}-labels.csv"
    write_labels(csv_path, labels)
    return csv_path, labels


def write_labels(path: str | Path, labels: dict[str, str], splits: dict | None = None) -> Path:
    """A labels CSV ``id,label[,split]`` (fields with ',' are quoted by the csv module)."""
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "label"] + (["split"] if splits else []))
        for cid, v in labels.items():
            w.writerow([cid, v] + ([splits[cid]] if splits else []))
    return path


COLOURS = ("red", "green", "blue", "yellow")
MOTIONS = ("runs", "jumps", "spins", "falls")  # the tags of the titled set
FILLER = ("a", "video", "of", "the", "one", "look", "at")
SEGMENT_STEPS = 5


def make_titled_set(
    folder: str | Path,
    *,
    n_sources: int = 240,
    segments: int = 3,
    text: bool = True,
    text_dim: int = 16,
    n_shards: int = 2,
    seed: int = 0,
    labels_csv: str | Path | None = None,
) -> tuple[Path, dict[str, str]]:
    """A tagging set whose tag needs the title *and* the part of the video it points to: each
    clip shows ``segments`` colours in turn, each with its own motion; the title names one of
    them and the tag is the motion seen while that colour is on screen (the others are
    distractors). Image rows: colour one-hot (dims 0-3) + motion one-hot (4-7) + noise;
    text rows: a fixed random vector per word, [CLS]/[SEP] included, as an encoder gives them.
    Image alone can at best guess one of the clip's motions (~1/segments); returns (csv, tags).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = ["[CLS]", "[SEP]", *COLOURS, *FILLER]
    vectors = {w: rng.normal(0, 1, text_dim).astype(np.float32) for w in words}
    dim = len(COLOURS) + len(MOTIONS)
    attrs = {
        "image": {"model": "synthetic", "weights": "none", "layer": "none"},
        "audio": {"model": "synthetic", "weights": "none"},
        "text": {"model": "synthetic", "weights": "none", "max_chars": 50,
                 "tokenizer": "words"},
    }
    writers = [ShardWriter(folder / shard_name(i), image_dim=dim, audio_dim=128,
                           text_dim=text_dim if text else 0, attrs=attrs)
               for i in range(n_shards)]
    tags: dict[str, str] = {}
    for s in range(n_sources):
        cid = f"video{s:03d}_0"
        colours = rng.choice(len(COLOURS), segments, replace=False)
        motions = rng.choice(len(MOTIONS), segments, replace=False)
        x = rng.normal(0, 0.3, (segments * SEGMENT_STEPS, dim)).astype(np.float32)
        for k in range(segments):
            steps = slice(k * SEGMENT_STEPS, (k + 1) * SEGMENT_STEPS)
            x[steps, colours[k]] += 1.0
            x[steps, len(COLOURS) + motions[k]] += 1.0
        asked = int(rng.integers(segments))
        tags[cid] = MOTIONS[motions[asked]]
        fill = list(rng.choice(FILLER, int(rng.integers(1, 4))))
        title = fill + [COLOURS[colours[asked]]] + list(rng.choice(FILLER, int(rng.integers(3))))
        tokens = ["[CLS]", *title, "[SEP]"]
        rows = np.stack([vectors[w] for w in tokens]) + rng.normal(0, 0.05, (len(tokens),
                                                                           text_dim))
        clip = ClipFeatures(cid, cid[:-2], 0.0, float(x.shape[0]), x,
                            np.arange(x.shape[0], dtype=np.float64),
                            np.zeros((0, 128), np.float32), np.zeros(0),
                            rows.astype(np.float32), " ".join(title))
        writers[s % n_shards].add(clip)
    for w in writers:
        w.close()
    rebuild_index(folder)
    csv_path = Path(labels_csv) if labels_csv else folder.parent / f"{folder.name}-labels.csv"
    write_labels(csv_path, tags)
    return csv_path, tags
