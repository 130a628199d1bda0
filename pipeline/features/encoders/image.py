"""The image modality's shared parts: :class:`Preprocessing`, the frame preprocessing split
so that the uint8 part (decode, resize, crop) runs in loader workers and the float part
(scale, normalise) runs batched next to the model, and :class:`ImageEncoder`, what either image
family (:mod:`.torchvision_image`, :mod:`.hf_image`) loads; :func:`resolve_image_weights` and
:func:`load_image_encoder` find the family of a model name through the registry.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch where a model runs: the CLI reads the families' options
    import torch
    from torch import nn

from pipeline.features.encoders.registry import encoder_for
from pipeline.features.weights import MissingWeights, WeightsInfo, missing_error
from pipeline.hf import HFModelInfo


@dataclass(frozen=True)
class Preprocessing:
    """The weights' preprocessing: resize (shorter side, or to height x width), centre crop,
    normalisation."""

    resize_size: int | tuple[int, int] = 256
    crop_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    antialias: bool = True
    # torchvision's presets resize the PIL image and round the crop's offset; Hugging Face's
    # processors (torchvision backend) resize the uint8 tensor and truncate the offset (an odd
    # margin's crop moves by one pixel); their PIL backend resizes the PIL image. Recorded
    # only when not torchvision's, so the attributes of existing ResNet shards stay as they were.
    resize_on: str = "PIL"  # or "tensor"
    crop_offset: str = "round"  # or "floor"
    preset: str = ""  # where the numbers come from, when it is not the ResNet's preset

    def attrs(self) -> dict[str, Any]:
        d = asdict(self)
        for k, default in (("resize_on", "PIL"), ("crop_offset", "round"), ("preset", "")):
            if d[k] == default:
                del d[k]
        if isinstance(self.resize_size, tuple):
            d["resize_size"] = list(self.resize_size)
        return {**d, "decode": "PIL, RGB", "scale": "1/255"}

    def load_uint8(self, path: str | os.PathLike) -> torch.Tensor:
        """Decode one frame file and resize/crop it: (3, crop, crop) uint8, as the preset does."""
        import torchvision.transforms.functional as F
        from PIL import Image
        from torchvision.transforms import InterpolationMode

        with Image.open(path) as im:
            im = im.convert("RGB")
        return self.uint8_from_image(im, F, InterpolationMode)

    def uint8_from_image(self, im: Any, F: Any = None, modes: Any = None) -> torch.Tensor:
        """Resize/crop a PIL image (or a uint8 CHW tensor) to the model's input, still uint8."""
        import torch

        if F is None:
            import torchvision.transforms.functional as F
            from torchvision.transforms import InterpolationMode as modes
        size = [self.resize_size] if isinstance(self.resize_size, int) else list(self.resize_size)
        resize = F.resize
        if self.resize_on == "tensor":
            # transforms.v2's kernel, as the processors call: on uint8 its bicubic differs
            # from v1's (float, then rounded) by one level here and there.
            import torchvision.transforms.v2.functional as F2

            im = im if isinstance(im, torch.Tensor) else F.pil_to_tensor(im)
            resize = F2.resize
        im = resize(im, size, interpolation=modes(self.interpolation), antialias=self.antialias)
        c = self.crop_size
        if self.crop_offset == "round":
            im = F.center_crop(im, [c])
        else:  # int() truncates: a crop larger than the image is padded as the processor pads
            h, w = im.shape[-2:] if isinstance(im, torch.Tensor) else (im.height, im.width)
            im = F.crop(im, int((h - c) / 2), int((w - c) / 2), c, c)
        return im if isinstance(im, torch.Tensor) else F.pil_to_tensor(im)

    def normalize(self, batch: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """uint8 (N, 3, H, W) → normalised float (float32 unless ``dtype``), batched (same ops
        as the preset per frame)."""
        import torch

        dtype = dtype or torch.float32
        x = batch.to(dtype) / 255
        mean = torch.tensor(self.mean, dtype=dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


RESNET_LAYER = "avgpool (global average pool, fc removed)"


@dataclass
class ImageEncoder:
    """A frame encoder (pixels in, one feature row per frame out), with its preprocessing and
    provenance."""

    name: str
    model: nn.Module
    dim: int
    preprocessing: Preprocessing
    weights: WeightsInfo | HFModelInfo
    layer: str = RESNET_LAYER

    def attrs(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "weights": self.weights.attrs()
            if isinstance(self.weights, WeightsInfo)
            else self.weights.identity(),
            "layer": self.layer,
            "dim": self.dim,
            "preprocessing": self.preprocessing.attrs(),
        }


def resolve_image_weights(model_name: str, weights: str) -> Any:
    """Find an image model's weights before any work starts (what its family's ``load``
    takes): the family is the registry's for ``model_name``."""
    family = encoder_for("image", model_name)
    opts = _ImageChoice(model_name, weights)
    family.check(model_name, opts)
    missing: list[MissingWeights] = []
    resolved = family.resolve(model_name, opts, missing)
    if missing:
        raise missing_error(missing)
    return resolved


def load_image_encoder(model_name: str, weights: str, resolved: Any = None) -> ImageEncoder:
    """Build the frame encoder with its weights loaded (CPU, eval mode).

    ``resolved``: what :func:`resolve_image_weights` returned, when the caller already ran it.
    """
    resolved = resolved or resolve_image_weights(model_name, weights)
    family = encoder_for("image", model_name)
    return family.load(model_name, _ImageChoice(model_name, weights), resolved)


@dataclass(frozen=True)
class _ImageChoice:
    """The options an image family reads, for the helpers above (the stage passes its own)."""

    image_model: str
    image_weights: str
