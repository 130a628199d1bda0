"""A full disk (issue 11, item 9): the real CLI on a real tmpfs too small for its outputs.

Each stage runs into a tmpfs mounted in a private mount namespace (``unshare``), sized from
the outputs of an uninterrupted run so that the disk fills after some items are done. It must
stop with one line naming what it was writing, exit 1, leave nothing half-written, and the
same command on the same disk grown (``mount -o remount,size=``) must complete to the result
of the uninterrupted run.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import synth
import torch

from pipeline.cli import main
from pipeline.errors import DiskFull
from pipeline.files import atomic_path, disk_full, disk_full_said
from pipeline.lock import LOCK
from pipeline.records import MANIFEST, RUN_INFO, read_manifest
from pipeline.shards import open_features

PAGE = os.sysconf("SC_PAGE_SIZE")  # tmpfs counts a file's size in whole pages
VPIPE = [sys.executable, "-m", "pipeline"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def pages(path: Path) -> int:
    """Pages a file, or every file under a folder, takes on a tmpfs."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(-(-p.stat().st_size // PAGE) for p in files)


def _unshare() -> list[str]:
    return ["unshare", "--mount"] if os.geteuid() == 0 else [
        "unshare", "--user", "--map-root-user", "--mount"]


@pytest.fixture(scope="session")
def namespaces(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Skip where this machine cannot make a mount namespace with a tmpfs in it."""
    probe = tmp_path_factory.mktemp("probe")
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) to make a mount namespace with")
    r = subprocess.run([*_unshare(), "sh", "-c", f"mount -t tmpfs -o size=8k tmpfs {probe}"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a mount namespace here: {r.stderr.strip()}")


@dataclass
class Step:
    rc: int
    err: str
    disk: Path  # where the tmpfs was mounted (the paths the command saw)
    after: Path  # a copy of the disk as the command left it


def on_small_disk(tmp_path: Path, size: int, cmd: list[str], grown: int) -> tuple[Step, Step]:
    """``cmd`` (``DISK`` in it: the tmpfs) on a ``size``-byte tmpfs, then again once the
    same disk is grown to ``grown`` bytes; what each said and left."""
    disk = tmp_path / "disk"
    disk.mkdir()
    line = shlex.join([*VPIPE, *cmd]).replace("DISK", str(disk))
    script = [f"mount -t tmpfs -o size={size} tmpfs {disk} || exit 1"]
    for n in (1, 2):
        if n == 2:
            script.append(f"mount -o remount,size={grown} {disk} || exit 1")
        script += [f"{line} 2> {tmp_path}/err{n}; echo $? > {tmp_path}/rc{n}",
                   f"mkdir {tmp_path}/after{n} && cp -a {disk}/. {tmp_path}/after{n}/ || exit 1"]
    r = subprocess.run([*_unshare(), "sh", "-c", "\n".join(script)], env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return tuple(
        Step(int((tmp_path / f"rc{n}").read_text()), (tmp_path / f"err{n}").read_text(), disk,
             tmp_path / f"after{n}")
        for n in (1, 2)
    )


def vpipe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*VPIPE, *args], env=ENV, capture_output=True, text=True, timeout=600)


def assert_nothing_half_written(out: Path) -> list[dict]:
    """No temp file anywhere; every manifest line parses; returns the manifest's lines."""
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    lines = (out / MANIFEST).read_text(encoding="utf-8").splitlines()
    return [json.loads(x) for x in lines]


def assert_stopped(step: Step, stage: str, writing: str) -> None:
    """Exit 1 and one line, naming ``writing`` (a path in the disk); vpipe.json of the output
    folder (the first part of ``writing``) not stamped as ended."""
    assert step.rc == 1, step.err
    assert step.err.splitlines() == [
        f"vpipe {stage}: no space left on device writing {step.disk / writing}"]
    out = step.after / Path(writing).parts[0]
    assert json.loads((out / RUN_INFO).read_text())["ended"] is None


# --------------------------------------------------------------------------- the error itself


def test_a_full_disk_names_the_output_a_temp_name_becomes_and_survives_a_worker():
    e = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write() raises it: no file name
    full = disk_full(e, "out/.v3_0.tmp-123/frames/000004.jpg")
    assert str(full) == "no space left on device writing out/v3_0/frames/000004.jpg"
    quota = disk_full(OSError(errno.EDQUOT, "quota", "out/.shard-00002.h5.tmp-9"), "elsewhere")
    assert str(quota) == "disk quota exceeded writing out/shard-00002.h5"  # its own file first
    assert disk_full(OSError(errno.EIO, "I/O error"), "out/x") is None
    assert disk_full(ValueError("no"), "out/x") is None
    back = pickle.loads(pickle.dumps(full))  # from a worker process to the stage
    assert isinstance(back, DiskFull) and str(back) == str(full)
    said = disk_full_said("[out#1/mp4 @ 0x55] Error closing file: No space left on device")
    assert str(disk_full(said, "out/v2")) == "no space left on device writing out/v2"
    assert disk_full_said("moov atom not found") is None


def test_atomic_path_turns_a_full_disk_into_one_error_and_leaves_nothing(tmp_path):
    target = tmp_path / "clip"
    with pytest.raises(DiskFull, match=f"no space left on device writing {target}$"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "a.jpg").write_bytes(b"x")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- item stages


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six 2 s frame-numbered videos with sound."""
    folder = tmp_path_factory.mktemp("videos")
    for i in range(6):
        synth.make_video(folder / f"v{i}.mp4", duration_s=2.0, fps=25, beeps_at=(0.5,))
    return folder


@pytest.mark.parametrize("stage,workers", [("extract-frames", "1"), ("extract-frames", "2"),
                                           ("extract-audio", "1")])
def test_a_full_disk_stops_the_clip_stages_with_one_line_and_a_rerun_completes(
    namespaces, videos, tmp_path, stage, workers
):
    cmd = [stage, str(videos), "--workers", workers, "-q"]
    ref = tmp_path / "ref"
    r = vpipe(*cmd, "-o", str(ref))
    assert r.returncode == 0, r.stderr
    clips = [rec["id"] for rec in read_manifest(ref).values()]
    assert clips == [f"v{i}" for i in range(6)]
    # Room for the records and three clips, and half of the fourth: it stops there.
    records = 2 * pages(ref / RUN_INFO) + pages(ref / MANIFEST) + 1  # + the lock
    size = records + sum(pages(ref / c) for c in clips[:3]) + pages(ref / clips[3]) // 2
    full, again = on_small_disk(tmp_path, size * PAGE, [*cmd, "-o", "DISK/out"], 4 * size * PAGE)

    out = full.after / "out"
    done = [rec["id"] for rec in assert_nothing_half_written(out)]
    assert all(rec["status"] == "ok" for rec in read_manifest(out).values())
    assert 1 <= len(done) < len(clips)
    for c in done:  # what is recorded is whole
        assert sorted(p.name for p in (out / c).rglob("*")) == sorted(
            p.name for p in (ref / c).rglob("*"))
    if workers == "1":  # in input order: the first clip not recorded is the one it stopped on
        assert done == clips[:3]
        assert_stopped(full, stage, f"out/{clips[3]}")
    else:
        assert full.rc == 1 and len(full.err.splitlines()) == 1
        assert full.err.startswith(f"vpipe {stage}: no space left on device writing ")

    assert again.rc == 0, again.err
    out = again.after / "out"
    assert read_manifest(out) == read_manifest(ref)
    for c in clips:
        for p in (ref / c).rglob("*"):
            if p.is_file():
                assert (out / p.relative_to(ref)).read_bytes() == p.read_bytes()
    assert not (out / LOCK).exists()
    counts = json.loads((out / RUN_INFO).read_text())["counts"]
    assert counts["done"] + counts["already_done"] == len(clips)
    assert counts["already_done"] >= len(done) - (workers != "1")


def test_a_full_disk_stops_subclip_with_one_line_and_a_rerun_completes(
    namespaces, videos, tmp_path
):
    cmd = ["subclip", str(videos), "--count", "2", "--duration", "0.8", "--start", "0",
           "--workers", "1", "-q"]
    ref = tmp_path / "ref"
    r = vpipe(*cmd, "-o", str(ref))
    assert r.returncode == 0, r.stderr
    sources = [f"v{i}" for i in range(6)]
    records = 2 * pages(ref / RUN_INFO) + pages(ref / MANIFEST) + 1
    size = records + sum(pages(ref / s) for s in sources[:3]) + pages(ref / sources[3]) // 2
    full, again = on_small_disk(tmp_path, size * PAGE, [*cmd, "-o", "DISK/out"], 4 * size * PAGE)

    out = full.after / "out"
    assert {rec["item"] for rec in assert_nothing_half_written(out)} == set(sources[:3])
    assert_stopped(full, "subclip", f"out/{sources[3]}")
    assert again.rc == 0, again.err
    out = again.after / "out"
    assert read_manifest(out) == read_manifest(ref)
    for s in sources:
        for p in (ref / s).iterdir():
            assert (out / s / p.name).read_bytes() == p.read_bytes()


# --------------------------------------------------------------------------- features


FEATURES = ["--image-model", "resnet18", "--image-weights", "none", "--audio-weights", "none",
            "--no-audio-postprocess", "--precision", "fp32", "--batch-size", "4",
            "--shard-size", "2", "--workers", "1", "-q"]


@pytest.mark.slow
def test_a_full_disk_stops_features_cleanly_and_a_rerun_completes(namespaces, tmp_path):
    """No h5py traceback, no segfault: the shard in progress removed, one line naming it."""
    from test_features import assert_same_features, make_media

    media = make_media(tmp_path / "media", {f"c_{i}": (3, 1.0) for i in range(8)})
    ref = tmp_path / "ref"
    r = vpipe("features", str(media), "-o", str(ref), *FEATURES)
    assert r.returncode == 0, r.stderr
    shards = sorted(ref.glob("shard-*.h5"))
    assert len(shards) == 4
    # The records, two whole shards and half of the third: it stops writing shard 2.
    records = sum(pages(ref / f) for f in (RUN_INFO, MANIFEST, "index.jsonl")) + 2
    size = records + pages(shards[0]) + pages(shards[1]) + pages(shards[2]) // 2
    full, again = on_small_disk(tmp_path, size * PAGE, ["features", str(media), "-o", "DISK/out",
                                                        *FEATURES], 4 * size * PAGE)

    out = full.after / "out"
    lines = assert_nothing_half_written(out)
    assert sorted(p.name for p in out.glob("shard-*.h5")) == [shards[0].name, shards[1].name]
    assert [rec["id"] for rec in lines] == [f"c_{i}" for i in range(4)]
    assert_stopped(full, "features", f"out/{shards[2].name}")

    assert again.rc == 0, again.err
    out = again.after / "out"
    assert sorted(p.name for p in out.glob("shard-*.h5")) == [p.name for p in shards]
    assert_same_features(out, ref)
    assert {k: r["status"] for k, r in read_manifest(out).items()} == {
        k: r["status"] for k, r in read_manifest(ref).items()}
    assert main(["inspect", str(out)]) == 0


# --------------------------------------------------------------------------- train


TRAIN = ["--epochs", "4", "--patience", "4", "--hidden", "16", "--device", "cpu", "-q"]


@pytest.mark.slow
def test_a_full_disk_stops_train_and_the_same_command_resumes_it(namespaces, tmp_path):
    from pipeline.train.synthetic import make_feature_set

    folder = tmp_path / "set"
    csv, _ = make_feature_set(folder, "classification", n_sources=12, audio_dim=0, seed=1)
    cmd = ["train", str(folder), "--labels", str(csv), *TRAIN]
    ref = tmp_path / "ref"
    r = vpipe(*cmd, "-o", str(ref))
    assert r.returncode == 0, r.stderr
    # What the folder holds after epoch 1 (metrics.jsonl then has one line), and one page:
    # epoch 2 cannot write its checkpoints beside those of epoch 1.
    first = sum(pages(ref / f) for f in ("config.json", "splits.json", RUN_INFO, "best.pt",
                                         "last.pt")) + 1 + 1  # metrics.jsonl, the lock
    size = first + 1
    full, again = on_small_disk(tmp_path, size * PAGE, [*cmd, "-o", "DISK/run"], 8 * size * PAGE)

    run = full.after / "run"
    assert not [p for p in run.iterdir() if ".tmp-" in p.name]
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1]
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1
    stopped_on = full.err.strip().rsplit("/", 1)[-1]
    assert stopped_on in ("best.pt", "last.pt"), full.err
    assert_stopped(full, "train", f"run/{stopped_on}")

    assert again.rc == 0, again.err
    run = again.after / "run"
    for name in ("best.pt", "last.pt"):
        a = torch.load(ref / name, weights_only=True)["model"]
        b = torch.load(run / name, weights_only=True)["model"]
        assert all(torch.equal(v, b[k]) for k, v in a.items())
    strip = [{k: v for k, v in json.loads(x).items() if k != "seconds"}
             for x in (ref / "metrics.jsonl").read_text().splitlines()]
    assert strip == [{k: v for k, v in json.loads(x).items() if k != "seconds"}
                     for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert json.loads((run / RUN_INFO).read_text())["counts"]["already_done"] == 1
    assert not (run / LOCK).exists()


def test_a_full_disk_stops_a_workflow_at_the_stage_it_met(namespaces, videos, tmp_path):
    # The stages after a stage a full disk stopped would each meet the same disk: not run.
    wf = tmp_path / "wf.toml"
    wf.write_text(f'name = "wf"\ninputs = ["{videos}"]\n\n[extract-frames]\nevery = 10\n\n'
                  '[features]\nimage-model = "resnet18"\nimage-weights = "none"\n'
                  'audio-model = "none"\nworkers = 0\n', encoding="utf-8")
    ref = tmp_path / "ref"
    r = vpipe("run", str(wf), "--work-dir", str(ref), "--quiet")
    assert r.returncode == 0, r.stderr
    frames = ref / "extract-frames"
    clips = sorted(rec["id"] for rec in read_manifest(frames).values())
    records = 2 * pages(frames / RUN_INFO) + pages(frames / MANIFEST) + 1
    size = records + sum(pages(frames / c) for c in clips[:3]) + pages(frames / clips[3]) // 2
    full, again = on_small_disk(tmp_path, size * PAGE,
                                ["run", str(wf), "--work-dir", "DISK/work"], 40 * size * PAGE)
    assert full.rc == 1, full.err
    said = [x for x in full.err.splitlines() if "no space left" in x]
    assert len(said) == 1 and said[0].startswith(
        f"vpipe extract-frames: no space left on device writing {full.disk / 'work'}/")
    assert "vpipe run [2/2]" not in full.err  # features did not start
    assert " features " in full.err and "not run" in full.err  # the summary table says so
    assert again.rc == 0, again.err
    with open_features(again.after / "work" / "features") as store:
        assert sorted(store.clip_ids) == clips
