"""Finding videos: files and folders (searched recursively) to sources with unique ids."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import MediaError, NotAVideo, Skip, UsageError
from pipeline.files import not_regular
from pipeline.media.probe import RECORD_FILES, MediaInfo, probe


def find_videos(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Candidate files: given files as they are, folders searched recursively (sorted).

    Which candidates are videos is decided later by :func:`probe`, not by extension. Hidden
    files and folders (temp files of interrupted writes among them), vpipe's record files and
    vpipe output folders inside a searched folder (``-o`` under the input) are not searched.
    A missing path, or a folder without any file to consider, is a usage error; a path that is
    there but is no file to read (a dangling link, a FIFO, a device) is a candidate, which
    :func:`scan_sources` reports as it does one found in a folder.
    """
    out: list[Path] = []
    seen: set[str] = set()
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(_walk(p, {os.path.realpath(p)}))
            if not found:  # a wrong path far more often than a folder meant to be empty
                raise UsageError(f"{p}: no files in this folder")
        elif os.path.lexists(p):
            found = [p]
        else:
            raise UsageError(f"{p}: no such file or folder")
        for f in found:
            # Each name is its own source (9 links to 3 files are 9 sources, as their labels
            # expect); only the same path given twice is one.
            key = os.path.abspath(f)
            if key not in seen:
                seen.add(key)
                out.append(f)
    return out


def _walk(folder: Path, chain: set[str]) -> list[Path]:
    """Candidate files under ``folder``, following linked folders; ``chain`` holds the real
    paths of the folders above, so a link back to one of them (a loop) is returned as a
    candidate that :func:`scan_sources` reports, instead of being walked forever."""
    found: list[Path] = []
    for e in os.scandir(folder):
        if e.name.startswith("."):
            continue
        path = Path(e.path)
        if _is_dir(e):
            real = os.path.realpath(path)
            if real in chain:
                found.append(path)
            elif not (path / "vpipe.json").exists():
                found += _walk(path, chain | {real})
        elif e.name not in RECORD_FILES:
            found.append(path)  # a broken or looping link too: reported, not dropped
    return found


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a looping link: not a folder to walk
        return False


def _unreadable(f: Path) -> str | None:
    """Why a candidate cannot be opened at all (a link loop, a dangling link, a FIFO or device,
    which is never opened: reading a FIFO waits for a writer), or None."""
    try:
        st = os.stat(f)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"{f}: symbolic link loop"
        if os.path.islink(f):
            return f"{f}: broken symbolic link (to {os.readlink(f)})"
        return f"{f}: cannot read ({e.strerror})"
    if stat.S_ISDIR(st.st_mode):
        return f"{f}: symbolic link loop (links to a folder above it)"
    kind = not_regular(st.st_mode)
    return None if kind is None else f"{f}: not a regular file: {kind}"


@dataclass(frozen=True)
class SourceRef:
    """A candidate input after probing: its source id, and either its MediaInfo or the reason
    it cannot be used (``skip``: not a video, found in a folder; ``fail``: anything else)."""

    path: Path
    source_id: str
    info: MediaInfo | None
    problem: str | None = None  # "skip" | "fail"
    message: str | None = None

    def raise_problem(self) -> None:
        """Raise the recorded problem as Skip or MediaError (inside a stage's work)."""
        if self.problem == "skip":
            raise Skip(self.message)
        if self.problem == "fail":
            raise MediaError(self.message)


def scan_sources(paths: Iterable[str | os.PathLike]) -> list[SourceRef]:
    """Find and probe the candidates in ``paths``; give each a unique source id.

    Videos get their ids first, so a poster ``a.jpg`` beside ``a.mp4`` cannot take the id
    ``a``. A non-video named on the command line fails; one found in a folder is skipped.
    """
    from pipeline.ids import unique_ids

    paths = list(paths)
    explicit = {os.path.abspath(p) for p in paths if Path(p).is_file()}
    probed: list[tuple[Path, MediaInfo | None, str | None, str | None]] = []
    for f in find_videos(paths):
        why = _unreadable(f)
        if why is not None:
            probed.append((f, None, "fail", why))
            continue
        try:
            probed.append((f, probe(f), None, None))
        except NotAVideo as e:
            kind = "fail" if os.path.abspath(f) in explicit else "skip"
            probed.append((f, None, kind, str(e)))
        except MediaError as e:
            probed.append((f, None, "fail", str(e)))
        except Exception as e:  # one odd file must not stop the scan of the others
            probed.append((f, None, "fail", f"{f}: cannot probe ({type(e).__name__}: {e})"))
    ordered = sorted(probed, key=lambda x: x[1] is None)  # stable: videos first
    ids = unique_ids([p[0] for p in ordered])
    sid_of = dict(zip((p[0] for p in ordered), ids, strict=True))
    return [SourceRef(f, sid_of[f], info, kind, msg) for f, info, kind, msg in probed]
