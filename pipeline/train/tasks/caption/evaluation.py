"""The caption task's figures and outputs: teacher-forced batches and loss, decoding
(``--beam``), the figures of a split (BLEU-1..4, CIDEr-D, ROUGE-L; METEOR, a Java process
taking seconds to start, for the summary and ``vpipe evaluate`` only), the run's summary beside
the most-frequent-caption baseline, and ``vpipe evaluate`` / ``vpipe predict`` of a caption run.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from pipeline.device import pick_device
from pipeline.errors import UsageError
from pipeline.shards import FeatureStore
from pipeline.train.config import ModelSpec
from pipeline.train.evaluation import (
    random_weights,
    random_weights_note,
    small_split_notes,
    summary_head,
)
from pipeline.train.model import to_device
from pipeline.train.sequences import ClipSequences, pad_batch
from pipeline.train.tasks.caption.captions import CaptionInput, read_captions
from pipeline.train.tasks.caption.metrics import MAIN_METRIC, caption_metrics, java_present, meteor
from pipeline.train.tasks.caption.model import CaptionModel, caption_loss
from pipeline.train.tasks.caption.vocab import BOS_ID, PAD_ID, Vocabulary, tokenize


def word_batch(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher forcing's input (``<bos>`` w1..wn) and target (w1..wn ``<eos>``), padded."""
    n = max(len(s) for s in seqs)
    inp = torch.full((len(seqs), n), PAD_ID, dtype=torch.long)
    tgt = torch.full((len(seqs), n), PAD_ID, dtype=torch.long)
    for i, s in enumerate(seqs):
        inp[i, : len(s)] = torch.tensor([BOS_ID, *s[:-1]])
        tgt[i, : len(s)] = torch.tensor(s)
    return inp, tgt


def pair_batches(data: ClipSequences, pairs: list, order: list[int], batch_size: int):
    """(inputs, word input, word target) batches of (clip, caption) pairs in ``order``."""
    for a in range(0, len(order), batch_size):
        part = [pairs[i] for i in order[a : a + batch_size]]
        x = pad_batch([data[k] for k, _ in part], data.modalities)
        yield (x, *word_batch([s for _, s in part]))


@torch.no_grad()
def teacher_forced_loss(model: CaptionModel, data: ClipSequences, pairs: list,
                        device: torch.device, batch_size: int = 64) -> float | None:
    """Mean cross-entropy per caption over ``pairs`` (None without pairs)."""
    if not pairs:
        return None
    model.eval()
    total = 0.0
    for x, inp, tgt in pair_batches(data, pairs, list(range(len(pairs))), batch_size):
        total += float(caption_loss(model(to_device(x, device), inp.to(device)),
                                    tgt.to(device))) * len(inp)
    return total / len(pairs)


@torch.no_grad()
def generate(model: CaptionModel, data: ClipSequences, spec: ModelSpec, device: torch.device,
             batch_size: int = 64) -> tuple[list[str], list[float]]:
    """Each clip's decoded caption (words joined) and its mean log-prob per word."""
    model.eval()
    vocab = Vocabulary(spec.classes)
    caps, scores = [], []
    for a in range(0, len(data), batch_size):
        x = pad_batch([data[i] for i in range(a, min(a + batch_size, len(data)))],
                      data.modalities)
        ids, lp = model.generate(to_device(x, device), spec.config.max_words, spec.config.beam)
        caps += [" ".join(vocab.decode(s)) for s in ids]
        scores += lp
    return caps, scores


def evaluate_split(model: CaptionModel, p: CaptionInput, split: str, spec: ModelSpec,
                   device: torch.device, hyps_out: dict | None = None) -> dict:
    """Loss and caption metrics on one split of the run ({} for an empty split); the decoded
    captions go to ``hyps_out`` when given."""
    ids = p.split_ids[split]
    if not ids:
        return {}
    caps, _ = generate(model, p.data[split], spec, device)
    hyps = dict(zip(ids, caps, strict=True))
    if hyps_out is not None:
        hyps_out.update(hyps)
    loss = teacher_forced_loss(model, p.data[split], p.pairs[split], device)
    return {"loss": loss, **caption_metrics({c: p.refs[c] for c in ids}, hyps)}


def most_frequent_caption(p: CaptionInput) -> str:
    """The baseline's caption: the training reference written most often (ties: first)."""
    counts = Counter(r for c in p.split_ids["train"] for r in p.refs[c])
    return counts.most_common(1)[0][0]


def note_meteor(prog: str) -> bool:
    """Whether METEOR is scored; said once on stderr when no Java runtime is found."""
    if java_present():
        return True
    print(f"{prog}: note: no Java runtime (java) on PATH: meteor left out", file=sys.stderr)
    return False


def summarise_captions(model: CaptionModel, spec: ModelSpec, p: CaptionInput,
                       history: list[dict], stopped: bool, best_epoch: int,
                       device: torch.device, quiet: bool) -> dict:
    """``summary.json`` for a caption run: the best checkpoint's figures per split beside the
    most-frequent-caption baseline's."""
    hyps: dict[str, dict] = {s: {} for s in p.split_ids}
    figures = {s: evaluate_split(model, p, s, spec, device, hyps[s]) for s in p.split_ids}
    scored = [s for s in ("val", "test") if figures[s]]
    if scored and (note_meteor("vpipe train") if not quiet else java_present()):
        got = meteor([({c: p.refs[c] for c in hyps[s]}, hyps[s]) for s in scored])
        for s, m in zip(scored, got or [], strict=False):
            figures[s]["meteor"] = m
    top = most_frequent_caption(p)
    base = {s: caption_metrics({c: p.refs[c] for c in p.split_ids[s]},
                               {c: top for c in p.split_ids[s]}, with_meteor=False)
            for s in ("val", "test") if p.split_ids[s]}
    random = random_weights(spec.feature_attrs)
    source_of = p.store.source_of()
    n_sources = {s: len({source_of[c] for c in ids}) for s, ids in p.split_ids.items()}
    warnings = [random_weights_note(random)] if random else []
    return {
        **summary_head(spec, p.task_reason, f"caption-{spec.config.caption_attention}",
                       MAIN_METRIC, best_epoch, history, stopped, figures, base),
        "baseline_caption": top,
        "beam": spec.config.beam,
        "vocabulary": len(spec.classes),
        "n_clips": {s: len(v) for s, v in p.split_ids.items()},
        "n_sources": n_sources,
        "n_captions": {s: len(v) for s, v in p.pairs.items()},
        "dropped_training_captions": p.dropped,
        "unlabeled_clips": len(p.joined.unlabeled),
        "unknown_label_ids": len(p.joined.unknown),
        "seconds_per_epoch": round(float(np.mean([r["seconds"] for r in history])), 3)
        if history else None,
        "device": str(device),
        "random_weights": random,
        "warnings": warnings + small_split_notes(n_sources),
    }


# --------------------------------------------------------------------------- using a run


def evaluate_captions(model: CaptionModel, spec: ModelSpec, store: FeatureStore,
                      captions_csv: str | Path, split_ids: set[str] | None, device: str,
                      stream: bool, prog: str = "vpipe evaluate") -> tuple[int, dict]:
    """Caption metrics of a run on the captioned clips of ``store`` (only ``split_ids`` when
    given); returns (clips scored, metrics)."""
    from pipeline.train.labels import LabelRow, join_labels

    rows = read_captions(captions_csv)
    joined = join_labels(store, {i: LabelRow(i, i, s, rows.lines[i][0])
                                 for i, s in rows.splits.items()})
    joined.report(len(store), prog)
    ids = [c for c in joined.labels if split_ids is None or c in split_ids]
    if not ids:
        raise UsageError("no captioned clip can be evaluated (none of the run's split here)")
    dev = pick_device(device)
    model.to(dev)
    data = ClipSequences(store, ids, spec.modalities, spec.config.max_frames, stream=stream,
                         dims=spec.dims)
    vocab = Vocabulary(spec.classes)
    refs = {c: [" ".join(w) for w in rows.refs[joined.labels[c]]] for c in ids}
    pairs = [(k, vocab.encode(tokenize(r), spec.config.max_words))
             for k, c in enumerate(ids) for r in refs[c]]
    caps, _ = generate(model, data, spec, dev)
    metrics = {"loss": teacher_forced_loss(model, data, pairs, dev),
               **caption_metrics(refs, dict(zip(ids, caps, strict=True)),
                                 with_meteor=note_meteor(prog))}
    return len(ids), metrics


def write_caption_lines(model: CaptionModel, spec: ModelSpec, store: FeatureStore, f,
                        device: str, stream: bool) -> tuple[int, int]:
    """One ``{"level": "clip", "id", "source", "caption", "score"}`` line per clip, then one
    per source with the caption of its best-scored clip (highest mean log-prob per word)."""
    dev = pick_device(device)
    model.to(dev)
    order = store.clip_ids_in_read_order()
    data = ClipSequences(store, order, spec.modalities, spec.config.max_frames, stream=stream,
                         dims=spec.dims)
    caps, scores = generate(model, data, spec, dev)
    at = {cid: k for k, cid in enumerate(order)}
    best: dict[str, list] = {}
    for cid, src in zip(store.clip_ids, store.column("source"), strict=True):
        k = at[cid]
        line = {"level": "clip", "id": cid, "source": src, "caption": caps[k],
                "score": round(scores[k], 6)}
        f.write(json.dumps(line, ensure_ascii=False) + "\n")
        b = best.setdefault(src, [k, cid, 0])
        b[2] += 1
        if scores[k] > scores[b[0]]:
            b[0], b[1] = k, cid
    for src, (k, cid, n) in best.items():
        line = {"level": "source", "id": src, "n_clips": n, "caption": caps[k],
                "score": round(scores[k], 6), "from_clip": cid}
        f.write(json.dumps(line, ensure_ascii=False) + "\n")
    return len(order), len(best)
