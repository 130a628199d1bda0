"""Multilabel tagging: any number of tags per clip, BCE on tag logits, judged by GAP@20."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.train.labels import split_tags
from pipeline.train.metrics import multilabel_metrics
from pipeline.train.tasks.labelled import LabelTask, at_least_two


class Multilabel(LabelTask):
    name = "multilabel"
    main_metric, higher_is_better = "gap_at_20", True
    unknown_labels = "name classes the run never saw (unknown tags ignored)"

    def check_labels(self, labels: dict[str, str]) -> list[str]:
        return at_least_two(self.name, sorted({t for v in labels.values() for t in split_tags(v)}))

    def encode(self, label: str, classes: list[str]) -> np.ndarray:
        y = np.zeros(len(classes), np.float32)
        for t in split_tags(label):
            y[classes.index(t)] = 1.0
        return y

    def known_target(self, label: str, classes: list[str]):
        y = np.zeros(len(classes), np.float32)
        tags = split_tags(label)
        for t in tags:
            if t in classes:
                y[classes.index(t)] = 1.0
        return y, all(t in classes for t in tags)

    def loss(self, spec, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(out.float(), y.float())

    value_name = "scores"

    def value_layer(self, spec) -> torch.nn.Module:
        return torch.nn.Sigmoid()  # each tag's probability

    def metrics(self, outputs, targets, *, train_mean, top_k, threshold) -> dict:
        return multilabel_metrics(outputs, targets, threshold)

    def source_target(self, targets: np.ndarray):
        return targets.max(0)  # every tag of any of its clips

    def baseline(self, train_targets: np.ndarray, n: int, n_classes: int) -> np.ndarray:
        return np.tile(train_targets.mean(0), (n, 1))

    def describe(self, classes: list[str], out: np.ndarray, threshold: float) -> dict:
        scores = {c: round(float(s), 6) for c, s in zip(classes, out, strict=True)}
        tags = sorted(((c, s) for c, s in scores.items() if s >= threshold), key=lambda t: -t[1])
        return {"tags": [{"tag": c, "score": s} for c, s in tags], "scores": scores}


TASK = Multilabel()
