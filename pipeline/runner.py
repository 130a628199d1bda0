"""The item runner every stage shares: resume, per-item records, error lines, the summary.

A stage's work is a list of :class:`Item`. :class:`Tracker` is the bookkeeping around them on a
:class:`~pipeline.records.Run`: which items a previous run finished, one manifest append per
item with its error line on stderr, the counts, the progress bar and the summary line.
:func:`run_items` is the common loop over it, ``work(item)`` on an engine
(:mod:`pipeline.engine`: worker processes or Ray tasks); ``vpipe features``, whose items are
encoded in batches that mix clips, drives a Tracker itself.

An item's failure is recorded and the batch goes on, except for a full disk
(:class:`~pipeline.errors.DiskFull`): every later item would fail the same way, so it stops the
stage, leaving the folder as a kill would (finished items recorded, ``vpipe.json`` not stamped
as ended) for the same command to complete once there is space.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import Skip, VpipeError, one_line, plural, quote_path
from pipeline.files import disk_full, writing
from pipeline.records import FAILED, MANIFEST, OK, SKIPPED, Run


@dataclass
class Summary:
    """What one run of a stage did, for its summary line and ``vpipe.json``'s counts."""

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
    note: str = ""  # a stage's own count, after the others ("2 clip(s) without a title")
    interrupted: bool = False  # Ctrl-C ended it: what is done stays, nothing counts as finished

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def line(self) -> str:
        done = f"{self.done} done"
        if self.units is not None:
            item, out = self.units
            done = f"{plural(self.done, item)} done ({plural(self.outputs or 0, out)})"
        line = (
            f"vpipe {self.stage}: {'interrupted after ' if self.interrupted else ''}{done}, "
            f"{self.resumed} already done, {self.skipped} skipped, {self.failed} failed in "
            f"{self.seconds:.1f}s"
        ) + (f"; {self.note}" if self.note else "")
        return line + ("; the same command resumes" if self.interrupted else "")

    def counts(self) -> dict[str, Any]:
        return {
            "done": self.done,
            "already_done": self.resumed,
            "skipped": self.skipped,
            "failed": self.failed,
            **({} if self.units is None else {"outputs": self.outputs, "units": self.units}),
        }



def usable_cores() -> int:
    """The cores this process may run on (its affinity: a container's or `taskset`'s share,
    not the machine's count), the one count every default in vpipe starts from."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_workers(reserved_cores: int = 0) -> int:
    """Worker processes for CPU work: the usable cores (up to 4) less ``reserved_cores`` (e.g.
    the one left to a model's own threads), at least 1."""
    return max(1, min(4, usable_cores() - reserved_cores))


@dataclass(frozen=True)
class Item:
    """One unit of work: ``id`` is its resume key, ``input`` the path messages name it by."""

    id: str
    input: str
    data: Any = None


def progress(iterable=None, *, total: int | None = None, desc: str = "", quiet: bool = False,
             unit: str = "item"):
    """A tqdm bar on a terminal; silent when stderr is not a TTY or ``quiet``."""
    from tqdm import tqdm

    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        disable=quiet or not sys.stderr.isatty(),
        dynamic_ncols=True,
        leave=False,
    )


def report_error(stage: str, where: str, message: str) -> None:
    """The one-line stderr message of a failed or skipped item."""
    # Media errors already name their file; do not print the path twice.
    text = message if message.startswith(where) else f"{where}: {message}"
    if where and quote_path(where) != where:  # a name holding a newline: quoted, kept one line
        text = text.replace(where, quote_path(where))
    print(f"vpipe {stage}: {one_line(text)}", file=sys.stderr)


class Tracker:
    """Resume decisions, records, error lines and counts for the items of one :class:`Run`.

    ``units`` (e.g. ``("videos", "clips")``): an item yields several outputs, and the summary
    counts items plus their ok records. ``total``/``unit`` size the progress bar when it counts
    something other than items (frames).
    """

    def __init__(self, run: Run, *, quiet: bool = False, units: tuple[str, str] | None = None,
                 total: int | None = None, unit: str = "item") -> None:
        self.run, self.quiet = run, quiet
        self.summary = Summary(run.stage, outputs=0 if units else None, units=units)
        self._bar: Any = None
        self._total, self._unit = total, unit

    def pending(self, items: Iterable[Item],
                finished: Callable[[Item], bool] | None = None) -> list[Item]:
        """The items still to do; the others are counted as already done."""
        done = finished or (lambda it: self.run.finished(it.id))
        todo = []
        for it in items:
            if done(it):
                self.summary.resumed += 1
                continue
            if finished is None and (why := self.run.changed_outputs(it.id)):
                print(f"vpipe {self.run.stage}: {why}; redoing {it.id}", file=sys.stderr)
            todo.append(it)
        return todo

    def start(self, total: int | None = None) -> None:
        """Show the progress bar (``total`` defaults to the items given to :meth:`pending`)."""
        self._bar = progress(total=total if total is not None else self._total,
                             desc=self.run.stage, quiet=self.quiet, unit=self._unit)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def record(self, item: Item, recs: Sequence[dict]) -> list[dict]:
        """Record all outcomes of ``item`` in one append, say its errors, count it."""
        recs = [{"input": item.input, **r} for r in recs]
        with writing(self.run.out_dir / MANIFEST):
            written = self.run.record_item(item.id, recs)
        statuses = {r["status"] for r in written}
        if FAILED in statuses:
            self.summary.failed += 1
        elif statuses == {SKIPPED}:
            self.summary.skipped += 1
        else:
            self.summary.done += 1
        if self.summary.outputs is not None:
            self.summary.outputs += sum(r["status"] == OK for r in written)
        for r in written:
            if r["status"] != OK and r.get("error"):
                report_error(self.run.stage, item.input, r["error"])
        return written

    def close(self, item_order: Iterable[str] = ()) -> Summary:
        """Compact the manifest, stamp vpipe.json, print the summary line."""
        if self._bar is not None:
            self._bar.close()
        self.summary.seconds = time.time() - self.run.started
        self.run.close(self.summary.counts(), item_order)
        if not self.quiet:
            print(self.summary.line(), file=sys.stderr)
        return self.summary

    def interrupt(self, item_order: Iterable[str], e: BaseException) -> None:
        """End a run that ``e`` (Ctrl-C, or an unexpected error) cut short: what it finished
        stays recorded, the manifest compacted, and vpipe.json says why it did not end. A
        Ctrl-C gets its one line here, the counts so far (the CLI then exits 130)."""
        if self._bar is not None:
            self._bar.close()
        self.summary.interrupted = isinstance(e, KeyboardInterrupt)
        self.summary.seconds = time.time() - self.run.started
        self.run.close(self.summary.counts(), item_order, stopped_by=e)
        if self.summary.interrupted:
            print(self.summary.line(), file=sys.stderr)
            e.vpipe_said = True  # type: ignore[attr-defined]  # the CLI adds no second line

    def stop(self) -> None:
        """End a run that a full disk stopped, as a kill would: the finished items stay
        recorded, vpipe.json is not stamped as ended (so nothing takes the folder for
        complete) and no summary line follows the error."""
        if self._bar is not None:
            self._bar.close()
        self.run.abandon()


def records_of(work: Callable[[Item], list[dict] | dict], item: Item) -> list[dict]:
    """Run ``work`` and turn its result or exception into manifest records; a full disk is
    raised as :class:`~pipeline.errors.DiskFull` instead, as it stops the stage."""
    try:
        out = work(item)
        recs = out if isinstance(out, list) else [out]
        for r in recs:
            r.setdefault("id", item.id)
            r.setdefault("status", OK)
            r.setdefault("item", item.id)
        return recs
    except Exception as e:
        full = disk_full(e)
        if full is not None:
            raise full from None
        return [failure_record(item.id, e)]


def failure_record(item_id: str, e: BaseException) -> dict:
    """The record of an item whose work raised ``e``: skipped for ``Skip``, else failed."""
    if isinstance(e, Skip):
        return {"id": item_id, "item": item_id, "status": SKIPPED, "error": str(e)}
    if isinstance(e, VpipeError):
        return {"id": item_id, "item": item_id, "status": FAILED, "error": str(e)}
    # An unexpected bug must not stop the batch; keep the gist of the trace.
    tb = traceback.format_exception_only(type(e), e)[-1].strip()
    msg = f"unexpected {type(e).__name__}: {e}" if str(e) else tb
    return {"id": item_id, "item": item_id, "status": FAILED, "error": msg}


def run_items(
    run: Run,
    items: Sequence[Item],
    work: Callable[[Item], list[dict] | dict],
    *,
    workers: int = 1,
    quiet: bool = False,
    units: tuple[str, str] | None = None,
    engine: Any = None,
) -> Summary:
    """Do ``work`` for every item not finished before, on ``engine`` (default: this machine,
    ``workers`` processes); record each as it finishes.

    ``work`` must be picklable (a module-level function or a functools.partial of one) when
    ``workers > 1`` or on Ray. It returns the item's manifest record(s) or raises
    ``Skip``/``VpipeError``.
    """
    from pipeline.engine import LocalEngine

    engine = engine or LocalEngine(workers)
    tracker = Tracker(run, quiet=quiet, units=units)
    todo = tracker.pending(items)
    tracker.start(total=len(todo))
    try:
        if todo:  # nothing to do: no probe of the cluster
            engine.start(run.out_dir, [Path(todo[0].input)])
            run.extra["engine"] = engine.describe()
        for it, recs in engine.results(functools.partial(records_of, work), todo):
            tracker.record(it, recs)
            tracker.advance()
    except BaseException as e:
        end_run(tracker, e, lambda: [i for it in items for i in _ids_of(run, it)])
        raise
    return tracker.close([i for it in items for i in _ids_of(run, it)])


def end_run(tracker: Tracker, e: BaseException, item_order: Callable[[], list[str]]) -> None:
    """After ``e`` ended a stage's loop early: stop the run on a full disk, else record it as
    interrupted; either way it does not count as finished."""
    if disk_full(e) is not None:
        tracker.stop()
    else:
        with sigint_held():  # a second Ctrl-C waits until the first one is recorded
            tracker.interrupt(item_order(), e)


@contextlib.contextmanager
def sigint_held() -> Iterator[None]:
    """Run the block with Ctrl-C ignored (in the main thread; elsewhere no signal comes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def _ids_of(run: Run, item: Item) -> list[str]:
    return [r["id"] for r in run.previous_records(item.id)] or [item.id]
