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


def test_inspect_on_another_stages_folder_says_what_it_is(tmp_path: Path, capsys) -> None:
    # Regression (issue 27, 3.4): "0 shards, 0 clips ... verified in all 0 shards", then
    # "1 problem(s)", on an extract-frames folder.
    from pipeline.cli import main

    (tmp_path / "vpipe.json").write_text('{"stage": "extract-frames", "params": {}}')
    (tmp_path / "manifest.jsonl").write_text("")
    assert main(["inspect", str(tmp_path)]) == 2
    assert capsys.readouterr() == ("", f"vpipe: error: {tmp_path}: the output of `vpipe "
                                       "extract-frames`, not a feature folder (`vpipe inspect` "
                                       "checks what `vpipe features` wrote)\n")


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


def _overwrite_chunk(path: Path, key: str, at: int = 16) -> None:
    """Change 4 bytes inside the first chunk of ``key``, as a bad disk or a stray write does."""
    with h5py.File(path) as f:
        offset = f[key].id.get_chunk_info(0).byte_offset
    data = bytearray(path.read_bytes())
    data[offset + at: offset + at + 4] = b"\x01\x02\x03\x04"
    path.write_bytes(bytes(data))


def test_overwritten_floats_fail_their_checksum_in_the_reader_and_inspect(tmp_path: Path) -> None:
    """Regression (issue 11, 4): floats overwritten inside a shard were read and trained on."""
    write(tmp_path, 0, [clip("a", 3, 2), clip("b", 2, 1)])
    rebuild_index(tmp_path)
    shard = tmp_path / "shard-00000.h5"
    with h5py.File(shard) as f:
        assert f.attrs["schema_version"] == shards.SCHEMA_VERSION == 2
        assert f.attrs["checksums"] == "fletcher32"
        assert all(f[k].fletcher32 for k in ("clip_ids", "source", "start", "end",
                                             "image/features", "image/offsets",
                                             "audio/features", "audio/timestamps"))
    _overwrite_chunk(shard, "image/features")
    with open_features(tmp_path) as store, pytest.raises(shards.DamagedFeatures) as e:
        store["b"]
    assert str(e.value).startswith(
        f"{shard}: damaged shard, /image/features fails its fletcher32 checksum")
    assert "delete it and run again the `vpipe features`" in str(e.value)
    with open_features(tmp_path) as store, pytest.raises(shards.DamagedFeatures):
        list(store)
    _, problems = validate(tmp_path)
    assert problems == ["shard-00000.h5: damaged shard, /image/features fails its fletcher32 "
                        "checksum (changed after it was written)"]


def test_swapped_index_rows_are_corrected_by_the_shards_clip_ids(tmp_path: Path,
                                                                 capsys) -> None:
    """Regression (issue 11, 4): two `row` values swapped in index.jsonl gave each clip the
    other's features, silently."""
    write(tmp_path, 0, [clip("a", 3, 2), clip("b", 2, 1), clip("c", 1, 0)])
    rows = rebuild_index(tmp_path)
    rows[0]["row"], rows[1]["row"] = rows[1]["row"], rows[0]["row"]
    (tmp_path / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with open_features(tmp_path) as store:
        np.testing.assert_array_equal(store["a"].image, clip("a", 3, 2).image)
        np.testing.assert_array_equal(store["b"].image, clip("b", 2, 1).image)
        assert [c.image.shape[0] for c in store.select(["b", "a"])] == [3, 2]  # shard order
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        f"vpipe: note: {tmp_path / 'shard-00000.h5'}: index.jsonl gives 2 clip(s) another row "
        "than the shard's /clip_ids (e.g. a)")
    _, problems = validate(tmp_path)
    assert problems == ["shard-00000.h5: clip ids differ from index.jsonl (2 clip(s) with "
                        "another row, e.g. a; the reader uses the shard's)"]


def test_a_shard_without_checksums_is_read_and_inspect_says_so(tmp_path: Path,
                                                              capsys) -> None:
    from pipeline.cli import main

    write(tmp_path, 0, [clip("a", 3, 2)])
    rebuild_index(tmp_path)
    with h5py.File(tmp_path / "shard-00000.h5", "r+") as f:  # as schema 1 wrote it
        del f.attrs["checksums"]
        f.attrs["schema_version"] = 1
    summary, problems = validate(tmp_path)
    assert problems == [] and summary["no_checksums"] == 1
    assert main(["inspect", str(tmp_path)]) == 0
    assert "no checksums in 1 of 1 shards" in capsys.readouterr().out
    with open_features(tmp_path) as store:
        np.testing.assert_array_equal(store["a"].image, clip("a", 3, 2).image)


def test_a_damaged_index_is_read_from_the_shards_with_a_note(tmp_path: Path, capsys) -> None:
    """Regression (issue 11, 8): a torn last index line (JSONDecodeError) or an index without
    `source` (KeyError) made open_features crash; the index is only a cache of the shards."""
    write(tmp_path, 0, [clip("a", 3, 2)])
    write(tmp_path, 1, [clip("b", 1, 0, source="t")])
    index = tmp_path / "index.jsonl"
    rebuild_index(tmp_path)
    good = index.read_text()
    index.write_text(good[:-10])  # the last line cut short
    with open_features(tmp_path) as store:
        assert store.sources() == {"s": ["a"], "t": ["b"]}
    err = capsys.readouterr().err
    assert err.startswith(f"vpipe: note: {index}: unreadable (JSONDecodeError") and \
        "reading the clips from the shards instead" in err
    _, problems = validate(tmp_path)
    assert problems[0].startswith(f"{index}: unreadable (JSONDecodeError")
    index.write_text("".join(
        json.dumps({k: v for k, v in json.loads(x).items() if k != "source"}) + "\n"
        for x in good.splitlines()))
    with open_features(tmp_path) as store:
        assert store.sources() == {"s": ["a"], "t": ["b"]}
    assert f"{index}: line 1 lacks source" in capsys.readouterr().err
    _, problems = validate(tmp_path)
    assert f"{index}: line 1 lacks source" in problems  # inspect no longer says ok


def test_a_deleted_or_overwritten_shard_is_one_error_naming_it(tmp_path: Path) -> None:
    write(tmp_path, 0, [clip("a", 3, 2)])
    write(tmp_path, 1, [clip("b", 1, 0)])
    rebuild_index(tmp_path)
    shard1 = tmp_path / "shard-00001.h5"
    data = shard1.read_bytes()
    shard1.write_bytes(b"\0" * 512 + data[512:])  # the header overwritten
    with pytest.raises(shards.DamagedFeatures,
                       match=r"shard-00001.h5: damaged shard, cannot be read \(.*signature"):
        open_features(tmp_path)["b"]
    shard1.unlink()
    with pytest.raises(shards.DamagedFeatures, match=r"shard-00001.h5: shard listed in "
                       r"index.jsonl but not on disk; run again the `vpipe features`"):
        open_features(tmp_path)


def test_the_index_is_held_in_columns_of_a_few_bytes_a_clip(tmp_path: Path) -> None:
    from pipeline.shards.index import IndexColumns

    # issue 13: a dict per clip took ~800 bytes; 1M clips then needed ~1 GB for the index.
    rows = [{"clip_id": f"trailer{k:06d}_{k % 4}", "source": f"trailer{k:06d}",
             "shard": f"shard-{k // 256:05d}.h5", "row": k % 256, "n_frames": 60,
             "n_audio": 31} for k in range(20000)]
    cols = IndexColumns.from_rows(iter(rows))
    assert cols.nbytes() / len(cols) <= 100
    assert cols.row_dict(cols.position("trailer012345_1")) == rows[12345]
    assert cols.position("trailer012345_2") is None and cols.position("x" * 99) is None
    with pytest.raises(KeyError, match="nope"):
        cols.positions(["trailer000001_1", "nope"])
    part = cols.take(cols.positions(["trailer000007_3", "trailer000002_2"]))
    assert part.clip_ids() == ["trailer000007_3", "trailer000002_2"]
    assert part.row_dict(1) == rows[2]
    # An id listed twice keeps its last line, in the place of its first; non-UTF-8 names too.
    odd = "caf\udce9_0"
    twice = IndexColumns.from_rows([{**rows[0], "n_frames": 1}, rows[1], rows[0],
                                    {**rows[2], "clip_id": odd}])
    assert twice.clip_ids() == [rows[0]["clip_id"], rows[1]["clip_id"], odd]
    assert twice.row_dict(0)["n_frames"] == 60 and twice.position(odd) == 2


def test_store_columns_follow_clip_ids(tmp_path: Path) -> None:
    write(tmp_path, 0, [clip("a", 3, 2), clip("b", 0, 1, source="t")])
    write(tmp_path, 1, [clip("c", 2, 0, source="t")])
    rebuild_index(tmp_path)
    with open_features(tmp_path) as store:
        assert store.clip_ids == ["a", "b", "c"]
        assert store.column("source") == ["s", "t", "t"]
        assert store.column("shard") == ["shard-00000.h5", "shard-00000.h5", "shard-00001.h5"]
        assert store.column("n_frames").tolist() == [3, 0, 2]
        assert store.column("n_audio").tolist() == [2, 1, 0]
        view = store.select(["c", "a"])
        assert view.column("source") == ["t", "s"] and "b" not in view and "c" in view
        assert [x.clip_id for x in view] == ["c", "a"]  # shard by shard, first listed first


def test_a_clip_prints_as_a_line_not_its_arrays() -> None:
    c = ClipFeatures("t_0", "t", 10.0, 40.0, np.zeros((30, 2048), np.float32), np.zeros(30),
                     np.zeros((0, 128), np.float32), np.zeros(0))
    assert repr(c) == "ClipFeatures('t_0', source='t', 10-40 s, image (30, 2048))"
