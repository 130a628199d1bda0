"""`vpipe features --video-model`: clip-level video features (torchvision video classifiers).

Clips are frame-numbered synthetic videos at 10 frames/s; the video model sees them at 5
frames/s (frame k at k/5 s), in windows of T=4 frames every S=3, so every count and time below
is derived from the clip's length: a 2.0 s clip has 10 frames at 5/s (0.0 .. 1.8 s), windows
start at frames 0, 3, 6 (0.0, 0.6, 1.2 s) and end at their last frame + 0.2 s; the window that
would start at frame 9 is cut short (dropped). A 0.5 s clip has 3 frames: one window, its last
frame repeated once (padded). r3d_18's weights are a seeded random state dict the test saves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from synth import make_video

from pipeline.cli import main
from pipeline.features.encoders.video import Windowing, cut_windows, window_starts
from pipeline.shards import open_features, read_index

R3D_URL_FILE = "r3d_18-b3b3357e.pth"


@pytest.fixture(scope="module")
def r3d_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("vw") / "r3d.pth"
    torch.save(torchvision.models.video.r3d_18().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("vclips")
    make_video(d / "long.mp4", duration_s=2.0, fps=10, audio=False)
    make_video(d / "short.mp4", duration_s=0.5, fps=10, audio=False)
    return d


def video_args(clips: Path, out: Path, weights: str, *extra: str) -> list[str]:
    return ["features", str(clips), "-o", str(out), "--from-video", "--fps", "1",
            "--image-model", "resnet18", "--image-weights", "none", "--audio-model", "none",
            "--video-model", "r3d_18", "--video-weights", weights, "--video-fps", "5",
            "--video-frames", "4", "--video-stride", "3", "--precision", "fp32",
            "--workers", "0", "-q", *extra]


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory, clips: Path, r3d_file: Path) -> Path:
    out = tmp_path_factory.mktemp("vf") / "features"
    assert main(video_args(clips, out, str(r3d_file))) == 0
    return out


def reference_rows(video: Path, weights_file: Path, starts: list[int], t: int) -> np.ndarray:
    """torchvision's r3d_18 with fc removed on its weights' own transforms of the frames at
    5/s, window by window (the last frame repeated where a window runs out)."""
    from pipeline.media import iter_frames

    frames = [torch.from_numpy(f).permute(2, 0, 1) for _, f in iter_frames(video, fps=5)]
    model = torchvision.models.video.r3d_18()
    model.load_state_dict(torch.load(weights_file))
    model.fc = torch.nn.Identity()
    model.eval()
    preset = torchvision.models.video.R3D_18_Weights.DEFAULT.transforms()
    rows = []
    with torch.no_grad():
        for s in starts:
            win = [frames[min(k, len(frames) - 1)] for k in range(s, s + t)]
            rows.append(model(preset(torch.stack(win))[None])[0].numpy())
    return np.stack(rows)


def test_windows_counts_times_and_features_equal_torchvision(done: Path, clips: Path,
                                                             r3d_file: Path) -> None:
    with open_features(done) as store:
        long, short = store["long"], store["short"]
        np.testing.assert_allclose(long.video_times, [[0.0, 0.8], [0.6, 1.4], [1.2, 2.0]])
        np.testing.assert_allclose(short.video_times, [[0.0, 0.5]])  # the clip's end
        assert (long.video_padded, short.video_padded) == (0, 1)
        assert (long.video_dropped, short.video_dropped) == (1, 0)
        ref = reference_rows(clips / "long.mp4", r3d_file, [0, 3, 6], 4)
        assert np.abs(long.video - ref).max() <= 1e-4 * np.abs(ref).max()
        ref = reference_rows(clips / "short.mp4", r3d_file, [0], 4)
        assert np.abs(short.video - ref).max() <= 1e-4 * np.abs(ref).max()
        attrs = store.attrs("video")
        assert (attrs["model"], attrs["dim"], attrs["fps"], attrs["frames"], attrs["stride"]) == (
            "r3d_18", 512, 5.0, 4, 3)
        assert attrs["preprocessing"]["preset"] == "R3D_18_Weights.KINETICS400_V1.transforms()"
        assert attrs["weights"]["kind"] == "file" and attrs["precision"] == "fp32"
        assert long.image.shape == (2, 512)  # the image encoder runs beside it
    info = json.loads((done / "vpipe.json").read_text())
    assert info["video"] == {"windows": 4, "padded_clips": 1, "dropped_windows": 1}
    assert (info["params"]["video_model"], info["params"]["video_frames"]) == ("r3d_18", 4)
    assert {r["clip_id"]: r["n_video"] for r in read_index(done)} == {"long": 3, "short": 1}


def test_window_frames_are_those_at_the_recorded_times() -> None:
    """Frame k carries the number k: each window holds frames start..start+T-1."""
    w = Windowing(fps=5.0, frames=4, stride=3)
    frames = [torch.full((3, 2, 2), k, dtype=torch.uint8) for k in range(11)]
    win = cut_windows(frames, [k / 5 for k in range(11)], w, (2, 2))
    assert [[int(f[0, 0, 0]) for f in x] for x in win.frames] == [
        [0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    np.testing.assert_allclose(win.start, [0.0, 0.6, 1.2])
    np.testing.assert_allclose(win.end, [0.8, 1.4, 2.0])
    assert (win.padded, win.dropped) == (0, 1)  # the window at frame 9 is cut short
    assert window_starts(12, Windowing(5.0, 4, 4)) == ([0, 4, 8], 0, 0)
    assert window_starts(13, Windowing(5.0, 4, 2)) == ([0, 2, 4, 6, 8], 0, 2)
    assert window_starts(0, w) == ([], 0, 0)
    for n in range(12):  # the streaming cutter makes the windows the arithmetic says
        for t, s in ((1, 1), (3, 1), (3, 2), (4, 4), (2, 5)):
            cut = cut_windows(frames[:n], [k / 5 for k in range(n)], Windowing(5.0, t, s), (2, 2))
            starts, padded, dropped = window_starts(n, Windowing(5.0, t, s))
            assert [int(x[0, 0, 0, 0]) for x in cut.frames] == starts
            assert (cut.padded, cut.dropped) == (padded, dropped)
    short = cut_windows(frames[:2], [0.0, 0.2], w, (2, 2))
    assert [int(f[0, 0, 0]) for f in short.frames[0]] == [0, 1, 1, 1]
    assert (short.padded, short.end.tolist()) == (2, [0.4])
    # A clip of 0.3 s: its window ends where the clip does; a later end changes nothing.
    assert [cut_windows(frames[:2], [0.0, 0.2], w, (2, 2), until=u).end.tolist()
            for u in (0.3, 0.5)] == [[0.3], [0.4]]


def test_hub_cache_default_weights_equal_the_file(tmp_path: Path, clips: Path, r3d_file: Path,
                                                  done: Path, monkeypatch) -> None:
    ckpt = tmp_path / "torch" / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / R3D_URL_FILE).symlink_to(r3d_file)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    out = tmp_path / "f"
    argv = video_args(clips, out, "default")
    argv[argv.index("--precision") + 1] = "auto"  # on a CPU: the video model stays fp32
    assert main(argv) == 0
    with open_features(out) as hub, open_features(done) as ref:
        w = hub.attrs("video")["weights"]
        assert (w["kind"], w["name"]) == ("hub", "R3D_18_Weights.KINETICS400_V1")
        assert hub.attrs("video")["precision"] == "fp32"
        np.testing.assert_array_equal(hub["long"].video, ref["long"].video)


def test_offline_default_weights_fail_clearly(tmp_path: Path, clips: Path, monkeypatch,
                                              capsys) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    for var in ("https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    out = tmp_path / "f"
    assert main(video_args(clips, out, "default")) == 1
    err = capsys.readouterr().err
    assert "vpipe: error: r3d_18 KINETICS400_V1 weights are not in the cache" in err
    assert f"$TORCH_HOME/hub/checkpoints/{R3D_URL_FILE}" in err
    assert "--video-weights PATH" in err and "--video-weights none" in err
    assert not out.exists() or not list(out.iterdir())


@pytest.mark.parametrize(("extra", "said"), [
    (["--video-fps", "0"], "--video-fps must be > 0"),
    (["--video-frames", "0"], "--video-frames must be > 0"),
    (["--video-model", "resnet18"], "--video-model 'resnet18': not a torchvision video "
     "classifier; use one of mc3_18, mvit_v1_b"),
    (["--video-model", "r3d18"], "did you mean r3d_18"),
    (["--video-model", "s3d", "--video-frames", "4"], "--video-frames 4: s3d needs at least 14"),
    (["--video-model", "mvit_v2_s", "--video-frames", "32"], "--video-frames 32: mvit_v2_s "
     "takes exactly 16 frames a window"),
    (["--video-weights", "KINETICS"], "--video-weights KINETICS: neither default, none, one of "
     "r3d_18's weights (KINETICS400_V1), nor an existing file"),
])
def test_bad_video_options_are_usage_errors(tmp_path: Path, clips: Path, extra: list[str],
                                            said: str, capsys) -> None:
    out = tmp_path / "f"
    argv = video_args(clips, out, "none")
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        argv[argv.index(flag) + 1] = value
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert said in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_video_model_needs_from_video(tmp_path: Path, clips: Path, capsys) -> None:
    argv = video_args(clips, tmp_path / "f", "none")
    argv.remove("--from-video")
    argv[argv.index("--fps"):argv.index("--fps") + 2] = []
    assert main(argv) == 2
    assert "--video-model reads the clips' frames from video: add --from-video" in (
        capsys.readouterr().err)


def test_a_video_model_as_image_model_points_to_video_model(tmp_path: Path, clips: Path,
                                                            capsys) -> None:
    argv = ["features", str(clips), "-o", str(tmp_path / "f"), "--from-video",
            "--image-model", "r3d_18", "-q"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--image-model 'r3d_18': a video classifier" in err
    assert "--video-model r3d_18" in err and "loading" not in err


@pytest.mark.parametrize(("name", "frames", "dim"), [
    ("s3d", 14, 1024), ("r2plus1d_18", 4, 512), ("mvit_v2_s", 16, 768)])
def test_rows_equal_torchvision_on_one_window(tmp_path: Path, name: str, frames: int,
                                              dim: int) -> None:
    """The classifier's last linear layer removed (s3d's is a 1x1x1 conv, averaged as the
    model does; MViT's the head's Linear): rows equal torchvision's own model, its last layer
    replaced by Identity, on its own preset's transform of the same frames (weights from a
    state-dict file), within 1e-4 in fp32."""
    from types import SimpleNamespace

    from pipeline.features.encoders.torchvision_video import TorchvisionVideo, classifier_last

    torch.manual_seed(5)
    ref = torchvision.models.get_model(name).eval()
    path = tmp_path / f"{name}.pth"
    torch.save(ref.state_dict(), path)
    opts = SimpleNamespace(video_weights=str(path), video_fps=None, video_frames=frames,
                           video_stride=None, from_video=True)
    enc = TorchvisionVideo.load(name, opts, TorchvisionVideo.resolve(name, opts, []))
    assert enc.dim == dim and enc.windowing.frames == frames
    rng = np.random.default_rng(0)
    rgb = [rng.integers(0, 256, (90, 120, 3), dtype=np.uint8) for _ in range(frames)]
    win = torch.stack([enc.preprocessing.uint8_frame(f) for f in rgb])[None]
    with torch.no_grad():
        got = enc.model(enc.preprocessing.normalize(win)).numpy()
        ref.set_submodule(classifier_last(ref)[0], torch.nn.Identity())
        preset = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        want = ref(preset(torch.stack([torch.from_numpy(f).permute(2, 0, 1) for f in rgb]))[None])
    want = want.numpy()
    assert got.shape == (1, dim)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_inspect_checks_and_summarises_the_video_group(done: Path, capsys) -> None:
    assert main(["inspect", str(done)]) == 0
    out = capsys.readouterr().out
    assert "  video: 4 windows x 512 (r3d_18, weights r3d.pth, 4 frames at 5.0/s every 3)" in out


def test_a_clip_that_does_not_decode_fails_alone_with_one_line(tmp_path: Path, clips: Path,
                                                               capsys) -> None:
    """With --video-model as without: a truncated clip fails with one line naming it (its
    windows dropped with it); the other clip is whole."""
    import shutil

    from synth import make_truncated

    from pipeline.records import read_manifest

    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(clips / "short.mp4", src / "good.mp4")
    long = make_video(tmp_path / "v" / "long.mp4", duration_s=4.0, fps=10, audio=False)
    make_truncated(long, src / "cut.mp4", keep=0.5)
    out = tmp_path / "f"
    argv = video_args(src, out, "none")
    argv.remove("-q")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"vpipe features: {src / 'cut.mp4'}: truncated" in err
    assert read_manifest(out)["cut"]["status"] == "failed"
    with open_features(out) as store:
        assert store.clip_ids == ["good"] and store["good"].n("video") == 1


def test_one_decode_serves_image_audio_and_video(tmp_path: Path, monkeypatch) -> None:
    """Adding --video-model opens no file more than image + audio alone: its frames come from
    the same decode (every container open is counted, the plan's demux pass included)."""
    import importlib

    decode_mod = importlib.import_module("pipeline.media.decode")  # not media.decode, a function
    probe_mod = importlib.import_module("pipeline.media.probe")

    clip = make_video(tmp_path / "v" / "a.mp4", duration_s=1.0, fps=10, audio=True)
    opened: list[str] = []
    real = probe_mod.open_container

    def counted(path, *a, **k):
        opened.append(str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(probe_mod, "open_container", counted)
    monkeypatch.setattr(decode_mod, "open_container", counted)
    base = ["features", str(clip.parent), "--from-video", "--fps", "1", "--image-model",
            "resnet18", "--image-weights", "none", "--audio-weights", "none",
            "--no-audio-postprocess", "--workers", "0", "--precision", "fp32", "-q"]
    assert main([*base, "-o", str(tmp_path / "iv")]) == 0
    without = opened.count(str(clip))
    opened.clear()
    assert main([*base, "-o", str(tmp_path / "iva"), "--video-model", "r3d_18",
                 "--video-weights", "none", "--video-frames", "4", "--video-fps", "5"]) == 0
    assert opened.count(str(clip)) == without
    with open_features(tmp_path / "iva") as store, open_features(tmp_path / "iv") as ref:
        c = store["a"]
        assert c.n("video") == 1 and c.n("audio") == ref["a"].n("audio") > 0
        np.testing.assert_array_equal(c.audio, ref["a"].audio)
        np.testing.assert_array_equal(c.image_timestamps, ref["a"].image_timestamps)


@pytest.mark.parametrize("span", [None, (0.5, 1.7)])
def test_the_windows_frames_are_the_frames_at_their_times(tmp_path: Path, span) -> None:
    """The video encoder's frames (decode's second sampler, at 5/s) are the frame-numbered
    video's frames on screen at k/5 s, and the image frames are those of the image sampler
    alone: one decode, two rates (whole file and a range of it)."""
    from synth import frame_index

    from pipeline.media import FrameSampler, decode

    v = make_video(tmp_path / "n.mp4", duration_s=2.0, fps=10, audio=False)
    both = list(decode(v, sampler=FrameSampler(fps=1), span=span, also=FrameSampler(fps=5)))
    alone = list(decode(v, sampler=FrameSampler(fps=1), span=span))
    first = 0 if span is None else 5
    n = 10 if span is None else 6
    got = [(t, frame_index(x)) for kind, t, x in both if kind == "also"]
    assert got == [(round(k / 5, 6), first + 2 * k) for k in range(n)]
    assert [(t, frame_index(x)) for kind, t, x in both if kind == "frame"] == [
        (t, frame_index(x)) for _, t, x in alone]


def test_video_on_ray_equals_local(done: Path, clips: Path, r3d_file: Path, tmp_path: Path,
                                   local_ray: str) -> None:
    """--engine ray on a local cluster: the decode tasks cut the windows, the actors encode
    them; the shards' video rows, times and padding equal the local engine's."""
    out = tmp_path / "ray"
    assert main([*video_args(clips, out, str(r3d_file)), "--engine", "ray"]) == 0
    with open_features(out) as on_ray, open_features(done) as local:
        assert sorted(on_ray.clip_ids) == sorted(local.clip_ids)
        assert on_ray.attrs("video") == local.attrs("video")
        for cid in local.clip_ids:
            a, b = on_ray[cid], local[cid]
            assert np.abs(a.video - b.video).max() <= 1e-5 * np.abs(b.video).max()
            np.testing.assert_array_equal(a.video_times, b.video_times)
            assert (a.video_padded, a.video_dropped) == (b.video_padded, b.video_dropped)
    assert json.loads((out / "vpipe.json").read_text())["video"] == {
        "windows": 4, "padded_clips": 1, "dropped_windows": 1}


def test_predict_on_new_videos_makes_video_features_as_the_run_did(tmp_path: Path, r3d_file,
                                                                   monkeypatch, capsys) -> None:
    """`vpipe predict RUN VIDEOS` replays `features --from-video --video-model ...` on a new
    video; its predictions equal those from the same features command run by hand."""
    for i, rgb in enumerate([(30, 30, 30), (200, 40, 40), (40, 200, 40), (220, 220, 220)]):
        make_video(tmp_path / "videos" / f"v{i}.mp4", duration_s=1.0, fps=10, size=(64, 48),
                   color=rgb, audio=False)
    fresh = make_video(tmp_path / "new" / "blue.mp4", duration_s=1.0, fps=10, size=(64, 48),
                       color=(40, 40, 200), audio=False)
    (tmp_path / "labels.csv").write_text("id,label\nv0,1\nv1,2\nv2,3\nv3,4\n")
    monkeypatch.chdir(tmp_path)

    def vpipe(*argv: str) -> int:  # a stage records the command line it ran as (sys.argv)
        monkeypatch.setattr("sys.argv", ["vpipe", *argv])
        return main(list(argv))

    feats = ["--from-video", "--fps", "1", "--image-model", "resnet18", "--image-weights",
             "none", "--audio-model", "none", "--video-model", "r3d_18", "--video-weights",
             str(r3d_file), "--video-fps", "5", "--video-frames", "4", "--precision", "fp32",
             "--workers", "0", "-q"]
    assert vpipe("features", "videos", "-o", "feats", *feats) == 0
    assert vpipe("train", "feats", "--labels", "labels.csv", "-o", "run", "--modalities",
                 "video", "--epochs", "1", "--hidden", "8", "--val-fraction", "0.25",
                 "--test-fraction", "0.25", "--device", "cpu", "-q") == 0
    capsys.readouterr()
    assert main(["predict", "run", str(fresh), "-o", "auto.jsonl"]) == 0
    assert "--video-model r3d_18" in capsys.readouterr().err
    assert main(["features", str(fresh.parent), "-o", "hand", *feats]) == 0
    assert main(["predict", "run", "hand", "-o", "hand.jsonl", "-q"]) == 0
    auto, hand = ([json.loads(x) for x in Path(p).read_text().splitlines()]
                  for p in ("auto.jsonl", "hand.jsonl"))
    assert [p["id"] for p in auto] == [p["id"] for p in hand] and auto
    for a, h in zip(auto, hand, strict=True):
        assert a["prediction"] == pytest.approx(h["prediction"], rel=1e-6, abs=1e-6)


def test_same_video_options_resume_and_other_ones_are_refused(done: Path, clips: Path,
                                                              r3d_file: Path, capsys) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in done.glob("shard-*.h5")}
    capsys.readouterr()
    argv = video_args(clips, done, str(r3d_file))
    argv.remove("-q")
    assert main(argv) == 0
    assert "0 done, 2 already done" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in done.glob("shard-*.h5")} == before
    argv[argv.index("--video-stride") + 1] = "4"
    assert main(argv) == 2
    assert "video_stride" in capsys.readouterr().err


def test_a_long_clips_windows_are_handed_over_as_they_complete(tmp_path: Path) -> None:
    """A loader worker holds at most WINDOW_BATCH_FRAMES frames of windows: a clip of 9
    windows of 16 frames comes out in two hand-overs (8, then 1 with the clip's end), the same
    windows as cutting the whole clip at once."""
    from pipeline.features.encoders.image import Preprocessing
    from pipeline.features.encoders.video import (
        WINDOW_BATCH_FRAMES,
        VideoInput,
        VideoPreprocessing,
    )
    from pipeline.features.sources import iter_video_batches
    from pipeline.media import iter_frames

    v = make_video(tmp_path / "long.mp4", duration_s=6.0, fps=25, size=(32, 24), audio=False)
    pre = VideoPreprocessing((16,), (16, 16), (0.5,) * 3, (0.25,) * 3)
    video = VideoInput(pre, Windowing(25.0, 16, 16))
    batches = list(iter_video_batches([(0, str(v), None, None, None)], Preprocessing(), 64,
                                      1.0, None, None, video))
    handed = [chunk for b in batches for _, chunk in b[4]]
    assert [c.frames.shape[0] for c in handed] == [WINDOW_BATCH_FRAMES // 16, 1]
    assert (handed[-1].padded, handed[-1].dropped) == (0, 1)  # 150 frames: 9 x 16 + 6
    assert batches[-1][3] == [(0, 6, None, None)]  # the clip's end, after its last windows

    frames = [pre.uint8_frame(f) for _, f in iter_frames(v, fps=25)]
    whole = cut_windows(frames, [k / 25 for k in range(len(frames))], video.windowing, (16, 16))
    assert torch.equal(torch.cat([c.frames for c in handed]), whole.frames)
    np.testing.assert_array_equal(np.concatenate([c.start for c in handed]), whole.start)


def tiny_video_model(kind: str) -> tuple[Any, Any]:
    """A tiny transformers video model (4 frames of 32 px) and its own forward to rows."""
    from transformers import VideoMAEConfig, VideoMAEModel, XCLIPConfig, XCLIPModel

    torch.manual_seed(0)
    if kind == "vjepa2":
        from transformers import VJEPA2Config, VJEPA2Model

        model = VJEPA2Model(VJEPA2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2.0,
            crop_size=32, frames_per_clip=4, patch_size=16, tubelet_size=2, pred_hidden_size=16,
            pred_num_hidden_layers=1, pred_num_attention_heads=2, pred_num_mask_tokens=2)).eval()
        return model, lambda px: model.get_vision_features(pixel_values_videos=px).mean(1)
    if kind == "videomae":
        model = VideoMAEModel(VideoMAEConfig(
            image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=32,
            num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)).eval()
        return model, lambda px: model(pixel_values=px).last_hidden_state.mean(1)
    small = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
             "num_attention_heads": 2}
    model = XCLIPModel(XCLIPConfig(
        text_config={**small, "vocab_size": 100, "max_position_embeddings": 16},
        vision_config={**small, "image_size": 32, "patch_size": 16, "num_frames": 4,
                       "mit_hidden_size": 16, "mit_intermediate_size": 32,
                       "mit_num_hidden_layers": 1, "mit_num_attention_heads": 2},
        projection_dim=16, prompt_layers=1, prompt_num_attention_heads=2)).eval()
    return model, lambda px: model.get_video_features(pixel_values=px).pooler_output


@pytest.mark.parametrize(("kind", "layer", "dim"), [
    ("videomae", "last_hidden_state, mean over the tokens", 32),
    ("xclip", "get_video_features (the projected video embedding)", 16),
    ("vjepa2", "get_vision_features (the encoder's tokens), mean over the tokens", 32)])
def test_a_tiny_transformers_video_model_equals_its_own_forward(
        tmp_path: Path, clips: Path, kind: str, layer: str, dim: int) -> None:
    """hf:DIR (saved with save_pretrained): each window's row is the model's pooled video
    embedding (VideoMAE: its last hidden state's mean over the tokens; X-CLIP:
    get_video_features) on the frames its own processor prepares, within 1e-4 in fp32."""
    from PIL import Image
    from transformers import VideoMAEImageProcessor

    from pipeline.media import iter_frames

    model, forward = tiny_video_model(kind)
    if kind == "vjepa2":  # V-JEPA 2 ships a video processor config only
        from transformers import VJEPA2VideoProcessor

        video_proc = VJEPA2VideoProcessor(size={"shortest_edge": 36},
                                          crop_size={"height": 32, "width": 32})
        video_proc.save_pretrained(tmp_path / kind)

        def proc(windows, return_tensors):
            return {"pixel_values": video_proc([[np.asarray(f) for f in w] for w in windows],
                                               return_tensors=return_tensors)["pixel_values_videos"]}
    else:
        proc = VideoMAEImageProcessor(size={"shortest_edge": 36},
                                      crop_size={"height": 32, "width": 32})
        proc.save_pretrained(tmp_path / kind)
    model.save_pretrained(tmp_path / kind)
    out = tmp_path / "f"
    argv = video_args(clips, out, "default")
    argv[argv.index("r3d_18")] = f"hf:{tmp_path / kind}"
    i = argv.index("--video-frames")
    del argv[i:i + 2]  # the config's num_frames (4)
    assert main(argv) == 0
    frames = [Image.fromarray(f) for _, f in iter_frames(clips / "long.mp4", fps=5)]
    with torch.no_grad():
        want = np.stack([forward(proc([frames[s:s + 4]], return_tensors="pt")
                                 ["pixel_values"])[0].numpy() for s in (0, 3, 6)])
    with open_features(out) as store:
        got = store["long"].video
        assert store.attrs("video")["layer"] == layer
        assert store.attrs("video")["weights"]["kind"] == "folder"
    assert got.shape == (3, dim)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
