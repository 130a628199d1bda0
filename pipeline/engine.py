"""Where a stage's per-item work runs: this machine's processes, or a Ray cluster.

An engine takes the items still to do and a picklable ``call(item) -> records`` (the runner's
:func:`~pipeline.runner.records_of` around the stage's work, which turns a bad input into a failed
record instead of an exception) and yields ``(item, records)`` as items finish, in any order.
The driver alone writes the manifest from what is yielded, so resume, the refusal of changed
parameters and the summary are the same whatever the engine.

- :class:`LocalEngine`: in this process, or a process pool of ``workers``.
- :class:`RayEngine`: one Ray task per item, its CPU need declared, retried when its worker
  process or node dies (a crash, not a bad input: those come back as records and are not
  retried). Tasks write their outputs into the output folder, which every node must see:
  :meth:`RayEngine.start` checks that from each node before any work.

With no cluster named, :func:`connect` joins a ``ray start`` head on this machine or starts a
cluster for this process alone: no other run joins it, and it ends with this process however
that ends (a watchdog process ends what Ray leaves of it). A Ctrl-C stays a KeyboardInterrupt:
held while Ray starts or joins a cluster, ignored while it shuts down at exit; the Ray tasks
in flight end with the driver's job, not cancelled (the note under ``CONNECT_TIMEOUT_S``).

Ray is an optional dependency (``pip install 'vpipe[ray]'``), imported only by the Ray engine.
"""

from __future__ import annotations

import atexit
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from pipeline.errors import UsageError
from pipeline.records import FAILED

ENGINES = ("local", "ray")
# A task retried this many times after its worker died is recorded as failed, not retried more.
TASK_RETRIES = 3
PROBE_TIMEOUT_S = 120.0
CONNECT_TIMEOUT_S = 5.0

# No ray.cancel when the driver stops on an exception (a Ctrl-C): in Ray 2.60's core a cancel
# races the task's reply and then aborts the driver ("Tried to complete task that was not
# pending", ray-project/ray#54798): exit 1 in place of 130, twice in clean-clone CI runs, with
# and without force. The tasks in flight end with the driver's job instead: Ray kills a job's
# workers when its driver disconnects, and a local cluster ends with the driver. An item such a
# task finishes has no manifest record, so the same command does it again.


class LocalEngine:
    """Items in this process (``workers`` 1) or in a pool of worker processes."""

    name = "local"

    def __init__(self, workers: int = 1) -> None:
        self.workers = workers

    def start(self, out_dir: Path, inputs: Sequence[Path] = ()) -> None:
        """Nothing to check on one machine."""

    def results(self, call: Callable[[Any], list[dict]], items: Sequence[Any]
                ) -> Iterator[tuple[Any, list[dict]]]:
        if self.workers <= 1 or len(items) <= 1:
            for it in items:
                yield it, call(it)
            return
        with ProcessPoolExecutor(max_workers=self.workers, initializer=end_with_parent) as pool:
            pending = {pool.submit(call, it): it for it in items}
            try:
                while pending:
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        yield pending.pop(fut), fut.result()
            except BaseException:
                pool.shutdown(cancel_futures=True)  # the items in flight end as they may
                raise

    def describe(self) -> dict:
        return {"engine": "local", "workers": self.workers}


class RayEngine:
    """One Ray task per item on a Ray cluster (joined, or started here).

    ``address``: a cluster to join (``host:port``, ``auto``); None joins the one ``RAY_ADDRESS``
    or a ``ray start`` on this machine names, else starts a local one. ``max_in_flight`` caps
    the tasks submitted at once (default: twice the cluster's CPUs), so a million items are not
    a million pending tasks in the driver.
    """

    name = "ray"

    def __init__(self, address: str | None = None, *, cpus_per_task: float = 1.0,
                 max_in_flight: int | None = None, quiet: bool = False,
                 stage: str = "vpipe") -> None:
        self.address, self.cpus_per_task = address, cpus_per_task
        self.max_in_flight, self.quiet, self.stage = max_in_flight, quiet, stage
        self.ray: Any = None
        self.cluster: dict = {}

    def connect(self) -> None:
        """Join or start the cluster (the CLI does this before a stage opens its folder, so a
        cluster that cannot be reached leaves nothing behind)."""
        if self.ray is None:
            self.ray = connect(self.address, quiet=self.quiet, stage=self.stage)
            self.cluster = cluster_shape(self.ray)

    def start(self, out_dir: Path, inputs: Sequence[Path] = ()) -> None:
        """Join or start the cluster, then check every node sees ``out_dir`` and ``inputs``."""
        self.connect()
        check_shared_folder(self.ray, Path(out_dir), [Path(p) for p in inputs])

    def results(self, call: Callable[[Any], list[dict]], items: Sequence[Any]
                ) -> Iterator[tuple[Any, list[dict]]]:
        ray = self.ray
        task = ray.remote(_run_call).options(
            num_cpus=self.cpus_per_task, max_retries=TASK_RETRIES, retry_exceptions=False
        )
        call_ref = ray.put(call)  # the stage's work and options, shipped once
        limit = self.max_in_flight or max(2, 2 * int(self.cluster.get("cpus", 1)))
        todo = iter(items)
        in_flight: dict[Any, Any] = {}
        # On an exception the tasks in flight are left to end with the job: not cancelled.
        while True:
            while len(in_flight) < limit and (it := next(todo, None)) is not None:
                in_flight[task.remote(call_ref, it)] = it
            if not in_flight:
                return
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in ready:
                it = in_flight.pop(ref)
                yield it, self._get(ref, it)

    def _get(self, ref: Any, item: Any) -> list[dict]:
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            # The work raised what stops a stage (a full disk): raise it here as itself.
            cause = e.cause if isinstance(e.cause, BaseException) else e
            raise cause from None
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                ray.exceptions.OutOfMemoryError, ray.exceptions.TaskCancelledError,
                ray.exceptions.ObjectLostError) as e:
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return [{"id": item.id, "item": item.id, "status": FAILED,
                     "error": f"its Ray worker died {TASK_RETRIES + 1} times "
                              f"({type(e).__name__}: {why})"}]

    def describe(self) -> dict:
        return {"engine": "ray", **self.cluster}


def make_engine(name: str, *, workers: int = 1, ray_address: str | None = None,
                quiet: bool = False, stage: str = "vpipe") -> LocalEngine | RayEngine:
    """The engine ``--engine`` names; ``workers`` is the local pool's size, or with Ray the
    most tasks in flight at once (None: twice the cluster's CPUs)."""
    if name == "local":
        if ray_address:
            raise UsageError("--ray-address is for --engine ray")
        return LocalEngine(workers)
    if name == "ray":
        ray_module()  # a missing install is a usage error before any work
        return RayEngine(ray_address, max_in_flight=workers if workers > 1 else None,
                         quiet=quiet, stage=stage)
    raise UsageError(f"--engine {name!r}: use local or ray")


def ray_module() -> Any:
    """The ``ray`` package, or a usage error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UsageError(
            "--engine ray needs Ray: pip install 'vpipe[ray]' (on every node of the cluster)"
        ) from None
    return ray


def connect(address: str | None, *, quiet: bool = False, stage: str = "vpipe") -> Any:
    """Join the cluster ``address`` names (None: ``RAY_ADDRESS``, else a ``ray start`` head on
    this machine, else start a local one for this process alone); reuse the connection this
    process has."""
    ray = ray_module()
    if ray.is_initialized():
        return ray
    # Ray's C++ core logs each failed attempt at a cluster as a warning line on stderr.
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "error")
    common = {"logging_level": "error", "configure_logging": True}
    where = address or os.environ.get("RAY_ADDRESS")
    head = None if where else ray_start_head(ray)
    if where:
        reachable(where)
        try:
            ray_init(ray, address=address, **common)
        except ConnectionError as e:
            raise UsageError(f"cannot join the Ray cluster at {where}: {e}") from None
        how = f"joined the Ray cluster at {where}"
    elif head and answers(head):
        ray_init(ray, address=head, **common)
        how = f"joined the Ray cluster `ray start` runs on this machine ({head})"
    else:
        start_local_cluster(ray, common)
        how = "started a local Ray cluster for this run"
        if head:
            how += f" (nothing answers at {head}, where `ray start` last ran here)"
    if not quiet:
        c = cluster_shape(ray)
        print(f"vpipe {stage}: {how} ({c['nodes']} node(s), {c['cpus']:g} CPUs, "
              f"{c['gpus']:g} GPUs)", file=sys.stderr)
    return ray


def ray_init(ray: Any, **options: Any) -> None:
    """``ray.init(**options)`` with a Ctrl-C held until it returns, then raised; and the
    connection closed at exit with Ctrl-C ignored (:func:`_shutdown_uninterrupted`).

    Ray interrupted while it starts a cluster or connects to one can leave its core half made,
    and the process then dies of a segmentation fault as it exits (rc -11, nothing said). The
    interrupt waits the second or few that takes.
    """
    held: list[int] = []
    here = threading.current_thread() is threading.main_thread()  # signals: main thread only
    if here:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        ray.init(**options)
    finally:
        if here:
            signal.signal(signal.SIGINT,
                          signal.default_int_handler if previous is None else previous)
    atexit.register(_shutdown_uninterrupted, ray)
    if held:
        raise KeyboardInterrupt


def _shutdown_uninterrupted(ray: Any) -> None:
    """At exit, before Ray's own hook (registered earlier, run later): leave the cluster, or
    stop the one started here, with Ctrl-C ignored. Interrupted half-way, Ray's shutdown
    prints a traceback as "Exception ignored in atexit callback" and its core can abort the
    process, whatever the command's exit status was; it takes a second or two, and the
    watchdog ends what a killed process leaves."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    ray.shutdown()


def ray_start_head(ray: Any) -> str | None:
    """The address the last ``ray start --head`` on this machine recorded (in Ray's temp
    folder, ``ray_current_cluster``), or None.

    Only ``ray start`` records its head there. A cluster that ``ray.init`` started, as every
    vpipe run without a cluster does, is not recorded, so no other run joins it; Ray's own
    ``address="auto"`` would, finding any raylet on this machine by its command line.
    """
    find = getattr(ray._private.services, "find_bootstrap_address", None)
    return find(None) if find is not None else None


def start_local_cluster(ray: Any, common: dict) -> None:
    """A Ray cluster on this machine for this process alone, ending with it.

    Ray kills its GCS and raylet when the process that started them dies, but the raylet's
    agents (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``) outlive a killed driver, or one
    interrupted while Ray starts, by a minute, blocked reporting to a GCS that is gone. A
    watchdog process, started first, kills what is left once this process ends, however.
    """
    watch_descendants()
    ray_init(ray, address="local", include_dashboard=False, **common)


def answers(address: str, timeout_s: float = 1.0) -> bool:
    """Whether something listens at ``host:port``."""
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """A usage error within ``timeout_s`` when nothing listens at ``host:port`` (Ray itself
    retries an unreachable cluster for a minute or more, logging each try)."""
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # "auto", "ray://...": Ray's own resolution
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise UsageError(f"cannot reach the Ray cluster at {address} ({why}): is `ray start "
                         "--head` running there, and the port open?") from None


def cluster_shape(ray: Any) -> dict:
    """Nodes, CPUs and GPUs of the cluster as it is now (recorded with the run)."""
    res = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return {"nodes": len(nodes), "cpus": float(res.get("CPU", 0)), "gpus": float(res.get("GPU", 0))}


def check_shared_folder(ray: Any, out_dir: Path, inputs: Sequence[Path] = ()) -> None:
    """Stop with a clear message unless every node sees ``out_dir`` (a probe file the driver
    writes there and a task on each node reads back) and the ``inputs``."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    import pipeline

    out_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(8)
    probe = out_dir / f".vpipe-probe-{token}"
    probe.write_text(token, encoding="utf-8")
    try:
        task = ray.remote(_probe_node)
        nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
        refs = {
            task.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
                n["NodeID"], soft=False)).remote(str(probe), [str(p.resolve()) for p in inputs]):
            n for n in nodes
        }
        try:
            answers = ray.get(list(refs), timeout=PROBE_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise UsageError(f"Ray: a node did not answer within {PROBE_TIMEOUT_S:.0f} s "
                             "(is every node running?)") from None
        for (ref, node), (seen, missing, version) in zip(refs.items(), answers, strict=True):
            del ref
            host = node.get("NodeManagerAddress", node["NodeID"][:12])
            if seen != token:
                raise UsageError(
                    f"{out_dir}: the output folder is not shared with Ray node {host} (it cannot "
                    "read a file written here): every node must see the same folder at the "
                    "same path (a shared filesystem such as NFS)"
                )
            if missing:
                raise UsageError(f"{missing}: no such file or folder on Ray node {host} (inputs "
                                 "must be on a filesystem every node sees)")
            if version != pipeline.__version__:
                raise UsageError(f"Ray node {host} has vpipe {version}, this one "
                                 f"{pipeline.__version__}: install the same version everywhere")
    finally:
        probe.unlink(missing_ok=True)


def _probe_node(probe: str, inputs: list[str]) -> tuple[str | None, str | None, str]:
    import pipeline

    try:
        seen = Path(probe).read_text(encoding="utf-8")
    except OSError:
        seen = None
    missing = next((p for p in inputs if not os.path.exists(p)), None)
    return seen, missing, pipeline.__version__


def _run_call(call: Callable[[Any], list[dict]], item: Any) -> list[dict]:
    """The body of a Ray task: one item's work, its records returned to the driver."""
    return call(item)


def end_with_parent(poll_s: float = 0.5) -> None:
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


def watch_descendants() -> None:
    """Start a watchdog that kills this process's descendants (a local cluster's processes,
    and any they leave behind, orphaned) once this process ends.

    It learns of the end as an EOF on a pipe whose other end only this process holds (not
    inherited by the processes it starts), and runs in a session of its own, out of reach of a
    Ctrl-C meant for this one. Linux only (it reads ``/proc``); elsewhere Ray's own clean-up.
    """
    if not os.path.isdir("/proc"):
        return
    import subprocess

    import pipeline

    read, _write = os.pipe()  # _write stays open, unused, for the rest of this process's life
    home = str(Path(pipeline.__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (home, os.environ.get("PYTHONPATH")) if p)
    code = "import sys; from pipeline.engine import reap_descendants as r; r(int(sys.argv[1]))"
    subprocess.Popen([sys.executable, "-c", code, str(os.getpid())], stdin=read,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True, env={**os.environ, "PYTHONPATH": path})
    os.close(read)


def reap_descendants(driver: int, poll_s: float = 1.0) -> None:
    """The watchdog's body: note the descendants of ``driver`` (with their start times, so
    that a reused pid is never taken for one) until stdin reaches its end, then SIGKILL those
    still running."""
    import select

    seen: dict[int, str] = {}
    while True:
        table = _process_table()
        for pid in _descendants(driver, table):
            if pid != os.getpid():
                seen.setdefault(pid, table[pid][1])
        ready, _, _ = select.select([0], [], [], poll_s)
        if ready and not os.read(0, 512):
            break
    table = _process_table()
    for pid, started in seen.items():
        if pid in table and table[pid][1] == started:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _process_table() -> dict[int, tuple[int, str]]:
    """Every running (not zombie) process: pid -> (parent pid, start time in clock ticks)."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="utf-8", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":  # fields from the state on: state, ppid, ... starttime (22nd)
            table[int(name)] = (int(fields[1]), fields[19])
    return table


def _descendants(pid: int, table: dict[int, tuple[int, str]]) -> list[int]:
    """Every process below ``pid`` in ``table``."""
    children: dict[int, list[int]] = {}
    for p, (parent, _) in table.items():
        children.setdefault(parent, []).append(p)
    out, todo = [], list(children.get(pid, ()))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out
