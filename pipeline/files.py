"""Files that appear only complete: a hidden temp name renamed into place, and file digests.

Every output vpipe writes (a clip, a frame folder, a shard, a checkpoint, a record) goes
through :func:`atomic_path`, which is what makes "kill it anywhere, run it again" safe: a
reader never meets a half-written file under its real name, and leftovers of a killed write
carry a name (``.name.tmp-PID``) that :func:`clean_temp_files` recognises.

A full disk is not a fault of one item: every later write would fail the same way. A write
that fails for want of space becomes :class:`DiskFull`, naming the output being written, and
stops the stage; the temp file is removed as for any failed write, and what was complete is
kept, so the same command completes once there is space.

The tables a user gives (labels, captions, segments, titles: CSV or TSV) are read here too, so
that each refuses the same faults with the same one line: bytes that are not UTF-8 (a Latin-1
export) and a quote left open (which would swallow every line after it into one field).
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import hashlib
import io
import os
import re
import shutil
import stat
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import NO_ROOM, DiskFull, UsageError, quote_path

_TEMP_PART = re.compile(r"^\.(?P<name>.+)\.tmp-\d+$")


def disk_full(e: BaseException, writing: str | os.PathLike | None = None) -> DiskFull | None:
    """``e`` as a :class:`DiskFull` if it says the disk is full, else None.

    It names the file in the error, else ``writing``: an ``OSError`` raised by ``write()``
    carries no file name. A temp name is shown as the output it becomes.
    """
    if isinstance(e, DiskFull):
        return e if e.path or writing is None else DiskFull(shown_path(writing), e.errno)
    if isinstance(e, OSError) and e.errno in NO_ROOM:
        path = e.filename if e.filename is not None else writing
        return DiskFull(None if path is None else shown_path(path), e.errno)
    return None


def disk_full_said(message: str) -> DiskFull | None:
    """A full disk as a program vpipe runs (ffmpeg) says it, in its messages: they name no
    file, which the :func:`atomic_path` or :func:`writing` around the call adds."""
    code = next((c for c in NO_ROOM if os.strerror(c) in message), None)
    return None if code is None else DiskFull(None, code)


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk met inside the block into :class:`DiskFull` naming ``path``."""
    try:
        yield
    except Exception as e:
        full = disk_full(e, path)
        if full is None or full is e:
            raise
        raise full from None


def shown_path(path: str | os.PathLike) -> str:
    """``path`` as the user will find it: ``OUT/.clip.tmp-PID/a.jpg`` is ``OUT/clip/a.jpg``."""
    p = Path(path)
    return str(Path(*[(m["name"] if (m := _TEMP_PART.match(part)) else part) for part in p.parts]))


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
        with writing(path):
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
    """Remove leftovers of interrupted writes (``.name.tmp-PID``) in ``folder``.

    Only its own entries are looked at: every output is renamed into place at the top of its
    stage's folder (a clip folder is written whole under a temp name), so nothing deeper can
    be a leftover, and a resume need not walk 100k clip folders (2.3 s at 10k).
    """
    with os.scandir(folder) as entries:
        for e in entries:
            if _TEMP_PART.match(e.name):
                remove(Path(e.path))


def append_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Append ``data`` to ``path`` with O_APPEND writes until every byte is written: a write on
    a nearly full disk may be short, and the rest must raise (ENOSPC), not go missing."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def sha256_of(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (weights files are large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_out_dir(out: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Refuse an output folder that would mix a stage's outputs with its inputs, before it is
    made: a file system root, an existing file, an input itself, a folder inside an input
    folder (the same command again would take its own outputs for new inputs) or a folder
    that holds an input. The message names ``-o`` as given and the input it collides with."""
    where = f"-o {quote_path(out)}"
    if os.path.islink(out) and not os.path.exists(out):
        raise UsageError(f"{where}: a link to {quote_path(os.readlink(out))}, which does not "
                         "exist; choose another --out")
    target = _resolved(out)
    if target is None:
        raise UsageError(f"{where}: a link that loops; choose another --out")
    if target.parent == target:
        raise UsageError(f"{where}: the root of a file system; choose a folder of its own")
    if target.exists() and not target.is_dir():
        raise UsageError(f"{where}: an existing file, not a folder; choose another --out")
    above = next((p for p in Path(out).parents if p.exists()), None)
    if above is not None and not above.is_dir():  # -o labels.csv/run: no folder can be made
        raise UsageError(f"{where}: {quote_path(above)} is a file, not a folder; choose "
                         "another --out")
    for given in inputs:
        path = _resolved(given)
        if path is None:
            continue  # a looping link: that input is one failed record of its own
        name = quote_path(given)
        if path == target:
            raise UsageError(f"{where}: that is an input; choose another --out")
        if path.is_dir() and target.is_relative_to(path):
            raise UsageError(f"{where}: inside the input folder {name}: the same command "
                             "again would read its outputs as inputs; choose another --out")
        if path.is_relative_to(target):
            raise UsageError(f"{where}: holds the input {name}; choose another --out")


def _resolved(path: str | os.PathLike) -> Path | None:
    """``path`` made absolute with its links followed; ``None`` for a link that loops."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):  # RuntimeError: Python before 3.13 on a loop
        return None


_NOT_REGULAR = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
                (stat.S_ISDIR, "a folder"))


def not_regular(mode: int) -> str | None:
    """What a file of ``st_mode`` is when it is not a regular file ("a FIFO (named pipe)", "a
    character device"...), else None. Such a file is never opened: reading a FIFO waits for a
    writer, and a device has no size (``/dev/zero`` says 0 bytes and never ends)."""
    return next((what for test, what in _NOT_REGULAR if test(mode)), None)


def read_user_text(path: str | os.PathLike) -> str:
    """A text file the user gives (a CSV or TSV table, a workflow), a leading BOM dropped.
    Bytes that are not UTF-8 are a UsageError naming the file, the byte's offset and its
    line (the whole file is decoded at once: a streamed decode's offset counts from a block)."""
    data = Path(path).read_bytes()
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = bom + e.start
        line = data.count(b"\n", 0, at) + 1
        raise UsageError(f"{path}: not UTF-8 text (byte 0x{data[at]:02x} at offset {at}, line "
                         f"{line}); save it as UTF-8") from None


# Appended to a CSV's text: a record of its own when every quote is closed, swallowed into the
# open field when one is not (csv reads an open quote to the end of the text without a word).
_END_OF_TEXT = "\x1evpipe: end of text\x1e"


def csv_rows(path: str | os.PathLike, text: str) -> Iterator[tuple[int, list[str]]]:
    """The records of CSV ``text`` (read from ``path``), each with the line it starts on (a
    quoted field may span lines), empty lines left out. A quote left open, which would take
    every line after it as one field, is a UsageError naming the line it opens on."""
    reader = csv.reader(io.StringIO(f"{text}\n{_END_OF_TEXT}\n", newline=""))
    last: tuple[int, list[str]] | None = None
    while True:
        line = reader.line_num + 1
        row = next(reader, None)
        if row is None:
            break
        if last is not None:
            yield last
        last = (line, row) if row else None
    if last is None or last[1] != [_END_OF_TEXT]:
        where = last[0] if last is not None else reader.line_num
        raise UsageError(f"{path}:{where}: unclosed quote (the quoted field opened on this "
                         "line runs to the end of the file)")


def table_records(path: str | os.PathLike, text: str, what: str, required: Sequence[str],
                  shown: str | None = None) -> Iterator[tuple[int, dict[str, str]]]:
    """The rows of a CSV the user gives (``text``, read from ``path``) as ``{column: value}``
    with the line each starts on: header names matched case-blind (spreadsheets write
    "ID,Label" as often as "id,label"), a short row leaving its last columns out. A header
    without the ``required`` columns is a UsageError saying which ("labels CSV needs the
    columns id,label (missing label; found: id,rating)"); ``shown`` spells them there."""
    rows = csv_rows(path, text)
    _, header = next(rows, (1, []))
    cols = [c.strip().lower() for c in header]
    missing = [c for c in required if c not in cols]
    if missing:
        raise UsageError(
            f"{path}: {what} needs the columns {shown or ','.join(required)} (missing "
            f"{','.join(missing)}; found: {','.join(cols) or 'nothing'})"
        )
    for n, row in rows:
        yield n, dict(zip(cols, row, strict=False))


def output_bytes(out_dir: Path, rel: str) -> int | None:
    """Bytes of ``out_dir/rel`` (a folder: of all the files under it); ``None`` if absent."""
    try:
        st = os.stat(out_dir / rel)
    except OSError:
        return None
    return _tree_bytes(os.path.join(out_dir, rel)) if stat.S_ISDIR(st.st_mode) else st.st_size


def _tree_bytes(folder: str) -> int:
    total = 0
    with os.scandir(folder) as entries:
        for e in entries:
            try:
                is_dir = e.is_dir(follow_symlinks=False)
                total += _tree_bytes(e.path) if is_dir else e.stat().st_size
            except OSError:
                pass
    return total


# Keys of a recorded weights identity that say where a local file or folder was given, not
# what it holds: the same content given by another path is the same model.
WHERE_KEYS = ("name", "file", "folder")


def content_identity(value: Any) -> Any:
    """A recorded weights or model identity as it decides the outputs: a local file or folder
    (``kind`` file or folder) by its content (sha256), not the path it was given by, so that
    ``tiny-bert`` and ``/home/me/tiny-bert`` holding the same files are the same model."""
    if isinstance(value, dict):
        local = value.get("kind") in ("file", "folder")
        return {k: content_identity(v) for k, v in value.items()
                if not (local and k in WHERE_KEYS)}
    return value
