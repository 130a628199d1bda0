"""The command tree: every command module registered on the Typer app, with help texts written
for users. Imported by :func:`pipeline.cli.main` inside its interrupt guard (Typer and the
command modules are most of a command's first half second)."""

from __future__ import annotations

from pipeline.cli.app import app

# Importing the command modules registers their commands on ``app`` (order = --help order).
from pipeline.cli import media_cmds  # noqa: E402,F401  isort: skip
from pipeline.cli import features_cmds  # noqa: E402,F401  isort: skip
from pipeline.cli import train_cmds  # noqa: E402,F401  isort: skip
from pipeline.cli import export_model_cmd  # noqa: E402,F401  isort: skip
from pipeline.cli import tune_cmd  # noqa: E402,F401  isort: skip
from pipeline.cli import run_cmd  # noqa: E402,F401  isort: skip
from pipeline.cli import export_cmd  # noqa: E402,F401  isort: skip


def command():
    """The click command tree of ``app``, with help texts written for users: values named as
    in the README (N, X, PATH, TEXT, or the option's own metavar) instead of Python types,
    arguments in capitals, and each command's first sentence whole in ``vpipe --help``."""
    import typer.main

    root = typer.main.get_command(app)
    for name, check in {**media_cmds.PLAN_CHECKS, **features_cmds.PLAN_CHECKS}.items():
        root.commands[name].vpipe_check = check  # run by the workflow planner
    for cmd in root.commands.values():
        doc = (cmd.help or "").strip().split("\n\n")[0].replace("\n", " ")
        cmd.short_help = doc.split(". ")[0].rstrip(".")
        for p in cmd.params:
            if p.param_type_name == "argument":
                p.metavar = (p.metavar or p.name).upper()
                p.display_type_rich = lambda ctx: None  # the name says it; no Python type
            elif p.metavar is None and not getattr(p, "is_flag", False):
                p.metavar = _value_name(p)
    return root


def _value_name(p) -> str:
    desc = getattr(p, "type_descriptor", None)
    annotation = getattr(desc, "annotation", None)
    kind = getattr(annotation, "__name__", str(annotation))
    if getattr(desc, "is_path", False) or kind == "Path":
        return "PATH"
    return {"int": "N", "float": "X"}.get(kind, "TEXT")
