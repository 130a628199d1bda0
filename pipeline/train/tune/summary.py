"""``OUT/summary.json`` of ``vpipe tune``: every trial (options, validation figure, state,
time), the best one with its test figures (scored once) and its options written as
``vpipe train`` words, ``vpipe run --set`` overrides and a workflow's ``[train]`` table."""

from __future__ import annotations

from typing import Any

from pipeline.train.tune.space import Dimension, cli_words, describe, set_line, workflow_snippet

STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running",
          "WAITING": "waiting"}


def trial_rows(study, dims: list[Dimension]) -> list[dict]:
    """One row per trial, in order: its options, state, validation figure, epochs, time."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        state = STATES.get(t.state.name, t.state.name.lower())
        reported = t.intermediate_values
        rows.append({
            "trial": t.number,
            "run": f"trial-{t.number:03d}",
            "options": {d.name: t.params[d.name] for d in dims if d.name in t.params},
            "state": state,
            # complete: the run's val figure at its best epoch; pruned: the last one reported
            "val": t.value if t.value is not None else (
                reported[max(reported)] if reported and state != "failed" else None),
            "epochs": t.user_attrs.get("epochs") or (max(reported) if reported else 0),
            "seconds": t.user_attrs.get("seconds"),
            "reason": t.user_attrs.get("reason"),
        })
    return rows


def best_trial(study) -> Any:
    """The complete trial with the best validation figure, or None."""
    try:
        return study.best_trial
    except ValueError:  # no complete trial
        return None


def study_summary(study, dims: list[Dimension], task, trials: list[dict], best,
                  best_summary: dict | None, params: dict) -> dict:
    name = task.main_metric
    summary: dict = {
        "main_metric": name,
        "direction": "maximize" if task.higher_is_better else "minimize",
        "objective": (f"mean over {params['folds']} folds of val {name} at each fold's best "
                      "epoch" if params.get("folds") else f"val {name} of each trial's best epoch"),
        "search": describe(dims),
        "trials_asked": params["trials"],
        "sampler": "TPE",
        "pruner": "median",
        "trials": trials,
        "best": None,
    }
    if best is not None and best_summary is not None:
        options = {d.name: best.params[d.name] for d in dims}
        summary["best"] = {
            "trial": best.number,
            "run": f"trial-{best.number:03d}",
            "options": options,
            "val": best.value,
            "test": best_summary.get("test"),
            "baseline": best_summary.get("baseline", {}).get("test"),
            "best_epoch": best_summary.get("best_epoch"),
            **({"test_std": best_summary["test_std"], "folds": params["folds"]}
               if params.get("folds") else {}),
            "train_options": " ".join(cli_words(options)),
            "set": set_line(options),
            "workflow": workflow_snippet(options),
        }
    return summary


def folds_as_run(summary: dict) -> dict:
    """The best trial's ``train --folds`` summary in a single run's terms for the study's
    summary: the test figures and baseline are their means over the folds (with their std)."""
    return {"test": summary["mean"]["test"], "test_std": summary["std"]["test"],
            "baseline": {"test": summary["mean"]["baseline"]},
            "best_epoch": [f["best_epoch"] for f in summary["per_fold"]]}


def counts(trials: list[dict]) -> dict:
    """``vpipe.json`` counts, in trials."""
    n = {s: sum(1 for t in trials if t["state"] == s) for s in ("complete", "pruned", "failed")}
    return {"done": n["complete"] + n["pruned"], "already_done": 0, "skipped": 0,
            "failed": n["failed"], **n}


def result(summary: dict) -> dict | None:
    """The headline for ``vpipe.json``: the best trial, its val and test figures."""
    best = summary["best"]
    if best is None:
        return None
    name = summary["main_metric"]
    return {"best_trial": best["trial"], "main_metric": name, "val": best["val"],
            "test": (best["test"] or {}).get(name), "options": best["options"]}


def summary_line(summary: dict, out) -> str:
    """The one line ``vpipe tune`` ends with."""
    best, name = summary["best"], summary["main_metric"]
    c = counts(summary["trials"])
    test = (best["test"] or {}).get(name)
    if best.get("folds") and test is not None:
        std = (best.get("test_std") or {}).get(name)
        test = f"{test:.4g} ± {std:.4g} over {best['folds']} folds"
    elif test is not None:
        test = f"{test:.4g}"
    return (f"{len(summary['trials'])} trials ({c['complete']} complete, {c['pruned']} pruned, "
            f"{c['failed']} failed); best trial {best['trial']}: val {name} "
            f"{best['val']:.4g}, test {name} {'n/a' if test is None else test} with "
            f"{best['train_options']} -> {out}/best")
