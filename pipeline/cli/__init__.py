"""``vpipe`` command line. ``main`` turns a user-actionable error into one line and an exit code."""

from __future__ import annotations

import sys

from pipeline.cli.app import app
from pipeline.errors import VpipeError

# Importing the command modules registers their commands on ``app`` (order = --help order).
from pipeline.cli import media_cmds  # noqa: E402,F401  isort: skip
from pipeline.cli import features_cmds  # noqa: E402,F401  isort: skip
from pipeline.cli import train_cmds  # noqa: E402,F401  isort: skip
from pipeline.cli import run_cmd  # noqa: E402,F401  isort: skip


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vpipe`` console script."""
    try:
        app(args=argv, prog_name="vpipe", standalone_mode=True)
    except VpipeError as e:
        print(f"vpipe: error: {e}", file=sys.stderr)
        return e.exit_code
    except SystemExit as e:
        code = e.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
