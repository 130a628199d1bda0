"""The failures a user can act on. Each becomes one line on stderr and one manifest record."""

from __future__ import annotations


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
