"""The ffmpeg binary vpipe runs (bundled unless VPIPE_FFMPEG says otherwise), its version, and
one ffmpeg process with its error as a MediaError."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import MediaError, UsageError
from pipeline.files import disk_full_said

# Which ffmpeg binary vpipe runs: unset or "bundled" (the default), "system", or a path.
FFMPEG_ENV = "VPIPE_FFMPEG"
_FFMPEG_CHOICES = f"set {FFMPEG_ENV} to bundled, system or the path of an ffmpeg binary"


@dataclass(frozen=True)
class FFmpeg:
    """The ffmpeg binary vpipe runs and where the choice came from (recorded in vpipe.json)."""

    path: str
    source: str  # "bundled" (imageio-ffmpeg's), "system" (first on PATH) or FFMPEG_ENV (a path)
    version: str


def locate_ffmpeg(env: Mapping[str, str]) -> FFmpeg:
    """The ffmpeg that ``env[VPIPE_FFMPEG]`` chooses; a choice that is missing or does not run
    is a UsageError naming the variable.

    The default is imageio-ffmpeg's static build, not an ffmpeg on PATH, so that outputs are
    the same on every machine: a distribution's older ffmpeg (Debian 12's 5.1) cuts AAC a few
    samples differently and lacks options of newer builds.
    """
    choice = env.get(FFMPEG_ENV, "").strip() or "bundled"
    named = f"{FFMPEG_ENV}={choice}"
    if choice == "bundled":
        path, source = _bundled_ffmpeg(), "bundled"
        if path is None:
            raise UsageError(
                f"imageio-ffmpeg holds no ffmpeg binary for this platform: {_FFMPEG_CHOICES}"
            )
        named = f"imageio-ffmpeg's {path}"
    elif choice == "system":
        path, source = shutil.which("ffmpeg", path=env.get("PATH")), "system"
        if path is None:
            raise UsageError(f"{named}: no ffmpeg on PATH; {_FFMPEG_CHOICES}")
    else:
        path, source = shutil.which(choice, path=env.get("PATH")), FFMPEG_ENV
        if path is None:
            raise UsageError(f"{named}: not found or not executable; {_FFMPEG_CHOICES}")
    return FFmpeg(path, source, _ffmpeg_version_of(path, named))


def _bundled_ffmpeg() -> str | None:
    """The binary inside the imageio-ffmpeg wheel (its own finder would fall back to PATH)."""
    from importlib.resources import files

    folder = Path(str(files("imageio_ffmpeg") / "binaries"))
    found = sorted(p for p in folder.glob("ffmpeg*") if os.access(p, os.X_OK))
    return str(found[0]) if found else None


def _ffmpeg_version_of(path: str, named: str) -> str:
    """``ffmpeg -version``'s version (e.g. ``n9.0.2-17-g2a571b6068``); not runnable: UsageError."""
    try:
        proc = subprocess.run([path, "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UsageError(f"{named}: cannot run it ({e}); {_FFMPEG_CHOICES}") from None
    first = proc.stdout.splitlines()[0] if proc.stdout.strip() else ""
    parts = first.split()
    if proc.returncode != 0 or parts[:2] != ["ffmpeg", "version"] or len(parts) < 3:
        err = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        said = first or (err[-1] if err else f"exit status {proc.returncode}")
        raise UsageError(f"{named}: not a working ffmpeg ({said}); {_FFMPEG_CHOICES}")
    return parts[2]


@functools.lru_cache(maxsize=1)
def chosen_ffmpeg() -> FFmpeg:
    """The ffmpeg this process runs, chosen once from the environment (see locate_ffmpeg)."""
    return locate_ffmpeg(os.environ)


def ffmpeg_exe() -> str:
    """The path of the ffmpeg binary vpipe runs (imageio-ffmpeg's unless VPIPE_FFMPEG says)."""
    return chosen_ffmpeg().path


def ffmpeg_version() -> str:
    """The version string of :func:`ffmpeg_exe` (e.g. ``n9.0.2-17-g2a571b6068``)."""
    return chosen_ffmpeg().version


def media_versions() -> dict[str, str]:
    """Versions of the media libraries and which ffmpeg runs, for ``vpipe.json``."""
    import av

    ff = chosen_ffmpeg()
    return {
        "ffmpeg": ff.version, "ffmpeg_source": ff.source, "ffmpeg_path": ff.path,
        "pyav": av.__version__,
    }


def run_ffmpeg(args: Sequence[str], *, what: str, loglevel: str = "error") -> list[str]:
    """Run ffmpeg quietly; a failure raises MediaError with ffmpeg's last message line.

    Returns what ffmpeg said on stderr at ``loglevel`` (its lines) when it succeeded: at
    ``warning``, a decoder's report of damaged input ("corrupt decoded frame") is among them.
    """
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-y", "-v", loglevel, *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
    if proc.returncode != 0:
        full = disk_full_said(proc.stderr)  # the output's disk, not the input: stop the stage
        if full is not None:
            raise full
        raise MediaError(f"{what}: ffmpeg failed: {lines[-1] if lines else proc.returncode}")
    return lines
