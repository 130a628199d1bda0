"""The public PyTorch Dataset over a feature folder feeds a plain training loop."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.cli import main
from pipeline.errors import UsageError
from pipeline.shards import open_features
from pipeline.train.dataset import FeatureDataset, collate
from pipeline.train.runs import read_splits
from pipeline.train.synthetic import make_feature_set, make_titled_set


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, Path, dict]:
    d = tmp_path_factory.mktemp("ds") / "features"
    csv_path, labels = make_feature_set(d, "regression", n_sources=20, audio_dim=8, seed=4)
    return d, csv_path, labels


def test_items_are_the_stores_arrays_with_their_labels(folder) -> None:
    d, csv_path, labels = folder
    ds = FeatureDataset(d, labels=csv_path, modalities=("image", "audio"))
    with open_features(d) as store:
        assert len(ds) == len(labels) == len(store)
        item = ds[3]
        clip = store[item["id"]]
        np.testing.assert_array_equal(item["image"].numpy(), clip.image)
        np.testing.assert_array_equal(item["audio"].numpy(), clip.audio)
        assert item["source"] == clip.source and item["label"] == float(labels[item["id"]])
    ds.close()
    no_labels = FeatureDataset(d, max_frames=2)
    assert no_labels[0]["label"] is None and no_labels[0]["image"].shape[0] <= 2
    by_source = FeatureDataset(d, labels={"video000": "7"})  # a source id: all its clips
    assert sorted(it["id"] for it in by_source) == ["video000_0", "video000_1"]
    with pytest.raises(UsageError, match="holds image, audio$"):
        FeatureDataset(d, modalities=("text",))  # this folder was made without --text


def test_collate_pads_and_a_plain_loop_learns(folder) -> None:
    d, csv_path, _ = folder
    ds = FeatureDataset(d, labels=csv_path)
    loader = DataLoader(ds, batch_size=8, shuffle=True, collate_fn=collate,
                        generator=torch.Generator().manual_seed(0))
    batch = next(iter(loader))
    x, lengths = batch["image"]
    assert x.shape[0] == 8 == len(batch["id"]) and batch["label"].dtype == torch.float32
    for i in range(8):
        n = int(lengths[i])
        assert not x[i, n:].any()  # zero past each clip's length
    torch.manual_seed(0)
    model = torch.nn.Linear(x.shape[2], 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)

    def epoch_loss() -> float:
        total = 0.0
        for b in loader:
            x, lengths = b["image"]
            mean = x.sum(1) / lengths.clamp(min=1)[:, None]  # mean over each clip's frames
            loss = torch.nn.functional.mse_loss(model(mean)[:, 0], b["label"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(b["id"])
        return total / len(ds)

    first = epoch_loss()
    for _ in range(30):
        last = epoch_loss()
    assert last < 0.5 * first


@pytest.fixture(scope="module")
def titled(tmp_path_factory) -> tuple[Path, Path]:
    """Titles as text rows, and no audio rows at all (every clip's audio is empty)."""
    d = tmp_path_factory.mktemp("ds-text") / "features"
    csv_path, _ = make_titled_set(d, n_sources=12, seed=3)
    return d, csv_path


def test_text_goes_through_and_an_empty_modality_is_one_zero_row(titled) -> None:
    d, csv_path = titled
    ds = FeatureDataset(d, labels=csv_path, modalities=("image", "audio", "text"))
    with open_features(d) as store:
        clip = store[ds[0]["id"]]
        assert clip.n("text") > 0 and clip.n("audio") == 0
        np.testing.assert_array_equal(ds[0]["text"].numpy(), clip.text)
        # The rule: one row of zeros, marked absent, so that no length is 0.
        assert ds[0]["audio"].shape == (1, 128) and not ds[0]["audio"].any()
        assert ds[0]["present"] == {"image": True, "audio": False, "text": True}
    batch = collate([ds[i] for i in range(4)])
    x, lengths = batch["audio"]
    assert lengths.tolist() == [1, 1, 1, 1] and not batch["present"]["audio"].any()
    assert batch["present"]["text"].all()
    # A user's own LSTM packs every modality of the batch as it comes.
    lstm = torch.nn.LSTM(128, 4, batch_first=True)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
                                                     enforce_sorted=False)
    _, (h, _) = lstm(packed)
    assert h.shape == (1, 4, 4)
    ds.close()


def test_pooled_is_the_mean_of_each_modalitys_rows(titled) -> None:
    d, _ = titled
    ds = FeatureDataset(d, modalities=("image", "audio", "text"), pooled=True)
    with open_features(d) as store:
        for i in (0, 5):
            clip = store[ds[i]["id"]]
            np.testing.assert_allclose(ds[i]["image"].numpy(), clip.image.mean(0), rtol=1e-6)
            np.testing.assert_allclose(ds[i]["text"].numpy(), clip.text.mean(0), rtol=1e-6)
            assert ds[i]["audio"].shape == (128,) and not ds[i]["audio"].any()
    batch = collate([ds[i] for i in range(3)])
    assert batch["image"].shape == (3, store.dim("image")) and batch["text"].shape == (3, 16)
    assert batch["present"]["audio"].tolist() == [False] * 3


def test_targets_as_each_task_encodes_them(tmp_path: Path) -> None:
    tags = {"video000_0": "a|c", "video000_1": "b", "video001_0": "c,a", "video001_1": "b|a"}
    d = tmp_path / "f"
    make_feature_set(d, "multilabel", n_sources=2, seed=1)
    ml = FeatureDataset(d, labels=tags, task="multilabel")
    assert ml.classes == ["a", "b", "c"]
    got = {it["id"]: it["target"].tolist() for it in ml}
    assert got == {"video000_0": [1, 0, 1], "video000_1": [0, 1, 0], "video001_0": [1, 0, 1],
                   "video001_1": [1, 1, 0]}
    assert collate(list(ml))["target"].shape == (4, 3)
    cls = FeatureDataset(d, labels={"video000": "up", "video001": "down"},
                         task="classification")
    assert cls.classes == ["down", "up"]
    assert {it["id"]: int(it["target"]) for it in cls} == {
        "video000_0": 1, "video000_1": 1, "video001_0": 0, "video001_1": 0}
    assert collate(list(cls))["target"].dtype == torch.int64
    reg = FeatureDataset(d, labels={"video000": "2.5", "video001": "-1"}, task="regression")
    batch = collate(list(reg))
    assert dict(zip(batch["id"], batch["target"].tolist(), strict=True)) == {
        "video000_0": 2.5, "video000_1": 2.5, "video001_0": -1.0, "video001_1": -1.0}
    with pytest.raises(UsageError, match="numeric"):
        FeatureDataset(d, labels=tags, task="regression")
    with pytest.raises(UsageError, match="choose one of"):
        FeatureDataset(d, labels=tags, task="ranking")


def test_from_a_run_and_a_split(tmp_path: Path) -> None:
    d = tmp_path / "features"
    csv_path, labels = make_feature_set(d, "classification", n_sources=16, audio_dim=8, seed=2)
    run = tmp_path / "run"
    assert main(["train", str(d), "--labels", str(csv_path), "-o", str(run), "--epochs", "1",
                 "--modalities", "image,audio", "--max-frames", "4", "--hidden", "8",
                 "-q"]) == 0
    splits = read_splits(run)
    classes = json.loads((run / "config.json").read_text())["classes"]
    for split in ("train", "val", "test"):
        ds = FeatureDataset.from_run(run, split)
        assert [it["id"] for it in ds] == splits[split] and ds.classes == classes
        for it in ds:
            assert classes[int(it["target"])] == labels[it["id"]]
            assert it["image"].shape[0] <= 4 and it["audio"].shape[1] == 8  # the run's inputs
    with pytest.raises(UsageError, match="split 'dev': .* has train, val, test"):
        FeatureDataset.from_run(run, "dev")
    with pytest.raises(UsageError, match="not a vpipe train run"):
        FeatureDataset.from_run(tmp_path, "train")
    # Labels rewritten with a class the run never saw: refused, not encoded anew.
    relabelled = {c: "sideways" for c in labels}
    with pytest.raises(UsageError, match="'sideways' is not one the run was trained on"):
        FeatureDataset.from_run(run, "val", labels=relabelled)
