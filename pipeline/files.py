"""Files that appear only complete: a hidden temp name renamed into place, and file digests.

Every output vpipe writes (a clip, a frame folder, a shard, a checkpoint, a record) goes
through :func:`atomic_path`, which is what makes "kill it anywhere, run it again" safe: a
reader never meets a half-written file under its real name, and leftovers of a killed write
carry a name (``.name.tmp-PID``) that :func:`clean_temp_files` recognises.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def temp_name(path: Path) -> Path:
    """A hidden sibling name for ``path`` that no reader mistakes for a finished output."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; rename it onto ``path`` only if the block succeeds.

    Works for files and for folders (the block creates whatever it likes at the temp path).
    """
    path = Path(path)
    tmp = temp_name(path)
    remove(tmp)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        remove(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (utf-8) to ``path`` through a temp name."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def remove(path: Path) -> None:
    """Delete a file, link or folder tree if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def clean_temp_files(folder: Path) -> None:
    """Remove leftovers of interrupted writes (``.name.tmp-PID``) under ``folder``."""
    for p in folder.rglob(".*.tmp-*"):
        remove(p)


def sha256_of(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (weights files are large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
