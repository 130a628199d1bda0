"""What one clip becomes in every format: its arrays per modality, its fields, its files.

Every modality the store holds is exported (``FeatureStore.modalities``: image and audio with
their timestamps, the title's text rows and string when made with ``--text``, the video
windows' rows with their ``video_start``/``video_end`` when made with ``--video-model``; a
modality added to the schema comes out the same way). A modality with no rows in a clip is a
``(0, dim)`` array, as the store holds it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.files import atomic_path
from pipeline.shards import MODALITIES, TEXT, VIDEO, ClipFeatures

TIMED = MODALITIES  # the modalities whose rows carry timestamps
# The per-row times of each modality that has them, as ClipFeatures names them.
TIMES = {**{m: (f"{m}_timestamps",) for m in TIMED}, VIDEO: ("video_start", "video_end")}
TITLE = "text_string"  # the title a clip's text rows encode ("" without one)


def array_names(modalities: Sequence[str]) -> list[str]:
    """The arrays of a clip, in order: each modality, then its timestamps when it has them;
    the title's string after the text rows."""
    names = []
    for m in modalities:
        names.append(m)
        names += TIMES.get(m, ())
        if m == TEXT:
            names.append(TITLE)
    return names


def clip_arrays(clip: ClipFeatures, modalities: Sequence[str]) -> dict[str, np.ndarray]:
    """The clip's arrays by :func:`array_names` (the title as a 0-d unicode array)."""
    return {a: np.asarray(getattr(clip, a)) for a in array_names(modalities)}


def clip_fields(clip: ClipFeatures, modalities: Sequence[str],
                labels: Mapping[str, str] | None) -> dict[str, Any]:
    """The clip's plain fields (the webdataset ``.json``): id, source, start, end, rows per
    modality, the timestamps of timed modalities, the title, the label (None: unlabelled)."""
    out: dict[str, Any] = {"id": clip.clip_id, "source": clip.source, "start": clip.start,
                           "end": clip.end, "rows": {m: clip.n(m) for m in modalities}}
    if clip.view_of:  # an augmented view (extract-frames --views): the clip it is of
        out["view_of"] = clip.view_of
    for m in modalities:
        for name in TIMES.get(m, ()):
            out[name] = np.asarray(getattr(clip, name)).tolist()
    if TEXT in modalities:
        out[TITLE] = clip.text_string
    if labels is not None:
        out["label"] = labels.get(clip.clip_id)
    return out


def clip_files(clip_id: str, fmt: str, modalities: Sequence[str]) -> list[str]:
    """The files one clip is written as (npz, npy)."""
    if fmt == "npz":
        return [f"{clip_id}.npz"]
    return [f"{clip_id}_{a}.npy" for a in array_names(modalities)]


def write_clip(clip: ClipFeatures, out_dir: Path, fmt: str, modalities: Sequence[str],
               compress: bool, labels: Mapping[str, str] | None) -> list[str]:
    """Write one clip as npz (one file: its arrays, source, start, end, label) or npy (one file
    per array, ``<clip_id>_<array>.npy`` as v-iashin/video_features names its outputs), each
    under a temporary name renamed when complete; returns the file names."""
    arrays = clip_arrays(clip, modalities)
    names = clip_files(clip.clip_id, fmt, modalities)
    if fmt == "npz":
        meta = {"source": np.asarray(clip.source), "start": np.float64(clip.start),
                "end": np.float64(clip.end)}
        if clip.view_of:
            meta["view_of"] = np.asarray(clip.view_of)
        if labels is not None and clip.clip_id in labels:
            meta["label"] = np.asarray(labels[clip.clip_id])
        with atomic_path(out_dir / names[0]) as tmp, tmp.open("wb") as f:
            (np.savez_compressed if compress else np.savez)(f, **arrays, **meta)
        return names
    for a, name in zip(arrays, names, strict=True):
        with atomic_path(out_dir / name) as tmp, tmp.open("wb") as f:
            np.save(f, arrays[a])
    return names
