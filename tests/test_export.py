"""`vpipe export`: a feature folder as npz / npy files per clip, equal to the store's arrays."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.records import read_manifest
from pipeline.shards import open_features
from pipeline.train.synthetic import make_feature_set


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ex") / "features"
    make_feature_set(d, "classification", n_sources=5, audio_dim=8, seed=5)
    return d


def test_npz_holds_each_clips_arrays(features: Path, tmp_path: Path) -> None:
    out = tmp_path / "npz"
    assert main(["export", str(features), "-o", str(out), "-q"]) == 0
    with open_features(features) as store:
        assert sorted(p.stem for p in out.glob("*.npz")) == sorted(store.clip_ids)
        for cid in store.clip_ids:
            clip, got = store[cid], np.load(out / f"{cid}.npz")
            for a in ("image", "image_timestamps", "audio", "audio_timestamps"):
                np.testing.assert_array_equal(got[a], getattr(clip, a))
            assert str(got["source"]) == clip.source and float(got["end"]) == clip.end
        attrs = json.loads((out / "vpipe.json").read_text())["params"]["features_attrs"]
        assert attrs == json.loads(json.dumps(store.attrs()))
    assert {r["status"] for r in read_manifest(out).values()} == {"ok"}


def test_npy_resume_and_changed_parameters(features: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "npy"
    assert main(["export", str(features), "-o", str(out), "--format", "npy", "-q"]) == 0
    with open_features(features) as store:
        cid = store.clip_ids[0]
        np.testing.assert_array_equal(np.load(out / f"{cid}_image.npy"), store[cid].image)
        n = len(store)
    assert len(list(out.glob("*.npy"))) == 4 * n
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*.npy")}
    (out / f"{cid}_audio.npy").unlink()  # a lost file: that clip is exported again
    assert main(["export", str(features), "-o", str(out), "--format", "npy"]) == 0
    assert f"vpipe export: 1 done, {n - 1} already done" in capsys.readouterr().err
    # The other clips' files are left as they were (that clip's are written again, all four).
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items()
               if not p.name.startswith(f"{cid}_"))
    assert (out / f"{cid}_audio.npy").exists()
    assert main(["export", str(features), "-o", str(out)]) == 2
    assert "other parameters (format: 'npy' -> 'npz')" in capsys.readouterr().err
    assert main(["export", str(features), "-o", str(out), "--format", "npy", "--compress"]) == 2
    assert "--compress is for --format npz" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nope"), "-o", str(out)]) == 2
