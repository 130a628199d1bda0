"""`--engine ray` on a two-node Ray cluster (``ray.cluster_utils.Cluster``: a head and a worker
node, one CPU each, on this machine): every stage's outputs equal the local engine's, the
features run one actor per node, and a node lost mid-run has its tasks done elsewhere."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the Ray engine needs pip install 'vpipe[ray]'")

import synth  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from test_engine import assert_same_outputs, subclip  # noqa: E402
from test_features import args as feature_args  # noqa: E402
from test_features import assert_same_features, make_media  # noqa: E402

from pipeline.cli import main  # noqa: E402
from pipeline.records import read_manifest  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[Cluster]:
    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address, logging_level="error")
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("videos")
    for i in range(4):
        synth.make_video(d / f"v{i}.mp4", duration_s=4.0, size=(96, 64), beeps_at=(0.5 + i,))
    return d


def test_media_stages_on_two_nodes_equal_local(two_nodes: Cluster, videos: Path,
                                               tmp_path: Path) -> None:
    local, on_ray = tmp_path / "clips-local", tmp_path / "clips-ray"
    assert main(subclip(videos, local, "--workers", "1")) == 0
    assert main(subclip(videos, on_ray, "--engine", "ray")) == 0
    assert_same_outputs(local, on_ray)
    info = json.loads((on_ray / "vpipe.json").read_text())["engine"]
    assert info == {"engine": "ray", "nodes": 2, "cpus": 2.0, "gpus": 0.0}
    for stage, opts in (("extract-frames", ["--fps", "4", "--size", "48"]),
                        ("extract-audio", [])):
        a, b = tmp_path / f"{stage}-local", tmp_path / f"{stage}-ray"
        assert main([stage, str(local), "-o", str(a), *opts, "-q", "--workers", "1"]) == 0
        assert main([stage, str(local), "-o", str(b), *opts, "-q", "--engine", "ray"]) == 0
        assert_same_outputs(a, b)


def test_features_on_two_nodes_equal_local(two_nodes: Cluster, weights, tmp_path: Path) -> None:
    media = make_media(tmp_path / "media", {f"n_{i}": (6, 1.5) for i in range(6)})
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    assert main(feature_args(media, local, weights, "--shard-size", "2")) == 0
    assert main(feature_args(media, on_ray, weights, "--shard-size", "2", "--engine",
                             "ray")) == 0
    assert_same_features(local, on_ray)
    assert {r["status"] for r in read_manifest(on_ray).values()} == {"ok"}
    # An actor per one-CPU node shares its CPU: both CPUs decode, 2 chunks queued per actor.
    engine = json.loads((on_ray / "vpipe.json").read_text())["engine"]
    assert [a["type"] for a in engine["actors"]] == ["cpu", "cpu"]
    assert engine["decode"]["decode_tasks"] == 2 and engine["decode"]["chunks_in_flight"] == 6


def test_a_lost_node_has_its_tasks_done_elsewhere(two_nodes: Cluster, videos: Path,
                                                  tmp_path: Path) -> None:
    """The worker node removed once the run's first clip is recorded: what it was running is
    retried on the head, and the outputs equal the local engine's."""
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    assert main(subclip(videos, local, "--workers", "1", "--count", "3")) == 0
    worker = next(n for n in two_nodes.list_all_nodes() if n is not two_nodes.head_node)
    removed = threading.Event()

    def remove_when_started() -> None:
        manifest = on_ray / "manifest.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline and not (manifest.exists() and manifest.read_text()):
            time.sleep(0.01)
        two_nodes.remove_node(worker)
        removed.set()

    t = threading.Thread(target=remove_when_started, daemon=True)
    t.start()
    assert main(subclip(videos, on_ray, "--engine", "ray", "--count", "3")) == 0
    t.join(timeout=120)
    assert removed.is_set()
    assert_same_outputs(local, on_ray)
