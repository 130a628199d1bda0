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

import hashlib
import importlib
import inspect
import json
import sysconfig
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
    if not module_name or not class_name or module_name.startswith("."):
        raise UsageError(f"--model {name!r}: give package.module:ClassName (an absolute module "
                         "path, its folder on PYTHONPATH)")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):  # the module itself is not found
            raise UsageError(f"--model {name}: cannot import {module_name} (no module named "
                             f"{e.name!r}; is its folder on PYTHONPATH?)") from None
        raise UsageError(f"--model {name}: importing {module_name} failed ({e})") from None
    except Exception as e:  # its own code failed as it was imported
        raise UsageError(f"--model {name}: importing {module_name} failed "
                         f"({type(e).__name__}: {e})") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        what = "not found" if cls is None else "not a torch.nn.Module class"
        raise UsageError(f"--model {name}: {class_name} in {module_name} is {what}")
    return cls


def model_source(name: str) -> dict[str, Any]:
    """What a run records of its own model: the import path, the class's source file and the
    sha256 of it and of the files of its base classes outside torch and installed packages
    (``files``), one digest over them all (``sha256``)."""
    cls = find_class(name)
    try:
        path = Path(inspect.getfile(cls)).resolve()
    except TypeError:
        raise UsageError(f"--model {name}: the class has no source file to record") from None
    files = {str(p): sha256_of(p) for p in _own_files(cls)}
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {"class": name, "file": str(path), "sha256": digest, "files": files}


def _own_files(cls: type) -> list[Path]:
    """The source files of ``cls`` and its base classes that are the user's: not torch's, not
    the standard library's, not an installed package's."""
    library = {Path(p).resolve() for p in (sysconfig.get_paths()["stdlib"],
                                           sysconfig.get_paths()["purelib"],
                                           sysconfig.get_paths()["platlib"])}
    out: list[Path] = []
    for base in cls.__mro__:
        try:
            path = Path(inspect.getfile(base)).resolve()
        except TypeError:  # builtins
            continue
        if path not in out and not any(lib in path.parents for lib in library):
            out.append(path)
    return out


def check_source(recorded: dict[str, str]) -> None:
    """Refuse a run whose model source file is gone or has changed since it was trained."""
    now = model_source(recorded["class"])
    if now["sha256"] != recorded["sha256"]:
        was = recorded.get("files") or {recorded["file"]: recorded["sha256"]}
        changed = [f for f in {**was, **now["files"]} if was.get(f) != now["files"].get(f)]
        raise UsageError(
            f"--model {recorded['class']}: its source {changed[0] if changed else now['file']} "
            "has changed since this run was trained; restore it, or train a new run"
        )


class OwnModel(nn.Module):
    """The user's module behind vpipe's input normalisation: per-modality mean/std buffers set
    from the training frames (``set_normalisation``), padding kept at zero."""

    def __init__(self, inner: nn.Module, dims: dict[str, int], n_outputs: int) -> None:
        super().__init__()
        self.inner = inner
        self.modalities = list(dims)
        self.n_outputs = n_outputs
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
        out = self.inner(normed)
        b = next(iter(inputs.values()))[0].shape[0]
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (b, self.n_outputs):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise UsageError(f"{type(self.inner).__name__}.forward returned {got} for a batch "
                             f"of {b} clips; the task needs a tensor ({b}, {self.n_outputs})")
        return out


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
    if not any(p.requires_grad for p in inner.parameters()):
        raise UsageError(f"--model {name}: {cls.__name__} has no trainable parameters")
    model = OwnModel(inner, dims, n_outputs)
    with torch.no_grad():  # its output's shape, before any training: two clips of one row
        model.eval()(probe_batch(dims))
    return model.train()


def probe_batch(dims: dict[str, int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {m: (torch.zeros(2, 1, d), torch.ones(2, dtype=torch.long)) for m, d in dims.items()}
