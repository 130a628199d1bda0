"""The Hugging Face video encoders (``--video-model hf:NAME`` / ``hf:DIR``): a transformers video
model's pooled video embedding, one row per window: ``get_video_features`` where the model has
it (X-CLIP's video side); V-JEPA 2's ``get_vision_features`` (its encoder's tokens) averaged
over the tokens; else the mean of the last hidden state over the tokens (VideoMAE: what its
video classification head pools). Weights are the model's own (found by :mod:`pipeline.hf`),
preprocessing its image processor's config, or its video processor's where it ships only that
(V-JEPA 2), as :func:`.hf_image.hf_preprocessing` reads them, applied frame by frame.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn

from pipeline.errors import UsageError
from pipeline.features.encoders.hf_image import HF_PREFIX, HFNamed, hf_preprocessing
from pipeline.features.encoders.image import Preprocessing
from pipeline.features.encoders.registry import register_encoder
from pipeline.features.encoders.video import VideoEncoder, Windowing, check_windowing
from pipeline.hf import HFModelInfo, resolve_hf_model


@register_encoder
class HFVideo(HFNamed):
    """``--video-model hf:NAME``: a transformers video model (VideoMAE, X-CLIP, V-JEPA 2)."""

    modality: ClassVar[str] = "video"

    @classmethod
    def check(cls, name: str, opts: Any) -> None:
        cls.check_name(name)
        check_windowing(opts)
        if opts.video_weights.lower() != "default":
            raise UsageError(f"--video-weights {opts.video_weights}: {name} brings its own "
                             "weights; leave --video-weights out")
        if opts.video_fps is None:  # a transformers config states no frame rate
            raise UsageError(f"--video-model {name}: give --video-fps (the rate the model "
                             "was trained at: its config does not say)")

    @classmethod
    def resolve(cls, name: str, opts: Any, missing: list) -> Any:
        info = resolve_hf_model(name[len(HF_PREFIX):], "--video-model", "video model",
                                "preprocessor_config.json included", prefix=HF_PREFIX)
        frames = opts.video_frames or config_frames(Path(info.folder), name)
        return info, Windowing(float(opts.video_fps), int(frames),
                               int(opts.video_stride or frames))

    @classmethod
    def identity(cls, resolved: Any, encoder: Any = None) -> dict[str, Any]:
        info, windowing = resolved
        return {"video_weights": info.identity(),
                **{f"video_{k}": v for k, v in windowing.attrs().items()}}

    @classmethod
    def load(cls, name: str, opts: Any, resolved: Any) -> VideoEncoder:
        return load_hf_video(*resolved)


VIDEO_PROCESSOR = "video_preprocessor_config.json"


def config_frames(folder: Path, name: str) -> int:
    """The clip length a model's config.json states (num_frames, frames_per_clip)."""
    cfg = json.loads((folder / "config.json").read_text())
    for c in (cfg, cfg.get("vision_config") or {}):
        for key in ("num_frames", "frames_per_clip"):
            if c.get(key):
                return int(c[key])
    raise UsageError(f"--video-model {name}: its config states no clip length: give "
                     "--video-frames")


@dataclass(frozen=True)
class FramewisePreprocessing:
    """An image processor's preprocessing applied to each frame of a window."""

    image: Preprocessing

    @property
    def crop_size(self) -> tuple[int, int]:
        return self.image.crop_size, self.image.crop_size

    def attrs(self) -> dict[str, Any]:
        return {**self.image.attrs(), "layout": "N, C, T, H, W", "per": "frame"}

    def uint8_frame(self, rgb: np.ndarray) -> torch.Tensor:
        from PIL import Image

        return self.image.uint8_from_image(Image.fromarray(rgb))

    def normalize(self, windows: torch.Tensor, dtype: torch.dtype | None = None
                  ) -> torch.Tensor:
        """uint8 (N, T, 3, h, w) -> normalised float (N, 3, T, h, w), as the torchvision ones."""
        n, t = windows.shape[:2]
        x = self.image.normalize(windows.flatten(0, 1), dtype)
        return x.view(n, t, *x.shape[1:]).permute(0, 2, 1, 3, 4)


def video_embedding(model: nn.Module) -> nn.Module:
    """The model's pooled video embedding as a module from (N, C, T, H, W) pixels to rows."""
    import torch
    from torch import nn

    class VideoEmbedding(nn.Module):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.permute(0, 2, 1, 3, 4)  # transformers' video models take (N, T, C, H, W)
            if hasattr(self.model, "get_video_features"):
                out = self.model.get_video_features(pixel_values=x)
                return out if isinstance(out, torch.Tensor) else out.pooler_output
            if hasattr(self.model, "get_vision_features"):  # V-JEPA 2: its encoder's tokens
                out = self.model.get_vision_features(pixel_values_videos=x)
                out = out if isinstance(out, torch.Tensor) else out.last_hidden_state
                return out.mean(dim=1)
            return self.model(pixel_values=x).last_hidden_state.mean(dim=1)

    return VideoEmbedding(model)


def load_hf_video(info: HFModelInfo, windowing: Windowing) -> VideoEncoder:
    import torch
    from transformers import AutoImageProcessor, AutoModel

    try:
        model = AutoModel.from_pretrained(info.folder, local_files_only=True)
        if (Path(info.folder) / VIDEO_PROCESSOR).is_file():  # V-JEPA 2 ships only this one
            from transformers import AutoVideoProcessor

            proc = AutoVideoProcessor.from_pretrained(info.folder, local_files_only=True)
        else:
            proc = AutoImageProcessor.from_pretrained(info.folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:  # no weights, no processor config, unknown type
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--video-model {info.name}: cannot load it ({first})") from None
    pre = FramewisePreprocessing(hf_preprocessing(proc, info.name, "--video-model"))
    enc = video_embedding(model.float().eval().requires_grad_(False))
    c = pre.image.crop_size
    try:
        with torch.inference_mode():  # the dim as the model gives it, and a check it runs
            dim = int(enc(torch.zeros(1, 3, windowing.frames, c, c)).shape[-1])
    except Exception as e:
        raise UsageError(f"--video-model {info.name}: does not take windows of "
                         f"{windowing.frames} frames of {c}x{c} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    layer = ("get_video_features (the projected video embedding)"
             if hasattr(model, "get_video_features")
             else "get_vision_features (the encoder's tokens), mean over the tokens"
             if hasattr(model, "get_vision_features")
             else "last_hidden_state, mean over the tokens")
    return VideoEncoder(info.name, enc, dim, pre, windowing, info, layer)
