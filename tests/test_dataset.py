"""The public PyTorch Dataset over a feature folder feeds a plain training loop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.errors import UsageError
from pipeline.shards import open_features
from pipeline.train.dataset import FeatureDataset, collate
from pipeline.train.synthetic import make_feature_set


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
    with pytest.raises(UsageError, match="modalities"):
        FeatureDataset(d, modalities=("text",))


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
