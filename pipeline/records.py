"""The records every stage keeps in its output folder: ``manifest.jsonl`` and ``vpipe.json``.

A stage opens a :class:`Run` on its output folder. The run refuses parameters that differ from
the ones recorded there (unless ``overwrite``), tells which items are already finished, appends
one manifest line per item as it completes, and at the end rewrites the manifest compactly (last
record per id) and stamps ``vpipe.json`` with the end time and the counts. The per-item loop
over a run (workers, progress, error lines, the summary) is :mod:`pipeline.runner`; the folder's
lock is :mod:`pipeline.lock`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.errors import ParamsChanged, UsageError, quote_path
from pipeline.files import (
    append_bytes,
    atomic_write_text,
    check_out_dir,
    clean_temp_files,
    output_bytes,
)
from pipeline.lock import FolderLock

MANIFEST = "manifest.jsonl"
RUN_INFO = "vpipe.json"
OK, SKIPPED, FAILED = "ok", "skipped", "failed"
# A manifest line with this status withdraws an earlier record of the same id: written when an
# item is redone and no longer produces that id (e.g. a failed source that now yields clips).
SUPERSEDED = "superseded"
# On each record of a work item that wrote several: how many. A crash can tear the last
# manifest line; the item whose records no longer all survive is then not finished.
ITEM_RECORDS = "item_records"
# On each ok record of a stage that writes files: their sizes, {path under OUT: bytes} (a folder:
# the total of the files in it). A resume redoes an item whose outputs are gone or changed size.
OUTPUT_BYTES = "output_bytes"
# On each record: a digest of the parameters it was made with. Should vpipe.json be lost, the
# records alone still tell a resume with the same parameters from a run with others.
PARAMS_DIGEST = "params_digest"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- manifests


def read_manifest(folder: str | os.PathLike, *, warn: bool = True) -> dict[str, dict]:
    """Last record per id from ``folder/manifest.jsonl``.

    A line cut short by a crash (valid JSON up to where it stops) is ignored: its item is
    simply redone. A line that is damaged anywhere else, or that is JSON but no record, is
    ignored too, but said on stderr with its line number (``warn``): its item is redone or, in
    the next stage, missing, and nobody should learn that from a count.
    """
    path = Path(folder) / MANIFEST
    records: dict[str, dict] = {}
    if not path.exists():
        return records
    with path.open(encoding="utf-8", errors="surrogateescape") as f:
        for n, line in enumerate(f, start=1):
            if not line.endswith("\n"):
                break  # the last line, cut off by a kill before its end: redone, nothing to say
            if not line.strip():
                continue
            rec, why = _parse_record(line)
            if rec is None:
                if warn:
                    print(f"vpipe: {quote_path(path)} line {n}: {why}; ignored (its item is "
                          "redone, or missing from the next stage)", file=sys.stderr)
                continue
            if rec.get("status") == SUPERSEDED:
                records.pop(rec["id"], None)
                continue
            records[rec["id"]] = rec
    return records


def _parse_record(line: str) -> tuple[dict | None, str]:
    """A whole manifest line as a record, or ``None`` and why it is not one."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"damaged record ({_json_msg(e)} at column {e.colno})"
    if not isinstance(rec, dict) or not isinstance(rec.get("id"), str):
        return None, "not a record (no id)"
    return rec, ""


def ok_records(folder: str | os.PathLike) -> list[dict]:
    """The items a previous stage finished, in manifest order."""
    return [r for r in read_manifest(folder).values() if r.get("status") == OK]


# --------------------------------------------------------------------------- output sizes


def changed_output(out_dir: Path, rec: dict) -> str | None:
    """The first output ``rec`` records that is gone or has another size now, as a message;
    ``None`` when all are as written (records without sizes have nothing to check)."""
    for rel, size in (rec.get(OUTPUT_BYTES) or {}).items():
        now = output_bytes(out_dir, rel)
        if now is None:
            return f"{out_dir / rel}: recorded output is missing"
        if now != size:
            return f"{out_dir / rel}: recorded output changed ({size} bytes written, {now} now)"
    return None


def first_changed_output(folder: str | os.PathLike) -> str | None:
    """Over a whole finished folder: the first ok record whose outputs are gone or changed."""
    out_dir = Path(folder)
    for rec in read_manifest(out_dir).values():
        if rec.get("status") == OK and (msg := changed_output(out_dir, rec)):
            return msg
    return None


# --------------------------------------------------------------------------- vpipe.json


class DamagedRecord(UsageError):
    """A record vpipe wrote (``vpipe.json``, a run's ``config.json``) that does not read as
    one: cut off, edited, garbled."""


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in ``path``; ``None`` when there is no such file; a damaged file is
    :class:`DamagedRecord` naming it and where it stops making sense."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise DamagedRecord(f"{quote_path(path)}: a folder, not a vpipe record") from None
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise damaged(path, f"not UTF-8 at byte {e.start}") from None
    except json.JSONDecodeError as e:
        cut = ", the end of the file: cut off" if e.pos >= len(e.doc.rstrip()) else ""
        raise damaged(path, f"{_json_msg(e)} at line {e.lineno} column {e.colno}{cut}") from None
    if value is None:  # no record vpipe writes is a bare null
        raise damaged(path, "null")
    return value


def damaged(path: str | os.PathLike, why: str) -> DamagedRecord:
    """The one-line error of a damaged record: the file, what is wrong, what to do."""
    return DamagedRecord(f"{quote_path(path)}: damaged ({why}); restore it, or use --overwrite "
                         "to redo the folder")


def _json_msg(e: json.JSONDecodeError) -> str:
    """The JSON parser's message without its dangling "at" ("Unterminated string starting at")."""
    return e.msg.removesuffix(" at")


def read_run_info(folder: str | os.PathLike) -> dict | None:
    """``folder/vpipe.json`` as a dict; ``None`` when there is none (:func:`read_json`)."""
    path = Path(folder) / RUN_INFO
    info = read_json(path)
    if info is None:
        return None
    if not isinstance(info, dict):
        raise damaged(path, "not a JSON object")
    for key, kind in (("stage", str), ("params", dict), ("command", list), ("counts", dict)):
        if info.get(key) is not None and not isinstance(info[key], kind):
            raise damaged(path, f"its {key!r} is not a {kind.__name__}")
    return info


def params_digest(params: dict) -> str:
    """16 hex digits that differ when the (canonical) parameters do."""
    text = json.dumps(params, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def base_versions() -> dict[str, str]:
    return {"vpipe": __version__, "python": platform.python_version()}


WORKFLOW_ENV = "VPIPE_WORKFLOW"  # set by `vpipe run` around each stage: the workflow's name


def write_run_info(folder: Path, stage: str, fields: dict, versions: dict[str, str]) -> None:
    """Update ``folder/vpipe.json`` with ``fields``: the one writer of every stage's record
    (the item stages through :class:`Run`, ``vpipe train`` directly), so all share a layout."""
    try:
        before = read_run_info(folder) or {}
    except DamagedRecord:  # replaced whole: only a run given --overwrite gets this far
        before = {}
    info = {
        **before,
        "stage": stage,
        **fields,
        "versions": {**base_versions(), **versions},
        "command": sys.argv,
        # Where it ran: the command's relative paths are relative to it (vpipe predict
        # re-runs a feature folder's recorded stages on new videos from anywhere).
        "cwd": os.getcwd(),
    }
    info.pop("workflow", None)  # which workflow ran it, when `vpipe run` did (WORKFLOW_ENV)
    if os.environ.get(WORKFLOW_ENV):
        info["workflow"] = os.environ[WORKFLOW_ENV]
    atomic_write_text(folder / RUN_INFO, json.dumps(info, indent=2, default=str) + "\n")


def canonical(params: dict) -> dict:
    """Parameters as they read back from JSON (tuples as lists, paths as strings)."""
    return json.loads(json.dumps(params, default=str))


@dataclass
class Run:
    """One stage run on one output folder: parameters check, resume state, manifest lines."""

    out_dir: Path
    stage: str
    params: dict[str, Any]
    overwrite: bool = False
    versions: dict[str, str] = field(default_factory=dict)
    # The files an ok record's item wrote, as paths under out_dir: their sizes are recorded,
    # and a resume checks them (existence and size) before calling the item finished.
    outputs: Callable[[dict], Iterable[str]] | None = None
    # What the stage reads: an output folder that is, holds or sits in one of them is refused.
    inputs: Sequence[str | os.PathLike] = ()
    previous: dict[str, dict] = field(default_factory=dict, init=False)
    started: float = field(default=0.0, init=False)
    _lock: FolderLock | None = field(default=None, init=False, repr=False)
    # work item id -> ids of its records: resume checks stay O(1) per item at any size.
    _by_item: dict[str, list[str]] = field(default_factory=dict, init=False)
    # Records of forgotten items, kept in the compacted manifest unless the item is redone.
    _forgotten: dict[str, dict] = field(default_factory=dict, init=False)
    _digest: str = field(default="", init=False, repr=False)
    # Set by open() when --overwrite set aside what the folder held (other parameters, a lost
    # or damaged vpipe.json): the stage then removes its outputs that records do not list.
    reset: bool = field(default=False, init=False)
    # Said of the run in vpipe.json when it closes, beside the counts (e.g. the engine it ran on).
    extra: dict[str, Any] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)

    def open(self) -> Run:
        """Create the folder, check parameters, load the previous manifest, write vpipe.json."""
        check_out_dir(self.out_dir, self.inputs)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # Before anything is read or cleaned: a second copy must not touch the first's files.
        self._lock = FolderLock(self.out_dir)
        try:
            self._load()
        except BaseException:
            self._lock.release()
            self._lock = None
            raise
        return self

    def _load(self) -> None:
        params = canonical(self.params)
        self._digest = params_digest(params)
        if why := self._made_otherwise(params):
            if not self.overwrite:
                raise ParamsChanged(f"{self.out_dir}: {why}; use --overwrite to redo it, "
                                    "or choose another --out")
            (self.out_dir / MANIFEST).unlink(missing_ok=True)
            self.reset = True
        clean_temp_files(self.out_dir)
        _drop_torn_line(self.out_dir / MANIFEST)
        self.previous = read_manifest(self.out_dir)
        self._by_item = {}
        for rec in self.previous.values():
            self._by_item.setdefault(rec.get("item", rec["id"]), []).append(rec["id"])
        self.started = time.time()
        write_run_info(
            self.out_dir,
            self.stage,
            # An earlier run's interruption or error is not this one's.
            {"started": now_iso(), "ended": None, "interrupted": None, "error": None,
             "params": params},
            self.versions,
        )

    def _made_otherwise(self, params: dict) -> str | None:
        """Why the folder's records were not made by this stage with ``params``, or ``None``.

        ``vpipe.json`` says so; without it (deleted, or damaged and --overwrite given) the
        records' own parameter digests do: the same parameters resume, others are refused.
        """
        try:
            info = read_run_info(self.out_dir)
        except DamagedRecord:
            if not self.overwrite:
                raise
            return "a damaged vpipe.json"
        if info is not None:
            old = info.get("params", {})
            if info.get("stage") != self.stage or old != params:
                return (f"made by `vpipe {info.get('stage')}` with other parameters "
                        f"({_diff(old, params)})")
            return None
        records = read_manifest(self.out_dir, warn=False).values()
        digests = {r.get(PARAMS_DIGEST) for r in records}
        if not records or digests == {self._digest}:
            return None
        what = "other" if digests - {None} else "unrecorded"
        return (f"{RUN_INFO} is missing, and {len(records)} record(s) of {MANIFEST} were made "
                f"with {what} parameters")

    # -- resume -------------------------------------------------------------------------------

    def previous_records(self, item_id: str) -> list[dict]:
        return [self.previous[i] for i in self._by_item.get(item_id, ()) if i in self.previous]

    def finished(self, item_id: str) -> bool:
        """True when every record of this work item is ok or skipped (failed ones are redone),
        all of them survived, and the files they name are still there as written."""
        recs = self.previous_records(item_id)
        whole = all(r.get(ITEM_RECORDS, len(recs)) == len(recs) for r in recs)
        if not (recs and whole and all(r["status"] in (OK, SKIPPED) for r in recs)):
            return False
        return self.changed_outputs(item_id) is None

    def changed_outputs(self, item_id: str) -> str | None:
        """Why a recorded item's outputs cannot be trusted (one gone or resized), or ``None``."""
        for rec in self.previous_records(item_id):
            if rec["status"] == OK and (msg := changed_output(self.out_dir, rec)):
                return msg
        return None

    def forget(self, item_id: str) -> None:
        """Treat a work item as never done (its inputs changed since it was recorded)."""
        for i in self._by_item.pop(item_id, ()):
            if i in self.previous:
                self._forgotten[i] = self.previous.pop(i)

    # -- recording ----------------------------------------------------------------------------

    def record(self, rec: dict) -> dict:
        """Append one manifest line; returns the record as written."""
        return self._append([rec])[0]

    def record_item(self, item_id: str, recs: Sequence[dict]) -> list[dict]:
        """Record all outcomes of one work item in a single append, replacing its old records.

        One write keeps an item's records together; each carries their count, so a torn last
        line (2 of 3 clips left) is not finished. Ids the item no longer produces are withdrawn.
        """
        if len(recs) > 1:
            recs = [{**r, "item": r.get("item", item_id), ITEM_RECORDS: len(recs)} for r in recs]
        if self.outputs is not None:
            recs = [self._with_sizes(r) for r in recs]
        new_ids = {r["id"] for r in recs}
        stale = [
            {"id": r["id"], "item": item_id, "status": SUPERSEDED}
            for r in self.previous_records(item_id)
            if r["id"] not in new_ids
        ]
        for t in stale:
            self.previous.pop(t["id"], None)
        return self._append(list(recs), withdrawn=stale)

    def _with_sizes(self, rec: dict) -> dict:
        if rec.get("status", OK) != OK:
            return rec
        sizes = {rel: output_bytes(self.out_dir, rel) for rel in self.outputs(rec)}
        return {**rec, OUTPUT_BYTES: {k: v for k, v in sizes.items() if v is not None}}

    def _append(self, recs: list[dict], withdrawn: Sequence[dict] = ()) -> list[dict]:
        recs = [
            {"id": r["id"], "status": r.get("status", OK), "error": r.get("error"), **r,
             PARAMS_DIGEST: self._digest}
            for r in recs
        ]
        text = "".join(manifest_line(r) + "\n" for r in [*withdrawn, *recs])
        # One O_APPEND write (continued if the disk makes it short): a kill leaves the group
        # whole or (at worst) a torn last line, which read_manifest ignores.
        append_bytes(self.out_dir / MANIFEST, text.encode("utf-8"))
        for rec in recs:
            self.previous[rec["id"]] = json.loads(json.dumps(rec, default=_json_default))
            ids = self._by_item.setdefault(rec.get("item", rec["id"]), [])
            if rec["id"] not in ids:
                ids.append(rec["id"])
        return recs

    def close(self, counts: dict[str, Any] | None = None, item_order: Iterable[str] = (), *,
              stopped_by: BaseException | None = None) -> None:
        """Rewrite the manifest compactly (one line per id, ``item_order`` first) and stamp the
        end time and the ``counts`` (a ``Summary``'s) into vpipe.json.

        A run that ``stopped_by`` an exception is not finished: ``ended`` stays empty, and
        vpipe.json says ``interrupted`` (Ctrl-C) or the ``error``, so that neither a resume
        nor `vpipe run` takes the folder for complete.
        """
        # What the file holds, kept in memory as it was read and appended: not read again.
        recs = {**{i: r for i, r in self._forgotten.items() if i not in self.previous},
                **self.previous}
        order = list(dict.fromkeys([*item_order, *recs]))
        lines = [manifest_line(recs[i]) for i in order if i in recs]
        try:
            # What a worker killed mid-write left (a Ray task retried elsewhere): nothing of
            # this run is still writing now.
            clean_temp_files(self.out_dir)
            atomic_write_text(self.out_dir / MANIFEST, "".join(x + "\n" for x in lines))
            fields: dict[str, Any] = {"ended": now_iso(), **self.extra}
            if isinstance(stopped_by, KeyboardInterrupt):
                fields.update(ended=None, interrupted=now_iso())
            elif stopped_by is not None:
                fields.update(ended=None, error=f"{type(stopped_by).__name__}: {stopped_by}")
            if counts is not None:
                fields["counts"] = counts
            write_run_info(self.out_dir, self.stage, fields, self.versions)
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Let go of the folder without stamping it as ended (a run a full disk stopped): its
        records stay as appended, and the next run resumes from them."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None


_SURROGATE = re.compile("[\ud800-\udfff]")


def manifest_line(rec: dict) -> str:
    """One record as a JSON line that is valid UTF-8 whatever the file names in it.

    A file name that is not UTF-8 reaches Python with its bytes as lone surrogates, which
    UTF-8 cannot encode; written as ``\\udcXX`` escapes they read back as the same string,
    so the path still opens, while other non-ASCII names stay readable as they are.
    """
    text = json.dumps(rec, ensure_ascii=False, default=_json_default)
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _drop_torn_line(path: Path) -> None:
    """Cut off a last line that a kill left without its end, so that every later line is
    whole and a damaged line in the middle of a manifest can only be damage (and is said)."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        size = f.seek(0, os.SEEK_END)
        start = max(0, size - (1 << 20))
        while True:
            f.seek(start)
            tail = f.read(size - start)
            cut = tail.rfind(b"\n")
            if cut >= 0 or start == 0:
                f.truncate(start + cut + 1)
                return
            start = max(0, start - (1 << 20))


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def changed_params(old: dict, new: dict, may_differ: Iterable[str] = ()) -> list[str]:
    """The parameters whose values differ between ``old`` and ``new`` (sorted), leaving out
    ``may_differ``: the one comparison behind every refusal of changed parameters (a stage's
    folder here, a train run's options in ``train.runs``)."""
    skip = set(may_differ)
    return [k for k in sorted(set(old) | set(new)) if k not in skip and old.get(k) != new.get(k)]


def describe_changes(old: dict, new: dict, keys: Sequence[str]) -> str:
    """``keys``' changes as a refusal shows them, the first four: ``count: 3 -> 2; ...``."""
    return "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:4])


def _diff(old: dict, new: dict) -> str:
    return describe_changes(old, new, changed_params(old, new)) or "stage differs"
