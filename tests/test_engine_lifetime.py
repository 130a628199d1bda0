"""A run's own Ray cluster (`--engine ray` with no cluster named): no other run joins it, a
Ctrl-C ends the run with exit 130 and no traceback, and its processes end with the driver
however it ends (Ctrl-C, SIGKILL).

Each driver is a real ``python -m pipeline`` in a session of its own, interrupted as a
terminal would (SIGINT to its process group). Ray's temp folder (``RAY_TMPDIR``) is the test's
own, so no other cluster on this machine is seen, joined, or left a record in.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the Ray engine needs pip install 'vpipe[ray]'")

import synth  # noqa: E402
from test_engine import assert_same_outputs, subclip  # noqa: E402
from test_features import args as feature_args  # noqa: E402
from test_features import assert_same_features, make_media  # noqa: E402

from pipeline.cli import main  # noqa: E402
from pipeline.engine import answers, ray_start_head  # noqa: E402
from pipeline.records import read_manifest  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# How long a cluster's processes may outlive their driver (Ray's agents alone: about 60 s).
GONE_WITHIN_S = 20.0


@pytest.fixture
def ray_env() -> Iterator[dict[str, str]]:
    """The drivers' environment: no RAY_ADDRESS, and a Ray temp folder of their own (short:
    Ray's socket paths under it must fit in 108 bytes)."""
    tmp = tempfile.mkdtemp(prefix="vr", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = tmp
    yield env
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight 4 s frame-numbered videos: enough tasks that a run is still going when its first
    clip is recorded."""
    d = tmp_path_factory.mktemp("videos")
    for i in range(8):
        synth.make_video(d / f"v{i}.mp4", duration_s=4.0, size=(96, 64), beeps_at=(0.5,),
                         color=(30 * i, 120, 200))
    return d


class Driver:
    """``python -m pipeline ARGS`` in a session (and process group) of its own."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with open(log, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], env=env,
                                         stdout=subprocess.DEVNULL, stderr=err,
                                         start_new_session=True)

    def when_recorded(self, out: Path, timeout_s: float = 300) -> bool:
        """Wait for the run's first record; False if the run ended first."""
        manifest, deadline = out / "manifest.jsonl", time.time() + timeout_s
        while time.time() < deadline and self.proc.poll() is None:
            if manifest.exists() and manifest.read_text().strip():
                return True
            time.sleep(0.01)
        return False

    def wait(self, timeout_s: float = 300) -> tuple[int, str]:
        return self.proc.wait(timeout=timeout_s), self.log.read_text()

    def wait_noting(self, procs: dict[int, str], timeout_s: float = 120) -> tuple[int, str]:
        """Wait, adding to ``procs`` every process seen below the driver until it ends."""
        deadline = time.time() + timeout_s
        while self.proc.poll() is None and time.time() < deadline:
            procs.update(processes_below(self.proc.pid))
            time.sleep(0.1)
        return self.wait(timeout_s=1)


def process_table() -> dict[int, tuple[int, str]]:
    """Running processes (zombies aside): pid -> (parent pid, start time)."""
    table = {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            table[int(name)] = (int(fields[1]), fields[19])
    return table


def processes_below(pid: int) -> dict[int, str]:
    """The descendants of ``pid`` now: pid -> start time (a reused pid is not theirs)."""
    table = process_table()
    out, todo = {}, [pid]
    while todo:
        parent = todo.pop()
        for p, (pp, started) in table.items():
            if pp == parent:
                out[p] = started
                todo.append(p)
    return out


def left_running(procs: dict[int, str], within_s: float = GONE_WITHIN_S) -> list[str]:
    """The processes of ``procs`` still running after up to ``within_s`` (their titles)."""
    deadline = time.time() + within_s
    while True:
        table = process_table()
        left = [p for p, started in procs.items() if table.get(p, (0, None))[1] == started]
        if not left or time.time() > deadline:
            break
        time.sleep(0.2)
    return [f"{p} {title(p)[-40:]}" for p in left]


def title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except (OSError, UnicodeDecodeError):
        return "(gone)"


def assert_one_clean_exit(code: int, err: str) -> None:
    assert code == 130, err
    assert "Traceback" not in err and "Exception ignored" not in err, err


# --------------------------------------------------------------------------- which cluster


def test_only_a_ray_start_head_is_looked_for(monkeypatch, tmp_path: Path) -> None:
    """The one cluster a run without an address joins is the head `ray start` recorded in
    Ray's temp folder (a cluster started by ``ray.init``, as each run's own is, records
    none); one that no longer answers is not joined."""
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    assert ray_start_head(ray) is None
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        address = f"127.0.0.1:{listening.getsockname()[1]}"
        (tmp_path / "ray").mkdir()
        (tmp_path / "ray" / "ray_current_cluster").write_text(address)
        assert ray_start_head(ray) == address
        assert answers(address)
    assert not answers(address)


@pytest.mark.slow
def test_a_second_run_starts_its_own_cluster_beside_the_first(ray_env, videos: Path,
                                                              tmp_path: Path) -> None:
    """The second run starts while the first one's cluster works: it does not join it (Ray's
    ``address="auto"`` would), and both finish with their own."""
    local = tmp_path / "local"
    assert main(subclip(videos, local, "--workers", "1")) == 0
    outs = [tmp_path / "a", tmp_path / "b"]
    # Not quiet (-q): each says which cluster it runs on.
    args = [[a for a in subclip(videos, out, "--engine", "ray", "--workers", "2") if a != "-q"]
            for out in outs]
    first = Driver(args[0], ray_env, tmp_path / "a.err")
    first.when_recorded(outs[0])
    runs = [first, Driver(args[1], ray_env, tmp_path / "b.err")]
    for run, out in zip(runs, outs, strict=True):
        code, err = run.wait()
        assert code == 0, err
        assert "vpipe subclip: started a local Ray cluster for this run (1 node(s)" in err
        assert_same_outputs(local, out)


# --------------------------------------------------------------------------- its end


def test_a_killed_driver_leaves_no_process_of_its_cluster(ray_env, videos: Path,
                                                          tmp_path: Path) -> None:
    """SIGKILL: the driver cannot stop its cluster; Ray ends its GCS and raylet with it, and
    the watchdog what else is left (the raylet's agents would stay on for a minute)."""
    out = tmp_path / "clips"
    run = Driver(subclip(videos, out, "--engine", "ray", "--workers", "2"), ray_env,
                 tmp_path / "err")
    try:
        if not run.when_recorded(out):
            pytest.skip(f"the run ended before it could be killed: {run.wait()}")
        cluster = processes_below(run.proc.pid)
        run.proc.kill()
    finally:
        run.proc.wait(timeout=60)
    assert len(cluster) >= 4  # GCS, raylet, its agents, workers, the watchdog
    assert left_running(cluster) == []


def interrupt_then_rerun(cmd: list[str], ray_env: dict, out: Path, tmp_path: Path,
                         items: int) -> None:
    """Ctrl-C to a Ray run's process group once it has recorded an item: one clean exit 130,
    some but not all of ``items`` done, none of its cluster left; then the same command
    completes (skipped when the run ended before the interrupt reached it)."""
    run = Driver(cmd, ray_env, tmp_path / "err")
    if not run.when_recorded(out):
        pytest.skip(f"the run ended before it could be interrupted: {run.wait()}")
    cluster = processes_below(run.proc.pid)
    os.killpg(run.proc.pid, signal.SIGINT)
    code, err = run.wait_noting(cluster)
    if code == 0:
        pytest.skip("the run finished before the interrupt reached it")
    assert_one_clean_exit(code, err)
    assert 1 <= len(read_manifest(out)) < items
    assert left_running(cluster) == []
    code, err = Driver(cmd, ray_env, tmp_path / "err2").wait()
    assert code == 0, err


def test_ctrl_c_mid_subclip_on_ray_is_exit_130_and_the_rerun_completes(
        ray_env, videos: Path, tmp_path: Path) -> None:
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    assert main(subclip(videos, local, "--workers", "1")) == 0
    cmd = subclip(videos, on_ray, "--engine", "ray", "--workers", "2")
    interrupt_then_rerun(cmd, ray_env, on_ray, tmp_path, items=16)
    assert_same_outputs(local, on_ray)


def test_ctrl_c_while_the_cluster_starts_is_exit_130(ray_env, videos: Path,
                                                     tmp_path: Path) -> None:
    """Interrupted once the GCS runs, while Ray starts the rest: Ray's start-up, interrupted,
    could leave its core half made and the process died of a segmentation fault at exit."""
    out = tmp_path / "clips"
    run = Driver(subclip(videos, out, "--engine", "ray"), ray_env, tmp_path / "err")
    cluster: dict[int, str] = {}
    deadline = time.time() + 300
    while not any("gcs_server" in title(p) for p in cluster):
        assert run.proc.poll() is None and time.time() < deadline, run.wait()
        cluster = processes_below(run.proc.pid)
        time.sleep(0.05)
    os.killpg(run.proc.pid, signal.SIGINT)
    code, err = run.wait_noting(cluster)
    assert_one_clean_exit(code, err)
    assert left_running(cluster) == []
    assert not out.exists()  # the cluster comes before the output folder


def test_ctrl_c_as_the_run_ends_is_no_traceback(ray_env, videos: Path, tmp_path: Path) -> None:
    """Interrupted once its summary is out, as it stops its cluster: Ray's own exit hook,
    interrupted, printed a traceback as "Exception ignored in atexit callback" (its core could
    then abort). Exit 0 (the run is complete) or 130, one way or the other cleanly."""
    out = tmp_path / "clips"
    run = Driver([a for a in subclip(videos, out, "--engine", "ray") if a != "-q"], ray_env,
                 tmp_path / "err")
    deadline = time.time() + 300
    while run.proc.poll() is None and time.time() < deadline:
        if "failed in" in run.log.read_text():  # the summary line
            break
        time.sleep(0.01)
    cluster = processes_below(run.proc.pid)
    time.sleep(0.3)  # into the exit hooks: Ray's shutdown takes a second or two here
    try:
        os.killpg(run.proc.pid, signal.SIGINT)
    except ProcessLookupError:
        pytest.skip(f"the run had ended before it could be interrupted: {run.wait()}")
    code, err = run.wait_noting(cluster)
    assert code in (0, 130), err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert left_running(cluster) == []


@pytest.mark.slow
def test_ctrl_c_mid_features_on_ray_is_exit_130_and_the_rerun_completes(
        ray_env, weights, tmp_path: Path) -> None:
    """Interrupted while the actors encode (a shard committed, others in flight): no error
    from the chunks being cancelled takes the interrupt's place."""
    media = make_media(tmp_path / "media", {f"c_{i}": (12, None) for i in range(8)})
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    common = ("--shard-size", "1", "--audio-model", "none")  # one model to load, not two
    assert main(feature_args(media, local, weights, *common)) == 0
    cmd = feature_args(media, on_ray, weights, *common, "--engine", "ray")
    interrupt_then_rerun(cmd, ray_env, on_ray, tmp_path, items=8)
    assert_same_features(local, on_ray)
    assert {r["status"] for r in read_manifest(on_ray).values()} == {"ok"}
