"""The training tasks, one module each behind one interface (:class:`Task`), by name.

``regression``, ``classification`` and ``multilabel`` read a labels CSV (``labelled.LabelTask``:
what they share); ``caption`` is a package of its own (captions, vocabulary, decoder model,
caption metrics). Everything outside this package asks the task object (``get_task(name)``)
and never compares task names. Nothing heavy is imported here: the CLI reads ``TASKS`` while
``vpipe --help`` is built; a task's module is loaded when it is first asked for.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import UsageError

if TYPE_CHECKING:
    import torch

    from pipeline.shards import FeatureStore
    from pipeline.train.config import ModelSpec, TrainConfig

# A run's checked input: inputs.Prepared, or its caption subclass (inputs asks this package for
# the task, so it is not imported here).
Prepared = Any

# name -> the module holding its ``TASK``; the order is the one --help and errors show.
_MODULES = {
    "regression": "pipeline.train.tasks.regression",
    "classification": "pipeline.train.tasks.classification",
    "multilabel": "pipeline.train.tasks.multilabel",
    "caption": "pipeline.train.tasks.caption",
}
TASKS = tuple(_MODULES)


class Task:
    """What a task is to the trainer, the one interface the loop, the summary, evaluate and
    predict use: its input (``prepare``), model, training batches and their loss, figures on a
    split and the run's summary (``main_metric``, and whether higher is better, is what early
    stopping watches), and what evaluate and predict write. Subclasses fill in every method
    that raises here."""

    name: str = ""
    main_metric: str = ""  # the figure early stopping and the summary line watch
    higher_is_better: bool = True
    supports_folds: bool = True

    def read_options(self, cfg: TrainConfig) -> tuple[TrainConfig, list[str]]:
        """The options as this task reads them: an old spelling turned into today's, with a
        note for each (a workflow or command of before still runs)."""
        return cfg, []

    def upgrade_options(self, options: dict) -> dict:
        """A run's recorded options (``config.json``, a checkpoint's ``meta``, as a dict) in
        today's spelling, so that runs of before resume, evaluate and predict."""
        return options

    def check_options(self, cfg: TrainConfig) -> None:
        """Refuse option values this task cannot use, before anything is read."""

    def check_modalities(self, cfg: TrainConfig, present: list[str], mods: list[str],
                         features: Path) -> None:
        """Refuse a choice of modalities (``mods`` of the ``present`` ones) this task cannot
        train on."""

    def prepare(self, features: Path, labels: Path, cfg: TrainConfig, quiet: bool) -> Prepared:
        """Read and check the input of a run (nothing written)."""
        raise NotImplementedError

    def n_outputs(self, classes: list[str]) -> int:
        """The width of the model's output for a run with these classes."""
        return len(classes)

    def target_norm(self, p: Prepared) -> tuple[float, float]:
        """The (mean, std) targets are standardised with (none: ``(0, 1)``)."""
        return (0.0, 1.0)

    def build_model(self, spec: ModelSpec) -> torch.nn.Module:
        raise NotImplementedError

    # The name of what an exported model (``vpipe export-model``) gives per clip.
    value_name: str = ""

    def value_layer(self, spec: ModelSpec) -> torch.nn.Module:
        """The model's outputs ``(B, n_outputs)`` as the values predict reports, as a torch
        module (so that ``vpipe export-model`` puts it inside the graph). A task whose
        predictions are not one forward pass per clip refuses with one line."""
        raise UsageError(f"a {self.name} run cannot be exported: its predictions are not one "
                         "forward pass per clip")

    def write_run_files(self, p: Prepared, out: Path) -> None:
        """Files of the run folder besides the shared ones (written once training starts)."""

    def n_train_items(self, p: Prepared) -> int:
        """How many training items an epoch shuffles and goes through."""
        raise NotImplementedError

    def train_batches(self, p: Prepared, order: list[int], batch_size: int):
        """The training batches of the items in ``order``."""
        raise NotImplementedError

    def batch_loss(self, spec: ModelSpec, model, batch, device) -> tuple[torch.Tensor, int]:
        """The loss of one training batch (under autocast) and the items it holds."""
        raise NotImplementedError

    def evaluate_split(self, model, p: Prepared, split: str, spec: ModelSpec, device) -> dict:
        """Loss and figures of ``model`` on one split of the run ({} when it is empty)."""
        raise NotImplementedError

    def summarise(self, model, spec: ModelSpec, p: Prepared, history: list[dict], stopped: bool,
                  best_epoch: int, device, quiet: bool) -> dict:
        """``summary.json`` of a finished run (``model`` holds the best weights)."""
        raise NotImplementedError

    def evaluate_run(self, run: Path, model, spec: ModelSpec, store: FeatureStore,
                     features: Path, labels_csv: Path, split: str | None, device: str,
                     stream: bool) -> tuple[int, dict]:
        """``vpipe evaluate``: (clips scored, figures) on the labelled clips of ``store``."""
        raise NotImplementedError

    def write_predictions(self, f, run: Path, model, spec: ModelSpec, store: FeatureStore,
                          threshold: float, device: str, stream: bool, new_videos: bool
                          ) -> tuple[int, int]:
        """``vpipe predict``: the lines of every clip and source to ``f``; (clips, sources)."""
        raise NotImplementedError


def get_task(name: str) -> Task:
    """The task called ``name``; an unknown name is a usage error listing the known ones."""
    if name not in _MODULES:
        raise UsageError(f"--task {name!r}: choose one of {', '.join(TASKS)}")
    return import_module(_MODULES[name]).TASK


def options_task(name: str | None) -> Task:
    """The task whose option checks and input reading a run of ``--task name`` goes through;
    no name (the task inferred from the labels): the label tasks' shared ones."""
    if name is None:
        # (by name, as every task: the label tasks' module reads the inputs, which ask here)
        return import_module("pipeline.train.tasks.labelled").INFERRED
    return get_task(name)
