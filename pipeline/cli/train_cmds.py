"""``vpipe train``, ``vpipe evaluate``, ``vpipe predict``: sequence models on cached features.

Only option parsing lives here; the work is in :mod:`pipeline.train` (imported lazily, so that
``vpipe --help`` does not load torch).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.cli.app import OutDir, Overwrite, Quiet, app, preload_torch
from pipeline.train.config import CHECKPOINTS, DEFAULT_CHECKPOINT, TrainConfig

Features = Annotated[
    Path, typer.Argument(help="Feature folder written by `vpipe features` (shards + index).")
]
RunDir = Annotated[Path, typer.Argument(help="Run folder written by `vpipe train`.")]
Labels = Annotated[
    Path,
    typer.Option(
        "--labels",
        help="CSV with columns id,label[,split] (header in any case); id is a clip id or a "
        "source id, the video's file stem (its clips inherit the label). Multilabel: names "
        "separated by '|' or ',' (quoted), or the tagging research's TSV "
        "name<TAB>title<TAB>tag1,tag2. Caption: id,caption[,split], a line per reference.",
        show_default=False,
    ),
]
Checkpoint = Annotated[
    str, typer.Option("--checkpoint", help="Which checkpoint of the run: best or last.")
]
Device = Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu or cuda[:N].")]
Stream = Annotated[
    bool,
    typer.Option("--stream", help="Read features from the shards per batch, shard by shard "
                 "(feature folders that do not fit in RAM)."),
]


def _checkpoint(name: str) -> str:
    from pipeline.errors import UsageError

    if name not in CHECKPOINTS:
        raise UsageError(f"--checkpoint {name!r}: use best or last")
    return name


@app.command()
def train(
    features: Features,
    labels: Labels,
    out: OutDir,
    task: Annotated[
        Optional[str],  # noqa: UP045  (typer needs Optional on 3.10)
        typer.Option(
            "--task",
            help="regression, classification, multilabel (default: inferred from the labels) "
            "or caption (--labels is then id,caption[,split], one line per reference caption).",
            show_default=False,
        ),
    ] = TrainConfig.task,
    model: Annotated[
        str,
        typer.Option(
            "--model",
            help="lstm (LRCN: LSTM, head on the last step), attention (per-modality LSTM "
            "with attention pooling, as in multimodal tagging), or your own torch.nn.Module "
            "as package.module:ClassName (importable, e.g. on PYTHONPATH): built as "
            "ClassName(dims, n_outputs), called on the padded batch (README: \"Your own "
            "model\"); its source file's sha256 is recorded and checked by resume, evaluate "
            "and predict.",
        ),
    ] = TrainConfig.model,
    pool: Annotated[
        str, typer.Option("--pool", help="lstm model: head on the last valid step or the mean.")
    ] = TrainConfig.pool,
    modalities: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            "--modalities",
            help="Comma-separated: image, audio, text (the titles of `vpipe features --text`, "
            "through a TextCNN), video (the windows of `vpipe features --video-model`, a "
            "sequence like the frames) (default: every modality in the shards).",
            show_default=False,
        ),
    ] = TrainConfig.modalities,
    hidden: Annotated[int, typer.Option("--hidden", help="LSTM hidden size.")] = TrainConfig.hidden,
    layers: Annotated[
        int, typer.Option("--layers", help="Stacked LSTM layers.")
    ] = TrainConfig.layers,
    dropout: Annotated[
        float, typer.Option("--dropout", help="Dropout before the head.")
    ] = TrainConfig.dropout,
    bidirectional: Annotated[
        bool, typer.Option("--bidirectional", help="Bidirectional LSTMs.")
    ] = TrainConfig.bidirectional,
    lr: Annotated[
        float, typer.Option("--lr", help="AdamW learning rate (LRCN used 3e-4).")
    ] = TrainConfig.lr,
    weight_decay: Annotated[
        float, typer.Option("--weight-decay", help="AdamW weight decay.")
    ] = TrainConfig.weight_decay,
    epochs: Annotated[
        int, typer.Option("--epochs", help="Most epochs to train.")
    ] = TrainConfig.epochs,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Clips per batch.")
    ] = TrainConfig.batch_size,
    clip_grad: Annotated[
        float, typer.Option("--clip-grad", help="Gradient norm clipping threshold.")
    ] = TrainConfig.clip_grad,
    patience: Annotated[
        int,
        typer.Option("--patience", help="Stop after this many epochs without a better val metric."),
    ] = TrainConfig.patience,
    val_fraction: Annotated[
        float,
        typer.Option("--val-fraction", help="Share of source videos held out for validation."),
    ] = TrainConfig.val_fraction,
    test_fraction: Annotated[
        float, typer.Option("--test-fraction", help="Share of source videos held out for test.")
    ] = TrainConfig.test_fraction,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed (0 to 2^32-1) of the split, init and batch order.")
    ] = TrainConfig.seed,
    folds: Annotated[
        int,
        typer.Option(
            "--folds",
            help="Cross-validation by source: N >= 2 runs OUT/fold-1..N, each testing on one "
            "of N groups of the source videos (every source tested once) and validating on "
            "--val-fraction of the others (--test-fraction unused); OUT/summary.json holds "
            "each fold's test figures and their mean and std, OUT/predictions.jsonl the "
            "out-of-fold predictions. 0: one train/val/test split.",
        ),
    ] = TrainConfig.folds,
    max_frames: Annotated[
        int,
        typer.Option(
            "--max-frames", help="Sample longer sequences uniformly to this many steps (0: all)."
        ),
    ] = TrainConfig.max_frames,
    threshold: Annotated[
        float, typer.Option("--threshold", help="Multilabel: a tag is predicted at this score.")
    ] = TrainConfig.threshold,
    top_k: Annotated[
        int, typer.Option("--top-k", help="Classification: k of top-k accuracy.")
    ] = TrainConfig.top_k,
    device: Device = TrainConfig.device,
    stream: Annotated[
        bool,
        typer.Option(
            "--stream",
            help="Read features from the shards per batch (sets that do not fit in RAM).",
        ),
    ] = TrainConfig.stream,
    threads: Annotated[
        int,
        typer.Option(
            "--threads",
            help="torch threads for the model (0: half the cores, 1 to 4; more only helps "
            "large models on an otherwise idle machine).",
        ),
    ] = TrainConfig.threads,
    log: Annotated[
        str,
        typer.Option(
            "--log",
            help="none, or tensorboard: each epoch's figures also as TensorBoard scalars in "
            "OUT/tensorboard (tensorboard --logdir OUT; pip install 'vpipe[tensorboard]'). "
            "metrics.jsonl and curves.png are written either way.",
        ),
    ] = TrainConfig.log,
    attention: Annotated[
        str,
        typer.Option("--attention", help="--model attention: self (each step scored from its "
                     "own LSTM output) or text-guided (scored against the title's TextCNN "
                     "vector: needs text in the store). Old spellings still run, with a note: "
                     "soft is self; with --task caption, soft or none is --caption-attention."),
    ] = TrainConfig.attention,
    finetune_text: Annotated[
        bool,
        typer.Option("--finetune-text", help="Train the title encoder too (the tagging setup's "
                     "ernie_freeze off): the text model recorded in the features' /text (found "
                     "in its folder or the Hugging Face cache, checked by content) runs on "
                     "each clip's stored title inside the model, the TextCNN on top; the "
                     "checkpoints hold its fine-tuned weights, and evaluate and predict use "
                     "them (they need the model where features found it). Without it: the "
                     "stored token features, frozen."),
    ] = TrainConfig.finetune_text,
    text_lr: Annotated[
        float,
        typer.Option("--text-lr", help="--finetune-text: the encoder's AdamW learning rate "
                     "(its own parameter group; --lr is the rest's)."),
    ] = TrainConfig.text_lr,
    caption_attention: Annotated[
        str,
        typer.Option("--caption-attention", help="caption: soft (the decoder attends over the "
                     "encoded frames at each word, as SA-LSTM) or none (mean-pooled features "
                     "start it)."),
    ] = TrainConfig.caption_attention,
    beam: Annotated[
        int, typer.Option("--beam", help="caption: beam width of decoding (1: greedy).")
    ] = TrainConfig.beam,
    min_count: Annotated[
        int,
        typer.Option("--min-count", help="caption: training words seen fewer times are <unk>."),
    ] = TrainConfig.min_count,
    max_words: Annotated[
        int,
        typer.Option("--max-words", help="caption: words kept of a training caption; "
                     "decoding stops there."),
    ] = TrainConfig.max_words,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the run in --out from its last.pt, also with another --epochs or "
            "--patience (train longer). Without it, the same options continue an unfinished "
            "run and leave a finished one as it is.",
        ),
    ] = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Train an LSTM model on cached feature shards; writes the run folder --out.

    The same command again is safe: a finished run is reported complete (nothing retrained),
    an interrupted one continues from its last epoch. Other options, labels or features into
    the same --out are refused (exit 2) unless --overwrite, which starts the run again.
    With --folds N, the same holds for each fold's run OUT/fold-k; evaluate and predict take
    one fold's run.
    """
    preload_torch()
    from pipeline.train import train, train_folds

    train_run = train_folds if folds else train  # the task (given or inferred) does the rest

    cfg = train_config(locals())
    s = train_run(features, labels, out, cfg, resume=resume, overwrite=overwrite, quiet=quiet)
    if folds and not quiet:  # each fold's figure and the mean ± std, also when all were done
        from pipeline.train.folds import result_lines

        for line in [*result_lines(s, out), *(f"warning: {w}" for w in s["warnings"])]:
            print(f"vpipe train: {line}", file=sys.stderr)
    elif not quiet and not s.get("already_complete"):  # that case was reported already
        name = s["main_metric"]
        side = "test" if s["test"] else "val" if s["val"] else "train"
        got = s[side].get(name)
        base = s["baseline"].get(side, {}).get(name)
        src = s[side].get("source", {})
        per_source = ""
        if src.get(name) is not None:
            sbase = s["baseline"].get(side, {}).get("source", {}).get(name)
            per_source = (f"; per source ({src['n_sources']}) {round(src[name], 4)} (baseline "
                          f"{sbase if sbase is None else round(sbase, 4)})")
        print(
            f"vpipe train: best epoch {s['best_epoch']} of {s['epochs_run']}, {side} {name} "
            f"{got if got is None else round(got, 4)} (trivial baseline "
            f"{base if base is None else round(base, 4)}){per_source}, "
            f"{s['seconds_per_epoch']}s/epoch -> {out}",
            file=sys.stderr,
        )
        for text in s.get("warnings", []):
            print(f"vpipe train: warning: {text}", file=sys.stderr)


def train_config(options: dict) -> TrainConfig:
    """The :class:`TrainConfig` of parsed ``vpipe train`` options (``options``: any mapping
    holding them, e.g. the command's ``locals()``; --modalities is a comma-separated list)."""
    from dataclasses import fields

    values = {f.name: options[f.name] for f in fields(TrainConfig) if f.name in options}
    mods = values.get("modalities")
    values["modalities"] = [m.strip() for m in mods.split(",") if m.strip()] if mods else None
    return TrainConfig(**values)


@app.command()
def evaluate(
    run: RunDir,
    features: Features,
    labels: Labels,
    out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            "-o", "--out", help="Also write the metrics JSON to this file.", show_default=False
        ),
    ] = None,
    checkpoint: Checkpoint = DEFAULT_CHECKPOINT,
    split: Annotated[
        str,
        typer.Option(
            "--split", help="all labelled clips, or only the run's train, val or test split."
        ),
    ] = "all",
    device: Device = TrainConfig.device,
    stream: Stream = False,
) -> None:
    """Metrics of a trained run on labelled clips, as JSON on stdout."""
    preload_torch()
    from pipeline.errors import UsageError
    from pipeline.train import evaluate_run
    from pipeline.train.predict import write_output

    if split not in ("all", "train", "val", "test"):
        raise UsageError(f"--split {split!r}: use all, train, val or test")
    result = evaluate_run(
        run,
        features,
        labels,
        checkpoint=_checkpoint(checkpoint),
        split=None if split == "all" else split,
        device=device,
        stream=stream,
    )
    text = json.dumps(result, indent=2) + "\n"
    if out is not None:
        write_output(out, text)
    sys.stdout.write(text)


PredictInputs = Annotated[
    list[Path],
    typer.Argument(
        metavar="FEATURES|VIDEOS",
        help="A feature folder written by `vpipe features`, or videos (files or folders) to take "
        "through the stages the run's features were made with.",
        show_default=False,
    ),
]


def _is_feature_folder(path: Path) -> bool:
    from pipeline.records import read_run_info

    try:
        info = read_run_info(path) if path.is_dir() else None
    except (OSError, ValueError):
        return False
    return bool(info and info.get("stage") == "features") or (path / "index.jsonl").is_file()


@app.command()
def predict(
    run: RunDir,
    inputs: PredictInputs,
    out: Annotated[
        Path,
        typer.Option("-o", "--out", help="Predictions file (JSON lines).", show_default=False),
    ],
    checkpoint: Checkpoint = DEFAULT_CHECKPOINT,
    threshold: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(
            "--threshold", help="Multilabel tag threshold (default: the run's).", show_default=False
        ),
    ] = None,
    device: Device = TrainConfig.device,
    stream: Stream = False,
    work_dir: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            "--work-dir",
            metavar="DIR",
            help="With videos: where their subclips, frames and features go (default: "
            "RUN/predict-cache/<key of the videos and options>, reused by the same command).",
            show_default=False,
        ),
    ] = None,
    titles: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            "--text",
            "--titles",
            metavar="CSV",
            help="With videos, for a run whose features include titles: the new videos' titles "
            "file, as `vpipe features --text` takes it (id,text; id = the file stem). --titles "
            "is the same option.",
            show_default=False,
        ),
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Predict every clip of a feature folder, or of new videos, plus the mean per source video,
    as JSON lines (a caption run: each clip's caption, and per source its best-scored clip's).

    Given videos, the stages the run's features were made with run again on them, with the
    options recorded in their folders (subclip plan, sampling, encoders and weights), into a
    cache folder; the new features must be made exactly as the run's were (same weights by
    content, same preprocessing and sampling), else nothing is predicted. What cannot be
    reproduced (the stage folders gone, weights missing, clips cut from a segments file) is
    refused before any stage runs.
    """
    preload_torch()
    from pipeline.errors import UsageError
    from pipeline.train import predict_run
    from pipeline.train.predict import check_output

    check_output(out)  # a folder given as the file: refused before any stage runs
    _check_predict_output(out, run, inputs)
    features, new_videos, code = inputs[0], False, 0
    folders = [p for p in inputs if _is_feature_folder(p)]
    if folders and len(inputs) > 1:
        raise UsageError(f"{folders[0]} is a feature folder: give one feature folder, or videos, "
                         "not both")
    if not folders:
        from pipeline import workflow as wfl
        from pipeline.cli import command, main
        from pipeline.records import ok_records
        from pipeline.train.runs import load_run
        from pipeline.workflow.replay import plan_replay

        load_run(run, _checkpoint(checkpoint))  # a folds run or no checkpoint: refused now
        steps = plan_replay(run, inputs, command().commands, work_dir=work_dir, titles=titles,
                            quiet=quiet)
        log = (lambda s: None) if quiet else (lambda s: print(s, file=sys.stderr, flush=True))
        code, _ = wfl.run_plan(steps, main, log=log, prog="vpipe predict")
        if code not in (0, 1):
            raise typer.Exit(code)
        if not ok_records(steps[0].out):
            raise UsageError("no clip was made from the videos given (see the errors above)")
        features, new_videos = steps[-1].out, True
    elif work_dir is not None or titles is not None:
        raise UsageError("--work-dir and --text are for videos; a feature folder is used as is")
    r = predict_run(
        run, features, out, checkpoint=_checkpoint(checkpoint), threshold=threshold,
        device=device, stream=stream, new_videos=new_videos,
    )
    if not quiet:
        print(
            f"vpipe predict: {r['clips']} clips, {r['sources']} sources -> {out}", file=sys.stderr
        )
    if code:  # some videos failed in a stage: their lines are missing, and the exit code says so
        print("vpipe predict: some videos failed (see above): they have no lines", file=sys.stderr)
        raise typer.Exit(code)


def _check_predict_output(out: Path, run: Path, inputs: list[Path]) -> None:
    """Refuse an output file that is one of the inputs or a file of the run (it would be
    overwritten), before anything runs."""
    from pipeline.errors import UsageError

    target = out.resolve()
    for p in inputs:
        if p.is_file() and p.resolve() == target:
            raise UsageError(f"-o {out}: that is an input; give another file name")
    if target.parent == run.resolve() and target.name != "predictions.jsonl" and target.exists():
        raise UsageError(f"-o {out}: a file of the run {run}; give another file name")
