"""``vpipe`` command line. ``main`` turns a user-actionable error into one line and an exit code."""

from __future__ import annotations

import gc
import sys

from pipeline.cli.app import app
from pipeline.errors import VpipeError
from pipeline.files import disk_full

# Importing the command modules registers their commands on ``app`` (order = --help order).
from pipeline.cli import media_cmds  # noqa: E402,F401  isort: skip
from pipeline.cli import features_cmds  # noqa: E402,F401  isort: skip
from pipeline.cli import train_cmds  # noqa: E402,F401  isort: skip
from pipeline.cli import run_cmd  # noqa: E402,F401  isort: skip
from pipeline.cli import export_cmd  # noqa: E402,F401  isort: skip


def command():
    """The click command tree of ``app``, with help texts written for users: values named as
    in the README (N, X, PATH, TEXT, or the option's own metavar) instead of Python types,
    arguments in capitals, and each command's first sentence whole in ``vpipe --help``."""
    import typer.main

    root = typer.main.get_command(app)
    for name, check in features_cmds.PLAN_CHECKS.items():
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vpipe`` console script (``argv`` None: this process's command line;
    `vpipe run` and the tests call it with theirs)."""
    try:
        return _main(argv)
    finally:
        if argv is None:
            # The process ends next: without this, its teardown walks every object torch and
            # torchvision made: 1.18 s against 0.25 s after a freeze (benchmarks/startup.py).
            gc.freeze()


def _main(argv: list[str] | None) -> int:
    try:
        command().main(args=argv, prog_name="vpipe", standalone_mode=True)
    except Exception as e:
        # A full disk, wherever the stage met it: what it was writing, said as the stage's
        # own line (it stops the stage; the same command completes once there is space).
        full = disk_full(e)
        if full is not None:
            print(f"vpipe {_command(argv)}: {full}", file=sys.stderr)
            return full.exit_code
        if not isinstance(e, VpipeError):
            raise
        print(f"vpipe: error: {e}", file=sys.stderr)
        return e.exit_code
    except SystemExit as e:
        code = e.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


def _command(argv: list[str] | None) -> str:
    """The command being run (``vpipe``'s own options all come before it)."""
    args = sys.argv[1:] if argv is None else argv
    return next((a for a in args if not a.startswith("-")), "")


if __name__ == "__main__":
    sys.exit(main())
