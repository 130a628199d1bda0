"""`vpipe export-model`: a run's model as an ONNX file that gives, run by onnxruntime on a
feature folder's rows, what `vpipe predict` writes for every clip, for the lstm and attention
models on each task (ragged batches, bidirectional and two-layer LSTMs, max-frames sampling,
the title branch); its normalisation and metadata inside; the refusals in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.shards import open_features
from pipeline.train.runs import load_run
from pipeline.train.sequences import pad_batch
from pipeline.train.synthetic import make_feature_set, make_titled_set

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = ["--hidden", "8", "--epochs", "2", "--batch-size", "8", "--val-fraction", "0.2",
        "--test-fraction", "0.2", "--threads", "1", "--device", "cpu", "--quiet"]
# (task, model, options): each LSTM shape the export rewrites (last step, bidirectional, two
# layers, mean pooling), the attention pooling (self, text-guided over a title), sampling.
CASES = {
    "regression-lstm": ("regression", "lstm", []),
    "regression-attention": ("regression", "attention", ["--bidirectional", "--max-frames", "8"]),
    "classification-lstm": ("classification", "lstm", ["--bidirectional", "--layers", "2"]),
    "classification-attention": ("classification", "attention", []),
    "multilabel-lstm": ("multilabel", "lstm", ["--pool", "mean", "--bidirectional",
                                               "--max-frames", "8"]),
    "multilabel-attention": ("multilabel", "attention", ["--attention", "text-guided"]),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export-model")


def feature_set(root: Path, task: str, titled: bool) -> tuple[Path, Path]:
    folder = root / f"{task}{'-titled' if titled else ''}"
    csv_path = root / f"{folder.name}-labels.csv"
    if not folder.exists():
        if titled:
            make_titled_set(folder, n_sources=24, labels_csv=csv_path)
        else:
            make_feature_set(folder, task, n_sources=12, audio_dim=4, seed=3,
                             labels_csv=csv_path)
    return folder, csv_path


def trained(root: Path, case: str) -> tuple[Path, Path]:
    """The case's run, trained through the CLI (once per module)."""
    task, model, options = CASES[case]
    titled = "text-guided" in options
    features, labels = feature_set(root, task, titled)
    run = root / f"run-{case}"
    if not (run / "best.pt").exists():
        mods = ["--modalities", "image,text"] if titled else []
        assert main(["train", str(features), "--labels", str(labels), "-o", str(run),
                     "--task", task, "--model", model, *options, *mods, *FAST]) == 0
    return run, features


def onnx_values(path: Path, features: Path, batch: int = 5) -> dict[str, np.ndarray]:
    """Each clip's output of the file, as a user runs it: the modalities and input names
    from its metadata, the store's rows padded in batches of clips of mixed lengths."""
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    mods = json.loads(meta["vpipe.modalities"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = {}
    with open_features(features) as store:
        ids = store.clip_ids
        for a in range(0, len(ids), batch):
            clips = [store[c] for c in ids[a:a + batch]]
            rows = [{m["name"]: np.asarray(getattr(c, m["name"]), np.float32) for m in mods}
                    for c in clips]
            padded = pad_batch(rows, [m["name"] for m in mods])
            feed = {}
            for m in mods:
                x, n = padded[m["name"]]
                feed[m["input"]], feed[m["lengths"]] = x.numpy(), n.numpy()
            (values,) = session.run([meta["vpipe.output"]], feed)
            out.update(zip(ids[a:a + batch], values, strict=True))
    return out


def predicted(path: Path) -> dict[str, np.ndarray]:
    """The clip lines of `vpipe predict` as arrays (a value, or the scores in class order)."""
    out = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec["level"] == "clip":
            v = rec["scores"] if "scores" in rec else rec["prediction"]
            out[rec["id"]] = np.array(list(v.values()) if isinstance(v, dict) else v)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_the_exported_model_predicts_what_predict_does(folders, case, tmp_path, capsys) -> None:
    run, features = trained(folders, case)
    assert main(["predict", str(run), str(features), "-o", str(tmp_path / "p.jsonl"),
                 "--device", "cpu", "--quiet"]) == 0
    capsys.readouterr()
    path = tmp_path / "out" / "model.onnx"
    assert main(["export-model", str(run), "-o", str(path)]) == 0
    said = capsys.readouterr()
    assert said.out == "" and said.err.startswith(f"vpipe export-model: {path} (")
    want, got = predicted(tmp_path / "p.jsonl"), onnx_values(path, features)
    assert sorted(got) == sorted(want) and len(want) >= 24
    # Clips of 6 to 14 steps share each batch; predict's scores are rounded to 6 places.
    diff = max(float(np.max(np.abs(got[c] - want[c]))) for c in want)
    assert diff < 1e-4, diff
    spread = np.ptp(np.stack([want[c] for c in sorted(want)]), axis=0).max()
    assert spread > 1e-3  # not a constant model that any graph would match


@pytest.mark.slow
def test_metadata_names_the_run_and_its_features(folders, tmp_path) -> None:
    run, features = trained(folders, "multilabel-attention")
    path = tmp_path / "m.onnx"
    assert main(["export-model", str(run), "-o", str(path), "--quiet"]) == 0
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    _, spec = load_run(run)
    assert meta["vpipe.task"] == "multilabel" and meta["vpipe.output"] == "scores"
    assert json.loads(meta["vpipe.classes"]) == spec.classes
    assert json.loads(meta["vpipe.threshold"]) == 0.5
    mods = json.loads(meta["vpipe.modalities"])
    assert [(m["name"], m["dim"]) for m in mods] == list(spec.dims.items()) == [
        ("image", 8), ("text", 16)]
    assert mods[1]["features"] == spec.feature_attrs["text"]
    assert mods[1]["features"]["tokenizer"] == "words"
    identity = json.loads(meta["vpipe.run"])
    from pipeline.files import sha256_of

    assert identity["checkpoint"] == "best"
    assert identity["checkpoint_sha256"] == sha256_of(run / "best.pt")
    assert identity["features_fingerprint"] == json.loads(
        (run / "vpipe.json").read_text())["params"]["features_fingerprint"]
    assert meta["vpipe.version"] and "torch" in json.loads(meta["vpipe.exported"])["exporter"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in session.get_inputs()] == [
        ("image", ["batch", "image_steps", 8]), ("image_lengths", ["batch"]),
        ("text", ["batch", "text_steps", 16]), ("text_lengths", ["batch"])]
    assert [(o.name, o.shape) for o in session.get_outputs()] == [
        ("scores", ["batch", len(spec.classes)])]


@pytest.mark.slow
def test_the_normalisation_is_inside_the_file(folders, tmp_path) -> None:
    """Features standardised by hand give other values (the file does it), and a regression
    value is in the labels' units, not the model's standardised output."""
    run, features = trained(folders, "regression-lstm")
    path = tmp_path / "r.onnx"
    assert main(["export-model", str(run), "-o", str(path), "--quiet"]) == 0
    model, spec = load_run(run)
    model.eval()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with open_features(features) as store:
        rows = [{m: np.asarray(getattr(store[c], m), np.float32) for m in spec.modalities}
                for c in store.clip_ids[:6]]
    batch = pad_batch(rows, spec.modalities)
    raw = {k: t.numpy() for m in spec.modalities for k, t in
           zip((m, f"{m}_lengths"), batch[m], strict=True)}
    standardised = dict(raw)
    for m in spec.modalities:
        b = model.branches[m]
        x, n = batch[m]
        mask = (torch.arange(x.shape[1])[None, :] < n[:, None])[..., None]
        standardised[m] = ((x - b.mean) / b.std * mask).numpy()
    (value,) = session.run(["value"], raw)
    (twice,) = session.run(["value"], standardised)
    with torch.no_grad():
        head = model(batch)[:, 0].numpy()  # standardised targets
    mu, sd = spec.target_norm
    np.testing.assert_allclose(value, head * sd + mu, atol=1e-5)
    assert np.abs(value - head).max() > 0.01 and abs(sd - 1) > 0.05
    assert np.abs(twice - value).max() > 0.01


def test_a_caption_run_is_refused_in_one_line(tmp_path, capsys) -> None:
    import caption_synth

    csv_path, _, _ = caption_synth.make_caption_set(tmp_path / "feats")
    run = tmp_path / "run"
    assert main(["train", str(tmp_path / "feats"), "--labels", str(csv_path), "-o", str(run),
                 "--task", "caption", "--epochs", "1", "--hidden", "8", "--device", "cpu",
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["export-model", str(run), "-o", str(tmp_path / "c.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"vpipe: error: {run}: a caption run cannot be exported: its captions come "
                   "from a beam search that runs the decoder once per word (export-model takes "
                   "regression, classification and multilabel runs)"]
    assert not (tmp_path / "c.onnx").exists()


@pytest.mark.slow
def test_a_users_own_model_exports_or_fails_in_one_line(tmp_path, capsys) -> None:
    features, labels = feature_set(tmp_path, "regression", titled=False)
    said = {}
    for cls, code in (("MeanPool", 0), ("Packed", 2), ("Truncating", 2)):
        run = tmp_path / cls
        assert main(["train", str(features), "--labels", str(labels), "-o", str(run),
                     "--model", f"own_models:{cls}", *FAST]) == 0
        capsys.readouterr()
        path = tmp_path / f"{cls}.onnx"
        assert main(["export-model", str(run), "-o", str(path)]) == code
        said[cls] = capsys.readouterr().err.strip().splitlines()
        assert len(said[cls]) == 1, said
        assert path.exists() == (code == 0)
        assert not list(tmp_path.glob(f".{cls}.onnx*"))  # no temp file left behind
    assert said["Packed"][0].startswith(f"vpipe: error: {tmp_path / 'Packed'}: the model "
                                        "(own_models:Packed) cannot be exported to ONNX: "
                                        "torch.onnx.export failed (")
    # Traced with the sample's length as a constant: the check batch's longer clips tell.
    assert said["Truncating"][0].startswith(
        f"vpipe: error: {tmp_path / 'Truncating'}: the exported model's values differ from "
        "the run's by up to ")
    got = onnx_values(tmp_path / "MeanPool.onnx", features)
    assert main(["predict", str(tmp_path / "MeanPool"), str(features), "-o",
                 str(tmp_path / "p.jsonl"), "--device", "cpu", "--quiet"]) == 0
    want = predicted(tmp_path / "p.jsonl")
    assert max(float(np.max(np.abs(got[c] - want[c]))) for c in want) < 1e-4


def test_refusals_before_any_export(tmp_path, capsys, monkeypatch) -> None:
    """Not a run, a bad checkpoint name, a folder as the file, the extra missing: one line."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "labels.csv").write_text("id,label\n")
    cases = [
        # a file where the output's folder would be made: one line, not a FileExistsError
        (["export-model", str(tmp_path), "-o", str(tmp_path / "labels.csv" / "m.onnx")],
         f"{tmp_path / 'labels.csv' / 'm.onnx'}: {tmp_path / 'labels.csv'} is a file, not a "
         "folder"),
        # an existing file that is no model: kept, not replaced by the model
        (["export-model", str(tmp_path), "-o", str(tmp_path / "labels.csv")],
         f"-o {tmp_path / 'labels.csv'}: an existing file that is not an .onnx model"),
        (["export-model", str(tmp_path), "-o", str(tmp_path / "m.onnx")],
         f"{tmp_path / 'best.pt'}: no such checkpoint"),
        (["export-model", str(tmp_path), "-o", str(tmp_path / "m.onnx"), "--checkpoint", "x"],
         "--checkpoint 'x': use best or last"),
        (["export-model", str(tmp_path), "-o", str(tmp_path / "folder")],
         f"{tmp_path / 'folder'} is a folder"),
    ]
    for argv, says in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"vpipe: error: {says}"), err
    assert (tmp_path / "labels.csv").read_text() == "id,label\n"
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    assert main(["export-model", str(tmp_path), "-o", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["vpipe: error: vpipe export-model needs onnxruntime, which is not installed: "
                   "pip install 'vpipe[onnx]'"]


@pytest.mark.slow
def test_the_readme_snippet_runs_the_file_as_predict_does(folders, tmp_path, monkeypatch,
                                                          capsys) -> None:
    """README, "Running an exported model without vpipe": its code, run as written on the
    clips of a feature folder, gives predict's values."""
    run, features = trained(folders, "classification-attention")
    monkeypatch.chdir(tmp_path)
    assert main(["export-model", str(run), "-o", "model.onnx", "--quiet"]) == 0
    assert main(["predict", str(run), str(features), "-o", "p.jsonl", "--device", "cpu",
                 "--quiet"]) == 0
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("## Running an exported model without vpipe"):]
    code = section[section.index("```python\n") + 10:section.index("```\n", 10)]
    with open_features(features) as store:
        ids = store.clip_ids[:9]
        clips = [{m: np.asarray(getattr(store[c], m), np.float32) for m in ("image", "audio")}
                 for c in ids]
    scope = {"clips": clips}
    exec(compile(code, "README.md", "exec"), scope)
    want = predicted(tmp_path / "p.jsonl")
    assert scope["classes"] == ["bump", "down", "up"]
    np.testing.assert_allclose(scope["out"], np.stack([want[c] for c in ids]), atol=1e-4)


def test_a_workflow_exports_the_run_it_trained(tmp_path, capsys) -> None:
    """`[export-model]` after `[train]` in a workflow: the command it runs, and the file in
    the run folder, with the run's identity."""
    features, labels = feature_set(tmp_path, "regression", titled=False)
    (tmp_path / "w.toml").write_text(
        f'name = "exported"\ninputs = ["{features}"]\nwork_dir = "{tmp_path / "work"}"\n'
        f'labels = "{labels}"\n\n[train]\nepochs = 2\nhidden = 8\ndevice = "cpu"\n\n'
        "[export-model]\n")
    assert main(["run", str(tmp_path / "w.toml"), "--dry-run"]) == 0
    run = tmp_path / "work" / "train"
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"vpipe export-model {run} -o {run / 'model.onnx'}")
    assert main(["run", str(tmp_path / "w.toml"), "--quiet"]) == 0
    session = ort.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    from pipeline.files import sha256_of

    assert json.loads(meta["vpipe.run"])["checkpoint_sha256"] == sha256_of(run / "best.pt")
