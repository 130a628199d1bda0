"""The checked input of a captioning run: a captions CSV (``id,caption[,split]``, one line per
reference caption) joined to the clips of a feature folder, split by source, tokenised, and the
vocabulary built from the training split; all before anything is written.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import UsageError, plural
from pipeline.files import read_user_text, table_records
from pipeline.train.config import TrainConfig
from pipeline.train.inputs import Prepared, check_config, open_store, resolve_modalities
from pipeline.train.labels import SPLITS, LabelRow, join_labels, split_by_source
from pipeline.train.tasks.caption.vocab import Vocabulary, tokenize


@dataclass
class CaptionRows:
    """Reference captions per id as written (tokenised), their CSV lines and split."""

    refs: dict[str, list[list[str]]]
    lines: dict[str, list[int]]
    splits: dict[str, str | None]


def read_captions(path: str | Path) -> CaptionRows:
    """Read ``id,caption[,split]``; an empty caption or one without a word is refused naming
    its line (nothing is trained on half a file)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such captions file")
    refs: dict[str, list[list[str]]] = {}
    lines: dict[str, list[int]] = {}
    splits: dict[str, str | None] = {}
    for n, rec in table_records(path, read_user_text(path), "captions CSV", ("id", "caption")):
        cid = (rec.get("id") or "").strip()
        text = (rec.get("caption") or "").strip()
        split = (rec.get("split") or "").strip().lower() or None
        if not cid:
            raise UsageError(f"{path}:{n}: empty id")
        if not text:
            raise UsageError(f"{path}:{n}: empty caption for id {cid!r}")
        words = tokenize(text)
        if not words:
            raise UsageError(f"{path}:{n}: caption {text!r} of {cid!r} has no word")
        if split is not None and split not in SPLITS:
            raise UsageError(f"{path}:{n}: split {split!r} is not one of train, val, test")
        if cid in splits and splits[cid] != split:
            raise UsageError(
                f"{path}:{n}: id {cid!r} is in split {split!r} here and "
                f"{splits[cid]!r} on line {lines[cid][0]}"
            )
        refs.setdefault(cid, []).append(words)
        lines.setdefault(cid, []).append(n)
        splits[cid] = split
    if not refs:
        raise UsageError(f"{path}: no caption rows")
    return CaptionRows(refs, lines, splits)


@dataclass
class CaptionInput(Prepared):
    """:class:`Prepared` for captions: the references per clip, the (clip, word ids) pairs per
    split (training pairs without a known word left out) and the vocabulary."""

    refs: dict[str, list[str]] = field(default_factory=dict)  # clip -> references, words joined
    pairs: dict[str, list[tuple[int, list[int]]]] = field(default_factory=dict)
    vocab: Vocabulary | None = None
    dropped: int = 0


def prepare_captions(features: Path, captions_csv: Path, cfg: TrainConfig,
                     quiet: bool = False) -> CaptionInput:
    """Read and check the index and captions, split by source, build the vocabulary."""
    check_config(cfg)  # with the caption task's own (Caption.check_options)
    store = open_store(features)
    rows = read_captions(captions_csv)
    # Joined as labels whose value is the caption id: a clip gets its own captions, else its
    # source's, with the same reports of unmatched ids as every task.
    joined = join_labels(store, {i: LabelRow(i, i, s, rows.lines[i][0])
                                 for i, s in rows.splits.items()})
    if not quiet:
        joined.report(len(store))
        if store.views():  # made for training, and unused here: said, not silently dropped
            print(f"vpipe train: {plural(len(store.views()), 'augmented views')} left out "
                  "(captioning trains on the clips themselves)", file=sys.stderr)
    mods = resolve_modalities(store, cfg, features)
    source_of = store.source_of()
    clip_sources = {c: source_of[c] for c in joined.labels}
    side = split_by_source(clip_sources, cfg.val_fraction, cfg.test_fraction, cfg.seed,
                           joined.splits)
    split_ids = {s: [c for c in joined.labels if side[c] == s] for s in SPLITS}
    if not split_ids["train"]:
        raise UsageError("no captioned clip falls in the train split")
    words_of = {c: rows.refs[joined.labels[c]] for c in joined.labels}
    vocab = Vocabulary.build((w for c in split_ids["train"] for w in words_of[c]), cfg.min_count)
    pairs: dict[str, list] = {}
    dropped = []
    for s, ids in split_ids.items():
        pairs[s] = []
        for k, c in enumerate(ids):
            for j, words in enumerate(words_of[c]):
                if s == "train" and not vocab.known(words):
                    dropped.append(f"{captions_csv}:{rows.lines[joined.labels[c]][j]}")
                    continue
                pairs[s].append((k, vocab.encode(words, cfg.max_words)))
    if dropped and not quiet:
        print(
            f"vpipe train: {len(dropped)} training captions have no word of the vocabulary "
            f"(each word seen under --min-count {cfg.min_count} times), left out "
            f"(e.g. {', '.join(dropped[:3])})",
            file=sys.stderr,
        )
    if not pairs["train"]:
        raise UsageError(
            f"{captions_csv}: no training caption has a word seen --min-count {cfg.min_count} "
            "times; lower --min-count or give more captions"
        )
    refs = {c: [" ".join(w) for w in words_of[c]] for c in joined.labels}
    attrs = {m: store.attrs(m) for m in mods}
    # The vocabulary is the model's output classes; the targets are the pairs, not one a clip.
    return CaptionInput(
        store, "caption", vocab.words, "given by --task", mods, {m: store.dim(m) for m in mods},
        split_ids, {}, joined, attrs, cfg.max_frames, cfg.stream, refs=refs, pairs=pairs,
        vocab=vocab, dropped=len(dropped),
    )
