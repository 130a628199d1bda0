"""The run folder: checkpoints, metrics.jsonl, curves.png, and the checks before a resume.

``RUN/config.json`` (the model spec: options, task, classes, feature dims and identity, and
where the input came from), ``metrics.jsonl`` (one line per epoch), ``best.pt`` (weights + the
model spec, all predict needs), ``last.pt`` (also optimizer, RNG state and history, for
``--resume``), ``summary.json``, ``curves.png``, and ``vpipe.json`` (the run record every stage
writes: parameters, versions, start/end, command, counts); each written atomically. A train
call holds the folder's lock (``.vpipe.lock``, as every stage does) from start to end.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from pipeline import records
from pipeline.errors import ParamsChanged, UsageError
from pipeline.files import (
    atomic_path,
    atomic_write_text,
    check_out_dir,
    clean_temp_files,
    remove,
    sha256_of,
)
from pipeline.lock import LOCK, FolderLock
from pipeline.records import DamagedRecord, damaged, now_iso, read_json, read_run_info
from pipeline.runner import sigint_held
from pipeline.train.config import DEFAULT_CHECKPOINT, ModelSpec, TrainConfig, is_own_model
from pipeline.train.model import SequenceModel, build_model
from pipeline.train.own_model import model_source
from pipeline.train.tasks import get_task, options_task

# Options that never change what is learned: they may differ whenever a run is continued.
OPTIONS_NOT_LEARNED = {"device", "stream", "threads", "log"}
# Options that may also change with an explicit --resume (train longer, be more patient).
OPTIONS_RESUME_MAY_CHANGE = OPTIONS_NOT_LEARNED | {"epochs", "patience"}
# Parameters (besides the options) that say what a run learns from; "features"/"labels" paths
# are recorded but not compared, so a moved folder or CSV with the same content still resumes.
INPUT_DIGESTS = ("labels_sha256", "features_fingerprint")


def features_fingerprint(store, clip_ids: list[str], attrs: dict, dims: dict) -> str:
    """sha256 of what the run sees of a feature folder: each labelled clip's id and sequence
    lengths, and the feature identity (model, weights, sampling...) per modality."""
    ids = sorted(clip_ids)
    sel = store.select(ids)
    counts = zip(sel.column("n_frames").tolist(), sel.column("n_audio").tolist(), strict=True)
    rows = [[c, nf, na] for c, (nf, na) in zip(ids, counts, strict=True)]
    if "text" in dims:  # other titles are other inputs (only then: older runs keep theirs)
        rows = [[*r, sel.text_string(r[0])] for r in rows]
    text = json.dumps([rows, attrs, dims], sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def train_params(cfg: TrainConfig, features: Path, labels: Path, fingerprint: str) -> dict:
    """The ``params`` of ``vpipe.json``: every option plus the inputs and their identity."""
    return {
        **asdict(cfg),
        "features": str(Path(features).resolve()),
        "labels": str(Path(labels).resolve()),
        "labels_sha256": sha256_of(labels),
        "features_fingerprint": fingerprint,
        # A user's model: its source's sha256 too, so that a changed class is not resumed.
        **({"model_source": model_source(cfg.model)} if is_own_model(cfg.model) else {}),
    }


def train_versions() -> dict[str, str]:
    """The libraries a run's numbers depend on, besides vpipe and Python."""
    import h5py
    import numpy

    return {"torch": torch.__version__, "numpy": numpy.__version__, "h5py": h5py.__version__}


def write_run_info(out: Path, fields: dict) -> None:
    """Update ``RUN/vpipe.json`` with ``fields``, through the writer every stage uses."""
    records.write_run_info(out, "train", fields, train_versions())


@contextlib.contextmanager
def run_folder_lock(out: Path, inputs: Sequence[str | Path] = (), *,
                    record: Callable[[Path, dict], None] | None = None,
                    said: str = "vpipe train: interrupted; the same command continues {out} "
                                "from its last finished epoch") -> Iterator[None]:
    """Hold ``RUN/.vpipe.lock`` for a whole train call (or tune search): a second copy into the
    same folder is refused naming the holder's pid (exit 2), and a killed holder blocks nothing.

    Taken before anything is read or cleaned there, once ``out`` is known not to be, hold or
    sit in one of ``inputs``. A folder made here for the lock is removed again if the call
    leaves it empty (refused input leaves no run behind). A Ctrl-C is recorded in the folder's
    vpipe.json (``interrupted``, through ``record``; ``ended`` stays empty) and ``said`` in
    one line.
    """
    check_out_dir(out, inputs)
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(out)
    try:
        yield
    except KeyboardInterrupt as e:
        if (out / records.RUN_INFO).is_file():
            with sigint_held():
                (record or write_run_info)(out, {"interrupted": now_iso()})
            print(said.format(out=out), file=sys.stderr)
            e.vpipe_said = True  # type: ignore[attr-defined]  # the CLI adds no second line
        raise
    finally:
        lock.release()
        if made and not any(out.iterdir()):
            out.rmdir()


def run_entries(out: Path) -> list[Path]:
    """What the run folder holds, its lock aside."""
    return [p for p in out.iterdir() if p.name != LOCK] if out.is_dir() else []


def start_run_folder(
    out: Path,
    spec: ModelSpec,
    split_ids: dict[str, list[str]],
    params: dict,
    *,
    task_source: str,
    features: str | Path,
    labels: str | Path,
    started: str,
    overwrite: bool,
) -> None:
    """Write ``config.json`` (the model spec and where its input came from), ``splits.json``
    and ``vpipe.json``; with ``overwrite``, an earlier run there is removed first."""
    if overwrite and (out / "config.json").exists():
        # All but the lock: a lock file deleted under its holder would let a second copy
        # take a new one beside it and write here too.
        for p in run_entries(out):
            remove(p)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        **spec.to_dict(),
        "task_source": task_source,
        "features": str(features),
        "labels": str(labels),
        "n_clips": {s: len(v) for s, v in split_ids.items()},
        "created": now_iso(),
        "torch_version": torch.__version__,
    }
    atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    atomic_write_text(out / "splits.json", json.dumps(split_ids, indent=1) + "\n")
    # "result" of an earlier call would describe weights this call is about to change.
    write_run_info(out, {"started": started, "ended": None, "interrupted": None, "params": params,
                         "result": None})


def finish_run_folder(out: Path, summary: dict, done: int, already: int) -> None:
    """Write ``summary.json`` and stamp ``vpipe.json`` with the end, the counts and the result."""
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_run_info(
        out,
        {"ended": now_iso(), "counts": epoch_counts(done, already), "result": result_of(summary)},
    )


def save_checkpoint(obj: dict, path: Path) -> None:
    # torch's own file writer reports a full disk as a RuntimeError that says neither which
    # file nor why ("unexpected pos 704 vs 598"); written from memory, the failure is an
    # OSError naming the disk as full. A checkpoint of these models is a few MB (with
    # --finetune-text, the text encoder's size: held in memory once more while written).
    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getbuffer())


def load_weights(model: SequenceModel, path: Path) -> int:
    """Load a checkpoint's weights into ``model``; returns the epoch they are from."""
    ck = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(ck["model"])
    return ck["epoch"]


def flat_record(rec: dict) -> dict:
    out = {k: v for k, v in rec.items() if not isinstance(v, dict)}
    for split in ("val", "test"):
        out.update({f"{split}_{k}": v for k, v in rec.get(split, {}).items()})
    return out


def write_metrics(out: Path, history: list[dict]) -> None:
    """``metrics.jsonl``: one flat line per epoch (``val_loss``, ``test_accuracy``...)."""
    text = "".join(json.dumps(flat_record(r)) + "\n" for r in history)
    atomic_write_text(out / "metrics.jsonl", text)


def write_curves(history: list[dict], task: str, path: Path, final: dict | None = None) -> None:
    """Train/val loss and the val metric per epoch, as a PNG (Agg backend, no display); with
    the run's ``final`` summary, its test figure once, at the best epoch (the test split is not
    scored per epoch, so nothing invites choosing by it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = get_task(task).main_metric
    ep = [r["epoch"] for r in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(ep, [r["train_loss"] for r in history], "o-", label="train")
    if any(r.get("val") for r in history):
        a.plot(ep, [r["val"].get("loss") for r in history], "o-", label="val")
    a.set(xlabel="epoch", ylabel="loss", title="loss")
    a.legend()
    vals = [r.get("val", {}).get(name) for r in history]
    if any(v is not None for v in vals):
        b.plot(ep, [math.nan if v is None else v for v in vals], "o-", label="val")
    test = (final or {}).get("test") or {}
    if test.get(name) is not None:
        b.plot([final["best_epoch"]], [test[name]], "s", color="black",
               label="test (best epoch, scored once)")
    b.set(xlabel="epoch", ylabel=name, title=name)
    if b.get_legend_handles_labels()[0]:  # no val split and no test: nothing to name
        b.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def open_run_folder(
    out: Path, cfg: TrainConfig, params: dict, split_ids: dict, resume: bool, overwrite: bool
) -> dict | None:
    """Check what is already in ``out``; returns the last.pt state to continue from, if any.

    ``cfg`` holds the options, ``params`` all of ``vpipe.json``'s. The same options
    (``device``/``stream`` aside) on the same labels and features continue the run there; with
    ``resume``, ``epochs`` and ``patience`` may change too; anything else needs ``overwrite``.
    """
    if not run_entries(out):
        return None
    cfg_path = out / "config.json"
    if not cfg_path.exists():
        if folds_of(out):
            raise UsageError(f"{out}: holds a --folds {folds_of(out)} run; train it with "
                             "--folds again, or choose another --out")
        raise UsageError(f"{out}: exists and is not a vpipe train run; choose another --out")
    if overwrite:
        return None
    recorded = read_json(cfg_path)
    if not isinstance(recorded, dict) or not isinstance(recorded.get("config"), dict):
        raise DamagedRecord(f"{cfg_path}: damaged (no options recorded); restore it, or use "
                            "--overwrite to start again")
    old = recorded["config"]
    check_same_options(out, old, asdict(cfg), resume)
    if (out / "splits.json").exists() and read_splits(out) != split_ids:
        raise ParamsChanged(
            f"{out}: the run there started with other labelled clips or splits "
            "(labels or features changed); use --overwrite to start again"
        )
    check_same_inputs(out, (read_run_info(out) or {}).get("params", {}), params)
    clean_temp_files(out)  # a write cut by a crash; its target still holds the previous file
    last = out / "last.pt"
    return torch.load(last, map_location="cpu", weights_only=True) if last.exists() else None


def check_same_options(out: Path, old: dict, new: dict, resume: bool) -> None:
    """Refuse (``ParamsChanged``) options ``new`` that differ from the run's ``old`` in what
    is learned: with ``resume``, ``epochs`` and ``patience`` may change too."""
    old = options_task(old.get("task")).upgrade_options(old)  # an old spelling: today's
    old = {**asdict(TrainConfig()), **old}  # an option added since: the run had its default
    new = {**asdict(TrainConfig()), **new}
    diff = records.changed_params(
        old, new, OPTIONS_RESUME_MAY_CHANGE if resume else OPTIONS_NOT_LEARNED)
    if diff:
        shown = records.describe_changes(old, new, diff)
        if resume:
            raise ParamsChanged(
                f"{out}: --resume with other options ({shown}); use --overwrite to start again"
            )
        hint = (
            "use --resume to continue it with these, or --overwrite to start again"
            if set(diff) <= OPTIONS_RESUME_MAY_CHANGE
            else "use --overwrite to start again, or choose another --out"
        )
        raise ParamsChanged(f"{out}: a run with other options is there ({shown}); {hint}")


def check_same_inputs(out: Path, before: dict, params: dict) -> None:
    """Refuse other labels or features (by content), or another source of the user's model
    class, than the run's ``vpipe.json`` params."""
    was, now = before.get("model_source"), params.get("model_source")
    if was and now and was != now:  # the model option itself is compared with the options
        raise ParamsChanged(
            f"{out}: the run there was trained with another model_source of {now['class']} "
            f"({now['file']}: sha256 {was['sha256'][:12]}... then, {now['sha256'][:12]}... "
            "now); restore the file, or use --overwrite to start again"
        )
    changed = [k for k in INPUT_DIGESTS if k in before and before[k] != params.get(k)]
    if changed:
        what = " and ".join("labels" if k == "labels_sha256" else "features" for k in changed)
        raise ParamsChanged(
            f"{out}: the run there was trained on other {what} (same clip ids, other content); "
            "use --overwrite to start again"
        )


def load_run(
    run: str | Path, checkpoint: str = DEFAULT_CHECKPOINT
) -> tuple[SequenceModel, ModelSpec]:
    """The model of ``RUN/best.pt`` (or ``last``) with its weights, and its spec."""
    path = Path(run) / f"{checkpoint}.pt"
    if not path.exists() and folds_of(Path(run)):
        raise UsageError(
            f"{run}: a --folds {folds_of(Path(run))} run holds one model per fold: use one "
            f"fold's run, e.g. {Path(run) / 'fold-1'} (the out-of-fold predictions are in "
            f"{Path(run) / 'predictions.jsonl'})"
        )
    if not path.exists():
        raise UsageError(f"{path}: no such checkpoint (is {run} a vpipe train run?)")
    ck = torch.load(path, map_location="cpu", weights_only=True)
    meta = ck["meta"]
    spec = ModelSpec.from_dict({**meta, "config": get_task(meta["task"]).upgrade_options(
        meta["config"])})
    model = build_model(spec)
    model.load_state_dict(ck["model"])
    return model, spec


def folds_of(out: Path) -> int:
    """K when ``out`` holds a ``train --folds K`` run (its ``vpipe.json`` says so), else 0."""
    try:
        info = read_run_info(out) or {}
    except (OSError, ValueError, DamagedRecord):
        return 0
    params = info.get("params") or {}
    return int(params.get("folds") or 0) if not params.get("fold") else 0


def is_complete(out: Path, state: dict, epochs: int, patience: int) -> bool:
    """A run with nothing left to train under these options, that wrote its summary."""
    done = state["epoch"] >= epochs or state["bad_epochs"] >= patience
    return done and (out / "summary.json").exists()


def read_splits(run: str | Path) -> dict[str, list[str]]:
    """``RUN/splits.json``: split name -> its clip ids ({} without the file); anything else
    in it is a damaged record naming the file."""
    path = Path(run) / "splits.json"
    splits = read_json(path)
    if splits is None:
        return {}
    if not (isinstance(splits, dict) and all(
            isinstance(ids, list) and all(isinstance(c, str) for c in ids)
            for ids in splits.values())):
        raise damaged(path, "not split names with their clip ids")
    return splits


def report_complete(
    out: Path, state: dict, epochs: int, patience: int, started: str, quiet: bool
) -> dict:
    """Report a finished run instead of training it again; returns its summary, marked
    ``already_complete`` (a key that is not in summary.json)."""
    summary = read_json(out / "summary.json")
    if not isinstance(summary, dict) or not isinstance(summary.get("best_epoch"), int):
        raise damaged(out / "summary.json", "no best_epoch recorded")
    # Recorded like any stage's re-run: nothing done, every epoch already done.
    write_run_info(
        out, {"started": started, "ended": now_iso(), "counts": epoch_counts(0, state["epoch"])}
    )
    if not quiet:
        early = state["epoch"] < epochs  # then it is complete by the patience rule
        why = f", stopped early after {patience} epochs without a better val metric"
        print(
            f"vpipe train: {out} is already complete ({state['epoch']} epochs"
            + (why if early else "")
            + f", best epoch {summary['best_epoch']}); nothing to train "
            "(--resume --epochs N trains longer, --overwrite starts again)",
            file=sys.stderr,
        )
    return {**summary, "already_complete": True}


def epoch_counts(done: int, already: int) -> dict:
    """``vpipe.json`` counts, in epochs: trained by this call, and before it (resumed)."""
    return {"done": done, "already_done": already, "skipped": 0, "failed": 0}


def result_of(summary: dict) -> dict:
    """The headline of summary.json, for ``vpipe.json`` readers that do not open it."""
    name = summary["main_metric"]
    side = "test" if summary["test"] else "val" if summary["val"] else "train"
    return {
        "epochs_run": summary["epochs_run"],
        "best_epoch": summary["best_epoch"],
        "stopped_early": summary["stopped_early"],
        "main_metric": name,
        "split": side,
        "value": summary[side].get(name),
        "baseline": summary["baseline"].get(side, {}).get(name),
        "seconds_per_epoch": summary["seconds_per_epoch"],
    }
