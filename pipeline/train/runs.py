"""The run folder: checkpoints, metrics.jsonl, curves.png, and the checks before a resume.

``RUN/config.json`` (options, task, classes, feature dims and identity), ``metrics.jsonl`` (one
line per epoch), ``best.pt`` (model + what predict needs), ``last.pt`` (also optimizer, RNG state
and history, for ``--resume``), ``summary.json``, ``curves.png``; each written atomically.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from pipeline.errors import UsageError
from pipeline.records import atomic_path, clean_temp_files
from pipeline.train.metrics import MAIN_METRIC
from pipeline.train.models import build_model

# Options that may change between a run and its --resume (they do not change what is learned).
RESUMABLE = {"epochs", "patience", "device", "stream"}


def save_checkpoint(obj: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def flat_record(rec: dict) -> dict:
    out = {k: v for k, v in rec.items() if not isinstance(v, dict)}
    for split in ("val", "test"):
        out.update({f"{split}_{k}": v for k, v in rec.get(split, {}).items()})
    return out


def write_curves(history: list[dict], task: str, path: Path) -> None:
    """Train/val loss and the main metric per epoch, as a PNG (Agg backend, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = MAIN_METRIC[task][0]
    ep = [r["epoch"] for r in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(ep, [r["train_loss"] for r in history], "o-", label="train")
    if any(r.get("val") for r in history):
        a.plot(ep, [r["val"].get("loss") for r in history], "o-", label="val")
    a.set(xlabel="epoch", ylabel="loss", title="loss")
    a.legend()
    for split in ("val", "test"):
        vals = [r.get(split, {}).get(name) for r in history]
        if any(v is not None for v in vals):
            b.plot(ep, [math.nan if v is None else v for v in vals], "o-", label=split)
    b.set(xlabel="epoch", ylabel=name, title=name)
    b.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def open_run_folder(
    out: Path, cfg: dict, split_ids: dict, resume: bool, overwrite: bool
) -> dict | None:
    """Check what is already in ``out``; returns the last.pt state to resume from, if any."""
    if not out.exists() or not any(out.iterdir()):
        return None
    cfg_path = out / "config.json"
    if not cfg_path.exists():
        raise UsageError(f"{out}: exists and is not a vpipe train run; choose another --out")
    if overwrite:
        return None
    if not resume:
        raise UsageError(
            f"{out}: a run is already there; use --resume to continue it or "
            "--overwrite to start again"
        )
    old = json.loads(cfg_path.read_text(encoding="utf-8"))["config"]
    diff = [
        k for k in sorted(set(old) | set(cfg)) if k not in RESUMABLE and old.get(k) != cfg.get(k)
    ]
    if diff:
        raise UsageError(
            f"{out}: --resume with other options ("
            + "; ".join(f"{k}: {old.get(k)!r} -> {cfg.get(k)!r}" for k in diff[:4])
            + "); use --overwrite to start again"
        )
    splits = out / "splits.json"
    if splits.exists() and json.loads(splits.read_text(encoding="utf-8")) != split_ids:
        raise UsageError(
            f"{out}: --resume with other labelled clips or splits than the run started with "
            "(labels or features changed); use --overwrite to start again"
        )
    clean_temp_files(out)  # a write cut by a crash; its target still holds the previous file
    last = out / "last.pt"
    return torch.load(last, map_location="cpu", weights_only=True) if last.exists() else None


def load_run(run: str | Path, checkpoint: str = "best") -> tuple[torch.nn.Module, dict]:
    """The model of ``RUN/best.pt`` (or ``last``) with its weights, and its meta."""
    path = Path(run) / f"{checkpoint}.pt"
    if not path.exists():
        raise UsageError(f"{path}: no such checkpoint (is {run} a vpipe train run?)")
    ck = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model(ck["meta"])
    model.load_state_dict(ck["model"])
    return model, ck["meta"]
