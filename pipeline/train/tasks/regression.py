"""Regression: a number per clip, an MSE on standardised targets, judged by MSE."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import UsageError
from pipeline.train.labels import FLOAT32_MAX, fits_float32, is_number
from pipeline.train.metrics import regression_metrics
from pipeline.train.tasks.labelled import LabelTask


class Regression(LabelTask):
    name = "regression"
    main_metric, higher_is_better = "mse", False
    unknown_labels = "are not numbers (left out)"

    def check_labels(self, labels: dict[str, str]) -> list[str]:
        where = ", ".join(list(labels)[:3])
        bad = [i for i, v in labels.items() if not is_number(v)]
        if bad:
            raise UsageError(
                f"regression needs numeric labels: {len(bad)} are not "
                f"(e.g. {bad[0]}={labels[bad[0]]!r})"
            )
        nan = [i for i, v in labels.items() if not math.isfinite(float(v))]
        if nan:
            raise UsageError(
                f"{len(nan)} regression targets are NaN or infinite (e.g. {', '.join(nan[:3])})"
            )
        # Targets are float32: a finite 1e39 became inf there and every loss NaN.
        big = [i for i, v in labels.items() if not fits_float32(float(v))]
        if big:
            raise UsageError(
                f"{len(big)} regression targets are beyond the float32 range "
                f"(±{FLOAT32_MAX:.3g}; e.g. {big[0]}={labels[big[0]]!r}); rescale the labels"
            )
        if len({float(v) for v in labels.values()}) < 2:
            raise UsageError(f"every regression target is the same value ({where} …)")
        return []

    def encode(self, label: str, classes: list[str]) -> np.ndarray:
        return np.array(float(label), np.float32)

    def known_target(self, label: str, classes: list[str]):
        try:
            y = float(label)
        except ValueError:
            y = math.nan
        return (np.float32(y), True) if fits_float32(y) else (None, False)

    def n_outputs(self, classes: list[str]) -> int:
        return 1

    def target_norm(self, p) -> tuple[float, float]:
        # In float64: the float32 targets' std overflows (inf) for labels around 1e20.
        t64 = p.targets["train"].astype(np.float64)
        return (float(t64.mean()), float(t64.std()) or 1.0)

    def loss(self, spec, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mu, sd = spec.target_norm
        return F.mse_loss(out.float()[:, 0], (y.float() - mu) / sd)

    value_name = "value"

    def value_layer(self, spec) -> torch.nn.Module:
        return Denormalise(*spec.target_norm)

    def metrics(self, outputs, targets, *, train_mean, top_k, threshold) -> dict:
        return regression_metrics(outputs, targets, train_mean)

    def source_target(self, targets: np.ndarray):
        return targets.mean()

    def baseline(self, train_targets: np.ndarray, n: int, n_classes: int) -> np.ndarray:
        return np.full(n, float(train_targets.mean()))

    def describe(self, classes: list[str], out: np.ndarray, threshold: float) -> dict:
        return {"prediction": float(out)}


class Denormalise(torch.nn.Module):
    """The model's standardised output ``(B, 1)`` back in the labels' units ``(B,)``."""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, out: torch.Tensor) -> torch.Tensor:
        return out[:, 0] * self.std + self.mean


TASK = Regression()
