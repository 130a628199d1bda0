"""Train sequence models on cached feature shards, never decoding video again.

``config`` holds the plain values (``TrainConfig``: the options; ``ModelSpec``: what a checkpoint
says the model is); ``tasks`` the four tasks (regression, classification, multilabel, caption),
one module each behind one ``Task`` interface, by name; ``labels`` joins a labels CSV to the
clips of a feature folder and splits them by source video; ``sequences`` holds the clips' sequences
and pads batches; ``inputs`` checks all of that before a file is written; ``model`` holds the
two models (``lstm``: LRCN, ``attention``: per-modality LSTM with attention pooling); ``loop``
the one training loop of every task; ``folds`` k-fold cross-validation by source over it;
``evaluation`` and ``metrics`` the figures and the run's summary; ``runs`` the run folder
(checkpoints, resume checks, metrics.jsonl, curves.png); ``predict`` evaluation and prediction
from a run; ``onnx_export`` a run's model as an ONNX file; ``synthetic`` feature sets with
known answers for tests and demos.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.train.config import TrainConfig
    from pipeline.train.folds import train_folds
    from pipeline.train.inputs import prepare
    from pipeline.train.loop import train, train_captions
    from pipeline.train.onnx_export import export_model
    from pipeline.train.predict import evaluate_run, predict_run
    from pipeline.train.runs import load_run

# The CLI reads TrainConfig's defaults while `vpipe --help` is built, and that must not load
# torch (3 s): so this package imports what it offers on first use, not when it is imported.
_HOME = {
    "TrainConfig": "pipeline.train.config",
    "prepare": "pipeline.train.inputs",
    "train": "pipeline.train.loop",
    "train_captions": "pipeline.train.loop",
    "train_folds": "pipeline.train.folds",
    "evaluate_run": "pipeline.train.predict",
    "predict_run": "pipeline.train.predict",
    "load_run": "pipeline.train.runs",
    "export_model": "pipeline.train.onnx_export",
}
__all__ = ["TrainConfig", "evaluate_run", "export_model", "load_run", "predict_run", "prepare",
           "train", "train_captions", "train_folds"]


def __getattr__(name: str) -> object:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_HOME[name]), name)
