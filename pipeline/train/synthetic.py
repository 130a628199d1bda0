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


def _clip_label(task: str, rng: np.random.Generator, x: np.ndarray, audio: np.ndarray) -> str:
    """Draw a label, imprint it on the sequences in place, return it as CSV text."""
    t = x.shape[0]
    if task == "regression":
        x[:, 0] += rng.uniform(-1.0, 1.0)
        return repr(float(x[:, 0].astype(np.float32).mean()))
    if task == "classification":
        name = PATTERNS[int(rng.integers(len(PATTERNS)))]
        ramp = np.linspace(-1.5, 1.5, t)
        x[:, 1] += {"up": ramp, "down": -ramp, "bump": 1.5 - np.abs(ramp) * 2}[name]
        return name
    present = [tag for tag in TAGS if rng.random() < 0.5] or [TAGS[int(rng.integers(3))]]
    for tag in present:
        if tag == "c" and audio.shape[0]:
            seq, col = audio, 0
        else:
            seq, col = x, {"a": 2, "b": 3, "c": 4}[tag]
        k = int(rng.integers(max(1, seq.shape[0] - 1)))
        seq[k : k + 2, col] += 2.5
    return "|".join(present)


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
            labels[cid] = _clip_label(task, rng, x, audio)
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
