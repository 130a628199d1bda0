"""What the three tasks of a labels CSV share (:class:`LabelTask`: their input, model,
batches, figures and prediction lines); each of them is one module beside this one, saying
how a label becomes a target, the loss, the values, the metrics and the trivial predictor."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import UsageError
from pipeline.train.config import (
    OLD_SELF,
    POOLING_ATTENTION,
    SELF,
    TEXT_GUIDED,
    TrainConfig,
    is_own_model,
)
from pipeline.train.tasks import Task

if TYPE_CHECKING:
    import torch

    from pipeline.shards import FeatureStore
    from pipeline.train.config import ModelSpec
    from pipeline.train.inputs import Prepared


class LabelTask(Task):
    """A task of a labels CSV (``id,label``): one target per clip, a :class:`SequenceModel`
    with ``n_outputs`` outputs; the figures per clip and per source. Subclasses say how a
    label becomes a target, the loss, the values, the metrics and the trivial predictor."""

    # `vpipe evaluate`: what is said of labels the run cannot score (cf. known_target)
    unknown_labels = "name classes the run never saw (left out)"

    def read_options(self, cfg: TrainConfig) -> tuple[TrainConfig, list[str]]:
        if cfg.attention != OLD_SELF:
            return cfg, []
        return replace(cfg, attention=SELF), [f"--attention {OLD_SELF} is read as {SELF} (its "
                                              "old spelling)"]

    def upgrade_options(self, options: dict) -> dict:
        if options.get("attention") != OLD_SELF:
            return options
        return {**options, "attention": SELF}

    def check_options(self, cfg: TrainConfig) -> None:
        if cfg.model == "attention" and cfg.attention not in POOLING_ATTENTION:
            raise UsageError(f"--attention {cfg.attention!r}: the attention model takes self or "
                             "text-guided")
        if cfg.model != "attention" and cfg.attention == TEXT_GUIDED:
            raise UsageError("--attention text-guided is the attention model's: add --model "
                             "attention")
        if cfg.finetune_text and is_own_model(cfg.model):
            raise UsageError(f"--finetune-text trains the title encoder under vpipe's TextCNN; "
                             f"--model {cfg.model} takes the stored text features")

    def check_modalities(self, cfg: TrainConfig, present: list[str], mods: list[str],
                         features: Path) -> None:
        """Text-guided pooling needs the title and something it steers; fine-tuning the
        title encoder, the title."""
        from pipeline.shards import TEXT

        if cfg.finetune_text and TEXT not in mods:
            raise UsageError(
                f"--finetune-text trains the title encoder: {features} has no text features "
                "(make them with `vpipe features --text FILE`)" if TEXT not in present else
                "--finetune-text trains the title encoder: add text to --modalities")
        if cfg.attention != TEXT_GUIDED:
            return
        if TEXT not in present:
            raise UsageError(f"--attention text-guided: {features} has no text features (make "
                             "them with `vpipe features --text FILE`)")
        if TEXT not in mods:
            raise UsageError("--attention text-guided steers by the title: add text to "
                             "--modalities")
        if mods == [TEXT]:
            raise UsageError("--attention text-guided steers the image/audio pooling: add "
                             "image or audio to --modalities")

    def prepare(self, features: Path, labels: Path, cfg: TrainConfig, quiet: bool) -> Prepared:
        from pipeline.train.inputs import prepare

        return prepare(features, labels, cfg, quiet)

    # ---------------------------------------------------------------- the labels
    def check_labels(self, labels: dict[str, str]) -> list[str]:
        """Check the labels of the run for this task; returns its classes (sorted)."""
        raise NotImplementedError

    def encode(self, label: str, classes: list[str]) -> np.ndarray:
        """A checked label as the model's target."""
        raise NotImplementedError

    def known_target(self, label: str, classes: list[str]) -> tuple[Any, bool]:
        """A label of `vpipe evaluate` as a target of the run (None: left out) and whether
        the run knew all of it."""
        raise NotImplementedError

    # ---------------------------------------------------------------- outputs and figures
    def loss(self, spec: ModelSpec, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def values(self, spec: ModelSpec, out: torch.Tensor) -> np.ndarray:
        """Model outputs as values, class or tag probabilities (through :meth:`value_layer`,
        the same module an exported model ends with)."""
        return self.value_layer(spec)(out.float()).cpu().numpy()

    def metrics(self, outputs: np.ndarray, targets: np.ndarray, *, train_mean: float,
                top_k: int, threshold: float) -> dict:
        raise NotImplementedError

    def source_target(self, targets: np.ndarray) -> Any:
        """The target of a source from its clips' targets."""
        raise NotImplementedError

    def baseline(self, train_targets: np.ndarray, n: int, n_classes: int) -> np.ndarray:
        """The trivial predictor's outputs for ``n`` clips."""
        raise NotImplementedError

    def describe(self, classes: list[str], out: np.ndarray, threshold: float) -> dict:
        """One prediction as JSON fields."""
        raise NotImplementedError

    # ---------------------------------------------------------------- the shared machinery
    def build_model(self, spec: ModelSpec) -> torch.nn.Module:
        from pipeline.train.model import SequenceModel

        c = spec.config
        if is_own_model(c.model):
            from pipeline.train.own_model import build_own_model

            return build_own_model(c.model, spec.dims, self.n_outputs(spec.classes),
                                   spec.model_source)
        title = None
        if c.finetune_text:  # the recorded encoder, loaded (and checked) from its source
            from pipeline.train.finetune import title_branch

            title = title_branch(spec)
        return SequenceModel(spec.dims, self.n_outputs(spec.classes), model=c.model,
                             pool=c.pool, hidden=c.hidden, layers=c.layers, dropout=c.dropout,
                             bidirectional=c.bidirectional,
                             text_guided=c.attention == TEXT_GUIDED, title_branch=title)

    def n_train_items(self, p: Prepared) -> int:
        return len(p.split_ids["train"])

    def train_batches(self, p: Prepared, order: list[int], batch_size: int):
        from pipeline.train.sequences import batches

        return batches(p.data["train"], p.targets["train"], batch_size, order)

    def batch_loss(self, spec: ModelSpec, model, batch, device) -> tuple[torch.Tensor, int]:
        from pipeline.train.model import to_device

        x, y = batch
        y = y.to(device)
        return self.loss(spec, model(to_device(x, device)), y), len(y)

    def evaluate_split(self, model, p: Prepared, split: str, spec: ModelSpec, device) -> dict:
        from pipeline.train.evaluation import evaluate

        return evaluate(model, p.data[split], p.targets[split], spec, device)

    def summarise(self, model, spec: ModelSpec, p: Prepared, history: list[dict], stopped: bool,
                  best_epoch: int, device, quiet: bool) -> dict:
        from pipeline.train.evaluation import summarise

        return summarise(model, spec, p, history, stopped, best_epoch, device)

    def evaluate_run(self, run: Path, model, spec: ModelSpec, store: FeatureStore,
                     features: Path, labels_csv: Path, split: str | None, device: str,
                     stream: bool) -> tuple[int, dict]:
        from pipeline.train.predict import evaluate_labels

        return evaluate_labels(run, model, spec, store, features, labels_csv, split, device,
                               stream)

    def write_predictions(self, f, run: Path, model, spec: ModelSpec, store: FeatureStore,
                          threshold: float, device: str, stream: bool, new_videos: bool
                          ) -> tuple[int, int]:
        from pipeline.train.predict import run_splits, write_prediction_lines

        split_of = {} if new_videos else run_splits(run)
        ids = store.clip_ids
        n_src = write_prediction_lines(f, model, spec, store, ids, split_of, threshold, device,
                                       stream)
        return len(ids), n_src


def at_least_two(task: str, classes: list[str]) -> list[str]:
    """``classes``, refused when fewer than two: nothing to tell apart."""
    if len(classes) < 2:
        raise UsageError(
            f"{task} needs at least two classes; the labelled clips only have "
            f"{classes[0] if classes else 'none'!r}"
        )
    return classes


# The input reading and option checks of a run whose task the labels will tell.
INFERRED = LabelTask()

