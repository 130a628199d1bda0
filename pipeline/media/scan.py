"""Finding videos: files and folders (searched recursively) to sources with unique ids."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import MediaError, NotAVideo, Skip, UsageError
from pipeline.media.probe import RECORD_FILES, MediaInfo, probe


def find_videos(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Candidate files: given files as they are, folders searched recursively (sorted).

    Which candidates are videos is decided later by :func:`probe`, not by extension. Hidden
    files and folders (temp files of interrupted writes among them), vpipe's record files and
    vpipe output folders inside a searched folder (``-o`` under the input) are not searched.
    A missing path, or a folder without any file to consider, is a usage error.
    """
    out: list[Path] = []
    seen: set[Path] = set()
    for p in map(Path, paths):
        if p.is_dir():
            found = []
            for root, dirs, files in os.walk(p):
                dirs[:] = [
                    d for d in dirs
                    if not d.startswith(".") and not (Path(root, d) / "vpipe.json").exists()
                ]
                found += [
                    Path(root, f) for f in files
                    if not f.startswith(".") and f not in RECORD_FILES
                ]
            found.sort()
            if not found:  # a wrong path far more often than a folder meant to be empty
                raise UsageError(f"{p}: no files in this folder")
        elif p.is_file():
            found = [p]
        else:
            raise UsageError(f"{p}: no such file or folder")
        for f in found:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                out.append(f)
    return out


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

    explicit = {Path(p).resolve() for p in paths if Path(p).is_file()}
    probed: list[tuple[Path, MediaInfo | None, str | None, str | None]] = []
    for f in find_videos(paths):
        try:
            probed.append((f, probe(f), None, None))
        except NotAVideo as e:
            kind = "fail" if f.resolve() in explicit else "skip"
            probed.append((f, None, kind, str(e)))
        except MediaError as e:
            probed.append((f, None, "fail", str(e)))
        except Exception as e:  # one odd file must not stop the scan of the others
            probed.append((f, None, "fail", f"{f}: cannot probe ({type(e).__name__}: {e})"))
    ordered = sorted(probed, key=lambda x: x[1] is None)  # stable: videos first
    ids = unique_ids([p[0] for p in ordered])
    sid_of = dict(zip((p[0] for p in ordered), ids, strict=True))
    return [SourceRef(f, sid_of[f], info, kind, msg) for f, info, kind, msg in probed]
