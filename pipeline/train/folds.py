"""k-fold cross-validation by source (``vpipe train --folds K``): K whole runs and their summary.

The labelled sources are dealt into K disjoint groups with the run's seed
(:func:`labels.fold_groups`). Fold k is an ordinary run in ``OUT/fold-k``, trained by the same
:func:`loop.train_prepared` as a single run (so each is resumable and refuses other options as
any run does): it tests on group k and validates (best epoch, early stopping) on a
``val_fraction`` share of the other sources. Around them, ``OUT`` holds:

- ``summary.json``: each fold's test figures (per clip and per source, the trivial baseline
  beside them), their mean and std over the folds, each fold's sources and warnings;
- ``predictions.jsonl``: the out-of-fold predictions, each clip (then each source) predicted by
  the fold that tested it, with ``"fold"`` and ``"split": "test"``;
- ``vpipe.json``: the parameters (``folds`` among them), times, and counts in epochs over all
  folds, as a single run's.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from pipeline.device import torch_threads
from pipeline.errors import UsageError, plural
from pipeline.files import atomic_write_text, clean_temp_files, remove
from pipeline.records import now_iso, read_run_info
from pipeline.train.config import TrainConfig
from pipeline.train.inputs import model_spec, open_store, prepare, read_options
from pipeline.train.loop import EpochHook, train_prepared
from pipeline.train.predict import prediction_lines
from pipeline.train.runs import (
    check_same_inputs,
    check_same_options,
    features_fingerprint,
    folds_of,
    load_run,
    run_entries,
    run_folder_lock,
    train_params,
    write_run_info,
)
from pipeline.train.tasks import get_task

STD_DDOF = 0  # the std over folds is numpy's default, the population std


def fold_dir(out: Path, k: int) -> Path:
    """The run folder of fold ``k`` (1..K)."""
    return Path(out) / f"fold-{k}"


def train_folds(
    features: str | Path,
    labels_csv: str | Path,
    out: str | Path,
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    on_epoch: EpochHook | None = None,
    on_fold: Callable[[int, dict], bool] | None = None,
    withhold_test: bool = False,
) -> dict:
    """Cross-validate over ``cfg.folds`` groups of sources; writes ``OUT/fold-1..K`` and the
    folds' summary, and returns that summary (``already_complete`` when no fold trained).

    ``vpipe tune``'s trials: ``on_epoch`` is each fold's (as for one run); ``on_fold(k,
    summary)`` is called after fold k, returning True to train no further fold (a pruned
    trial); ``withhold_test`` trains the folds without scoring their test groups and writes the
    validation summary (:func:`val_summary`); :func:`score_folds_test` scores them later, once."""
    out = Path(out)
    check_folds(cfg)
    with run_folder_lock(out, [features, labels_csv]), torch_threads(cfg.threads):
        return _train_folds(Path(features), Path(labels_csv), out, cfg, resume, overwrite, quiet,
                            on_epoch, on_fold, withhold_test)


def check_folds(cfg: TrainConfig) -> None:
    """``--folds``: at least 2, and a task that can be cross-validated."""
    if cfg.task is not None and not get_task(cfg.task).supports_folds:
        raise UsageError(f"--folds is not supported with --task {cfg.task} (train one "
                         "train/val/test split, e.g. with --test-fraction)")
    if cfg.folds < 2:
        raise UsageError("--folds must be at least 2 (or 0: one train/val/test split)")


def _train_folds(features: Path, labels_csv: Path, out: Path, cfg: TrainConfig, resume: bool,
                 overwrite: bool, quiet: bool, on_epoch: EpochHook | None = None,
                 on_fold: Callable[[int, dict], bool] | None = None,
                 withhold_test: bool = False) -> dict:
    # Everything is checked once, with its notes said once, before anything is written.
    cfg = read_options(cfg, quiet)
    first = prepare(features, labels_csv, replace(cfg, fold=1), quiet)
    spec = model_spec(replace(cfg, fold=1), first)
    fingerprint = features_fingerprint(first.store, list(first.joined.labels),
                                       first.store_attrs, first.dims)
    params = train_params(replace(spec.config, fold=0), features, labels_csv, fingerprint)
    try:
        open_folds_folder(out, params, resume, overwrite)
    except BaseException:
        first.store.close()
        raise
    started = now_iso()
    write_run_info(out, {"started": started, "ended": None, "interrupted": None, "params": params,
                         "result": None})

    folds = []
    for k in range(1, cfg.folds + 1):
        fold_cfg = replace(cfg, fold=k)
        p = first if k == 1 else prepare(features, labels_csv, fold_cfg, quiet=True)
        source_of = p.store.source_of()
        sources = {s: sorted({source_of[c] for c in ids}) for s, ids in p.split_ids.items()}
        run = fold_dir(out, k)
        if not quiet:
            test = plural(len(sources["test"]), "sources")
            print(f"vpipe train: fold {k}/{cfg.folds}: test on {test}, "
                  f"val {len(sources['val'])}, train {len(sources['train'])} -> {run}",
                  file=sys.stderr)
        test_ids = list(p.split_ids["test"])
        with run_folder_lock(run):
            s = train_prepared(p, features, labels_csv, run, fold_cfg, resume, False, quiet,
                               on_epoch=on_epoch, withhold_test=withhold_test)
        counts = (read_run_info(run) or {}).get("counts") or {}
        folds.append({"fold": k, "summary": s, "sources": sources, "test_ids": test_ids,
                      "counts": counts})
        if on_fold is not None and on_fold(k, s):
            break

    if withhold_test:
        summary = val_summary(folds, params, cfg.folds)
    else:
        write_out_of_fold(out, features, folds, cfg.device, cfg.stream)
        summary = folds_summary(folds, params)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    trained = [f for f in folds if not f["summary"].get("already_complete")]
    counts = {
        "done": sum(f["counts"].get("done", 0) for f in folds),
        "already_done": sum(f["counts"].get("already_done", 0) for f in folds),
        "skipped": 0,
        "failed": 0,
        "folds_done": len(trained),
        "folds_already_done": len(folds) - len(trained),
    }
    result = val_result(summary) if withhold_test else folds_result(summary)
    write_run_info(out, {"ended": now_iso(), "counts": counts, "result": result})
    return {**summary, "already_complete": True} if not trained else summary


def val_summary(folds: list[dict], params: dict, k: int) -> dict:
    """``OUT/summary.json`` of folds trained with their test groups withheld (a tuning
    trial): each fold's validation figures at its best epoch and their mean over the folds
    trained (fewer than K when the trial was pruned)."""
    first = folds[0]["summary"]
    vals = [f["summary"].get("val") or {} for f in folds]
    return {
        "folds": k,
        "folds_trained": len(folds),
        "task": first["task"],
        "model": first["model"],
        "modalities": first["modalities"],
        "main_metric": first["main_metric"],
        "seed": params["seed"],
        "epochs_run": sum(f["summary"]["epochs_run"] for f in folds),
        "mean": {"val": over_folds(vals, _mean)},
        "std": {"val": over_folds(vals, _std)},
        "std_ddof": STD_DDOF,
        "per_fold": [{"fold": f["fold"], "run": f"fold-{f['fold']}",
                      "best_epoch": f["summary"]["best_epoch"],
                      "epochs_run": f["summary"]["epochs_run"], "val": v}
                     for f, v in zip(folds, vals, strict=True)],
        "test": "withheld: scored once, on the best trial of vpipe tune",
    }


def val_result(summary: dict) -> dict:
    name = summary["main_metric"]
    return {"folds": summary["folds"], "main_metric": name, "split": "val",
            "mean": summary["mean"]["val"].get(name), "std": summary["std"]["val"].get(name)}


def score_folds_test(out: str | Path, features: str | Path, labels_csv: str | Path) -> dict:
    """Score the test group of every fold of ``out`` (trained with ``withhold_test``), once,
    and write what ``vpipe train --folds`` would have written: the folds' summary with test
    figures, the out-of-fold predictions and the result in ``vpipe.json``."""
    from pipeline.train.loop import score_test

    out = Path(out)
    with run_folder_lock(out, [features, labels_csv]):
        info = read_run_info(out) or {}
        params = info.get("params") or {}
        cfg = load_run(fold_dir(out, 1))[1].config
        folds = []
        for k in range(1, int(params["folds"]) + 1):
            run = fold_dir(out, k)
            s = score_test(run, features, labels_csv, quiet=True)
            p = prepare(Path(features), Path(labels_csv), replace(cfg, fold=k), quiet=True)
            try:
                source_of = p.store.source_of()
                sources = {n: sorted({source_of[c] for c in ids})
                           for n, ids in p.split_ids.items()}
                test_ids = list(p.split_ids["test"])
            finally:
                p.store.close()
            folds.append({"fold": k, "summary": s, "sources": sources, "test_ids": test_ids})
        write_out_of_fold(out, Path(features), folds, cfg.device, cfg.stream)
        summary = folds_summary(folds, params)
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        write_run_info(out, {"result": folds_result(summary)})
    return summary


def open_folds_folder(out: Path, params: dict, resume: bool, overwrite: bool) -> None:
    """Check what is in ``out`` before a folds run writes there, as a single run's folder is
    checked: the same options and inputs continue it; ``overwrite`` empties a train run."""
    if not run_entries(out):
        return
    if not folds_of(out):
        if not (out / "config.json").exists():
            raise UsageError(f"{out}: exists and is not a vpipe train run; choose another --out")
        if not overwrite:
            raise UsageError(f"{out}: holds a run without --folds; use --overwrite to replace "
                             "it, or choose another --out")
    if overwrite:
        for entry in run_entries(out):  # all but the lock, which this call holds
            remove(entry)
        return
    before = (read_run_info(out) or {}).get("params", {})
    names = list(asdict(TrainConfig()))
    check_same_options(out, {k: before[k] for k in names if k in before},
                       {k: params[k] for k in names}, resume)
    check_same_inputs(out, before, params)
    clean_temp_files(out)


def write_out_of_fold(out: Path, features: Path, folds: list[dict], device: str,
                      stream: bool) -> None:
    """``predictions.jsonl``: every clip by the fold that tested it (the best checkpoint), as
    ``vpipe predict`` writes them, then every source; each line with its ``fold``."""
    store = open_store(features)
    clips, sources = [], []
    for f in folds:
        model, spec = load_run(fold_dir(out, f["fold"]))
        c, s = prediction_lines(model, spec, store, f["test_ids"],
                                dict.fromkeys(f["test_ids"], "test"), spec.config.threshold,
                                device, stream, extra={"fold": f["fold"]})
        clips += c
        sources += s
    store.close()
    text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in (*clips, *sources))
    atomic_write_text(out / "predictions.jsonl", text)


def over_folds(figures: list[dict], stat: Callable[[list[float]], float]) -> dict:
    """``stat`` of each figure over the folds (nested dicts too, e.g. ``"source"``), over the
    folds where it is defined; ``None`` where no fold has it."""
    out: dict = {}
    for key in dict.fromkeys(k for f in figures for k in f):
        values = [f.get(key) for f in figures]
        if any(isinstance(v, dict) for v in values):
            out[key] = over_folds([v for v in values if isinstance(v, dict)], stat)
            continue
        nums = [float(v) for v in values
                if isinstance(v, (int, float)) and not isinstance(v, bool)]
        out[key] = stat(nums) if nums else None
    return out


def _mean(xs: list[float]) -> float:
    return float(np.mean(xs))


def _std(xs: list[float]) -> float:
    return float(np.std(xs, ddof=STD_DDOF))


def folds_summary(folds: list[dict], params: dict) -> dict:
    """``OUT/summary.json``: each fold's test figures and sources, their mean and std."""
    first = folds[0]["summary"]
    task = first["task"]
    per_fold = []
    for f in folds:
        s = f["summary"]
        per_fold.append({
            "fold": f["fold"],
            "run": f"fold-{f['fold']}",
            "best_epoch": s["best_epoch"],
            "epochs_run": s["epochs_run"],
            "stopped_early": s["stopped_early"],
            "test": s["test"],
            "baseline": s["baseline"].get("test", {}),
            "n_clips": s["n_clips"],
            "n_sources": s["n_sources"],
            "sources": f["sources"],
            "warnings": s.get("warnings", []),
        })
    tests = [f["test"] for f in per_fold]
    bases = [f["baseline"] for f in per_fold]
    summary = {
        "folds": len(folds),
        "task": task,
        "task_source": first["task_source"],
        "model": first["model"],
        "modalities": first["modalities"],
        "main_metric": first["main_metric"],
        "seed": params["seed"],
        "val_fraction": params["val_fraction"],
        "n_clips": sum(len(f["test_ids"]) for f in folds),
        "n_sources": sum(len(f["sources"]["test"]) for f in folds),
        "mean": {"test": over_folds(tests, _mean), "baseline": over_folds(bases, _mean)},
        "std": {"test": over_folds(tests, _std), "baseline": over_folds(bases, _std)},
        "std_ddof": STD_DDOF,
        "per_fold": per_fold,
    }
    summary["warnings"] = folds_caveats(summary)
    return summary


def folds_caveats(summary: dict) -> list[str]:
    """Each fold's warnings, said once for the folds that share them, and whether the mean
    over the folds beats the trivial baseline per source."""
    by_text: dict[str, list[int]] = {}
    for f in summary["per_fold"]:
        for text in f["warnings"]:
            by_text.setdefault(text, []).append(f["fold"])
    out = []
    for text, ks in by_text.items():
        which = f"fold {ks[0]}" if len(ks) == 1 else f"folds {', '.join(map(str, ks))}"
        out.append(f"{which}: {text}")
    task = get_task(summary["task"])
    name, higher = task.main_metric, task.higher_is_better
    got = summary["mean"]["test"].get("source", {}).get(name)
    base = summary["mean"]["baseline"].get("source", {}).get(name)
    if got is not None and base is not None and (got <= base if higher else got >= base):
        out.append(f"the model does not beat the trivial baseline per source in the mean over "
                   f"{summary['folds']} folds ({name} {got:.4g}, baseline {base:.4g})")
    return out


def folds_result(summary: dict) -> dict:
    """The headline of summary.json for ``vpipe.json``: the main metric's mean and std."""
    name = summary["main_metric"]
    mean, std = summary["mean"], summary["std"]
    return {
        "folds": summary["folds"],
        "main_metric": name,
        "split": "test",
        "mean": mean["test"].get(name),
        "std": std["test"].get(name),
        "baseline": mean["baseline"].get(name),
        "source_mean": mean["test"].get("source", {}).get(name),
        "source_std": std["test"].get("source", {}).get(name),
    }


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def result_lines(summary: dict, out: str | Path) -> list[str]:
    """What ``vpipe train --folds`` prints: each fold's test figure (per clip and per source)
    and the mean ± std over the folds."""
    name, k = summary["main_metric"], summary["folds"]
    lines = []
    for f in summary["per_fold"]:
        src, sbase = f["test"].get("source", {}), f["baseline"].get("source", {})
        lines.append(
            f"fold {f['fold']}/{k}: best epoch {f['best_epoch']} of {f['epochs_run']}, test "
            f"{name} {_num(f['test'].get(name))} (baseline {_num(f['baseline'].get(name))}); "
            f"per source ({src.get('n_sources', 0)}) {_num(src.get(name))} (baseline "
            f"{_num(sbase.get(name))})"
        )
    mean, std = summary["mean"], summary["std"]

    def pm(side: str, per_source: bool = False) -> str:
        m, s = mean[side], std[side]
        if per_source:
            m, s = m.get("source", {}), s.get("source", {})
        return f"{_num(m.get(name))} ± {_num(s.get(name))}"

    lines.append(
        f"test {name} {pm('test')} over {k} folds (baseline {pm('baseline')}); per source "
        f"{pm('test', True)} (baseline {pm('baseline', True)}) -> {out}"
    )
    return lines
