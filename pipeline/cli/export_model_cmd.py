"""``vpipe export-model``: a run's trained model as one ONNX file
(:mod:`pipeline.train.onnx_export`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.app import Quiet, app, preload_torch
from pipeline.train.config import DEFAULT_CHECKPOINT


@app.command("export-model")
def export_model(
    run: Annotated[Path, typer.Argument(help="Run folder written by `vpipe train`.")],
    out: Annotated[
        Path, typer.Option("-o", "--out", help="The ONNX file to write (e.g. model.onnx); "
                           "an existing file of another name is refused, not replaced.",
                           show_default=False),
    ],
    checkpoint: Annotated[
        str, typer.Option("--checkpoint", help="Which checkpoint of the run: best or last.")
    ] = DEFAULT_CHECKPOINT,
    quiet: Quiet = False,
) -> None:
    """Write a run's trained model as one ONNX file that runs without vpipe (e.g. with
    onnxruntime), giving per clip what vpipe predict writes.

    Inputs, per modality of the run (image, audio, text, in the run's order): M, the clip's
    feature rows zero-padded to the batch's longest (float32, batch x steps x dim), and
    M_lengths, each clip's valid rows (int64; 0 for a clip without rows there); batch and
    steps are free. Inside: the run's sampling to --max-frames, its feature standardisation,
    the model and the task's output: value (regression, in the labels' units), or scores
    (class probabilities; tag probabilities for multilabel, a tag kept at the run's
    threshold). The run (task, classes, modalities and their feature identities, threshold,
    checkpoint sha256) is in the file's metadata (vpipe.* keys). The file is checked against
    the run's own model with onnxruntime before it is written. Caption runs are refused.
    Needs pip install 'vpipe[onnx]'.
    """
    preload_torch()
    from pipeline.train.onnx_export import export_model as write_model

    done = write_model(run, out, checkpoint=checkpoint)
    if not quiet:
        print(f"vpipe export-model: {out} ({done['task']}; inputs "
              f"{', '.join(done['inputs'])}; output {done['output']}; {done['bytes']} bytes; "
              f"checked against the run: max difference {done['check_max_diff']:.2g})",
              file=sys.stderr)
