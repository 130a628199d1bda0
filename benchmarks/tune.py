"""`vpipe tune` against vpipe train's default options, side by side in one run.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/tune.py [--sources 1000] [--trials 20]
        [--epochs 20] [--seed 0]

The set is the synthetic titled tagging set (``pipeline.train.synthetic.make_titled_set``):
the tag is the motion seen while the colour the title names is on screen, so the attention
model needs text-guided attention and the right options to learn it. Three runs on the same
store and seed: `vpipe train` with the default options, `vpipe tune` over lr, hidden, dropout
and batch size with ``--trials`` trials, and the same search with ``--jobs 2``. Prints a table
of the test Hit@1 (the tuned rows: the best trial's, scored once on test), its val GAP@20
(the objective), the trials complete/pruned/failed and the wall time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from pipeline.cli import main
from pipeline.train.synthetic import make_titled_set

SPACE = "lr=1e-4..1e-2:log hidden=64,128,256 dropout=0..0.5 batch-size=16,32,64"


def main_(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sources", type=int, default=1000)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, nargs="*", default=[1, 2],
                    help="the --jobs of each tune row")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        csv_path, _ = make_titled_set(root / "f", n_sources=args.sources, seed=args.seed)
        fixed = [str(root / "f"), "--labels", str(csv_path), "--task", "multilabel",
                 "--model", "attention", "--modalities", "image,text", "--attention",
                 "text-guided", "--epochs", str(args.epochs), "--seed", str(args.seed),
                 "--device", "cpu", "-q"]
        print(f"{args.sources} clips, up to {args.epochs} epochs a run, seed {args.seed}, "
              f"search {SPACE!r}")
        print("| run | test Hit@1 | val GAP@20 | trials (complete/pruned/failed) | options | "
              "wall s |")
        print("|---|---|---|---|---|---|")
        t = time.perf_counter()
        assert main(["train", *fixed, "-o", str(root / "defaults")]) == 0
        s = json.loads((root / "defaults" / "summary.json").read_text())
        print(f"| train, default options | {s['test']['hit_at_1']:.3f} | "
              f"{s['val']['gap_at_20']:.3f} | - | defaults | {time.perf_counter() - t:.0f} |",
              flush=True)
        for jobs in args.jobs:
            out = root / f"tune-{jobs}"
            t = time.perf_counter()
            assert main(["tune", *fixed, "-o", str(out), "--search", SPACE, "--trials",
                         str(args.trials), "--jobs", str(jobs)]) == 0
            wall = time.perf_counter() - t
            s = json.loads((out / "summary.json").read_text())
            states = [tr["state"] for tr in s["trials"]]
            n = "/".join(str(states.count(x)) for x in ("complete", "pruned", "failed"))
            best = s["best"]
            print(f"| tune --trials {args.trials} --jobs {jobs} | "
                  f"{best['test']['hit_at_1']:.3f} | {best['val']:.3f} | {n} | "
                  f"`{best['train_options']}` | {wall:.0f} |", flush=True)


if __name__ == "__main__":
    main_()
