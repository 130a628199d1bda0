"""The Hugging Face image encoders (``--image-model hf:NAME`` / ``hf:DIR``: CLIP and kin): the
model's projected image embedding (``get_image_features``) behind a module of pixels, its
weights the model's own (found by :mod:`pipeline.hf`), its preprocessing the image
processor's config, computed the way that library computes it and split as
:class:`.image.Preprocessing` says.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch
    from torch import nn

from pipeline.errors import UsageError
from pipeline.features.encoders.image import ImageEncoder, Preprocessing
from pipeline.features.encoders.registry import Encoder, register_encoder
from pipeline.hf import HFModelInfo, resolve_hf_model

HF_PREFIX = "hf:"


class HFNamed(Encoder):
    """A family whose models are named ``hf:NAME`` or ``hf:DIR`` (image, video): it claims the
    prefix and refuses an empty name, naming its modality's option."""

    label: ClassVar[str] = "hf:NAME"
    collects_missing: ClassVar[bool] = False  # the hub lookup raises its own error

    @classmethod
    def claims(cls, name: str) -> bool:
        return name.startswith(HF_PREFIX)

    @classmethod
    def check_name(cls, name: str) -> None:
        if not name[len(HF_PREFIX):].strip():
            raise UsageError(f"--{cls.modality}-model {name!r}: give hf:ORG/NAME or hf:DIR")


@register_encoder
class HFImage(HFNamed):
    """``--image-model hf:NAME``: a Hugging Face model with an image embedding."""

    modality: ClassVar[str] = "image"

    @classmethod
    def check(cls, name: str, opts: Any) -> None:
        cls.check_name(name)

    @classmethod
    def resolve(cls, name: str, opts: Any, missing: list) -> Any:
        return resolve_hf_image_model(name, opts.image_weights), None

    @classmethod
    def identity(cls, resolved: Any, encoder: Any = None) -> dict[str, Any]:
        return {"image_weights": resolved[0].identity()}

    @classmethod
    def load(cls, name: str, opts: Any, resolved: Any) -> ImageEncoder:
        return load_hf_image_encoder(resolved[0])


def resolve_hf_image_model(model_name: str, weights: str) -> Any:
    """An ``hf:`` image encoder's files (its weights come with it: --image-weights stays at
    its default)."""
    if weights.lower() != "imagenet":
        raise UsageError(
            f"--image-weights {weights}: {model_name} brings its own weights; leave "
            "--image-weights out (use hf:DIR for a folder saved with save_pretrained)"
        )
    return resolve_hf_model(
        model_name[len(HF_PREFIX):], "--image-model", "image model",
        "preprocessor_config.json included", prefix=HF_PREFIX,
    )


def image_embedding(model: nn.Module) -> nn.Module:
    """A Hugging Face model's projected image embedding (``get_image_features``: CLIP's
    ``image_embeds``) as a module from normalised pixels to rows (defined here, so that
    reading this family's options does not import torch)."""
    import torch
    from torch import nn

    class ImageEmbedding(nn.Module):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.model.get_image_features(pixel_values=x)
            # transformers 5: the output object, the projection in pooler_output; 4: a tensor
            return out if isinstance(out, torch.Tensor) else out.pooler_output

    return ImageEmbedding(model)


def _size(size: Any, key: str) -> int | None:
    v = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(v) if v is not None else None


# PIL's resampling numbers (what preprocessor_config.json holds) -> torchvision's names.
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def hf_preprocessing(proc: Any, name: str, option: str = "--image-model") -> Preprocessing:
    """The numbers of a Hugging Face image processor: shortest-side (or height x width)
    resize with its resample, centre crop, 1/255 and its mean/std. UsageError (naming
    ``option``) for a config this split cannot reproduce (another rescale, a non-square
    input, an odd resample)."""
    def refuse(why: str) -> UsageError:
        return UsageError(f"{option} {name}: {type(proc).__name__} {why}")

    if not getattr(proc, "do_resize", False):
        raise refuse("does not resize: frames of any size cannot be batched")
    size = proc.size
    short, h, w = _size(size, "shortest_edge"), _size(size, "height"), _size(size, "width")
    if short is not None and _size(size, "longest_edge") is None:
        resize: int | tuple[int, int] = short
    elif h is not None and w is not None:
        resize = (h, w)
    else:
        raise refuse(f"resizes to {size}: only shortest_edge or height/width are taken")
    if getattr(proc, "do_center_crop", False):
        ch, cw = _size(proc.crop_size, "height"), _size(proc.crop_size, "width")
    elif isinstance(resize, tuple):
        ch, cw = resize
    else:
        raise refuse("does not crop after a shortest-edge resize: the input is not square")
    if ch is None or ch != cw:
        raise refuse(f"crops to {proc.crop_size}: only a square input is taken")
    if not proc.do_rescale or abs(float(proc.rescale_factor) - 1 / 255) > 1e-12:
        raise refuse(f"rescales by {proc.rescale_factor}: only 1/255 is taken")
    resample = int(proc.resample) if proc.resample is not None else 2
    if resample not in _RESAMPLE:
        raise refuse(f"resamples with PIL mode {resample}: nearest, bilinear or bicubic only")
    normalise = bool(proc.do_normalize)
    from transformers.image_processing_backends import PilBackend

    return Preprocessing(
        resize_size=resize,
        crop_size=int(ch),
        mean=tuple(float(v) for v in proc.image_mean) if normalise else (0.0, 0.0, 0.0),
        std=tuple(float(v) for v in proc.image_std) if normalise else (1.0, 1.0, 1.0),
        interpolation=_RESAMPLE[resample],
        antialias=True,
        resize_on="PIL" if isinstance(proc, PilBackend) else "tensor",
        crop_offset="floor",
        preset=f"{type(proc).__name__} (preprocessor_config.json)",
    )


def load_hf_image_encoder(info: HFModelInfo) -> ImageEncoder:
    """An ``hf:`` model (one with ``get_image_features``: CLIP, SigLIP, ...) and its image
    processor, read from the folder :func:`resolve_hf_image_model` found."""
    import torch
    from transformers import AutoImageProcessor, AutoModel

    try:
        model = AutoModel.from_pretrained(info.folder, local_files_only=True)
        proc = AutoImageProcessor.from_pretrained(info.folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:  # no weights, no processor config, unknown type
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--image-model {info.name}: cannot load it ({first})") from None
    if not hasattr(model, "get_image_features"):
        raise UsageError(
            f"--image-model {info.name}: {type(model).__name__} has no image embedding "
            "(get_image_features); CLIP-style models have one"
        )
    pre = hf_preprocessing(proc, info.name)
    enc = image_embedding(model.float().eval().requires_grad_(False))
    with torch.inference_mode():  # the dim as the model gives it
        dim = int(enc(torch.zeros(1, 3, pre.crop_size, pre.crop_size)).shape[-1])
    layer = "get_image_features (the projected image embedding, CLIP's image_embeds)"
    return ImageEncoder(info.name, enc, dim, pre, info, layer)
