"""Run records shared by every stage: manifest.jsonl, vpipe.json, resume, atomic writes.

A stage opens a :class:`Run` on its output folder. The run refuses parameters that differ from
the ones recorded there (unless ``overwrite``), tells which items are already finished, appends
one manifest line per item as it completes, and at the end rewrites the manifest compactly (last
record per id) and prints a one-line summary. :func:`run_items` adds the per-item loop with
worker processes, a progress bar and the error handling, so a stage only writes ``work(item)``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import sys
import threading
import time
import traceback
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.errors import ParamsChanged, Skip, VpipeError

MANIFEST = "manifest.jsonl"
RUN_INFO = "vpipe.json"
OK, SKIPPED, FAILED = "ok", "skipped", "failed"
# A manifest line with this status withdraws an earlier record of the same id: written when an
# item is redone and no longer produces that id (e.g. a failed source that now yields clips).
SUPERSEDED = "superseded"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- atomic writes


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
    _remove(tmp)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def clean_temp_files(folder: Path) -> None:
    """Remove leftovers of interrupted writes (``.name.tmp-PID``) under ``folder``."""
    for p in folder.rglob(".*.tmp-*"):
        _remove(p)


# --------------------------------------------------------------------------- ids


def sanitize_id(stem: str) -> str:
    """A file-system and HDF5 friendly id from a file stem (unicode letters kept, NFC)."""
    s = unicodedata.normalize("NFC", stem).strip()
    s = re.sub(r"[^\w.-]+", "-", s, flags=re.UNICODE).strip("-.")
    return s or "video"


def unique_ids(paths: Sequence[Path]) -> list[str]:
    """Sanitized stems, made unique (``name``, ``name-2``…) in input order."""
    used: set[str] = set()
    out = []
    for p in paths:
        base = cand = sanitize_id(Path(p).stem)
        n = 1
        while cand in used:
            n += 1
            cand = f"{base}-{n}"
        used.add(cand)
        out.append(cand)
    return out


# --------------------------------------------------------------------------- manifests


def read_manifest(folder: str | os.PathLike) -> dict[str, dict]:
    """Last record per id from ``folder/manifest.jsonl`` (a torn last line is ignored)."""
    path = Path(folder) / MANIFEST
    records: dict[str, dict] = {}
    if not path.exists():
        return records
    with path.open(encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash: that item is simply redone
            if rec.get("status") == SUPERSEDED:
                records.pop(rec["id"], None)
                continue
            records[rec["id"]] = rec
    return records


def ok_records(folder: str | os.PathLike) -> list[dict]:
    """The items a previous stage finished, in manifest order."""
    return [r for r in read_manifest(folder).values() if r.get("status") == OK]


def read_run_info(folder: str | os.PathLike) -> dict | None:
    path = Path(folder) / RUN_INFO
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def base_versions() -> dict[str, str]:
    return {"vpipe": __version__, "python": platform.python_version()}


@dataclass
class Summary:
    stage: str
    done: int = 0
    resumed: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    # Where one work item yields several outputs (a video → its clips), the counts above are
    # items and ``outputs`` counts the ok records, named by ``units`` ("videos", "clips").
    outputs: int | None = None
    units: tuple[str, str] | None = None

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def line(self) -> str:
        done = f"{self.done} done"
        if self.units is not None:
            item, out = self.units
            done = f"{self.done} {item} done ({self.outputs} {out})"
        return (
            f"vpipe {self.stage}: {done}, {self.resumed} already done, "
            f"{self.skipped} skipped, {self.failed} failed in {self.seconds:.1f}s"
        )


@dataclass
class Run:
    """One stage run on one output folder: parameters check, resume state, manifest lines."""

    out_dir: Path
    stage: str
    params: dict[str, Any]
    overwrite: bool = False
    versions: dict[str, str] = field(default_factory=dict)
    previous: dict[str, dict] = field(default_factory=dict, init=False)
    summary: Summary = field(init=False)
    _started: float = field(default=0.0, init=False)
    _order: list[str] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.summary = Summary(self.stage)

    def open(self) -> Run:
        """Create the folder, check parameters, load the previous manifest, write vpipe.json."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        params = json.loads(json.dumps(self.params, default=str))  # canonical JSON types
        info = read_run_info(self.out_dir)
        if info is not None:
            old = info.get("params", {})
            if info.get("stage") != self.stage or old != params:
                if not self.overwrite:
                    raise ParamsChanged(
                        f"{self.out_dir}: made by `vpipe {info.get('stage')}` with other "
                        f"parameters ({_diff(old, params)}); use --overwrite to redo it, "
                        "or choose another --out"
                    )
                (self.out_dir / MANIFEST).unlink(missing_ok=True)
        clean_temp_files(self.out_dir)
        _end_torn_line(self.out_dir / MANIFEST)
        self.previous = read_manifest(self.out_dir)
        self._started = time.time()
        self._write_info({"started": now_iso(), "ended": None, "params": params})
        return self

    def _write_info(self, fields: dict) -> None:
        info = {
            "stage": self.stage,
            **fields,
            "versions": {**base_versions(), **self.versions},
            "command": sys.argv,
        }
        old = read_run_info(self.out_dir) or {}
        info = {**old, **info}
        atomic_write_text(self.out_dir / RUN_INFO, json.dumps(info, indent=2) + "\n")

    # -- resume -------------------------------------------------------------------------------

    def finished(self, item_id: str) -> bool:
        """True when every record of this work item is ok or skipped (failed ones are redone)."""
        recs = [r for r in self.previous.values() if r.get("item", r["id"]) == item_id]
        return bool(recs) and all(r["status"] in (OK, SKIPPED) for r in recs)

    def previous_records(self, item_id: str) -> list[dict]:
        return [r for r in self.previous.values() if r.get("item", r["id"]) == item_id]

    # -- recording ----------------------------------------------------------------------------

    def record(self, rec: dict) -> None:
        """Append one manifest line (already-written outputs are renamed into place first)."""
        self._append([rec])

    def record_item(self, item_id: str, recs: Sequence[dict]) -> None:
        """Record all outcomes of one work item in a single append, replacing its old records.

        One write keeps an item's records together (a crash cannot leave 2 of its 3 clips
        recorded, which would look finished); ids the item no longer produces are withdrawn.
        """
        new_ids = {r["id"] for r in recs}
        stale = [
            {"id": r["id"], "item": item_id, "status": SUPERSEDED}
            for r in self.previous_records(item_id)
            if r["id"] not in new_ids
        ]
        for t in stale:
            self.previous.pop(t["id"], None)
        self._append(list(recs), withdrawn=stale)

    def _append(self, recs: list[dict], withdrawn: Sequence[dict] = ()) -> None:
        recs = [
            {"id": r["id"], "status": r.get("status", OK), "error": r.get("error"), **r}
            for r in recs
        ]
        text = "".join(
            json.dumps(r, ensure_ascii=False, default=_json_default) + "\n"
            for r in [*withdrawn, *recs]
        )
        # One unbuffered O_APPEND write: a kill leaves the group whole or (at worst) a torn
        # last line, which read_manifest ignores.
        with (self.out_dir / MANIFEST).open("ab", buffering=0) as f:
            f.write(text.encode("utf-8"))
        for rec in recs:
            self.previous[rec["id"]] = json.loads(json.dumps(rec, default=_json_default))
            self._order.append(rec["id"])
            status = rec["status"]
            if status == OK:
                self.summary.done += 1
            elif status == SKIPPED:
                self.summary.skipped += 1
            else:
                self.summary.failed += 1

    def close(self, item_order: Iterable[str] | None = None) -> Summary:
        """Rewrite the manifest compactly (one line per id) and stamp the end time."""
        recs = read_manifest(self.out_dir)
        order = list(dict.fromkeys([*(item_order or []), *recs]))
        lines = [json.dumps(recs[i], ensure_ascii=False) for i in order if i in recs]
        atomic_write_text(self.out_dir / MANIFEST, "".join(x + "\n" for x in lines))
        self.summary.seconds = time.time() - self._started
        s = self.summary
        self._write_info(
            {
                "ended": now_iso(),
                "counts": {
                    "done": s.done,
                    "already_done": s.resumed,
                    "skipped": s.skipped,
                    "failed": s.failed,
                    **({} if s.units is None else {"outputs": s.outputs, "units": s.units}),
                },
            }
        )
        return self.summary


def _end_torn_line(path: Path) -> None:
    """Terminate a line cut by a crash, so the next record does not join (and spoil) it."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
            f.write(b"\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def _diff(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    parts = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    return "; ".join(parts[:4]) or "stage differs"


# --------------------------------------------------------------------------- the item loop


@dataclass(frozen=True)
class Item:
    """One unit of work: ``id`` is its resume key, ``label`` names it in messages (a path)."""

    id: str
    label: str
    data: Any = None


def progress(iterable=None, *, total: int | None = None, desc: str = "", quiet: bool = False):
    """A tqdm bar on a terminal; silent when stderr is not a TTY or ``quiet``."""
    from tqdm import tqdm

    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit="item",
        disable=quiet or not sys.stderr.isatty(),
        dynamic_ncols=True,
        leave=False,
    )


def report_error(stage: str, label: str, message: str) -> None:
    # Media errors already name their file; do not print the path twice.
    where = "" if message.startswith(label) else f"{label}: "
    print(f"vpipe {stage}: {where}{message}", file=sys.stderr)


def _call(work: Callable[[Item], list[dict] | dict], item: Item) -> list[dict]:
    """Run ``work`` and turn its outcome into manifest records (never raises)."""
    try:
        out = work(item)
        recs = out if isinstance(out, list) else [out]
        for r in recs:
            r.setdefault("id", item.id)
            r.setdefault("status", OK)
            r.setdefault("item", item.id)
        return recs
    except Skip as e:
        return [{"id": item.id, "item": item.id, "status": SKIPPED, "error": str(e)}]
    except VpipeError as e:
        return [{"id": item.id, "item": item.id, "status": FAILED, "error": str(e)}]
    except Exception as e:  # an unexpected bug must not stop the batch; keep the trace
        tb = traceback.format_exc(limit=3).strip().splitlines()[-1]
        msg = f"unexpected {type(e).__name__}: {e}" if str(e) else tb
        return [{"id": item.id, "item": item.id, "status": FAILED, "error": msg}]


def run_items(
    run: Run,
    items: Sequence[Item],
    work: Callable[[Item], list[dict] | dict],
    *,
    workers: int = 1,
    quiet: bool = False,
    units: tuple[str, str] | None = None,
) -> Summary:
    """Do ``work`` for every item not finished before, in ``workers`` processes; record each.

    ``work`` must be picklable (a module-level function or a functools.partial of one) when
    ``workers > 1``. It returns the item's manifest record(s) or raises ``Skip``/``VpipeError``.
    With ``units`` (e.g. ``("videos", "clips")``) the summary counts items, plus their outputs.
    """
    per_item = Summary(run.stage, outputs=0, units=units)
    todo = []
    for it in items:
        if run.finished(it.id):
            run.summary.resumed += 1
        else:
            todo.append(it)
    bar = progress(total=len(todo), desc=run.stage, quiet=quiet)

    def handle(it: Item, recs: list[dict]) -> None:
        for r in recs:
            r.setdefault("input", it.label)  # the path the item came from, as messages name it
        run.record_item(it.id, recs)
        statuses = {r["status"] for r in recs}
        if FAILED in statuses:
            per_item.failed += 1
        elif statuses == {SKIPPED}:
            per_item.skipped += 1
        else:
            per_item.done += 1
        per_item.outputs += sum(r["status"] == OK for r in recs)
        for r in recs:
            if r["status"] != OK and r.get("error"):
                report_error(run.stage, it.label, r["error"])
        bar.update(1)

    try:
        if workers <= 1 or len(todo) <= 1:
            for it in todo:
                handle(it, _call(work, it))
        else:
            with ProcessPoolExecutor(max_workers=workers, initializer=_end_with_parent) as pool:
                pending = {pool.submit(_call, work, it): it for it in todo}
                while pending:
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        handle(pending.pop(fut), fut.result())
    finally:
        bar.close()
        if units is not None:
            for name in ("done", "skipped", "failed", "outputs", "units"):
                setattr(run.summary, name, getattr(per_item, name))
        summary = run.close([r for it in items for r in _ids_of(run, it)])
    if not quiet:
        print(summary.line(), file=sys.stderr)
    return summary


def _end_with_parent(poll_s: float = 0.5) -> None:
    """In a pool worker: exit once the vpipe process that started it is gone.

    A parent ended by SIGKILL (``kill -9``, the OOM killer) cannot shut its pool down, and
    the workers would wait for work forever. A watchdog thread notices the new parent pid.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="vpipe-parent-watch", daemon=True).start()


def _ids_of(run: Run, item: Item) -> list[str]:
    return [r["id"] for r in run.previous_records(item.id)] or [item.id]


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))
