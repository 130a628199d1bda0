"""``vpipe tune``: a search over ``vpipe train``'s options (:mod:`pipeline.train.tune`).

It takes every option of ``vpipe train`` (the fixed ones of the search) with train's own
names, help and defaults: its signature is train's, less what a search sets itself, plus its
own options.
"""

from __future__ import annotations

import inspect
import sys
from typing import Annotated

import typer

from pipeline.cli import train_cmds
from pipeline.cli.app import Engine, OutDir, Overwrite, RayAddress, app, preload_torch

# train's parameters that tune does not take: its own output, resume and quiet are tune's.
NOT_TAKEN = ("features", "labels", "out", "resume", "overwrite", "quiet")

Search = Annotated[
    list[str],
    typer.Option(
        "--search",
        metavar="SPACE",
        help="The options searched, as OPTION=LOW..HIGH[:log] (a range: of whole numbers for "
        "an integer option) or OPTION=A,B,C (choices), separated by spaces or given as "
        "several --search: e.g. 'lr=1e-4..1e-2:log hidden=64,128,256 dropout=0..0.5 "
        "batch-size=16,32,64'. Any vpipe train option that changes what is learned (not "
        "--seed: it draws the split).",
        show_default=False,
    ),
]
Trials = Annotated[
    int, typer.Option("--trials", help="Trials in all (the same command with more continues).")
]
Jobs = Annotated[
    int,
    typer.Option("--jobs", help="Trials at once: processes on this machine (the cores split "
                 "between their torch threads), or Ray tasks in flight with --engine ray."),
]
TuneQuiet = Annotated[
    bool, typer.Option("--quiet", "-q", help="No table of trials: only the one-line summary.")
]


def tune(
    features: train_cmds.Features,
    labels: train_cmds.Labels,
    out: OutDir,
    search: Search,
    trials: Trials = 20,
    jobs: Jobs = 1,
    engine: Engine = "local",
    ray_address: RayAddress = None,
    overwrite: Overwrite = False,
    quiet: TuneQuiet = False,
    **options,
) -> None:
    """Search vpipe train's options for the best validation figure (Optuna: TPE sampler, a
    median pruner on each epoch's validation figure); writes OUT.

    Each trial is an ordinary run folder, OUT/trial-NNN, trained by vpipe train's loop with
    the options given here and the ones the search picks; the objective is the task's main
    metric on the val split, or with --folds K its mean over K folds by source (each trial a
    vpipe train --folds folder, reported to the pruner after each fold). At the end the best
    trial alone is scored on the test split (with --folds: each fold's test group, and the
    out-of-fold predictions); OUT/best links to its run (for vpipe evaluate and predict; with
    --folds, OUT/best/fold-k) and OUT/summary.json holds
    every trial (options, val figure, state, time) and the best options as vpipe train words,
    vpipe run --set overrides and a workflow's [train] table. The study is OUT/study.db: the
    same command again continues it (a trial cut by a kill is redone from its last epoch);
    other options into the same OUT are refused (exit 2) unless --overwrite. A trial that
    fails (NaN loss, out of memory) is recorded as failed with its reason, and the search
    goes on. Needs pip install 'vpipe[tune]'.
    """
    preload_torch()
    from pipeline.train.tune.study import tune as run_tune
    from pipeline.train.tune.summary import summary_line

    cfg = train_cmds.train_config(options)
    s = run_tune(features, labels, out, cfg, search, trials, jobs=jobs, engine=engine,
                 ray_address=ray_address, overwrite=overwrite, quiet=quiet)
    print(f"vpipe tune: {summary_line(s, out)}", file=sys.stderr)


def _signature() -> inspect.Signature:
    own = inspect.signature(tune, eval_str=True).parameters
    train = inspect.signature(train_cmds.train, eval_str=True).parameters
    params = [p for name, p in own.items() if name != "options"]
    params += [p for name, p in train.items() if name not in NOT_TAKEN and name not in own]
    return inspect.Signature(params)


tune.__signature__ = _signature()  # type: ignore[attr-defined]
app.command()(tune)
