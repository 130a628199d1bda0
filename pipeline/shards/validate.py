"""``vpipe inspect``: every shard checked against ``index.jsonl`` and the schema."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.shards.index import read_index
from pipeline.shards.schema import INDEX, MODALITIES, read_attrs, shard_paths

ROOT_ATTRS = ("schema_version", "vpipe_version", "created")
GROUP_ATTRS = {
    "image": ("model", "weights", "layer", "dim", "preprocessing", "sampling"),
    "audio": ("model", "weights", "sample_rate", "window_s", "hop_s", "postprocess", "dim"),
}


def _check_shard(path: Path, rows: list[dict]) -> tuple[dict, list[str]]:
    """Facts about one shard and what is wrong with it (against its index rows)."""
    problems: list[str] = []
    facts: dict[str, Any] = {"clips": 0, "image": 0, "audio": 0, "dims": {}, "models": {}}
    name = path.name
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        return facts, [f"{name}: cannot open ({e})"]
    with f:
        missing = [k for k in ("clip_ids", "source", "start", "end") if k not in f]
        missing += [f"{m}/{d}" for m in MODALITIES for d in ("features", "timestamps", "offsets")
                    if m not in f or d not in f[m]]
        if missing:
            return facts, [f"{name}: missing datasets {', '.join(missing)}"]
        ids = list(f["clip_ids"].asstr()[:])
        n = len(ids)
        facts["clips"] = n
        for k in ("source", "start", "end"):
            if f[k].shape[0] != n:
                problems.append(f"{name}: /{k} has {f[k].shape[0]} entries for {n} clips")
        problems += [f"{name}: root attribute {a!r} missing"
                     for a in ROOT_ATTRS if a not in f.attrs]
        for m in MODALITIES:
            g = f[m]
            off = g["offsets"][:]
            rows_m = g["features"].shape[0]
            facts[m] = rows_m
            facts["dims"][m] = int(g["features"].shape[1])
            attrs = read_attrs(g)
            facts["models"][m] = attrs.get("model")
            if attrs.get("model", "none") != "none":
                problems += [f"{name}: /{m} attribute {a!r} missing"
                             for a in GROUP_ATTRS[m] if a not in attrs]
            if off.shape[0] != n + 1:
                problems.append(f"{name}: /{m}/offsets: {off.shape[0]} entries, not {n + 1}")
            elif off[0] != 0 or np.any(np.diff(off) < 0):
                problems.append(f"{name}: /{m}/offsets not monotone from 0")
            elif off[-1] != rows_m:
                problems.append(f"{name}: /{m}/offsets ends at {off[-1]}, features have {rows_m}")
            if g["timestamps"].shape[0] != rows_m:
                problems.append(f"{name}: /{m} has {rows_m} rows, {g['timestamps'].shape[0]} times")
            if int(attrs.get("dim", -1)) != facts["dims"][m]:
                problems.append(f"{name}: /{m} dim attribute {attrs.get('dim')} != "
                                f"{facts['dims'][m]}")
            if off.shape[0] == n + 1:
                counts = np.diff(off)
                key = "n_frames" if m == "image" else "n_audio"
                for r in rows:
                    i = r["row"]
                    if i < n and int(counts[i]) != r[key]:
                        problems.append(f"{name}: {r['clip_id']}: index {key} {r[key]} != "
                                        f"{int(counts[i])}")
        index_ids = [None] * n
        for r in rows:
            if 0 <= r["row"] < n:
                index_ids[r["row"]] = r["clip_id"]
            else:
                problems.append(f"{name}: index row {r['row']} of {r['clip_id']} out of range")
        if index_ids != ids:
            problems.append(f"{name}: clip ids differ from index.jsonl")
    return facts, problems


def validate(folder: str | os.PathLike) -> tuple[dict[str, Any], list[str]]:
    """Summary of a feature folder and every inconsistency between its shards and its index."""
    folder = Path(folder)
    paths = shard_paths(folder)
    problems: list[str] = []
    try:
        index = read_index(folder)
    except (ValueError, UnicodeDecodeError) as e:  # a damaged index is a finding, not a crash
        problems.append(f"{folder / INDEX}: unreadable ({type(e).__name__}: {e})")
        index = []
    good = [r for r in index if isinstance(r, dict) and {"clip_id", "shard", "row"} <= r.keys()]
    if len(good) != len(index):
        problems.append(f"{folder / INDEX}: a line lacks clip_id/shard/row")
        index = good
    if not (folder / INDEX).exists():
        problems.append(f"{folder / INDEX}: missing")
    by_shard: dict[str, list[dict]] = {}
    for r in index:
        by_shard.setdefault(r["shard"], []).append(r)
    names = {p.name for p in paths}
    problems += [f"{s}: in index.jsonl but not on disk" for s in by_shard if s not in names]
    ids = [r["clip_id"] for r in index]
    if len(ids) != len(set(ids)):
        problems.append("index.jsonl: a clip id appears more than once")
    summary: dict[str, Any] = {"folder": str(folder), "shards": len(paths), "clips": 0,
                               "frames": 0, "audio_rows": 0, "dims": {}, "models": {},
                               "bytes": sum(p.stat().st_size for p in paths)}
    for p in paths:
        facts, probs = _check_shard(p, by_shard.get(p.name, []))
        problems += probs
        summary["clips"] += facts["clips"]
        summary["frames"] += facts["image"]
        summary["audio_rows"] += facts["audio"]
        for m in MODALITIES:
            for key in ("dims", "models"):
                if m in facts[key]:
                    old = summary[key].setdefault(m, facts[key][m])
                    if old != facts[key][m]:
                        problems.append(f"{p.name}: /{m} {key[:-1]} {facts[key][m]} != {old}")
    if summary["clips"] != len(index):
        problems.append(f"index.jsonl has {len(index)} clips, shards hold {summary['clips']}")
    # Model attributes from the first shard that opens (a damaged one is reported above).
    summary["image_attrs"], summary["audio_attrs"] = {}, {}
    for p in paths:
        try:
            with h5py.File(p, "r") as f:
                summary["image_attrs"] = read_attrs(f["image"])
                summary["audio_attrs"] = read_attrs(f["audio"])
            break
        except (OSError, KeyError):
            continue
    return summary, problems
