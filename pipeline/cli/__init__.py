"""``vpipe`` command line. ``main`` turns a user-actionable error into one line and an exit code.

This module imports nothing but the standard library until ``main`` runs, so that a Ctrl-C
in the first half second (while Typer, the commands and torch load) is one line and exit 130
rather than a traceback from an import.
"""

from __future__ import annotations

import gc
import signal
import sys

INTERRUPTED = 130  # the shells' code for a process ended by SIGINT


def command():
    """The click command tree of the CLI (:func:`pipeline.cli.tree.command`)."""
    from pipeline.cli.tree import command as tree

    return tree()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vpipe`` console script (``argv`` None: this process's command line;
    `vpipe run` and the tests call it with theirs)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # before Typer took over (importing it) or after it let go
        _say_interrupted(argv)
        return INTERRUPTED
    finally:
        if argv is None:
            # The process ends next, its command done (or its interrupt recorded): a Ctrl-C
            # now would only turn into a traceback from an exit handler (torch's, Ray's) or
            # the signal's own exit in place of the command's code.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            # Without this, the teardown walks every object torch and torchvision made:
            # 1.18 s against 0.25 s after a freeze (benchmarks/startup.py).
            gc.freeze()


def _main(argv: list[str] | None) -> int:
    from pipeline.errors import VpipeError, one_line
    from pipeline.files import disk_full

    tree = command()
    _usage_errors_in_one_line()
    try:
        tree.main(args=argv, prog_name="vpipe", standalone_mode=True)
    except Exception as e:
        # A full disk, wherever the stage met it: what it was writing, said as the stage's
        # own line (it stops the stage; the same command completes once there is space).
        full = disk_full(e)
        if full is not None:
            print(one_line(f"vpipe {_command(argv)}: {full}"), file=sys.stderr)
            return full.exit_code
        if not isinstance(e, VpipeError):
            raise
        print(one_line(f"vpipe: error: {e}", indented=True), file=sys.stderr)
        return e.exit_code
    except SystemExit as e:
        code = e.code
        if code == INTERRUPTED and not _said(e):
            _say_interrupted(argv)
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


def _usage_errors_in_one_line() -> None:
    """Click's usage errors (an unknown command or option, a bad value) said as every other
    error of vpipe is, ``vpipe: error: ...`` in one line naming where the help is, instead of
    its usage line, a hint and ``Error: ...``; the exit code stays 2."""
    from typer._click.exceptions import UsageError

    def show(self: UsageError, file: object = None) -> None:
        where = f"{self.ctx.command_path} --help" if self.ctx is not None else "vpipe --help"
        message = self.format_message()
        message = message[:1].lower() + message[1:] if message[1:2].islower() else message
        print(f"vpipe: error: {message.rstrip('.')} (see {where})", file=sys.stderr)

    UsageError.show = show  # type: ignore[method-assign]


def _said(e: BaseException) -> bool:
    """Whether the Ctrl-C behind Typer's exit 130 already had its line (a stage's summary).
    An exit 130 with no Ctrl-C behind it (`vpipe run` passing on a stage's) says nothing."""
    seen = e
    while seen is not None:
        if isinstance(seen, KeyboardInterrupt):
            return getattr(seen, "vpipe_said", False)
        seen = seen.__cause__ or seen.__context__
    return True


def _say_interrupted(argv: list[str] | None) -> None:
    name = _command(argv)
    print(f"vpipe {name}: interrupted" if name else "vpipe: interrupted", file=sys.stderr)


def _command(argv: list[str] | None) -> str:
    """The command being run (``vpipe``'s own options all come before it)."""
    args = sys.argv[1:] if argv is None else argv
    return next((a for a in args if not a.startswith("-")), "")


if __name__ == "__main__":
    sys.exit(main())
