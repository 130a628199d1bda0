"""The training loop: ``train(features, labels, out, config)`` and the epoch loop, :func:`fit`.

The run folder's lock is taken first (a second copy is refused at once); everything that can be
wrong with the input is then checked by the task's ``prepare`` before anything is written there
(a folder made only for the lock is removed again), so a bad labels file never leaves a
half-written run behind. The loop is every task's (captions included): the task
(``tasks.get_task``) gives its batches, loss, figures and summary. Each epoch trains on the
task's training items (clips, or caption pairs) in an order drawn from (seed, epoch), evaluates
val, rewrites ``metrics.jsonl`` (``curves.png`` every 30 s and at the end), and saves
``last.pt`` (with optimizer and RNG states, so ``--resume`` continues exactly) and ``best.pt``
when the validation metric improves. The final figures come from ``best.pt``. ``vpipe.json``
is written when training starts and stamped with the end time and the counts (in epochs) when
the summary is written, as every stage does.
"""

from __future__ import annotations

import json
import math
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.device import describe_device, pick_device, torch_threads
from pipeline.errors import ParamsChanged, VpipeError
from pipeline.files import atomic_write_text
from pipeline.records import now_iso, read_json
from pipeline.runner import progress
from pipeline.train.config import ModelSpec, TrainConfig
from pipeline.train.inputs import Prepared, model_spec, read_options
from pipeline.train.metrics import improved
from pipeline.train.model import SequenceModel, build_model, parameter_groups
from pipeline.train.runs import (
    features_fingerprint,
    finish_run_folder,
    is_complete,
    load_run,
    load_weights,
    open_run_folder,
    read_splits,
    report_complete,
    result_of,
    run_folder_lock,
    save_checkpoint,
    start_run_folder,
    train_params,
    write_curves,
    write_metrics,
    write_run_info,
)
from pipeline.train.sequences import ClipSequences
from pipeline.train.tasks import get_task, options_task

# Called with each epoch's record once it is saved; True stops training (see train_prepared).
EpochHook = Callable[[dict], bool]


@dataclass
class Progress:
    """Where training stands; saved in ``last.pt``, so that a resume goes on exactly."""

    history: list[dict] = field(default_factory=list)  # one record per epoch done
    best: dict | None = None  # the monitored figures of the best epoch, and its number
    bad_epochs: int = 0  # epochs since the best one

    @property
    def epochs_done(self) -> int:
        return len(self.history)


def train(
    features: str | Path,
    labels_csv: str | Path,
    out: str | Path,
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    on_epoch: EpochHook | None = None,
    withhold_test: bool = False,
) -> dict:
    """Train a model on cached features; writes the run folder and returns its summary.
    ``labels_csv`` is the task's table: labels, or captions for ``--task caption``.
    ``on_epoch`` and ``withhold_test``: see :func:`train_prepared` (``vpipe tune``'s trials)."""
    out = Path(out)
    with run_folder_lock(out, [features, labels_csv]), torch_threads(cfg.threads):
        # Unknown options, the labels' task (given or inferred) and its input: all checked here.
        cfg = read_options(cfg, quiet)
        p = options_task(cfg.task).prepare(Path(features), Path(labels_csv), cfg, quiet)
        return train_prepared(p, features, labels_csv, out, cfg, resume, overwrite, quiet,
                              on_epoch=on_epoch, withhold_test=withhold_test)


# Captions train through train() as every task does; the name stays for existing callers.
train_captions = train


def train_prepared(
    p: Prepared,
    features: str | Path,
    labels_csv: str | Path,
    out: Path,
    cfg: TrainConfig,
    resume: bool,
    overwrite: bool,
    quiet: bool,
    *,
    on_epoch: EpochHook | None = None,
    withhold_test: bool = False,
) -> dict:
    """The run of checked input ``p`` in ``out`` (its lock held): resumed, reported complete
    or trained; closes ``p``'s store. One run, or one fold of ``train_folds``.

    ``on_epoch(record)`` is called after each epoch is saved (the record as in metrics.jsonl);
    returning True ends training there, as an early stop does (a tuning trial pruned).
    ``withhold_test``: the summary has no test figures (a tuning trial: the test split is
    scored once, on the best trial, by :func:`score_test`)."""
    spec = model_spec(cfg, p)
    task = get_task(spec.task)
    cfg = spec.config  # the options with the modalities used
    fingerprint = features_fingerprint(p.store, list(p.joined.labels), p.store_attrs, p.dims)
    params = train_params(cfg, Path(features), Path(labels_csv), fingerprint)
    state = open_run_folder(out, cfg, params, p.split_ids, resume, overwrite)
    started = now_iso()
    if state is not None and is_complete(out, state, cfg.epochs, cfg.patience):
        p.store.close()
        return report_complete(out, state, cfg.epochs, cfg.patience, started, quiet)
    device = pick_device(cfg.device)

    # Everything is checked: from here on the run folder is written.
    start_run_folder(
        out,
        spec,
        p.split_ids,
        params,
        task_source=p.task_reason,
        features=features,
        labels=labels_csv,
        started=started,
        overwrite=overwrite,
    )
    task.write_run_files(p, out)
    write_run_info(out, {"device": describe_device(device)})  # information, not a parameter
    model, opt, scaler = new_training(spec, p.data["train"], device)
    at = Progress()
    if state is not None:
        at = restore(state, model, opt, scaler, device)
        if not quiet:
            how = "" if resume else " (an unfinished run with the same options)"
            print(f"vpipe train: resuming {out} after epoch {at.epochs_done}{how}", file=sys.stderr)
    already = at.epochs_done
    fit(model, opt, scaler, p, spec, at, out, quiet, on_epoch)

    best_epoch = load_weights(model, out / "best.pt")
    stopped = at.bad_epochs >= cfg.patience
    scored = p.without_test() if withhold_test else p
    summary = task.summarise(model, spec, scored, at.history, stopped, best_epoch, device, quiet)
    write_curves(at.history, spec.task, out / "curves.png", final=summary)
    finish_run_folder(out, summary, done=at.epochs_done - already, already=already)
    p.store.close()
    return summary


def score_test(run: Path, features: str | Path, labels_csv: str | Path, quiet: bool) -> dict:
    """Score a finished run trained with ``withhold_test`` on its test split, once, with its
    best checkpoint, and write the summary ``train`` would have written (the loop's own)."""
    with run_folder_lock(run):
        model, spec = load_run(run)
        state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
        before = read_json(run / "summary.json")
        p = options_task(spec.config.task).prepare(Path(features), Path(labels_csv),
                                                    spec.config, quiet=True)
        try:
            if p.split_ids != read_splits(run):
                raise ParamsChanged(f"{run}: its labels or features changed since it was "
                                    "trained; its test split cannot be scored")
            device = pick_device(spec.config.device)
            model.to(device)
            summary = get_task(spec.task).summarise(model, spec, p, state["history"],
                                                    state["stopped"], before["best_epoch"],
                                                    device, quiet)
        finally:
            p.store.close()
        write_curves(state["history"], spec.task, run / "curves.png", final=summary)
        atomic_write_text(run / "summary.json", json.dumps(summary, indent=2) + "\n")
        write_run_info(run, {"result": result_of(summary)})
    return summary


def fit(
    model: SequenceModel,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    p: Prepared,
    spec: ModelSpec,
    at: Progress,
    out: Path,
    quiet: bool,
    on_epoch: EpochHook | None = None,
) -> None:
    """The epoch loop from ``at`` on: train, evaluate val and test, keep ``best.pt`` and
    ``last.pt``, stop after ``patience`` epochs without a better validation metric (or when
    ``on_epoch`` says so)."""
    cfg, task = spec.config, get_task(spec.task)
    device = next(model.parameters()).device
    has_val = len(p.split_ids["val"]) > 0
    if not has_val and not quiet:  # e.g. a split column with only train and test
        print(
            "vpipe train: note: no validation clips; best.pt and early stopping follow the "
            "train loss",
            file=sys.stderr,
        )
    n_train = task.n_train_items(p)
    plotted = time.time()
    board = EpochBoard(out, cfg.log)
    for epoch in range(at.epochs_done, cfg.epochs):
        if at.bad_epochs >= cfg.patience:
            break
        t0 = time.time()
        # The order depends only on (seed, epoch), so a resumed run draws the same batches.
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        order = torch.randperm(n_train, generator=gen).tolist()
        desc = f"epoch {epoch + 1}/{cfg.epochs}"
        rec = {
            "epoch": epoch + 1,
            "train_loss": train_epoch(
                model, opt, scaler, task.train_batches(p, order, cfg.batch_size), len(order),
                spec, desc, quiet
            ),
        }
        if not math.isfinite(rec["train_loss"]):  # every later epoch would be NaN too
            raise TrainingDiverged(
                f"training loss {rec['train_loss']} at epoch {epoch + 1}: training stops (the "
                "weights overflowed: a lower --lr? or features with NaN or inf?)")
        for split in ("val",):  # test: once, at the end, with the best weights
            rec[split] = task.evaluate_split(model, p, split, spec, device)
        rec["seconds"] = round(time.time() - t0, 3)

        monitor = rec["val"] if has_val else {"loss": rec["train_loss"]}
        is_best = (
            improved(spec.task, monitor, at.best)
            if has_val
            else (at.best is None or monitor["loss"] < at.best["loss"])
        )
        # Better only by the tie-break (the same val figure, a lower val loss): said so.
        tie = (is_best and has_val and at.best is not None
               and monitor.get(task.main_metric) == at.best.get(task.main_metric))
        if is_best:
            at.best, at.bad_epochs = {**monitor, "epoch": epoch + 1}, 0
            weights = {"model": model.state_dict(), "meta": spec.to_dict(), "epoch": epoch + 1}
            save_checkpoint(weights, out / "best.pt")
        else:
            at.bad_epochs += 1
        at.history.append(rec)
        save_checkpoint(training_state(model, opt, scaler, spec, at), out / "last.pt")
        write_metrics(out, at.history)
        board.add(rec)
        if time.time() - plotted > 30:  # drawing costs ~0.2 s: keep it live, not per tiny epoch
            write_curves(at.history, spec.task, out / "curves.png")
            plotted = time.time()
        if not quiet:
            print(epoch_line(rec, cfg.epochs, task.main_metric, is_best, tie), file=sys.stderr)
            if at.bad_epochs >= cfg.patience:
                what = (f"val {task.main_metric} (nor the same with a lower val loss)" if has_val
                        else "train loss")
                print(f"vpipe train: early stop, no better {what} for {cfg.patience} epochs",
                      file=sys.stderr)
        if on_epoch is not None and on_epoch(rec):
            break
    board.close()
    if at.history:
        write_curves(at.history, spec.task, out / "curves.png")


class EpochBoard:
    """``--log tensorboard``: each epoch's record as scalars in ``OUT/tensorboard`` (step: the
    epoch, so a resumed run goes on where it stopped); nothing with ``--log none``."""

    def __init__(self, out: Path, log: str) -> None:
        self.writer = None
        if log == "tensorboard":
            from pipeline.train.inputs import tensorboard_writer_class

            self.writer = tensorboard_writer_class()(log_dir=str(out / "tensorboard"))

    def add(self, rec: dict) -> None:
        if self.writer is None:
            return
        for name, value in flat_figures(rec).items():
            self.writer.add_scalar(name, value, rec["epoch"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def flat_figures(rec: dict, prefix: str = "") -> dict[str, float]:
    """An epoch record's numbers by slash-joined name (``val/mse``, ``train_loss``)."""
    out: dict[str, float] = {}
    for k, v in rec.items():
        if k == "epoch":
            continue
        if isinstance(v, dict):
            out.update(flat_figures(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


class TrainingDiverged(VpipeError):
    """A training loss that is NaN or infinite: the run stops, saying where (exit 1)."""


def train_epoch(
    model: SequenceModel,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    batches: Iterable,
    n_items: int,
    spec: ModelSpec,
    desc: str,
    quiet: bool,
) -> float:
    """One pass over the task's training ``batches`` (``n_items`` items: clips, or caption
    pairs); returns the mean training loss."""
    cfg = spec.config
    task = get_task(spec.task)
    device = next(model.parameters()).device
    amp = device.type == "cuda"  # float16 autocast + loss scaling on CUDA only
    model.train()
    bar = progress(total=n_items, desc=desc, quiet=quiet)
    # Summed on the device in float64, read once per epoch: a .item() per step would wait for
    # the GPU at every step. The same sum as Python floats of each step's loss, bit for bit.
    total = torch.zeros((), dtype=torch.float64, device=device)
    # On CUDA the next batches are gathered (and pinned) in a thread while the GPU trains.
    for batch in prefetched(batches, depth=2 if amp else 0, pin=amp):
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            loss, n = task.batch_loss(spec, model, batch, device)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        scaler.step(opt)
        scaler.update()
        total += loss.detach().double() * n
        bar.update(n)
    bar.close()
    return total.item() / n_items


def prefetched(batches: Iterable, depth: int, pin: bool = False) -> Iterator:
    """``batches`` as they are, made ``depth`` batches ahead in a thread (0: in this one);
    with ``pin`` their tensors in pinned memory, so that the copy to the GPU does not stall.
    An error in the thread comes out here, in its place in the order."""
    if depth <= 0:
        yield from batches
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: tuple) -> bool:
        """Queue ``item`` unless the consumer has stopped (False then)."""
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def fill() -> None:
        try:
            for b in batches:
                if not put((pinned(b) if pin else b, None)):
                    return
            put((_END, None))
        except BaseException as e:  # handed to the consumer, raised there
            put((_END, e))

    thread = threading.Thread(target=fill, daemon=True, name="vpipe-prefetch")
    thread.start()
    try:
        while True:
            item, error = q.get()
            if item is _END:
                if error is not None:
                    raise error
                return
            yield item
    finally:  # the consumer stopped early (an error, Ctrl-C): the thread ends too
        stop.set()


_END = object()


def pinned(x: Any) -> Any:
    """``x`` (tensors in tuples, lists and dicts) with its CPU tensors in pinned memory."""
    if isinstance(x, torch.Tensor):
        return x.pin_memory() if x.device.type == "cpu" else x
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # a named tuple
        return type(x)(*(pinned(v) for v in x))
    if isinstance(x, tuple | list):
        return type(x)(pinned(v) for v in x)
    if isinstance(x, dict):
        return {k: pinned(v) for k, v in x.items()}
    return x


def epoch_line(rec: dict, epochs: int, metric: str, is_best: bool, tie: bool = False) -> str:
    """``epoch 3/20  train_loss 0.4123  val_loss 0.5012  val_accuracy 0.8100  0.42s  *``: the
    mark on a new best epoch, ``* (same val_accuracy, lower val_loss)`` where only the
    tie-break made it one."""
    parts = [f"epoch {rec['epoch']}/{epochs}", f"train_loss {rec['train_loss']:.4f}"]
    shown = rec["val"].get(metric)  # None: no val split, or the metric is undefined there
    if shown is not None:
        parts += [f"val_loss {rec['val']['loss']:.4f}", f"val_{metric} {shown:.4f}"]
    parts.append(f"{rec['seconds']:.2f}s")
    mark = f"  * (same val_{metric}, lower val_loss)" if tie else "  *" if is_best else ""
    return "  ".join(parts) + mark


# --------------------------------------------------------------------------- state and resume


def new_training(
    spec: ModelSpec, train_data: ClipSequences, device: torch.device
) -> tuple[SequenceModel, torch.optim.Optimizer, torch.amp.GradScaler]:
    """The model (seeded, inputs normalised with the training frames), AdamW and the scaler."""
    cfg = spec.config
    torch.manual_seed(cfg.seed)
    model = build_model(spec)
    model.set_normalisation(train_data.frame_stats_of(spec.modalities))
    model.to(device)
    opt = torch.optim.AdamW(parameter_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    return model, opt, scaler


def training_state(
    model: SequenceModel,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    spec: ModelSpec,
    at: Progress,
) -> dict:
    """``last.pt``: the weights and everything a resume needs to go on exactly."""
    cuda = next(model.parameters()).device.type == "cuda"
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": torch.get_rng_state(),
        # The random state of the GPU the model is on (not GPU 0's: --device cuda:1).
        "cuda_rng": torch.cuda.get_rng_state(next(model.parameters()).device) if cuda else None,
        "meta": spec.to_dict(),
        "history": at.history,
        "best": at.best,
        "bad_epochs": at.bad_epochs,
        "epoch": at.epochs_done,
        "stopped": at.bad_epochs >= spec.config.patience,
    }


def restore(
    state: dict,
    model: SequenceModel,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
) -> Progress:
    """Put a ``last.pt`` state back into the model, optimizer, scaler and RNGs."""
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    load_scaler(scaler, state["scaler"])
    torch.set_rng_state(state["rng"])
    if state.get("cuda_rng") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    # Early stopping is judged again from bad_epochs, so that a --resume with a larger
    # --patience goes on after an early stop.
    return Progress(state["history"], state["best"], state["bad_epochs"])


def load_scaler(scaler: torch.amp.GradScaler, saved: dict) -> None:
    """A saved GradScaler state into ``scaler``. A run may resume on another device: a CPU run
    saved a disabled scaler's empty state, which an enabled (CUDA) scaler refuses ("The source
    state dict is empty"), so that scaler starts afresh, as a new CUDA run's does; a CUDA
    state into the CPU's disabled scaler is a no-op."""
    if saved or not scaler.is_enabled():
        scaler.load_state_dict(saved)
