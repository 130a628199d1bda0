"""``vpipe subclip``, ``vpipe extract-frames``, ``vpipe extract-audio``: parse options, call the
stage functions in pipeline.subclip / pipeline.frames, exit with their status."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.app import Engine, OutDir, Overwrite, Quiet, RayAddress, app, engine_for_options
from pipeline.errors import UsageError
from pipeline.frames import FrameOptions
from pipeline.subclip import SubclipOptions

# Defaults are the options dataclasses' own: written once, shown by --help.
SUB, FRAMES = SubclipOptions, FrameOptions

Inputs = Annotated[
    list[Path],
    typer.Argument(
        help="Video files and/or folders (searched recursively; non-videos are skipped).",
        show_default=False,
        metavar="INPUT",
    ),
]
Clips = Annotated[
    list[Path],
    typer.Argument(
        help="A `vpipe subclip` output folder (its clips are read from its manifest), "
        "or video files and/or folders.",
        show_default=False,
        metavar="CLIP",
    ),
]
Workers = Annotated[
    int | None,
    typer.Option(
        "--workers", min=1, show_default=False,
        help="Parallel worker processes, one video or clip each; with --engine ray, the most "
        "Ray tasks at once. [default: CPU cores, at most 4; with Ray: twice the cluster's CPUs]",
    ),
]
SampleRate = Annotated[
    int, typer.Option("--sample-rate", min=1000, help="Audio sample rate in Hz (mono, s16 wav).")
]


def _default_workers() -> int:
    from pipeline.runner import default_workers

    return default_workers()


@app.command("subclip")
def subclip(
    inputs: Inputs,
    out: OutDir,
    count: Annotated[int, typer.Option("--count", min=1, help="Subclips per video.")] = SUB.count,
    duration: Annotated[
        float, typer.Option("--duration", help="Length of each subclip in seconds.")
    ] = SUB.duration_s,
    start: Annotated[
        float, typer.Option("--start", help="Where the first subclip starts, in seconds.")
    ] = SUB.start_s,
    gap: Annotated[
        float, typer.Option("--gap", help="Seconds left out between subclips.")
    ] = SUB.gap_s,
    mode: Annotated[
        str,
        typer.Option(
            "--mode", metavar="ranges|exact|keyframe",
            help="ranges: no video written; each clip is a frame-exact range of its source "
            "(planned as exact mode plans it), recorded with the source's path, size and mtime, "
            "and extract-frames / extract-audio / features --from-video decode that range from "
            "the source (its own frames, bit-identical). exact: frame-accurate clip files "
            "(re-encoded with x264); keyframe: stream copy, boundaries snapped to closed-GOP "
            "keyframes (fast, clips still never overlap). In keyframe mode a video whose "
            "keyframes cannot place a clip (e.g. a single keyframe), whose codec mp4 cannot "
            "hold, or an MPEG program stream (.mpg/.vob) is cut in exact mode instead, with "
            "mode: exact in its records (a note on stderr where the keyframes were the cause).",
        ),
    ] = SUB.mode,
    min_fraction: Annotated[
        float,
        typer.Option(
            "--min-fraction",
            help="Drop a subclip at or under this fraction of --duration (the video ended).",
        ),
    ] = SUB.min_fraction,
    crf: Annotated[
        int,
        typer.Option("--crf", min=0, max=51, help="x264 quality in exact mode (lower: better)."),
    ] = SUB.crf,
    preset: Annotated[
        str,
        typer.Option(
            "--preset",
            help="x264 speed preset in exact mode (slower presets: smaller files, slower cuts).",
        ),
    ] = SUB.preset,
    segments: Annotated[
        Path | None,
        typer.Option(
            "--segments", show_default=False,
            help="CSV of source,start,end[,id] (seconds; source: a video's file stem or source "
            "id): cut these ranges instead of the --count/--duration/--start/--gap plan. They "
            "may overlap; the clip id is id, else <source>_<start>_<end>. A row that cannot be "
            "cut fails that clip; sources with no video are reported, videos with no row "
            "skipped.",
        ),
    ] = None,
    workers: Workers = None,
    engine: Engine = "local",
    ray_address: RayAddress = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Cut each video into non-overlapping subclips (OUT/<source_id>/<source_id>_<k>.mp4), or
    into the --segments given (which may overlap); --mode ranges writes no video.

    With --mode ranges (what the shipped workflows use) each clip is recorded as a range of its
    source and the next stages decode that range from the source.

    Every subclip is recorded in OUT/manifest.jsonl with its true start/end in the source (a
    clip file starts at timestamp 0 and keeps the audio). Re-running resumes; exit 1 if a video
    failed.
    """
    from pipeline.subclip import subclip_videos

    opts = SubclipOptions(
        count=count, duration_s=duration, start_s=start, gap_s=gap, mode=mode,
        min_fraction=min_fraction, crf=crf, preset=preset,
    )
    summary = subclip_videos(
        inputs, out, opts, segments=segments, workers=workers or _default_workers(),
        overwrite=overwrite, quiet=quiet,
        engine=engine_for_options(engine, ray_address, workers, quiet, "subclip"),
    )
    raise typer.Exit(summary.exit_code)


@app.command("convert-msvd")
def convert_msvd(
    annotations: Annotated[
        Path, typer.Argument(help="MSVD's annotation CSV (VideoID,Start,End,WorkerID,Source,"
                             "AnnotationTime,Language,Description).", show_default=False),
    ],
    out: OutDir,
    language: Annotated[
        str, typer.Option("--language", help="Descriptions in this Language column value.")
    ] = "English",
) -> None:
    """MSVD annotations -> OUT/segments.csv (for subclip --segments: clips named
    <VideoID>_<Start>_<End>) and OUT/captions.csv (for train --task caption)."""
    import sys

    from pipeline.segments import convert_msvd as convert

    seg, cap, n_clips, n_caps = convert(annotations, out, language)
    print(f"vpipe convert-msvd: {n_clips} clips -> {seg}, {n_caps} captions -> {cap}",
          file=sys.stderr)


@app.command("extract-frames")
def extract_frames(
    clips: Clips,
    out: OutDir,
    fps: Annotated[
        float | None,
        typer.Option(
            "--fps",
            help="Frames per second, by time: the frame on screen at t = k/fps (from the "
            "stream's timestamps, right for variable frame rates). "
            f"[default: {FRAMES.fps}]",
            show_default=False,
        ),
    ] = None,
    every: Annotated[
        int | None,
        typer.Option(
            "--every", min=1, help="Instead of --fps: every Nth decoded frame (0, N, 2N...), "
            "a time step that follows each video's frame rate (45: 1.8 s at 25 fps, 1.5 s at "
            "29.97).",
            show_default=False,
        ),
    ] = None,
    size: Annotated[
        int,
        typer.Option(
            "--size", min=0,
            help="Short side in pixels, aspect kept (0: original); a video already at or under "
            "it keeps its size (see --upscale). Of the stored frames: a non-square pixel "
            "aspect ratio (SAR) is not applied.",
        ),
    ] = FRAMES.size,
    upscale: Annotated[
        bool,
        typer.Option("--upscale", help="Also scale up videos whose short side is under --size."),
    ] = False,
    image_format: Annotated[
        str, typer.Option("--format", metavar="jpg|png", help="Image format: jpg or png.")
    ] = FRAMES.format,
    quality: Annotated[
        int, typer.Option("--quality", min=1, max=100, help="JPEG quality (1-100).")
    ] = FRAMES.quality,
    sample_rate: SampleRate = FRAMES.sample_rate_hz,
    no_audio: Annotated[
        bool, typer.Option("--no-audio", help="Frames only: do not write audio.wav.")
    ] = False,
    augment_spec: Annotated[
        str | None,
        typer.Option(
            "--augment", metavar="SPEC",
            help="With --views K: the transforms of each view, comma-separated, each NAME or "
            "NAME=STRENGTH (one value: its usual range, or LOW-HIGH), its values drawn per "
            "view: hflip[=p], rotate=degrees, crop=min-scale, jitter=s (brightness, contrast, "
            "saturation in 1+-s), noise=std, speed=LOW-HIGH (audio time-stretched to match; "
            "needs --fps), gain=dB, anoise=std. E.g. hflip,rotate=10,noise=0.02,speed=0.9-1.1",
            show_default=False,
        ),
    ] = None,
    views: Annotated[
        int,
        typer.Option("--views", min=0, help="Augmented views of each clip besides the clip "
                     "itself, each an item OUT/<clip_id>~<k>/ (k = 1..K) whose record names "
                     "the clip and the values drawn. 0: none."),
    ] = 0,
    augment_seed: Annotated[
        int, typer.Option("--augment-seed", help="Seeds every view's values (the same seed, "
                          "the same views).")
    ] = 0,
    workers: Workers = None,
    engine: Engine = "local",
    ray_address: RayAddress = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Sample frames (and pull PCM audio) from each clip in one decoding pass.

    Writes OUT/<clip_id>/frames/000000.jpg... and OUT/<clip_id>/audio.wav (16 kHz mono s16),
    and per clip a manifest record with the frames' timestamps. Re-running resumes. With
    --augment SPEC --views K, also K augmented views of each clip, OUT/<clip_id>~1..K/.
    """
    from pipeline.frames import extract_frames as run_stage

    opts = frame_options(fps=fps, every=every, size=size, upscale=upscale,
                         image_format=image_format, quality=quality, sample_rate=sample_rate,
                         no_audio=no_audio, augment_spec=augment_spec, views=views,
                         augment_seed=augment_seed)
    summary = run_stage(
        clips, out, opts, workers=workers or _default_workers(), overwrite=overwrite,
        quiet=quiet,
        engine=engine_for_options(engine, ray_address, workers, quiet, "extract-frames"),
    )
    raise typer.Exit(summary.exit_code)


@app.command("extract-audio")
def extract_audio(
    clips: Clips,
    out: OutDir,
    sample_rate: SampleRate = FRAMES.sample_rate_hz,
    workers: Workers = None,
    engine: Engine = "local",
    ray_address: RayAddress = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Pull the audio of each clip as PCM: OUT/<clip_id>/audio.wav (16 kHz mono s16).

    Same layout and manifest fields as extract-frames, frames/ left empty (n_frames 0). A clip
    without an audio track is recorded with has_audio false.
    """
    from pipeline.frames import extract_audio as run_stage

    summary = run_stage(
        clips, out, sample_rate_hz=sample_rate, workers=workers or _default_workers(),
        overwrite=overwrite, quiet=quiet,
        engine=engine_for_options(engine, ray_address, workers, quiet, "extract-audio"),
    )
    raise typer.Exit(summary.exit_code)


def frame_options(*, fps: float | None, every: int | None, size: int, upscale: bool,
                  image_format: str, quality: int, sample_rate: int,
                  no_audio: bool, augment_spec: str | None = None, views: int = 0,
                  augment_seed: int = 0) -> FrameOptions:
    """extract-frames' options as the command gets them, checked as the stage checks them."""
    if fps is not None and every is not None:
        raise UsageError("give --fps or --every, not both")
    return FrameOptions(
        fps=None if every is not None else (FRAMES.fps if fps is None else fps),
        every=every, size=size, upscale=upscale, format=image_format, quality=quality,
        sample_rate_hz=sample_rate, audio=not no_audio, augment=augment_spec, views=views,
        augment_seed=augment_seed,
    )


def check_extract_frames(params: dict, fetch: bool) -> None:
    """What `vpipe run` checks of an [extract-frames] stage before any stage runs: every
    refusal of the stage's own option checks (--fps with --every, a format, a rate)."""
    names = ("fps", "every", "size", "upscale", "image_format", "quality", "sample_rate",
             "no_audio", "augment_spec", "views", "augment_seed")
    frame_options(**{k: params[k] for k in names if k in params})


PLAN_CHECKS = {"extract-frames": check_extract_frames}
