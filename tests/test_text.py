"""The text modality's input side: titles files, the frozen encoder against a reference
computation, the hub cache and the offline message (issue 14)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import UsageError
from pipeline.features.text import (
    TextEncoder,
    match_titles,
    read_titles,
    resolve_text_model,
)

WORDS = "red green blue yellow cat dog runs jumps the a video of".split()
REVISION = "0123456789abcdef0123456789abcdef01234567"


def tiny_bert(folder: Path) -> Path:
    """A random BERT-architecture encoder and a WordPiece vocabulary, saved as a user would."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "##s", "##ed"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    return folder


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
        "import json; from pipeline.features.text import resolve_text_model, TextEncoder\n"
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
        "from pipeline.features.text import resolve_text_model\n"
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
