"""Augmented views (`extract-frames --augment SPEC --views K`): what a view is made of,
reproducibility, and each transform checked against what it must do to known pictures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import synth
from PIL import Image
from test_frames import beep_onsets, frame_indices, manifest, wav_samples

from pipeline.cli import main
from pipeline.media import ffmpeg_exe
from pipeline.media.augment import Augment


def records(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "manifest.jsonl").read_text().splitlines()]


def frames_of(out: Path, rec: dict) -> list[np.ndarray]:
    files = sorted((out / rec["frames_dir"]).iterdir())
    return [np.asarray(Image.open(f).convert("RGB")).astype(int) for f in files]


def test_views_are_items_of_their_own_naming_their_clip_and_values(numbered_video, tmp_path):
    out = tmp_path / "media"
    assert main(["extract-frames", str(numbered_video), "-o", str(out), "--fps", "2",
                 "--augment", "hflip,rotate=10,noise=0.02,speed=0.9-1.1,gain=6",
                 "--views", "3", "-q"]) == 0
    recs = manifest(out)
    assert list(recs) == ["numbered", "numbered~1", "numbered~2", "numbered~3"]
    assert "view_of" not in recs["numbered"] and "augment" not in recs["numbered"]
    for k in (1, 2, 3):
        v = recs[f"numbered~{k}"]
        assert (v["view_of"], v["view"], v["item"], v["source"]) == ("numbered", k, "numbered",
                                                                     "numbered")
        a = v["augment"]
        assert set(a) == {"hflip", "rotate", "noise", "speed", "gain"}
        assert -10 <= a["rotate"] <= 10 and 0 <= a["noise"] <= 0.02
        assert 0.9 <= a["speed"] <= 1.1 and -6 <= a["gain"] <= 6
        assert (out / v["frames_dir"]).is_dir() and (out / v["audio"]).is_file()
        # The view lasts the clip's duration over its speed; its frames are 2 per view second.
        dur = 8.0 / a["speed"]
        assert v["end"] - v["start"] == pytest.approx(dur, abs=1e-5)
        assert v["timestamps"] == pytest.approx([i / 2 for i in range(v["n_frames"])], abs=1e-9)
        assert v["n_frames"] == len([i for i in range(40) if i / 2 < dur - 1e-9])
    assert len({json.dumps(recs[f"numbered~{k}"]["augment"]) for k in (1, 2, 3)}) == 3
    params = json.loads((out / "vpipe.json").read_text())["params"]
    assert params["views"] == 3 and params["augment_seed"] == 0
    assert params["augment"] == "hflip=0.5,rotate=-10..10,noise=0..0.02,speed=0.9..1.1,gain=-6..6"
    # The same command again: nothing redone.
    assert main(["extract-frames", str(numbered_video), "-o", str(out), "--fps", "2",
                 "--augment", "hflip,rotate=10,noise=0.02,speed=0.9-1.1,gain=6",
                 "--views", "3", "-q"]) == 0
    assert json.loads((out / "vpipe.json").read_text())["counts"]["already_done"] == 1


def test_the_same_seed_makes_the_same_views_and_another_seed_others(numbered_video, tmp_path):
    spec = ["--augment", "crop=0.7,jitter=0.3,noise=0.05,rotate=15,anoise=0.01", "--views", "2"]
    runs = []
    for name, seed in (("a", "0"), ("b", "0"), ("c", "7")):
        out = tmp_path / name
        assert main(["extract-frames", str(numbered_video), "-o", str(out), "--fps", "1",
                     "--format", "png", *spec, "--augment-seed", seed, "-q"]) == 0
        runs.append(out)
    a, b, c = (manifest(r) for r in runs)
    for k in (1, 2):
        vid = f"numbered~{k}"
        assert a[vid]["augment"] == b[vid]["augment"] != c[vid]["augment"]
        for fa, fb in zip(sorted((runs[0] / vid / "frames").iterdir()),
                          sorted((runs[1] / vid / "frames").iterdir()), strict=True):
            assert fa.read_bytes() == fb.read_bytes()
        assert (runs[0] / vid / "audio.wav").read_bytes() == (runs[1] / vid / "audio.wav"
                                                               ).read_bytes()
    # The clip itself is untouched by views: the same bytes as a run without them.
    plain = tmp_path / "plain"
    assert main(["extract-frames", str(numbered_video), "-o", str(plain), "--fps", "1",
                 "--format", "png", "-q"]) == 0
    for fa, fp in zip(sorted((runs[0] / "numbered" / "frames").iterdir()),
                      sorted((plain / "numbered" / "frames").iterdir()), strict=True):
        assert fa.read_bytes() == fp.read_bytes()
    assert "views" not in json.loads((plain / "vpipe.json").read_text())["params"]


def test_hflip_mirrors_every_frame_exactly(numbered_video, tmp_path):
    out = tmp_path / "media"
    assert main(["extract-frames", str(numbered_video), "-o", str(out), "--fps", "1",
                 "--format", "png", "--augment", "hflip=1", "--views", "1", "-q"]) == 0
    recs = manifest(out)
    assert recs["numbered~1"]["augment"] == {"hflip": True}
    clip, view = frames_of(out, recs["numbered"]), frames_of(out, recs["numbered~1"])
    assert len(clip) == len(view) == 8
    for f, v in zip(clip, view, strict=True):
        assert np.array_equal(v, f[:, ::-1])


def square_centre(rgb: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(rgb.mean(axis=2) > 128)
    return float(xs.mean()), float(ys.mean())


def test_rotation_turns_the_picture_counter_clockwise_about_its_centre(tmp_path):
    """A white square in the top right of a black frame: rotated by 90 degrees it is in the
    top left, at the point the rotation takes its centre to."""
    src = tmp_path / "arrow.mp4"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i",
                    "color=black:s=160x120:d=2:r=10,drawbox=x=110:y=10:w=20:h=20:"
                    "color=white:t=fill", "-c:v", "libx264", "-pix_fmt", "yuv444p", "-crf",
                    "0", str(src)], check=True)
    out = tmp_path / "media"
    assert main(["extract-frames", str(src), "-o", str(out), "--fps", "1", "--format", "png",
                 "--size", "0", "--augment", "rotate=90-90", "--views", "1", "-q"]) == 0
    recs = manifest(out)
    assert recs["arrow~1"]["augment"] == {"rotate": 90.0}
    (x, y), = {square_centre(f) for f in frames_of(out, recs["arrow"])}
    cx, cy = 80 - 0.5, 60 - 0.5  # the centre of a 160x120 picture, in pixel indices
    assert (x, y) == pytest.approx((119.5, 19.5), abs=0.6)
    for f in frames_of(out, recs["arrow~1"]):
        # Counter-clockwise on screen (y points down): (dx, dy) -> (dy, -dx).
        assert square_centre(f) == pytest.approx((cx + (y - cy), cy - (x - cx)), abs=0.6)


def test_speed_samples_the_clip_at_its_factor_and_stretches_the_audio(numbered_video,
                                                                       tmp_path):
    out = tmp_path / "media"
    assert main(["extract-frames", str(numbered_video), "-o", str(out), "--fps", "5",
                 "--size", "0", "--augment", "speed=1.25-1.25", "--views", "1", "-q"]) == 0
    v = manifest(out)["numbered~1"]
    assert v["augment"] == {"speed": 1.25}
    # 8 s at 1.25x: 6.4 s, frames at i/5 s of the view, each the source's at 1.25 i/5 s.
    assert v["n_frames"] == 32 and v["timestamps"] == pytest.approx([i / 5 for i in range(32)])
    assert frame_indices(out, v) == [int(i * 1.25 / 5 * 25 + 1e-9) for i in range(32)]
    # The audio lasts exactly as long, each beep (1.0 s and 5.0 s of the clip) at its time
    # over 1.25: its energy's centre within 15 ms (atempo overlaps ~40 ms windows).
    x, rate, _, _ = wav_samples(out / v["audio"])
    clip, _, _, _ = wav_samples(out / manifest(out)["numbered"]["audio"])
    assert v["n_samples"] == len(x) == 6.4 * 16000
    assert len(beep_onsets(x, rate)) == 2
    for at in (1.0, 5.0):
        assert energy_centre(x, rate, at / 1.25) == pytest.approx(
            energy_centre(clip, rate, at) / 1.25, abs=0.015)


def energy_centre(x: np.ndarray, rate: int, near: float) -> float:
    """The centre of the sound's energy within 0.4 s of ``near`` (seconds)."""
    lo = int((near - 0.4) * rate)
    seg = np.abs(x[lo:lo + int(0.8 * rate)].astype(float))
    return float((seg * (lo + np.arange(len(seg)))).sum() / seg.sum() / rate)


def test_gain_scales_the_audio_by_its_decibels(numbered_video, tmp_path):
    out = tmp_path / "media"
    assert main(["extract-frames", str(numbered_video), "-o", str(out), "--fps", "1",
                 "--augment", "gain=-6..-6", "--views", "1", "-q"]) == 0
    recs = manifest(out)
    clip, _, _, _ = wav_samples(out / recs["numbered"]["audio"])
    view, _, _, _ = wav_samples(out / recs["numbered~1"]["audio"])
    assert len(view) == len(clip)
    expected = np.clip(np.rint(clip * 10 ** (-6 / 20)), -32768, 32767)
    assert np.array_equal(view, expected.astype(np.int16))


def test_audio_only_views_of_a_clip_without_audio_are_said_to_be_copies(tmp_path, capsys):
    silent = synth.make_video(tmp_path / "silent.mp4", duration_s=1.0, fps=10, audio=False)
    sound = synth.make_video(tmp_path / "sound.mp4", duration_s=1.0, fps=10)
    out = tmp_path / "media"
    assert main(["extract-frames", str(silent), str(sound), "-o", str(out), "--fps", "2",
                 "--augment", "gain", "--views", "2", "-q"]) == 0
    assert capsys.readouterr().err.strip().splitlines() == [
        "vpipe extract-frames: warning: --augment gain changes only the audio: the views of 1 "
        "clip without audio are copies of their clip (e.g. silent)"]
    recs = records(out)
    assert all(np.array_equal(a, b) for a, b in zip(frames_of(out, recs[0]),
                                                    frames_of(out, recs[1]), strict=True))
    # a spec that changes the frames too says nothing
    assert main(["extract-frames", str(silent), "-o", str(tmp_path / "m2"), "--fps", "2",
                 "--augment", "gain,hflip=1", "--views", "1", "-q"]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(("args", "said"), [
    (["--views", "2"], "--views needs --augment"),
    (["--augment", "hflip"], "give --views"),
    (["--augment", "blur", "--views", "1"], "unknown transform 'blur'"),
    (["--augment", "rotate=x", "--views", "1"], "rotate=x: not a number"),
    (["--augment", "speed=0.2-1", "--views", "1"], "outside 0.5..2"),
    (["--augment", "speed=0.9-1.1", "--views", "1", "--every", "5"], "needs --fps"),
    (["--augment", "hflip,hflip", "--views", "1"], "hflip given twice"),
    # a range's high end would be ignored (the flip is drawn with probability LOW)
    (["--augment", "hflip=0.2-0.9", "--views", "1"], "hflip=0.2-0.9: a probability, one"),
    # the strength 1.5 makes factors -0.5..2.5: the message says so, not just the limits
    (["--augment", "jitter=1.5", "--views", "1"], "jitter=1.5: draws -0.5..2.5, outside 0..10"),
    # audio-only transforms with no audio written: every view a copy of its clip
    (["--augment", "gain,anoise", "--views", "1", "--no-audio"], "every view would be a copy"),
])
def test_a_bad_spec_is_one_line_before_anything_is_written(numbered_video, tmp_path, capsys,
                                                          args, said):
    out = tmp_path / "media"
    assert main(["extract-frames", str(numbered_video), "-o", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert said in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_drawn_values_stay_in_their_ranges():
    aug = Augment.parse("hflip=0.3,rotate=5,crop=0.6,jitter=0.1,noise=0.01,speed=0.8-1.2,"
                        "gain=3,anoise=0.002")
    flips = []
    for k in range(1, 200):
        v = aug.draw("clip", k)
        flips.append(v["hflip"])
        assert -5 <= v["rotate"] <= 5 and 0.6 <= v["crop"]["scale"] <= 1
        assert all(0.9 <= j <= 1.1 for j in v["jitter"].values())
        assert 0.8 <= v["speed"] <= 1.2 and -3 <= v["gain"] <= 3 and v["anoise"] <= 0.002
    assert 0.2 < sum(flips) / len(flips) < 0.4


def test_views_train_with_their_clip_and_never_reach_val_or_test(tmp_path, monkeypatch):
    """The chain through the CLI: 12 one-colour videos (the label is the colour, which a flip
    and noise do not change), 2 views of each; features (resnet18, random weights as asked);
    a run whose val and test sources' views are left out, and whose predictions are of clips."""
    monkeypatch.chdir(tmp_path)

    def vpipe(args: list[str]) -> int:  # as from a shell: the stage records its command
        monkeypatch.setattr(sys, "argv", ["vpipe", *args])
        return main(args)

    colours = {"red": (200, 30, 30), "blue": (30, 30, 200)}
    rows = ["id,label"]
    for i in range(12):
        name = "red" if i % 2 else "blue"
        synth.make_video(f"videos/v{i:02d}.mp4", duration_s=1.0, fps=10, color=colours[name],
                         audio=False)
        rows.append(f"v{i:02d},{name}")
    Path("labels.csv").write_text("\n".join(rows) + "\n")
    assert vpipe(["extract-frames", "videos", "-o", "media", "--fps", "4", "--size", "64",
                 "--no-audio", "--augment", "hflip,noise=0.02", "--views", "2", "-q"]) == 0
    assert vpipe(["features", "media", "-o", "feat", "--image-model", "resnet18",
                 "--image-weights", "none", "--audio-model", "none", "--workers", "0",
                 "-q"]) == 0
    index = [json.loads(ln) for ln in Path("feat/index.jsonl").read_text().splitlines()]
    assert len(index) == 36
    assert {r["clip_id"]: r.get("view_of") for r in index if "~" in r["clip_id"]} == {
        f"v{i:02d}~{k}": f"v{i:02d}" for i in range(12) for k in (1, 2)}
    assert main(["train", "feat", "--labels", "labels.csv", "-o", "run", "--epochs", "2",
                 "--val-fraction", "0.25", "--test-fraction", "0.25", "--threads", "1",
                 "--device", "cpu", "-q"]) == 0
    splits = json.loads(Path("run/splits.json").read_text())
    clips = {s: [c for c in ids if "~" not in c] for s, ids in splits.items()}
    assert [len(clips[s]) for s in ("train", "val", "test")] == [6, 3, 3]
    assert sorted(c for c in splits["train"] if "~" in c) == sorted(
        f"{c}~{k}" for c in clips["train"] for k in (1, 2))
    assert not any("~" in c for s in ("val", "test") for c in splits[s])
    summary = json.loads(Path("run/summary.json").read_text())
    assert summary["views"] == {"trained_on": 12, "left_out": {"val": 6, "test": 6}}
    assert summary["n_clips"] == {"train": 18, "val": 3, "test": 3}
    assert main(["predict", "run", "feat", "-o", "pred.jsonl", "-q"]) == 0
    pred = [json.loads(ln) for ln in Path("pred.jsonl").read_text().splitlines()]
    assert sorted(p["id"] for p in pred if p["level"] == "clip") == [f"v{i:02d}" for i in
                                                                    range(12)]
    assert main(["evaluate", "run", "feat", "--labels", "labels.csv", "--split", "test", "-o",
                 "eval.json"]) == 0
    assert json.loads(Path("eval.json").read_text())["n_clips"] == 3
    # The Dataset of the run's train split: its clips and their views, a view with its
    # clip's label; an export names the clip of each view.
    from pipeline.train.dataset import FeatureDataset

    ds = FeatureDataset.from_run("run", "train")
    items = [ds[i] for i in range(len(ds))]
    assert len(items) == 18
    labels = {it["id"]: it["label"] for it in items}
    assert all(labels[c] == labels[c.split("~")[0]] for c in labels)
    ds.close()
    assert main(["export", "feat", "-o", "wds", "--format", "webdataset", "--labels",
                 "labels.csv", "-q"]) == 0
    import tarfile

    with tarfile.open(next(Path("wds").glob("*.tar"))) as tar:
        meta = {json.loads(tar.extractfile(m).read())["id"]: json.loads(
            tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")}
    assert meta["v03~2"]["view_of"] == "v03" and "view_of" not in meta["v03"]
    assert meta["v03~2"]["label"] == meta["v03"]["label"] == "red"
    # New videos: the run's stages replayed without views (training data, not features).
    assert main(["predict", "run", "videos/v00.mp4", "-o", "new.jsonl", "-q"]) == 0
    assert [json.loads(ln)["id"] for ln in Path("new.jsonl").read_text().splitlines()] == [
        "v00", "v00"]  # the clip, then its source
    made, = Path("run/predict-cache").glob("*/extract-frames/manifest.jsonl")
    assert [json.loads(ln)["id"] for ln in made.read_text().splitlines()] == ["v00"]


@pytest.fixture(scope="module")
def view_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Features (resnet18, random weights as asked) of 8 one-colour videos, 1 view each."""
    root = tmp_path_factory.mktemp("view_store")
    for i in range(8):
        synth.make_video(root / f"videos/v{i}.mp4", duration_s=0.6, fps=10, audio=False,
                         color=(200, 30, 30) if i % 2 else (30, 30, 200))
    assert main(["extract-frames", str(root / "videos"), "-o", str(root / "media"), "--fps", "4",
                 "--size", "32", "--no-audio", "--augment", "hflip", "--views", "1",
                 "-q"]) == 0
    assert main(["features", str(root / "media"), "-o", str(root / "feat"), "--image-model",
                 "resnet18", "--image-weights", "none", "--audio-model", "none", "--workers",
                 "0", "-q"]) == 0
    return root


def test_a_caption_run_says_it_leaves_the_views_out(view_store, tmp_path, capsys):
    captions = tmp_path / "captions.csv"
    captions.write_text("id,caption\n" + "".join(
        f"v{i},a {'red' if i % 2 else 'blue'} picture\n" for i in range(8)))
    assert main(["train", str(view_store / "feat"), "--labels", str(captions), "--task",
                 "caption", "-o", str(tmp_path / "run"), "--epochs", "1", "--threads", "1",
                 "--device", "cpu", "--val-fraction", "0.25", "--test-fraction", "0.25"]) == 0
    err = capsys.readouterr().err
    assert "vpipe train: 8 augmented views left out (captioning trains on the clips" in err
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())
    assert sorted(c for ids in splits.values() for c in ids) == [f"v{i}" for i in range(8)]


def test_a_label_given_to_a_view_says_views_take_their_clips(view_store, tmp_path, capsys):
    feat = view_store / "feat"
    only_views = tmp_path / "views.csv"
    only_views.write_text("id,label\nv0~1,red\nv1~1,blue\n")
    assert main(["train", str(feat), "--labels", str(only_views), "-o",
                 str(tmp_path / "run")]) == 2
    hint = "(an augmented view of {}: views take their clip's label)"
    assert capsys.readouterr().err == (
        f"vpipe: error: no label id matches a clip or source id in {feat} (labels e.g. v0~1 "
        f"{hint.format('v0')}, v1~1 {hint.format('v1')}; clips e.g. v0, v1, v2)\n")
    assert not (tmp_path / "run").exists()
