"""Captioning on cached features: a grammar-captioned synthetic set with held-out combinations
(through the CLI), the metrics against pycocoevalcap, decoding, and bad caption files."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from caption_synth import make_caption_set, write_captions
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from pipeline.cli import main
from pipeline.train.runs import load_run
from pipeline.train.tasks.caption.metrics import bleu, caption_metrics, cider_d, rouge_l
from pipeline.train.tasks.caption.vocab import Vocabulary, tokenize

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
    assert {"val_bleu4", "val_cider", "val_rouge_l"} <= set(epoch)
    assert not [k for k in epoch if k.startswith("test_")]  # test: once, in summary.json

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
    donor = dict(zip(train_ids, shuffled, strict=True))  # a train clip's captions: another's
    mixed = {c: refs[donor.get(c, c)] for c in refs}
    csv_path = write_captions(tmp_path / "shuffled.csv", mixed, splits)
    monkeypatch.setenv("PATH", "")  # no Java here: meteor is left out (and the test is quick)
    assert main(["train", str(root / "feats"), "--labels", str(csv_path), "-o",
                 str(tmp_path / "run"), *TRAIN]) == 0
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["test"]["bleu4"] < 0.6 and "meteor" not in s["test"]


def test_beam_1_is_greedy_and_beam_3_agrees_on_a_clear_task(trained, synth_set) -> None:
    run, _ = trained
    root = synth_set[0]
    model, spec = load_run(run)
    model.eval()
    from pipeline.shards import open_features
    from pipeline.train.sequences import ClipSequences, pad_batch

    with open_features(root / "feats") as store:
        ids = store.clip_ids[:6]
        data = ClipSequences(store, ids, spec.modalities)
        x = pad_batch([data[i] for i in range(len(ids))], spec.modalities)
    greedy, g_lp = model.generate(x, 20, beam=1)
    # greedy by hand: the arg-max word at each step, from <bos>
    mem, mask, state = model.encode(x)
    word = torch.full((len(ids),), 1, dtype=torch.long)
    by_hand = []
    with torch.no_grad():
        for _ in range(21):
            logits, state = model.step(word, state, mem, mask)
            word = logits.argmax(1)
            by_hand.append(word)
    by_hand = torch.stack(by_hand, 1).tolist()
    for g, h in zip(greedy, by_hand, strict=True):
        n = g.index(2) + 1  # through <eos>
        assert g[:n] == h[:n]
    beam, b_lp = model.generate(x, 20, beam=3)
    assert [b[: b.index(2)] for b in beam] == [g[: g.index(2)] for g in greedy]  # a clear task


@torch.no_grad()
def _generate_waiting_each_word(model, x: dict, max_words: int, beam: int) -> tuple:
    """The beam search as it was before it ran on the device alone (a wait on every word, the
    loop left when every beam has ended): the reference the device-only loop must equal."""
    import torch.nn.functional as F

    mem, mask, (h, c) = model.encode(x)
    b, k = h.shape[0], beam
    mem, mask, h, c = (t.repeat_interleave(k, 0) for t in (mem, mask, h, c))
    score = torch.full((b, k), float("-inf"))
    score[:, 0] = 0.0
    word = torch.full((b * k,), 1, dtype=torch.long)
    seqs = torch.zeros((b * k, 0), dtype=torch.long)
    done = torch.zeros(b * k, dtype=torch.bool)
    for _ in range(max_words + 1):
        logits, (h, c) = model.step(word, (h, c), mem, mask)
        logp = F.log_softmax(logits.float(), -1)
        v = logp.shape[1]
        logp[done] = float("-inf")
        logp[done, 0] = 0.0
        score, idx = (score.reshape(-1, 1) + logp).reshape(b, k * v).topk(k, dim=1)
        origin = (idx // v + torch.arange(b)[:, None] * k).reshape(-1)
        word = (idx % v).reshape(-1)
        seqs = torch.cat([seqs[origin], word[:, None]], 1)
        h, c, done = h[origin], c[origin], done[origin] | (word == 2)
        word = word.masked_fill(done, 0)
        if bool(done.all()):
            break
    seqs = seqs.reshape(b, k, -1)
    n_words = ((seqs != 0).sum(-1)).clamp(min=1).float()
    best = score.argmax(1)
    return ([seqs[i, best[i]].tolist() for i in range(b)],
            [float(score[i, best[i]] / n_words[i, best[i]]) for i in range(b)])


def test_decoding_on_the_device_alone_gives_the_captions_of_a_wait_per_word(trained,
                                                                             synth_set) -> None:
    from pipeline.shards import open_features
    from pipeline.train.sequences import ClipSequences, pad_batch

    model, spec = load_run(trained[0])
    model.eval()
    with open_features(synth_set[0] / "feats") as store:
        data = ClipSequences(store, store.clip_ids, spec.modalities)
        x = pad_batch([data[i] for i in range(len(data))], spec.modalities)
    ran_on = set()
    for beam in (1, 2, 3, 5):
        for max_words in (20, 3):  # 3: most captions cut before <eos>
            want = _generate_waiting_each_word(model, x, max_words, beam)
            for stop_early in (True, False):
                assert model.generate(x, max_words, beam, stop_early) == want
            ran_on.add(int(model.decode(*model.encode(x), max_words, beam, False)[2]))
    # Both ways out were taken: every beam ended early (20 words) and none did (3 words).
    assert min(ran_on) < 21 and 4 in ran_on


def test_a_finished_run_is_reported_complete(trained, synth_set, capsys) -> None:
    run, s = trained
    root, csv_path, _, _ = synth_set
    args = ["train", str(root / "feats"), "--labels", str(csv_path), "-o", str(run), *TRAIN]
    assert main([a for a in args if a != "--quiet"]) == 0
    assert "is already complete" in capsys.readouterr().err
    assert json.loads((run / "summary.json").read_text()) == s


def _as_before_issue_25(run: Path) -> None:
    """Rewrite a run's recorded options as vpipe wrote them when one --attention served both
    models (the decoder's soft|none in ``attention``, no ``caption_attention``)."""
    import torch

    def old(options: dict) -> dict:
        return {**{k: v for k, v in options.items() if k != "caption_attention"},
                "attention": options["caption_attention"]}

    cfg = json.loads((run / "config.json").read_text())
    cfg["config"] = old(cfg["config"])
    (run / "config.json").write_text(json.dumps(cfg))
    for name in ("best.pt", "last.pt"):
        ck = torch.load(run / name, weights_only=True)
        ck["meta"]["config"] = old(ck["meta"]["config"])
        torch.save(ck, run / name)


def test_a_run_and_a_command_of_the_old_attention_spelling_still_work(trained, synth_set,
                                                                      tmp_path, capsys) -> None:
    run, s = trained
    root, csv_path, _, _ = synth_set
    before = tmp_path / "run"
    shutil.copytree(run, before)
    _as_before_issue_25(before)
    args = ["train", str(root / "feats"), "--labels", str(csv_path), "-o", str(before),
            *[a for a in TRAIN if a != "--quiet"]]
    assert main([*args, "--attention", "soft"]) == 0  # the command of then
    err = capsys.readouterr().err
    assert "note: --attention soft is read as --caption-attention soft" in err
    assert "is already complete" in err
    assert main([*args, "--caption-attention", "soft"]) == 0  # today's
    assert "is already complete" in capsys.readouterr().err
    preds = [tmp_path / "now.jsonl", tmp_path / "then.jsonl"]
    for r, out in zip((run, before), preds, strict=True):
        assert main(["predict", str(r), str(root / "feats"), "-o", str(out), "--device", "cpu",
                     "--quiet"]) == 0
    assert preds[0].read_text() == preds[1].read_text()
    assert main([*args, "--caption-attention", "none"]) == 2  # another decoder: refused
    assert "caption_attention: 'soft' -> 'none'" in capsys.readouterr().err


def test_captions_without_val_clips_train_through_the_one_loop(synth_set, tmp_path,
                                                              capsys) -> None:
    # The caption task once had its own copy of the epoch loop, without this note.
    root, _, splits, refs = synth_set
    no_val = {c: "train" if s == "val" else s for c, s in splits.items()}
    csv_path = write_captions(tmp_path / "no-val.csv", refs, no_val)
    out = tmp_path / "run"
    args = [a for a in TRAIN if a != "--quiet"]
    assert main(["train", str(root / "feats"), "--labels", str(csv_path), "-o", str(out), *args,
                 "--epochs", "2", "--hidden", "16", "--beam", "1"]) == 0
    err = capsys.readouterr().err
    assert "note: no validation clips; best.pt and early stopping follow the train loss" in err
    s = json.loads((out / "summary.json").read_text())
    assert (s["main_metric"], s["val"], s["epochs_run"]) == ("cider", {}, 2)
    assert (out / "curves.png").is_file() and (out / "vocab.json").is_file()


def test_a_caption_split_of_few_sources_is_warned_of(synth_set, tmp_path, capsys) -> None:
    """As for every task: a val split of 2 source videos says little, and the run says so."""
    root, _, splits, refs = synth_set
    val = sorted(c for c, s in splits.items() if s == "val")
    kept = set(val[:2])  # the set's clips are their own sources: 2 val sources
    few = {c: ("val" if c in kept else "train") if s == "val" else s for c, s in splits.items()}
    csv_path = write_captions(tmp_path / "few-val.csv", refs, few)
    out = tmp_path / "run"
    args = [a for a in TRAIN if a != "--quiet"]
    assert main(["train", str(root / "feats"), "--labels", str(csv_path), "-o", str(out), *args,
                 "--epochs", "2", "--hidden", "16", "--beam", "1"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["n_sources"]["val"] == 2
    note = "the val split holds 2 sources: its figures say little"
    assert any(w.startswith(note) for w in s["warnings"])
    assert f"vpipe train: warning: {note}" in capsys.readouterr().err


def test_an_epoch_better_only_by_the_tie_break_says_so() -> None:
    from pipeline.train.loop import epoch_line

    rec = {"epoch": 3, "train_loss": 1.0, "val": {"loss": 0.5, "cider": 0.0}, "seconds": 0.1}
    assert epoch_line(rec, 9, "cider", True).endswith("0.10s  *")
    assert epoch_line(rec, 9, "cider", True, tie=True).endswith(
        "0.10s  * (same val_cider, lower val_loss)")
    assert epoch_line(rec, 9, "cider", False).endswith("0.10s")


# --------------------------------------------------------------------------- bad input


def _captions(tmp_path: Path, synth_set, extra: dict[str, list[str]] | None = None,
              drop: str | None = None) -> Path:
    _, _, splits, refs = synth_set
    refs = {c: list(r) for c, r in refs.items() if c != drop}
    for c, caps in (extra or {}).items():
        refs[c] = refs.get(c, []) + caps
    return write_captions(tmp_path / "c.csv", refs, {c: splits[c] for c in refs})


@pytest.mark.parametrize("text,msg", [
    ("", "empty caption for id"),
    ("?!...", "has no word"),
])
def test_an_empty_caption_is_refused_before_anything_is_written(
    synth_set, tmp_path, capsys, text, msg
) -> None:
    root, _, _, refs = synth_set
    first = next(iter(refs))
    csv_path = _captions(tmp_path, synth_set, {first: [text]})
    out = tmp_path / "run"
    assert main(["train", str(root / "feats"), "--labels", str(csv_path), "-o", str(out),
                 *TRAIN]) == 2
    err = capsys.readouterr().err
    assert f"{csv_path}:" in err and msg in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("fault,msg", [
    ("quote", "c.csv:3: unclosed quote"),  # issue 24, 10: the rest of the file was one caption
    ("latin-1", "c.csv: not UTF-8 text (byte 0xe9 at offset"),  # issue 24, 9
])
def test_a_captions_file_not_utf8_or_with_an_open_quote_is_one_line(
    synth_set, tmp_path, capsys, fault, msg
) -> None:
    root = synth_set[0]
    csv_path = _captions(tmp_path, synth_set)
    lines = csv_path.read_bytes().split(b"\n")
    lines[2] = b'"' + lines[2] if fault == "quote" else lines[2] + "\xe9".encode("latin-1")
    csv_path.write_bytes(b"\n".join(lines))
    out = tmp_path / "run"
    assert main(["train", str(root / "feats"), "--labels", str(csv_path), "-o", str(out),
                 *TRAIN]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0] and not out.exists()
    if fault == "latin-1":
        assert err[0].endswith(", line 3); save it as UTF-8")


def test_unknown_words_and_uncaptioned_clips_are_reported(synth_set, tmp_path, capsys,
                                                          monkeypatch) -> None:
    root, _, splits, refs = synth_set
    train_ids = [c for c, v in splits.items() if v == "train"]
    csv_path = _captions(tmp_path, synth_set, {train_ids[0]: ["zebra xylophone quokka"]},
                         drop=train_ids[1])
    monkeypatch.setenv("PATH", "")
    out = tmp_path / "run"
    assert main(["train", str(root / "feats"), "--labels", str(csv_path), "-o", str(out),
                 "--task", "caption", "--epochs", "1", "--hidden", "16", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "1 training captions have no word of the vocabulary" in err
    assert f"1 of {len(refs)} clips have no label, left out (e.g. {train_ids[1]})" in err
    assert err.count("meteor left out") == 1
    s = json.loads((out / "summary.json").read_text())
    assert s["dropped_training_captions"] == 1 and s["unlabeled_clips"] == 1
    assert "zebra" not in json.loads((out / "vocab.json").read_text())["words"]


def test_only_unknown_words_and_bad_options_are_usage_errors(synth_set, tmp_path,
                                                             capsys) -> None:
    root, _, splits, _ = synth_set
    csv_path = write_captions(tmp_path / "odd.csv",
                              {c: [f"word{k} other{k}"] for k, c in enumerate(splits)}, splits)
    out = tmp_path / "run"
    feats = str(root / "feats")
    assert main(["train", feats, "--labels", str(csv_path), "-o", str(out), *TRAIN]) == 2
    assert "no training caption has a word seen --min-count 2 times" in capsys.readouterr().err
    for opt, msg in [(["--attention", "hard"], "--attention 'hard'"),
                     (["--attention", "text-guided"], "a caption model takes --caption-attention"),
                     (["--caption-attention", "hard"], "--caption-attention 'hard'"),
                     (["--beam", "0"], "--beam must be at least 1")]:
        assert main(["train", feats, "--labels", str(csv_path), "-o", str(out), *TRAIN,
                     *opt]) == 2
        assert msg in capsys.readouterr().err
    assert not out.exists()


# --------------------------------------------------------------------------- the workflow

COLOURED = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


def test_captioning_workflow_at_a_small_size(tmp_path, monkeypatch, capsys) -> None:
    """workflows/captioning.toml on six 3 s videos (two per colour, one of them in test), two
    overlapping segments each, captions naming the colour; resnet18 with seeded weights."""
    import synth

    segs, caps = ["source,start,end,id"], ["id,caption,split"]
    for colour, rgb in COLOURED.items():
        for k, split in enumerate(("train", "test")):
            name = f"{colour}{k}"
            synth.make_video(tmp_path / "videos" / f"{name}.mp4", duration_s=3.0, size=(64, 48),
                             color=rgb, audio=False)
            for a, b in ((0.0, 2.0), (1.0, 3.0)):
                cid = f"{name}_{a:g}_{b:g}"
                segs.append(f"{name},{a},{b},{cid}")
                caps += [f"{cid},A {colour} screen is shown here.,{split}",
                         f"{cid},The screen shows the colour {colour},{split}"]
    (tmp_path / "segments.csv").write_text("\n".join(segs) + "\n")
    (tmp_path / "captions.csv").write_text("\n".join(caps) + "\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", "")  # no Java: meteor left out, and the run stays quick
    sets = ["features.image-model=resnet18", "features.image-weights=none",
            "features.workers=0", "train.hidden=32", "train.lr=3e-3", "train.epochs=25",
            "train.min-count=1", "train.device=cpu", "train.batch-size=8", "extract-frames.fps=2"]
    wf = Path(__file__).resolve().parent.parent / "workflows" / "captioning.toml"
    args = ["run", str(wf), "--quiet", *[x for s in sets for x in ("--set", s)]]
    assert main(args) == 0, capsys.readouterr().err
    work = tmp_path / "work" / "captioning"
    clips = [json.loads(x) for x in (work / "subclip" / "manifest.jsonl").read_text().splitlines()]
    assert len(clips) == 12 and all(c["status"] == "ok" for c in clips)
    s = json.loads((work / "train" / "summary.json").read_text())
    assert s["n_clips"]["test"] == 6 and s["test"]["bleu4"] >= 0.8, s["test"]
    preds = [json.loads(x) for x in
             (work / "train" / "predictions.jsonl").read_text().splitlines()]
    clip_lines = [p for p in preds if p["level"] == "clip"]
    assert len(clip_lines) == 12
    for p in clip_lines:  # every clip, train and test, is captioned with its own colour
        colour = next(c for c in COLOURED if p["id"].startswith(c))
        assert colour in p["caption"].split(), p
