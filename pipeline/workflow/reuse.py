"""A stage another workflow already finished with the same command on the same inputs is
reused, not redone: ``vpipe run video-tagging-notext`` after ``vpipe run video-tagging`` takes
the first one's frames.

How it is found: the other work folders beside this workflow's (``work/*/STAGE`` for
``work_dir = "work/NAME"``), made by another workflow (each stage `vpipe run` runs records the
workflow's name in its ``vpipe.json``; the same workflow in another ``--work-dir`` is a fresh
run on purpose), run from the same folder (``cwd`` there). One matches when it finished
(ended, nothing failed, not interrupted), its outputs are all still there as written, and its
recorded command is this step's word for word but for ``-o`` and the options that change no
output (``--workers``, ``--quiet``...), an input folder counting as the same when it is the
same folder or a stage folder made the same way (the same stage, the same parameters, the
same items: two ``subclip`` folders of the same videos).

How it is taken: this workflow's stage folder is made as a copy of that one in which the
records (``vpipe.json``, ``manifest.jsonl``, ``index.jsonl``) are copied and every output file
is a hard link to the other's (no bytes copied; a copy where the two are on different file
systems), and its ``vpipe.json`` says ``reused_from`` and carries this workflow's command and
name. From then on it is this workflow's own folder: the other one may be redone, changed or
deleted without touching it (vpipe replaces files, never rewrites one in place), and a later
run here treats it as any folder of its own. The run says ``reused`` in its log and summary.
Only a stage whose folder here is not there yet (or empty) is taken so.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from pipeline.files import atomic_write_text
from pipeline.lock import LOCK
from pipeline.records import (
    RUN_INFO,
    DamagedRecord,
    first_changed_output,
    read_manifest,
    read_run_info,
)
from pipeline.workflow.plan import Step, output_args

# Options whose value is where the output goes: compared neither way.
OUT_FLAGS = ("-o", "--out")
# Manifest fields that say where an item was read from or how many bytes its encoded output
# took: two folders of the same items may differ there.
WHERE_FIELDS = ("input", "output_bytes")


def reusable(step: Step, args: Sequence[str], workflow: str,
             cwd: Path | None = None) -> Path | None:
    """The finished folder of another workflow than ``workflow`` that ``step`` (run as
    ``args``) would only make again, if there is one."""
    if step.out is None or "--overwrite" in args:
        return None
    cwd = cwd or Path.cwd()
    own = Path(os.path.abspath(step.out))
    if own.is_dir() and any(own.iterdir()):  # a folder of its own already: resumed as it is
        return None
    for other in sorted(own.parent.parent.glob(f"*/{own.name}")):
        if other.parent == own.parent or not other.is_dir():
            continue
        if _same_run(other, step.name, args, cwd, workflow):
            return other
    return None


def take(step: Step, other: Path, args: Sequence[str], workflow: str) -> None:
    """Make ``step``'s output folder a folder of its own holding ``other``'s outputs as hard
    links and its records as copies, recorded as this workflow's (written under a temporary
    name, then renamed into place)."""
    out = Path(step.out)
    tmp = out.with_name(f".{out.name}.reuse-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for root, _dirs, files in os.walk(other):
        here = tmp / Path(root).relative_to(other)
        here.mkdir(parents=True, exist_ok=True)
        for name in files:
            if name == LOCK or (name.startswith(".") and ".tmp-" in name):
                continue  # the other's lock, or a write it has in progress
            src, dst = Path(root) / name, here / name
            if name.endswith((".json", ".jsonl")):  # records: appended and rewritten
                shutil.copy2(src, dst)
                continue
            try:
                os.link(src, dst)
            except OSError:  # another file system, or links not allowed
                shutil.copy2(src, dst)
    info = read_run_info(tmp) or {}
    info.update(command=["vpipe", *args], workflow=workflow, reused_from=str(other.resolve()))
    atomic_write_text(tmp / RUN_INFO, json.dumps(info, indent=2, default=str) + "\n")
    if out.is_dir():
        out.rmdir()  # empty: reusable() said so
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)


def _info(folder: Path) -> dict:
    try:
        return read_run_info(folder) or {}
    except (OSError, DamagedRecord):
        return {}


def _finished(info: dict, stage: str) -> bool:
    counts = info.get("counts") or {}
    return (info.get("stage") == stage and bool(info.get("ended")) and not info.get("error")
            and not info.get("interrupted") and counts.get("failed", 1) == 0)


def _same_run(other: Path, stage: str, args: Sequence[str], cwd: Path, workflow: str) -> bool:
    info = _info(other)
    if not _finished(info, stage) or info.get("cwd") != str(cwd):
        return False
    if info.get("workflow") in (None, workflow):  # by hand, or this workflow in another
        return False  # work folder (a fresh run was asked for)
    recorded = list(info.get("command") or [])[1:]
    if not _same_words(_output_words(recorded), _output_words(args), cwd):
        return False
    try:
        return first_changed_output(other) is None
    except (OSError, DamagedRecord):
        return False


def _output_words(args: Sequence[str]) -> list[str]:
    """The words of a command that decide its outputs: ``-o``'s value and the run-only
    options left out."""
    words, skip = [], False
    for a in output_args(args):
        if skip:
            skip = False
        elif a in OUT_FLAGS:
            skip = True
        elif a.partition("=")[0] not in OUT_FLAGS:
            words.append(a)
    return words


def _same_words(a: Sequence[str], b: Sequence[str], cwd: Path) -> bool:
    return len(a) == len(b) and all(x == y or _same_folder(cwd / x, cwd / y)
                                    for x, y in zip(a, b, strict=True))


def _same_folder(a: Path, b: Path) -> bool:
    """The same folder, or two stage folders made the same way of the same items."""
    if not (a.is_dir() and b.is_dir()):
        return False
    if a.resolve() == b.resolve():
        return True
    ia, ib = _info(a), _info(b)
    stage = ia.get("stage")
    if not stage or not _finished(ia, stage) or not _finished(ib, stage):
        return False
    if ia.get("params") != ib.get("params"):
        return False
    try:
        return _items(a) == _items(b)
    except (OSError, DamagedRecord):
        return False


def _items(folder: Path) -> dict[str, dict]:
    return {i: {k: v for k, v in rec.items() if k not in WHERE_FIELDS}
            for i, rec in read_manifest(folder).items()}
