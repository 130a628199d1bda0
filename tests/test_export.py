"""`vpipe export`: a feature folder as npz / npy files per clip, Parquet tables and WebDataset
shards, each read back by its own library and equal to the store's arrays, text included."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.records import read_manifest
from pipeline.shards import ClipFeatures, ShardWriter, open_features, rebuild_index, shard_name
from pipeline.train.synthetic import make_feature_set, make_titled_set


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ex") / "features"
    make_feature_set(d, "classification", n_sources=5, audio_dim=8, seed=5)
    return d


@pytest.fixture(scope="module")
def titled(tmp_path_factory) -> tuple[Path, Path, dict]:
    """Titles as text rows (no audio rows); one clip id with a dot in it, as file stems have."""
    d = tmp_path_factory.mktemp("ex-text") / "features"
    csv_path, tags = make_titled_set(d, n_sources=7, seed=2)
    with open_features(d) as store:
        clip, attrs = store[store.clip_ids[0]], {m: store.attrs(m) for m in store.modalities}
    w = ShardWriter(d / shard_name(9), image_dim=clip.image.shape[1], audio_dim=128,
                    text_dim=16, attrs=attrs)
    w.add(ClipFeatures("my.trailer_0", "my.trailer", 1.5, 9.0, clip.image + 1,
                       clip.image_timestamps, clip.audio, clip.audio_timestamps,
                       clip.text[:2], "a dotted name"))
    w.close()
    rebuild_index(d)
    return d, csv_path, tags


def test_npz_holds_each_clips_arrays(features: Path, tmp_path: Path) -> None:
    out = tmp_path / "npz"
    assert main(["export", str(features), "-o", str(out), "-q"]) == 0
    with open_features(features) as store:
        assert sorted(p.stem for p in out.glob("*.npz")) == sorted(store.clip_ids)
        for cid in store.clip_ids:
            clip, got = store[cid], np.load(out / f"{cid}.npz")
            assert "text" not in got  # a store without titles has no text rows
            for a in ("image", "image_timestamps", "audio", "audio_timestamps"):
                np.testing.assert_array_equal(got[a], getattr(clip, a))
            assert str(got["source"]) == clip.source and float(got["end"]) == clip.end
        attrs = json.loads((out / "vpipe.json").read_text())["params"]["features_attrs"]
        assert attrs == json.loads(json.dumps(store.attrs()))
    assert {r["status"] for r in read_manifest(out).values()} == {"ok"}


def test_npz_and_npy_carry_the_text(titled, tmp_path: Path) -> None:
    d, csv_path, tags = titled
    assert main(["export", str(d), "-o", str(tmp_path / "npz"), "--labels", str(csv_path),
                 "-q"]) == 0
    assert main(["export", str(d), "-o", str(tmp_path / "npy"), "--format", "npy", "-q"]) == 0
    with open_features(d) as store:
        for cid in store.clip_ids:
            clip, z = store[cid], np.load(tmp_path / "npz" / f"{cid}.npz")
            np.testing.assert_array_equal(z["text"], clip.text)
            assert str(z["text_string"]) == clip.text_string
            assert str(z["label"]) == tags[cid] if cid in tags else "label" not in z
            np.testing.assert_array_equal(np.load(tmp_path / "npy" / f"{cid}_text.npy"),
                                          clip.text)
            assert str(np.load(tmp_path / "npy" / f"{cid}_text_string.npy")) == clip.text_string
    params = json.loads((tmp_path / "npy" / "vpipe.json").read_text())["params"]
    assert params["modalities"] == ["image", "audio", "text"]  # an export without text differs


def test_parquet_reads_back_with_pyarrow(titled, tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    d, csv_path, tags = titled
    out = tmp_path / "pq"
    assert main(["export", str(d), "-o", str(out), "--format", "parquet", "--shard-size", "3",
                 "--labels", str(csv_path), "-q"]) == 0
    files = sorted(out.glob("*.parquet"))
    assert [p.name for p in files] == ["clips-00000.parquet", "clips-00001.parquet",
                                       "clips-00002.parquet"]  # 8 clips, 3 a file
    table = pq.read_table([str(p) for p in files])
    with open_features(d) as store:
        assert sorted(table.column("clip_id").to_pylist()) == sorted(store.clip_ids)
        for row in table.to_pylist():
            clip = store[row["clip_id"]]
            assert (row["source"], row["start"], row["end"]) == (clip.source, clip.start,
                                                                 clip.end)
            for m in ("image", "audio", "text"):
                got = np.array(row[m], np.float32).reshape(-1, store.dim(m))
                np.testing.assert_array_equal(got, getattr(clip, m))
            assert row["image_timestamps"] == clip.image_timestamps.tolist()
            assert row["text_string"] == clip.text_string
            assert row["label"] == tags.get(clip.clip_id)  # None: the dotted clip has none
        meta = json.loads(pq.read_schema(files[0]).metadata[b"vpipe"])
        assert meta == json.loads(json.dumps(store.attrs(), default=str))


def test_webdataset_reads_back_with_webdataset(titled, tmp_path: Path) -> None:
    wds = pytest.importorskip("webdataset")
    d, csv_path, tags = titled
    out = tmp_path / "wds"
    assert main(["export", str(d), "-o", str(out), "--format", "webdataset", "--shard-size",
                 "5", "--labels", str(csv_path), "-q"]) == 0
    shards = sorted(str(p) for p in out.glob("*.tar"))
    assert [Path(p).name for p in shards] == ["clips-00000.tar", "clips-00001.tar"]
    samples = list(wds.WebDataset(shards, shardshuffle=False, empty_check=False).decode())
    with open_features(d) as store:
        assert sorted(s["json"]["id"] for s in samples) == sorted(store.clip_ids)
        for s in samples:
            clip, fields = store[s["json"]["id"]], s["json"]
            assert s["__key__"] == clip.clip_id.replace(".", "%2E")
            for m in ("image", "audio", "text"):
                np.testing.assert_array_equal(s[f"{m}.npy"], getattr(clip, m))
                assert s[f"{m}.npy"].dtype == np.float32
            assert fields["rows"] == {"image": clip.n("image"), "audio": 0, "text": clip.n("text")}
            assert fields["image_timestamps"] == clip.image_timestamps.tolist()
            assert (fields["source"], fields["start"], fields["text_string"]) == (
                clip.source, clip.start, clip.text_string)
            assert fields["label"] == tags.get(clip.clip_id)
    # A second run finds both shards done and writes nothing.
    mtimes = [Path(p).stat().st_mtime_ns for p in shards]
    assert main(["export", str(d), "-o", str(out), "--format", "webdataset", "--shard-size",
                 "5", "--labels", str(csv_path), "-q"]) == 0
    assert [Path(p).stat().st_mtime_ns for p in shards] == mtimes
    # Other labels are another export: refused without --overwrite.
    other = tmp_path / "other.csv"
    other.write_text(csv_path.read_text().replace("runs", "spins"))
    assert main(["export", str(d), "-o", str(out), "--format", "webdataset", "--shard-size",
                 "5", "--labels", str(other), "-q"]) == 2


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
    # --overwrite with other options: the previous export's files go with its records, so a
    # reader globbing the folder gets one export, not both.
    assert main(["export", str(features), "-o", str(out), "--overwrite", "-q"]) == 0
    assert not list(out.glob("*.npy")) and len(list(out.glob("*.npz"))) == n
    pytest.importorskip("pyarrow")
    for size in ("3", "50"):
        assert main(["export", str(features), "-o", str(out), "--format", "parquet",
                     "--shard-size", size, "--overwrite", "-q"]) == 0
    assert not list(out.glob("*.npz")) and len(list(out.glob("*.parquet"))) == 1


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_input_is_one_usage_line(features: Path, tmp_path: Path, capsys,
                                     monkeypatch) -> None:
    out = tmp_path / "out"
    assert main(["export", str(features), "-o", str(out), "--format", "csv"]) == 2
    assert "--format 'csv': use npz, npy, parquet, webdataset" in one_line_error(capsys)
    csv_path = features.parent / "features-labels.csv"
    assert main(["export", str(features), "-o", str(out), "--format", "npy", "--labels",
                 str(csv_path)]) == 2
    assert "--labels is for --format npz, parquet or webdataset" in one_line_error(capsys)
    # Without the extra installed (an import that fails, as in an environment without it).
    for module, fmt in (("pyarrow.parquet", "parquet"), ("webdataset", "webdataset")):
        monkeypatch.setitem(sys.modules, module, None)
        assert main(["export", str(features), "-o", str(out), "--format", fmt]) == 2
        extra = "pyarrow" if fmt == "parquet" else "webdataset"
        assert (f"--format {fmt} needs {extra}: pip install 'vpipe[{fmt}]'"
                in one_line_error(capsys))
    assert not out.exists()  # refused before anything was written
