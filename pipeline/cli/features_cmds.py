"""``vpipe features`` (frame encoder + VGGish into HDF5 shards) and ``vpipe inspect``."""

from __future__ import annotations

from collections.abc import Callable
from inspect import Parameter, signature
from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline.cli.app import (
    Engine,
    OutDir,
    Overwrite,
    Quiet,
    RayAddress,
    app,
    engine_for_options,
    preload_torch,
)
from pipeline.features.encoders import declared_options
from pipeline.features.options import FeatureOptions

OPT = FeatureOptions  # the defaults, written once in the options dataclass


def with_encoder_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give ``command`` (which takes ``**encoder_options``) a Typer option for each option an
    encoder family declares, after its modality's ``--<modality>-weights`` (else last): the
    flag, help and default come from the family's declaration alone, and so do workflows' keys
    (they are the command's options)."""
    sig = signature(command, eval_str=True)
    params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
    for opt in reversed(declared_options()):
        weights = opt.name.split("_")[0] + "_weights"
        at = next((i for i, p in enumerate(params) if p.name == weights), len(params) - 1)
        params.insert(at + 1, Parameter(
            opt.name, Parameter.POSITIONAL_OR_KEYWORD, default=opt.default,
            annotation=Annotated[opt.type, typer.Option(opt.flags, help=opt.help)],
        ))
    command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    return command


@app.command("features")
@with_encoder_options
def features(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            metavar="MEDIA",
            help="Output folder(s) of `vpipe extract-frames`; with --from-video: videos, "
            "folders of videos or `vpipe subclip` output folders.",
            show_default=False,
        ),
    ],
    out: OutDir,
    image_model: Annotated[
        str,
        typer.Option(
            "--image-model",
            help="resnet18|34|50|101|152 (global average pool), any other torchvision "
            "classification model by name (vit_b_16, convnext_tiny, efficientnet_b0, "
            "mobilenet_v3_small, regnet_y_400mf, ...: the input of its classifier's last "
            "Linear), or hf:NAME / hf:DIR, a Hugging Face CLIP-style model (its projected "
            "image embedding, get_image_features).",
        ),
    ] = OPT.image_model,
    image_weights: Annotated[
        str,
        typer.Option(
            "--image-weights",
            help="imagenet (from the torch hub cache: IMAGENET1K_V1 for the ResNets, the "
            "model's DEFAULT weights for the others), imagenet-v2, a registered weights name "
            "(e.g. IMAGENET1K_SWAG_E2E_V1), none (seeded random init), or a state-dict file. "
            "hf: models bring their own weights.",
        ),
    ] = OPT.image_weights,
    audio_model: Annotated[
        str, typer.Option("--audio-model", help="vggish or none (no audio).")
    ] = OPT.audio_model,
    audio_weights: Annotated[
        str,
        typer.Option(
            "--audio-weights",
            help="release (torchvggish's, from the torch hub cache), none "
            "(seeded random init: needs --no-audio-postprocess or --audio-pca PATH, the "
            "release PCA being fitted to the trained network), or a state-dict file.",
        ),
    ] = OPT.audio_weights,
    # Here come the options the encoder families declare (with_encoder_options).
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size",
            min=0,
            help="Frames per model call (mixing clips); 0: the fastest of 4-32 on a CPU "
            "(32-256 on CUDA), timed on the run's first frames (a run under 1,000 frames "
            "keeps 8, on CUDA 128), recorded in vpipe.json.",
        ),
    ] = OPT.batch_size,
    compile_model: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="torch.compile the image model: faster per frame after a compile of tens of "
            "seconds, so only for long runs (break-even in benchmarks/README.md); one call "
            "size (--batch-size, or the default), recorded in vpipe.json.",
        ),
    ] = OPT.compile,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            min=0,
            help="Frame decoding processes (0: in the model's process); not used with --engine "
            "ray, where Ray tasks decode. [default: on CUDA the usable cores - 1; on a CPU "
            "cores - 1, up to 4; at least 1]",
            show_default=False,
        ),
    ] = None,
    device: Annotated[str, typer.Option(
        "--device", help="auto, cpu, cuda or cuda:N (with --engine ray: each actor takes its "
        "GPU, else the CPU; cpu: no GPU).")] = OPT.device,
    precision: Annotated[
        str,
        typer.Option(
            "--precision",
            help="auto (fp16 on CUDA, bf16 on CPUs with native bf16, else fp32), fp32, fp16, bf16.",
        ),
    ] = OPT.precision,
    dtype: Annotated[str, typer.Option("--dtype", help="Stored features: float32 or float16.")] = (
        OPT.dtype
    ),
    compression: Annotated[
        str, typer.Option("--compression", help="HDF5 compression: none, gzip or lzf.")
    ] = OPT.compression,
    shard_size: Annotated[
        int,
        typer.Option("--shard-size", min=1, help="Clips per shard (a shard also closes at ~1 GB)."),
    ] = OPT.shard_size,
    from_video: Annotated[
        bool,
        typer.Option(
            "--from-video",
            help="Decode the clips themselves (no extract-frames step, no JPEGs): frames "
            "sampled by --fps/--every, audio resampled to 16 kHz mono.",
        ),
    ] = OPT.from_video,
    fps: Annotated[
        float | None,
        typer.Option(
            "--fps",
            help="With --from-video: the frame on screen at each k/fps seconds, as "
            "extract-frames --fps. [default: 1]",
            show_default=False,
        ),
    ] = None,
    every: Annotated[
        int | None,
        typer.Option(
            "--every",
            help="With --from-video: every Nth decoded frame (0, N, 2N...), as extract-frames "
            "--every.",
            show_default=False,
        ),
    ] = None,
    text: Annotated[
        Path | None,
        typer.Option(
            "--text",
            help="Titles file: a CSV id,text (a source id, inherited by its clips, or a clip "
            "id) or the tagging TSV name<TAB>title<TAB>tags. Each clip's title goes through "
            "--text-model into /text in the shards; clips without one get zero text rows.",
            show_default=False,
        ),
    ] = None,
    text_max_chars: Annotated[
        int,
        typer.Option("--text-max-chars", min=0,
                     help="A title's first N characters are encoded (0: all of it)."),
    ] = OPT.text_max_chars,
    text_model: Annotated[
        str,
        typer.Option(
            "--text-model",
            help="The title encoder: a Hugging Face transformers name (from the hub cache, "
            "$HF_HOME/hub) or a folder saved with save_pretrained, tokenizer included. The "
            "default is multilingual (titles in ~100 languages); nghuyong/ernie-1.0-base-zh "
            "is the research setup's ERNIE 1.0.",
        ),
    ] = OPT.text_model,
    video_model: Annotated[
        str,
        typer.Option(
            "--video-model",
            help="none, a torchvision video classifier (r3d_18, mc3_18, r2plus1d_18, s3d, "
            "mvit_v1_b, mvit_v2_s, swin3d_t/s/b: the input of its classifier's last linear "
            "layer), or hf:NAME / hf:DIR, a transformers video model (VideoMAE, X-CLIP: its "
            "pooled video embedding): one row per window of --video-frames frames at "
            "--video-fps into /video. Needs --from-video.",
        ),
    ] = OPT.video_model,
    video_weights: Annotated[
        str,
        typer.Option(
            "--video-weights",
            help="default (the model's DEFAULT weights, from the torch hub cache), a "
            "registered weights name (e.g. KINETICS400_V1), none (seeded random init), or a "
            "state-dict file.",
        ),
    ] = OPT.video_weights,
    engine: Engine = "local",
    ray_address: RayAddress = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    **encoder_options: Any,
) -> None:
    """Frame features (a ResNet's global average pool, another torchvision classifier's
    penultimate layer, or an hf: CLIP-style image embedding) and audio features (VGGish) into
    shards.

    Writes OUT/shard-00000.h5 ... and OUT/index.jsonl; re-running skips clips already in
    complete shards. Published weights (imagenet, release) come from the torch hub cache
    ($TORCH_HOME/hub/checkpoints), hf: models from the Hugging Face cache ($HF_HOME/hub),
    downloaded there on first use when online; offline, put
    the files there or give state-dict files (one error lists every missing file). The
    input folders come from `vpipe extract-frames`; --from-video reads clips (videos, or a
    `vpipe subclip` folder) instead and decodes them in the loader workers. With --engine
    ray, Ray tasks decode and a pool of actors (one per GPU, else one per node) encodes.
    With --text, each clip's title is encoded by a frozen transformers model into /text
    (per token, [CLS] and [SEP] included). With --video-model (and --from-video), windows of
    each clip at the model's rate go through a video model into /video (one row per window,
    from the same decode as the frames and the audio).
    """
    preload_torch(image_model)
    from pipeline.features import extract_features

    opts = FeatureOptions(
        image_model=image_model,
        image_weights=image_weights,
        audio_model=audio_model,
        audio_weights=audio_weights,
        dtype=dtype,
        compression=compression,
        shard_size=shard_size,
        batch_size=batch_size,
        compile=compile_model,
        workers=workers,  # None: chosen for the run's device
        device=device,
        precision=precision,
        from_video=from_video,
        fps=fps,
        every=every,
        text=None if text is None else str(text),
        text_max_chars=text_max_chars,
        text_model=text_model,
        video_model=video_model,
        video_weights=video_weights,
        **encoder_options,
    )
    opts.check()  # a bad option is one line before a Ray cluster is joined (seconds)
    runner = engine_for_options(engine, ray_address, None, quiet, "features")
    summary = extract_features(inputs, out, opts, overwrite=overwrite, quiet=quiet,
                               engine=runner)
    raise typer.Exit(summary.exit_code)


@app.command("inspect")
def inspect(
    folder: Annotated[
        Path, typer.Argument(metavar="FEATURES", help="Output folder of `vpipe features`.")
    ],
) -> None:
    """Summarise a feature folder and check every shard against index.jsonl (exit 1 if not)."""
    from pipeline.errors import UsageError, plural
    from pipeline.records import read_run_info
    from pipeline.shards import validate

    if not folder.is_dir():
        typer.echo(f"vpipe: error: {folder}: no such folder", err=True)
        raise typer.Exit(2)  # a usage error, like every other stage's missing input
    stage = (read_run_info(folder) or {}).get("stage")
    if stage not in (None, "features") and not (folder / "index.jsonl").exists():
        raise UsageError(f"{folder}: the output of `vpipe {stage}`, not a feature folder "
                         "(`vpipe inspect` checks what `vpipe features` wrote)")
    summary, problems = validate(folder)
    dims = summary["dims"]
    models = summary["models"]
    img = summary.get("image_attrs", {})
    aud = summary.get("audio_attrs", {})
    lines = [
        f"{folder}: {plural(summary['shards'], 'shards')}, {plural(summary['clips'], 'clips')}, "
        f"{summary['bytes'] / 1e6:.1f} MB",
        f"  image: {summary['frames']} frames x {dims.get('image', 0)} "
        f"({models.get('image')}, weights {_weights_name(img.get('weights'))})",
        f"  audio: {summary['audio_rows']} rows x {dims.get('audio', 0)} "
        f"({models.get('audio')}, weights {_weights_name(aud.get('weights'))})",
        "  checksums: " + (f"fletcher32, verified in all {summary['shards']} shards"
                           if not summary["no_checksums"] else
                           f"no checksums in {summary['no_checksums']} of {summary['shards']} "
                           "shards (written before schema 2: damage there cannot be seen)"),
    ]
    txt = summary.get("text_attrs", {})
    if txt:
        lines.insert(3, f"  text: {summary['text_rows']} token rows x {dims.get('text', 0)} "
                        f"({txt.get('model')}, {summary['titled']} of {summary['clips']} clips "
                        f"titled, cut at {txt.get('max_chars')} chars)")
    vid = summary.get("video_attrs", {})
    if vid:
        lines.insert(-1, f"  video: {summary['video_rows']} windows x {dims.get('video', 0)} "
                         f"({vid.get('model')}, weights {_weights_name(vid.get('weights'))}, "
                         f"{vid.get('frames')} frames at {vid.get('fps')}/s every "
                         f"{vid.get('stride')})")
    typer.echo("\n".join(lines))
    for p in problems:
        typer.echo(f"invalid: {p}", err=True)
    typer.echo("ok" if not problems else f"{len(problems)} problem(s)")
    raise typer.Exit(1 if problems else 0)


def _weights_name(w: object) -> str:
    if isinstance(w, dict):
        if w.get("kind") == "file":
            return str(w.get("file") or w.get("name"))
        return str(w.get("name") or w.get("kind"))  # a shard written without a name
    return str(w)


def check_features(params: dict, fetch: bool) -> dict | None:
    """What `vpipe run` checks of a [features] stage before any stage runs: the options as
    the command would build them, checked by :func:`pipeline.features.checks.check_features`
    (with ``fetch``: the titles file and every weights file; returns the weights' identities
    as the stage records them)."""
    import dataclasses

    from pipeline.features.checks import check_features as check

    names = {f.name for f in dataclasses.fields(FeatureOptions)}
    opts = FeatureOptions(**{k: v for k, v in params.items() if k in names and v is not None})
    return check(opts, fetch)


PLAN_CHECKS = {"features": check_features}
