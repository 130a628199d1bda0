"""Same seed, same numbers: a fixed set of small trainings of every task, their figures saved
or compared with saved ones (a refactoring of ``pipeline/train`` must not change a number).

    python benchmarks/train_equality.py save DIR      # on the code before the change
    python benchmarks/train_equality.py compare DIR   # after it: exit 1 on any difference

Each case runs ``vpipe train`` (``--device cpu``, seed 0, a few epochs) on a synthetic feature
set (``pipeline.train.synthetic``, ``tests/caption_synth.py``), then ``vpipe evaluate`` and
``vpipe predict``; kept are ``metrics.jsonl`` and ``summary.json`` (timings dropped),
``config.json`` (paths dropped), ``splits.json``, the evaluation and the predictions.
Saved options are compared as a run's are read back (``Task.upgrade_options``, the defaults
of options added since), so a run of before must be the same run today.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from pipeline.cli import main  # noqa: E402

COMMON = ["--device", "cpu", "--seed", "0", "--threads", "1", "--quiet", "--hidden", "16"]
CASES = {
    "regression-lstm": ("regression", ["--epochs", "3"]),
    "regression-noval": ("regression", ["--epochs", "2", "--val-fraction", "0"]),
    "regression-folds": ("regression", ["--epochs", "2", "--folds", "2"]),
    "classification-attention": ("classification", ["--epochs", "3", "--model", "attention"]),
    "multilabel-lstm": ("multilabel", ["--epochs", "3", "--pool", "mean"]),
    "titled-text-guided": ("titled", ["--epochs", "2", "--model", "attention",
                                      "--attention", "text-guided"]),
    "caption-soft": ("caption", ["--task", "caption", "--epochs", "2", "--beam", "2"]),
    "caption-none": ("caption", ["--task", "caption", "--epochs", "2", "--attention", "none"]),
    # today's spelling of the case above, compared with its saved figures (compare only)
    "caption-none-split-option": ("caption", ["--task", "caption", "--epochs", "2",
                                              "--caption-attention", "none"]),
}
SAME_AS = {"caption-none-split-option": "caption-none"}
TIMES = ("seconds", "seconds_per_epoch")


def _data(kind: str, root: Path) -> tuple[Path, Path]:
    feats = root / f"feats-{kind}"
    if kind == "caption":
        from caption_synth import make_caption_set

        csv, _, _ = make_caption_set(feats, per_combo=1)
    elif kind == "titled":
        from pipeline.train.synthetic import make_titled_set

        csv, _ = make_titled_set(feats, n_sources=60)
    else:
        from pipeline.train.synthetic import make_feature_set

        csv, _ = make_feature_set(feats, kind, n_sources=24, audio_dim=8 if
                                  kind == "multilabel" else 0)
    return feats, csv


def _strip(x):
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if k not in TIMES}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


def _jsonl(path: Path) -> list:
    return [_strip(json.loads(line)) for line in path.read_text().splitlines() if line]


def _run(argv: list[str]) -> None:
    code = main(argv)
    if code:
        raise SystemExit(f"exit {code}: vpipe {' '.join(argv)}")


def run_case(name: str, root: Path, data: dict) -> dict:
    kind, extra = CASES[name]
    if kind not in data:
        data[kind] = _data(kind, root)
    feats, csv = data[kind]
    run = root / name
    _run(["train", str(feats), "--labels", str(csv), "-o", str(run), *COMMON, *extra])
    got: dict = {"summary": _strip(json.loads((run / "summary.json").read_text()))}
    one = run / "fold-1" if "--folds" in extra else run
    got["metrics"] = _jsonl(one / "metrics.jsonl")
    cfg = json.loads((one / "config.json").read_text())
    got["config"] = {k: v for k, v in cfg.items() if k not in ("features", "labels", "created")}
    got["splits"] = json.loads((one / "splits.json").read_text())
    ev = root / f"{name}-eval.json"
    with contextlib.redirect_stdout(io.StringIO()):
        _run(["evaluate", str(one), str(feats), "--labels", str(csv), "-o", str(ev),
              "--device", "cpu"])
    got["evaluate"] = {k: v for k, v in _strip(json.loads(ev.read_text())).items()
                       if k not in ("run", "features", "labels")}
    pred = root / f"{name}-pred.jsonl"
    _run(["predict", str(one), str(feats), "-o", str(pred), "--device", "cpu", "--quiet"])
    got["predictions"] = _jsonl(pred)
    if "--folds" in extra:
        got["out_of_fold"] = _jsonl(run / "predictions.jsonl")
    return got


def _read_back(saved: dict) -> dict:
    """Saved figures with their options as today's code reads a run's recorded ones."""
    from dataclasses import asdict

    from pipeline.train.config import TrainConfig
    from pipeline.train.tasks import options_task

    cfg = saved["config"]
    options = options_task(cfg["task"]).upgrade_options(cfg["config"])
    return {**saved, "config": {**cfg, "config": {**asdict(TrainConfig()), **options}}}


def _diff(a, b, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}.{k}: only one side" for k in set(a) ^ set(b)]
        for k in a.keys() & b.keys():
            out += _diff(a[k], b[k], f"{where}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        pairs = enumerate(zip(a, b, strict=True))
        return [d for k, (x, y) in pairs for d in _diff(x, y, f"{where}[{k}]")]
    return [] if a == b else [f"{where}: {str(a)[:80]} != {str(b)[:80]}"]


def main_(mode: str, folder: str, names: list[str]) -> int:
    saved = Path(folder)
    saved.mkdir(parents=True, exist_ok=True)
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        data: dict = {}
        for name in names or [c for c in CASES if mode == "compare" or c not in SAME_AS]:
            got = run_case(name, Path(tmp), data)
            path = saved / f"{SAME_AS.get(name, name)}.json"
            if mode == "save":
                path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
                print(f"{name}: saved")
                continue
            diff = _diff(_read_back(json.loads(path.read_text())), json.loads(json.dumps(got)))
            bad += bool(diff)
            print(f"{name}: {'identical' if not diff else f'{len(diff)} differences'}")
            for d in diff[:10]:
                print(f"  {d}")
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("save", "compare"):
        raise SystemExit(__doc__)
    raise SystemExit(main_(sys.argv[1], sys.argv[2], sys.argv[3:]))
