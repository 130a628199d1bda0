"""`--engine ray` on a real local Ray cluster: every stage's outputs equal the local engine's,
a worker or actor killed mid-run is survived, a killed driver resumes, bad inputs fail once,
and an output folder the cluster's nodes cannot see is refused before any work.

The cluster (2 CPUs) is started once for the module in this process; subprocess drivers join
it by address, as users' drivers join a running cluster. The two-node path is in
test_engine_cluster.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the Ray engine needs pip install 'vpipe[ray]'")

import synth  # noqa: E402
from conftest import ray_cluster  # noqa: E402
from test_features import args as feature_args  # noqa: E402
from test_features import assert_same_features, make_media  # noqa: E402

from pipeline.cli import main  # noqa: E402
from pipeline.engine import LocalEngine, RayEngine, make_engine  # noqa: E402
from pipeline.errors import UsageError  # noqa: E402
from pipeline.records import read_manifest  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A local Ray cluster of 2 CPUs for the module; yields its address."""
    with ray_cluster() as address:
        yield address


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four 4 s frame-numbered videos (beeps at known times) and one cut short."""
    d = tmp_path_factory.mktemp("videos")
    for i in range(4):
        synth.make_video(d / f"v{i}.mp4", duration_s=4.0, size=(96, 64), beeps_at=(0.5 + i,),
                         color=(40 * i, 120, 200))
    synth.make_truncated(d / "v0.mp4", d / "cut.mp4", keep=0.2)
    return d


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under a stage's output folder but its run record (times, engine)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in ("vpipe.json", "manifest.jsonl")}


def assert_same_outputs(a: Path, b: Path, *, but: tuple[str, ...] = ()) -> None:
    """Byte-identical files and equal manifest records (in any order; fields ``but`` aside)."""
    ta, tb = tree(a), tree(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name] == tb[name], name

    def records(folder: Path) -> dict:
        return {k: {f: v for f, v in r.items() if f not in but}
                for k, r in read_manifest(folder).items()}

    assert records(a) == records(b)


def engine_of(folder: Path) -> dict:
    return json.loads((folder / "vpipe.json").read_text())["engine"]


def subclip(videos: Path, out: Path, *extra: str) -> list[str]:
    return ["subclip", str(videos), "-o", str(out), "--count", "2", "--duration", "1.5",
            "--start", "0.5", "-q", *extra]


def kill_first(title: str, stop: threading.Event, killed: list[int]) -> None:
    """Poll the process table; SIGKILL the first process whose title starts with ``title``
    (Ray names a worker after what it runs: ``ray::_run_call``, ``ray::FeatureActor.encode``)."""
    while not stop.is_set() and not killed:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
            except OSError:
                continue
            if cmd.startswith(title):
                os.kill(int(pid), signal.SIGKILL)
                killed.append(int(pid))
                return
        time.sleep(0.005)


def while_killing(title: str, fn) -> list[int]:
    """Run ``fn()`` while a thread kills the first process titled ``title``; the pids killed."""
    stop, killed = threading.Event(), []
    t = threading.Thread(target=kill_first, args=(title, stop, killed), daemon=True)
    t.start()
    try:
        fn()
    finally:
        stop.set()
        t.join()
    return killed


# --------------------------------------------------------------------------- engines


def test_make_engine_names_the_engines() -> None:
    assert isinstance(make_engine("local", workers=3), LocalEngine)
    eng = make_engine("ray", workers=5, ray_address="10.0.0.1:6379")
    assert isinstance(eng, RayEngine) and eng.max_in_flight == 5
    assert eng.address == "10.0.0.1:6379"
    with pytest.raises(UsageError, match="--engine 'spark'"):
        make_engine("spark")
    with pytest.raises(UsageError, match="--ray-address is for --engine ray"):
        make_engine("local", ray_address="10.0.0.1:6379")


# --------------------------------------------------------------------------- media stages


def test_subclip_on_ray_equals_local_and_bad_inputs_fail_once(cluster: str, videos: Path,
                                                              tmp_path: Path, capsys) -> None:
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    assert main(subclip(videos, local, "--workers", "1")) == 1  # cut.mp4 fails
    local_err = capsys.readouterr().err
    assert main(subclip(videos, on_ray, "--engine", "ray")) == 1
    ray_err = capsys.readouterr().err
    assert_same_outputs(local, on_ray)
    recs = read_manifest(on_ray)
    assert recs["cut"]["status"] == "failed" and "cut.mp4" in recs["cut"]["error"]
    # The bad input's one-line error, once, as with the local engine (not retried as a crash).
    line = next(x for x in local_err.splitlines() if "cut.mp4" in x)
    assert [x for x in ray_err.splitlines() if "cut.mp4" in x] == [line]
    assert sum(1 for r in recs.values() if r["item"] == "cut") == 1
    eng = engine_of(on_ray)
    assert eng == {"engine": "ray", "nodes": 1, "cpus": 2.0, "gpus": 0.0}
    assert engine_of(local) == {"engine": "local", "workers": 1}
    # Re-run: resumed from the manifest, nothing redone, and the changed parameters refused.
    before = {p: p.stat().st_mtime_ns for p in on_ray.rglob("*.mp4")}
    assert main(subclip(videos, on_ray, "--engine", "ray")) == 1
    assert {p: p.stat().st_mtime_ns for p in on_ray.rglob("*.mp4")} == before
    assert main(subclip(videos, on_ray, "--engine", "ray", "--count", "3")) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_frames_and_audio_on_ray_equal_local(cluster: str, videos: Path, tmp_path: Path) -> None:
    clips = tmp_path / "clips"
    assert main(subclip(videos, clips, "--workers", "1")) == 1
    for stage, opts in (("extract-frames", ["--fps", "4", "--size", "48"]),
                        ("extract-audio", ["--sample-rate", "16000"])):
        local, on_ray = tmp_path / f"{stage}-local", tmp_path / f"{stage}-ray"
        assert main([stage, str(clips), "-o", str(local), *opts, "-q", "--workers", "1"]) == 0
        assert main([stage, str(clips), "-o", str(on_ray), *opts, "-q", "--engine", "ray"]) == 0
        assert_same_outputs(local, on_ray)
        assert len(read_manifest(on_ray)) == 8
        assert any(p.suffix == ".wav" for p in on_ray.rglob("*"))


def test_a_worker_killed_mid_task_is_retried(cluster: str, videos: Path, tmp_path: Path) -> None:
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    assert main(subclip(videos, local, "--workers", "1", "--count", "3")) == 1
    killed = while_killing(
        "ray::_run_call",
        lambda: main(subclip(videos, on_ray, "--engine", "ray", "--count", "3")),
    )
    assert killed, "no Ray worker was seen running a task"
    assert_same_outputs(local, on_ray)
    assert not [p for p in on_ray.rglob("*") if ".tmp-" in p.name]


def test_a_killed_driver_resumes(cluster: str, videos: Path, tmp_path: Path) -> None:
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    assert main(subclip(videos, local, "--workers", "1", "--count", "3")) == 1
    cmd = subclip(videos, on_ray, "--engine", "ray", "--ray-address", cluster, "--count", "3",
                  "--workers", "1")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *cmd])
    try:
        manifest = on_ray / "manifest.jsonl"
        while proc.poll() is None and not (manifest.exists() and manifest.read_text().strip()):
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before it could be killed")
    assert 1 <= len(read_manifest(on_ray)) < 13
    assert main(subclip(videos, on_ray, "--engine", "ray", "--count", "3")) == 1
    assert_same_outputs(local, on_ray)


def test_an_output_folder_the_nodes_cannot_see_is_refused(cluster: str, videos: Path,
                                                          tmp_path: Path) -> None:
    """The driver in a mount namespace of its own, its output folder a private tmpfs: the
    cluster's workers (started outside it) cannot read the probe it writes there."""
    private = tmp_path / "private"
    private.mkdir()
    out = private / "clips"
    vpipe = shlex_join([sys.executable, "-m", "pipeline", *subclip(
        videos, out, "--engine", "ray", "--ray-address", cluster)])
    script = f"mount -t tmpfs vpipe-test {private} && exec {vpipe}"
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=300)
    if "mount" in r.stderr and r.returncode != 2:
        pytest.skip(f"no private mount here: {r.stderr.strip()}")
    assert r.returncode == 2, r.stderr
    assert f"{out}: the output folder is not shared with Ray node" in r.stderr
    assert not out.exists()  # that was the private tmpfs; nothing leaked to the shared one


def test_an_unreachable_cluster_is_one_line_and_leaves_nothing(videos: Path,
                                                               tmp_path: Path) -> None:
    """Nothing listens at the address: exit 2 in seconds (Ray alone retries for a minute,
    logging each try), one line, and no output folder made."""
    out = tmp_path / "clips"
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "pipeline", *subclip(
        videos, out, "--engine", "ray", "--ray-address", "127.0.0.1:1")],
        capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and time.time() - t0 < 30
    assert r.stderr.strip().splitlines() == [
        "vpipe: error: cannot reach the Ray cluster at 127.0.0.1:1 (Connection refused): is "
        "`ray start --head` running there, and the port open?"]
    assert not out.exists()


@pytest.mark.parametrize("device", ["gpu", "cudax", "cuda:one"])
def test_a_device_name_that_cannot_work_is_refused_before_ray_is_reached(
        device: str, weights, tmp_path: Path, capsys) -> None:
    """The local engine refuses --device gpu; Ray's actors would take their own device and
    ignore it: refused the same, before the cluster (here: none at the address) is asked."""
    out = tmp_path / "features"
    assert main(feature_args(feature_media(tmp_path), out, weights, "--engine", "ray",
                             "--ray-address", "127.0.0.1:1", "--device", device)) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"vpipe: error: --device {device!r}: use auto, cpu or cuda[:N]"]
    assert not out.exists()


def shlex_join(words: list[str]) -> str:
    import shlex

    return shlex.join(words)


# --------------------------------------------------------------------------- features


def feature_media(tmp_path: Path) -> Path:
    """Six clips (one without frames, one with a damaged frame file)."""
    media = make_media(tmp_path / "media", {
        "a_0": (5, 2.1), "a_1": (4, 1.0), "b_0": (0, None), "b_1": (6, 0.5),
        "c_0": (7, 1.5), "c_1": (3, None),
    })
    (media / "c_1" / "frames" / "000001.jpg").write_bytes(b"not a jpeg")
    return media


def test_actors_choose_their_own_device_and_decoding_fills_the_free_cpus() -> None:
    from pipeline.features.on_ray import actor_device, actor_kind, decode_sizing

    # A driver that would pick CUDA (auto, or cuda asked for) sends no CUDA to a CPU-only actor.
    assert actor_device("auto", []) == "cpu" and actor_device("cuda", []) == "cpu"
    assert actor_device("auto", [3]) == "cuda" and actor_device("cpu", [3]) == "cpu"
    # The cluster's GPUs decide, not the driver's machine: a CPU-only head uses the workers'.
    assert actor_kind("auto", 2) == "gpu" and actor_kind("cuda:1", 2) == "gpu"
    assert actor_kind("auto", 0) == "cpu" and actor_kind("cpu", 8) == "cpu"
    with pytest.raises(UsageError, match="--device cuda: the Ray cluster has no GPU"):
        actor_kind("cuda", 0)
    # 16 cores, one GPU actor holding one: 15 decode tasks, 2 chunks queued for the actor, and
    # the decoded frames in flight at most half the object store.
    assert decode_sizing(15, 1, 40e9) == {"decode_tasks": 15, "chunks_in_flight": 17,
                                          "bytes_in_flight": 20_000_000_000}
    assert decode_sizing(0, 2, 1e9)["decode_tasks"] == 1


def test_features_on_ray_equal_local(cluster: str, weights, tmp_path: Path, monkeypatch,
                                     capsys) -> None:
    from pipeline.features import stage

    media = feature_media(tmp_path)
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    assert main(feature_args(media, local, weights, "--shard-size", "2")) == 1

    def no_models_here(*_a, **_k):
        raise AssertionError("the driver loaded the models")

    monkeypatch.setattr(stage, "load_encoders", no_models_here)  # the actors' own are theirs
    assert main(feature_args(media, on_ray, weights, "--shard-size", "2", "--engine",
                             "ray", "--device", "auto")) == 1
    assert_same_features(local, on_ray)
    engine = engine_of(on_ray)
    # One CPU actor on the 2-CPU node holds one CPU; the other decodes.
    assert [(a["type"], a["precision"]) for a in engine["actors"]] == [("cpu", "fp32")]
    store = ray.cluster_resources()["object_store_memory"]
    assert engine["decode"] == {"decode_tasks": 1, "chunks_in_flight": 3,
                                "bytes_in_flight": int(store * 0.5)}
    assert "device" not in json.loads((on_ray / "vpipe.json").read_text())
    assert main(feature_args(media, tmp_path / "cuda", weights, "--engine", "ray", "--device",
                             "cuda")) == 2
    assert "--device cuda: the Ray cluster has no GPU" in capsys.readouterr().err
    assert not (tmp_path / "cuda").exists()
    a, b = read_manifest(local), read_manifest(on_ray)
    assert {k: r["status"] for k, r in a.items()} == {k: r["status"] for k, r in b.items()}
    assert b["c_1"]["status"] == "failed" and b["c_1"]["error"] == a["c_1"]["error"]
    assert engine_of(on_ray)["engine"] == "ray"
    assert main(["inspect", str(on_ray)]) == 0
    # Resumed: a second run finds everything done but the failed clip, which fails again.
    n = len(list(on_ray.glob("shard-*.h5")))
    assert main(feature_args(media, on_ray, weights, "--shard-size", "2", "--engine",
                             "ray")) == 1
    assert len(list(on_ray.glob("shard-*.h5"))) == n


def test_an_actor_refusing_its_options_is_one_line_naming_the_cause(cluster: str, weights,
                                                                    tmp_path: Path,
                                                                    capsys) -> None:
    """fp16 on the CPU actors of a CPU-only cluster: the actor's own usage error, exit 2, not
    Ray's "the actor died" with the cause left out."""
    out = tmp_path / "features"
    assert main(feature_args(feature_media(tmp_path), out, weights, "--engine", "ray",
                             "--precision", "fp16")) == 2
    said = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("vpipe")]
    assert said == ["vpipe: error: on a Ray node: --precision fp16 needs a CUDA device; use "
                    "bf16 or fp32 on a CPU"]
    assert not out.exists()


def test_chunks_larger_than_the_bytes_allowed_go_one_at_a_time(cluster: str, weights,
                                                               tmp_path: Path,
                                                               monkeypatch) -> None:
    from pipeline.features import on_ray

    media = make_media(tmp_path / "media", {f"s_{i}": (3, None) for i in range(4)})
    common = ("--shard-size", "1", "--audio-model", "none")
    local, on_ray_out = tmp_path / "local", tmp_path / "ray"
    assert main(feature_args(media, local, weights, *common)) == 0
    monkeypatch.setattr(on_ray, "STORE_SHARE", 0.0)  # no chunk fits: one in flight at a time
    waited_on: list[int] = []  # the chunks decoding or encoding, each time the driver waits
    wait = ray.wait
    monkeypatch.setattr(ray, "wait", lambda refs, **k: waited_on.append(len(refs))
                        or wait(refs, **k))
    assert main(feature_args(media, on_ray_out, weights, *common, "--engine", "ray")) == 0
    assert_same_features(local, on_ray_out)
    assert engine_of(on_ray_out)["decode"] == {"decode_tasks": 1, "chunks_in_flight": 3,
                                               "bytes_in_flight": 0}
    assert len(waited_on) == 8 and max(waited_on) == 1  # 4 chunks, each decoded then encoded


def test_features_with_titles_on_ray_equal_local(cluster: str, weights, text_model: Path,
                                                 tmp_path: Path) -> None:
    from pipeline.shards import open_features

    media = make_media(tmp_path / "media", {"a_0": (3, None), "a_1": (2, None),
                                            "b_0": (2, None)})
    titles = tmp_path / "titles.csv"
    titles.write_text("id,text\na,red cat runs\n")
    common = ("--shard-size", "2", "--audio-model", "none", "--text", str(titles),
              "--text-model", str(text_model))
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    assert main(feature_args(media, local, weights, *common)) == 0
    assert main(feature_args(media, on_ray, weights, *common, "--engine", "ray")) == 0
    assert_same_features(local, on_ray)
    with open_features(local) as a, open_features(on_ray) as b:
        assert b.attrs("text") == a.attrs("text")
        for cid in a.clip_ids:
            assert b[cid].text_string == a[cid].text_string
            np.testing.assert_allclose(b[cid].text, a[cid].text, atol=1e-6, rtol=0)
        assert b["b_0"].text.shape == (0, 16) and b["a_1"].text.shape == (5, 16)


def test_clip_features_on_ray_equal_local(cluster: str, weights, tmp_path: Path) -> None:
    """An hf: image encoder through the actors: its preprocessing travels to the decode
    tasks, its model loads in each actor; the shards equal the local engine's."""
    from test_images import tiny_clip

    from pipeline.shards import open_features

    clip = tiny_clip(tmp_path / "clip")
    media = make_media(tmp_path / "media", {"a_0": (3, None), "b_0": (4, None)}, size=(95, 51))
    common = ("--shard-size", "1", "--audio-model", "none", "--image-model", f"hf:{clip}")
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    # feature_args names resnet18 and its weights file; the later --image-* options win.
    assert main([*feature_args(media, local, weights, *common), "--image-weights",
                 "imagenet"]) == 0
    assert main([*feature_args(media, on_ray, weights, *common), "--image-weights",
                 "imagenet", "--engine", "ray"]) == 0
    assert_same_features(local, on_ray)
    with open_features(local) as a, open_features(on_ray) as b:
        assert b.attrs("image")["preprocessing"] == a.attrs("image")["preprocessing"]
        assert b["b_0"].image.shape == (4, 24)


def test_a_killed_feature_actor_is_restarted(cluster: str, weights, tmp_path: Path) -> None:
    media = make_media(tmp_path / "media", {f"k_{i}": (40, 1.0) for i in range(6)})
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    common = ("--shard-size", "1", "--audio-model", "none")
    assert main(feature_args(media, local, weights, *common)) == 0
    killed = while_killing(
        "ray::FeatureActor.encode",
        lambda: main(feature_args(media, on_ray, weights, *common, "--engine", "ray")),
    )
    assert killed, "no feature actor was seen encoding"
    assert_same_features(local, on_ray)
    assert {r["status"] for r in read_manifest(on_ray).values()} == {"ok"}
    assert not [p for p in on_ray.iterdir() if ".tmp-" in p.name]


# --------------------------------------------------------------------------- vpipe run


def test_vpipe_run_with_engine_ray(cluster: str, videos: Path, tmp_path: Path, capsys) -> None:
    good = tmp_path / "videos"
    good.mkdir()
    for i in range(2):
        shutil.copy(videos / f"v{i}.mp4", good)
    wf = tmp_path / "wf.toml"
    wf.write_text(f'inputs = ["{good}"]\nwork_dir = "{tmp_path / "work"}"\nengine = "ray"\n'
                  '[subclip]\ncount = 2\nduration = 1.5\nstart = 0.5\n'
                  '[extract-frames]\nfps = 4\nsize = 48\n', encoding="utf-8")
    assert main(["run", str(wf), "--dry-run"]) == 0
    planned = capsys.readouterr().out.splitlines()
    assert all(line.endswith("--engine ray") for line in planned), planned
    assert main(["run", str(wf), "-q"]) == 0
    assert engine_of(tmp_path / "work" / "extract-frames")["engine"] == "ray"
    # The engine is how a stage runs, not what it writes: a local re-run finds it up to date.
    assert main(["run", str(wf), "--engine", "local"]) == 0
    assert capsys.readouterr().err.count("up to date") >= 2
    local = tmp_path / "local"
    assert main(["run", str(wf), "--engine", "local", "--work-dir", str(local), "-q"]) == 0
    for stage in ("subclip", "extract-frames"):
        # (the inputs of extract-frames are each run's own subclips)
        assert_same_outputs(local / stage, tmp_path / "work" / stage, but=("input",))
