"""``vpipe train --model package.module:ClassName``: a researcher's own ``torch.nn.Module``
trained by vpipe's loop, on vpipe's split, with its task's loss, metrics, baseline, early
stopping, checkpoints, folds, ``evaluate`` and ``predict``.

The contract (README, "Your own model"):

- ``ClassName(dims, n_outputs)``: ``dims`` maps each modality the run uses (``image``,
  ``audio``, ``text``) to its feature width, in the order the batches hold them; ``n_outputs``
  is the head's width (1 for regression, the classes for classification and multilabel).
- ``forward(inputs)``: ``inputs[modality] = (x, lengths)``, ``x`` a float tensor ``(B, T, D)``
  of that modality's rows padded with zeros to the batch's longest clip, ``lengths`` a CPU
  int64 tensor ``(B,)`` of each clip's true rows. A clip without rows in a modality has length
  0 and all zeros (pack with ``lengths.clamp(min=1)`` and zero its output, as vpipe's own
  models do). Returns ``(B, n_outputs)``: values, logits or tag logits, as the task's loss
  takes them (MSE on standardised targets, cross-entropy, BCE with logits).
- Its features arrive normalised with the training split's mean and std per dimension (the
  statistics live in :class:`OwnModel`'s buffers, so a checkpoint carries them).

What a run records of the class: its import path and its source file's sha256
(:func:`model_source`); a run whose source has changed since is refused by resume,
``evaluate`` and ``predict`` with one line (:func:`check_source`).
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import UsageError
from pipeline.files import sha256_of


def find_class(name: str) -> type[nn.Module]:
    """The class ``package.module:ClassName`` names; a UsageError in one line when it cannot
    be imported or is not a ``torch.nn.Module``."""
    module_name, _, class_name = name.partition(":")
    if not module_name or not class_name:
        raise UsageError(f"--model {name!r}: give package.module:ClassName")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # not found, or its own import failed: say which
        raise UsageError(f"--model {name}: cannot import {module_name} ({type(e).__name__}: "
                         f"{e}; is its folder on PYTHONPATH?)") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        what = "not found" if cls is None else "not a torch.nn.Module class"
        raise UsageError(f"--model {name}: {class_name} in {module_name} is {what}")
    return cls


def model_source(name: str) -> dict[str, str]:
    """What a run records of its own model: the import path, the source file, its sha256."""
    cls = find_class(name)
    try:
        path = Path(inspect.getfile(cls)).resolve()
    except TypeError:
        raise UsageError(f"--model {name}: the class has no source file to record") from None
    return {"class": name, "file": str(path), "sha256": sha256_of(path)}


def check_source(recorded: dict[str, str]) -> None:
    """Refuse a run whose model source file is gone or has changed since it was trained."""
    now = model_source(recorded["class"])
    if now["sha256"] != recorded["sha256"]:
        raise UsageError(
            f"--model {recorded['class']}: its source {now['file']} has changed since this run "
            f"was trained (sha256 {recorded['sha256'][:12]}... then, {now['sha256'][:12]}... "
            "now); restore it, or train a new run"
        )


class OwnModel(nn.Module):
    """The user's module behind vpipe's input normalisation: per-modality mean/std buffers set
    from the training frames (``set_normalisation``), padding kept at zero."""

    def __init__(self, inner: nn.Module, dims: dict[str, int]) -> None:
        super().__init__()
        self.inner = inner
        self.modalities = list(dims)
        for m, d in dims.items():
            self.register_buffer(f"mean_{m}", torch.zeros(d))
            self.register_buffer(f"std_{m}", torch.ones(d))

    def set_normalisation(self, stats: dict[str, tuple]) -> None:
        for m, (mean, std) in stats.items():
            getattr(self, f"mean_{m}").copy_(torch.as_tensor(mean))
            getattr(self, f"std_{m}").copy_(torch.as_tensor(std))

    def forward(self, inputs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        normed = {}
        for m in self.modalities:
            x, lengths = inputs[m]
            steps = torch.arange(x.shape[1], device=x.device)
            mask = steps[None, :] < lengths.to(x.device)[:, None]
            mean, std = getattr(self, f"mean_{m}"), getattr(self, f"std_{m}")
            normed[m] = ((x - mean) / std * mask[..., None], lengths)
        return self.inner(normed)


def build_own_model(name: str, dims: dict[str, int], n_outputs: int,
                    recorded: dict[str, Any] | None) -> OwnModel:
    """The user's model inside :class:`OwnModel`, its source checked against ``recorded``
    (the run's, when there is one)."""
    if recorded is not None:
        check_source(recorded)
    cls = find_class(name)
    try:
        inner = cls(dict(dims), n_outputs)
    except Exception as e:
        raise UsageError(f"--model {name}: {cls.__name__}(dims, n_outputs) failed "
                         f"({type(e).__name__}: {e})") from None
    return OwnModel(inner, dims)
