"""``vpipe run WORKFLOW.toml``: the stages of a workflow file, in order, as ``vpipe`` commands."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.app import Quiet, RayAddress, app, preload_torch


@app.command("run")
def run(
    workflow_file: Annotated[
        str,
        typer.Argument(
            metavar="WORKFLOW",
            help="Workflow file (TOML), or the name of a shipped one (trailer-rating, "
            "video-tagging, video-tagging-notext, captioning, demo: see vpipe workflows).",
            show_default=False,
        ),
    ],
    start: Annotated[
        str | None,
        typer.Option(
            "--from",
            metavar="STAGE",
            help="Start at this stage (earlier outputs must exist).",
            show_default=False,
        ),
    ] = None,
    until: Annotated[
        str | None,
        typer.Option("--until", metavar="STAGE", help="Stop after this stage.", show_default=False),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print the equivalent vpipe commands; run nothing."),
    ] = False,
    inputs: Annotated[
        list[str] | None,
        typer.Option(
            "--input",
            "-i",
            metavar="PATH",
            help="Input file or folder of the first stage, instead of "
            "the file's inputs (repeat for several).",
            show_default=False,
        ),
    ] = None,
    labels: Annotated[
        str | None,
        typer.Option(
            "--labels",
            metavar="CSV",
            help="Labels CSV, instead of the file's labels.",
            show_default=False,
        ),
    ] = None,
    work_dir: Annotated[
        str | None,
        typer.Option(
            "--work-dir",
            metavar="DIR",
            help="Folder of the stages' outputs, instead of the file's work_dir.",
            show_default=False,
        ),
    ] = None,
    sets: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="STAGE.OPTION=VALUE",
            help="Change one option of one stage, e.g. --set features.image-model=resnet18 "
            "(repeatable); nothing after = removes the file's value, e.g. --set "
            "extract-frames.every= --set extract-frames.fps=2.",
            show_default=False,
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Redo the outputs made with other parameters, and the stages after them.",
        ),
    ] = False,
    engine: Annotated[
        str | None,
        typer.Option(
            "--engine",
            metavar="local|ray",
            help="Where the media and feature stages run: local or ray (instead of the file's "
            "engine = ...; see vpipe features --help).",
            show_default=False,
        ),
    ] = None,
    ray_address: RayAddress = None,
    quiet: Quiet = False,
) -> None:
    """Run the stages a workflow file lists, each feeding the next; resumable.

    WORKFLOW is a file, or a shipped workflow's name (`vpipe run trailer-rating` from any
    folder; `vpipe workflows` lists them and copies one out to edit).

    Each stage writes WORK_DIR/<stage>. Finished items are skipped through each stage's
    manifest, an interrupted train run continues from its last epoch, and a stage already
    finished with the same options is reported "up to date".
    Relative paths in the file are taken from the current directory.
    """
    from pipeline import workflow as wfl
    from pipeline.cli import main
    from pipeline.workflow import shipped

    path = shipped.resolve(workflow_file)
    if str(path) != workflow_file and not quiet:
        which = "the shipped workflow" if path in shipped.shipped().values() else "the file"
        print(f"vpipe run: {workflow_file}: {which} {path}", file=sys.stderr)
    wf = wfl.load_workflow(
        path, inputs=inputs, labels=labels, work_dir=work_dir, sets=sets or (),
        engine=engine, ray_address=ray_address,
    )
    from pipeline.cli import command

    _preload(wf.stages)
    commands = command().commands  # the CLI's own commands, nothing else
    # Each stage's own checks too (weights looked for: not on a dry run), before any runs.
    planned = wfl.plan(wf, commands, quiet=quiet, overwrite=overwrite, fetch=not dry_run)
    steps = wfl.select(planned, start, until)
    if dry_run:
        for step in steps:
            typer.echo(step.command())
        return
    t0 = time.time()
    log = (lambda s: None) if quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    code, results = wfl.run_plan(steps, main, log=log)
    for line in wfl.summary_lines(wf.name, results, code, time.time() - t0):
        log(line)
    if code:
        raise typer.Exit(code)


@app.command("workflows")
def workflows(
    copy: Annotated[
        str | None,
        typer.Option(
            "--copy",
            metavar="NAME",
            help="Copy the shipped workflow NAME into the current folder (or DEST) to edit it.",
            show_default=False,
        ),
    ] = None,
    dest: Annotated[
        Path,
        typer.Option("--to", metavar="DEST", help="With --copy: a folder, or a .toml file name."),
    ] = Path("."),
    force: Annotated[
        bool, typer.Option("--force", help="With --copy: replace an existing file.")
    ] = False,
) -> None:
    """List the workflows that come with vpipe (run one by name: vpipe run NAME), or copy one
    out to edit it."""
    from pipeline.workflow import shipped

    if copy is not None:
        target = shipped.copy_out(copy, dest, force=force)
        typer.echo(f"{target}  (run it: vpipe run {target})")
        return
    files = shipped.shipped()
    width = max((len(n) for n in files), default=0)
    for name, path in files.items():
        typer.echo(f"{name:<{width}}  {shipped.summary(path)}")
    if files:
        typer.echo(f"\n(in {', '.join(str(d) for d in shipped.folders())})")



def _preload(stages: list) -> None:
    """torch (and torchvision for the features stage's image model) before the plan's checks
    import them (:func:`~pipeline.cli.app.preload_torch`)."""
    features = [s for s in stages if s.name == "features"]
    if features:
        preload_torch(str(features[0].options.get("image-model", "")))
    elif any(s.name in ("train", "evaluate", "predict") for s in stages):
        preload_torch()
