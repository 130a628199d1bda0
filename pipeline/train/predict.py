"""Using a trained run: ``evaluate_run`` (metrics on labelled clips) and ``predict_run``
(per-clip predictions and the mean over each source video's clips, as JSON lines)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from pipeline.device import pick_device, torch_threads
from pipeline.errors import UsageError
from pipeline.files import atomic_path, atomic_write_text, content_identity, sha256_of
from pipeline.shards import FeatureStore
from pipeline.train.config import DEFAULT_CHECKPOINT, ModelSpec, TrainConfig
from pipeline.train.evaluation import (
    clip_sources,
    evaluate,
    random_weights,
    random_weights_note,
)
from pipeline.train.inputs import open_store
from pipeline.train.labels import join_labels, read_labels
from pipeline.train.model import run_model, title_tokens_of
from pipeline.train.runs import load_run, read_splits
from pipeline.train.sequences import ClipSequences, present_modalities, warn_empty_clips
from pipeline.train.tasks import get_task

# Feature attributes that must agree between training and use for the numbers to mean anything.
FEATURE_IDENTITY = (
    "model",
    "weights",
    "layer",
    "dim",
    "preprocessing",
    "sampling",
    "window_s",
    "hop_s",
    "postprocess",
)


def _identity(key: str, value, attrs: dict):
    """An attribute as it decides the features: a weights file or model folder by its content,
    not the path it was given by (``model`` is that path for a folder's model: its weights'
    sha256 say what it is)."""
    weights = attrs.get("weights")
    if key == "model" and isinstance(weights, dict) and weights.get("kind") == "folder":
        return None
    return content_identity(value) if key == "weights" else value


def feature_differences(spec: ModelSpec, store: FeatureStore) -> list[str]:
    """Where the folder's feature attributes differ from the ones the run was trained on."""
    present = present_modalities(store)
    out = []
    for m in spec.dims:
        if m not in present:
            continue  # the attributes of a modality without rows say nothing
        trained, now = spec.feature_attrs.get(m, {}), store.attrs(m)
        for k in FEATURE_IDENTITY:
            if k in trained and (_identity(k, trained.get(k), trained)
                                 != _identity(k, now.get(k), now)):
                out.append(f"{m} {k}: {trained.get(k)!r} there, {now.get(k)!r} here")
    return out


def open_checked(
    features: str | Path, spec: ModelSpec, prog: str, strict: bool = False
) -> FeatureStore:
    """Open a feature folder and check it against what the run was trained on (``strict``:
    any difference in how the features were made is an error, not a warning)."""
    store = open_store(features)
    present = present_modalities(store)
    for m, dim in spec.dims.items():
        if m not in present:
            print(
                f"{prog}: warning: no {m} features in {features}; the run's {m} branch sees "
                "empty sequences",
                file=sys.stderr,
            )
            continue
        if store.dim(m) != dim:
            raise UsageError(
                f"{features}: {m} features have dim {store.dim(m)}, the run was trained on {dim}"
            )
    diff = feature_differences(spec, store)
    if diff and strict:
        store.close()
        raise UsageError(
            f"{features}: the features of the new videos are not made as the run's were "
            f"({'; '.join(diff)})"
        )
    for d in diff[:1]:
        m = d.split(" ", 1)[0]
        print(f"{prog}: warning: {m} features differ from the training ones ({d.split(' ', 1)[1]})",
              file=sys.stderr)
    return store


def _open(run: str | Path, features: str | Path, checkpoint: str, prog: str,
          strict: bool = False):
    """The run's model and spec, and the feature folder checked against them."""
    model, spec = load_run(run, checkpoint)
    if mods := random_weights(spec.feature_attrs):
        print(f"{prog}: warning: {random_weights_note(mods)}", file=sys.stderr)
    return model, spec, open_checked(features, spec, prog, strict)


def _sequences(model, spec: ModelSpec, store: FeatureStore, ids: list[str], device: str,
               stream: bool = False):
    """Move the model to ``device``; the clips ``ids`` as the run reads them (in RAM, or per
    batch with ``stream``), and the device."""
    dev = pick_device(device)
    model.to(dev)
    data = ClipSequences(store, ids, spec.modalities, spec.config.max_frames, stream=stream,
                         dims=spec.dims, title_tokens=title_tokens_of(model))
    return data, dev


def known_targets(
    spec: ModelSpec, labels: dict[str, str], prog: str
) -> tuple[list[str], np.ndarray]:
    """Targets of the clips whose label the run knows; the others are reported and left out."""
    task = get_task(spec.task)
    keep, ys, bad = [], [], []
    for cid, v in labels.items():
        y, known = task.known_target(v, spec.classes)
        if not known:
            bad.append(cid)
        if y is not None:
            ys.append(y)
            keep.append(cid)
    if bad:
        print(f"{prog}: {len(bad)} labels {task.unknown_labels} (e.g. {', '.join(bad[:3])})",
              file=sys.stderr)
    if not keep:
        raise UsageError("no labelled clip can be evaluated")
    return keep, np.stack(ys)


def evaluate_run(
    run: str | Path,
    features: str | Path,
    labels_csv: str | Path,
    *,
    checkpoint: str = DEFAULT_CHECKPOINT,
    split: str | None = None,
    device: str = TrainConfig.device,
    stream: bool = False,
) -> dict:
    """Metrics of a run on the labelled clips of ``features`` (or on one split of the run)."""
    prog = "vpipe evaluate"
    model, spec, store = _open(run, features, checkpoint, prog)
    n, metrics = get_task(spec.task).evaluate_run(Path(run), model, spec, store, Path(features),
                                                  Path(labels_csv), split, device, stream)
    store.close()
    return {
        "run": str(run),
        "checkpoint": checkpoint,
        "features": str(features),
        "labels": str(labels_csv),
        "labels_sha256": sha256_of(labels_csv),
        "split": split or "all",
        "task": spec.task,
        "n_clips": n,
        "metrics": metrics,
    }


def evaluate_labels(run: Path, model, spec: ModelSpec, store: FeatureStore, features: Path,
                    labels_csv: Path, split: str | None, device: str, stream: bool
                    ) -> tuple[int, dict]:
    """A label task's `vpipe evaluate`: (clips scored, figures per clip and per source)."""
    prog = "vpipe evaluate"
    joined = join_labels(store, read_labels(labels_csv))
    joined.report(len(store), prog)
    labels = joined.labels
    if split is not None:
        ids = set(read_splits(run).get(split, ()))
        labels = {c: v for c, v in labels.items() if c in ids}
        if not labels:
            raise UsageError(f"no labelled clip of the run's {split} split is in {features}")
    ids, targets = known_targets(spec, labels, prog)
    data, dev = _sequences(model, spec, store, ids, device, stream)
    with torch_threads():
        metrics = evaluate(model, data, targets, spec, dev,  # ids is never empty
                           clip_sources(store, ids))
    return len(ids), metrics


def run_splits(run: str | Path) -> dict[str, str]:
    """Clip id -> the split ("train", "val", "test") the run put it in; clips the run never
    saw are absent (their prediction lines say ``"split": null``)."""
    splits = read_splits(run)
    return {cid: name for name, ids in splits.items() for cid in ids}


def check_output(path: str | Path) -> Path:
    """A result file's path; a folder given as the file, or a file where its folders would
    be made (-o labels.csv/preds.jsonl), is refused."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path} is a folder; give a file name (e.g. {path / 'preds.jsonl'})")
    above = next((p for p in path.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise UsageError(f"{path}: {above} is a file, not a folder")
    return path


def write_output(path: str | Path, text: str) -> None:
    """Write a result file whole, creating its folder (-o runs/new/preds.jsonl just works)."""
    path = check_output(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def _describe(spec: ModelSpec, out: np.ndarray, threshold: float) -> dict:
    """One prediction as JSON fields: a value, a class with scores, or tags over threshold."""
    return get_task(spec.task).describe(spec.classes, out, threshold)


def predict_run(
    run: str | Path,
    features: str | Path,
    out_path: str | Path,
    *,
    checkpoint: str = DEFAULT_CHECKPOINT,
    threshold: float | None = None,
    device: str = TrainConfig.device,
    stream: bool = False,
    new_videos: bool = False,
) -> dict:
    """Write one JSON line per clip, then one per source video (mean over its clips).

    The clips are run shard by shard (so ``stream`` reads each shard in order, once); the
    lines are in the index's order. ``new_videos``: the features were just made from videos
    given to predict, so they must be made exactly as the run's were, and no clip belongs to a
    split of the run (even one whose file name matches)."""
    prog = "vpipe predict"
    if threshold is not None and not 0 <= threshold <= 1:
        raise UsageError("--threshold is a score in [0, 1]")
    check_output(out_path)  # refused before the model runs, not after
    model, spec, store = _open(run, features, checkpoint, prog, strict=new_videos)
    thr = spec.config.threshold if threshold is None else threshold
    views = store.views()
    if views:  # augmented views are training data: the clips themselves are predicted
        originals = store.select([c for c in store.clip_ids if c not in views])
        store.close()
        store = originals
    ids = store.clip_ids
    warn_empty_clips(store, ids, spec.modalities, prog)
    if new_videos and len(spec.modalities) > 1:  # e.g. a video without sound, an audio branch
        for m in spec.modalities:
            warn_empty_clips(store, ids, [m], prog)
    path = check_output(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        n, n_src = get_task(spec.task).write_predictions(f, Path(run), model, spec, store, thr,
                                                         device, stream, new_videos)
    store.close()
    return {"clips": n, "sources": n_src, "out": str(out_path)}


def prediction_lines(
    model, spec: ModelSpec, store: FeatureStore, ids: list[str], split_of: dict[str, str],
    threshold: float, device: str, stream: bool = False, extra: dict | None = None,
) -> tuple[list[dict], list[dict]]:
    """The clip lines of ``ids`` (in that order) and one line per source (the mean of its
    clips among ``ids``), each with ``extra`` fields after the id. The clips are run shard by
    shard (so ``stream`` reads each shard in order, once)."""
    order = store.select(ids).clip_ids_in_read_order()
    data, dev = _sequences(model, spec, store, order, device, stream)
    with torch_threads():
        outs, _ = run_model(model, data, None, spec, dev)
    at = {cid: k for k, cid in enumerate(order)}
    source_of = store.source_of()
    extra = extra or {}
    by_source: dict[str, list[int]] = {}
    splits_of: dict[str, set] = {}
    clips, sources = [], []
    for cid in ids:
        src = source_of[cid]
        by_source.setdefault(src, []).append(at[cid])
        split = split_of.get(cid)
        splits_of.setdefault(src, set()).add(split)
        clips.append({"level": "clip", "id": cid, "source": src, **extra, "split": split,
                      **_describe(spec, outs[at[cid]], threshold)})
    for src, ks in by_source.items():
        mean = np.mean(np.stack([outs[k] for k in ks]), axis=0)
        seen = splits_of[src]
        split = next(iter(seen)) if len(seen) == 1 else "mixed"
        sources.append({"level": "source", "id": src, "n_clips": len(ks), **extra,
                        "split": split, **_describe(spec, mean, threshold)})
    return clips, sources


def write_prediction_lines(f, model, spec: ModelSpec, store: FeatureStore, ids: list[str],
                           split_of: dict[str, str], threshold: float, device: str,
                           stream: bool = False) -> int:
    """Write :func:`prediction_lines` to ``f``, clips first; returns the number of sources."""
    clips, sources = prediction_lines(model, spec, store, ids, split_of, threshold, device,
                                      stream)
    for line in (*clips, *sources):
        f.write(json.dumps(line, ensure_ascii=False) + "\n")
    return len(sources)
