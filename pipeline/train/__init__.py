"""Train sequence models on cached feature shards, never decoding video again.

``data`` joins a labels CSV to the clips of a feature folder, splits them by source video and
pads batches; ``model`` holds the two models (``lstm``: LRCN, ``attention``: per-modality LSTM
with attention pooling) and how their outputs are read; ``metrics`` the per-task figures;
``loop`` the one training loop; ``runs`` the run folder (checkpoints, metrics.jsonl,
curves.png); ``predict`` evaluation and prediction from a run; ``synthetic`` feature sets with
known answers for tests and demos.
"""

from pipeline.train.config import TrainConfig
from pipeline.train.inputs import prepare
from pipeline.train.loop import train
from pipeline.train.predict import evaluate_run, predict_run
from pipeline.train.runs import load_run

__all__ = ["TrainConfig", "evaluate_run", "load_run", "predict_run", "prepare", "train"]
