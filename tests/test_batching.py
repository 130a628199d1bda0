"""The model-call size of `vpipe features`: tuned on the run's own first frames unless
--batch-size says, recorded in vpipe.json, and without effect on the features."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_features import make_media

from pipeline.cli import main
from pipeline.features.batching import CANDIDATES, TIMED, WARMUP, ModelBatch
from pipeline.shards import open_features


def costly(ms_per_frame: dict[int, float], calls: list[int]):
    """A model call whose cost per frame depends on the call's size, as a CPU's does."""

    def call(x: torch.Tensor) -> np.ndarray:
        calls.append(int(x.shape[0]))
        time.sleep(ms_per_frame[int(x.shape[0])] * x.shape[0] / 1e3)
        return x.float().mean(dim=(1, 2, 3)).numpy()[:, None]

    return call


def test_the_fastest_size_per_frame_is_chosen_and_every_frame_goes_through_once():
    mb = ModelBatch("cpu")
    assert mb.loader_batch == max(CANDIDATES["cpu"]) and mb.size is None
    cost = {4: 3.0, 8: 1.0, 16: 2.0, 32: 2.5}  # the second size wins, as on a 2-core CPU
    calls: list[int] = []
    call = costly(cost, calls)
    out = []
    for k in range(12):  # loader batches of 32 frames, values numbering the frames
        x = torch.arange(k * 32, (k + 1) * 32, dtype=torch.float32).view(32, 1, 1, 1)
        out.append(mb.run(x.expand(32, 3, 2, 2), call))
    got = np.concatenate(out)[:, 0]
    assert np.array_equal(got, np.arange(12 * 32))  # in order, none twice, none lost
    assert mb.size == 8
    n_tuning = len(CANDIDATES["cpu"]) * (WARMUP + TIMED)
    assert sorted(set(calls[:n_tuning])) == list(CANDIDATES["cpu"])
    assert set(calls[n_tuning + 4:]) == {8}  # after the tuning calls, 8 only
    rep = mb.report()
    assert rep["size"] == 8 and set(rep["ms_per_frame"]) == {"4", "8", "16", "32"}
    assert rep["ms_per_frame"]["8"] < rep["ms_per_frame"]["4"]


def test_a_given_size_is_used_as_given():
    mb = ModelBatch("cpu", 5)
    calls: list[int] = []
    out = mb.run(torch.zeros(12, 3, 2, 2), costly({5: 0.0, 2: 0.0}, calls))
    assert calls == [5, 5, 2] and out.shape == (12, 1)
    assert mb.loader_batch == 5 and mb.report() == {"size": 5, "chosen": "--batch-size"}


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """120 frames in 5 clips, no audio."""
    return make_media(tmp_path_factory.mktemp("tb") / "media",
                      {f"s_{k}": (24, None) for k in range(5)}, size=(40, 30))


def test_tuned_run_records_its_choice_and_equals_a_fixed_size(frames, tmp_path, weights,
                                                               monkeypatch):
    from pipeline.features import batching

    # Tune these 120 frames over two sizes (the tuning then takes 4 + 8 frames, 3 times each).
    monkeypatch.setattr(batching, "TUNE_FROM_FRAMES", 100)
    monkeypatch.setattr(batching, "CANDIDATES", {"cpu": (4, 8)})
    base = ["--image-model", "resnet18", "--image-weights", str(weights["image"]),
            "--audio-model", "none", "--precision", "fp32", "--workers", "0", "-q"]
    assert main(["features", str(frames), "-o", str(tmp_path / "auto"), *base]) == 0
    assert main(["features", str(frames), "-o", str(tmp_path / "fixed"), *base,
                 "--batch-size", "4"]) == 0
    info = json.loads((tmp_path / "auto" / "vpipe.json").read_text())
    rep = info["model_batch"]
    assert rep["size"] in (4, 8) and rep["candidates"] == [4, 8]
    assert str(rep["size"]) == min(rep["ms_per_frame"], key=rep["ms_per_frame"].get)
    fixed = json.loads((tmp_path / "fixed" / "vpipe.json").read_text())["model_batch"]
    assert fixed == {"size": 4, "chosen": "--batch-size", "memory_format": "channels_last"}
    # The size of the calls is speed only: the parameters, and the features, are the same.
    assert info["params"] == json.loads((tmp_path / "fixed" / "vpipe.json").read_text())["params"]
    with open_features(tmp_path / "auto") as a, open_features(tmp_path / "fixed") as b:
        assert a.clip_ids == b.clip_ids
        for cid in a.clip_ids:
            np.testing.assert_allclose(a[cid].image, b[cid].image, rtol=1e-4, atol=1e-5)


def test_a_short_run_keeps_the_default_size(frames, tmp_path, weights):
    from pipeline.features.batching import DEFAULT, TUNE_FROM_FRAMES

    assert TUNE_FROM_FRAMES > 120
    assert main(["features", str(frames), "-o", str(tmp_path / "f"), "--image-model", "resnet18",
                 "--image-weights", str(weights["image"]), "--audio-model", "none",
                 "--precision", "fp32", "--workers", "0", "-q"]) == 0
    rep = json.loads((tmp_path / "f" / "vpipe.json").read_text())["model_batch"]
    assert rep["size"] == DEFAULT["cpu"] and "short run (120 frames" in rep["chosen"]


def test_compiled_model_gives_the_same_features_with_one_call_size(frames, tmp_path, weights):
    """--compile: torch.compile (tens of seconds here), one size, the last call padded."""
    base = ["--image-model", "resnet18", "--image-weights", str(weights["image"]),
            "--audio-model", "none", "--precision", "fp32", "--workers", "0", "-q"]
    assert main(["features", str(frames), "-o", str(tmp_path / "plain"), *base]) == 0
    assert main(["features", str(frames), "-o", str(tmp_path / "comp"), *base, "--compile",
                 "--batch-size", "16"]) == 0
    rep = json.loads((tmp_path / "comp" / "vpipe.json").read_text())["model_batch"]
    assert rep == {"size": 16, "chosen": "--compile: one size (the given or the default)",
                   "compiled": True, "memory_format": "channels_last"}
    with open_features(tmp_path / "plain") as a, open_features(tmp_path / "comp") as b:
        assert a.clip_ids == b.clip_ids
        for cid in a.clip_ids:  # 120 frames in calls of 16: the last one (8 frames) padded
            np.testing.assert_allclose(a[cid].image, b[cid].image, rtol=1e-4, atol=1e-4)
