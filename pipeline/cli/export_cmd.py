"""``vpipe export``: a feature folder as NumPy files per clip."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.app import OutDir, Overwrite, Quiet, app


@app.command("export")
def export(
    features: Annotated[
        Path, typer.Argument(metavar="FEATURES", help="Output folder of `vpipe features`.")
    ],
    out: OutDir,
    fmt: Annotated[
        str,
        typer.Option("--format", metavar="npz|npy",
                     help="npz: OUT/<clip_id>.npz with every array of the clip; npy: "
                     "OUT/<clip_id>_<array>.npy, one file per array."),
    ] = "npz",
    compress: Annotated[
        bool, typer.Option("--compress", help="With npz: zip-compressed (np.savez_compressed).")
    ] = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Write each clip's features as plain NumPy files (npz or npy), for tools that want files.

    Arrays: image, image_timestamps, audio, audio_timestamps (and, in npz, the clip's source,
    start and end). Re-running resumes; OUT/vpipe.json records the features' models and weights.
    """
    from pipeline.export import ExportOptions, export_features

    summary = export_features(features, out, ExportOptions(fmt, compress),
                              overwrite=overwrite, quiet=quiet)
    raise typer.Exit(summary.exit_code)
