"""The trainer's plain values: the options of a run and the description of the model it made.

:class:`TrainConfig` holds every ``vpipe train`` option (the CLI reads its defaults from here);
:class:`ModelSpec` is what a checkpoint carries besides the weights (the options as they were
resolved, the task, classes, feature dims and identity, the target scaling), enough to rebuild
the model and read its outputs. Nothing here imports torch, so that ``vpipe --help`` stays fast.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# The attention model's pooling (--attention): each step scored from its own LSTM output
# (self) or against the title's TextCNN vector (text-guided).
SELF, TEXT_GUIDED = "self", "text-guided"
POOLING_ATTENTION = (SELF, TEXT_GUIDED)
# The caption decoder (--caption-attention): soft attention over the frames, or mean-pooled.
CAPTION_ATTENTION = ("soft", "none")
# Before the two were split, --attention took both: soft (the default) meant self for the
# attention model, and soft|none were the caption decoder's; runs and workflows of then are
# read so (tasks.Task.read_options, upgrade_options).
OLD_SELF = "soft"
MODELS = ("lstm", "attention")  # or a user's class, package.module:ClassName (own_model)
POOLS = ("last", "mean")  # the lstm model's head; the attention model pools by attention
LOGS = ("none", "tensorboard")  # --log: where each epoch's figures go besides metrics.jsonl
CHECKPOINTS = ("best", "last")  # the checkpoints of a run that evaluate and predict may use
DEFAULT_CHECKPOINT = "best"


def is_own_model(name: str) -> bool:
    """Whether a ``--model`` value names a user's class (``module:Class``), not a built-in."""
    return ":" in name


# TrainConfig fields that no command takes: set by train_folds on each fold's run.
NOT_OPTIONS = ("fold",)


@dataclass
class TrainConfig:
    """Every training option, as plain values (written to ``config.json``)."""

    task: str | None = None  # regression | classification | multilabel | caption; None: inferred
    model: str = "lstm"  # lstm (LRCN) | attention (multimodal tagging) | package.module:Class
    pool: str = "last"  # lstm head on the last valid step or the mean of steps
    modalities: list[str] | None = None  # None: every modality present in the shards (text too)
    hidden: int = 128
    layers: int = 1
    dropout: float = 0.2
    bidirectional: bool = False
    lr: float = 3e-4  # the LRCN setup's Adam rate
    weight_decay: float = 0.01
    epochs: int = 20
    batch_size: int = 16
    clip_grad: float = 1.0
    patience: int = 5  # epochs without a better validation metric before stopping
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    # k-fold cross-validation by source (``train_folds``): folds K >= 2, and the fold (1..K) a
    # run of it is; 0: one train/val/test split
    folds: int = 0
    fold: int = 0
    max_frames: int = 0  # 0: every step; else uniform sampling down to this many
    threshold: float = 0.5
    top_k: int = 5
    device: str = "auto"
    stream: bool = False  # read features from HDF5 per batch instead of holding them in RAM
    threads: int = 0  # torch threads; 0: half the cores, 1 to 4 (device.default_threads)
    log: str = "none"  # none | tensorboard: each epoch's figures also as TensorBoard scalars
    attention: str = SELF  # the attention model's pooling: self | text-guided (the title steers)
    # The title encoder the features recorded, trained in the model (train.finetune) at its
    # own rate; False: the stored token features, frozen, as before.
    finetune_text: bool = False
    text_lr: float = 2e-5
    # caption task (--task caption): the decoder and its vocabulary
    caption_attention: str = "soft"  # soft: attention over the encoded frames per word; none:
    # the mean-pooled features start the decoder
    beam: int = 3  # beam width of decoding (1: greedy)
    min_count: int = 2  # a training word seen fewer times is <unk>
    max_words: int = 20  # captions cut to this many words in training; decoding stops there


@dataclass
class ModelSpec:
    """What a trained model is, saved in every checkpoint (as ``meta``) and in ``config.json``.

    ``config`` holds the options with ``modalities`` resolved to the ones used; ``target_norm``
    the (mean, std) that regression targets are standardised with (``(0, 1)`` otherwise).
    """

    config: TrainConfig
    task: str
    classes: list[str]  # caption: the vocabulary, <pad> <bos> <eos> <unk> first
    dims: dict[str, int]  # modality -> feature width, in the model's order
    target_norm: tuple[float, float]
    feature_attrs: dict[str, dict]  # modality -> the shards' attributes (model, weights...)
    vpipe_version: str
    # A user's model (--model module:Class): its import path, source file and sha256.
    model_source: dict | None = None
    # --finetune-text: the title encoder (recorded model, where found, weights' identity).
    text_encoder: dict | None = None

    @property
    def modalities(self) -> list[str]:
        return list(self.dims)

    def to_dict(self) -> dict:
        """Plain values only, as ``torch.load(weights_only=True)`` and JSON accept them (no
        ``model_source`` for vpipe's own models, no ``text_encoder`` without
        ``--finetune-text``: their files stay as they were)."""
        d = asdict(self)
        for key in ("model_source", "text_encoder"):
            if d[key] is None:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        return cls(
            config=TrainConfig(**d["config"]),
            task=d["task"],
            classes=list(d["classes"]),
            dims=dict(d["dims"]),
            target_norm=(float(d["target_norm"][0]), float(d["target_norm"][1])),
            feature_attrs=dict(d["feature_attrs"]),
            vpipe_version=d["vpipe_version"],
            model_source=d.get("model_source"),
            text_encoder=d.get("text_encoder"),
        )
