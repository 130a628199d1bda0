"""The trainer's data: the feature sequences of the labelled clips, and padded batches.

Sequences are held in RAM (read shard by shard, once) or read per use (``stream``), sampled
uniformly down to ``max_frames`` steps. Batches pad each modality's sequence to the longest clip
in the batch and carry the true lengths (the mask).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from pipeline.errors import UsageError
from pipeline.shards import MODALITIES, TEXT, VIDEO, FeatureStore

# The index column that counts a clip's rows, per modality read as a sequence.
ROW_COUNTS = {"image": "n_frames", "audio": "n_audio", VIDEO: "n_video"}


def present_modalities(store: FeatureStore) -> list[str]:
    """The modalities that have a dimension and at least one row in the folder; ``text`` when
    the shards have titles (made with ``vpipe features --text``); ``video`` (a sequence of
    windows) when made with ``--video-model``."""
    key = ROW_COUNTS
    seqs = [*MODALITIES, *([VIDEO] if store.has_video else [])]
    present = [m for m in seqs if store.dim(m) > 0 and (store.column(key[m]) > 0).any()]
    return [*present, TEXT] if store.has_text else present


def warn_empty_clips(
    store: FeatureStore, clip_ids: Sequence[str], modalities: Sequence[str], prog: str
) -> list[str]:
    """Say which clips have no rows in any of ``modalities`` (e.g. ``--modalities audio`` on
    silent clips): the model gets an empty sequence for them. Returns those clip ids."""
    if not modalities or not clip_ids:
        return []
    key = ROW_COUNTS
    # Titles are not counted here: `vpipe features --text` reported the clips without one.
    modalities = [m for m in modalities if m in key]
    if not modalities:
        return []
    ids = list(clip_ids)
    sel = store.select(ids)
    counts = sum(sel.column(key[m]).astype(np.int64) for m in modalities)
    empty = [c for c, n in zip(ids, counts.tolist(), strict=True) if n == 0]
    if empty:
        print(
            f"{prog}: warning: {len(empty)} of {len(clip_ids)} clips have no "
            f"{' or '.join(modalities)} features (e.g. {', '.join(empty[:3])}); the model "
            "sees an empty sequence for them",
            file=sys.stderr,
        )
    return empty


def sample_uniform(n: int, max_frames: int) -> np.ndarray:
    """Indices of ``max_frames`` steps spread evenly over ``n`` (all of them when n is small)."""
    if max_frames <= 0 or n <= max_frames:
        return np.arange(n)
    return ((np.arange(max_frames) + 0.5) * n / max_frames).astype(np.int64)


class ClipSequences:
    """The sequences of some clips, per modality: held in RAM, or read per use (``stream``)."""

    def __init__(
        self,
        store: FeatureStore,
        clip_ids: Sequence[str],
        modalities: Sequence[str],
        max_frames: int = 0,
        stream: bool = False,
        dims: dict[str, int] | None = None,
        title_tokens: Callable[[str], np.ndarray] | None = None,
    ) -> None:
        self.clip_ids = list(clip_ids)
        # --finetune-text: the text modality is each title's token ids (1-d), not its features
        self.title_tokens = title_tokens
        self.modalities = list(modalities)
        self.max_frames = max_frames
        self.store = store
        # A clip without rows gets an empty (0, dim) sequence of the model's width.
        self.dims = dims or {m: store.dim(m) for m in self.modalities}
        self._ram: dict[str, dict[str, np.ndarray]] | None = None
        if not stream:
            # One pass shard by shard: each shard's datasets are read whole, once.
            self._ram = {c.clip_id: self._cut(c) for c in store.select(self.clip_ids)}

    def subset(self, clip_ids: Sequence[str]) -> ClipSequences:
        """The same sequences for some of the clips, sharing what is already in RAM."""
        sub = ClipSequences(
            self.store, [], self.modalities, self.max_frames, stream=True, dims=self.dims,
            title_tokens=self.title_tokens,
        )
        sub.clip_ids = list(clip_ids)
        sub._ram = self._ram
        return sub

    def _cut(self, clip) -> dict[str, np.ndarray]:
        out = {}
        for m in self.modalities:
            a = getattr(clip, m)
            if m == TEXT and self.title_tokens is not None:
                out[m] = self._tokens(clip)
                continue
            if a.shape[0] == 0:
                out[m] = np.zeros((0, self.dims[m]), np.float32)
                continue
            if m == TEXT:  # a title's tokens are never sampled: the TextCNN reads them all
                out[m] = np.asarray(a, np.float32)
                continue
            out[m] = np.asarray(a[sample_uniform(a.shape[0], self.max_frames)], np.float32)
        return out

    def _tokens(self, clip) -> np.ndarray:
        """The clip's title as token ids, as many as the rows `vpipe features` stored."""
        ids = self.title_tokens(clip.text_string)
        if len(ids) != clip.text.shape[0]:
            raise UsageError(
                f"{clip.clip_id}: its title {clip.text_string!r} is {len(ids)} tokens to the "
                f"text model now, {clip.text.shape[0]} in the features (another tokenizer?); "
                "make the features again with this text model")
        return ids

    def __len__(self) -> int:
        return len(self.clip_ids)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        cid = self.clip_ids[i]
        return self._ram[cid] if self._ram is not None else self._cut(self.store[cid])

    def _in_read_order(self) -> Iterator[dict[str, np.ndarray]]:
        """Every clip's sequences in the store's read order (shard by shard): streamed, that
        is one pass over each shard instead of a read per clip; in RAM, the same order, so
        both give the same sums to the last bit."""
        if self._ram is not None:
            for cid in self.store.select(self.clip_ids).clip_ids_in_read_order():
                yield self._ram[cid]
        else:
            for clip in self.store.select(self.clip_ids):
                yield self._cut(clip)

    def frame_stats(self, modality: str) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std over all frames (for input normalisation; std floored)."""
        return self.frame_stats_of([modality])[modality]

    def frame_stats_of(self, modalities: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """:meth:`frame_stats` of several modalities in one pass over the clips; a title's
        token ids (--finetune-text): the stats of its stored features, the encoder's before
        training (a pass of their own, in the same order: the same numbers as without)."""
        if self.title_tokens is not None and TEXT in modalities:
            stored = ClipSequences(self.store, self.clip_ids, [TEXT], stream=True, dims=self.dims)
            rest = self.frame_stats_of([m for m in modalities if m != TEXT])
            return {**rest, TEXT: stored.frame_stats(TEXT)}
        acc = {m: [np.zeros(self.store.dim(m)), np.zeros(self.store.dim(m)), 0]
               for m in modalities}
        for seqs in self._in_read_order():
            for m, a_ in acc.items():
                a = seqs[m].astype(np.float64)
                a_[0] += a.sum(0)
                a_[1] += (a * a).sum(0)
                a_[2] += a.shape[0]
        out = {}
        for m, (total, sq, n) in acc.items():
            mean = total / max(n, 1)
            std = np.sqrt(np.maximum(sq / max(n, 1) - mean * mean, 0.0))
            out[m] = (mean.astype(np.float32), np.maximum(std, 1e-3).astype(np.float32))
        return out


def pad_batch(items: Sequence[dict[str, np.ndarray]], modalities: Sequence[str]) -> dict:
    """Pad each modality to the batch's longest clip: {m: (x (B,T,D), lengths (B,))}."""
    import torch

    out = {}
    for m in modalities:
        seqs = [it[m] for it in items]
        t = max(1, max(s.shape[0] for s in seqs))  # a batch of empty sequences still has T=1
        if seqs[0].ndim == 1:  # token ids (--finetune-text): (B, T), padded with 0
            x = np.zeros((len(seqs), t), np.int64)
        else:
            x = np.zeros((len(seqs), t, seqs[0].shape[1]), np.float32)
        for i, s in enumerate(seqs):
            x[i, : s.shape[0]] = s
        lengths = torch.tensor([s.shape[0] for s in seqs], dtype=torch.int64)
        out[m] = (torch.from_numpy(x), lengths)
    return out


def batches(
    data: ClipSequences,
    targets: np.ndarray | None,
    batch_size: int,
    order: Sequence[int] | None = None,
) -> Iterator[tuple[dict, object]]:
    """Yield (inputs, targets) batches in ``order`` (default: as stored)."""
    import torch

    idx = list(range(len(data))) if order is None else list(order)
    for a in range(0, len(idx), batch_size):
        part = idx[a : a + batch_size]
        x = pad_batch([data[i] for i in part], data.modalities)
        y = None if targets is None else torch.from_numpy(np.stack([targets[i] for i in part]))
        yield x, y
