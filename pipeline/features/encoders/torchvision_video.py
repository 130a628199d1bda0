"""The torchvision video classifiers (``--video-model r3d_18``, mc3_18, r2plus1d_18, s3d,
mvit_v1_b, mvit_v2_s, swin3d_t/s/b): each runs up to the input of its classifier's last linear
layer (s3d's is a 1x1x1 Conv3d, whose input the model averages over time and space), one row
per window. Their weights are a registered torchvision checkpoint from the torch hub cache, a
state-dict file or a seeded random init (:mod:`..weights`, as the image family's); their
preprocessing is the numbers of the weights' ``VideoClassification`` preset and their window
(frame rate, clip length) the one the weights' documentation states.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # torch where a model runs: the CLI reads the families' options
    from torch import nn

from pipeline.errors import UsageError
from pipeline.features.encoders.registry import Encoder, EncoderOption, register_encoder
from pipeline.features.encoders.video import (
    VideoEncoder,
    VideoPreprocessing,
    Windowing,
    check_windowing,
)
from pipeline.features.weights import (
    RANDOM_SEED,
    MissingWeights,
    WeightsInfo,
    assign_state_dict,
    hub_checkpoint,
    hub_path,
    load_state_dict,
)
from pipeline.files import sha256_of

HEADS = ("fc", "head", "classifier")
# Models whose window length is fixed to their min_temporal_size (MViT: 16 frames; measured in
# torchvision 0.29: 8 frames fail in both).
FIXED_LENGTH = ("mvit_",)
WHERE_NAMES = "torchvision.models.list_models(module=torchvision.models.video)"


@register_encoder
class TorchvisionVideo(Encoder):
    """``--video-model NAME``: a torchvision video classifier; ``--video-weights``."""

    modality: ClassVar[str] = "video"
    label: ClassVar[str] = "a torchvision video classifier"
    options: ClassVar[tuple[EncoderOption, ...]] = (
        EncoderOption("video_fps", None, "--video-fps",
                      "Frames per second the video model sees (the frame on screen at each "
                      "k/fps). [default: the weights' own rate, e.g. 15 for Kinetics-400]",
                      value_type=float),
        EncoderOption("video_frames", None, "--video-frames",
                      "Frames per window (T). [default: the weights' clip length, e.g. 16]",
                      value_type=int),
        EncoderOption("video_stride", None, "--video-stride",
                      "Frames from one window's start to the next (S). [default: T, "
                      "non-overlapping windows]", value_type=int),
    )

    @classmethod
    def claims(cls, name: str) -> bool:
        return not name.startswith("hf:")

    @classmethod
    def check(cls, name: str, opts: Any) -> None:
        check_video_model(name)
        check_windowing(opts)
        w = preset_weights(name)
        least = int(w.meta.get("min_temporal_size", 1))
        if opts.video_frames is not None and opts.video_frames < least:
            raise UsageError(f"--video-frames {opts.video_frames}: {name} needs at least "
                             f"{least} frames a window")
        if name.startswith(FIXED_LENGTH) and opts.video_frames not in (None, least):
            raise UsageError(f"--video-frames {opts.video_frames}: {name} takes exactly "
                             f"{least} frames a window (its positional embeddings are sized "
                             "for them)")

    @classmethod
    def resolve(cls, name: str, opts: Any, missing: list) -> Any:
        try:
            info, w = resolve_video_weights(name, opts.video_weights)
        except MissingWeights as e:
            missing.append(e)
            return None
        return info, w, windowing_for(w, opts)

    @classmethod
    def identity(cls, resolved: Any, encoder: Any = None) -> dict[str, Any]:
        info, _, windowing = resolved
        return {"video_weights": info.identity(),
                **{f"video_{k}": v for k, v in windowing.attrs().items()}}

    @classmethod
    def load(cls, name: str, opts: Any, resolved: Any) -> VideoEncoder:
        return load_torchvision_video(name, *resolved)


def video_models() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models.video))


def check_video_model(name: str) -> None:
    """UsageError for a --video-model that is not a torchvision video classifier."""
    names = video_models()
    if name in names:
        return
    import difflib

    near = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(near)}? " if near else ""
    raise UsageError(f"--video-model {name!r}: not a torchvision video classifier; {hint}"
                     f"use one of {', '.join(names)} ({WHERE_NAMES})")


def preset_weights(name: str) -> Any:
    """The weights whose architecture, preprocessing and window a file or random init gets."""
    from torchvision.models import get_model_weights

    return get_model_weights(name).DEFAULT


def documented_window(w: Any) -> tuple[float, int]:
    """(frame_rate, clip_len) as the weights' documentation states them."""
    docs = w.meta.get("_docs", "")
    rate = re.search(r"frame_rate=([0-9.]+)", docs)
    length = re.search(r"clip_len=([0-9]+)", docs)
    if rate is None or length is None:  # not in torchvision 0.15-0.29's weights: say so
        raise UsageError(f"{type(w).__name__}.{w.name}: its documentation states no frame_rate/"
                         "clip_len: give --video-fps and --video-frames")
    return float(rate.group(1)), int(length.group(1))


def windowing_for(w: Any, opts: Any) -> Windowing:
    fps, frames = documented_window(w)
    fps = float(opts.video_fps) if opts.video_fps is not None else fps
    frames = int(opts.video_frames) if opts.video_frames is not None else frames
    stride = int(opts.video_stride) if opts.video_stride is not None else frames
    return Windowing(fps, frames, stride)


def resolve_video_weights(name: str, weights: str) -> tuple[WeightsInfo, Any]:
    """The weights' info and the torchvision enum member whose architecture and preprocessing
    they get (DEFAULT for a file or a random init)."""
    from torchvision.models import get_model_weights

    enum = get_model_weights(name)
    if weights.lower() == "none":
        return WeightsInfo("random", "random", seed=RANDOM_SEED), enum.DEFAULT
    member = enum.__members__.get(weights.upper())
    if member is not None:
        tag = member.name  # DEFAULT is an alias: recorded as the member it stands for
        path = hub_checkpoint(
            member.url, f"{name} {tag}",
            "`--video-weights PATH` (a state-dict file) or `--video-weights none` (random init)")
        return WeightsInfo("hub", f"{enum.__name__}.{tag}", file=path.name, url=member.url), member
    path = Path(weights)
    if not path.is_file():
        named = ", ".join(m for m in enum.__members__ if m != "DEFAULT")
        raise UsageError(f"--video-weights {weights}: neither default, none, one of {name}'s "
                         f"weights ({named}), nor an existing file")
    return (WeightsInfo("file", str(path.resolve()), file=path.name, sha256=sha256_of(path)),
            enum.DEFAULT)


def video_preprocessing(w: Any) -> VideoPreprocessing:
    t = w.transforms()
    return VideoPreprocessing(
        resize_size=tuple(int(v) for v in t.resize_size),
        crop_size=(int(t.crop_size[0]), int(t.crop_size[1])),
        mean=tuple(float(v) for v in t.mean),
        std=tuple(float(v) for v in t.std),
        interpolation=t.interpolation.value,
        antialias=False,  # VideoClassification hard-codes it
        preset=f"{type(w).__name__}.{w.name}.transforms()",
    )


def classifier_last(model: nn.Module) -> tuple[str, int] | None:
    """The classifier's last linear layer (a Linear, or a 1x1x1 Conv3d) and its input width."""
    from torch import nn

    last = None
    for name, m in model.named_modules():
        if name.split(".")[0] not in HEADS:
            continue
        if isinstance(m, nn.Linear):
            last = name, int(m.in_features)
        elif isinstance(m, nn.Conv3d) and tuple(m.kernel_size) == (1, 1, 1):
            last = name, int(m.in_channels)
    return last


def load_torchvision_video(name: str, info: WeightsInfo, w: Any, windowing: Windowing
                           ) -> VideoEncoder:
    """The classifier with its last linear layer replaced by Identity (CPU, eval mode)."""
    import torch
    import torchvision
    from torch import nn

    if info.kind == "random":
        torch.manual_seed(RANDOM_SEED)
        model = torchvision.models.get_model(name, weights=None)
    else:
        with torch.device("meta"):  # no random init of weights about to be replaced
            model = torchvision.models.get_model(name, weights=None)
    found = classifier_last(model)
    if found is None:
        raise UsageError(f"--video-model {name}: its classifier has no linear layer")
    head, dim = found
    model.set_submodule(head, nn.Identity())
    if info.kind != "random":
        path = hub_path(info)
        sd = {k: v for k, v in load_state_dict(path, name).items()
              if not k.startswith(f"{head}.")}
        assign_state_dict(model, sd, path, name)
    layer = f"input of {head} (the classifier's last linear layer, removed)"
    if head.startswith("classifier."):  # s3d: a 1x1x1 conv, then the mean the model takes
        layer += ", averaged over time and space as the model does"
    return VideoEncoder(name, model.eval(), dim, video_preprocessing(w), windowing, info, layer)
