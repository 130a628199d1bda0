"""A model's figures on a split, the trivial predictor's, and the summary of a finished run.

Every figure is given twice: per clip, and per source (``"source"``: a source's clips'
outputs averaged, as `vpipe predict`'s source lines, each source counted once), since labels
such as a trailer's rating belong to the source and its clips are not independent samples."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.train.config import ModelSpec
from pipeline.train.inputs import Prepared
from pipeline.train.model import SequenceModel, run_model
from pipeline.train.sequences import ClipSequences
from pipeline.train.tasks import get_task


def run_metrics(spec: ModelSpec, outputs: np.ndarray, targets: np.ndarray) -> dict:
    """Task metrics of ``outputs``, with the run's top_k, threshold and training mean."""
    return get_task(spec.task).metrics(
        outputs,
        targets,
        train_mean=spec.target_norm[0],
        top_k=spec.config.top_k,
        threshold=spec.config.threshold,
    )


def evaluate(
    model: SequenceModel,
    data: ClipSequences,
    targets: np.ndarray,
    spec: ModelSpec,
    device: torch.device,
    sources: list[str] | None = None,
) -> dict:
    """Loss and task metrics of the model on one split ({} for an empty split); with the
    clips' ``sources``, also the metrics per source under ``"source"``."""
    if len(data) == 0:
        return {}
    out, loss = run_model(model, data, targets, spec, device)
    figures = {"loss": loss, **run_metrics(spec, out, targets)}
    if sources is not None:
        figures["source"] = source_metrics(spec, out, targets, sources)
    return figures


def by_source(task: str, outputs: np.ndarray, targets: np.ndarray, sources: list[str]
              ) -> tuple[np.ndarray, np.ndarray]:
    """One row per source, in first-seen order: the mean of its clips' outputs (what `vpipe
    predict` writes on its source lines) and its target: the label its clips share (labels
    given per clip: their mean for regression, every tag of any clip, the most common class)."""
    rows: dict[str, list[int]] = {}
    for k, src in enumerate(sources):
        rows.setdefault(src, []).append(k)
    outs, ys = [], []
    for ks in rows.values():
        outs.append(outputs[ks].mean(0))
        ys.append(get_task(task).source_target(targets[ks]))
    return np.stack(outs), np.asarray(ys, dtype=targets.dtype)


def source_metrics(spec: ModelSpec, outputs: np.ndarray, targets: np.ndarray,
                   sources: list[str]) -> dict:
    """The task metrics with each source (a trailer, a video) counted once."""
    outs, ys = by_source(spec.task, outputs, targets, sources)
    return {"n_sources": len(ys), **run_metrics(spec, outs, ys)}


def clip_sources(store, ids: list[str]) -> list[str]:
    """The source of each clip of ``ids``, in that order."""
    of = store.source_of()
    return [of[c] for c in ids]


def baseline_outputs(task: str, train_targets: np.ndarray, n: int, n_classes: int) -> np.ndarray:
    """The trivial predictor: the training mean, class frequencies or tag frequencies."""
    return get_task(task).baseline(train_targets, n, n_classes)


def summarise(
    model: SequenceModel,
    spec: ModelSpec,
    p: Prepared,
    history: list[dict],
    stopped: bool,
    best_epoch: int,
    device: torch.device,
) -> dict:
    """``summary.json``: the figures of ``model`` (the best checkpoint's weights) on every
    split beside the trivial predictor's, and what the run was."""
    base = {}
    of = p.store.source_of()  # once for the three splits
    sources = {s: [of[c] for c in ids] for s, ids in p.split_ids.items()}
    for split in ("val", "test"):
        n = len(p.split_ids[split])
        if n:
            trivial = baseline_outputs(spec.task, p.targets["train"], n, len(spec.classes))
            base[split] = {
                **run_metrics(spec, trivial, p.targets[split]),
                "source": source_metrics(spec, trivial, p.targets[split], sources[split]),
            }
    figures = {s: evaluate(model, p.data[s], p.targets[s], spec, device, sources[s])
               for s in p.split_ids}
    n_sources = {s: len(set(v)) for s, v in sources.items()}
    summary = {
        **summary_head(spec, p.task_reason, spec.config.model, get_task(spec.task).main_metric,
                       best_epoch, history, stopped, figures, base),
        "n_clips": {s: len(v) for s, v in p.split_ids.items()},
        "n_sources": n_sources,
        **({"views": {"trained_on": p.views["train"], "left_out": {
            "val": p.views["val"], "test": p.views["test"]}}} if p.views else {}),
        "unlabeled_clips": len(p.joined.unlabeled),
        "unknown_label_ids": len(p.joined.unknown),
        "seconds_per_epoch": round(float(np.mean([r["seconds"] for r in history])), 3)
        if history
        else None,
        "device": str(device),
    }
    if spec.config.folds:  # one fold of train_folds: its test split is the fold's sources
        summary["fold"] = {"fold": spec.config.fold, "of": spec.config.folds}
    summary["random_weights"] = random_weights(spec.feature_attrs)
    summary["warnings"] = caveats(summary)
    return summary


def summary_head(spec: ModelSpec, task_source: str, model: str, main_metric: str,
                 best_epoch: int, history: list[dict], stopped: bool, figures: dict,
                 baseline: dict) -> dict:
    """What every task's ``summary.json`` opens with: what the run was, its best epoch and
    its figures per split beside the baseline's."""
    return {
        "task": spec.task,
        "task_source": task_source,
        "model": model,
        "modalities": spec.modalities,
        "main_metric": main_metric,
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "stopped_early": stopped,
        "train": figures["train"],
        "val": figures["val"],
        "test": figures["test"],
        "baseline": baseline,
    }


# Fewer sources than this in a val or test split: its figures say little.
MIN_SOURCES = 5


def random_weights(feature_attrs: dict[str, dict]) -> list[str]:
    """The modalities whose features came from an encoder's seeded random weights, as the
    shards' attributes record them (``weights.kind``)."""
    return [m for m, attrs in feature_attrs.items()
            if isinstance(attrs.get("weights"), dict) and attrs["weights"].get("kind") == "random"]


def random_weights_note(modalities: list[str]) -> str:
    """Said wherever a run's figures are shown: they read as a real result otherwise."""
    return (f"the {', '.join(modalities)} features come from random weights: these figures "
            "say nothing of what pretrained features would give")


def small_split_notes(n_sources: dict[str, int], in_folds: bool = False) -> list[str]:
    """A val or test split of fewer than :data:`MIN_SOURCES` sources: its figures say little
    (every task says it, captions included)."""
    out = []
    for split in ("val", "test"):
        n = n_sources.get(split, 0)
        if 0 < n < MIN_SOURCES:
            remedy = ("use fewer --folds" if split == "test" and in_folds
                      else f"raise --{split}-fraction")
            out.append(f"the {split} split holds {n} source{'s' if n > 1 else ''}: its figures "
                       f"say little (at least {MIN_SOURCES} would; label more sources or "
                       f"{remedy})")
    return out


def caveats(summary: dict) -> list[str]:
    """What makes the figures of a run weak, in words: splits of too few sources, and a model
    that does not beat the trivial predictor."""
    out = []
    if summary.get("random_weights"):
        out.append(random_weights_note(summary["random_weights"]))
    out += small_split_notes(summary["n_sources"], bool(summary.get("fold")))
    task = get_task(summary["task"])
    name, higher = task.main_metric, task.higher_is_better
    side = "test" if summary["test"] else "val" if summary["val"] else None
    if side is not None:
        got = summary[side].get("source", {}).get(name)
        base = summary["baseline"].get(side, {}).get("source", {}).get(name)
        if got is not None and base is not None and (got <= base if higher else got >= base):
            out.append(f"the model does not beat the trivial baseline on {side} per source "
                       f"({name} {got:.4g}, baseline {base:.4g})")
    return out
