"""Metrics per task, on numpy arrays, with the definitions users compare against.

Regression: MSE, RMSE, MAE, Pearson r, and the MSE of always predicting the training mean.
Classification: accuracy, top-k accuracy, macro-F1 over the classes seen in targets or
predictions. Multilabel: Hit@k (share of clips whose k best-scored tags include a true one, as
reported for multimodal tagging), GAP@20 (YouTube-8M: every clip's 20 best (score, is-true)
pairs pooled and ranked, average precision over all true tags), mAP (mean over tags with a
positive of their average precision), and micro precision/recall/F1 at the threshold.
"""

from __future__ import annotations

import math

import numpy as np


def _clean(x: float) -> float | None:
    """JSON has no NaN: an undefined metric is null."""
    return None if x is None or not math.isfinite(x) else float(x)


def regression_metrics(pred: np.ndarray, target: np.ndarray, train_mean: float) -> dict:
    """MSE, RMSE, MAE, Pearson r and ``baseline_mse`` (predicting ``train_mean``)."""
    pred = np.asarray(pred, np.float64).reshape(-1)
    target = np.asarray(target, np.float64).reshape(-1)
    err = pred - target
    mse = float(np.mean(err**2))
    r = float("nan")
    if pred.std() > 0 and target.std() > 0:
        r = float(np.corrcoef(pred, target)[0, 1])
    return {
        "mse": mse,
        "rmse": math.sqrt(mse),
        "mae": float(np.mean(np.abs(err))),
        "pearson_r": _clean(r),
        "baseline_mse": float(np.mean((target - train_mean) ** 2)),
    }


def classification_metrics(probs: np.ndarray, target: np.ndarray, top_k: int = 5) -> dict:
    """Accuracy, top-k accuracy (k capped at the number of classes) and macro-F1."""
    probs = np.asarray(probs, np.float64)
    target = np.asarray(target).astype(np.int64)
    n_classes = probs.shape[1]
    pred = probs.argmax(1)
    k = min(top_k, n_classes)
    # stable sort on -p: ties keep the lower class index first, as argmax does
    topk = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    f1s = []
    for c in range(n_classes):
        tp = int(np.sum((pred == c) & (target == c)))
        fp = int(np.sum((pred == c) & (target != c)))
        fn = int(np.sum((pred != c) & (target == c)))
        if tp + fp + fn == 0:
            continue  # a class absent from both sides does not count
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return {
        "accuracy": float(np.mean(pred == target)),
        f"top{k}_accuracy": float(np.mean((topk == target[:, None]).any(1))),
        "macro_f1": float(np.mean(f1s)) if f1s else 0.0,
    }


def average_precision(scores: np.ndarray, positive: np.ndarray, n_positives: int | None = None):
    """AP of a ranking: mean precision at each true item's rank, over ``n_positives`` items."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    pos = np.asarray(positive, bool)[order]
    total = int(pos.sum()) if n_positives is None else n_positives
    if total == 0:
        return float("nan")
    hits = np.cumsum(pos)
    ranks = np.arange(1, len(pos) + 1)
    return float(np.sum((hits / ranks)[pos]) / total)


def hit_at_k(scores: np.ndarray, targets: np.ndarray, k: int) -> float:
    """Share of clips with at least one true tag among their ``k`` best-scored tags."""
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.take_along_axis(targets, top, axis=1).max(1) > 0))


def gap_at_k(scores: np.ndarray, targets: np.ndarray, k: int = 20) -> float:
    """YouTube-8M global average precision of the top ``k`` predictions of every clip."""
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    s = np.take_along_axis(scores, top, axis=1).reshape(-1)
    t = np.take_along_axis(targets, top, axis=1).reshape(-1)
    return average_precision(s, t > 0, int((targets > 0).sum()))


def multilabel_metrics(scores: np.ndarray, targets: np.ndarray, threshold: float = 0.5) -> dict:
    """Hit@1, Hit@2, GAP@20, mAP and micro precision/recall/F1 of ``scores >= threshold``."""
    scores = np.asarray(scores, np.float64)
    targets = np.asarray(targets, np.float64)
    aps = [
        average_precision(scores[:, c], targets[:, c] > 0)
        for c in range(scores.shape[1])
        if targets[:, c].any()
    ]
    pred = scores >= threshold
    true = targets > 0
    tp = int((pred & true).sum())
    precision = tp / int(pred.sum()) if pred.any() else 0.0
    recall = tp / int(true.sum()) if true.any() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "hit_at_1": hit_at_k(scores, targets, 1),
        "hit_at_2": hit_at_k(scores, targets, 2),
        "gap_at_20": _clean(gap_at_k(scores, targets, 20)),
        "map": float(np.mean(aps)) if aps else None,
        "precision": precision,
        "recall": recall,
        "f1": f1,
    }


def improved(task: str, new: dict, best: dict | None) -> bool:
    """Whether ``new`` beats ``best`` on the task's main metric (ties: lower loss wins)."""
    if best is None:
        return True
    from pipeline.train.tasks import get_task

    t = get_task(task)
    name, higher = t.main_metric, t.higher_is_better
    a, b = new.get(name), best.get(name)
    if a is None:
        return False
    if b is None or a != b:
        return b is None or (a > b if higher else a < b)
    return new.get("loss", math.inf) < best.get("loss", math.inf)
