"""``vpipe tune``: the study's folder, its trials run N at a time, and its summary.

``OUT`` holds ``study.db`` (Optuna's SQLite storage: every trial's options, per-epoch
validation figures and state), ``trial-NNN/`` (each trial an ordinary ``vpipe train`` run
folder), ``summary.json``, ``best`` (a link to the best trial's run) and ``vpipe.json``.
The driver asks the TPE sampler for a trial's options, hands the trial to a runner (this
process, a pool of processes, or Ray tasks; :mod:`.runners`) and tells the study its outcome.
The driver holds ``OUT``'s lock, so a trial still ``running`` in the storage when the driver
starts was cut by a kill: it is put back to be redone first (its run folder continues from
its last epoch). Only the best trial is scored on the test split, once, at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import asdict, replace
from pathlib import Path

from pipeline import records
from pipeline.errors import ParamsChanged, UsageError
from pipeline.files import atomic_write_text, remove
from pipeline.records import now_iso, read_json, read_run_info
from pipeline.train.config import TrainConfig
from pipeline.train.runs import (
    INPUT_DIGESTS,
    OPTIONS_NOT_LEARNED,
    run_entries,
    run_folder_lock,
    train_versions,
)
from pipeline.train.tune import summary as summ
from pipeline.train.tune.space import Dimension, describe, parse_space
from pipeline.train.tune.table import Table
from pipeline.train.tune.trial import COMPLETE, FAILED, PRUNED, TrialJob, make_pruner

STUDY = "vpipe-tune"
STORAGE = "study.db"
# Parameters that may differ when the same study is continued: how it runs, and how many
# trials it has in all (more trials continue it).
MAY_DIFFER = OPTIONS_NOT_LEARNED | {"trials", "jobs", "engine", "features", "labels"}
MAX_STARTUP_TRIALS = 10  # TPE's random trials before it models the results (Optuna's default)


def optuna_module():
    """The ``optuna`` package, or a usage error saying how to install it."""
    try:
        import optuna
    except ImportError:
        raise UsageError("vpipe tune needs Optuna: pip install 'vpipe[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def trial_dir(out: Path, number: int) -> Path:
    return Path(out) / f"trial-{number:03d}"


def tune(features: str | Path, labels: str | Path, out: str | Path, base: TrainConfig,
         search: list[str], trials: int, *, jobs: int = 1, engine: str = "local",
         ray_address: str | None = None, overwrite: bool = False, quiet: bool = False) -> dict:
    """Search ``search`` (``--search`` terms) over ``trials`` trials of ``vpipe train`` with the
    other options ``base``; writes ``out`` and returns its summary."""
    from pipeline.train.inputs import read_options

    out, features, labels = Path(out), Path(features), Path(labels)
    if trials < 1:
        raise UsageError("--trials must be at least 1")
    if jobs < 1:
        raise UsageError("--jobs must be at least 1")
    if base.folds:
        from pipeline.train.folds import check_folds

        check_folds(base)
    optuna = optuna_module()
    base = read_options(base, quiet)
    dims = parse_space(search, base)
    runner = make_runner(engine, jobs, ray_address, quiet)
    with tune_lock(out, [features, labels]):
        task, params = check_input(features, labels, base, dims, trials, quiet)
        params.update(jobs=jobs, engine=engine)
        open_tune_folder(out, params, overwrite)
        runner.start(out, [features, labels])
        started = now_iso()
        write_info(out, {"started": started, "ended": None, "interrupted": None,
                         "params": params, "result": None})
        url = f"sqlite:///{(out / STORAGE).resolve()}"
        storage = optuna.storages.RDBStorage(url)
        sampler = optuna.samplers.TPESampler(
            seed=base.seed, n_startup_trials=max(2, min(MAX_STARTUP_TRIALS, trials // 2)))
        study = optuna.create_study(
            study_name=STUDY, storage=storage, load_if_exists=True, sampler=sampler,
            pruner=make_pruner(), direction="maximize" if task.higher_is_better else "minimize")
        redone = put_back_cut_trials(study, storage)
        if redone and not quiet:
            print(f"vpipe tune: redoing {redone} trial(s) cut by a kill", file=sys.stderr)
        threads = base.threads or trial_threads(jobs)
        config = asdict(replace(base, threads=threads))
        table = Table(dims, task.main_metric, quiet)
        try:
            run_study(study, dims, trials, runner, table, lambda t: TrialJob(
                url, STUDY, t._trial_id, t.number, str(trial_dir(out, t.number)),
                str(features), str(labels), {**config, **t.params}, task.main_metric,
                task.higher_is_better))
        finally:
            runner.close()
        table.close(study)
        return finish(out, study, dims, task, features, labels, params, quiet)


def trial_threads(jobs: int) -> int:
    """Each trial's torch threads when --threads is 0: train's default for one trial at a time
    (half the cores, 1 to 4: more makes a small LSTM crawl on a busy machine), else the cores
    split between the ``jobs`` trials, 1 to 4 each."""
    from pipeline.device import default_threads
    from pipeline.runner import usable_cores

    return default_threads() if jobs == 1 else max(1, min(4, usable_cores() // jobs))


def tune_lock(out: Path, inputs: list[Path]) -> contextlib.AbstractContextManager:
    """Hold ``OUT/.vpipe.lock`` for the whole search, as train holds its run folder's."""
    return run_folder_lock(out, inputs, record=write_info,
                           said="vpipe tune: interrupted; the same command continues {out} "
                                "(the trials cut are redone from their last epoch)")


def write_info(out: Path, fields: dict) -> None:
    import optuna

    records.write_run_info(out, "tune", fields, {**train_versions(),
                                                  "optuna": optuna.__version__})


def check_input(features: Path, labels: Path, base: TrainConfig, dims: list[Dimension],
                trials: int, quiet: bool):
    """Read and check the input once, as ``vpipe train`` does, before anything is written;
    returns the task and the parameters of the search."""
    from pipeline.train.inputs import model_spec
    from pipeline.train.runs import features_fingerprint, train_params
    from pipeline.train.tasks import get_task, options_task

    first = replace(base, fold=1) if base.folds else base  # each fold validates alike
    p = options_task(base.task).prepare(features, labels, first, quiet)
    try:
        spec = model_spec(first, p)
        fingerprint = features_fingerprint(p.store, list(p.joined.labels), p.store_attrs, p.dims)
    finally:
        p.store.close()
    if not p.split_ids["val"]:
        raise UsageError("vpipe tune compares trials on the val split, and it is empty "
                         "(raise --val-fraction, or give val rows in the split column)")
    if base.folds and not get_task(spec.task).supports_folds:
        raise UsageError(f"--folds is not supported with --task {spec.task}")
    params = {**train_params(base, features, labels, fingerprint), "search": describe(dims),
              "trials": trials}
    return get_task(spec.task), params


def open_tune_folder(out: Path, params: dict, overwrite: bool) -> None:
    """Refuse an ``out`` that holds something else, or a search with other options (unless
    ``overwrite``, which empties it); the same options continue it."""
    if not run_entries(out):
        return
    info = read_run_info(out) or {}
    if info.get("stage") != "tune":
        raise UsageError(f"{out}: exists and is not a vpipe tune folder; choose another --out")
    if overwrite:
        for entry in run_entries(out):
            remove(entry)
        return
    before = info.get("params") or {}
    keys = [k for k in {*before, *params} if k not in MAY_DIFFER]
    diff = records.changed_params({k: before.get(k) for k in keys},
                                  {k: params.get(k) for k in keys})
    if diff:
        what = ("other labels or features" if set(diff) <= set(INPUT_DIGESTS)
                else f"other options ({records.describe_changes(before, params, diff)})")
        raise ParamsChanged(f"{out}: a search with {what} is there; use --overwrite to start "
                            "again, or choose another --out")


def put_back_cut_trials(study, storage) -> int:
    """Trials left ``running`` by a killed driver, put back to be asked for again first
    (same number, options and run folder). Returns how many."""
    from optuna.trial import TrialState

    cut = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in cut:
        storage.set_trial_state_values(t._trial_id, TrialState.WAITING)
    return len(cut)


def run_study(study, dims: list[Dimension], trials: int, runner, table: Table, job_of) -> None:
    """Ask for trials and run them, ``runner.jobs`` at a time, until ``trials`` have ended."""
    from optuna.trial import TrialState

    ended = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    done = len(study.get_trials(deepcopy=False, states=ended))
    space = {d.name: d.distribution() for d in dims}
    in_flight = 0
    while True:
        while in_flight < runner.jobs and done + in_flight < trials:
            t = study.ask(space)
            runner.submit(job_of(t), table.epoch_hook(t.number))
            in_flight += 1
        if not in_flight:
            return
        table.show(study)  # the trials just asked for, before their first epoch
        for outcome in runner.finished(timeout=1.0):
            in_flight -= 1
            done += 1
            record(study, outcome)
        table.show(study)


def record(study, outcome: dict) -> None:
    """Tell the study how a trial ended (its reason kept with a failed one)."""
    import optuna
    from optuna.trial import TrialState

    n = outcome["number"]
    trial = optuna.trial.Trial(study, outcome["trial_id"])
    for key in ("reason", "seconds", "epochs"):
        trial.set_user_attr(key, outcome.get(key))
    if outcome["state"] == COMPLETE:
        study.tell(n, outcome["value"])
    elif outcome["state"] == PRUNED:
        study.tell(n, state=TrialState.PRUNED)
    else:
        study.tell(n, state=TrialState.FAIL)


def finish(out: Path, study, dims: list[Dimension], task, features: Path, labels: Path,
           params: dict, quiet: bool) -> dict:
    """Score the best trial on test (once), link ``OUT/best`` to it, write summary.json and
    stamp vpipe.json."""
    from pipeline.train.folds import score_folds_test
    from pipeline.train.loop import score_test

    trials = summ.trial_rows(study, dims)
    best = summ.best_trial(study)
    best_summary = None
    if best is not None:
        run = trial_dir(out, best.number)
        best_summary = read_json(run / "summary.json") or {}
        if params.get("folds"):
            if not isinstance(best_summary.get("mean", {}).get("test"), dict):
                best_summary = score_folds_test(run, features, labels)
            best_summary = summ.folds_as_run(best_summary)
        elif not best_summary.get("test"):
            best_summary = score_test(run, features, labels, quiet=True)
        link_best(out, run)
    summary = summ.study_summary(study, dims, task, trials, best, best_summary, params)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    counts = summ.counts(trials)
    write_info(out, {"ended": now_iso(), "counts": counts, "result": summ.result(summary)})
    if best is None:  # the first reason: often the same for all (an option the store lacks)
        why = next((f", e.g. trial {t['trial']}: {t['reason']}" for t in summary["trials"]
                    if t.get("reason")), "")
        raise UsageError(f"no trial of {out} finished ({counts['failed']} failed{why}; see "
                         f"{out / 'summary.json'})")
    return summary


def link_best(out: Path, run: Path) -> None:
    """``OUT/best``: a relative link to the best trial's run folder, replaced atomically."""
    tmp = out / ".best.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(run.name, tmp)
    os.replace(tmp, out / "best")


def make_runner(engine: str, jobs: int, ray_address: str | None, quiet: bool):
    from pipeline.train.tune.runners import make_runner as make

    return make(engine, jobs, ray_address, quiet)


__all__ = ["FAILED", "PRUNED", "tune"]
