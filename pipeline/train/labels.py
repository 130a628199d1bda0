"""Labels for the trainer: a labels CSV joined to the clips of a feature folder, and split.

A labels CSV (``id,label`` and optionally ``split``) is joined to the clips of a feature folder:
an id is a clip id or a source id whose clips inherit the label. The label space checks the
labels against the task and encodes them as targets. Clips are split by source, so the subclips
of one video never sit on both sides.
"""

from __future__ import annotations

import math
import random
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import UsageError
from pipeline.files import read_user_text, table_records
from pipeline.ids import sanitize_id
from pipeline.shards import FeatureStore
from pipeline.train.tasks import get_task

SPLITS = ("train", "val", "test")
_TAG_SEP = re.compile(r"[|,]")
FLOAT32_MAX = float(np.finfo(np.float32).max)


def fits_float32(y: float) -> bool:
    """A regression target the model can hold: finite, and still finite as float32."""
    return math.isfinite(y) and abs(y) <= FLOAT32_MAX


# --------------------------------------------------------------------------- labels CSV


@dataclass
class LabelRow:
    id: str
    label: str
    split: str | None
    line: int


def read_labels(path: str | Path) -> dict[str, LabelRow]:
    """Read ``id,label[,split]`` rows, or the tagging data's TSV lines ``name \t title \t
    tags`` (the name's stem is the source id, tags separated by commas); a bad file raises
    UsageError naming the line."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such labels file")
    text = read_user_text(path)
    rows = _read_tsv(path, text) if _is_tsv(text) else _read_rows(path, text)
    if not rows:
        raise UsageError(f"{path}: no label rows")
    return rows


def _is_tsv(text: str) -> bool:
    """Whether the file is the tagging TSV: its first non-empty line has a tab."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    return "\t" in first


def _read_tsv(path: Path, text: str) -> dict[str, LabelRow]:
    """``name \t title \t tags`` lines (the title is for ``features --text``; here unused)."""
    rows: dict[str, LabelRow] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) < 3:
            raise UsageError(f"{path}:{n}: {len(cols)} column(s); the tagging TSV is "
                             "name<TAB>title<TAB>tags")
        name = cols[0].strip()
        if not name:
            raise UsageError(f"{path}:{n}: empty name")
        cid = sanitize_id(Path(name).stem)
        label = ",".join(split_tags(cols[2]))
        if cid in rows and rows[cid].label != label:
            raise UsageError(f"{path}:{n}: {name!r} has two tag sets ({rows[cid].label!r} on "
                             f"line {rows[cid].line}, {label!r} here)")
        rows[cid] = LabelRow(cid, label, None, n)
    return rows


def _read_rows(path: Path, text: str) -> dict[str, LabelRow]:
    rows: dict[str, LabelRow] = {}
    for n, rec in table_records(path, text, "labels CSV", ("id", "label")):
        cid = (rec.get("id") or "").strip()
        if not cid:
            raise UsageError(f"{path}:{n}: empty id")
        label = (rec.get("label") or "").strip()
        split = (rec.get("split") or "").strip().lower() or None
        if split is not None and split not in SPLITS:
            raise UsageError(f"{path}:{n}: split {split!r} is not one of train, val, test")
        if cid in rows and rows[cid].label != label:
            raise UsageError(
                f"{path}:{n}: id {cid!r} has two labels ({rows[cid].label!r} on line "
                f"{rows[cid].line}, {label!r} here)"
            )
        rows[cid] = LabelRow(cid, label, split, n)
    return rows


def is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def infer_task(labels: Sequence[str]) -> tuple[str, str]:
    """Guess the task from the label values; returns (task, the reason, said to the user)."""
    values = [v for v in labels if v]
    if values and all(is_number(v) for v in values):
        return "regression", "every label is a number (use --task classification for class numbers)"
    if any(_TAG_SEP.search(v) for v in values):
        return "multilabel", "some labels hold several names separated by '|' or ','"
    return "classification", "one name per label"


def split_tags(label: str) -> list[str]:
    return sorted({t.strip() for t in _TAG_SEP.split(label) if t.strip()})


@dataclass
class LabelSpace:
    """The task and its classes: encodes a label string into the model's target (the task,
    ``tasks.get_task(task)``, says how)."""

    task: str
    classes: list[str] = field(default_factory=list)

    def encode(self, label: str) -> np.ndarray:
        return get_task(self.task).encode(label, self.classes)

    @classmethod
    def build(cls, task: str, labels: dict[str, str]) -> LabelSpace:
        """Check the labels for ``task`` (numbers, NaN, one class) and collect the classes."""
        return cls(task, get_task(task).check_labels(labels))


# --------------------------------------------------------------------------- joining to clips


@dataclass
class LabelledClips:
    """Clip id → label string (and CSV split), with what did not match reported."""

    labels: dict[str, str]
    splits: dict[str, str | None]
    unlabeled: list[str]
    unknown: list[str]
    ambiguous: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)  # label id as written → id matched

    def report(self, n_clips: int, prefix: str = "vpipe train") -> None:
        """One stderr line each for clips without a label and labels without clips."""
        if self.unlabeled:
            print(
                f"{prefix}: {len(self.unlabeled)} of {n_clips} clips have no label, left out "
                f"(e.g. {', '.join(self.unlabeled[:3])})",
                file=sys.stderr,
            )
        if self.unknown:
            print(
                f"{prefix}: {len(self.unknown)} label ids match no clip or source "
                f"(e.g. {', '.join(self.unknown[:3])})",
                file=sys.stderr,
            )
        if self.renamed:
            eg = ", ".join(f"{a!r} as {b}" for a, b in list(self.renamed.items())[:3])
            print(
                f"{prefix}: note: {len(self.renamed)} label ids are file names that vpipe "
                f"turned into source ids (spaces and unsafe characters replaced); matched as "
                f"those (e.g. {eg})",
                file=sys.stderr,
            )
        if self.ambiguous:
            print(
                f"{prefix}: warning: {len(self.ambiguous)} label ids are both a clip id and "
                f"the id of another source (e.g. {', '.join(self.ambiguous[:3])}): the label "
                "goes to that clip and to the clips of that source",
                file=sys.stderr,
            )


def join_labels(store: FeatureStore, rows: dict[str, LabelRow],
                with_views: bool = False) -> LabelledClips:
    """Give each clip its own label, else its source's; list the leftovers on both sides.
    Augmented views (``extract-frames --views``) are left out, or with ``with_views`` given
    their clip's label and split (training: :func:`keep_views_in_train`)."""
    labels: dict[str, str] = {}
    splits: dict[str, str | None] = {}
    unlabeled = []
    views = store.views()
    source_of = store.source_of()
    if views and not with_views:
        source_of = {c: s for c, s in source_of.items() if c not in views}
    clip_set, sources = set(source_of) - set(views), set(source_of.values())
    known = clip_set | sources
    # Source ids are file stems made safe ("my trailer.mp4" -> my-trailer): a label written
    # with the stem as it was matches through the same rule when it matches nothing as is.
    renamed = {}
    for i in rows:
        alias = sanitize_id(i)
        if i not in known and alias != i and alias in known and alias not in rows:
            renamed[i] = alias
    rows = {renamed.get(i, i): r for i, r in rows.items()}
    for cid, src in source_of.items():
        # a clip's own label beats its video's; a view's is its clip's
        row = rows.get(views.get(cid, cid)) or rows.get(src)
        if row is None:
            unlabeled.append(cid)
            continue
        labels[cid] = row.label
        splits[cid] = row.split
    # A view's own row is never used (it takes its clip's): said with the id, which the
    # store's clip ids would otherwise seem to hold.
    unknown = [f"{i} (an augmented view of {views[i]}: views take their clip's label)"
               if i in views else i for i in rows if i not in known]
    # Source "x" has clip "x_0"; a video x_0.mp4 has source id "x_0": one id, two meanings.
    # A whole video's one clip has its source's id: that is the same video, not two meanings.
    ambiguous = [i for i in rows if i in clip_set and i in sources and source_of[i] != i]
    if not labels:
        raise UsageError(
            f"no label id matches a clip or source id in {store.folder} "
            f"(labels e.g. {', '.join(unknown[:3])}; clips e.g. "
            f"{', '.join([c for c in store.clip_ids if c not in views][:3]) or 'none'})"
        )
    return LabelledClips(labels, splits, unlabeled, unknown, ambiguous, renamed)


def keep_views_in_train(split_ids: dict[str, list[str]], views: dict[str, str]
                        ) -> tuple[dict[str, list[str]], dict[str, int]]:
    """The splits with augmented views kept in train only (each is on its clip's side, as its
    source is): validation and test score original clips. Returns them and the views per
    split (train: trained on; val, test: left out)."""
    counts = {s: sum(1 for c in ids if c in views) for s, ids in split_ids.items()}
    kept = {s: ids if s == "train" else [c for c in ids if c not in views]
            for s, ids in split_ids.items()}
    return kept, counts


def split_by_source(
    clip_sources: dict[str, str],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    fixed: dict[str, str | None] | None = None,
) -> dict[str, str]:
    """Clip id → train|val|test; whole sources go to one side (or the CSV's ``split`` column)."""
    if fixed and any(v is not None for v in fixed.values()):
        missing = [c for c, v in fixed.items() if v is None]
        if missing:
            raise UsageError(
                f"the labels CSV has a split column but {len(missing)} labelled clips have "
                f"no split (e.g. {', '.join(missing[:3])})"
            )
        sides: dict[str, set] = {}
        for c, src in clip_sources.items():
            sides.setdefault(src, set()).add(fixed[c])
        mixed = sorted(src for src, v in sides.items() if len(v) > 1)
        if mixed:  # the user's choice, but subclips of one video on two sides inflate scores
            print(
                f"vpipe train: warning: the split column puts clips of {len(mixed)} source "
                f"videos on two sides (e.g. {', '.join(mixed[:3])})",
                file=sys.stderr,
            )
        return {c: str(fixed[c]) for c in clip_sources}
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UsageError("--val-fraction and --test-fraction must be in [0, 1) and sum below 1")
    sources = sorted(set(clip_sources.values()))
    random.Random(seed).shuffle(sources)
    n = len(sources)

    def count(frac: float) -> int:
        return max(1, round(n * frac)) if frac > 0 else 0

    n_val, n_test = count(val_fraction), count(test_fraction)
    if n - n_val - n_test < 1:
        raise UsageError(
            f"{n} source videos are too few for --val-fraction {val_fraction} and "
            f"--test-fraction {test_fraction} (each split needs one whole video)"
        )
    side = {s: "val" for s in sources[:n_val]}
    side.update({s: "test" for s in sources[n_val : n_val + n_test]})
    return {c: side.get(s, "train") for c, s in clip_sources.items()}


def fold_groups(sources: Sequence[str], folds: int, seed: int) -> list[list[str]]:
    """The sources of each of ``folds`` disjoint groups (sizes differing by one at most),
    drawn with ``seed``: the test sources of each fold of a cross-validation."""
    order = sorted(set(sources))
    if not 2 <= folds <= len(order):
        raise UsageError(f"--folds {folds}: needs 2 to {len(order)} folds (the labelled clips "
                         f"come from {len(order)} source videos; each fold tests on whole ones)")
    random.Random(seed).shuffle(order)
    size, extra = divmod(len(order), folds)
    groups, at = [], 0
    for k in range(folds):
        n = size + (k < extra)
        groups.append(order[at : at + n])
        at += n
    return groups


def split_by_fold(
    clip_sources: dict[str, str],
    folds: int,
    fold: int,
    val_fraction: float,
    seed: int,
    fixed: dict[str, str | None] | None = None,
) -> dict[str, str]:
    """Clip id -> train|val|test for fold ``fold`` (1..folds) of a cross-validation by source:
    test is the fold's group of :func:`fold_groups`, val a ``val_fraction`` share of the other
    sources (at least one when above 0), train the rest."""
    if fixed and any(v is not None for v in fixed.values()):
        raise UsageError("--folds makes its own splits: the labels CSV has a split column "
                         "(drop the column, or train without --folds)")
    if not 0 <= val_fraction < 1:
        raise UsageError("--val-fraction must be in [0, 1)")
    groups = fold_groups(list(clip_sources.values()), folds, seed)
    if not 1 <= fold <= folds:
        raise UsageError(f"fold {fold}: a run of {folds} folds has folds 1 to {folds}")
    test = set(groups[fold - 1])
    rest = [s for k, g in enumerate(groups) if k != fold - 1 for s in g]
    n_val = max(1, round(len(rest) * val_fraction)) if val_fraction > 0 else 0
    if len(rest) - n_val < 1:
        raise UsageError(
            f"{len(rest) + len(test)} source videos are too few for --folds {folds} with "
            f"--val-fraction {val_fraction} (each fold needs one whole video to train on)"
        )
    side = {s: "test" for s in test}
    side.update({s: "val" for s in rest[:n_val]})
    return {c: side.get(s, "train") for c, s in clip_sources.items()}
