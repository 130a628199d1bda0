"""The clips a stage reads: the records of a ``vpipe subclip`` folder (clip files, or ranges
of their sources in ranges mode) or plain videos, as :class:`ClipRef` s.

``vpipe extract-frames`` / ``extract-audio`` and ``vpipe features --from-video`` both start
here, so that a clip means the same span of the same source to every stage that decodes it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline import media
from pipeline.errors import MediaError, UsageError
from pipeline.records import ok_records, read_run_info


@dataclass(frozen=True)
class ClipRef:
    """One clip to extract: its file, and where it sits in its source."""

    path: Path
    clip_id: str
    source: str
    start_s: float | None  # None: unknown until probed (the whole video: 0 .. duration)
    end_s: float | None
    source_ref: media.SourceRef | None = None  # set for plain videos (carries probe problems)
    # A ranges-mode clip: ``path`` is its source, decoded over [start_s, end_s) only, and
    # ``identity`` what subclip saw of that file (source_path, source_bytes, source_mtime_ns).
    identity: dict | None = None

    @property
    def span(self) -> tuple[float, float] | None:
        return (self.start_s, self.end_s) if self.identity is not None else None

    @property
    def duration_s(self) -> float | None:
        """A subclip's length from its first frame (its record's end - start): where its last
        frame stops, as in its source; None for a plain video."""
        if self.start_s is None or self.end_s is None:
            return None
        return self.end_s - self.start_s

    def check_source(self) -> None:
        """A ranges clip's source must be the file subclip planned on (moved, deleted or
        rewritten since: a MediaError naming it); other clips' files must exist."""
        if self.identity is None:
            if not self.path.exists():
                raise MediaError(f"{self.path}: subclip file missing (was its folder moved?)")
            return
        try:
            st = self.path.stat()
        except OSError:
            raise MediaError(f"{self.path}: source of ranges clip {self.clip_id} is missing "
                             "(moved or deleted since subclip)") from None
        if (st.st_size, st.st_mtime_ns) != (self.identity.get("source_bytes"),
                                            self.identity.get("source_mtime_ns")):
            raise MediaError(f"{self.path}: source of ranges clip {self.clip_id} changed since "
                             "subclip (size or modification time differ); run subclip again")


def find_clips(inputs: Sequence[str | os.PathLike]) -> list[ClipRef]:
    """Clips from subclip output folders (by their manifest) and from any other videos."""
    clips: list[ClipRef] = []
    others: list[Path] = []
    for p in map(Path, inputs):
        info = read_run_info(p) if p.is_dir() else None
        if info is not None and info.get("stage") == "subclip":
            for rec in ok_records(p):
                if rec.get("mode") == "ranges":
                    ident = {k: rec.get(k) for k in
                             ("source_path", "source_bytes", "source_mtime_ns")}
                    clips.append(ClipRef(Path(rec["source_path"]), rec["id"], rec["source"],
                                         rec["start"], rec["end"], identity=ident))
                    continue
                rel = rec.get("path") or f"{rec['source']}/{rec['id']}.mp4"
                clips.append(
                    ClipRef(p / rel, rec["id"], rec["source"], rec["start"], rec["end"])
                )
        elif info is not None:
            raise UsageError(
                f"{p}: this is the output of `vpipe {info.get('stage')}`; give videos or a "
                "`vpipe subclip` output folder"
            )
        elif not os.path.lexists(p):  # a dangling link is there: scan_sources reports it
            raise UsageError(f"{p}: no such file or folder")
        else:
            others.append(p)
    used = {c.clip_id for c in clips}
    for s in media.scan_sources(others) if others else []:
        cid, n = s.source_id, 1
        while cid in used:  # a plain video named like a subclip: keep ids unique
            n += 1
            cid = f"{s.source_id}-{n}"
        used.add(cid)
        clips.append(ClipRef(s.path, cid, cid, None, None, s))
    return clips
