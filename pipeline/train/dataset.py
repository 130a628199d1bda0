"""A PyTorch ``Dataset`` over a feature folder, for training one's own model on vpipe's shards.

    from torch.utils.data import DataLoader
    from pipeline.train.dataset import FeatureDataset, collate

    ds = FeatureDataset.from_run("work/run", "train")   # the run's clips, targets, modalities
    for batch in DataLoader(ds, batch_size=16, shuffle=True, collate_fn=collate):
        x, lengths = batch["image"]          # (B, T, D) zero-padded, (B,) true lengths
        y = batch["target"]                  # as the trainer encodes it (see below)

Every modality the folder holds can be asked for (``image``, ``audio``, ``text``: the title's
token rows, never subsampled). Labels are matched as ``vpipe train`` matches them (a clip's own
id, else its source's; file stems made safe), and clips without one are left out.

Targets (``task`` given, or a run's): the task's own encoding, the one the trainer trains on
(``regression``: the value, float32; ``classification``: the class index, int64, into
``ds.classes``; ``multilabel``: a multi-hot float32 vector over ``ds.classes``). ``item["label"]``
keeps the label's text (a float when it is a number).

``pooled=True``: each modality is one ``(D,)`` vector per clip, the mean over its rows.

Empty modalities: a clip with no rows in a modality (a silent clip's audio, a clip without a
title) gets one row of zeros (pooled: a zero vector), and ``item["present"][m]`` is False. Every
length is then at least 1, so ``pack_padded_sequence`` and a mean over the rows work unchanged;
a model that should ignore the modality there masks it with ``batch["present"][m]``.

The sequences are the same :class:`~pipeline.train.sequences.ClipSequences` the trainer reads
(in RAM, or per item with ``stream=True``), uniformly subsampled to ``max_frames`` when it is set.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import UsageError
from pipeline.records import read_json, read_run_info
from pipeline.shards import open_features
from pipeline.train.labels import LabelRow, LabelSpace, join_labels, read_labels
from pipeline.train.runs import folds_of, read_splits
from pipeline.train.sequences import ClipSequences, pad_batch
from pipeline.train.tasks import get_task

LabelsArg = str | os.PathLike | Mapping[str, str] | None


class FeatureDataset(torch.utils.data.Dataset):
    """Clips of a feature folder as ``{"id", "source", <modality>: float32 tensor ((T, D), or
    (D,) pooled), "present": {modality: bool}, "label"[, "target"]}`` items (``label``: the
    CSV's text, a float where it is a number; None without labels)."""

    def __init__(
        self,
        folder: str | os.PathLike,
        labels: LabelsArg = None,
        modalities: Sequence[str] = ("image",),
        max_frames: int = 0,
        stream: bool = False,
        *,
        task: str | None = None,
        classes: Sequence[str] | None = None,
        clip_ids: Sequence[str] | None = None,
        pooled: bool = False,
    ) -> None:
        self.store = open_features(folder)
        held = self.store.modalities
        unknown = [m for m in modalities if m not in held]
        if unknown:
            raise UsageError(f"modalities {unknown}: {folder} holds {', '.join(held)}")
        self.modalities = list(dict.fromkeys(modalities))
        self.pooled = pooled
        ids = self.store.clip_ids if clip_ids is None else list(clip_ids)
        missing = [c for c in ids if c not in self.store]
        if missing:
            raise UsageError(f"{len(missing)} clips are not in {folder} (e.g. {missing[0]})")
        self.labels: dict[str, str] | None = None
        if labels is not None:
            self.labels = _joined(self.store, labels)
            ids = [c for c in ids if c in self.labels]
        self.task, self.classes, self.targets = _targets(task, classes, self.labels, ids)
        self.sources = self.store.source_of()
        self.seqs = ClipSequences(self.store, ids, self.modalities, max_frames, stream)

    @classmethod
    def from_run(
        cls,
        run: str | os.PathLike,
        split: str = "train",
        *,
        features: str | os.PathLike | None = None,
        labels: LabelsArg = None,
        modalities: Sequence[str] | None = None,
        max_frames: int | None = None,
        stream: bool = False,
        pooled: bool = False,
    ) -> FeatureDataset:
        """The clips of one split of a ``vpipe train`` run (``train``, ``val``, ``test``: the
        run's own ``splits.json``), with the run's task, classes, modalities and max_frames;
        features and labels from where the run read them unless given (a moved folder)."""
        run = Path(run)
        config = read_json(run / "config.json")
        if not isinstance(config, dict):
            folds = folds_of(run)
            hint = (f"a --folds {folds} run: use one fold's run, e.g. {run / 'fold-1'}"
                    if folds else "not a vpipe train run")
            raise UsageError(f"{run}: no config.json ({hint})")
        splits = read_splits(run)
        if split not in splits:
            raise UsageError(f"split {split!r}: {run} has {', '.join(splits) or 'none'}")
        params = (read_run_info(run) or {}).get("params") or {}
        ds = cls(
            features or params.get("features") or config["features"],
            labels=labels if labels is not None else params.get("labels") or config["labels"],
            modalities=modalities or list(config["dims"]),
            max_frames=config["config"].get("max_frames", 0) if max_frames is None else max_frames,
            stream=stream, task=config["task"], classes=config["classes"],
            clip_ids=splits[split], pooled=pooled,
        )
        if len(ds) < len(splits[split]):
            raise UsageError(f"{len(splits[split]) - len(ds)} clips of the run's {split} split "
                             "have no label now; the labels changed since the run")
        return ds

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        cid = self.seqs.clip_ids[i]
        item: dict[str, Any] = {"id": cid, "source": self.sources[cid], "present": {}}
        for m, a in self.seqs[i].items():
            item["present"][m] = a.shape[0] > 0
            if a.shape[0] == 0:
                a = np.zeros((1, a.shape[1]), np.float32)  # the empty-modality rule
            a = a.mean(0, dtype=np.float32) if self.pooled else np.ascontiguousarray(a)
            item[m] = torch.from_numpy(a)
        item["label"] = None if self.labels is None else _value(self.labels[cid])
        if self.targets is not None:
            item["target"] = torch.from_numpy(np.asarray(self.targets[cid]))
        return item

    def close(self) -> None:
        self.store.close()


def _joined(store, labels: str | os.PathLike | Mapping[str, str]) -> dict[str, str]:
    rows = (read_labels(labels) if not isinstance(labels, Mapping)
            else {k: LabelRow(k, str(v), None, 0) for k, v in labels.items()})
    return join_labels(store, rows, with_views=True).labels  # a view: its clip's label


def _targets(task: str | None, classes: Sequence[str] | None, labels: dict[str, str] | None,
             ids: list[str]) -> tuple[str | None, list[str], dict[str, np.ndarray] | None]:
    """(task, classes, clip id -> target) through the task's own encoding; with ``classes``
    (a run's), a label they cannot encode is refused."""
    if task is None:
        return None, list(classes or []), None
    t = get_task(task)  # an unknown name: a usage error listing the tasks
    if labels is None or not hasattr(t, "known_target"):
        raise UsageError(f"task {task!r}: targets need labels and a regression, "
                         "classification or multilabel task")
    mine = {c: labels[c] for c in ids}
    if classes is None:
        space = LabelSpace.build(task, mine)  # checks the labels as the trainer does
        return task, space.classes, {c: space.encode(v) for c, v in mine.items()}
    out = {}
    for c, v in mine.items():
        y, known = t.known_target(v, list(classes))
        if y is None or not known:
            raise UsageError(f"{c}: label {v!r} is not one the run was trained on (classes "
                             f"{', '.join(classes) or 'none'}); the labels changed since")
        out[c] = y
    return task, list(classes), out


def _value(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A batch: ``id`` and ``source`` lists; each modality as ``(x (B, T, D), lengths (B,))``
    zero-padded to the batch's longest clip (pooled: ``(B, D)``); ``present`` per modality a
    (B,) bool tensor; ``target`` stacked when the items have one; ``label`` (a float tensor when
    every label is a number, else the list)."""
    modalities = list(items[0]["present"])
    seq = [m for m in modalities if items[0][m].ndim == 2]
    out: dict[str, Any] = {
        "id": [it["id"] for it in items], "source": [it["source"] for it in items],
        **pad_batch([{m: it[m].numpy() for m in seq} for it in items], seq),
        "present": {m: torch.tensor([it["present"][m] for it in items]) for m in modalities},
    }
    for m in modalities:
        if m not in seq:
            out[m] = torch.stack([it[m] for it in items])
    if "target" in items[0]:
        out["target"] = torch.stack([it["target"] for it in items])
    labels = [it["label"] for it in items]
    numeric = all(isinstance(v, float) for v in labels)
    out["label"] = torch.tensor(labels, dtype=torch.float32) if numeric else labels
    return out
