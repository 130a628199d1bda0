"""Captioning on cached features: a grammar-captioned synthetic set with held-out combinations
(through the CLI), the metrics against pycocoevalcap, decoding, and bad caption files."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
from caption_synth import make_caption_set, write_captions
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from pipeline.cli import main
from pipeline.train.caption_metrics import bleu, caption_metrics, cider_d, rouge_l
from pipeline.train.runs import load_run
from pipeline.train.vocab import Vocabulary, tokenize

TRAIN = ["--task", "caption", "--hidden", "64", "--lr", "3e-3", "--epochs", "15",
         "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def synth_set(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("captions")
    csv_path, splits, refs = make_caption_set(root / "feats")
    return root, csv_path, splits, refs


@pytest.fixture(scope="module")
def trained(synth_set) -> tuple[Path, dict]:
    """``vpipe train --task caption`` on the synthetic set (soft attention, beam 3)."""
    root, csv_path, _, _ = synth_set
    run = root / "run"
    assert main(["train", str(root / "feats"), "--labels", str(csv_path), "-o", str(run),
                 *TRAIN]) == 0
    return run, json.loads((run / "summary.json").read_text())


# --------------------------------------------------------------------------- metrics


REFS = {
    "v1": ["A man is playing a guitar.", "A man plays the guitar", "Someone is playing guitar "
           "on stage!"],
    "v2": ["A cat is eating food.", "The cat eats", "A kitten is eating from a bowl"],
    "v3": ["Two people are dancing.", "A couple dances in a room", "People dance"],
    "v4": ["A woman is slicing an onion.", "Someone cuts an onion", "a woman slices onions"],
}
HYPS = {"v1": "A man is playing guitar.", "v2": "a cat is eating", "v3": "A man is dancing in "
        "a room", "v4": "a woman is cutting a tomato"}


def test_metrics_equal_pycocoevalcap_on_a_multi_reference_example() -> None:
    refs = {i: [" ".join(tokenize(r)) for r in rs] for i, rs in REFS.items()}
    hyps = {i: " ".join(tokenize(h)) for i, h in HYPS.items()}
    res = {i: [h] for i, h in hyps.items()}
    ref_bleu, _ = Bleu(4).compute_score(refs, res, verbose=0)
    assert bleu(refs, hyps) == pytest.approx(ref_bleu, rel=1e-12)
    assert cider_d(refs, hyps) == pytest.approx(Cider().compute_score(refs, res)[0], rel=1e-12)
    assert rouge_l(refs, hyps) == pytest.approx(Rouge().compute_score(refs, res)[0], rel=1e-12)
    m = caption_metrics(refs, hyps)
    assert set(m) == {"bleu1", "bleu2", "bleu3", "bleu4", "cider", "rouge_l"}
    assert 0 < m["bleu4"] < m["bleu1"] < 1 and m["cider"] > 0
    # a caption equal to one of its references scores 1 on BLEU and ROUGE-L
    same = caption_metrics(refs, {i: r[0] for i, r in refs.items()})
    assert same["bleu4"] == pytest.approx(1.0) and same["rouge_l"] == pytest.approx(1.0)


def test_tokenize_and_vocabulary() -> None:
    assert tokenize("A man's guitar, on-stage!") == ["a", "man's", "guitar", "on", "stage"]
    v = Vocabulary.build([["a", "cat"], ["a", "dog"], ["a", "cat"]], min_count=2)
    assert v.words == ["<pad>", "<bos>", "<eos>", "<unk>", "a", "cat"]
    assert v.encode(["a", "dog", "cat"], max_words=2) == [4, 3, 2]
    assert v.decode([4, 5, 2, 4]) == ["a", "cat"]


# --------------------------------------------------------------------------- training


def test_held_out_combinations_are_captioned(trained, synth_set, tmp_path, capsys) -> None:
    run, s = trained
    root, csv_path, splits, refs = synth_set
    assert s["task"] == "caption" and s["main_metric"] == "cider" and s["beam"] == 3
    assert s["test"]["bleu4"] >= 0.8, s["test"]
    base = s["baseline"]["test"]
    assert base["bleu4"] < 0.5 and base["cider"] < s["test"]["cider"] / 3
    words = json.loads((run / "vocab.json").read_text())["words"]
    assert words[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"] and "triangle" in words
    assert (run / "best.pt").exists() and (run / "metrics.jsonl").exists()
    epoch = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert {"val_bleu4", "val_cider", "val_rouge_l", "test_cider"} <= set(epoch)

    # vpipe evaluate prints the metrics of the run's test split
    capsys.readouterr()
    assert main(["evaluate", str(run), str(root / "feats"), "--labels", str(csv_path),
                 "--split", "test", "--device", "cpu"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["task"] == "caption" and ev["n_clips"] == sum(v == "test" for v in splits.values())
    assert ev["metrics"]["bleu4"] == pytest.approx(s["test"]["bleu4"])

    # vpipe predict writes a caption per clip and per source (its best-scored clip's)
    out = tmp_path / "preds.jsonl"
    assert main(["predict", str(run), str(root / "feats"), "-o", str(out), "--quiet",
                 "--device", "cpu"]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    clips = {x["id"]: x for x in lines if x["level"] == "clip"}
    sources = [x for x in lines if x["level"] == "source"]
    assert len(clips) == len(refs) and len(sources) == len(refs)
    test_ids = [c for c, v in splits.items() if v == "test"]
    right = sum(clips[c]["caption"] in [" ".join(tokenize(r)) for r in refs[c]] for c in test_ids)
    assert right >= 0.8 * len(test_ids)
    assert all(x["from_clip"] == x["id"] and x["caption"] == clips[x["id"]]["caption"]
               for x in sources)


def test_shuffled_captions_stay_far_lower(synth_set, tmp_path, monkeypatch) -> None:
    """The control: training captions shuffled between clips teach nothing about the clip."""
    root, _, splits, refs = synth_set
    train_ids = [c for c, v in splits.items() if v == "train"]
    shuffled = train_ids[:]
    random.Random(1).shuffle(shuffled)
    mixed = {c: refs[s] if splits[c] == "train" else refs[c]
             for c, s in zip(refs, [dict(zip(train_ids, shuffled)).get(c, c) for c in refs])}
    csv_path = write_captions(tmp_path / "shuffled.csv", mixed, splits)
    monkeypatch.setenv("PATH", "")  # no Java here: meteor is left out (and the test is quick)
    assert main(["train", str(root / "feats"), "--labels", str(csv_path), "-o",
                 str(tmp_path / "run"), *TRAIN]) == 0
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["test"]["bleu4"] < 0.6 and "meteor" not in s["test"]
