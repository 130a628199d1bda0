"""``vpipe inspect``: every shard checked against ``index.jsonl`` and the schema."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.ids import view_of
from pipeline.shards.index import parse_index
from pipeline.shards.schema import (
    CHECKSUMS,
    MODALITIES,
    TEXT,
    VIDEO,
    DamagedFeatures,
    read_attrs,
    read_dataset,
    shard_paths,
)

ROOT_ATTRS = ("schema_version", "vpipe_version", "created")
GROUP_ATTRS = {
    "image": ("model", "weights", "layer", "dim", "preprocessing", "sampling"),
    "audio": ("model", "weights", "sample_rate", "window_s", "hop_s", "postprocess", "dim"),
    TEXT: ("model", "weights", "dim", "max_chars", "tokenizer"),
    VIDEO: ("model", "weights", "layer", "dim", "fps", "frames", "stride", "preprocessing"),
}


def _verify_checksums(f: h5py.File, name: str) -> list[str]:
    """Read every dataset whole, block by block, so that HDF5 checks each chunk's fletcher32."""
    problems = []
    keys: list[str] = []
    f.visititems(lambda k, obj: keys.append(k) if isinstance(obj, h5py.Dataset) else None)
    for k in keys:
        ds = f[k]
        if ds.size and not ds.fletcher32:
            problems.append(f"{name}: /{k} has no checksum")
            continue
        step = max(1, (64 << 20) // max(1, ds.dtype.itemsize * (ds.size // max(1, len(ds)))))
        try:
            for a in range(0, ds.shape[0] if ds.shape else 0, step):
                read_dataset(f, k, slice(a, a + step))
        except DamagedFeatures as e:
            problems.append(str(e).split("; ")[0].replace(f"{f.filename}", name, 1))
    return problems


def _check_shard(path: Path, rows: list[dict]) -> tuple[dict, list[str]]:
    """Facts about one shard and what is wrong with it (against its index rows)."""
    facts: dict[str, Any] = {"clips": 0, "image": 0, "audio": 0, "text": 0, "titled": 0,
                             "video": 0,
                             "dims": {}, "models": {}, "checksums": False}
    name = path.name
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        return facts, [f"{name}: cannot open ({e})"]
    with f:
        facts["checksums"] = read_attrs(f).get("checksums") == CHECKSUMS
        problems = _verify_checksums(f, name) if facts["checksums"] else []
        if problems:
            facts["clips"] = f["clip_ids"].shape[0] if "clip_ids" in f else 0
            return facts, problems
        try:
            return facts, _check_layout(f, name, rows, facts)
        except OSError as e:  # a shard without checksums, damaged where h5py notices
            return facts, [f"{name}: cannot be read ({e})"]


def _check_layout(f: h5py.File, name: str, rows: list[dict], facts: dict) -> list[str]:
    """What is wrong with an open shard's datasets and attributes, against its index rows."""
    problems: list[str] = []
    missing = [k for k in ("clip_ids", "source", "start", "end") if k not in f]
    missing += [f"{m}/{d}" for m in MODALITIES for d in ("features", "timestamps", "offsets")
                if m not in f or d not in f[m]]
    if missing:
        return [f"{name}: missing datasets {', '.join(missing)}"]
    ids = list(f["clip_ids"].asstr()[:])
    n = len(ids)
    row_of = {c: i for i, c in enumerate(ids)}
    facts["clips"] = n
    for k in ("source", "start", "end"):
        if f[k].shape[0] != n:
            problems.append(f"{name}: /{k} has {f[k].shape[0]} entries for {n} clips")
    problems += [f"{name}: root attribute {a!r} missing"
                 for a in ROOT_ATTRS if a not in f.attrs]
    if "view_of" in f:  # augmented views: each names the clip its id says
        said = list(f["view_of"].asstr()[:])
        wrong = [c for c, v in zip(ids, said, strict=False) if v != (view_of(c) or "")]
        if len(said) != n or wrong:
            problems.append(f"{name}: /view_of disagrees with the clip ids (e.g. "
                            f"{', '.join(wrong[:3]) or f'{len(said)} entries for {n} clips'})")
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
        problems += _offsets_problems(name, m, off, n, rows_m)
        if g["timestamps"].shape[0] != rows_m:
            problems.append(f"{name}: /{m} has {rows_m} rows, {g['timestamps'].shape[0]} times")
        if int(attrs.get("dim", -1)) != facts["dims"][m]:
            problems.append(f"{name}: /{m} dim attribute {attrs.get('dim')} != "
                            f"{facts['dims'][m]}")
        if off.shape[0] == n + 1:
            counts = np.diff(off)
            key = "n_frames" if m == "image" else "n_audio"
            for r in rows:
                i = row_of.get(r["clip_id"], r["row"])  # a wrong row is reported below
                if i < n and int(counts[i]) != r[key]:
                    problems.append(f"{name}: {r['clip_id']}: index {key} {r[key]} != "
                                    f"{int(counts[i])}")
    if TEXT in f:
        problems += _check_text(f, name, n, facts)
    if VIDEO in f:
        problems += _check_video(f, name, n, facts, rows, row_of)
    index_ids = [None] * n
    for r in rows:
        if 0 <= r["row"] < n:
            index_ids[r["row"]] = r["clip_id"]
        else:
            problems.append(f"{name}: index row {r['row']} of {r['clip_id']} out of range")
    if index_ids != ids:
        wrong = [r["clip_id"] for r in rows if 0 <= r["row"] < n
                 and r["clip_id"] in ids and ids[r["row"]] != r["clip_id"]]
        detail = (f" ({len(wrong)} clip(s) with another row, e.g. {wrong[0]}; the reader "
                  "uses the shard's)") if wrong else ""
        problems.append(f"{name}: clip ids differ from index.jsonl{detail}")
    return problems


def _offsets_problems(name: str, group: str, off: np.ndarray, n: int, rows: int) -> list[str]:
    """A group's /offsets must hold n + 1 entries rising from 0 to its row count."""
    if off.shape[0] != n + 1:
        return [f"{name}: /{group}/offsets: {off.shape[0]} entries, not {n + 1}"]
    if off[0] != 0 or np.any(np.diff(off) < 0):
        return [f"{name}: /{group}/offsets not monotone from 0"]
    if off[-1] != rows:
        return [f"{name}: /{group}/offsets ends at {off[-1]}, features have {rows}"]
    return []


def _check_text(f: h5py.File, name: str, n: int, facts: dict) -> list[str]:
    """What is wrong with a shard's /text group (features, offsets, strings, attributes)."""
    g = f[TEXT]
    missing = [f"{TEXT}/{d}" for d in ("features", "offsets", "strings") if d not in g]
    if missing:
        return [f"{name}: missing datasets {', '.join(missing)}"]
    problems = []
    rows, off = g["features"].shape[0], g["offsets"][:]
    attrs = read_attrs(g)
    facts[TEXT] = rows
    facts["dims"][TEXT] = int(g["features"].shape[1])
    facts["models"][TEXT] = attrs.get("model")
    problems += [f"{name}: /{TEXT} attribute {a!r} missing"
                 for a in GROUP_ATTRS[TEXT] if a not in attrs]
    if int(attrs.get("dim", -1)) != facts["dims"][TEXT]:
        problems.append(f"{name}: /{TEXT} dim attribute {attrs.get('dim')} != "
                        f"{facts['dims'][TEXT]}")
    if g["strings"].shape[0] != n:
        problems.append(f"{name}: /{TEXT}/strings has {g['strings'].shape[0]} entries for {n} "
                        "clips")
    bad = _offsets_problems(name, TEXT, off, n, rows)
    problems += bad
    if not bad:
        facts["titled"] = int(np.count_nonzero(np.diff(off)))
    return problems


def _check_video(f: h5py.File, name: str, n: int, facts: dict, index: list[dict],
                 row_of: dict[str, int]) -> list[str]:
    """What is wrong with a shard's /video group (features, times, offsets, padding, attrs)."""
    g = f[VIDEO]
    need = ("features", "start", "end", "offsets", "padded", "dropped")
    missing = [f"{VIDEO}/{d}" for d in need if d not in g]
    if missing:
        return [f"{name}: missing datasets {', '.join(missing)}"]
    rows, off, attrs = g["features"].shape[0], g["offsets"][:], read_attrs(g)
    facts[VIDEO] = rows
    facts["dims"][VIDEO] = int(g["features"].shape[1])
    facts["models"][VIDEO] = attrs.get("model")
    problems = [f"{name}: /{VIDEO} attribute {a!r} missing"
                for a in GROUP_ATTRS[VIDEO] if a not in attrs]
    problems += [f"{name}: /{VIDEO} has {rows} rows, {g[k].shape[0]} {k} times"
                 for k in ("start", "end") if g[k].shape[0] != rows]
    problems += [f"{name}: /{VIDEO}/{k} has {g[k].shape[0]} entries for {n} clips"
                 for k in ("padded", "dropped") if g[k].shape[0] != n]
    bad = _offsets_problems(name, VIDEO, off, n, rows)
    if not bad:
        counts = np.diff(off)
        for r in index:
            i = row_of.get(r["clip_id"], r["row"])
            if i < n and "n_video" in r and int(counts[i]) != r["n_video"]:
                bad.append(f"{name}: {r['clip_id']}: index n_video {r['n_video']} != "
                           f"{int(counts[i])}")
    return problems + bad


def validate(folder: str | os.PathLike) -> tuple[dict[str, Any], list[str]]:
    """Summary of a feature folder and every inconsistency between its shards and its index."""
    folder = Path(folder)
    paths = shard_paths(folder)
    # A damaged index is a finding, not a crash; its good lines are still checked.
    index, problems = parse_index(folder)
    by_shard: dict[str, list[dict]] = {}
    for r in index:
        by_shard.setdefault(r["shard"], []).append(r)
    names = {p.name for p in paths}
    problems += [f"{s}: in index.jsonl but not on disk" for s in by_shard if s not in names]
    ids = [r["clip_id"] for r in index]
    if len(ids) != len(set(ids)):
        problems.append("index.jsonl: a clip id appears more than once")
    summary: dict[str, Any] = {"folder": str(folder), "shards": len(paths), "clips": 0,
                               "frames": 0, "audio_rows": 0, "text_rows": 0, "titled": 0,
                               "video_rows": 0,
                               "dims": {}, "models": {},
                               "bytes": sum(p.stat().st_size for p in paths),
                               "no_checksums": 0}
    for p in paths:
        facts, probs = _check_shard(p, by_shard.get(p.name, []))
        problems += probs
        summary["no_checksums"] += not facts["checksums"]
        summary["clips"] += facts["clips"]
        summary["frames"] += facts["image"]
        summary["audio_rows"] += facts["audio"]
        summary["text_rows"] += facts[TEXT]
        summary["titled"] += facts["titled"]
        summary["video_rows"] += facts[VIDEO]
        for m in (*MODALITIES, TEXT, VIDEO):
            for key in ("dims", "models"):
                if m in facts[key]:
                    old = summary[key].setdefault(m, facts[key][m])
                    if old != facts[key][m]:
                        problems.append(f"{p.name}: /{m} {key[:-1]} {facts[key][m]} != {old}")
    if summary["clips"] != len(index):
        problems.append(f"index.jsonl has {len(index)} clips, shards hold {summary['clips']}")
    # Model attributes from the first shard that opens (a damaged one is reported above).
    summary["image_attrs"], summary["audio_attrs"], summary["text_attrs"] = {}, {}, {}
    summary["video_attrs"] = {}
    for p in paths:
        try:
            with h5py.File(p, "r") as f:
                summary["image_attrs"] = read_attrs(f["image"])
                summary["audio_attrs"] = read_attrs(f["audio"])
                if TEXT in f:
                    summary["text_attrs"] = read_attrs(f[TEXT])
                if VIDEO in f:
                    summary["video_attrs"] = read_attrs(f[VIDEO])
            break
        except (OSError, KeyError):
            continue
    return summary, problems
