"""The caption task: train, evaluate and predict with the caption model on cached features.

``train_captions`` is ``vpipe train --task caption``: the run folder, its lock, resume and
checkpoints are the other tasks' (``runs``, ``loop``'s training state); an epoch is one pass
over every (clip, reference caption) pair of the training split, teacher-forced, then val and
test are decoded (``--beam``) and scored (BLEU-1..4, CIDEr-D, ROUGE-L; early stopping on val
CIDEr). METEOR, a Java process taking seconds to start, is scored for the summary and
``vpipe evaluate`` only. The vocabulary is written to ``RUN/vocab.json`` (and is the model
spec's ``classes``).
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from pipeline.device import pick_device, torch_threads
from pipeline.errors import UsageError
from pipeline.records import now_iso
from pipeline.runner import progress
from pipeline.shards import FeatureStore
from pipeline.train.caption_metrics import caption_metrics, java_present, meteor
from pipeline.train.caption_model import CaptionModel, caption_loss
from pipeline.train.captions import CaptionInput, prepare_captions, read_captions
from pipeline.train.config import ModelSpec, TrainConfig
from pipeline.train.data import ClipSequences, pad_batch
from pipeline.train.inputs import model_spec
from pipeline.train.loop import Progress, epoch_line, new_training, restore, training_state
from pipeline.train.metrics import MAIN_METRIC, improved
from pipeline.train.model import to_device
from pipeline.train.runs import (
    features_fingerprint,
    finish_run_folder,
    is_complete,
    load_weights,
    open_run_folder,
    report_complete,
    run_folder_lock,
    run_params,
    save_checkpoint,
    start_run_folder,
    write_curves,
    write_metrics,
)
from pipeline.train.vocab import BOS_ID, PAD_ID, Vocabulary, tokenize


def train_captions(features: str | Path, captions_csv: str | Path, out: str | Path,
                   cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False,
                   quiet: bool = False) -> dict:
    """Train a caption model on cached features; writes the run folder and returns its
    summary (``vpipe train --task caption``)."""
    out = Path(out)
    with run_folder_lock(out, [features, captions_csv]), torch_threads(cfg.threads):
        return _train_captions(features, captions_csv, out, cfg, resume, overwrite, quiet)


def _train_captions(features: str | Path, captions_csv: str | Path, out: Path, cfg: TrainConfig,
                    resume: bool, overwrite: bool, quiet: bool) -> dict:
    p = prepare_captions(Path(features), Path(captions_csv), cfg, quiet)
    spec = model_spec(cfg, p)
    cfg = spec.config
    fingerprint = features_fingerprint(p.store, list(p.joined.labels), p.store_attrs, p.dims)
    params = run_params(cfg, Path(features), Path(captions_csv), fingerprint)
    state = open_run_folder(out, cfg, params, p.split_ids, resume, overwrite)
    started = now_iso()
    if state is not None and is_complete(out, state, cfg.epochs, cfg.patience):
        p.store.close()
        return report_complete(out, state, cfg.epochs, cfg.patience, started, quiet)
    device = pick_device(cfg.device)
    start_run_folder(out, spec, p.split_ids, params, task_source=p.task_reason,
                     features=features, labels=captions_csv, started=started, overwrite=overwrite)
    p.vocab.save(out / "vocab.json")
    model, opt, scaler = new_training(spec, p.data["train"], device)
    at = Progress()
    if state is not None:
        at = restore(state, model, opt, scaler, device)
        if not quiet:
            print(f"vpipe train: resuming {out} after epoch {at.epochs_done}", file=sys.stderr)
    already = at.epochs_done
    fit_captions(model, opt, scaler, p, spec, at, out, quiet)
    best_epoch = load_weights(model, out / "best.pt")
    summary = summarise_captions(model, spec, p, at, best_epoch, device, quiet)
    write_curves(at.history, "caption", out / "curves.png", final=summary)
    finish_run_folder(out, summary, done=at.epochs_done - already, already=already)
    p.store.close()
    return summary


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


def fit_captions(model: CaptionModel, opt, scaler, p: CaptionInput, spec: ModelSpec,
                 at: Progress, out: Path, quiet: bool) -> None:
    """The epoch loop from ``at`` on, as :func:`loop.fit` does it for the other tasks."""
    cfg = spec.config
    device = next(model.parameters()).device
    amp = device.type == "cuda"
    has_val = len(p.split_ids["val"]) > 0
    pairs = p.pairs["train"]
    for epoch in range(at.epochs_done, cfg.epochs):
        if at.bad_epochs >= cfg.patience:
            break
        t0 = time.time()
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        order = torch.randperm(len(pairs), generator=gen).tolist()
        model.train()
        bar = progress(total=len(order), desc=f"epoch {epoch + 1}/{cfg.epochs}", quiet=quiet)
        total = 0.0
        for x, inp, tgt in pair_batches(p.data["train"], pairs, order, cfg.batch_size):
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                loss = caption_loss(model(to_device(x, device), inp.to(device)), tgt.to(device))
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            scaler.step(opt)
            scaler.update()
            total += loss.item() * len(inp)
            bar.update(len(inp))
        bar.close()
        rec = {"epoch": epoch + 1, "train_loss": total / len(order)}
        for split in ("val",):  # test: once, at the end, with the best weights
            rec[split] = evaluate_split(model, p, split, spec, device)
        rec["seconds"] = round(time.time() - t0, 3)
        monitor = rec["val"] if has_val else {"loss": rec["train_loss"]}
        is_best = (improved("caption", monitor, at.best) if has_val
                   else at.best is None or monitor["loss"] < at.best["loss"])
        if is_best:
            at.best, at.bad_epochs = {**monitor, "epoch": epoch + 1}, 0
            save_checkpoint({"model": model.state_dict(), "meta": spec.to_dict(),
                             "epoch": epoch + 1}, out / "best.pt")
        else:
            at.bad_epochs += 1
        at.history.append(rec)
        save_checkpoint(training_state(model, opt, scaler, spec, at), out / "last.pt")
        write_metrics(out, at.history)
        if not quiet:
            print(epoch_line(rec, cfg.epochs, "cider", is_best), file=sys.stderr)
            if at.bad_epochs >= cfg.patience:
                print(f"vpipe train: early stop, no better val cider for {cfg.patience} epochs",
                      file=sys.stderr)
    if at.history:
        write_curves(at.history, "caption", out / "curves.png")


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


def summarise_captions(model: CaptionModel, spec: ModelSpec, p: CaptionInput, at: Progress,
                       best_epoch: int, device: torch.device, quiet: bool) -> dict:
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
    history = at.history
    return {
        "task": "caption",
        "task_source": p.task_reason,
        "model": f"caption-{spec.config.attention}",
        "modalities": spec.modalities,
        "main_metric": MAIN_METRIC["caption"][0],
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "stopped_early": at.bad_epochs >= spec.config.patience,
        "train": figures["train"],
        "val": figures["val"],
        "test": figures["test"],
        "baseline": base,
        "baseline_caption": top,
        "beam": spec.config.beam,
        "vocabulary": len(spec.classes),
        "n_clips": {s: len(v) for s, v in p.split_ids.items()},
        "n_captions": {s: len(v) for s, v in p.pairs.items()},
        "dropped_training_captions": p.dropped,
        "unlabeled_clips": len(p.joined.unlabeled),
        "unknown_label_ids": len(p.joined.unknown),
        "seconds_per_epoch": round(float(np.mean([r["seconds"] for r in history])), 3)
        if history else None,
        "device": str(device),
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
