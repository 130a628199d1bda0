"""The demo (`make demo`) at a reduced size: synthetic trailers whose content sets their rating,
then workflows/demo.toml end to end through `vpipe run`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from pipeline import demo


def test_trailer_plan_spreads_content_and_rating():
    trailers = demo.plan_trailers(12)
    assert [t.source_id for t in trailers[:2]] == ["trailer-01", "trailer-02"]
    assert {t.speed for t in trailers} == {0, 1, 2} and {t.tone for t in trailers} == {0, 1, 2}
    assert len({t.rgb for t in trailers}) == 12
    # rating = 1 + 5 * brightness + 1.25 * speed + 0.5 * tone
    t = trailers[4]
    assert t.rating == pytest.approx(1 + 5 * 4 / 11 + 1.25 * t.speed + 0.5 * t.tone, abs=1e-3)
    assert min(x.rating for x in trailers) == 1.5 and max(x.rating for x in trailers) == 9.5


@pytest.mark.slow
def test_demo_runs_the_demo_workflow_at_reduced_size(tmp_path: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "demo-work"
    rc = demo.main(
        [
            "--out",
            str(out),
            "--trailers",
            "8",
            "--duration",
            "5.5",
            # 5.5 s trailers hold one 4 s subclip from 1 s (the second would be 0.5 s: dropped)
            "--set",
            "train.epochs=4",
            "--set",
            "features.workers=0",
            "--quiet",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "test metrics (trailers the model never saw): loss" in printed
    assert f"{out}/features/" in printed

    trailers = demo.plan_trailers(8)
    with (out / "labels.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["id"], float(r["label"])) for r in rows] == [
        (t.source_id, t.rating) for t in trailers
    ]

    # The content the ratings depend on is in the outputs: background colour and tone.
    for t in (trailers[0], trailers[7]):
        clip = out / "extract-frames" / f"{t.source_id}_0"
        frame = np.asarray(Image.open(clip / "frames" / "000000.jpg").convert("RGB"))
        assert np.abs(frame[2, 2].astype(int) - t.rgb).max() <= 12
        wave, rate = sf.read(clip / "audio.wav")
        assert rate == 16000
        peak_hz = np.argmax(np.abs(np.fft.rfft(wave))) * rate / len(wave)
        assert peak_hz == pytest.approx(demo.TONES_HZ[t.tone], abs=2)

    clips = [json.loads(x) for x in (out / "subclip" / "manifest.jsonl").read_text().splitlines()]
    assert sorted(c["id"] for c in clips if c["status"] == "ok") == [
        f"{t.source_id}_0" for t in trailers
    ]
    summary = json.loads((out / "train" / "summary.json").read_text())
    assert summary["task"] == "regression" and np.isfinite(summary["test"]["mse"])
    preds = [json.loads(x) for x in (out / "train" / "predictions.jsonl").read_text().splitlines()]
    assert sorted(p["id"] for p in preds if p["level"] == "source") == [
        t.source_id for t in trailers
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--trailers", "2"], "--trailers: at least 3 (one trailer each for train, val and test)"),
        (["--duration", "0"], "--duration: seconds per trailer, above 0"),
    ],
)
def test_sizes_the_demo_cannot_train_on_are_refused_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], message: str
):
    # Regression: --trailers 2 made videos, clips and features, then failed in train (exit 2).
    with pytest.raises(SystemExit) as e:
        demo.main(["--out", str(tmp_path / "d"), *args])
    assert e.value.code == 2
    assert capsys.readouterr().err.endswith(f"error: {message}\n")
    assert not (tmp_path / "d").exists()
