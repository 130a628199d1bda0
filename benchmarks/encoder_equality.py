"""Feature stores of the same inputs, before and after a change to the encoders, compared
exactly: every HDF5 dataset (values, dtype, shape) and attribute but the root's ``created``,
and the recorded parameters (``vpipe.json``'s ``params``) and index lines.

    python benchmarks/encoder_equality.py build /tmp/enc-before   # with the old code
    python benchmarks/encoder_equality.py build /tmp/enc-after    # with the new code
    python benchmarks/encoder_equality.py compare /tmp/enc-before /tmp/enc-after

The inputs (extract-frames folders with audio, a video, a titles file, seeded weights files,
the tests' tiny BERT and tiny CLIP) are made once under ``--inputs`` (default
/tmp/enc-inputs) and reused, so that the paths and digests the shards record are the same.
Runs: resnet18 (file) + VGGish + PCA (files) + titles; an ``hf:`` CLIP with raw VGGish;
mobilenet_v3_small (random) without audio; ``--from-video`` resnet18 (random) + VGGish + PCA.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np

TESTS = Path(__file__).resolve().parent.parent / "tests"


def make_inputs(d: Path) -> dict[str, Path]:
    """The runs' inputs, made once (a second call returns the same paths)."""
    paths = {"media": d / "media", "video": d / "video", "bert": d / "bert",
             "clip": d / "tiny-clip", "weights": d / "weights", "titles": d / "titles.csv"}
    if (d / ".complete").exists():
        return paths
    sys.path.insert(0, str(TESTS))
    import conftest
    import synth
    import torch
    import torchvision
    from test_features import make_media
    from test_images import tiny_clip
    from torchvggish.torchvggish import VGG, make_layers

    d.mkdir(parents=True, exist_ok=True)
    make_media(paths["media"], {"a_0": (3, 2.1), "a_1": (4, 1.0), "b_0": (0, None),
                                "b_1": (3, 0.5), "c_0": (2, None)})
    paths["video"].mkdir(exist_ok=True)
    synth.make_video(paths["video"] / "v.mp4", duration_s=3.0, fps=10, beeps_at=(1.0,))
    conftest.tiny_bert(paths["bert"])
    tiny_clip(paths["clip"])
    w = paths["weights"]
    w.mkdir(exist_ok=True)
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18().state_dict(), w / "resnet18.pth")
    torch.save(VGG(make_layers(), postprocess=False).state_dict(), w / "vggish.pth")
    g = np.random.default_rng(2)
    torch.save({"pca_eigen_vectors": g.standard_normal((128, 128)) * 0.1,
                "pca_means": g.standard_normal(128)}, w / "pca.pth")
    paths["titles"].write_text("id,text\na,red cat runs\nb_1,the blue dog jumps\n")
    (d / ".complete").touch()
    return paths


def runs(p: dict[str, Path]) -> dict[str, list[str]]:
    w = p["weights"]
    common = ["--precision", "fp32", "--batch-size", "4", "--workers", "1", "-q",
              "--shard-size", "2"]
    audio = ["--audio-weights", str(w / "vggish.pth"), "--audio-pca", str(w / "pca.pth")]
    return {
        "resnet": [str(p["media"]), "--image-model", "resnet18", "--image-weights",
                   str(w / "resnet18.pth"), *audio, "--text", str(p["titles"]),
                   "--text-model", str(p["bert"]), *common],
        "clip": [str(p["media"]), "--image-model", f"hf:{p['clip']}", "--audio-weights",
                 str(w / "vggish.pth"), "--no-audio-postprocess", *common],
        "mobilenet": [str(p["media"]), "--image-model", "mobilenet_v3_small",
                      "--image-weights", "none", "--audio-model", "none", *common],
        "video": [str(p["video"]), "--from-video", "--fps", "2", "--image-model", "resnet18",
                  "--image-weights", "none", *audio, *common],
    }


def build(out: Path, inputs: Path) -> None:
    from pipeline.cli import main

    p = make_inputs(inputs)
    for name, argv in runs(p).items():
        code = main(["features", *argv[:1], "-o", str(out / name), *argv[1:]])
        print(f"{name}: exit {code}")
        if code != 0:
            raise SystemExit(code)


def h5_items(path: Path) -> dict[str, object]:
    """Every dataset and attribute of a shard, by name (the root's ``created`` left out)."""
    items: dict[str, object] = {}

    def attrs(name: str, obj) -> None:
        for k, v in obj.attrs.items():
            if not (name == "/" and k == "created"):
                items[f"{name}@{k}"] = v

    with h5py.File(path, "r") as f:
        attrs("/", f)

        def visit(name: str, obj) -> None:
            attrs(name, obj)
            if isinstance(obj, h5py.Dataset):
                items[name] = (obj.dtype.str, obj.shape, obj[()])

        f.visititems(visit)
    return items


def same(a: object, b: object) -> bool:
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    return type(a) is type(b) and a == b


def compare(before: Path, after: Path) -> list[str]:
    """Every difference, one line each (none: equal)."""
    problems = []
    for run in sorted(d.name for d in before.iterdir() if d.is_dir()):
        a, b = before / run, after / run
        shards = sorted(x.name for x in a.glob("shard-*.h5"))
        if shards != sorted(x.name for x in b.glob("shard-*.h5")):
            problems.append(f"{run}: shard files differ")
            continue
        n = 0
        for s in shards:
            x, y = h5_items(a / s), h5_items(b / s)
            if set(x) != set(y):
                problems.append(f"{run}/{s}: names differ: {sorted(set(x) ^ set(y))}")
            for k in sorted(set(x) & set(y)):
                n += 1
                if not same(x[k], y[k]):
                    problems.append(f"{run}/{s}: {k} differs")
        pa, pb = (json.loads((d / "vpipe.json").read_text())["params"] for d in (a, b))
        if pa != pb:
            problems.append(f"{run}: vpipe.json params differ: {pa} != {pb}")
        if (a / "index.jsonl").read_text() != (b / "index.jsonl").read_text():
            problems.append(f"{run}: index.jsonl differs")
        print(f"{run}: {len(shards)} shards, {n} datasets and attributes compared")
    return problems


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:]
    if cmd == "build":
        build(Path(rest[0]), Path(rest[1] if len(rest) > 1 else "/tmp/enc-inputs"))
    elif cmd == "compare":
        found = compare(Path(rest[0]), Path(rest[1]))
        print("\n".join(found) or "equal")
        raise SystemExit(1 if found else 0)
    else:
        raise SystemExit(__doc__)
