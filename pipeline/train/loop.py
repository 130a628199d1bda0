"""The training loop, in one visible function: ``train(features, labels, out, config)``.

Everything that can be wrong with the input is checked by :func:`prepare` before the run folder
is created, so a bad labels file never leaves a half-written run behind. Each epoch trains on
the training clips in an order drawn from (seed, epoch), evaluates val and test, rewrites
``metrics.jsonl`` and ``curves.png``, and saves ``last.pt`` (with optimizer and RNG states, so
``--resume`` continues exactly) and ``best.pt`` when the validation metric improves.
``vpipe.json`` is written when training starts and stamped with the end time and the counts
(in epochs) when the summary is written, as every stage does.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline import __version__
from pipeline.device import check_device_name, pick_device
from pipeline.errors import UsageError
from pipeline.files import atomic_write_text
from pipeline.records import now_iso
from pipeline.runner import progress
from pipeline.shards import MODALITIES, FeatureStore, open_features
from pipeline.train.data import (
    TASKS,
    ClipSequences,
    LabelledClips,
    LabelSpace,
    batches,
    infer_task,
    join_labels,
    present_modalities,
    read_labels,
    split_by_source,
    warn_empty_clips,
)
from pipeline.train.metrics import MAIN_METRIC, improved, task_metrics
from pipeline.train.model import MODELS, POOLS, SequenceModel, loss_of, run_model, to_device
from pipeline.train.runs import (
    epoch_counts,
    features_fingerprint,
    flat_record,
    is_complete,
    open_run_folder,
    outcome,
    report_complete,
    run_params,
    save_checkpoint,
    write_curves,
    write_run_info,
)


@dataclass
class TrainConfig:
    """Every training option, as plain values (written to ``config.json``)."""

    task: str | None = None  # regression | classification | multilabel; None: from the labels
    model: str = "lstm"  # lstm (LRCN) | attention (multimodal tagging)
    pool: str = "last"  # lstm head on the last valid step or the mean of steps
    modalities: list[str] | None = None  # None: every modality present in the shards
    hidden: int = 128
    layers: int = 1
    dropout: float = 0.2
    bidirectional: bool = False
    lr: float = 3e-4  # the LRCN setup's Adam rate
    weight_decay: float = 0.01
    epochs: int = 20
    batch_size: int = 16
    clip_grad: float = 1.0
    patience: int = 5  # epochs without a better validation metric before stopping
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    max_frames: int = 0  # 0: every step; else uniform sampling down to this many
    threshold: float = 0.5
    top_k: int = 5
    device: str = "auto"
    stream: bool = False  # read features from HDF5 per batch instead of holding them in RAM


@dataclass
class Prepared:
    """The checked input of a run: clips per split, their targets, the label space."""

    store: FeatureStore
    space: LabelSpace
    task_reason: str
    modalities: list[str]
    dims: dict[str, int]
    split_ids: dict[str, list[str]]
    targets: dict[str, np.ndarray]
    data: dict[str, ClipSequences]
    joined: LabelledClips
    store_attrs: dict[str, dict] = field(default_factory=dict)


def _positive(x: float) -> bool:
    """True for a finite number above 0 (NaN and inf are not)."""
    return math.isfinite(x) and x > 0


def check_config(cfg: TrainConfig) -> None:
    """Reject option values that cannot work, before anything is read."""
    if cfg.task is not None and cfg.task not in TASKS:
        raise UsageError(f"--task {cfg.task!r}: choose one of {', '.join(TASKS)}")
    if cfg.model not in MODELS:
        raise UsageError(f"--model {cfg.model!r}: choose one of {', '.join(MODELS)}")
    if cfg.pool not in POOLS[:2]:
        raise UsageError(f"--pool {cfg.pool!r}: choose last or mean")
    # patience 0 stopped after the first epoch ("no better val ... for 0 epochs"); top-k 0
    # reported a meaningless top0_accuracy of 0.
    for name in ("hidden", "layers", "epochs", "batch_size", "patience", "top_k"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.max_frames < 0:
        raise UsageError("--max-frames must be 0 (all frames) or more")
    for name in ("lr", "clip_grad"):  # 0 would leave the weights where they started
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
    check_device_name(cfg.device)


def prepare(features: Path, labels_csv: Path, cfg: TrainConfig, quiet: bool = False) -> Prepared:
    """Read and check shards and labels, split by source, load the features (no file written)."""
    check_config(cfg)
    try:
        store = open_features(features)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    if len(store) == 0:
        raise UsageError(f"{features}: no clips in this feature folder (no complete shards)")
    rows = read_labels(labels_csv)
    joined = join_labels(store, rows)
    if not quiet:
        joined.report(len(store))
    task, reason = (
        (cfg.task, "given by --task") if cfg.task else infer_task(list(joined.labels.values()))
    )
    if cfg.task is None and not quiet:
        print(f"vpipe train: task {task} (inferred: {reason})", file=sys.stderr)
    space = LabelSpace.build(task, joined.labels)

    present = present_modalities(store)
    mods = list(dict.fromkeys(cfg.modalities or present))  # --modalities image,image: once
    unknown = [m for m in mods if m not in MODALITIES]
    if unknown:
        raise UsageError(f"--modalities: unknown {', '.join(unknown)} (use image, audio)")
    absent = [m for m in mods if m not in present]
    if absent or not mods:
        raise UsageError(
            f"{features}: no {' or '.join(absent or MODALITIES)} features in these shards "
            f"(present: {', '.join(present) or 'none'})"
        )
    dims = {m: store.dim(m) for m in mods}

    sources = {c: store.info(c)["source"] for c in joined.labels}
    side = split_by_source(sources, cfg.val_fraction, cfg.test_fraction, cfg.seed, joined.splits)
    split_ids = {s: [c for c in joined.labels if side[c] == s] for s in ("train", "val", "test")}
    if not split_ids["train"]:
        raise UsageError("no labelled clip falls in the train split")
    targets = {
        s: np.stack([space.encode(joined.labels[c]) for c in ids]) if ids else np.zeros((0,))
        for s, ids in split_ids.items()
    }
    if not quiet:
        warn_empty_clips(store, list(joined.labels), mods, "vpipe train")
    # One read of the labelled clips (shard by shard), shared by the three splits.
    every = ClipSequences(store, list(joined.labels), mods, cfg.max_frames, cfg.stream)
    data = {s: every.subset(ids) for s, ids in split_ids.items()}
    attrs = {m: store.attrs(m) for m in mods}
    return Prepared(store, space, reason, mods, dims, split_ids, targets, data, joined, attrs)


def run_metrics(meta: dict, outputs: np.ndarray, targets: np.ndarray) -> dict:
    """Task metrics of ``outputs``, with the run's top_k, threshold and training mean."""
    c = meta["config"]
    return task_metrics(
        meta["task"],
        outputs,
        targets,
        train_mean=meta["target_norm"][0],
        top_k=c["top_k"],
        threshold=c["threshold"],
    )


def evaluate(model, data, targets, meta: dict, device) -> dict:
    """Loss and task metrics of the model on one split ({} for an empty split)."""
    if len(data) == 0:
        return {}
    out, loss = run_model(model, data, targets, meta, device)
    return {"loss": loss, **run_metrics(meta, out, targets)}


def baseline_outputs(task: str, train_targets: np.ndarray, n: int, n_classes: int) -> np.ndarray:
    """The trivial predictor: the training mean, class frequencies or tag frequencies."""
    if task == "regression":
        return np.full(n, float(train_targets.mean()))
    if task == "classification":
        prior = np.bincount(train_targets, minlength=n_classes) / len(train_targets)
    else:
        prior = train_targets.mean(0)
    return np.tile(prior, (n, 1))


def train_epoch(model, opt, scaler, data, targets, order, cfg: TrainConfig, meta: dict, bar):
    """One pass over the training clips in ``order``; returns the mean training loss."""
    device = next(model.parameters()).device
    amp = device.type == "cuda"  # float16 autocast + loss scaling on CUDA only
    total = 0.0
    for x, y in batches(data, targets, cfg.batch_size, order):
        y = y.to(device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            loss = loss_of(meta["task"], model(to_device(x, device)), y, meta)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        scaler.step(opt)
        scaler.update()
        total += loss.item() * len(y)
        bar.update(len(y))
    return total / len(order)


def train(
    features: str | Path,
    labels_csv: str | Path,
    out: str | Path,
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
) -> dict:
    """Train a model on cached features; writes the run folder and returns its summary."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a folder")
    p = prepare(Path(features), Path(labels_csv), cfg, quiet)
    cfgd = asdict(cfg)
    cfgd["modalities"] = p.modalities
    fingerprint = features_fingerprint(p.store, list(p.joined.labels), p.store_attrs, p.dims)
    params = run_params(cfgd, Path(features), Path(labels_csv), fingerprint)
    state = open_run_folder(out, cfgd, params, p.split_ids, resume, overwrite)
    started = now_iso()
    if state is not None and is_complete(out, state, cfg.epochs, cfg.patience):
        p.store.close()
        return report_complete(out, state, cfg.epochs, cfg.patience, started, quiet)
    device = pick_device(cfg.device)
    task = p.space.task
    t_train = p.targets["train"]
    # In float64: the float32 targets' std overflows (inf) for labels around 1e20.
    t64 = t_train.astype(np.float64)
    target_norm = (
        (float(t64.mean()), float(t64.std()) or 1.0) if task == "regression" else (0.0, 1.0)
    )
    meta = {
        "config": cfgd,
        "task": task,
        "classes": p.space.classes,
        "modalities": p.modalities,
        "dims": p.dims,
        "target_norm": target_norm,
        "feature_attrs": p.store_attrs,
        "vpipe_version": __version__,
    }

    # Everything is checked: from here on the run folder is written.
    if overwrite and state is None and (out / "config.json").exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "config": cfgd,
        "task": task,
        "task_source": p.task_reason,
        "classes": p.space.classes,
        "features": str(features),
        "labels": str(labels_csv),
        "dims": p.dims,
        "feature_attrs": p.store_attrs,
        "n_clips": {s: len(v) for s, v in p.split_ids.items()},
        "created": now_iso(),
        "vpipe_version": __version__,
        "torch_version": torch.__version__,
    }
    atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    atomic_write_text(out / "splits.json", json.dumps(p.split_ids, indent=1) + "\n")
    # "result" of an earlier call would describe weights this call is about to change.
    write_run_info(out, {"started": started, "ended": None, "params": params, "result": None})

    torch.manual_seed(cfg.seed)
    model = SequenceModel(
        p.dims,
        p.space.n_outputs,
        model=cfg.model,
        pool=cfg.pool,
        hidden=cfg.hidden,
        layers=cfg.layers,
        dropout=cfg.dropout,
        bidirectional=cfg.bidirectional,
    )
    model.set_normalisation({m: p.data["train"].frame_stats(m) for m in p.modalities})
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    history: list[dict] = []
    best, bad_epochs, start, stopped = None, 0, 0, False
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"])
        history, best, bad_epochs = state["history"], state["best"], state["bad_epochs"]
        # Recomputed, so that a --resume with a larger --patience goes on after an early stop.
        start, stopped = state["epoch"], state["bad_epochs"] >= cfg.patience
        if not quiet:
            how = "" if resume else " (an unfinished run with the same options)"
            print(f"vpipe train: resuming {out} after epoch {start}{how}", file=sys.stderr)

    has_val = len(p.split_ids["val"]) > 0
    if not has_val and not quiet:  # e.g. a split column with only train and test
        print(
            "vpipe train: note: no validation clips; best.pt and early stopping follow the "
            "train loss",
            file=sys.stderr,
        )
    name = MAIN_METRIC[task][0]
    n_train = len(p.split_ids["train"])
    plotted = time.time()
    for epoch in range(start, cfg.epochs):
        if stopped:
            break
        t0 = time.time()
        model.train()
        # The order depends only on (seed, epoch), so a resumed run draws the same batches.
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        order = torch.randperm(n_train, generator=gen).tolist()
        bar = progress(total=n_train, desc=f"epoch {epoch + 1}/{cfg.epochs}", quiet=quiet)
        train_loss = train_epoch(
            model, opt, scaler, p.data["train"], t_train, order, cfg, meta, bar
        )
        bar.close()
        rec = {"epoch": epoch + 1, "train_loss": train_loss}
        for split in ("val", "test"):
            rec[split] = evaluate(model, p.data[split], p.targets[split], meta, device)
        rec["seconds"] = round(time.time() - t0, 3)
        monitor = rec["val"] if has_val else {"loss": rec["train_loss"]}
        is_best = (
            improved(task, monitor, best)
            if has_val
            else (best is None or monitor["loss"] < best["loss"])
        )
        if is_best:
            best, bad_epochs = {**monitor, "epoch": epoch + 1}, 0
            save_checkpoint(
                {"model": model.state_dict(), "meta": meta, "epoch": epoch + 1}, out / "best.pt"
            )
        else:
            bad_epochs += 1
        stopped = bad_epochs >= cfg.patience
        history.append(rec)
        save_checkpoint(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state() if device.type == "cuda" else None,
                "meta": meta,
                "history": history,
                "best": best,
                "bad_epochs": bad_epochs,
                "epoch": epoch + 1,
                "stopped": stopped,
            },
            out / "last.pt",
        )
        atomic_write_text(
            out / "metrics.jsonl", "".join(json.dumps(flat_record(r)) + "\n" for r in history)
        )
        if time.time() - plotted > 30:  # drawing costs ~0.2 s: keep it live, not per tiny epoch
            write_curves(history, task, out / "curves.png")
            plotted = time.time()
        if not quiet:
            shown = rec["val"].get(name) if has_val else None
            print(
                f"epoch {epoch + 1}/{cfg.epochs}  train_loss {rec['train_loss']:.4f}"
                + (
                    f"  val_loss {rec['val']['loss']:.4f}  val_{name} {shown:.4f}"
                    if has_val and shown is not None
                    else ""
                )
                + f"  {rec['seconds']:.2f}s"
                + ("  *" if is_best else ""),
                file=sys.stderr,
            )
        if stopped and not quiet:
            print(
                f"vpipe train: early stop, no better val {name} for {cfg.patience} epochs",
                file=sys.stderr,
            )

    if history:
        write_curves(history, task, out / "curves.png")
    # Final figures come from the best checkpoint.
    ck = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(ck["model"])
    base = {}
    for split in ("val", "test"):
        n = len(p.split_ids[split])
        if n:
            trivial = baseline_outputs(task, t_train, n, len(p.space.classes))
            base[split] = run_metrics(meta, trivial, p.targets[split])
    summary = {
        "task": task,
        "task_source": p.task_reason,
        "model": cfg.model,
        "modalities": p.modalities,
        "main_metric": name,
        "best_epoch": ck["epoch"],
        "epochs_run": len(history),
        "stopped_early": stopped,
        "train": evaluate(model, p.data["train"], t_train, meta, device),
        "val": evaluate(model, p.data["val"], p.targets["val"], meta, device),
        "test": evaluate(model, p.data["test"], p.targets["test"], meta, device),
        "baseline": base,
        "n_clips": {s: len(v) for s, v in p.split_ids.items()},
        "n_sources": {
            s: len({p.store.info(c)["source"] for c in v}) for s, v in p.split_ids.items()
        },
        "unlabeled_clips": len(p.joined.unlabeled),
        "unknown_label_ids": len(p.joined.unknown),
        "seconds_per_epoch": round(float(np.mean([r["seconds"] for r in history])), 3)
        if history
        else None,
        "device": str(device),
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_run_info(
        out,
        {
            "ended": now_iso(),
            "counts": epoch_counts(len(history) - start, start),
            "result": outcome(summary),
        },
    )
    p.store.close()
    return summary
