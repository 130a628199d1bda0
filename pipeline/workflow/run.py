"""Running a plan: each step through the CLI's entry point, skipping steps that are up to date,
clearing the ones after a step redone with other options."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.records import WORKFLOW_ENV, DamagedRecord, first_changed_output, read_run_info
from pipeline.workflow.plan import STAGES, Step, output_args
from pipeline.workflow.reuse import reusable, take


@dataclass
class StepResult:
    name: str
    status: str  # "ok", "up to date", "reused", "some items failed", "stopped", "not run"
    exit_code: int
    seconds: float
    out: Path | None


def up_to_date(step: Step) -> bool:
    """True when the step's output folder says it finished this same command with no failure
    and every output its manifest records is still there with the size it was written at."""
    if step.out is None or not step.out.is_dir():
        return False
    info = _run_info(step)
    if not info or not info.get("ended") or info.get("stage") != step.name:
        return False
    if (info.get("counts") or {}).get("failed", 1) != 0:
        return False
    if output_args(info.get("command", [])[1:]) != output_args(step.args):
        return False
    # Finished once is not enough: the files its manifest names must still be there as written.
    return not (_is_item_stage(step) and first_changed_output(step.out))


def _changed(step: Step) -> bool:
    """Did the step write anything new (so the stages after it must run again)?"""
    counts = _run_info(step).get("counts")
    return counts is None or counts.get("done", 1) > 0


def _run_info(step: Step) -> dict:
    """The step's ``vpipe.json``; empty when there is none or it is damaged (the stage itself
    then says so when it runs)."""
    if step.out is None or not step.out.is_dir():
        return {}
    try:
        return read_run_info(step.out) or {}
    except (OSError, DamagedRecord):
        return {}


def _redone(step: Step, args: list[str], before: dict) -> bool:
    """Did the step redo its items rather than add to them (other options, or new defaults,
    under ``--overwrite``)? Then what the stages after it made from them is stale."""
    old = before.get("command")
    if "--overwrite" in args and old and output_args(old[1:]) != output_args(args):
        return True
    counts, after = before.get("counts") or {}, _run_info(step).get("counts") or {}
    had = counts.get("done", 0) + counts.get("already_done", 0)
    return had > 0 and after.get("already_done", 0) == 0 and after.get("done", 0) > 0


def _is_item_stage(step: Step) -> bool:
    """A stage of many items writing an output folder (not train, not predict's file)."""
    spec = STAGES.get(step.name)
    return spec is not None and not spec.whole and step.out is not None


def _made_no_output(step: Step) -> bool:
    """An item stage that exited without writing its record: nothing for the next stages."""
    return _is_item_stage(step) and not (step.out / "vpipe.json").is_file()


def _stopped(step: Step) -> bool:
    """An item stage that exited without stamping its end (a full disk stopped it)."""
    return _is_item_stage(step) and not _run_info(step).get("ended")


def _is_item_stage_folder(step: Step) -> bool:
    return _is_item_stage(step) and (step.out / "vpipe.json").is_file()


def _args_for(step: Step, first: bool, upstream_changed: bool) -> list[str] | None:
    """The arguments to run ``step`` with now, or ``None`` when it is up to date.

    A one-unit stage (train) given the same command continues an interrupted run or reports
    a finished one itself, and refuses other options; it gets ``--overwrite`` only when an
    earlier stage changed its input, or under ``vpipe run --overwrite`` with other options.
    """
    # The first step always runs: its inputs lie outside the workflow and may have grown.
    if not first and not upstream_changed and up_to_date(step):
        return None
    spec = STAGES.get(step.name)
    if spec is None or not spec.whole or step.out is None:
        return list(step.args)
    base = [a for a in step.args if a != "--overwrite"]
    if not (step.out.is_dir() and any(step.out.iterdir())):
        return base
    same = output_args(_run_info(step).get("command", [])[1:]) == output_args(base)
    redo = upstream_changed or ("--overwrite" in step.args and not same)
    return [*base, "--overwrite"] if redo else base


def run_plan(
    steps: Sequence[Step],
    call: Callable[[list[str]], int],
    *,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
    prog: str = "vpipe run",
    workflow: str | None = None,
) -> tuple[int, list[StepResult]]:
    """Run the steps in order through ``call(args) -> exit code``; returns the run's exit code.

    A stage that exits 2 stops the run; one that exits 1 (some items failed) lets the next
    stages work on the items that succeeded, and the run then exits 1. A stage already
    finished with the same command is reported "up to date" unless an earlier one changed.
    With ``workflow`` (its name, recorded by each stage), one that another workflow finished
    the same way is reused (:mod:`.reuse`).
    """
    results: list[StepResult] = []
    code = 0
    upstream_changed = upstream_redone = False
    for n, step in enumerate(steps, start=1):
        head = f"{prog} [{n}/{len(steps)}] {step.name}"
        args = _args_for(step, n == 1, upstream_changed)
        if args is None:
            log(f"{head}: up to date ({step.out})")
            results.append(StepResult(step.name, "up to date", 0, 0.0, step.out))
            continue
        # The first step always runs (its inputs lie outside the workflow); a later one that
        # another workflow finished with the same command on the same inputs is reused.
        other = (reusable(step, args, workflow) if workflow and n > 1 and _is_item_stage(step)
                 else None)
        if other is not None:
            take(step, other, args, workflow)
            log(f"{head}: reused {other} (the same command on the same inputs; its outputs "
                f"hard-linked into {step.out})")
            results.append(StepResult(step.name, "reused", 0, 0.0, step.out))
            upstream_changed = True  # new in this workflow: the stages after it run
            continue
        if upstream_redone and _is_item_stage_folder(step):
            # Its finished items were made from outputs that are gone: resuming would keep them.
            log(f"{head}: removing {step.out} (made from the previous outputs of earlier stages)")
            shutil.rmtree(step.out)
        before = _run_info(step)
        log(f"{head}: {shlex.join(['vpipe', *args])}")
        t0 = time.time()
        saved, named = sys.argv, os.environ.get(WORKFLOW_ENV)
        sys.argv = ["vpipe", *args]  # what the stage records as its command in vpipe.json
        if workflow:
            os.environ[WORKFLOW_ENV] = workflow  # ... and which workflow ran it
        try:
            rc = call(args)
        finally:
            sys.argv = saved
            if named is None:
                os.environ.pop(WORKFLOW_ENV, None)
            else:
                os.environ[WORKFLOW_ENV] = named
        seconds = time.time() - t0
        # Only what this stage wrote matters to the next: a stage remade from a deleted folder
        # whose successor then found nothing new (done 0) leaves the stages after it up to date.
        upstream_changed = _changed(step)
        upstream_redone = upstream_redone or (rc in (0, 1) and _redone(step, args, before))
        # Exit 1 with no record written (e.g. weights missing offline), or with the run not
        # stamped as ended (a full disk stopped it): failed as a whole, the next stages would
        # meet the same.
        made_nothing = rc == 1 and (_made_no_output(step) or _stopped(step))
        status = "failed" if made_nothing else {0: "ok", 1: "some items failed"}.get(rc, "stopped")
        results.append(StepResult(step.name, status, rc, seconds, step.out))
        if rc not in (0, 1) or made_nothing:
            code = rc
            for later in steps[n:]:
                results.append(StepResult(later.name, "not run", 0, 0.0, later.out))
            break
        code = max(code, rc)
    return code, results


def summary_lines(name: str, results: Sequence[StepResult], code: int, seconds: float) -> list[str]:
    """A short table of what each stage did and where its output is."""
    lines = [f"vpipe run {name}: exit {code} in {seconds:.1f}s"]
    width = max((len(r.name) for r in results), default=5)
    for r in results:
        out = str(r.out) if r.out is not None else "-"
        lines.append(f"  {r.name:<{width}}  {r.status:<17} {r.seconds:7.1f}s  {out}")
    return lines
