"""The failures a user can act on. Each becomes one line on stderr and one manifest record."""

from __future__ import annotations

import errno
import os
import re


class VpipeError(Exception):
    """Base class; ``str(e)`` is the one-line cause shown to the user."""

    exit_code = 1


class UsageError(VpipeError):
    """Bad options or arguments (exit 2, nothing processed)."""

    exit_code = 2


class ParamsChanged(UsageError):
    """An output folder made with other parameters, without --overwrite."""


class NotAVideo(VpipeError):
    """The file has no decodable video stream."""


class MediaError(VpipeError):
    """ffmpeg/PyAV could not read or write a file (empty, truncated, corrupt)."""


class TooShort(VpipeError):
    """The source is too short for the requested clip(s)."""


class WeightsUnavailable(VpipeError):
    """Pretrained weights are neither cached nor given as a file."""


class Skip(Exception):
    """Raised by a stage's per-item work to record the item as skipped, with a reason."""


# Out of space, or out of the user's quota: no later write to that device can succeed.
NO_ROOM = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


class DiskFull(VpipeError):
    """No space (or quota) left where an output is written: the stage stops as a whole."""

    def __init__(self, path: str | os.PathLike | None, code: int = errno.ENOSPC) -> None:
        super().__init__(None if path is None else str(path), code)  # args: it pickles
        self.path, self.errno = self.args

    def __str__(self) -> str:
        what = NO_ROOM.get(self.errno, os.strerror(self.errno))
        return f"{what} writing {self.path}" if self.path else what


# Control characters (a newline, a CR, an escape) in a file name must not split, overwrite or
# colour the one line that names it.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def one_line(text: str, *, indented: bool = False) -> str:
    """``text`` with its control characters written as escapes (``\\n``, ``\\r``, ``\\x1b``);
    with ``indented``, a newline that starts an indented line is kept (the items a message
    lists, one per line, as the offline weights error does)."""
    def escape(m: re.Match) -> str:
        if indented and m.group() == "\n" and m.string.startswith("  ", m.end()):
            return "\n"
        return repr(m.group())[1:-1]

    return _CONTROL.sub(escape, text)


def plural(n: int, nouns: str) -> str:
    """``n`` and a plural noun as a message says them: "1 clip", "2 clips", "0 shards"."""
    return f"{n} {nouns[:-1] if n == 1 and nouns.endswith('s') else nouns}"


def quote_path(path: str | os.PathLike) -> str:
    """A path as a message shows it: as it is, or quoted with escapes where it holds a control
    character (``'clip\\n1.mp4'``), so that the line stays one line and says where the name ends."""
    text = os.fspath(path)
    return repr(text) if _CONTROL.search(text) else text
