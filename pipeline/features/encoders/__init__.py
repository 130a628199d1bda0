"""The encoders of ``vpipe features``, one module per family behind one interface
(:class:`~.registry.Encoder`) and a registry by name (:func:`encoder_for`); :mod:`.loaded`
holds :class:`~.loaded.Encoders`, the set a run uses on its device and precision.

Families: :mod:`.torchvision_image` and :mod:`.hf_image` (the ``image`` modality, sharing
:mod:`.image`'s :class:`Preprocessing`), :mod:`.vggish` (``audio``), :mod:`.hf_text`
(``text``), :mod:`.torchvision_video` and :mod:`.hf_video` (``video``, sharing
:mod:`.video`'s windows). A new one is a new module here, imported below so that it
registers; the stage, the sources, the Ray actors and ``vpipe run``'s checks see encoders only
through this module. Importing it (the CLI does, for the families' options) imports no torch:
:class:`~.loaded.Encoders` and :func:`~.loaded.load_encoders`, which do, are in
:mod:`.loaded`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.features.encoders import (  # registers
    hf_image,
    hf_text,
    hf_video,
    torchvision_image,
    torchvision_video,
    vggish,
)
from pipeline.features.encoders.image import ImageEncoder, Preprocessing
from pipeline.features.encoders.registry import (
    MODALITIES,
    Encoder,
    EncoderOption,
    declared_options,
    encoder_for,
    encoders_of,
    register_encoder,
)
from pipeline.features.weights import MissingWeights, missing_error

__all__ = [
    "MODALITIES", "Encoder", "EncoderOption", "ImageEncoder", "Preprocessing", "Resolved",
    "check_encoders", "declared_options", "encoder_for", "encoders_of", "plan_identity",
    "register_encoder", "resolve_encoders",
]
FAMILIES = (hf_image, hf_text, hf_video, torchvision_image, torchvision_video, vggish)


@dataclass(frozen=True)
class Resolved:
    """One modality's encoder as a run chose it: its family, name and found weights."""

    family: type[Encoder]
    name: str
    weights: Any

    def load(self, opts: Any) -> Any:
        return self.family.load(self.name, opts, self.weights)


def check_encoders(opts: Any) -> dict[str, tuple[type[Encoder], str]]:
    """Each modality's family for the run's options, its options checked (UsageError): no
    file is looked for yet."""
    opts.check()
    chosen = {m: (encoder_for(m, name), name) for m, name in opts.encoder_names().items()}
    for family, name in chosen.values():
        family.check(name, opts)
    return chosen


def resolve_encoders(opts: Any) -> dict[str, Resolved]:
    """Every modality's weights, found before any work starts: one error names every missing
    published file, with how to provide each."""
    missing: list[MissingWeights] = []
    out = {}
    for modality, (family, name) in check_encoders(opts).items():
        if missing and not family.collects_missing:  # its own lookup fails on its own
            raise missing_error(missing)
        out[modality] = Resolved(family, name, family.resolve(name, opts, missing))
    if missing:
        raise missing_error(missing)
    return out


def plan_identity(resolved: dict[str, Resolved]) -> dict[str, Any]:
    """The weights' identities as the stage records them, where known before loading."""
    out: dict[str, Any] = {}
    for r in resolved.values():
        if r.family.identity_at_plan:
            out.update(r.family.identity(r.weights))
    return out



