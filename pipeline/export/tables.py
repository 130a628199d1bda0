"""The formats written a group of clips to a file: Parquet (pyarrow) and WebDataset tar shards.

``parquet``: one row per clip: ``clip_id``, ``source``, ``start``, ``end``; per modality ``m`` a
list column of its rows (``list<fixed_size_list<float32, dim>>``), ``m_timestamps``
(``list<float64>``) for timed modalities (``video_start``, ``video_end`` for video),
``text_string`` with text, ``label`` (string, null
when the clip has none) with labels. The schema's metadata ``vpipe`` holds the features'
attributes as JSON.

``webdataset``: one sample per clip, ``__key__`` the clip id, one ``<modality>.npy`` per modality
(float32, ``(rows, dim)``) and ``json`` the clip's fields (:func:`clips.clip_fields`). WebDataset
reads the first dot of a member's name as the start of its extension, so a dot inside a clip id
is written as ``%2E`` in the key (the ``json``'s ``id`` is the id as it is).

Both libraries are optional extras, imported only here; a missing one is a usage error naming
the extra to install.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import UsageError
from pipeline.export.clips import TIMES, TITLE, clip_fields
from pipeline.files import atomic_path
from pipeline.shards import TEXT, ClipFeatures

SUFFIX = {"parquet": ".parquet", "webdataset": ".tar"}
EXTRA = {"parquet": ("pyarrow", "parquet"), "webdataset": ("webdataset", "webdataset")}


def require(fmt: str) -> Any:
    """The library ``--format fmt`` writes with (None for the NumPy formats), or a usage error
    saying which extra installs it."""
    if fmt not in EXTRA:
        return None
    module, extra = EXTRA[fmt]
    try:
        if fmt == "parquet":
            import pyarrow.parquet as lib
        else:
            import webdataset as lib
    except ImportError:
        raise UsageError(f"--format {fmt} needs {module}: pip install 'vpipe[{extra}]'") from None
    return lib


def group_file(number: int, fmt: str) -> str:
    return f"clips-{number:05d}{SUFFIX[fmt]}"


def tar_key(clip_id: str) -> str:
    """The clip id as a WebDataset key (no dot: the reader would cut the key there)."""
    return clip_id.replace("%", "%25").replace(".", "%2E")


def write_group(path: Path, fmt: str, clips: Sequence[ClipFeatures], modalities: Sequence[str],
                dims: Mapping[str, int], labels: Mapping[str, str] | None, attrs: dict,
                views: bool = False) -> None:
    """Write ``clips`` as one file of ``fmt``, under a temporary name renamed when complete."""
    with atomic_path(path) as tmp:
        if fmt == "parquet":
            _write_parquet(tmp, clips, modalities, dims, labels, attrs, views)
        else:
            _write_tar(tmp, clips, modalities, labels)


def _write_tar(tmp: Path, clips: Sequence[ClipFeatures], modalities: Sequence[str],
               labels: Mapping[str, str] | None) -> None:
    wds = require("webdataset")
    with tmp.open("wb") as f:
        writer = wds.TarWriter(f)
        for c in clips:
            sample: dict[str, Any] = {"__key__": tar_key(c.clip_id),
                                      "json": clip_fields(c, modalities, labels)}
            for m in modalities:
                sample[f"{m}.npy"] = np.asarray(getattr(c, m), np.float32)
            writer.write(sample)
        writer.close()


def _ragged(pa: Any, arrays: Sequence[np.ndarray], dim: int, dtype: Any) -> Any:
    """One list cell per clip: its rows, each a fixed-size list of ``dim`` (``dim`` 0: the
    rows are scalars, as timestamps are)."""
    offsets = np.zeros(len(arrays) + 1, np.int64)
    np.cumsum([a.shape[0] for a in arrays], out=offsets[1:])
    flat = np.concatenate([np.asarray(a, dtype).reshape(-1) for a in arrays]) if arrays else (
        np.zeros(0, dtype))
    values = pa.array(flat)
    if dim:
        values = pa.FixedSizeListArray.from_arrays(values, dim)
    return pa.LargeListArray.from_arrays(pa.array(offsets), values)


def _write_parquet(tmp: Path, clips: Sequence[ClipFeatures], modalities: Sequence[str],
                   dims: Mapping[str, int], labels: Mapping[str, str] | None,
                   attrs: dict, views: bool = False) -> None:
    pq = require("parquet")
    import pyarrow as pa

    cols: dict[str, Any] = {
        "clip_id": pa.array([c.clip_id for c in clips], pa.string()),
        "source": pa.array([c.source for c in clips], pa.string()),
        "start": pa.array([c.start for c in clips], pa.float64()),
        "end": pa.array([c.end for c in clips], pa.float64()),
    }
    if views:  # a store with augmented views: the clip each is of ("" for a clip)
        cols["view_of"] = pa.array([c.view_of for c in clips], pa.string())
    for m in modalities:
        cols[m] = _ragged(pa, [getattr(c, m) for c in clips], dims[m], np.float32)
        for name in TIMES.get(m, ()):
            cols[name] = _ragged(pa, [getattr(c, name) for c in clips], 0, np.float64)
    if TEXT in modalities:
        cols[TITLE] = pa.array([c.text_string for c in clips], pa.string())
    if labels is not None:
        cols["label"] = pa.array([labels.get(c.clip_id) for c in clips], pa.string())
    table = pa.table(cols).replace_schema_metadata(
        {"vpipe": json.dumps(attrs, sort_keys=True, default=str)})
    pq.write_table(table, tmp)
