"""The feature store: HDF5 shards in a ragged layout, their index, and the reader API.

One shard holds many clips. Per modality, the rows of all clips are concatenated in one 2-D
dataset and ``offsets`` (n+1, int64) says where each clip's rows start and end, so a shard with
thousands of clips is a handful of HDF5 objects (see README "HDF5 schema")::

    /clip_ids (n,) utf-8      /source (n,) utf-8      /start (n,) /end (n,) float64
    /image/features (F, D)    /image/timestamps (F,)  /image/offsets (n+1,)
    /audio/features (A, 128)  /audio/timestamps (A,)  /audio/offsets (n+1,)
    /text/features (W, D)     /text/strings (n,)      /text/offsets (n+1,)   (with --text)
    /video/features (V, D)    /video/start, /video/end (V,)  /video/offsets (n+1,)
    /video/padded (n,)        /video/dropped (n,)    (with --video-model: a row per window)

A shard is written under a temporary name and renamed when complete; every dataset with data
carries an HDF5 fletcher32 checksum (schema 2), so a changed byte fails the read of its chunk.
``index.jsonl`` maps each clip id to its shard and row; it is only a cache: rebuilt from the
complete shards at each features run, read from the shards (with a note) when it is torn or
lacks a field, and a clip's row is always taken from its shard's own ``/clip_ids``.
"""

from __future__ import annotations

from pipeline.shards.index import add_to_index, read_index, rebuild_index
from pipeline.shards.reader import FeatureStore, open_features
from pipeline.shards.schema import (
    INDEX,
    MAX_OPEN_SHARDS,
    MODALITIES,
    SCHEMA_VERSION,
    TEXT,
    VIDEO,
    ClipFeatures,
    DamagedFeatures,
    next_shard_number,
    shard_name,
    shard_paths,
    video_counts,
)
from pipeline.shards.validate import validate
from pipeline.shards.writer import ShardWriter

__all__ = [
    "INDEX", "MAX_OPEN_SHARDS", "MODALITIES", "SCHEMA_VERSION", "TEXT", "VIDEO", "ClipFeatures",
    "DamagedFeatures", "FeatureStore",
    "ShardWriter", "add_to_index", "next_shard_number", "open_features", "read_index",
    "rebuild_index", "shard_name", "shard_paths", "validate", "video_counts",
]
