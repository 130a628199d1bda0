"""The text modality's ablation on a synthetic tagging set, beside the research setup's figures.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/text_ablation.py [--sources 800] [--epochs 15]

The set (``pipeline.train.synthetic.make_titled_set``): each clip shows three colours in turn,
each with its own motion; the title names one colour and the tag is the motion seen while that
colour is on screen, the other two segments being distractors. The set has no sound, so the
first row is the two-branch model's image branch alone. Three `vpipe train` runs of the
attention model on the same store, same seed: without the title, with the title's TextCNN
vector in the fusion (self-attention), and with text-guided attention. Prints a table of
test Hit@1 / Hit@2 and seconds per run, with the research setup's reported figures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from pipeline.cli import main
from pipeline.train.synthetic import make_titled_set

RUNS = {
    "image (no title)": ["--modalities", "image"],
    "+ text, self-attention": ["--modalities", "image,text", "--attention", "self"],
    "+ text, text-guided attention": ["--modalities", "image,text", "--attention", "text-guided"],
}
RESEARCH = {  # MultimodalVideoTag's reported Hit@1 / Hit@2 (image + audio, + TextCNN, + guided)
    "image (no title)": "71.07 / 83.72", "+ text, self-attention": "72.66 / 85.01",
    "+ text, text-guided attention": "73.29 / 85.59",
}


def main_(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sources", type=int, default=800)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        csv_path, _ = make_titled_set(root / "f", n_sources=args.sources, seed=args.seed)
        common = ["train", str(root / "f"), "--labels", str(csv_path), "--task", "multilabel",
                  "--model", "attention", "--hidden", "64", "--batch-size", "32", "--lr", "1e-3",
                  "--dropout", "0.1", "--threads", "2", "--epochs", str(args.epochs),
                  "--seed", str(args.seed), "-q"]
        print(f"{args.sources} clips, {args.epochs} epochs, seed {args.seed}")
        print("| model | test Hit@1 | test Hit@2 | s | research setup Hit@1 / Hit@2 |")
        print("|---|---|---|---|---|")
        for k, (name, extra) in enumerate(RUNS.items()):
            run = root / f"run{k}"
            t = time.perf_counter()
            assert main([*common, "-o", str(run), *extra]) == 0
            s = json.loads((run / "summary.json").read_text())["test"]
            print(f"| {name} | {s['hit_at_1']:.3f} | {s['hit_at_2']:.3f} | "
                  f"{time.perf_counter() - t:.0f} | {RESEARCH[name]} |", flush=True)


if __name__ == "__main__":
    main_()
