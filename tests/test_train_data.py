"""Labels CSV, joining labels to clips, splits by source, sampling and batches."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import UsageError
from pipeline.shards import ClipFeatures, ShardWriter, open_features, rebuild_index
from pipeline.train.labels import LabelSpace, infer_task, join_labels, read_labels, split_by_source
from pipeline.train.sequences import (
    ClipSequences,
    pad_batch,
    present_modalities,
    sample_uniform,
    warn_empty_clips,
)
from pipeline.train.synthetic import make_feature_set, write_labels


def write_shards(folder, clips, image_dim=4, audio_dim=3):
    """One shard of ``clips`` = [(clip_id, source, n_frames, n_audio)] with row-numbered values."""
    folder.mkdir(parents=True, exist_ok=True)
    w = ShardWriter(folder / "shard-00000.h5", image_dim=image_dim, audio_dim=audio_dim)
    for cid, src, n, a in clips:
        img = np.arange(n * image_dim, dtype=np.float32).reshape(n, image_dim)
        aud = np.ones((a, audio_dim), np.float32)
        w.add(ClipFeatures(cid, src, 0.0, 1.0, img, np.arange(n) * 0.5, aud, np.arange(a) * 1.0))
    w.close()
    rebuild_index(folder)
    return open_features(folder)


@pytest.fixture
def store(tmp_path):
    return write_shards(
        tmp_path / "feats",
        [("t1_0", "t1", 5, 2), ("t1_1", "t1", 3, 0), ("t2_0", "t2", 4, 1), ("t3_0", "t3", 2, 2)],
    )


def test_missing_label_column_is_a_usage_error(tmp_path):
    p = tmp_path / "l.csv"
    p.write_text("id,rating\nt1,3\n")
    with pytest.raises(UsageError, match="needs the columns id,label .*missing label"):
        read_labels(p)


def test_conflicting_duplicate_ids_name_both_lines(tmp_path):
    p = tmp_path / "l.csv"
    p.write_text("id,label\nt1,3\nt2,4\nt1,5\n")
    with pytest.raises(UsageError, match="line 2"):
        read_labels(p)


def test_bad_split_value_is_refused(tmp_path):
    p = tmp_path / "l.csv"
    p.write_text("id,label,split\nt1,3,holdout\n")
    with pytest.raises(UsageError, match=":2: split 'holdout'"):
        read_labels(p)


def test_quoted_multilabel_field_and_bom_are_read(tmp_path):
    p = tmp_path / "l.csv"
    p.write_text('\ufeffid,label\nt1,"cat,dog"\nt2,dog|bird\n', encoding="utf-8")
    rows = read_labels(p)
    assert rows["t1"].label == "cat,dog"
    assert infer_task([r.label for r in rows.values()])[0] == "multilabel"
    space = LabelSpace.build("multilabel", {k: r.label for k, r in rows.items()})
    assert space.classes == ["bird", "cat", "dog"]
    assert space.encode("dog|cat").tolist() == [0.0, 1.0, 1.0]


def test_header_names_are_matched_whatever_their_case(tmp_path):
    # Regression: a spreadsheet's "ID,Label,Split" header was refused as missing id,label.
    p = tmp_path / "l.csv"
    p.write_text("ID, Label ,Split\nt1,3,Test\n")
    rows = read_labels(p)
    assert (rows["t1"].label, rows["t1"].split) == ("3", "test")


def test_task_inference():
    assert infer_task(["3.5", "7", "1e1"])[0] == "regression"
    assert infer_task(["cat", "dog"])[0] == "classification"
    assert infer_task(["cat", "dog|cat"])[0] == "multilabel"


def test_label_space_refuses_nan_single_class_and_text_targets():
    with pytest.raises(UsageError, match="NaN or infinite .*b"):
        LabelSpace.build("regression", {"a": "1", "b": "nan"})
    with pytest.raises(UsageError, match="at least two classes"):
        LabelSpace.build("classification", {"a": "cat", "b": "cat"})
    with pytest.raises(UsageError, match="numeric labels"):
        LabelSpace.build("regression", {"a": "1", "b": "cat"})
    with pytest.raises(UsageError, match="same value"):
        LabelSpace.build("regression", {"a": "1", "b": "1.0"})


def test_regression_targets_beyond_float32_are_refused():
    # 1e39 is finite as a Python float but inf as the float32 target: every loss was NaN.
    with pytest.raises(UsageError, match="beyond the float32 range .*b='-1e39'"):
        LabelSpace.build("regression", {"a": "1", "b": "-1e39"})
    LabelSpace.build("regression", {"a": "1", "b": "-1e38"})


def test_clips_inherit_their_source_label_and_own_label_wins(store, tmp_path, capsys):
    p = tmp_path / "l.csv"
    p.write_text("id,label\nt1,7\nt1_1,2\nt2_0,4\nghost,1\n")
    j = join_labels(store, read_labels(p))
    assert j.labels == {"t1_0": "7", "t1_1": "2", "t2_0": "4"}
    assert j.unlabeled == ["t3_0"]
    assert j.unknown == ["ghost"]
    j.report(len(store))
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "vpipe train: 1 of 4 clips have no label, left out (e.g. t3_0)",
        "vpipe train: 1 label ids match no clip or source (e.g. ghost)",
    ]


def test_an_id_that_is_a_clip_and_another_source_is_warned_about(tmp_path, capsys):
    # Regression: videos x.mp4 and x_0.mp4 give clip "x_0" (of x) and source "x_0"; the label
    # "x_0" silently went to both. It still does (the contract allows both), but says so.
    store = write_shards(
        tmp_path / "f", [("x_0", "x", 2, 0), ("x_1", "x", 2, 0), ("x_0_0", "x_0", 2, 0)]
    )
    p = tmp_path / "l.csv"
    p.write_text("id,label\nx,b\nx_0,a\n")
    j = join_labels(store, read_labels(p))
    assert j.labels == {"x_0": "a", "x_1": "b", "x_0_0": "a"}
    assert j.ambiguous == ["x_0"] and j.unknown == [] and j.unlabeled == []
    j.report(len(store))
    assert capsys.readouterr().err.splitlines() == [
        "vpipe train: warning: 1 label ids are both a clip id and the id of another source "
        "(e.g. x_0): the label goes to that clip and to the clips of that source"
    ]


def test_a_whole_video_whose_clip_id_is_its_source_id_is_not_warned_about(tmp_path, capsys):
    # Regression (issue 11, 12): features of whole videos have clip id == source id; the
    # "both a clip id and the id of another source" warning fired on every labelled one.
    store = write_shards(tmp_path / "f", [("a", "a", 2, 0), ("b", "b", 2, 0)])
    p = tmp_path / "l.csv"
    p.write_text("id,label\na,1\nb,2\n")
    j = join_labels(store, read_labels(p))
    assert j.labels == {"a": "1", "b": "2"} and j.ambiguous == []
    j.report(len(store))
    assert capsys.readouterr().err == ""


def test_a_labels_file_that_is_not_utf8_is_one_usage_error_naming_it(tmp_path):
    # Regression (issue 11, 10): a Latin-1 CSV raised UnicodeDecodeError.
    p = tmp_path / "l.csv"
    p.write_bytes("id,label\nt1,caf\xe9\n".encode("latin-1"))
    with pytest.raises(UsageError,
                       match=r"l\.csv: not UTF-8 text \(byte 0xe9 at offset 15, line 2\)"):
        read_labels(p)


def test_label_ids_written_as_file_stems_match_the_safe_source_ids(tmp_path, capsys):
    # "my trailer.mp4" and "Été 2.mp4" become sources my-trailer and Été-2 (ids.sanitize_id):
    # labels written with the stems as they were used to match nothing.
    store = write_shards(
        tmp_path / "f",
        [("my-trailer_0", "my-trailer", 2, 0), ("Été-2_0", "Été-2", 2, 0), ("x_0", "x", 2, 0)],
    )
    p = tmp_path / "l.csv"
    p.write_text("id,label\nmy trailer,1\nÉté 2,2\nx,3\nno such,4\n", encoding="utf-8")
    j = join_labels(store, read_labels(p))
    assert j.labels == {"my-trailer_0": "1", "Été-2_0": "2", "x_0": "3"}
    assert j.renamed == {"my trailer": "my-trailer", "Été 2": "Été-2"}
    assert j.unknown == ["no such"]
    j.report(len(store))
    assert capsys.readouterr().err.splitlines()[-1] == (
        "vpipe train: note: 2 label ids are file names that vpipe turned into source ids "
        "(spaces and unsafe characters replaced); matched as those (e.g. 'my trailer' as "
        "my-trailer, 'Été 2' as Été-2)"
    )


def test_clips_without_rows_in_the_chosen_modalities_are_warned_about(store, capsys):
    # Regression: --modalities audio on clips without sound trained and predicted on empty
    # sequences without a word.
    ids = store.clip_ids
    assert warn_empty_clips(store, ids, ["image", "audio"], "vpipe train") == []
    assert capsys.readouterr().err == ""
    assert warn_empty_clips(store, ids, ["audio"], "vpipe predict") == ["t1_1"]
    assert capsys.readouterr().err == (
        "vpipe predict: warning: 1 of 4 clips have no audio features (e.g. t1_1); the model "
        "sees an empty sequence for them\n"
    )


def test_a_source_label_shadowed_by_clip_labels_is_not_unknown(store, tmp_path):
    p = write_labels(tmp_path / "l.csv", {"t2": "1", "t2_0": "2", "t3_0": "3"})
    j = join_labels(store, read_labels(p))
    assert j.labels == {"t2_0": "2", "t3_0": "3"} and j.unknown == []


def test_a_split_column_that_splits_a_video_is_warned_about(capsys):
    clips = {"a_0": "a", "a_1": "a", "b_0": "b"}
    side = split_by_source(clips, 0.2, 0.2, 0, {"a_0": "train", "a_1": "test", "b_0": "val"})
    assert side == {"a_0": "train", "a_1": "test", "b_0": "val"}
    assert "clips of 1 source videos on two sides (e.g. a)" in capsys.readouterr().err


def test_labels_matching_nothing_is_a_usage_error(store, tmp_path):
    p = write_labels(tmp_path / "l.csv", {"x": "1", "y": "2"})
    with pytest.raises(UsageError, match="no label id matches"):
        join_labels(store, read_labels(p))


def test_split_by_source_never_puts_one_source_on_two_sides():
    clips = {f"s{s}_{k}": f"s{s}" for s in range(20) for k in range(3)}
    side = split_by_source(clips, 0.2, 0.2, seed=1)
    by_source: dict[str, set] = {}
    for cid, split in side.items():
        by_source.setdefault(clips[cid], set()).add(split)
    assert all(len(s) == 1 for s in by_source.values())
    counts = {x: sum(1 for s in by_source.values() if x in s) for x in ("train", "val", "test")}
    assert counts == {"train": 12, "val": 4, "test": 4}
    assert side == split_by_source(clips, 0.2, 0.2, seed=1)  # same seed, same split
    assert side != split_by_source(clips, 0.2, 0.2, seed=2)


def test_split_column_overrides_fractions_and_too_few_sources_fail():
    clips = {"a_0": "a", "b_0": "b"}
    assert split_by_source(clips, 0.5, 0.0, 0, {"a_0": "test", "b_0": "train"}) == {
        "a_0": "test",
        "b_0": "train",
    }
    with pytest.raises(UsageError, match="2 source videos are too few"):
        split_by_source(clips, 0.3, 0.3, 0)


def test_uniform_sampling_takes_the_middle_of_equal_parts():
    # centres of 4 equal parts of 10 steps: 1.25, 3.75, 6.25, 8.75
    assert sample_uniform(10, 4).tolist() == [1, 3, 6, 8]
    assert sample_uniform(3, 4).tolist() == [0, 1, 2]
    assert sample_uniform(7, 0).tolist() == list(range(7))


def test_a_batch_pads_each_modality_and_keeps_lengths(store):
    data = ClipSequences(store, ["t1_0", "t1_1", "t2_0"], ["image", "audio"])
    x = pad_batch([data[i] for i in range(3)], ["image", "audio"])
    img, n = x["image"]
    assert img.shape == (3, 5, 4) and n.tolist() == [5, 3, 4]
    assert img[1, 3:].abs().sum() == 0  # padding is zeros
    assert img[1, 2].tolist() == [8.0, 9.0, 10.0, 11.0]  # row 2 of clip t1_1
    aud, na = x["audio"]
    assert aud.shape == (3, 2, 3) and na.tolist() == [2, 0, 1]


def test_streamed_and_in_ram_sequences_are_equal(store):
    ids = ["t3_0", "t1_0", "t2_0"]
    ram = ClipSequences(store, ids, ["image", "audio"], max_frames=3)
    disk = ClipSequences(store, ids, ["image", "audio"], max_frames=3, stream=True)
    for i in range(3):
        for m in ("image", "audio"):
            assert np.array_equal(ram[i][m], disk[i][m])
    assert ram[1]["image"].shape == (3, 4)  # 5 frames sampled down to 3


def test_present_modalities_skips_a_modality_without_rows(tmp_path):
    s = write_shards(tmp_path / "f", [("a_0", "a", 3, 0), ("b_0", "b", 2, 0)])
    assert present_modalities(s) == ["image"]


def test_synthetic_regression_target_is_the_mean_of_feature_0(tmp_path):
    csv_path, labels = make_feature_set(tmp_path / "f", "regression", n_sources=4)
    s = open_features(tmp_path / "f")
    for cid, v in labels.items():
        assert float(v) == pytest.approx(float(s[cid].image[:, 0].mean()), abs=1e-6)
    assert set(read_labels(csv_path)) == set(labels)


def test_streamed_statistics_read_each_shard_once_and_equal_the_in_ram_ones(tmp_path,
                                                                           monkeypatch):
    # issue 13: --stream computed its statistics with a read per clip (106 s at 100k clips).
    from pipeline.shards import reader

    folder = tmp_path / "feats"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for s in range(3):
        w = ShardWriter(folder / f"shard-{s:05d}.h5", image_dim=4, audio_dim=3)
        for k in range(5):
            n, a = int(rng.integers(0, 6)), int(rng.integers(0, 3))
            w.add(ClipFeatures(f"c{s}_{k}", f"src{s}", 0.0, 1.0,
                               rng.standard_normal((n, 4), dtype=np.float32), np.arange(n) * 0.5,
                               rng.standard_normal((a, 3), dtype=np.float32), np.arange(a) * 1.0))
        w.close()
    rebuild_index(folder)
    ids = [f"c{s}_{k}" for k in (4, 0, 2, 1) for s in (2, 0, 1)]
    reads = []
    real_read = reader._Shard.read
    monkeypatch.setattr(reader._Shard, "read",
                        lambda self, key, sel=(): reads.append((self.path.name, key, sel))
                        or real_read(self, key, sel))
    with open_features(folder) as st:
        streamed = ClipSequences(st, ids, ["image", "audio"], stream=True).frame_stats_of(
            ["image", "audio"])
    # One whole read of each features and timestamps dataset per shard, nothing per clip.
    assert sorted(reads) == sorted((f"shard-{s:05d}.h5", f"{m}/{d}", ())
                                   for s in range(3) for m in ("image", "audio")
                                   for d in ("features", "timestamps"))
    with open_features(folder) as st:
        in_ram = ClipSequences(st, ids, ["image", "audio"]).frame_stats_of(["image", "audio"])
        everything = {m: np.concatenate([st[c].image if m == "image" else st[c].audio
                                         for c in ids]) for m in ("image", "audio")}
    for m in ("image", "audio"):
        assert np.array_equal(streamed[m][0], in_ram[m][0])  # same order: same bits
        assert np.array_equal(streamed[m][1], in_ram[m][1])
        np.testing.assert_allclose(streamed[m][0], everything[m].mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(streamed[m][1], np.maximum(everything[m].std(0), 1e-3),
                                   rtol=1e-4, atol=1e-6)
