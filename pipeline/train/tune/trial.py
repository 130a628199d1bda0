"""One trial of ``vpipe tune``: an ordinary run folder trained by the one loop, its validation
figure reported to the study after every epoch, stopped there when the pruner says so.

:func:`run_trial` runs where the trial runs (in the driver, a pool process or a Ray task): it
opens the study from its storage by name, so the driver only hands it a picklable
:class:`TrialJob`, and returns a plain outcome dict that the driver records (``tell``).
A trial that fails (a NaN loss, out of memory, any error of its training) comes back as
``failed`` with its reason; the study goes on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import DiskFull

COMPLETE, PRUNED, FAILED = "complete", "pruned", "failed"
# The pruner: a trial whose validation figure at an epoch is worse than the median of the
# earlier trials' at that epoch stops there, once this many trials finished, and from this
# epoch on (the first epochs of a good setting can be slow).
PRUNER_STARTUP_TRIALS = 4
PRUNER_WARMUP_EPOCHS = 2


class TrialFailed(Exception):
    """A trial that cannot go on (its loss is NaN): recorded as failed with this reason."""


@dataclass(frozen=True)
class TrialJob:
    """What a trial needs, wherever it runs (picklable)."""

    storage: str  # the study's storage URL (sqlite:///OUT/study.db)
    study: str
    trial_id: int
    number: int
    run: str  # the trial's run folder, OUT/trial-NNN
    features: str
    labels: str
    config: dict  # the TrainConfig fields, the trial's options among them
    metric: str  # the task's main metric, the objective
    higher_is_better: bool


def make_pruner():
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS,
                                       n_warmup_steps=PRUNER_WARMUP_EPOCHS)


def run_trial(job: TrialJob, also: Callable[[dict], None] | None = None) -> dict:
    """Train the trial's run (resumed from its last epoch if it was cut); returns its
    outcome: ``state``, the objective ``value``, ``reason`` of a failure, ``seconds``,
    ``epochs``. ``also(record)``: called after each epoch, in this process (the live table).

    With ``--folds K`` the trial is a ``train --folds`` folder (test groups withheld), its
    objective the mean val figure over the K folds, reported after each fold (step k: the mean
    so far), so the pruner can stop a poor setting between folds, not within one."""
    import optuna

    from pipeline.train.config import TrainConfig
    from pipeline.train.folds import train_folds
    from pipeline.train.loop import TrainingDiverged, train

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.get_storage(job.storage)
    study = optuna.load_study(study_name=job.study, storage=storage, pruner=make_pruner())
    trial = optuna.trial.Trial(study, job.trial_id)
    reported = set(storage.get_trial(job.trial_id).intermediate_values)
    pruned = []

    def on_epoch(rec: dict) -> bool:
        if also is not None:
            also(rec)
        loss = rec["train_loss"]
        if not math.isfinite(loss):
            raise TrialFailed(f"training loss {loss} at epoch {rec['epoch']}")
        value = rec.get("val", {}).get(job.metric)
        if value is None:
            return False
        if not math.isfinite(value):
            raise TrialFailed(f"val {job.metric} {value} at epoch {rec['epoch']}")
        if rec["epoch"] not in reported:  # a resumed trial reported its first epochs already
            trial.report(float(value), rec["epoch"])
        if trial.should_prune():
            pruned.append(rec["epoch"])
            return True
        return False

    def on_fold(k: int, s: dict) -> bool:
        """With --folds, the objective is the mean val figure over the folds: after fold k,
        the mean over folds 1..k is reported (step k) and the pruner asked."""
        done_folds.append((s.get("val") or {}).get(job.metric))
        known = [v for v in done_folds if v is not None]
        if not known:
            return False
        if k not in reported:
            trial.report(float(sum(known) / len(known)), k)
        if k < job.config["folds"] and trial.should_prune():
            pruned.append(k)
            return True
        return False

    def check_epoch(rec: dict) -> bool:  # a fold's epoch: shown and checked, not reported
        if also is not None:
            also(rec)
        if not math.isfinite(rec["train_loss"]):
            raise TrialFailed(f"training loss {rec['train_loss']} at epoch {rec['epoch']}")
        return False

    t0 = time.time()
    done_folds: list[float | None] = []
    outcome = {"number": job.number, "trial_id": job.trial_id, "run": Path(job.run).name,
               "state": FAILED, "value": None, "reason": None, "epochs": None}
    try:
        if job.config.get("folds"):
            s = train_folds(job.features, job.labels, job.run, TrainConfig(**job.config),
                            quiet=True, on_epoch=check_epoch, on_fold=on_fold,
                            withhold_test=True)
            s = {"epochs_run": s["epochs_run"], "val": s["mean"]["val"]}
        else:
            s = train(job.features, job.labels, job.run, TrainConfig(**job.config),
                      quiet=True, on_epoch=on_epoch, withhold_test=True)
    except (DiskFull, KeyboardInterrupt):
        raise  # no trial can go on: the study stops (the same command continues it)
    except (TrialFailed, TrainingDiverged) as e:
        outcome["reason"] = str(e)
    except MemoryError:
        outcome["reason"] = "out of memory"
    except Exception as e:  # torch.OutOfMemoryError (a RuntimeError), a failed write...
        outcome["reason"] = failure_reason(e)
    else:
        value = s.get("val", {}).get(job.metric)
        outcome.update(epochs=s["epochs_run"], value=value,
                       state=PRUNED if pruned else COMPLETE)
        if value is None:
            outcome.update(state=FAILED, reason=f"no val {job.metric} (an empty val split?)")
    outcome["seconds"] = round(time.time() - t0, 2)
    return outcome


def failure_reason(e: BaseException) -> str:
    """One line saying why a trial failed: out of memory said so, else the error's type and
    first line."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if "out of memory" in str(e).lower() or type(e).__name__ == "OutOfMemoryError":
        return f"out of memory ({type(e).__name__}: {text})" if text else "out of memory"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
