"""The text modality's input side: titles files, the frozen encoder against a reference
computation, the hub cache and the offline message (issue 14)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_bert

from pipeline.errors import UsageError
from pipeline.features.encoders.hf_text import TextEncoder, resolve_text_model
from pipeline.features.text import match_titles, read_titles

REVISION = "0123456789abcdef0123456789abcdef01234567"


def test_features_equal_the_model_called_on_each_title_alone(tmp_path: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    folder = tiny_bert(tmp_path / "bert")
    info = resolve_text_model(str(folder))
    assert info.kind == "folder" and "model.safetensors" in (info.sha256 or {})
    enc = TextEncoder(info)
    assert enc.dim == 16 and enc.info.tokenizer.startswith("BertTokenizer")
    titles = ["red cat runs", "a video of the blue dog jumps", "yellow", "green zebra"]
    got = enc.encode(titles, batch_size=3)  # two batches, padded within each
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    for title, feats in zip(titles, got, strict=True):
        ids = tok(title, return_tensors="pt")
        with torch.no_grad():
            ref = model(**ids).last_hidden_state[0].numpy()
        assert feats.shape == ref.shape == (len(title.split()) + 2, 16)  # [CLS] ... [SEP]
        np.testing.assert_allclose(feats, ref, atol=1e-5, rtol=0)


def _in_fresh_process(code: str, hf_home: Path) -> subprocess.CompletedProcess:
    # HF_HOME is read when huggingface_hub is imported, so each case gets its own process.
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


def test_a_hub_name_is_read_from_the_hf_home_cache(tmp_path: Path) -> None:
    repo = tmp_path / "hf" / "hub" / "models--tiny--bert"
    tiny_bert(repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    code = (
        "import json\n"
        "from pipeline.features.encoders.hf_text import resolve_text_model, TextEncoder\n"
        "info = resolve_text_model('tiny/bert'); e = TextEncoder(info)\n"
        "print(json.dumps({**e.info.attrs(), 'rows': e.encode(['red cat'])[0].shape[0]}))"
    )
    done = _in_fresh_process(code, tmp_path / "hf")
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["kind"] == "hub" and got["name"] == "tiny/bert" and got["revision"] == REVISION
    assert got["rows"] == 4


def test_offline_with_an_empty_cache_names_model_cache_and_folder_option(tmp_path: Path) -> None:
    code = (
        "from pipeline.features.encoders.hf_text import resolve_text_model\n"
        "resolve_text_model('nghuyong/ernie-1.0-base-zh')"
    )
    done = _in_fresh_process(code, tmp_path / "empty")
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "WeightsUnavailable" in last and "nghuyong/ernie-1.0-base-zh" in last
    assert str(tmp_path / "empty" / "hub") in last and "--text-model DIR" in last
    assert not (tmp_path / "empty" / "hub" / "models--nghuyong--ernie-1.0-base-zh").exists()


def test_titles_csv_and_tsv_with_bom_crlf_and_empty_titles(tmp_path: Path) -> None:
    csv_file = tmp_path / "t.csv"
    csv_file.write_bytes(
        "\ufeffid,text\r\nsrcA,red  cat\r\nsrcA_c001,blue dog\r\nsrcB,\r\nghost,x\r\n".encode()
    )
    t = read_titles(csv_file)
    assert t.by_id == {"srcA": "red cat", "srcA_c001": "blue dog", "ghost": "x"} and t.empty == 1
    m = match_titles(t, [("srcA_c000", "srcA"), ("srcA_c001", "srcA"), ("srcB_c000", "srcB")], 4)
    assert m.by_clip == {"srcA_c000": "red ", "srcA_c001": "blue"}  # clip's own title first
    assert m.unmatched == ["ghost"]
    tsv = tmp_path / "train.txt"
    tsv.write_text("videos/srcA.mp4\tred cat\tjump,run\nsrcB.mp4\tgreen dog\trun\n")
    assert read_titles(tsv).by_id == {"srcA": "red cat", "srcB": "green dog"}


@pytest.mark.parametrize(
    "content, message",
    [
        ("name,title\na,b\n", "lacks the columns id and text"),
        ("a.mp4\n", ""),  # one column, no tab, no header: not the CSV form either
        ("a.mp4\tred\tx\nb.mp4\n", "line 2 has 1 column(s)"),
        ("id,text\na,red\nb,blue\na,green\n", "'a' has two different titles (line 2"),
        ("id,text\na\n", "line 2 has 1 column(s)"),
        ("", "no titles"),
    ],
)
def test_bad_titles_files_say_which_file_and_why(
    tmp_path: Path, content: str, message: str
) -> None:
    f = tmp_path / "bad.csv"
    f.write_text(content)
    with pytest.raises(UsageError) as e:
        read_titles(f)
    assert str(f) in str(e.value) and message in str(e.value)


def test_a_repeated_id_with_the_same_title_is_fine(tmp_path: Path) -> None:
    f = tmp_path / "t.csv"
    f.write_text("id,text\na,red\na,red\n")
    assert read_titles(f).by_id == {"a": "red"}


def test_textcnn_is_768_dims_and_pools_only_the_title_tokens() -> None:
    from pipeline.train.text_branch import TextCNN

    torch.manual_seed(0)
    cnn = TextCNN(dim=8).eval()
    assert cnn.out_dim == 768
    x = torch.randn(3, 6, 8)
    x[1, 3:], x[2] = 0.0, 0.0  # padding is zeros, as the batches give it
    lengths = torch.tensor([6, 3, 0])
    y = cnn(x, lengths)
    assert y.shape == (3, 768)
    # Padding past a title's end does not change its vector; no title gives zeros.
    alone = cnn(x[1:2, :3], torch.tensor([3]))
    torch.testing.assert_close(y[1:2], alone)
    assert torch.count_nonzero(y[2]) == 0
    # By hand for the window of 2: tanh(conv) maxed over the 5 positions of the first title.
    ref = torch.tanh(cnn.convs[0](x[:1].transpose(1, 2))).amax(dim=2)
    torch.testing.assert_close(y[:1, :256], ref)


def test_text_guided_attention_follows_the_formula() -> None:
    from pipeline.train.text_branch import TextGuidedScore, attend

    torch.manual_seed(0)
    score = TextGuidedScore(step_dim=4, text_dim=3, hidden=5)
    h, e = torch.randn(2, 7, 4), torch.randn(2, 3)
    mask = torch.arange(7)[None, :] < torch.tensor([7, 4])[:, None]
    pooled = attend(h, score(h, e), mask)
    for b, n in enumerate((7, 4)):
        z = torch.cat([h[b, :n], e[b].expand(n, 3)], dim=1)
        a = torch.softmax(score.w(torch.tanh(score.proj(z))).squeeze(-1), dim=0)
        torch.testing.assert_close(pooled[b], (a[:, None] * h[b, :n]).sum(0))


# --------------------------------------------------------------------------- vpipe features --text


def _text_args(media: Path, out: Path, weights, model: Path, titles: Path, *extra: str
               ) -> list[str]:
    from test_features import args

    return [*args(media, out, weights, "--text", str(titles), "--text-model", str(model),
                  *extra)]


@pytest.fixture(scope="module")
def titled(tmp_path_factory: pytest.TempPathFactory, weights, text_model: Path):
    """Four clips of sources a and b: source a titled, clip b_1 its own title, b_0 none, and an
    id that is no clip; shards of 3 clips, titles cut at 12 characters."""
    from test_features import make_media

    from pipeline.cli import main

    d = tmp_path_factory.mktemp("titled")
    media = make_media(d / "media", {"a_0": (3, 2.1), "a_1": (2, None), "b_0": (1, None),
                                     "b_1": (3, 0.5)})
    titles = d / "titles.csv"
    titles.write_text("id,text\na,red cat runs fast\nb_1,the blue dog jumps\nghost,yellow\n")
    out = d / "features"
    assert main(_text_args(media, out, weights, text_model, titles, "--shard-size", "3",
                           "--text-max-chars", "12")) == 0
    return out, titles


def test_text_rows_equal_the_model_on_each_cut_title_alone(titled, text_model: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    from pipeline.shards import open_features

    out, _ = titled
    tok = AutoTokenizer.from_pretrained(text_model)
    model = AutoModel.from_pretrained(text_model).eval()
    want = {"a_0": "red cat runs", "a_1": "red cat runs", "b_1": "the blue dog"}
    with open_features(out) as store:
        assert store.has_text and store.dim("text") == 16
        for cid in store.clip_ids:
            clip = store[cid]
            if cid not in want:  # b_0: no title
                assert clip.text.shape == (0, 16) and clip.text_string == ""
                continue
            assert clip.text_string == want[cid]
            with torch.no_grad():
                ref = model(**tok(want[cid], return_tensors="pt")).last_hidden_state[0].numpy()
            assert clip.text.shape == (len(want[cid].split()) + 2, 16)  # [CLS] ... [SEP]
            np.testing.assert_allclose(clip.text, ref, atol=1e-5, rtol=0)
        # Iteration reads each shard whole: the same rows.
        for clip in store:
            np.testing.assert_array_equal(clip.text, store[clip.clip_id].text)


def test_text_group_layout_and_attributes(titled, text_model: Path) -> None:
    import h5py

    from pipeline.shards import shard_paths

    out, _ = titled
    strings, rows = [], 0
    for p in shard_paths(out):
        with h5py.File(p) as f:
            g = f["text"]
            n = f["clip_ids"].shape[0]
            off = g["offsets"][:]
            assert off.shape == (n + 1,) and off[0] == 0 and off[-1] == g["features"].shape[0]
            assert g["features"].shape[1] == 16 and g["features"].fletcher32
            assert g.attrs["dim"] == 16 and g.attrs["max_chars"] == 12
            assert g.attrs["model"] == str(text_model)
            assert g.attrs["tokenizer"].startswith("BertTokenizer")
            w = json.loads(g.attrs["weights"])
            assert w["kind"] == "folder" and len(w["sha256"]["model.safetensors"]) == 64
            strings += list(g["strings"].asstr()[:])
            rows += g["features"].shape[0]
    assert sorted(strings) == ["", "red cat runs", "red cat runs", "the blue dog"]
    assert rows == 5 + 5 + 5


def test_untitled_clips_are_counted_and_unmatched_ids_reported(titled) -> None:
    out, titles = titled
    info = json.loads((out / "vpipe.json").read_text())
    assert info["text"] == {"titled": 3, "untitled": 1, "unmatched": ["ghost"],
                            "empty_titles": 0}
    assert info["params"]["text"]["file"] == str(titles.resolve())
    assert info["params"]["text_max_chars"] == 12
    assert info["params"]["text_model"]["kind"] == "folder"


def test_the_summary_line_counts_untitled_clips_and_names_unmatched_ids(
    tmp_path: Path, weights, text_model: Path, capsys
) -> None:
    from test_features import make_media

    from pipeline.cli import main

    media = make_media(tmp_path / "media", {"a_0": (2, None), "b_0": (1, None)})
    titles = tmp_path / "t.csv"
    titles.write_text("id,text\na,red cat\nzz,blue\n")
    cmd = [a for a in _text_args(media, tmp_path / "f", weights, text_model, titles) if a != "-q"]
    assert main([*cmd, "--audio-model", "none"]) == 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("vpipe features: 2 done")
    assert f"1 clip(s) without a title (zero text rows); 1 id(s) in {titles} match no clip: zz" \
        in last


def test_inspect_shows_the_text_rows(titled, capsys) -> None:
    from pipeline.cli import main

    out, _ = titled
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "text: 15 token rows x 16" in text and "3 of 4 clips titled, cut at 12" in text


def test_a_store_without_text_reads_as_before(tmp_path: Path, weights) -> None:
    import h5py
    from test_features import args, make_media

    from pipeline.cli import main
    from pipeline.shards import open_features, shard_paths

    media = make_media(tmp_path / "media", {"a_0": (2, None)})
    assert main(args(media, tmp_path / "f", weights, "--audio-model", "none")) == 0
    with h5py.File(shard_paths(tmp_path / "f")[0]) as f:
        assert set(f) == {"clip_ids", "source", "start", "end", "image", "audio"}
    params = json.loads((tmp_path / "f" / "vpipe.json").read_text())["params"]
    assert not {"text", "text_max_chars", "text_model"} & set(params)
    with open_features(tmp_path / "f") as store:
        clip = store["a_0"]
        assert not store.has_text and store.attrs("text") == {}
        assert clip.text.shape == (0, 0) and clip.text_string == ""


@pytest.mark.parametrize("data,message", [
    (b"id,text\na,red\na,blue\n", "'a' has two different titles"),
    # Regression (issue 24, 10): the open quote made lines 3-4 one title of b.
    (b'id,text\na,red\nb,"blue\nc,green\n', "t.csv:3: unclosed quote"),
    ("id,text\na,caf\xe9\n".encode("latin-1"), "not UTF-8 text (byte 0xe9 at offset 13, line 2)"),
])
def test_a_bad_titles_file_is_one_usage_error_before_any_work(
    tmp_path: Path, weights, text_model: Path, capsys, data: bytes, message: str
) -> None:
    from test_features import make_media

    from pipeline.cli import main

    media = make_media(tmp_path / "media", {"a_0": (2, None)})
    titles = tmp_path / "t.csv"
    titles.write_bytes(data)
    out = tmp_path / "f"
    assert main(_text_args(media, out, weights, text_model, titles)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and str(titles) in err[0]
    assert not out.exists()


def test_offline_with_an_empty_cache_stops_features_before_writing(
    tmp_path: Path, weights
) -> None:
    from test_features import args, make_media

    media = make_media(tmp_path / "media", {"a_0": (2, None)})
    titles = tmp_path / "t.csv"
    titles.write_text("id,text\na,red\n")
    out = tmp_path / "f"
    cmd = [*args(media, out, weights, "--text", str(titles), "--text-model",
                 "nghuyong/ernie-1.0-base-zh")]
    env = {**os.environ, "HF_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, "-m", "pipeline", *cmd], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vpipe: error: text model "), err
    assert "nghuyong/ernie-1.0-base-zh" in err[0] and str(tmp_path / "empty" / "hub") in err[0]
    assert "--text-model DIR" in err[0]
    # Issue 27, 3.11: the other way on, offline, is named too.
    assert err[0].endswith("; or run without titles (leave out --text; for the tagging "
                           "workflow: `vpipe run video-tagging-notext`)")
    assert not out.exists()


# --------------------------------------------------------------------------- vpipe train, text


TAGGING = ["--task", "multilabel", "--model", "attention", "--hidden", "64", "--batch-size",
           "32", "--lr", "1e-3", "--dropout", "0.1", "--threads", "2", "-q"]


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.mark.slow
def test_text_guided_attention_finds_the_part_of_the_video_the_title_names(
    tmp_path: Path, capsys
) -> None:
    from pipeline.cli import main
    from pipeline.train.synthetic import make_titled_set

    csv_path, tags = make_titled_set(tmp_path / "f", n_sources=800)
    common = ["train", str(tmp_path / "f"), "--labels", str(csv_path), *TAGGING,
              "--epochs", "15"]
    guided = tmp_path / "guided"
    assert main([*common, "-o", str(guided), "--modalities", "image,text",
                 "--attention", "text-guided"]) == 0
    s = _summary(guided)
    assert s["modalities"] == ["image", "text"] and s["test"]["hit_at_1"] >= 0.9
    # Image alone sees three colours and three motions: at best it guesses one of them.
    image = tmp_path / "image"
    assert main([*common, "-o", str(image), "--modalities", "image", "--epochs", "8"]) == 0
    assert _summary(image)["test"]["hit_at_1"] <= 0.6
    # The run predicts from its checkpoint, the title branch rebuilt from the spec.
    preds = tmp_path / "preds.jsonl"
    assert main(["predict", str(guided), str(tmp_path / "f"), "-o", str(preds)]) == 0
    clips = [json.loads(line) for line in preds.read_text().splitlines()]
    clips = {r["id"]: r for r in clips if r["level"] == "clip"}
    right = sum(max(r["scores"], key=r["scores"].get) == tags[cid] for cid, r in clips.items())
    assert len(clips) == 800 and right >= 0.9 * 800


def test_the_text_branch_trains_with_the_lstm_model_and_every_modality_by_default(
    tmp_path: Path
) -> None:
    from pipeline.cli import main
    from pipeline.train.synthetic import make_titled_set

    csv_path, _ = make_titled_set(tmp_path / "f", n_sources=40)
    run = tmp_path / "run"
    assert main(["train", str(tmp_path / "f"), "--labels", str(csv_path), "--task",
                 "classification", "--epochs", "1", "-q", "-o", str(run)]) == 0
    assert _summary(run)["modalities"] == ["image", "text"]
    weights = torch.load(run / "best.pt", weights_only=False)["model"]
    assert weights["branches.text.cnn.convs.2.weight"].shape == (256, 16, 4)


@pytest.mark.parametrize(
    "with_text, extra, message",
    [
        (False, ["--attention", "text-guided"], "has no text features (make them with `vpipe "
         "features --text FILE`)"),
        (True, ["--attention", "text-guided", "--modalities", "image"],
         "add text to --modalities"),
        (True, ["--attention", "text-guided", "--modalities", "text"], "add image or audio"),
        (False, ["--modalities", "image,text"], "no text features in these shards"),
        (True, ["--attention", "sideways"], "the attention model takes self or text-guided"),
    ],
)
def test_text_options_that_cannot_work_are_usage_errors_before_training(
    tmp_path: Path, capsys, with_text: bool, extra: list[str], message: str
) -> None:
    from pipeline.cli import main
    from pipeline.train.synthetic import make_titled_set

    csv_path, _ = make_titled_set(tmp_path / "f", n_sources=20, text=with_text)
    run = tmp_path / "run"
    assert main(["train", str(tmp_path / "f"), "--labels", str(csv_path), *TAGGING,
                 "--epochs", "1", "-o", str(run), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not run.exists()


def test_text_guided_is_the_attention_models_option(tmp_path: Path, capsys) -> None:
    from pipeline.cli import main
    from pipeline.train.synthetic import make_titled_set

    csv_path, _ = make_titled_set(tmp_path / "f", n_sources=20)
    assert main(["train", str(tmp_path / "f"), "--labels", str(csv_path), "--model", "lstm",
                 "--attention", "text-guided", "-o", str(tmp_path / "run")]) == 2
    assert "add --model attention" in capsys.readouterr().err


# --------------------------------------------------------------------------- labels from the TSV


def test_labels_read_from_the_tagging_tsv(tmp_path: Path) -> None:
    from pipeline.train.labels import read_labels

    tsv = tmp_path / "train.txt"
    tsv.write_bytes("\ufeffvideos/a b.mp4\tred cat\tjump, run\r\n\r\nc.mp4\tx\trun\r\n".encode())
    rows = read_labels(tsv)
    assert {k: (r.label, r.split, r.line) for k, r in rows.items()} == {
        "a-b": ("jump,run", None, 1), "c": ("run", None, 3)}  # ids as sanitize_id makes them


@pytest.mark.parametrize("content, message", [
    ("a.mp4\tred\n", "2 column(s); the tagging TSV is name<TAB>title<TAB>tags"),
    ("a.mp4\tred\tx\na.mp4\tblue\ty\n", "'a.mp4' has two tag sets"),
    ("\tred\tx\n", "empty name"),
])
def test_bad_tagging_tsv_lines_are_usage_errors(tmp_path: Path, content: str,
                                                message: str) -> None:
    from pipeline.train.labels import read_labels

    f = tmp_path / "train.txt"
    f.write_text(content)
    with pytest.raises(UsageError) as e:
        read_labels(f)
    assert str(f) in str(e.value) and message in str(e.value)


def test_train_takes_the_tsv_as_labels(tmp_path: Path) -> None:
    from pipeline.cli import main
    from pipeline.train.synthetic import make_titled_set

    _, tags = make_titled_set(tmp_path / "f", n_sources=30)
    tsv = tmp_path / "train.txt"
    tsv.write_text("".join(f"clips/{cid[:-2]}.mp4\tsome title\t{t}\n" for cid, t in tags.items()))
    run = tmp_path / "run"
    assert main(["train", str(tmp_path / "f"), "--labels", str(tsv), *TAGGING, "--epochs", "1",
                 "-o", str(run)]) == 0
    assert sum(_summary(run)["n_clips"].values()) == 30


# --------------------------------------------------------------------------- the shipped workflow


@pytest.mark.slow
def test_video_tagging_workflow_trains_the_three_branches_offline(
    tmp_path: Path, weights, text_model: Path, monkeypatch
) -> None:
    import synth

    from pipeline.cli import main
    from pipeline.shards import open_features

    repo = Path(__file__).parents[1]
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220),
               "yellow": (230, 220, 30)}
    lines = []
    for i in range(8):
        name = list(colours)[i % 4]
        synth.make_video(tmp_path / "videos" / f"v{i}.mp4", duration_s=2.0, size=(64, 48),
                         color=colours[name], beeps_at=(0.5,))
        lines.append(f"v{i}.mp4\ta video of the {name} cat\t{name},{'cat' if i % 2 else 'dog'}\n")
    (tmp_path / "train.txt").write_text("".join(lines))
    monkeypatch.chdir(tmp_path)
    shutil.copytree(text_model, tmp_path / "tiny-bert")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf"))  # the folder is the only way
    sets = {
        "features.image-model": '"resnet18"', "features.image-weights": f'"{weights["image"]}"',
        "features.audio-weights": f'"{weights["audio"]}"', "features.audio-pca":
        f'"{weights["pca"]}"', "features.text-model": '"tiny-bert"',  # relative, as typed
        "features.precision": '"fp32"', "features.workers": "0", "train.epochs": "2",
        "train.hidden": "16", "train.val-fraction": "0.25", "train.test-fraction": "0.25",
        "train.device": '"cpu"', "train.batch-size": "4",
    }
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    assert main(["run", str(repo / "workflows" / "video-tagging.toml"), "--work-dir", "w",
                 "--quiet", *args]) == 0
    with open_features(tmp_path / "w" / "features") as store:
        assert store.has_text and len(store) == 8
        assert store["v2"].text_string == "a video of the blue cat"[:50]
        assert store["v2"].text.shape == (8, 16)  # [CLS] + 6 words + [SEP]
    summary = json.loads((tmp_path / "w" / "train" / "summary.json").read_text())
    assert summary["modalities"] == ["image", "audio", "text"]
    run_cfg = json.loads((tmp_path / "w" / "train" / "config.json").read_text())
    assert json.dumps(run_cfg).count("text-guided") >= 1
    preds = (tmp_path / "w" / "train" / "predictions.jsonl").read_text().splitlines()
    assert len([p for p in preds if '"level": "clip"' in p]) == 8

    # New videos with their titles: the relative text model folder is the run's by content
    # (issue 27, 3.1: refused after every stage ran, "'tiny-bert' there, '/abs/tiny-bert' here").
    synth.make_video(tmp_path / "new" / "n0.mp4", duration_s=2.0, size=(64, 48),
                     color=colours["red"], beeps_at=(0.5,))
    (tmp_path / "new-titles.csv").write_text("id,text\nn0,a video of the red cat\n")
    predict = ["predict", "w/train", "new", "--text", "new-titles.csv", "--quiet"]
    assert main([*predict, "-o", "p.jsonl"]) == 0
    assert '"level": "clip"' in (tmp_path / "p.jsonl").read_text()
    # Another text model's content: refused before any stage runs.
    config = tmp_path / "tiny-bert" / "config.json"
    config.write_text(config.read_text().replace("{", '{"vpipe_test_edit": 1, ', 1))
    assert main([*predict, "-o", "p2.jsonl", "--work-dir", "w2"]) == 2
    assert not (tmp_path / "w2").exists() and not (tmp_path / "p2.jsonl").exists()
