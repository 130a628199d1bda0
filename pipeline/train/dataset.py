"""A PyTorch ``Dataset`` over a feature folder, for training one's own model on vpipe's shards.

    from torch.utils.data import DataLoader
    from pipeline.train.dataset import FeatureDataset, collate

    ds = FeatureDataset("work/features", labels="ratings.csv", modalities=("image", "audio"))
    for batch in DataLoader(ds, batch_size=16, shuffle=True, collate_fn=collate):
        x, lengths = batch["image"]          # (B, T, D) zero-padded, (B,) true lengths
        y = batch["label"]                   # float tensor when every label is a number

Labels are matched as ``vpipe train`` matches them (a clip's own id, else its source's; file
stems made safe), and clips without one are left out. The sequences are the same
:class:`~pipeline.train.sequences.ClipSequences` the trainer reads (in RAM, or per item with
``stream=True``), uniformly subsampled to ``max_frames`` when it is set.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from pipeline.errors import UsageError
from pipeline.shards import open_features
from pipeline.train.sequences import ClipSequences, pad_batch


class FeatureDataset(torch.utils.data.Dataset):
    """Clips of a feature folder as ``{"id", "source", <modality>: (T, D) float32 tensor,
    "label"}`` items (``label``: the CSV's text, a float where it is a number; None without
    labels)."""

    def __init__(
        self,
        folder: str | os.PathLike,
        labels: str | os.PathLike | Mapping[str, str] | None = None,
        modalities: Sequence[str] = ("image",),
        max_frames: int = 0,
        stream: bool = False,
    ) -> None:
        self.store = open_features(folder)
        known = [m for m in modalities if m not in ("image", "audio")]
        if known:
            raise UsageError(f"modalities {known}: a feature folder has image and audio")
        self.modalities = list(modalities)
        self.labels: dict[str, str] | None = None
        ids = self.store.clip_ids
        if labels is not None:
            from pipeline.train.labels import LabelRow, join_labels, read_labels

            rows = (read_labels(labels) if not isinstance(labels, Mapping)
                    else {k: LabelRow(k, str(v), None, 0) for k, v in labels.items()})
            self.labels = join_labels(self.store, rows).labels
            ids = [c for c in ids if c in self.labels]
        self.sources = self.store.source_of()
        self.seqs = ClipSequences(self.store, ids, self.modalities, max_frames, stream)

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        cid = self.seqs.clip_ids[i]
        item: dict[str, Any] = {"id": cid, "source": self.sources[cid]}
        for m, a in self.seqs[i].items():
            item[m] = torch.from_numpy(np.ascontiguousarray(a))
        item["label"] = None if self.labels is None else _value(self.labels[cid])
        return item

    def close(self) -> None:
        self.store.close()


def _value(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A batch: ``id`` and ``source`` lists, each modality as ``(x (B, T, D), lengths (B,))``
    zero-padded to the batch's longest clip, and ``label`` (a float tensor when every label is
    a number, else the list)."""
    modalities = [k for k in items[0] if k not in ("id", "source", "label")]
    seqs = [{m: it[m].numpy() for m in modalities} for it in items]
    out: dict[str, Any] = {"id": [it["id"] for it in items],
                           "source": [it["source"] for it in items], **pad_batch(seqs, modalities)}
    labels = [it["label"] for it in items]
    numeric = all(isinstance(v, float) for v in labels)
    out["label"] = torch.tensor(labels, dtype=torch.float32) if numeric else labels
    return out
