"""The caption task (``--task caption``): a sentence per clip from a captions CSV.

One package of nouns: ``captions`` (the captions CSV joined and split, the vocabulary from the
training split, checked before anything is written), ``vocab`` (tokeniser, vocabulary),
``model`` (encoder + LSTM decoder with soft attention or a mean-pooled start; teacher forcing,
greedy/beam decoding), ``metrics`` (BLEU, CIDEr-D, ROUGE-L as the COCO evaluation defines them;
METEOR through pycocoevalcap's Java scorer) and ``evaluation`` (batches, decoding, figures,
summary, evaluate and predict). :class:`Caption` puts them behind the :class:`Task` interface,
so a caption run goes through ``loop.fit`` as every task's: an epoch is one pass over every
(clip, reference caption) pair of the training split, teacher-forced; val is decoded and
scored, early stopping on CIDEr-D. The vocabulary is the spec's ``classes`` and
``RUN/vocab.json``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from pipeline.errors import UsageError
from pipeline.train.config import CAPTION_ATTENTION, SELF, TrainConfig, is_own_model
from pipeline.train.tasks import Task
from pipeline.train.tasks.caption import evaluation as ev
from pipeline.train.tasks.caption.captions import prepare_captions
from pipeline.train.tasks.caption.metrics import MAIN_METRIC
from pipeline.train.tasks.caption.model import build_caption_model, caption_loss


class Caption(Task):
    name = "caption"
    main_metric, higher_is_better = MAIN_METRIC, True
    supports_folds = False

    def read_options(self, cfg: TrainConfig) -> tuple[TrainConfig, list[str]]:
        if cfg.attention not in CAPTION_ATTENTION:
            return cfg, []
        note = (f"--attention {cfg.attention} is read as --caption-attention {cfg.attention} "
                "(the caption decoder's attention has its own option now)")
        return replace(cfg, attention=SELF, caption_attention=cfg.attention), [note]

    def upgrade_options(self, options: dict) -> dict:
        if "caption_attention" in options:
            return options
        # a run of before: its --attention was the decoder's
        return {**options, "attention": SELF, "caption_attention": options.get("attention")}

    def check_options(self, cfg: TrainConfig) -> None:
        if is_own_model(cfg.model):
            raise UsageError(f"--model {cfg.model}: your own model trains the label tasks "
                             "(regression, classification, multilabel); captions are "
                             "vpipe's decoder")
        if cfg.folds:
            raise UsageError("--folds is not supported with --task caption (train one "
                             "train/val/test split, e.g. with --test-fraction)")
        if cfg.finetune_text:
            raise UsageError("--finetune-text trains the title encoder of the label tasks' "
                             "TextCNN; a caption model reads frames and sound")
        if cfg.attention != SELF:
            raise UsageError(f"--attention {cfg.attention!r} is the attention model's pooling; "
                             "a caption model takes --caption-attention soft or none")
        if cfg.caption_attention not in CAPTION_ATTENTION:
            raise UsageError(f"--caption-attention {cfg.caption_attention!r}: choose soft or "
                             "none")
        for name in ("beam", "min_count", "max_words"):
            if getattr(cfg, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")

    def prepare(self, features: Path, labels: Path, cfg: TrainConfig, quiet: bool):
        return prepare_captions(features, labels, cfg, quiet)

    def build_model(self, spec):
        return build_caption_model(spec)

    def value_layer(self, spec):
        raise UsageError("a caption run cannot be exported: its captions come from a beam "
                         "search that runs the decoder once per word (export-model takes "
                         "regression, classification and multilabel runs)")

    def write_run_files(self, p, out: Path) -> None:
        p.vocab.save(out / "vocab.json")

    def n_train_items(self, p) -> int:
        return len(p.pairs["train"])

    def train_batches(self, p, order: list[int], batch_size: int):
        return ev.pair_batches(p.data["train"], p.pairs["train"], order, batch_size)

    def batch_loss(self, spec, model, batch, device):
        x, inp, tgt = batch
        out = model(ev.to_device(x, device), inp.to(device))
        return caption_loss(out, tgt.to(device)), len(inp)

    def evaluate_split(self, model, p, split: str, spec, device) -> dict:
        return ev.evaluate_split(model, p, split, spec, device)

    def summarise(self, model, spec, p, history, stopped, best_epoch, device, quiet) -> dict:
        return ev.summarise_captions(model, spec, p, history, stopped, best_epoch, device, quiet)

    def evaluate_run(self, run, model, spec, store, features, labels_csv, split, device,
                     stream):
        from pipeline.device import torch_threads
        from pipeline.train.runs import read_splits

        ids = None if split is None else set(read_splits(run).get(split, ()))
        with torch_threads():
            return ev.evaluate_captions(model, spec, store, labels_csv, ids, device, stream)

    def write_predictions(self, f, run, model, spec, store, threshold, device, stream,
                          new_videos):
        from pipeline.device import torch_threads

        with torch_threads():  # caption lines; a source's is its best-scored clip's
            return ev.write_caption_lines(model, spec, store, f, device, stream)


TASK = Caption()
