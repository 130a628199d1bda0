"""Video features once made: the /video group through the reader, the index, export and the
Dataset, and `video` as a modality of `vpipe train` (every model, the caption task included).

The stores are written here with ShardWriter: video rows that carry each clip's label (the mean
of column 0), image rows of noise, so a run on `--modalities video` has something to learn.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.shards import open_features, read_index


def video_store(folder: Path, n_sources: int = 24, dim: int = 8) -> Path:
    """Shards of clips whose video rows carry their label (regression: the mean of column 0),
    the image rows noise; returns the labels CSV."""
    from pipeline.shards import ClipFeatures, ShardWriter, rebuild_index, shard_name
    from pipeline.train.synthetic import write_labels

    rng = np.random.default_rng(0)
    attrs = {"image": {"model": "synthetic", "weights": "none", "layer": "none"},
             "audio": {"model": "synthetic", "weights": "none"},
             "video": {"model": "synthetic", "weights": "none", "fps": 5.0, "frames": 4,
                       "stride": 4}}
    folder.mkdir(parents=True)
    w = ShardWriter(folder / shard_name(0), image_dim=dim, audio_dim=128, video_dim=dim,
                    attrs=attrs)
    labels = {}
    for s in range(n_sources):
        v = int(rng.integers(2, 6))
        y = float(rng.normal())
        video = rng.normal(0, 0.1, (v, dim)).astype(np.float32)
        video[:, 0] += y
        clip = ClipFeatures(f"s{s}_0", f"s{s}", 0.0, v * 0.8,
                            rng.normal(0, 1, (3, dim)).astype(np.float32), np.arange(3.0),
                            np.zeros((0, 128), np.float32), np.zeros(0), video=video,
                            video_start=np.arange(v) * 0.8, video_end=np.arange(1, v + 1) * 0.8,
                            video_padded=int(s == 0))
        w.add(clip)
        labels[clip.clip_id] = f"{y:.4f}"
    w.close()
    rebuild_index(folder)
    return write_labels(folder.parent / "labels.csv", labels)


def test_store_index_export_and_dataset_have_video(tmp_path: Path) -> None:
    from pipeline.train.dataset import FeatureDataset

    d = tmp_path / "features"
    csv_path = video_store(d)
    with open_features(d) as store:
        assert store.modalities == ["image", "audio", "video"] and store.has_video
        c = store["s0_0"]
        assert c.video_padded == 1 and c.video_times.shape == (c.video.shape[0], 2)
        np.testing.assert_allclose(c.video_times[:, 1] - c.video_times[:, 0], 0.8)
        assert store.column("n_video").tolist() == [r["n_video"] for r in read_index(d)]
    assert main(["export", str(d), "-o", str(tmp_path / "npz"), "-q"]) == 0
    with np.load(tmp_path / "npz" / "s0_0.npz") as z, open_features(d) as store:
        np.testing.assert_array_equal(z["video"], store["s0_0"].video)
        np.testing.assert_array_equal(z["video_start"], store["s0_0"].video_start)
        np.testing.assert_array_equal(z["video_end"], store["s0_0"].video_end)
    ds = FeatureDataset(d, labels=csv_path, modalities=("video",))
    with open_features(d) as store:
        np.testing.assert_array_equal(ds[0]["video"].numpy(), store[ds[0]["id"]].video)
    ds.close()


def captions_for(csv_path: Path) -> Path:
    """Captions that say the label's sign, one per clip (for --task caption)."""
    import csv

    rows = list(csv.reader(csv_path.open()))[1:]
    out = csv_path.with_name("captions.csv")
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "caption"])
        for cid, y in rows:
            w.writerow([cid, f"the value is {'high' if float(y) > 0 else 'low'}"])
    return out


@pytest.mark.parametrize(("model", "task"), [("lstm", "regression"), ("attention", "regression"),
                                             ("lstm", "caption")])
def test_train_on_video_features_through_the_cli(tmp_path: Path, model: str, task: str,
                                                 monkeypatch) -> None:
    d = tmp_path / "features"
    csv_path = video_store(d)
    if task == "caption":
        csv_path = captions_for(csv_path)
        monkeypatch.setenv("PATH", "")  # METEOR's Java scorer left out, as test_caption does
    run = tmp_path / "run"
    argv = ["train", str(d), "--labels", str(csv_path), "-o", str(run), "--modalities", "video",
            "--model", model, "--task", task, "--epochs", "2", "--hidden", "8", "-q"]
    assert main(argv) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["modalities"] == ["video"]
    assert "test" in json.loads((run / "summary.json").read_text())
    assert main(["predict", str(run), str(d), "-o", str(tmp_path / "pred.jsonl"), "-q"]) == 0


def test_video_modality_absent_from_a_store_is_a_usage_error(tmp_path: Path, capsys) -> None:
    from pipeline.train.synthetic import make_feature_set

    csv_path, _ = make_feature_set(tmp_path / "f", "regression", n_sources=6)
    argv = ["train", str(tmp_path / "f"), "--labels", str(csv_path), "-o", str(tmp_path / "r"),
            "--modalities", "video", "-q"]
    assert main(argv) == 2
    assert "no video features in these shards (make them with `vpipe features " \
           "--from-video --video-model NAME`)" in capsys.readouterr().err
