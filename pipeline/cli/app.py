"""The Typer application and the options every stage shares. Commands live beside this file,
one module per group of stages; each only parses options and calls library functions."""

from __future__ import annotations

import gc
import importlib
import sys
from pathlib import Path
from typing import Annotated

import typer

from pipeline import __version__

app = typer.Typer(
    name="vpipe",
    help=(
        "Offline video feature extraction and dataset preprocessing:\n\n"
        "subclip -> extract-frames -> features -> train (or all of it: vpipe run WORKFLOW.toml)."
    ),
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vpipe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """vpipe: clips, frames, audio, ResNet/VGGish features in HDF5 shards, LSTM training."""


# Options shared by the stages (same names and help everywhere).
OutDir = Annotated[Path, typer.Option("-o", "--out", help="Output folder.", show_default=False)]
Workers = Annotated[
    int, typer.Option("--workers", min=1, help="Parallel worker processes (CPU work).")
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary line.")]
Overwrite = Annotated[
    bool,
    typer.Option("--overwrite", help="Redo an output folder made with other parameters."),
]
Engine = Annotated[
    str,
    typer.Option(
        "--engine",
        metavar="local|ray",
        help="Where the items run: local (this machine's worker processes) or ray (Ray tasks "
        "on a cluster; needs pip install 'vpipe[ray]', and an output folder every node sees).",
    ),
]
RayAddress = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        metavar="HOST:PORT",
        help="With --engine ray: the cluster to join. [default: RAY_ADDRESS, else a cluster "
        "started with `ray start` on this machine, else a local one started for the run]",
        show_default=False,
    ),
]


def engine_for_options(name: str, ray_address: str | None, workers: int | None, quiet: bool,
                       stage: str):
    """The engine the options name; None for the stage's own local worker pool. (Imported
    here so that `--help` does not load Ray.)"""
    from pipeline.engine import make_engine

    engine = make_engine(name, workers=workers or 1, ray_address=ray_address, quiet=quiet,
                         stage=stage)
    if engine.name == "local":
        return None
    engine.connect()  # before the stage opens its folder: an unreachable cluster leaves nothing
    return engine


def preload(*modules: str) -> None:
    """Import ``modules`` (torch, torchvision) with the garbage collector off, then freeze what
    they made out of its way. torch and torchvision make some 330,000 long-lived objects on
    import; collecting them while they are made, and again at every later full collection,
    is wasted: 0.2-0.5 s of a 51-frame `vpipe features` on 2 cores (benchmarks/startup.py).
    A no-op once they are imported (a second stage of `vpipe run`, a test)."""
    if all(m in sys.modules for m in modules):
        return
    enabled = gc.isenabled()
    gc.disable()
    try:
        for name in modules:
            importlib.import_module(name)
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def preload_torch(image_model: str | None = None) -> None:
    """:func:`preload` torch, and torchvision too for ``image_model`` unless it is a Hugging
    Face one (``hf:NAME``, which does not use torchvision's models)."""
    vision = image_model is not None and not image_model.startswith("hf:")
    preload("torch", *(("torchvision",) if vision else ()))
