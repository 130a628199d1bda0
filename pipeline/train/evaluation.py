"""A model's figures on a split, the trivial predictor's, and the summary of a finished run."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.train.config import ModelSpec
from pipeline.train.data import ClipSequences
from pipeline.train.inputs import Prepared
from pipeline.train.metrics import MAIN_METRIC, task_metrics
from pipeline.train.model import SequenceModel, run_model


def run_metrics(spec: ModelSpec, outputs: np.ndarray, targets: np.ndarray) -> dict:
    """Task metrics of ``outputs``, with the run's top_k, threshold and training mean."""
    return task_metrics(
        spec.task,
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
) -> dict:
    """Loss and task metrics of the model on one split ({} for an empty split)."""
    if len(data) == 0:
        return {}
    out, loss = run_model(model, data, targets, spec, device)
    return {"loss": loss, **run_metrics(spec, out, targets)}


def baseline_outputs(task: str, train_targets: np.ndarray, n: int, n_classes: int) -> np.ndarray:
    """The trivial predictor: the training mean, class frequencies or tag frequencies."""
    if task == "regression":
        return np.full(n, float(train_targets.mean()))
    if task == "classification":
        prior = np.bincount(train_targets, minlength=n_classes) / len(train_targets)
    else:
        prior = train_targets.mean(0)
    return np.tile(prior, (n, 1))


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
    for split in ("val", "test"):
        n = len(p.split_ids[split])
        if n:
            trivial = baseline_outputs(spec.task, p.targets["train"], n, len(spec.classes))
            base[split] = run_metrics(spec, trivial, p.targets[split])
    figures = {s: evaluate(model, p.data[s], p.targets[s], spec, device) for s in p.split_ids}
    return {
        "task": spec.task,
        "task_source": p.task_reason,
        "model": spec.config.model,
        "modalities": spec.modalities,
        "main_metric": MAIN_METRIC[spec.task][0],
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "stopped_early": stopped,
        "train": figures["train"],
        "val": figures["val"],
        "test": figures["test"],
        "baseline": base,
        "n_clips": {s: len(v) for s, v in p.split_ids.items()},
        "n_sources": {s: len(set(p.store.select(v).column("source")))
                      for s, v in p.split_ids.items()},
        "unlabeled_clips": len(p.joined.unlabeled),
        "unknown_label_ids": len(p.joined.unknown),
        "seconds_per_epoch": round(float(np.mean([r["seconds"] for r in history])), 3)
        if history
        else None,
        "device": str(device),
    }
