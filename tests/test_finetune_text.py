"""``vpipe train --finetune-text`` (issue 29, part 3): the title encoder the features recorded,
trained inside the model; checkpoints, evaluate and predict use its fine-tuned weights; an
encoder that cannot be had is one line before training; without the flag nothing changes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_bert

from pipeline.cli import main

COLOURS = ("red", "green", "blue", "yellow")
ENCODER = "branches.text.encoder."
# Small and fast on one CPU thread; a high --text-lr so the encoder visibly moves in 2 epochs.
FAST = ["--device", "cpu", "--threads", "1", "--seed", "0", "--hidden", "8", "--batch-size",
        "4", "--epochs", "2", "--lr", "1e-2", "--val-fraction", "0.2", "--test-fraction", "0.2",
        "--task", "classification", "-q"]
TUNE = ["--finetune-text", "--text-lr", "1e-2"]


def _features(root: Path, weights, model: Path, n_sources: int = 10) -> tuple[Path, Path]:
    """A feature folder of ``n_sources`` one-clip sources (2 frames, no audio), each titled
    "<colour> cat runs" (one without a title), made with the text model ``model``; and
    labels: the title's colour."""
    from test_features import args, make_media

    media = make_media(root / "media", {f"s{i}_0": (2, None) for i in range(n_sources)})
    titles = root / "titles.csv"
    lines = [f"s{i},{COLOURS[i % 4]} cat runs" for i in range(1, n_sources)]  # s0: none
    titles.write_text("id,text\n" + "\n".join(lines) + "\n")
    labels = root / "labels.csv"
    labels.write_text("id,label\n" + "".join(f"s{i},{COLOURS[i % 4]}\n"
                                             for i in range(n_sources)))
    out = root / "features"
    assert main([*args(media, out, weights, "--audio-model", "none", "--text", str(titles),
                       "--text-model", str(model))]) == 0
    return out, labels


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, weights):
    """Features made with a tiny BERT, and two runs on them: frozen and --finetune-text."""
    root = tmp_path_factory.mktemp("finetune")
    bert = tiny_bert(root / "bert")
    feats, labels = _features(root, weights, bert)
    runs = {}
    for name, extra in (("frozen", []), ("tuned", TUNE)):
        runs[name] = root / name
        assert main(["train", str(feats), "--labels", str(labels), *FAST, *extra,
                     "-o", str(runs[name])]) == 0
    return {"root": root, "bert": bert, "features": feats, "labels": labels, **runs}


def _weights(run: Path, name: str = "best") -> dict[str, torch.Tensor]:
    return torch.load(run / f"{name}.pt", map_location="cpu", weights_only=True)["model"]


def _original(bert: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModel

    return AutoModel.from_pretrained(bert).state_dict()


def _predict(run: Path, features: Path, out: Path) -> dict[str, dict]:
    assert main(["predict", str(run), str(features), "-o", str(out), "--device", "cpu",
                 "-q"]) == 0
    return {r["id"]: r for r in map(json.loads, out.read_text().splitlines())
            if r["level"] == "clip"}


def test_the_encoders_weights_change_and_the_checkpoints_hold_them(setup) -> None:
    before = _original(setup["bert"])
    for ck in ("best", "last"):
        tuned = {k[len(ENCODER):]: v for k, v in _weights(setup["tuned"], ck).items()
                 if k.startswith(ENCODER)}
        assert set(tuned) == set(before)  # the whole encoder is in the checkpoint
        moved = [k for k in before if not torch.equal(tuned[k], before[k])]
        assert "embeddings.word_embeddings.weight" in moved
        assert any(".attention." in k for k in moved)  # its layers are trained, not only input
    state = torch.load(setup["tuned"] / "last.pt", map_location="cpu", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == [1e-2, 1e-2] and len(groups[1]["params"]) == len(before)
    # The frozen run has no encoder and one group, as before the option existed.
    assert not any(k.startswith(ENCODER) for k in _weights(setup["frozen"]))
    frozen = torch.load(setup["frozen"] / "last.pt", map_location="cpu", weights_only=True)
    assert len(frozen["optimizer"]["param_groups"]) == 1


def test_the_run_records_the_option_and_the_encoder(setup) -> None:
    config = json.loads((setup["tuned"] / "config.json").read_text())
    assert config["config"]["finetune_text"] is True and config["config"]["text_lr"] == 1e-2
    rec = config["text_encoder"]
    assert rec["model"] == str(setup["bert"]) and rec["where"] == str(setup["bert"].resolve())
    assert rec["weights"]["kind"] == "folder" and "model.safetensors" in rec["weights"]["sha256"]
    params = json.loads((setup["tuned"] / "vpipe.json").read_text())["params"]
    assert params["finetune_text"] is True and params["text_lr"] == 1e-2
    frozen = json.loads((setup["frozen"] / "config.json").read_text())
    assert "text_encoder" not in frozen and frozen["config"]["finetune_text"] is False


def test_the_tokens_are_the_titles_features_encoded(setup) -> None:
    """Train reads the title the shards keep and tokenises it as features did: the encoder
    before training gives the stored rows from those tokens."""
    from transformers import AutoModel

    from pipeline.shards import open_features
    from pipeline.train.runs import load_run
    from pipeline.train.sequences import ClipSequences

    model, spec = load_run(setup["tuned"])
    original = AutoModel.from_pretrained(setup["bert"]).eval()
    with open_features(setup["features"]) as store:
        ids = store.clip_ids
        data = ClipSequences(store, ids, ["text"], title_tokens=model.title_tokens)
        for k, cid in enumerate(ids):
            clip, tokens = store[cid], data[k]["text"]
            assert tokens.dtype == np.int64 and len(tokens) == clip.text.shape[0]
            if cid == "s0_0":  # no title: no tokens, no rows
                assert clip.text_string == "" and len(tokens) == 0
                continue
            assert clip.text_string == f"{COLOURS[int(cid[1]) % 4]} cat runs"
            assert len(tokens) == 5  # [CLS] colour cat runs [SEP]
            with torch.no_grad():
                rows = original(input_ids=torch.from_numpy(tokens)[None]).last_hidden_state[0]
            np.testing.assert_allclose(rows.numpy(), clip.text, atol=1e-5, rtol=0)


def test_predictions_use_the_finetuned_encoder(setup, tmp_path: Path) -> None:
    """The same run with its encoder put back to the original weights predicts otherwise; and
    the loaded model holds the checkpoint's encoder, not the original."""
    from pipeline.train.runs import load_run

    model, _ = load_run(setup["tuned"])
    saved = _weights(setup["tuned"])
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    tuned = _predict(setup["tuned"], setup["features"], tmp_path / "tuned.jsonl")

    reset = tmp_path / "reset"
    shutil.copytree(setup["tuned"], reset)
    ck = torch.load(reset / "best.pt", map_location="cpu", weights_only=True)
    ck["model"].update({ENCODER + k: v for k, v in _original(setup["bert"]).items()})
    torch.save(ck, reset / "best.pt")
    again = _predict(reset, setup["features"], tmp_path / "reset.jsonl")
    assert tuned.keys() == again.keys() and len(tuned) == 10
    titled = [c for c in tuned if c != "s0_0"]
    assert all(tuned[c]["scores"] != again[c]["scores"] for c in titled)
    # A clip without a title has no encoder input: the encoder does not change its scores.
    assert tuned["s0_0"]["scores"] == again["s0_0"]["scores"]

    # evaluate runs the same model: its figures are the tuned run's own test figures.
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(setup["tuned"]), str(setup["features"]), "--labels",
                 str(setup["labels"]), "--split", "test", "--device", "cpu", "-o",
                 str(out)]) == 0
    summary = json.loads((setup["tuned"] / "summary.json").read_text())
    got = json.loads(out.read_text())["metrics"]
    assert got["accuracy"] == summary["test"]["accuracy"] and got["loss"] == pytest.approx(
        summary["test"]["loss"], abs=1e-6)


def test_a_resumed_finetuned_run_equals_one_trained_straight(setup, tmp_path: Path) -> None:
    run = tmp_path / "resumed"
    base = ["train", str(setup["features"]), "--labels", str(setup["labels"]), *FAST, *TUNE,
            "-o", str(run)]
    one = [*base[: base.index("--epochs") + 1], "1", *base[base.index("--epochs") + 2:]]
    assert main(one) == 0
    assert main([*base, "--resume"]) == 0
    a, b = _weights(run, "last"), _weights(setup["tuned"], "last")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def figures(r: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (r / "metrics.jsonl").read_text().splitlines()]

    assert figures(run) == figures(setup["tuned"])


def test_stream_and_folds_fine_tune_too(setup, tmp_path: Path) -> None:
    """--stream reads the titles per batch and trains the same model as in RAM, to the bit;
    each --folds run fine-tunes its own copy of the encoder."""
    base = ["train", str(setup["features"]), "--labels", str(setup["labels"]), *FAST, *TUNE]
    assert main([*base, "--stream", "-o", str(tmp_path / "stream")]) == 0
    a, b = _weights(tmp_path / "stream", "last"), _weights(setup["tuned"], "last")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main([*base, "--folds", "2", "-o", str(tmp_path / "folds")]) == 0
    before = _original(setup["bert"])["embeddings.word_embeddings.weight"]
    for k in (1, 2):
        tuned = _weights(tmp_path / "folds" / f"fold-{k}")
        assert not torch.equal(tuned[ENCODER + "embeddings.word_embeddings.weight"], before)


def _one_line_exit_2(argv: list[str], capsys, message: str) -> None:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_an_encoder_that_cannot_be_had_is_one_line_before_training(
    tmp_path: Path, weights, capsys
) -> None:
    bert = tiny_bert(tmp_path / "bert")
    feats, labels = _features(tmp_path, weights, bert, n_sources=6)
    run = tmp_path / "run"
    argv = ["train", str(feats), "--labels", str(labels), *FAST, *TUNE, "-o", str(run)]

    bert.rename(tmp_path / "moved")  # gone from where features found it
    _one_line_exit_2(argv, capsys, f"cannot be found: no folder {bert}")
    (tmp_path / "moved").rename(bert)

    weights_file = bert / "model.safetensors"
    good = weights_file.read_bytes()
    weights_file.write_bytes(b"not a safetensors file")  # cannot be loaded
    _one_line_exit_2(argv, capsys, f"cannot be loaded from {bert}")
    weights_file.write_bytes(good)

    config = bert / "config.json"
    config.write_text(config.read_text().replace("{", '{"vpipe_test_edit": 1, ', 1))
    _one_line_exit_2(argv, capsys, f"is not the one at {bert} now (sha256 config.json: ")
    assert not run.exists()  # refused before anything was written

    # A finished run whose encoder is gone: evaluate and predict say so in one line too.
    config.write_text(config.read_text().replace('"vpipe_test_edit": 1, ', "", 1))
    assert main(argv) == 0
    shutil.rmtree(bert)
    _one_line_exit_2(["predict", str(run), str(feats), "-o", str(tmp_path / "p.jsonl")],
                     capsys, "cannot be found")


def test_finetune_options_that_cannot_work_are_usage_errors(setup, tmp_path: Path,
                                                           capsys) -> None:
    from pipeline.train.synthetic import make_titled_set

    common = ["train", str(setup["features"]), "--labels", str(setup["labels"]), *FAST]
    run = tmp_path / "run"
    _one_line_exit_2([*common, "--text-lr", "1e-4", "-o", str(run)], capsys,
                     "--text-lr is the fine-tuned text encoder's learning rate: add "
                     "--finetune-text")
    _one_line_exit_2([*common, *TUNE, "--modalities", "image", "-o", str(run)], capsys,
                     "add text to --modalities")
    _one_line_exit_2([*common, "--finetune-text", "--text-lr", "0", "-o", str(run)], capsys,
                     "--text-lr must be above 0")
    csv_path, _ = make_titled_set(tmp_path / "notext", n_sources=10, text=False)
    _one_line_exit_2(["train", str(tmp_path / "notext"), "--labels", str(csv_path), *FAST,
                      "--finetune-text", "-o", str(run)], capsys, "has no text features")
    assert not run.exists()


def test_a_workflows_train_table_takes_the_options(tmp_path: Path, capsys) -> None:
    wf = tmp_path / "w.toml"
    wf.write_text('name = "t"\ninputs = ["videos"]\nlabels = "labels.csv"\n'
                  'work_dir = "work"\n[features]\ntext = "titles.csv"\n'
                  '[train]\nfinetune-text = true\ntext-lr = 1e-4\n')
    (tmp_path / "videos").mkdir()
    for name in ("labels.csv", "titles.csv"):
        (tmp_path / name).write_text("id,label\n")
    capsys.readouterr()
    assert main(["run", str(wf), "--dry-run"]) == 0
    train = [ln for ln in capsys.readouterr().out.splitlines() if " train " in f" {ln} "]
    assert len(train) == 1 and "--finetune-text --text-lr 0.0001" in train[0]


@pytest.mark.slow
def test_predict_on_new_videos_uses_the_finetuned_encoder(tmp_path: Path, weights,
                                                          monkeypatch) -> None:
    """`vpipe predict RUN VIDEOS --text` makes the features as the run's were made, then runs
    the fine-tuned encoder on the titles: the same scores as predict on the run's own feature
    folder, which differ from the encoder's before training (test above)."""
    import sys

    import synth
    from test_features import args

    def vpipe(argv: list[str]) -> int:
        monkeypatch.setattr(sys, "argv", ["vpipe", *argv])  # the command a stage records
        return main(argv)

    bert = tiny_bert(tmp_path / "bert")
    rgb = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220),
           "yellow": (230, 220, 30)}
    for i in range(8):
        synth.make_video(tmp_path / "videos" / f"v{i}.mp4", duration_s=2.0, size=(64, 48),
                         color=rgb[COLOURS[i % 4]], audio=False)
    titles = tmp_path / "titles.csv"
    titles.write_text("id,text\n" + "".join(f"v{i},a {COLOURS[i % 4]} cat\n" for i in range(8)))
    labels = tmp_path / "labels.csv"
    labels.write_text("id,label\n" + "".join(f"v{i},{COLOURS[i % 4]}\n" for i in range(8)))
    media, feats, run = tmp_path / "media", tmp_path / "features", tmp_path / "run"
    assert vpipe(["extract-frames", str(tmp_path / "videos"), "-o", str(media), "--fps", "1",
                 "-q"]) == 0
    assert vpipe(args(media, feats, weights, "--audio-model", "none", "--text", str(titles),
                     "--text-model", str(bert))) == 0
    assert main(["train", str(feats), "--labels", str(labels), *FAST, *TUNE, "-o",
                 str(run)]) == 0
    known = _predict(run, feats, tmp_path / "known.jsonl")
    out = tmp_path / "new.jsonl"
    assert main(["predict", str(run), str(tmp_path / "videos"), "--text", str(titles),
                 "--device", "cpu", "-o", str(out), "-q"]) == 0
    new = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())
           if r["level"] == "clip"}
    assert new.keys() == known.keys() and len(new) == 8
    for cid, line in new.items():
        assert line["split"] is None
        assert line["scores"] == pytest.approx(known[cid]["scores"], abs=1e-6)


def test_export_model_refuses_a_finetuned_run_in_one_line(setup, tmp_path: Path, capsys) -> None:
    pytest.importorskip("onnxruntime", reason="export-model needs pip install 'vpipe[onnx]'")
    _one_line_exit_2(["export-model", str(setup["tuned"]), "-o", str(tmp_path / "m.onnx")],
                     capsys, "a --finetune-text run holds a transformers title encoder")
    assert not (tmp_path / "m.onnx").exists()
