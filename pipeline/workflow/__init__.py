"""Workflows: a TOML file that lists stages and their options, run in order as ``vpipe`` commands.

A workflow is data. :func:`load_workflow` reads it, :func:`plan` checks every stage and option
against the CLI's own commands (so a typo is reported with its line before anything runs) and
turns each stage into the argument list of the equivalent ``vpipe`` command, wired so that each
stage reads the output folder of the one before. :func:`run_plan` runs those argument lists
through a caller-given function (the CLI passes its own entry point), so a workflow and the
commands a user types cannot drift apart. Relative paths are taken from the current directory,
exactly as the printed commands would take them.
"""

from __future__ import annotations

from pipeline.workflow.plan import (
    STAGES,
    Stage,
    StageSpec,
    Step,
    Workflow,
    load_workflow,
    plan,
    select,
)
from pipeline.workflow.run import StepResult, run_plan, summary_lines, up_to_date

__all__ = [
    "STAGES", "Stage", "StageSpec", "Step", "StepResult", "Workflow", "load_workflow", "plan",
    "run_plan", "select", "summary_lines", "up_to_date",
]
