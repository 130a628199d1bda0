"""The checked input of a run: options, shards and labels, read and checked before anything is
written, so that a bad labels file never leaves a half-written run folder behind."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from pipeline import __version__
from pipeline.device import check_device_name
from pipeline.errors import UsageError
from pipeline.shards import MODALITIES, TEXT, VIDEO, FeatureStore, open_features
from pipeline.train.config import LOGS, MODELS, POOLS, ModelSpec, TrainConfig, is_own_model
from pipeline.train.labels import (
    LabelledClips,
    LabelSpace,
    infer_task,
    join_labels,
    keep_views_in_train,
    read_labels,
    split_by_fold,
    split_by_source,
)
from pipeline.train.sequences import ClipSequences, present_modalities, warn_empty_clips
from pipeline.train.tasks import get_task, options_task


@dataclass
class Prepared:
    """The checked input of a run: its task and classes, clips per split and their targets
    (a label task's; a caption run's are its (clip, caption) pairs, :class:`CaptionInput`)."""

    store: FeatureStore
    task: str
    classes: list[str]
    task_reason: str
    modalities: list[str]
    dims: dict[str, int]
    split_ids: dict[str, list[str]]
    targets: dict[str, np.ndarray]
    joined: LabelledClips
    store_attrs: dict[str, dict] = field(default_factory=dict)
    max_frames: int = 0
    stream: bool = False
    # Augmented views per split: train's are trained on, val's and test's left out ({}: none)
    views: dict[str, int] = field(default_factory=dict)
    # --finetune-text: the titles' token ids (train.finetune.TitleTokens) and what the run
    # records of the encoder; None: the text modality is the stored token features.
    title_tokens: Callable[[str], np.ndarray] | None = None
    text_encoder: dict | None = None
    _data: dict[str, ClipSequences] | None = None

    @property
    def data(self) -> dict[str, ClipSequences]:
        """The sequences per split, read on first use (in RAM: one pass over the labelled
        clips, shard by shard, shared by the three splits), so that a run found complete
        reads no feature at all."""
        if self._data is None:
            every = ClipSequences(self.store, list(self.joined.labels), self.modalities,
                                  self.max_frames, self.stream, title_tokens=self.title_tokens)
            self._data = {s: every.subset(ids) for s, ids in self.split_ids.items()}
        return self._data

    def without_test(self) -> Prepared:
        """The same input with an empty test split, for a summary that must not score it
        (a ``vpipe tune`` trial); the split ids the run records stay whole."""
        data = {**self.data, "test": self.data["test"].subset([])}
        return replace(self, split_ids={**self.split_ids, "test": []},
                       targets={**self.targets, "test": self.targets["test"][:0]}, _data=data)


def _positive(x: float) -> bool:
    """True for a finite number above 0 (NaN and inf are not)."""
    return math.isfinite(x) and x > 0


def read_options(cfg: TrainConfig, quiet: bool = False) -> TrainConfig:
    """The options as the run's task reads them, an old spelling said in a note."""
    cfg, notes = options_task(cfg.task).read_options(cfg)
    for note in notes if not quiet else []:
        print(f"vpipe train: note: {note}", file=sys.stderr)
    return cfg


def check_config(cfg: TrainConfig) -> None:
    """Reject option values that cannot work, before anything is read."""
    task = options_task(cfg.task)  # an unknown --task is refused here
    if is_own_model(cfg.model):
        from pipeline.train.own_model import find_class

        find_class(cfg.model)  # importable, and a torch.nn.Module, before anything is read
    elif cfg.model not in MODELS:
        raise UsageError(f"--model {cfg.model!r}: choose one of {', '.join(MODELS)}, or your "
                         "own class as package.module:ClassName")
    if cfg.log not in LOGS:
        raise UsageError(f"--log {cfg.log!r}: choose none or tensorboard")
    if cfg.log == "tensorboard":
        tensorboard_writer_class()  # installed, before anything is read
    if cfg.pool not in POOLS:
        raise UsageError(f"--pool {cfg.pool!r}: choose last or mean")
    # patience 0 stopped after the first epoch ("no better val ... for 0 epochs"); top-k 0
    # reported a meaningless top0_accuracy of 0.
    for name in ("hidden", "layers", "epochs", "batch_size", "patience", "top_k"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.folds and cfg.folds < 2:
        raise UsageError("--folds must be at least 2 (or 0: one train/val/test split)")
    if cfg.max_frames < 0:
        raise UsageError("--max-frames must be 0 (all frames) or more")
    for name in ("lr", "clip_grad", "text_lr"):  # 0 would leave the weights where they started
        if not _positive(getattr(cfg, name)):
            raise UsageError(f"--{name.replace('_', '-')} must be above 0")
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):  # inf: NaN weights
        raise UsageError("--weight-decay must be 0 or more")
    # The batch order's generator is seeded with seed * 100003 + epoch, an int64: a huge seed
    # crashed after the run folder was started. (A negative seed drew the same split as its
    # absolute value.)
    if not 0 <= cfg.seed < 2**32:
        raise UsageError("--seed must be in [0, 2^32)")
    if not 0 <= cfg.threshold <= 1:
        raise UsageError("--threshold is a score in [0, 1]")
    if not 0 <= cfg.dropout < 1:
        raise UsageError("--dropout must be in [0, 1)")
    if not cfg.finetune_text and cfg.text_lr != TrainConfig.text_lr:
        raise UsageError("--text-lr is the fine-tuned text encoder's learning rate: add "
                         "--finetune-text")
    check_device_name(cfg.device)
    task.check_options(cfg)


def tensorboard_writer_class() -> type:
    """torch's SummaryWriter, or a usage error saying how to install TensorBoard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UsageError("--log tensorboard needs TensorBoard: pip install "
                         "'vpipe[tensorboard]'") from None
    return SummaryWriter


def open_store(features: str | Path) -> FeatureStore:
    """The feature folder as a store; a missing or empty one is a usage error."""
    try:
        store = open_features(features)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    if len(store) == 0:
        raise UsageError(f"{features}: no clips in this feature folder (no complete shards)")
    return store


def resolve_modalities(store: FeatureStore, cfg: TrainConfig, features: Path) -> list[str]:
    """The modalities a run uses: ``--modalities`` or every one present, each checked."""
    present = present_modalities(store)
    mods = list(dict.fromkeys(cfg.modalities or present))  # --modalities image,image: once
    unknown = [m for m in mods if m not in (*MODALITIES, TEXT, VIDEO)]
    if unknown:
        raise UsageError(f"--modalities: unknown {', '.join(unknown)} (use image, audio, text, "
                         "video)")
    absent = [m for m in mods if m not in present]
    if TEXT in absent:
        raise UsageError(f"{features}: no text features in these shards (make them with "
                         "`vpipe features --text FILE`)")
    if VIDEO in absent:
        raise UsageError(f"{features}: no video features in these shards (make them with "
                         "`vpipe features --from-video --video-model NAME`)")
    if absent or not mods:
        raise UsageError(
            f"{features}: no {' or '.join(absent or MODALITIES)} features in these shards "
            f"(present: {', '.join(present) or 'none'})"
        )
    options_task(cfg.task).check_modalities(cfg, present, mods, features)
    return mods


def prepare(features: Path, labels_csv: Path, cfg: TrainConfig, quiet: bool = False) -> Prepared:
    """Read and check the index and labels, split by source (no feature read, no file
    written: :attr:`Prepared.data` reads them when first used)."""
    check_config(cfg)
    store = open_store(features)
    rows = read_labels(labels_csv)
    joined = join_labels(store, rows, with_views=True)
    if not quiet:
        joined.report(len(store))
    task, reason = (
        (cfg.task, "given by --task") if cfg.task else infer_task(list(joined.labels.values()))
    )
    if cfg.task is None and not quiet:
        print(f"vpipe train: task {task} (inferred: {reason})", file=sys.stderr)
    space = LabelSpace.build(task, joined.labels)

    mods = resolve_modalities(store, cfg, features)
    dims = {m: store.dim(m) for m in mods}

    source_of = store.source_of()
    sources = {c: source_of[c] for c in joined.labels}
    if cfg.folds:
        side = split_by_fold(sources, cfg.folds, cfg.fold, cfg.val_fraction, cfg.seed,
                             joined.splits)
    else:
        side = split_by_source(sources, cfg.val_fraction, cfg.test_fraction, cfg.seed,
                               joined.splits)
    split_ids = {s: [c for c in joined.labels if side[c] == s] for s in ("train", "val", "test")}
    views = store.views()
    view_counts: dict[str, int] = {}
    if views:  # on their clip's side (their source's), and only trained on
        split_ids, view_counts = keep_views_in_train(split_ids, views)
        used = {c for ids in split_ids.values() for c in ids}
        joined = replace(joined, labels={c: v for c, v in joined.labels.items() if c in used},
                         splits={c: v for c, v in joined.splits.items() if c in used})
    if not split_ids["train"]:
        raise UsageError("no labelled clip falls in the train split")
    targets = {
        s: np.stack([space.encode(joined.labels[c]) for c in ids]) if ids else np.zeros((0,))
        for s, ids in split_ids.items()
    }
    if not quiet:
        warn_empty_clips(store, list(joined.labels), mods, "vpipe train")
    attrs = {m: store.attrs(m) for m in mods}
    encoder = None
    if cfg.finetune_text:  # found, loaded and the recorded one, before anything is written
        from pipeline.train.finetune import check_encoder

        encoder = check_encoder(store, features, dims[TEXT])
    return Prepared(store, task, space.classes, reason, mods, dims, split_ids, targets, joined,
                    attrs, cfg.max_frames, cfg.stream, views=view_counts,
                    title_tokens=encoder.tokens if encoder else None,
                    text_encoder=encoder.record if encoder else None)


def model_spec(cfg: TrainConfig, p: Prepared) -> ModelSpec:
    """The model this run trains: the options with the modalities used, the task and its
    classes, the feature dims and identity, and the target scaling from the training split."""
    return ModelSpec(
        config=replace(cfg, modalities=p.modalities),
        task=p.task,
        classes=p.classes,
        dims=p.dims,
        target_norm=get_task(p.task).target_norm(p),
        feature_attrs=p.store_attrs,
        vpipe_version=__version__,
        model_source=own_model_source(cfg),
        text_encoder=p.text_encoder,
    )


def own_model_source(cfg: TrainConfig) -> dict | None:
    """What the run records of a user's model class (None for lstm and attention)."""
    if not is_own_model(cfg.model):
        return None
    from pipeline.train.own_model import model_source

    return model_source(cfg.model)
