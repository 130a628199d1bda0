"""Classification: one class per clip, cross-entropy, judged by accuracy."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import UsageError
from pipeline.train.metrics import classification_metrics
from pipeline.train.tasks.labelled import LabelTask, at_least_two


class Classification(LabelTask):
    name = "classification"
    main_metric, higher_is_better = "accuracy", True

    def check_labels(self, labels: dict[str, str]) -> list[str]:
        empty = [i for i, v in labels.items() if not v]
        if empty:
            raise UsageError(
                f"{len(empty)} labels are empty (e.g. {', '.join(empty[:3])}); "
                "use --task multilabel for clips without tags"
            )
        return at_least_two(self.name, sorted(set(labels.values())))

    def encode(self, label: str, classes: list[str]) -> np.ndarray:
        return np.array(classes.index(label), np.int64)

    def known_target(self, label: str, classes: list[str]):
        if label not in classes:
            return None, False
        return np.int64(classes.index(label)), True

    def loss(self, spec, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.float(), y)

    value_name = "scores"

    def value_layer(self, spec) -> torch.nn.Module:
        return torch.nn.Softmax(dim=1)  # class probabilities

    def metrics(self, outputs, targets, *, train_mean, top_k, threshold) -> dict:
        return classification_metrics(outputs, targets, top_k)

    def source_target(self, targets: np.ndarray):
        return np.bincount(targets).argmax()  # the most common class of its clips

    def baseline(self, train_targets: np.ndarray, n: int, n_classes: int) -> np.ndarray:
        prior = np.bincount(train_targets, minlength=n_classes) / len(train_targets)
        return np.tile(prior, (n, 1))

    def describe(self, classes: list[str], out: np.ndarray, threshold: float) -> dict:
        scores = {c: round(float(s), 6) for c, s in zip(classes, out, strict=True)}
        k = int(np.argmax(out))
        return {"prediction": classes[k], "score": scores[classes[k]], "scores": scores}


TASK = Classification()
