"""`vpipe features`: features equal per-frame references, shard schema, weights, resume, errors.

The input folders are built here the way `vpipe extract-frames` writes them (JPEG frames,
16 kHz s16 wav, manifest records), with small random frames; models are resnet18 and VGGish
with seeded random weights saved to files, so the weights-from-file path is the one tested.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import soundfile as sf
import torch
import torchvision
from conftest import VGGISH_FILE
from PIL import Image

from pipeline.cli import main
from pipeline.records import Run, read_manifest
from pipeline.shards import open_features, read_index, shard_paths


def make_media(folder: Path, clips: dict[str, tuple[int, float | None]], size=(64, 48)) -> Path:
    """An extract-frames style folder: clip id → (n_frames, audio seconds or None)."""
    rng = np.random.default_rng(len(clips))
    run = Run(folder, "extract-frames", {"every": 45, "test": True}).open()
    for cid, (n, audio_s) in clips.items():
        frames = folder / cid / "frames"
        frames.mkdir(parents=True)
        for i in range(n):
            # Smooth random images: JPEG keeps them close, so features differ between frames.
            small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
            Image.fromarray(small).resize(size, Image.BILINEAR).save(frames / f"{i:06d}.jpg")
        rec = {
            "id": cid, "source": cid.rsplit("_", 1)[0], "start": 10.0, "end": 10.0 + n * 0.5,
            "n_frames": n, "timestamps": [round(i * 0.5, 6) for i in range(n)],
            "frames_dir": f"{cid}/frames", "frame_format": "jpg", "has_audio": audio_s is not None,
            "audio": None, "sample_rate": 16000, "n_samples": 0,
        }
        if audio_s is not None:
            t = np.arange(int(audio_s * 16000)) / 16000
            wave = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.shape)
            sf.write(folder / cid / "audio.wav", (wave * 32767).astype(np.int16), 16000,
                     subtype="PCM_16")
            rec.update(audio=f"{cid}/audio.wav", n_samples=t.shape[0])
        run.record(rec)
    run.close()
    return folder


@pytest.fixture(scope="session")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 clips of 2 sources: 3/4/0/3 frames, 2.1 s / 1.0 s / no audio / 0.5 s of audio."""
    return make_media(
        tmp_path_factory.mktemp("m") / "media",
        {"a_0": (3, 2.1), "a_1": (4, 1.0), "b_0": (0, None), "b_1": (3, 0.5)},
    )


def args(media: Path, out: Path, weights: dict[str, Path], *extra: str) -> list[str]:
    return [
        "features", str(media), "-o", str(out), "--image-model", "resnet18",
        "--image-weights", str(weights["image"]), "--audio-weights", str(weights["audio"]),
        "--audio-pca", str(weights["pca"]), "--precision", "fp32", "--batch-size", "4",
        "--workers", "1", "-q", *extra,
    ]


@pytest.fixture(scope="session")
def done(tmp_path_factory: pytest.TempPathFactory, media: Path, weights) -> Path:
    """One uninterrupted run (shard size 2) that several tests read."""
    out = tmp_path_factory.mktemp("f") / "features"
    assert main(args(media, out, weights, "--shard-size", "2")) == 0
    return out


def reference_image(frame_paths: list[Path], weights_file: Path) -> np.ndarray:
    """torchvision resnet18 with fc removed, the weights' transforms, one frame at a time."""
    model = torchvision.models.resnet18()
    model.load_state_dict(torch.load(weights_file))
    model.fc = torch.nn.Identity()
    model.eval()
    t = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.transforms()
    with torch.no_grad():
        rows = [model(t(Image.open(p).convert("RGB"))[None])[0].numpy() for p in frame_paths]
    return np.stack(rows) if rows else np.zeros((0, 512), np.float32)


def reference_audio(wav: Path, weights: dict[str, Path], postprocess: bool) -> np.ndarray:
    """torchvggish's own pipeline: wavfile_to_examples, its VGG, its Postprocessor maths."""
    from torchvggish import vggish_input
    from torchvggish.torchvggish import VGG, Postprocessor, make_layers

    model = VGG(make_layers(), postprocess=False)
    model.load_state_dict(torch.load(weights["audio"]))
    model.eval()
    with torch.no_grad():
        emb = model(vggish_input.wavfile_to_examples(str(wav)))
        if postprocess:
            pp = Postprocessor.__new__(Postprocessor)  # its __init__ downloads the PCA file
            params = torch.load(weights["pca"], weights_only=False)
            pp._pca_matrix = torch.as_tensor(params["pca_eigen_vectors"]).float()
            pp._pca_means = torch.as_tensor(params["pca_means"].reshape(-1, 1)).float()
            emb = pp.postprocess(emb).reshape(-1, 128)
    return emb.numpy()


def assert_close(a: np.ndarray, ref: np.ndarray, rel: float = 1e-4) -> None:
    assert a.shape == ref.shape
    if ref.size:
        assert np.abs(a - ref).max() <= rel * np.abs(ref).max()


def assert_same_features(a_dir: Path, b_dir: Path) -> None:
    """Same clips, same rows; image rows may differ by float rounding of other batchings."""
    with open_features(a_dir) as a, open_features(b_dir) as b:
        assert sorted(a.clip_ids) == sorted(b.clip_ids)
        for cid in b.clip_ids:
            assert_close(a[cid].image, b[cid].image, rel=1e-6)
            np.testing.assert_array_equal(a[cid].image_timestamps, b[cid].image_timestamps)
            np.testing.assert_array_equal(a[cid].audio, b[cid].audio)


def test_image_features_equal_per_frame_reference(done: Path, media: Path, weights) -> None:
    with open_features(done) as store:
        assert sorted(store.clip_ids) == ["a_0", "a_1", "b_0", "b_1"]
        for cid in store.clip_ids:
            n = store[cid].image.shape[0]
            frames = [media / cid / "frames" / f"{i:06d}.jpg" for i in range(n)]
            assert_close(store[cid].image, reference_image(frames, weights["image"]))
        assert store["b_0"].image.shape == (0, 512)


def test_audio_features_equal_torchvggish(done: Path, media: Path, weights) -> None:
    with open_features(done) as store:
        a0 = store["a_0"]
        ref = reference_audio(media / "a_0" / "audio.wav", weights, postprocess=True)
        assert a0.audio.shape == (2, 128)  # 2.1 s → two whole 0.96 s examples
        np.testing.assert_array_equal(a0.audio, ref)  # same float maths, same quantisation
        np.testing.assert_allclose(a0.audio_timestamps, [0.0, 0.96])
        assert store["a_1"].audio.shape == (1, 128)
        assert store["b_1"].audio.shape == (0, 128)  # 0.5 s: shorter than one example
        assert store["b_0"].audio.shape == (0, 128)  # no audio at all


def test_raw_vggish_embeddings_equal_torchvggish(tmp_path: Path, media: Path, weights) -> None:
    out = tmp_path / "f"
    assert main(args(media, out, weights, "--no-audio-postprocess")) == 0
    with open_features(out) as store:
        ref = reference_audio(media / "a_0" / "audio.wav", weights, postprocess=False)
        assert_close(store["a_0"].audio, ref)
        assert store.attrs("audio")["postprocess"] == "none"


def test_schema_datasets_attrs_offsets_and_timestamps(done: Path, media: Path) -> None:
    man = read_manifest(media)
    index = read_index(done)
    assert [p.name for p in shard_paths(done)] == ["shard-00000.h5", "shard-00001.h5"]
    assert [(r["clip_id"], r["shard"], r["row"], r["n_frames"], r["n_audio"]) for r in index] == [
        ("a_0", "shard-00000.h5", 0, 3, 2), ("a_1", "shard-00000.h5", 1, 4, 1),
        ("b_0", "shard-00001.h5", 0, 0, 0), ("b_1", "shard-00001.h5", 1, 3, 0),
    ]
    for p in shard_paths(done):
        with h5py.File(p) as f:
            ids = list(f["clip_ids"].asstr()[:])
            assert set(f.attrs) >= {"schema_version", "vpipe_version", "created"}
            assert set(f["image"].attrs) >= {"model", "weights", "layer", "dim",
                                             "preprocessing", "sampling"}
            assert set(f["audio"].attrs) >= {"model", "weights", "sample_rate", "window_s",
                                             "hop_s", "postprocess", "dim"}
            assert f["image"].attrs["model"] == "resnet18" and f["image"].attrs["dim"] == 512
            pre = json.loads(f["image"].attrs["preprocessing"])
            assert (pre["resize_size"], pre["crop_size"], pre["antialias"]) == (256, 224, True)
            w = json.loads(f["image"].attrs["weights"])
            assert w["kind"] == "file" and len(w["sha256"]) == 64
            assert json.loads(f["image"].attrs["sampling"])["params"]["every"] == 45
            assert (f["audio"].attrs["window_s"], f["audio"].attrs["hop_s"]) == (0.96, 0.96)
            assert f["audio"].attrs["sample_rate"] == 16000
            for m, dim in (("image", 512), ("audio", 128)):
                off = f[m]["offsets"][:]
                assert off.dtype == np.int64 and off.shape == (len(ids) + 1,)
                assert off[0] == 0 and np.all(np.diff(off) >= 0)
                assert off[-1] == f[m]["features"].shape[0] == f[m]["timestamps"].shape[0]
                assert f[m]["features"].shape[1] == dim and f[m]["features"].dtype == np.float32
            off = f["image"]["offsets"][:]
            for i, cid in enumerate(ids):
                ts = f["image"]["timestamps"][off[i]:off[i + 1]]
                np.testing.assert_array_equal(ts, man[cid]["timestamps"])
                assert f["source"].asstr()[i] == man[cid]["source"]
                assert f["start"][i] == man[cid]["start"] and f["end"][i] == man[cid]["end"]
    recs = read_manifest(done)
    assert {k: (r["status"], r["shard"], r["n_frames"]) for k, r in recs.items()} == {
        "a_0": ("ok", "shard-00000.h5", 3), "a_1": ("ok", "shard-00000.h5", 4),
        "b_0": ("ok", "shard-00001.h5", 0), "b_1": ("ok", "shard-00001.h5", 3),
    }
    # Like every stage's manifest, each line names its input (issue 11, 12): the clip's folder.
    assert {k: r["input"] for k, r in recs.items()} == {
        k: str(media / man[k]["frames_dir"]).removesuffix("/frames") for k in recs}


def test_inspect_summarises_and_validates(done: Path, tmp_path: Path, capsys) -> None:
    assert main(["inspect", str(done)]) == 0
    text = capsys.readouterr().out
    assert "2 shards, 4 clips" in text and "10 frames x 512 (resnet18" in text
    assert "3 rows x 128 (vggish" in text and text.strip().endswith("ok")
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in [*shard_paths(done), done / "index.jsonl"]:
        (broken / p.name).write_bytes(p.read_bytes())
    rows = read_index(broken)
    rows[1]["row"], rows[1]["n_frames"] = 0, 3  # a wrong index row
    (broken / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["inspect", str(broken)]) == 1
    assert "clip ids differ from index.jsonl" in capsys.readouterr().err


def test_hub_cache_weights_equal_the_file(tmp_path: Path, media: Path, weights, done,
                                          monkeypatch) -> None:
    ckpt = tmp_path / "torch" / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    for key in ("image", "audio", "pca"):
        (ckpt / weights[key].name).symlink_to(weights[key])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    out = tmp_path / "f"
    cmd = ["features", str(media), "-o", str(out), "--image-model", "resnet18",
           "--precision", "fp32", "--workers", "0", "-q"]  # imagenet / release weights
    assert main(cmd) == 0
    with open_features(out) as hub, open_features(done) as ref:
        w = hub.attrs("image")["weights"]
        assert (w["kind"], w["name"]) == ("hub", "ResNet18_Weights.IMAGENET1K_V1")
        assert hub.attrs("audio")["weights"]["file"] == VGGISH_FILE
        for cid in ref.clip_ids:
            assert_close(hub[cid].image, ref[cid].image)
            np.testing.assert_array_equal(hub[cid].audio, ref[cid].audio)


def test_offline_imagenet_with_empty_cache_fails_clearly(tmp_path: Path, media: Path,
                                                         monkeypatch, capsys) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    for var in ("https_proxy", "HTTPS_PROXY"):  # any download attempt is refused at once
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    out = tmp_path / "f"
    code = main(["features", str(media), "-o", str(out), "--image-model", "resnet18", "-q"])
    err = capsys.readouterr().err
    assert code == 1  # the contract: exit 1 (vpipe run stops: no output was made)
    # One error names all three missing files (not one per run), each with its remedies.
    assert "vpipe: error: 3 weight files are not in the torch hub cache" in err
    assert str(tmp_path / "empty" / "hub" / "checkpoints") in err
    items = [line for line in err.splitlines() if line.startswith("  - ")]
    assert len(items) == 3
    assert "resnet18 IMAGENET1K_V1 weights (resnet18-f37072fd.pth)" in items[0]
    assert "--image-weights PATH" in items[0] and "--image-weights none" in items[0]
    assert "vggish-10086976.pth" in items[1] and "--audio-weights PATH" in items[1]
    assert "vggish_pca_params-970ea276.pth" in items[2]
    assert "--audio-pca PATH" in items[2] and "--no-audio-postprocess" in items[2]
    assert not out.exists() or not list(out.iterdir())


def test_offline_single_missing_pca_suggests_no_postprocess(tmp_path: Path, media: Path, weights,
                                                           monkeypatch, capsys) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    for var in ("https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    out = tmp_path / "f"
    cmd = args(media, out, weights)
    del cmd[cmd.index("--audio-pca"):cmd.index("--audio-pca") + 2]  # the release PCA: missing
    assert main(cmd) == 1
    err = capsys.readouterr().err
    assert "vpipe: error: VGGish PCA weights are not in the cache" in err
    assert "--audio-pca PATH" in err and "--no-audio-postprocess" in err
    assert "vggish_pca_params-970ea276.pth" in err
    assert not out.exists()


def test_random_vggish_with_release_pca_is_a_usage_error(tmp_path: Path, media: Path, weights,
                                                         capsys) -> None:
    out = tmp_path / "f"
    cmd = args(media, out, weights)
    cmd[cmd.index("--audio-weights") + 1] = "none"
    del cmd[cmd.index("--audio-pca"):cmd.index("--audio-pca") + 2]
    assert main(cmd) == 2
    err = capsys.readouterr().err
    assert "--audio-weights none with the release PCA" in err and "--no-audio-postprocess" in err
    assert not out.exists()
    # As the message says: without the PCA, random VGGish runs and is recorded as random.
    assert main([*cmd, "--no-audio-postprocess", "--shard-size", "4"]) == 0
    with open_features(out) as store:
        a = store.attrs("audio")
        assert a["weights"]["kind"] == "random" and a["postprocess"] == "none"
        assert store["a_0"].audio.shape == (2, 128)  # 2.1 s: two 0.96 s examples


def test_subclip_folder_without_from_video_is_a_usage_error(tmp_path: Path, videos: Path,
                                                            weights, capsys) -> None:
    """A `vpipe subclip` folder given without --from-video: exit 2 before anything is made,
    found by its vpipe.json stage or, lacking it, by its records (a path, no frames_dir)."""
    clips = tmp_path / "clips"
    assert main(["subclip", str(videos / "vb.mp4"), "-o", str(clips), "--count", "1",
                 "--duration", "1", "--start", "0.5", "-q"]) == 0
    out = tmp_path / "x11"
    cmd = ["features", str(clips), "-o", str(out), "--image-weights", "none",
           "--audio-model", "none", "-q"]
    assert main(cmd) == 2
    err = capsys.readouterr().err
    assert (f"vpipe: error: {clips} is a `vpipe subclip` folder: run `vpipe extract-frames` on "
            "it first, or add --from-video") in err
    assert not out.exists()
    info = json.loads((clips / "vpipe.json").read_text())
    info["stage"] = "something-else"  # no stage to go by: the records tell
    (clips / "vpipe.json").write_text(json.dumps(info))
    assert main(cmd) == 2
    assert "is a `vpipe subclip` folder" in capsys.readouterr().err
    assert not out.exists()


def test_resume_after_interrupt_equals_uninterrupted_run(tmp_path: Path, media: Path, weights,
                                                         done: Path) -> None:
    from pipeline.features import FeatureOptions, extract_features

    out = tmp_path / "f"
    opts = FeatureOptions(
        image_model="resnet18", image_weights=str(weights["image"]),
        audio_weights=str(weights["audio"]), audio_pca=str(weights["pca"]), precision="fp32",
        batch_size=4, workers=1, shard_size=2,
    )

    def interrupt(path: Path) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract_features([media], out, opts, quiet=True, on_shard=interrupt)
    assert [p.name for p in shard_paths(out)] == ["shard-00000.h5"]
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    summary = extract_features([media], out, opts, quiet=True)
    assert (summary.resumed, summary.done, summary.failed) == (2, 2, 0)
    assert read_index(out) == read_index(done)
    assert_same_features(out, done)
    again = extract_features([media], out, opts, quiet=True)
    assert (again.resumed, again.done) == (4, 0)


def test_missing_or_corrupt_frame_fails_that_clip_only(tmp_path: Path, weights, capsys) -> None:
    media = make_media(tmp_path / "m", {"x_0": (2, None), "y_0": (3, None), "z_0": (2, 1.0)})
    (media / "x_0" / "frames" / "000001.jpg").unlink()
    bad = media / "y_0" / "frames" / "000002.jpg"
    bad.write_bytes(b"not a jpeg")
    out = tmp_path / "f"
    assert main(args(media, out, weights)) == 1
    err = capsys.readouterr().err
    assert f"{media / 'x_0' / 'frames' / '000001.jpg'}: frame file missing" in err
    assert f"{bad}: cannot read frame" in err
    recs = read_manifest(out)
    assert {k: r["status"] for k, r in recs.items()} == {"x_0": "failed", "y_0": "failed",
                                                          "z_0": "ok"}
    assert str(bad) in recs["y_0"]["error"]
    assert [r["clip_id"] for r in read_index(out)] == ["z_0"]
    # Fixed frames: a re-run does the two failed clips, into a new shard.
    Image.new("RGB", (64, 48)).save(media / "x_0" / "frames" / "000001.jpg")
    Image.new("RGB", (64, 48)).save(bad)
    assert main(args(media, out, weights)) == 0
    assert [(r["clip_id"], r["shard"]) for r in read_index(out)] == [
        ("z_0", "shard-00000.h5"), ("x_0", "shard-00001.h5"), ("y_0", "shard-00001.h5")]


def test_changed_parameters_refused_then_overwritten(tmp_path: Path, media: Path, weights,
                                                     capsys) -> None:
    out = tmp_path / "f"
    assert main(args(media, out, weights, "--audio-model", "none")) == 0
    assert main(args(media, out, weights, "--audio-model", "none", "--dtype", "float16")) == 2
    assert "use --overwrite" in capsys.readouterr().err
    assert main(args(media, out, weights, "--audio-model", "none", "--dtype", "float16",
                     "--overwrite")) == 0
    with open_features(out) as store:
        assert store["a_0"].image.dtype == np.float16
        assert store["a_0"].audio.shape == (0, 0)
        assert store.attrs("audio")["model"] == "none"
    assert len(shard_paths(out)) == 1


def test_overwrite_without_vpipe_json_redoes_the_shards_too(tmp_path: Path, media: Path,
                                                           weights, capsys) -> None:
    # Regression (issue 24, hostile pass): with vpipe.json deleted, --overwrite with other
    # parameters kept the old shards ("4 already done") under a record of the new ones.
    out = tmp_path / "f"
    assert main(args(media, out, weights, "--audio-model", "none")) == 0
    (out / "vpipe.json").unlink()
    f16 = args(media, out, weights, "--audio-model", "none", "--dtype", "float16")
    assert main(f16) == 2
    assert "vpipe.json is missing" in capsys.readouterr().err
    assert main([*f16, "--overwrite"]) == 0
    with open_features(out) as store:
        assert {store[c].image.dtype for c in store.clip_ids} == {np.dtype(np.float16)}
    assert len(shard_paths(out)) == 1


def test_what_is_loading_is_said_before_the_bar(tmp_path: Path, media: Path, weights,
                                                capsys) -> None:
    cmd = [a for a in args(media, tmp_path / "f", weights, "--audio-model", "none") if a != "-q"]
    assert main(cmd) == 0
    err = capsys.readouterr().err
    assert err.startswith(f"vpipe features: 4 clips; loading resnet18 ({weights['image']}) ...")


def test_features_after_real_subprocess(tmp_path: Path, media: Path, weights) -> None:
    """The console script end to end (a fresh process, as users run it)."""
    import subprocess
    import sys

    out = tmp_path / "f"
    cmd = [sys.executable, "-m", "pipeline", *args(media, out, weights, "--audio-model", "none",
                                                  "--compression", "gzip")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    with h5py.File(shard_paths(out)[0]) as f:
        assert f["image"]["features"].compression == "gzip"


@pytest.mark.slow
def test_extract_frames_then_features_end_to_end(tmp_path: Path, weights) -> None:
    """A synthetic video through the real `vpipe extract-frames`, then `vpipe features`."""
    import synth

    video = synth.make_video(tmp_path / "v.mp4", duration_s=3.0, fps=25, beeps_at=(1.0,),
                             size=(96, 64))
    media = tmp_path / "media"
    assert main(["extract-frames", str(video), "-o", str(media), "--fps", "2", "--size", "64",
                 "-q"]) == 0
    out = tmp_path / "features"
    assert main(args(media, out, weights)) == 0
    rec = read_manifest(media)["v"]
    assert main(["inspect", str(out)]) == 0
    with open_features(out) as store:
        c = store["v"]
        assert c.image.shape == (rec["n_frames"], 512) == (6, 512)
        np.testing.assert_array_equal(c.image_timestamps, rec["timestamps"])
        frames = [media / rec["frames_dir"] / f"{i:06d}.jpg" for i in range(rec["n_frames"])]
        assert_close(c.image, reference_image(frames, weights["image"]))
        assert c.audio.shape == (3, 128)  # 3.0 s at 16 kHz: three whole 0.96 s examples
        np.testing.assert_array_equal(
            c.audio, reference_audio(media / rec["audio"], weights, postprocess=True))


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_features(tmp_path: Path, weights) -> None:
    """SIGKILL once the first shard is in place; the re-run completes it, nothing lost."""
    import signal
    import subprocess
    import sys
    import time

    media = make_media(tmp_path / "m", {f"k_{i}": (4, 1.0) for i in range(6)})
    out, ref = tmp_path / "killed", tmp_path / "ref"
    cmd = args(media, out, weights, "--shard-size", "1", "--workers", "0", "--audio-model", "none")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *cmd], env=env)
    try:
        while not (out / "shard-00000.h5").exists() and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before it could be killed")
    assert 1 <= len(shard_paths(out)) < 6
    assert main(cmd) == 0
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    assert main(args(media, ref, weights, "--shard-size", "1", "--audio-model", "none")) == 0
    assert [r["clip_id"] for r in read_index(out)] == [r["clip_id"] for r in read_index(ref)]
    assert_same_features(out, ref)
    assert {r["status"] for r in read_manifest(out).values()} == {"ok"}


def test_bf16_precision_is_recorded_and_close_to_fp32(tmp_path: Path, media: Path, weights,
                                                      done: Path) -> None:
    out = tmp_path / "f"
    cmd = args(media, out, weights, "--audio-model", "none")
    cmd[cmd.index("--precision") + 1] = "bf16"
    assert main(cmd) == 0
    with open_features(out) as low, open_features(done) as ref:
        assert low.attrs("image")["precision"] == "bf16"
        assert ref.attrs("image")["precision"] == "fp32"
        for cid in ref.clip_ids:
            assert_close(low[cid].image, ref[cid].image, rel=3e-2)  # bf16: 8-bit mantissa


# --------------------------------------------------------------------------- --from-video


@pytest.fixture(scope="session")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two small synthetic videos (160x120, 25 fps, beeps): 3.0 s and 2.0 s."""
    import synth

    d = tmp_path_factory.mktemp("videos")
    synth.make_video(d / "va.mp4", duration_s=3.0, beeps_at=(1.0,))
    synth.make_video(d / "vb.mp4", duration_s=2.0, beeps_at=(0.5,), color=(200, 60, 30))
    return d


def reference_from_frames(frames: list[np.ndarray], weights_file: Path) -> np.ndarray:
    """The per-frame reference on decoded RGB arrays (PIL images, the weights' transforms)."""
    model = torchvision.models.resnet18()
    model.load_state_dict(torch.load(weights_file))
    model.fc = torch.nn.Identity()
    model.eval()
    t = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.transforms()
    with torch.no_grad():
        rows = [model(t(Image.fromarray(f))[None])[0].numpy() for f in frames]
    return np.stack(rows)


@pytest.fixture(scope="session")
def from_video(tmp_path_factory: pytest.TempPathFactory, videos: Path, weights) -> Path:
    """`vpipe features --from-video --fps 2` on the videos folder, through the CLI."""
    out = tmp_path_factory.mktemp("fv") / "features"
    assert main(args(videos, out, weights, "--from-video", "--fps", "2", "--workers", "2")) == 0
    return out


def test_from_video_features_equal_reference_on_iter_frames(from_video: Path, videos: Path,
                                                            weights) -> None:
    from pipeline.media import iter_frames

    with open_features(from_video) as store:
        assert sorted(store.clip_ids) == ["va", "vb"]
        for cid, seconds in (("va", 3.0), ("vb", 2.0)):
            decoded = list(iter_frames(videos / f"{cid}.mp4", fps=2))
            c = store[cid]
            assert c.image.shape == (len(decoded), 512) == (int(seconds * 2), 512)
            k = np.arange(len(decoded))
            np.testing.assert_array_equal(c.image_timestamps, k / 2)
            np.testing.assert_array_equal(c.image_timestamps, [t for t, _ in decoded])
            assert_close(c.image, reference_from_frames([f for _, f in decoded], weights["image"]))
        assert c.start == 0.0 and c.end == pytest.approx(2.0, abs=0.05)
        sampling = store.attrs("image")["sampling"]
        assert sampling["from_video"] is True and sampling["params"]["fps"] == 2
    info = json.loads((from_video / "vpipe.json").read_text())
    assert info["params"]["from_video"] is True
    assert (info["params"]["fps"], info["params"]["every"]) == (2, None)


def test_from_video_audio_equals_the_jpeg_path(from_video: Path, videos: Path, weights,
                                               tmp_path: Path) -> None:
    """The same clip through extract-frames (its wav) and through --from-video: equal rows."""
    frames = tmp_path / "frames"
    assert main(["extract-frames", str(videos / "va.mp4"), "-o", str(frames), "--fps", "2",
                 "-q"]) == 0
    out = tmp_path / "jpeg"
    assert main(args(frames, out, weights)) == 0
    with open_features(from_video) as fv, open_features(out) as jp:
        a, b = fv["va"], jp["va"]
        assert a.audio.shape == (3, 128)  # 3.0 s at 16 kHz: three 0.96 s examples
        np.testing.assert_array_equal(a.audio, b.audio)
        np.testing.assert_array_equal(a.audio_timestamps, b.audio_timestamps)
        np.testing.assert_array_equal(a.image_timestamps, b.image_timestamps)
    rec = read_manifest(frames)["va"]
    np.testing.assert_array_equal(
        a.audio, reference_audio(frames / rec["audio"], weights, postprocess=True))


def test_from_video_subclip_folder_every_and_resume(tmp_path: Path, videos: Path,
                                                    weights) -> None:
    """A subclip output folder as input, --every 10, shard size 1; a re-run resumes all."""
    clips = tmp_path / "clips"
    assert main(["subclip", str(videos / "va.mp4"), "-o", str(clips), "--count", "2",
                 "--duration", "1", "--start", "0.5", "-q"]) == 0
    recs = {r["id"]: r for r in read_manifest(clips).values() if r["status"] == "ok"}
    assert len(recs) == 2
    out = tmp_path / "f"
    cmd = args(clips, out, weights, "--from-video", "--every", "10", "--shard-size", "1",
               "--audio-model", "none", "--workers", "0")
    assert main(cmd) == 0
    assert len(shard_paths(out)) == 2
    from pipeline.media import iter_frames

    with open_features(out) as store:
        for cid, r in recs.items():
            c = store[cid]
            decoded = list(iter_frames(clips / r["path"], every=10))
            np.testing.assert_array_equal(c.image_timestamps, [t for t, _ in decoded])
            assert (c.source, c.start, c.end) == ("va", r["start"], r["end"])
            assert c.audio.shape == (0, 0)
    before = [p.stat().st_mtime_ns for p in shard_paths(out)]
    assert main(cmd) == 0  # all clips already in shards: nothing redone
    assert [p.stat().st_mtime_ns for p in shard_paths(out)] == before
    changed = [*cmd[:-4], "--audio-model", "none", "--workers", "0"]
    changed[changed.index("--every") + 1] = "5"
    assert main(changed) == 2  # other sampling: refused, as any changed parameter


def test_from_video_bad_video_fails_only_its_clip(tmp_path: Path, videos: Path, weights,
                                                 capsys) -> None:
    import shutil

    import synth

    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(videos / "vb.mp4", src / "good.mp4")
    synth.make_truncated(videos / "va.mp4", src / "cut.mp4", keep=0.5)
    out = tmp_path / "f"
    code = main(args(src, out, weights, "--from-video", "--fps", "2", "--audio-model", "none",
                     "--workers", "0"))
    assert code == 1
    m = read_manifest(out)
    assert m["good"]["status"] == "ok" and m["cut"]["status"] == "failed"
    assert "cut.mp4" in m["cut"]["error"]
    # One line naming the file once, as every stage's item errors do.
    assert f"vpipe features: {src / 'cut.mp4'}: truncated" in capsys.readouterr().err
    with open_features(out) as store:
        assert store.clip_ids == ["good"] and store["good"].image.shape == (4, 512)


def test_a_wav_unlike_its_record_fails_its_clip_naming_the_cause(tmp_path: Path, videos: Path,
                                                                 weights, capsys) -> None:
    # Regression (issue 24, 3): `head -c 1000` of a 2 s wav was encoded as no audio (ok,
    # n_audio 0, no line); the extract-frames record says how many samples it must hold.
    frames = tmp_path / "frames"
    assert main(["extract-frames", str(videos), "-o", str(frames), "--fps", "2", "-q"]) == 0
    assert read_manifest(frames)["vb"]["n_samples"] == 2 * 16000
    cut = frames / "vb" / "audio.wav"
    cut.write_bytes(cut.read_bytes()[:1000])  # a 44-byte header: 478 samples are left
    media = make_media(tmp_path / "m", {"c_0": (2, 1.0), "c_1": (2, 1.0), "c_2": (2, 1.0)})
    junk, slow, empty = (media / c / "audio.wav" for c in ("c_0", "c_1", "c_2"))
    junk.write_bytes(b"not a wav at all")
    sf.write(slow, sf.read(slow, dtype="int16")[0], 8000, subtype="PCM_16")  # same samples
    empty.write_bytes(empty.read_bytes()[:44])  # the header alone
    out = tmp_path / "f"
    cmd = args(frames, out, weights)
    assert main([*cmd[:2], str(media), *cmd[2:]]) == 1
    errors = {k: r.get("error") for k, r in read_manifest(out).items()}
    assert errors == {
        "va": None,
        "vb": f"{cut}: holds 478 samples, the extract-frames record says 32000 (changed since; "
              "run extract-frames again)",
        "c_0": f"{junk}: not a readable wav (Format not recognised.)",
        "c_1": f"{slow}: its samples are at 8000 Hz, the extract-frames record says 16000 Hz",
        "c_2": f"{empty}: holds 0 samples, the extract-frames record says 16000 (changed "
               "since; run extract-frames again)",
    }
    err = capsys.readouterr().err.splitlines()
    assert [e for e in err if "audio.wav" in e] == [f"vpipe features: {e}" for e in
                                                     (errors["vb"], *list(errors.values())[2:])]
    # A wav that holds what its record says is read as before: torchvggish's own examples.
    with open_features(out) as store:
        np.testing.assert_array_equal(
            store["va"].audio, reference_audio(frames / "va" / "audio.wav", weights, True))


class WavReadWhere:
    """VGGish's audio input that also says which process read each wav."""

    rate_hz = 16000

    def from_wav(self, path, n_samples=None, rate_hz=None):
        from pipeline.features.encoders.vggish import wav_examples

        return wav_examples(path, n_samples, rate_hz), os.getpid()


@pytest.mark.parametrize("workers", [1, 0])
def test_a_clips_wav_is_read_by_the_worker_decoding_its_last_frame(tmp_path: Path,
                                                                   workers: int) -> None:
    """The log-mel examples of frame folders are made in the loader workers, not in the
    process that runs the models (there only for a clip without frames); the same examples."""
    from pipeline.features.encoders.image import Preprocessing
    from pipeline.features.encoders.vggish import wav_examples
    from pipeline.features.options import FeatureOptions
    from pipeline.features.sources import Decoding, FrameFolders

    media = make_media(tmp_path / "m", {"a_0": (5, 2.1), "b_0": (0, 1.5), "c_0": (3, 1.2),
                                        "d_0": (2, None)})
    source = FrameFolders([media])
    jobs = source.clips()
    for job in jobs:
        source.prepare(job)
    dec = Decoding(Preprocessing(crop_size=32, resize_size=32), WavReadWhere())
    opts = FeatureOptions(workers=workers, batch_size=2)
    done = {jobs[j].id: (out, err) for b in source.batches(jobs, dec, opts)
            for j, out, err in b.done}
    assert list(done) == ["a_0", "b_0", "c_0", "d_0"] and done["d_0"] == (None, None)
    here = os.getpid()
    for cid in ("a_0", "b_0", "c_0"):
        (ex, times), pid = done[cid][0]
        want = wav_examples(media / cid / "audio.wav")
        torch.testing.assert_close(ex, want[0], rtol=0, atol=0)
        np.testing.assert_array_equal(times, want[1])
        assert ex.shape[0] >= 1 and (pid == here) == (cid == "b_0" or workers == 0), cid


def test_from_video_clip_failing_in_the_decoder_fails_only_itself(tmp_path: Path, videos: Path,
                                                                  weights, capsys) -> None:
    """A subclip-style folder whose middle clip file is damaged after it was recorded: the
    error comes from the loader worker's decode, and only that clip fails."""
    import shutil

    import synth

    clips = tmp_path / "clips"
    run = Run(clips, "subclip", {"test": True}).open()
    (clips / "v").mkdir()
    for i, name in enumerate(("va", "cut", "vb")):
        if name == "cut":
            synth.make_truncated(videos / "va.mp4", clips / "v" / "v_1.mp4", keep=0.6)
        else:
            shutil.copy(videos / f"{name}.mp4", clips / "v" / f"v_{i}.mp4")
        run.record({"id": f"v_{i}", "item": "v", "source": "v", "path": f"v/v_{i}.mp4",
                    "start": 10.0 * i, "end": 10.0 * i + 2.0, "status": "ok"})
    run.close()
    out = tmp_path / "f"
    code = main(args(clips, out, weights, "--from-video", "--fps", "2", "--shard-size", "2",
                     "--workers", "2"))
    assert code == 1
    m = read_manifest(out)
    assert [m[c]["status"] for c in ("v_0", "v_1", "v_2")] == ["ok", "failed", "ok"]
    assert "v_1.mp4" in m["v_1"]["error"]
    with open_features(out) as store:
        assert sorted(store.clip_ids) == ["v_0", "v_2"]
        assert store["v_0"].image.shape == (6, 512) and store["v_2"].image.shape == (4, 512)
        assert (store["v_2"].start, store["v_2"].end) == (20.0, 22.0)


def test_fps_without_from_video_is_a_usage_error(tmp_path: Path, media: Path, weights) -> None:
    assert main(args(media, tmp_path / "f", weights, "--fps", "2")) == 2


def test_from_video_resume_after_interrupt_equals_uninterrupted(tmp_path: Path, videos: Path,
                                                                 weights, from_video: Path) -> None:
    """Library call: interrupted after the first shard (1 clip each), the re-run completes
    the other clip and the store equals the uninterrupted CLI run's."""
    from pipeline.features import FeatureOptions, extract_features

    out = tmp_path / "f"
    opts = FeatureOptions(
        image_model="resnet18", image_weights=str(weights["image"]),
        audio_weights=str(weights["audio"]), audio_pca=str(weights["pca"]), precision="fp32",
        batch_size=4, workers=1, shard_size=1, from_video=True, fps=2.0,
    )

    def interrupt(path: Path) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract_features([videos], out, opts, quiet=True, on_shard=interrupt)
    assert [p.name for p in shard_paths(out)] == ["shard-00000.h5"]
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    summary = extract_features([videos], out, opts, quiet=True)
    assert (summary.resumed, summary.done, summary.failed) == (1, 1, 0)
    assert len(shard_paths(out)) == 2
    assert_same_features(out, from_video)


def test_video_stream_class_unpickles_in_a_fresh_process() -> None:
    """A spawned loader worker unpickles the --from-video dataset by its module name."""
    import pickle
    import subprocess
    import sys

    from pipeline.features.sources import VideoFrameStream

    stream = VideoFrameStream([(0, "x.mp4")], None, 4, 2.0, None, False)
    code = ("import pickle, sys; o = pickle.loads(sys.stdin.buffer.read()); "
            "print(type(o).__module__, type(o).__qualname__, o.args[0], o.args[3])")
    got = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(stream),
                         capture_output=True, check=True).stdout.decode().split()
    assert got == ["pipeline.features.sources", "VideoFrameStream", "[(0,", "'x.mp4')]", "2.0"]


def test_unusable_weights_files_are_one_line_usage_errors(tmp_path: Path, media: Path, weights,
                                                          capsys) -> None:
    """Exit 2 (so `vpipe run` stops), one line saying what is wrong, no output folder."""
    r34 = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), r34)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(weights["image"].read_bytes()[:5000])
    # The PCA file: not a torch file, or eigenvectors of the wrong shape (which used to fail
    # at the first clip's shard write, with a traceback, after the folder was made).
    junk = tmp_path / "junk.pth"
    junk.write_text("hello")
    small = tmp_path / "small.pth"
    torch.save({"pca_eigen_vectors": np.zeros((64, 128)), "pca_means": np.zeros(128)}, small)
    out = tmp_path / "f"
    for kind, bad, expected in (
        ("image", r34, "does not fit resnet18 (96 unexpected keys, e.g. 'layer1.2."),
        ("image", cut, "not a readable resnet18 state dict ("),
        ("pca", junk, "not a readable PCA parameters file (UnpicklingError"),
        ("pca", small, "PCA eigenvectors (64, 128) and means 128: VGGish needs"),
    ):
        assert main(args(media, out, {**weights, kind: bad})) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"vpipe: error: {bad}: {expected}") and err.count("\n") == 1
        assert not out.exists()


def test_frames_extracted_again_with_other_options_are_not_resumed(tmp_path: Path, weights,
                                                                   capsys) -> None:
    """Regression: the old clips' rows were kept ("already done") after their frames were
    re-extracted with other options into the same folder: stale features, no warning."""
    media = make_media(tmp_path / "m", {"x_0": (2, None), "y_0": (3, None)})
    out = tmp_path / "f"
    cmd = args(media, out, weights, "--audio-model", "none")
    assert main(cmd) == 0
    info = json.loads((media / "vpipe.json").read_text())
    info["params"]["every"] = 10  # as `vpipe extract-frames --every 10 --overwrite` leaves it
    (media / "vpipe.json").write_text(json.dumps(info))
    assert main(cmd) == 2
    assert "with other parameters (frames: [{" in capsys.readouterr().err
    assert main([*cmd, "--overwrite"]) == 0
    assert json.loads((out / "vpipe.json").read_text())["params"]["frames"] == [info["params"]]


def test_index_is_appended_per_shard_not_rebuilt(tmp_path: Path, weights, monkeypatch) -> None:
    """Regression: every finished shard reread all the shards to rebuild index.jsonl, which
    made `--shard-size 1` runs quadratic (~1 s per new shard at 1000 shards)."""
    from pipeline import shards

    media = make_media(tmp_path / "m", {f"c_{i}": (1, None) for i in range(5)})
    calls = []
    real = shards.rebuild_index
    monkeypatch.setattr(shards, "rebuild_index", lambda folder: calls.append(1) or real(folder))
    out = tmp_path / "f"
    assert main(args(media, out, weights, "--audio-model", "none", "--shard-size", "1")) == 0
    assert len(calls) == 1  # once, at the start of the run
    assert read_index(out) == real(out)
    assert [r["shard"] for r in read_index(out)] == [f"shard-0000{i}.h5" for i in range(5)]


def test_a_damaged_shard_stops_the_rerun_with_one_line(tmp_path: Path, media: Path, weights,
                                                       capsys) -> None:
    out = tmp_path / "f"
    cmd = args(media, out, weights, "--audio-model", "none", "--shard-size", "2")
    assert main(cmd) == 0
    shard = shard_paths(out)[1]
    shard.write_bytes(shard.read_bytes()[:300])  # a copy cut short: used to be a traceback
    assert main(cmd) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vpipe: error: {shard}: damaged shard, cannot be read (")
    assert err.count("\n") == 1 and "delete it and run again" in err
    shard.unlink()
    assert main(cmd) == 0
    assert len(read_index(out)) == 4 and main(["inspect", str(out)]) == 0


def test_overwritten_floats_are_found_by_inspect_and_recomputed_after_delete(
        tmp_path: Path, media: Path, weights, capsys) -> None:
    """Regression (issue 11, 4): a shard whose floats were overwritten after it was written was
    used silently. inspect names it; deleting it and re-running recomputes the same features."""
    import h5py

    out = tmp_path / "f"
    cmd = args(media, out, weights, "--audio-model", "none", "--shard-size", "2")
    assert main(cmd) == 0
    shard = shard_paths(out)[0]
    before = shard.read_bytes()
    with h5py.File(shard) as f:
        offset = f["image/features"].id.get_chunk_info(0).byte_offset
    with open_features(out) as store:
        ref = {c.clip_id: c.image for c in store}
    damaged = bytearray(before)
    damaged[offset + 8: offset + 12] = b"\x01\x02\x03\x04"
    shard.write_bytes(bytes(damaged))
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 1
    captured = capsys.readouterr()
    assert f"invalid: {shard.name}: damaged shard, /image/features fails its fletcher32 " \
           "checksum" in captured.err
    shard.unlink()
    assert main(cmd) == 0 and main(["inspect", str(out)]) == 0  # its clips in a new shard
    with open_features(out) as store:
        assert sorted(store.clip_ids) == sorted(ref)
        for c in store:
            np.testing.assert_array_equal(c.image, ref[c.clip_id])
