"""``vpipe features``: frame features (ResNet, any torchvision classifier, ``hf:`` CLIP-style
encoders), VGGish audio features and title features into HDF5 shards.

One job per module: :mod:`.options` (the stage's options), :mod:`.weights` (where weights come
from), :mod:`.hf` (Hugging Face models found in a folder or the hub cache), :mod:`.encoders`
(one module per family of encoders, a registry by name, and the set a run uses),
:mod:`.checks` (what ``vpipe run`` checks before any stage runs), :mod:`.text` (the titles
file), :mod:`.sources` (where frames come from: extract-frames folders or decoded videos) and
:mod:`.stage` (plan, the batching loop, the shard sink). ``extract_features`` and
``load_encoders`` load torch, so they are imported on first use.
"""

from __future__ import annotations

from typing import Any

from pipeline.features.options import FeatureOptions

__all__ = ["FeatureOptions", "extract_features", "load_encoders"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `vpipe --help` and the workflow planner read FeatureOptions without torch.
    if name == "extract_features":
        from pipeline.features.stage import extract_features

        return extract_features
    if name == "load_encoders":
        from pipeline.features.encoders.loaded import load_encoders

        return load_encoders
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
