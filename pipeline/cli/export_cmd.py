"""``vpipe export``: a feature folder as npz / npy files per clip, Parquet or WebDataset shards."""

from __future__ import annotations

import sys
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
        typer.Option("--format", metavar="npz|npy|parquet|webdataset",
                     help="npz: OUT/<clip_id>.npz with every array of the clip; npy: "
                     "OUT/<clip_id>_<array>.npy, one file per array; parquet: "
                     "OUT/clips-NNNNN.parquet, a row per clip (needs pip install "
                     "'vpipe[parquet]'); webdataset: OUT/clips-NNNNN.tar, a sample per clip "
                     "(needs pip install 'vpipe[webdataset]')."),
    ] = "npz",
    shard_size: Annotated[
        int, typer.Option("--shard-size", min=1,
                          help="Clips per file with parquet and webdataset.")
    ] = 1000,
    labels: Annotated[
        Path | None,
        typer.Option("--labels", show_default=False,
                     help="A labels CSV as `vpipe train --labels` reads it: each clip's label "
                     "(its own, else its source's) is written with it (npz, parquet, "
                     "webdataset; a clip without one: no npz label, null in parquet and json)."),
    ] = None,
    compress: Annotated[
        bool, typer.Option("--compress", help="With npz: zip-compressed (np.savez_compressed).")
    ] = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Write every clip's features, every modality the folder holds (image, audio, text), as
    files other training stacks read: npz or npy per clip, Parquet tables or WebDataset tar
    shards.

    Arrays: each modality's rows, the timestamps of image and audio, the title's string with
    text; the clip's source, start and end. Re-running resumes; OUT/vpipe.json records the
    features' models and weights (and the labels' sha256).
    """
    from pipeline.export import ExportOptions, export_features

    opts = ExportOptions(fmt, compress, shard_size)
    joined = None if labels is None else _labels(features, labels, quiet)
    summary = export_features(features, out, opts, labels=joined, labels_file=labels,
                              overwrite=overwrite, quiet=quiet)
    raise typer.Exit(summary.exit_code)


def _labels(features: Path, labels: Path, quiet: bool) -> dict[str, str]:
    """The labels matched to the clips as `vpipe train` matches them: clip id -> label."""
    from pipeline.errors import UsageError
    from pipeline.shards import open_features
    from pipeline.train.labels import join_labels, read_labels

    if not features.is_dir():
        raise UsageError(f"{features}: no such feature folder")
    with open_features(features) as store:
        joined = join_labels(store, read_labels(labels), with_views=True)
        n = len(store)
    if joined.unlabeled and not quiet:
        print(f"vpipe export: {len(joined.unlabeled)} of {n} clips have no label in {labels} "
              f"(exported without one, e.g. {', '.join(joined.unlabeled[:3])})", file=sys.stderr)
    return joined.labels
