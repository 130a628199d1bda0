"""pipeline.shards: the ragged HDF5 layout, atomic shards, the index, the reader, validation."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline import shards
from pipeline.shards import ClipFeatures, ShardWriter, open_features, rebuild_index, validate


def clip(cid: str, n_img: int, n_aud: int, dim: int = 4, source: str = "s") -> ClipFeatures:
    base = float(sum(map(ord, cid)))
    return ClipFeatures(
        cid, source, 1.0, 2.0,
        image=np.arange(n_img * dim, dtype=np.float32).reshape(n_img, dim) + base,
        image_timestamps=np.arange(n_img) * 0.5,
        audio=np.full((n_aud, 128), base, np.float32),
        audio_timestamps=np.arange(n_aud) * 0.96,
    )


def write(folder: Path, number: int, clips: list[ClipFeatures], **kw) -> list[dict]:
    image_attrs = {"model": "m", "weights": {"kind": "random"}, "layer": "avgpool",
                   "preprocessing": {"crop_size": 224}, "sampling": {}}
    w = ShardWriter(folder / shards.shard_name(number), image_dim=4,
                    attrs={"image": image_attrs}, **kw)
    for c in clips:
        w.add(c)
    return w.close()


def test_ragged_rows_and_offsets_round_trip(tmp_path: Path) -> None:
    rows = write(tmp_path, 0, [clip("a", 3, 2), clip("b", 0, 0), clip("c", 2, 1, source="t")])
    assert [(r["clip_id"], r["row"], r["n_frames"], r["n_audio"]) for r in rows] == [
        ("a", 0, 3, 2), ("b", 1, 0, 0), ("c", 2, 2, 1)]
    with h5py.File(tmp_path / "shard-00000.h5") as f:
        assert list(f["image"]["offsets"][:]) == [0, 3, 3, 5]
        assert list(f["audio"]["offsets"][:]) == [0, 2, 2, 3]
        assert f["image"]["features"].shape == (5, 4)
        assert json.loads(f["image"].attrs["weights"]) == {"kind": "random"}
    rebuild_index(tmp_path)
    with open_features(tmp_path) as store:
        for c in (clip("a", 3, 2), clip("b", 0, 0), clip("c", 2, 1, source="t")):
            got = store[c.clip_id]
            np.testing.assert_array_equal(got.image, c.image)
            np.testing.assert_array_equal(got.audio, c.audio)
            np.testing.assert_array_equal(got.image_timestamps, c.image_timestamps)
        assert store.sources() == {"s": ["a", "b"], "t": ["c"]}
        assert [c.clip_id for c in store] == ["a", "b", "c"]
        assert store.select(["c"]).clip_ids == ["c"]


def test_a_shard_appears_only_when_closed(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path / "shard-00000.h5", image_dim=4)
    w.add(clip("a", 1, 0))
    assert shards.shard_paths(tmp_path) == [] and w.tmp.exists()
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_float16_and_compression(tmp_path: Path) -> None:
    write(tmp_path, 0, [clip("a", 3, 1)], dtype="float16", compression="gzip")
    with h5py.File(tmp_path / "shard-00000.h5") as f:
        assert f["image"]["features"].dtype == np.float16
        assert f["image"]["features"].compression == "gzip"


def test_no_audio_modality_has_dim_zero(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path / "shard-00000.h5", image_dim=4, audio_dim=0)
    c = clip("a", 2, 0)
    c.audio = np.zeros((0, 0), np.float32)
    w.add(c)
    w.close()
    with h5py.File(tmp_path / "shard-00000.h5") as f:
        assert f["audio"]["features"].shape == (0, 0)
        assert list(f["audio"]["offsets"][:]) == [0, 0]


def test_wrong_dim_is_refused(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path / "shard-00000.h5", image_dim=4)
    with pytest.raises(ValueError, match="image dim 5 != 4"):
        w.add(clip("a", 1, 0, dim=5))
    w.abort()


def test_index_spans_shards_and_next_number(tmp_path: Path) -> None:
    write(tmp_path, 0, [clip("a", 1, 0)])
    write(tmp_path, 3, [clip("b", 2, 1)])
    rows = rebuild_index(tmp_path)
    assert [(r["clip_id"], r["shard"]) for r in rows] == [("a", "shard-00000.h5"),
                                                         ("b", "shard-00003.h5")]
    assert shards.next_shard_number(tmp_path) == 4


def test_validate_accepts_a_good_store_and_reports_damage(tmp_path: Path) -> None:
    write(tmp_path, 0, [clip("a", 3, 2), clip("b", 1, 0)])
    rebuild_index(tmp_path)
    summary, problems = validate(tmp_path)
    assert problems == []
    assert (summary["clips"], summary["frames"], summary["audio_rows"]) == (2, 4, 2)
    assert summary["dims"] == {"image": 4, "audio": 128}
    with h5py.File(tmp_path / "shard-00000.h5", "r+") as f:
        f["image"]["offsets"][1] = 7  # not monotone any more
    _, problems = validate(tmp_path)
    assert "shard-00000.h5: /image/offsets not monotone from 0" in problems
    with h5py.File(tmp_path / "shard-00000.h5", "r+") as f:
        del f["image"].attrs["layer"]
    _, problems = validate(tmp_path)
    assert "shard-00000.h5: /image attribute 'layer' missing" in problems
    (tmp_path / "shard-00000.h5").unlink()
    _, problems = validate(tmp_path)
    assert "shard-00000.h5: in index.jsonl but not on disk" in problems


def test_inspect_reports_a_damaged_shard_or_index_without_crashing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.cli import main

    write(tmp_path, 0, [clip("a", 3, 2)])
    write(tmp_path, 1, [clip("b", 1, 0)])
    rebuild_index(tmp_path)
    shard0 = tmp_path / "shard-00000.h5"
    shard0.write_bytes(shard0.read_bytes()[:200])  # a copy cut short
    assert main(["inspect", str(tmp_path)]) == 1  # used to be a traceback from h5py
    out = capsys.readouterr()
    assert "shard-00000.h5: cannot open" in out.out + out.err
    summary, problems = validate(tmp_path)
    assert summary["image_attrs"]["model"] == "m"  # read from the shard that still opens
    assert problems[0].startswith("shard-00000.h5: cannot open")
    assert problems[1:] == ["index.jsonl has 2 clips, shards hold 1"]
    with (tmp_path / "index.jsonl").open("a") as f:
        f.write('{"clip_id": "c", "sha\n')  # a line cut short
    _, problems = validate(tmp_path)
    assert problems[0].startswith(f"{tmp_path / 'index.jsonl'}: unreadable (JSONDecodeError")
    assert main(["inspect", str(tmp_path)]) == 1


def test_inspect_on_a_missing_folder_is_a_usage_error(tmp_path: Path) -> None:
    from pipeline.cli import main

    assert main(["inspect", str(tmp_path / "nope")]) == 2


def test_reader_keeps_few_shards_open(tmp_path: Path, monkeypatch) -> None:
    """Regression: every shard read stayed open, so iterating a store of ~1000+ small shards
    (--shard-size 1) failed with 'Too many open files'."""
    monkeypatch.setattr(shards.FeatureStore, "max_open_shards", 2)
    for i in range(5):
        write(tmp_path, i, [clip(f"c{i}", 2, 1)])
    rebuild_index(tmp_path)

    def n_open(store) -> int:
        return sum(sh.file is not None for sh in store._shards.values())

    with open_features(tmp_path) as store:
        assert [c.clip_id for c in store] == [f"c{i}" for i in range(5)]
        assert n_open(store) == 2
        for cid in ("c0", "c4", "c0", "c2", "c1", "c0"):
            np.testing.assert_array_equal(store[cid].image, clip(cid, 2, 1).image)
            assert n_open(store) <= 2
        assert store.attrs("image")["model"] == "m"


def test_add_to_index_appends_a_shards_rows(tmp_path: Path) -> None:
    write(tmp_path, 0, [clip("a", 1, 0)])
    rebuild_index(tmp_path)
    shards.add_to_index(tmp_path, write(tmp_path, 1, [clip("b", 2, 1), clip("c", 0, 0)]))
    assert shards.read_index(tmp_path) == rebuild_index(tmp_path)
    assert [r["clip_id"] for r in shards.read_index(tmp_path)] == ["a", "b", "c"]
