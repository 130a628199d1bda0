"""vpipe subclip --segments: given (overlapping) ranges cut at their bounds, bad rows and unknown
sources; MSVD's annotations converted to segments and captions."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import synth
from test_subclip import FPS, manifest, read_cv2

from pipeline.cli import main
from pipeline.errors import UsageError
from pipeline.segments import read_segments


@pytest.fixture(scope="module")
def videos(media_dir: Path) -> Path:
    """Two frame-numbered 6 s videos (25 fps, keyframes every 2 s) in one folder."""
    folder = media_dir / "seg-videos"
    for name in ("alpha", "beta clip"):
        synth.make_video(folder / f"{name}.mp4", duration_s=6.0, gop=50, size=(64, 48),
                         extra=["-sc_threshold", "0"], audio=False)
    return folder


def write(path: Path, rows: list[list], header=("source", "start", "end", "id")) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_exact_segments_overlap_and_keep_their_bounds(videos: Path, tmp_path: Path,
                                                      capsys) -> None:
    seg = write(tmp_path / "segments.csv", [
        ["alpha", "1.0", "3.0", ""],
        ["alpha", "2.01", "4.5", "a_mid"],        # overlaps the first; starts between frames
        ["beta clip", "0", "6", "whole"],          # stem with a space; the whole video
        ["alpha", "5.0", "9.0", ""],               # past the end
        ["alpha", "3", "2", "backwards"],
        ["alpha", "x", "2", "nan_start"],
        ["gamma", "0", "1", ""],                   # no such video
    ])
    out = tmp_path / "clips"
    code = main(["subclip", str(videos), "-o", str(out), "--segments", str(seg),
                 "--workers", "1", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    recs = {r["id"]: r for r in manifest(out)}
    a = recs["alpha_1.0_3.0"]
    assert a["status"] == "ok" and (a["start"], a["end"]) == (1.0, 3.0)
    assert (a["asked_start"], a["asked_end"], a["segments_line"]) == (1.0, 3.0, 2)
    assert read_cv2(out / a["path"]) == list(range(25, 75))
    m = recs["a_mid"]  # exact: the first frame at or after 2.01 s (2.04), within one frame
    assert m["status"] == "ok" and m["start"] == 2.04 and m["end"] == 4.52
    assert abs(m["start"] - m["asked_start"]) < 1 / FPS and m["n_frames"] == 62
    assert read_cv2(out / m["path"]) == list(range(51, 113))
    w = recs["whole"]
    assert w["source"] == "beta-clip" and (w["start"], w["end"], w["n_frames"]) == (0.0, 6.0, 150)
    for cid, why in [("alpha_5.0_9.0", "outside the video (it ends at 6.000 s)"),
                     ("backwards", "end 2 s is not after start 3 s"),
                     ("nan_start", "start 'x' is not a number")]:
        assert recs[cid]["status"] == "failed" and why in recs[cid]["error"]
        assert f"{seg}:" in recs[cid]["error"] and why in err
        assert not (out / "alpha" / f"{cid}.mp4").exists()
    assert "1 sources match no video among the inputs (e.g. gamma)" in err
    info = json.loads((out / "vpipe.json").read_text())
    assert info["params"]["segments_sha256"]


def test_keyframe_segments_snap_to_keyframes(videos: Path, tmp_path: Path) -> None:
    seg = write(tmp_path / "segments.csv", [["alpha", "0.1", "3.9", "k1"],
                                           ["alpha", "1.9", "6", "k2"],  # overlaps k1
                                           ["alpha", "2.5", "2.7", "k3"]])
    out = tmp_path / "clips"
    code = main(["subclip", str(videos / "alpha.mp4"), "-o", str(out), "--segments", str(seg),
                 "--mode", "keyframe", "--quiet"])
    recs = {r["id"]: r for r in manifest(out)}
    assert code == 1  # k3 falls between two keyframes
    assert (recs["k1"]["start"], recs["k1"]["end"]) == (0.0, 4.0)
    assert (recs["k2"]["start"], recs["k2"]["end"]) == (2.0, 6.0)
    assert read_cv2(out / recs["k2"]["path"]) == list(range(50, 150))
    assert recs["k3"]["status"] == "failed" and "use --mode exact" in recs["k3"]["error"]


def test_a_video_without_segments_is_skipped(videos: Path, tmp_path: Path) -> None:
    seg = write(tmp_path / "s.csv", [["alpha", "0", "1", ""]], ("source", "start", "end"))
    out = tmp_path / "clips"
    assert main(["subclip", str(videos), "-o", str(out), "--segments", str(seg), "--quiet"]) == 0
    recs = manifest(out)
    assert {(r["id"], r["status"]) for r in recs} == {("alpha_0_1", "ok"),
                                                      ("beta-clip", "skipped")}


@pytest.mark.parametrize("text,msg", [
    ("source,begin,end\nalpha,0,1\n", "needs the columns source,start,end[,id] (missing start"),
    ("source,start,end\n", "no segment rows"),
    ("source,start,end,id\nalpha,0,1,x\nalpha,1,2,x\n", ":3: clip id 'x' is also on line 2"),
    # Regression (issue 24, 9): a Latin-1 byte raised UnicodeDecodeError.
    ("source,start,end,id\nalpha,0,1,caf\xe9\n".encode("latin-1"),
     "s.csv: not UTF-8 text (byte 0xe9 at offset 33, line 2)"),
    # Regression (issue 24, 10): the open quote took lines 3-4 as one source, cut nothing.
    ('source,start,end\nalpha,0,1\n"alpha,1,2\nalpha,2,3\n', "s.csv:3: unclosed quote"),
    ('source,start,end\nalpha,0,1\nalpha,"1,2\n', "s.csv:3: unclosed quote"),
])
def test_bad_segment_files_are_usage_errors(tmp_path: Path, text: str | bytes, msg: str,
                                            videos: Path, capsys) -> None:
    path = tmp_path / "s.csv"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    with pytest.raises(UsageError) as e:
        read_segments(path)
    assert msg in str(e.value)
    out = tmp_path / "clips"
    assert main(["subclip", str(videos), "-o", str(out), "--segments", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0] and not out.exists()


def test_quoted_fields_may_span_lines_and_rows_keep_their_line(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_text('source,start,end,id\n\nalpha,0,1,"a\nb"\nalpha,x,2,c\n')
    assert [(s.clip_id, s.line, s.problem) for s in read_segments(path)] == [
        ("a-b", 3, None), ("c", 5, "start 'x' is not a number")]


@pytest.mark.parametrize("data,msg", [
    (b'VideoID,Start,End,Language,Description\nv1,1,2,English,"A bird\nv1,1,2,English,x\n',
     "a.csv:2: unclosed quote"),
    ("VideoID,Start,End,Language,Description\nv1,1,2,English,caf\xe9\n".encode("latin-1"),
     "a.csv: not UTF-8 text (byte 0xe9 at offset 57, line 2)"),
])
def test_msvd_annotations_not_utf8_or_with_an_open_quote_are_one_line(
    tmp_path: Path, data: bytes, msg: str, capsys
) -> None:
    (tmp_path / "a.csv").write_bytes(data)
    assert main(["convert-msvd", str(tmp_path / "a.csv"), "-o", str(tmp_path / "msvd")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0] and not (tmp_path / "msvd").exists()


def test_msvd_annotations_convert_to_segments_and_captions(tmp_path: Path) -> None:
    ann = tmp_path / "MSR Video Description Corpus.csv"
    write(ann, [["mv89psg6zh4", "33", "46", "1", "clean", "16", "English", "A bird is bathing."],
                ["mv89psg6zh4", "33", "46", "2", "clean", "10", "English", "a bird  splashes"],
                ["mv89psg6zh4", "33", "46", "3", "clean", "10", "German", "Ein Vogel badet"],
                ["-4wsuPCjDBc", "5", "15", "4", "unverified", "9", "English", "A man talks."]],
          ("VideoID", "Start", "End", "WorkerID", "Source", "AnnotationTime", "Language",
           "Description"))
    assert main(["convert-msvd", str(ann), "-o", str(tmp_path / "msvd")]) == 0
    segs = read_segments(tmp_path / "msvd" / "segments.csv")
    assert [(s.clip_id, s.source, s.start_s, s.end_s) for s in segs] == [
        ("mv89psg6zh4_33_46", "mv89psg6zh4", 33.0, 46.0),
        ("4wsuPCjDBc_5_15", "-4wsuPCjDBc", 5.0, 15.0)]
    caps = (tmp_path / "msvd" / "captions.csv").read_text().splitlines()
    assert caps == ["id,caption", "mv89psg6zh4_33_46,A bird is bathing.",
                    "mv89psg6zh4_33_46,a bird splashes", "4wsuPCjDBc_5_15,A man talks."]
