"""The frame encoders of ``vpipe features``, with their preprocessing.

A ResNet runs up to its global average pool with BatchNorm folded into the convs; any other
torchvision classification model (ViT, ConvNeXt, EfficientNet, RegNet, MobileNet, ...) runs up
to the input of its classifier's last Linear; an ``hf:`` model (CLIP and kin) gives its
projected image embedding. Frame preprocessing is the one the weights define (torchvision's
``ImageClassification`` preset, or the Hugging Face image processor's config), split so that
the uint8 part (decode, resize, crop) runs in loader workers and the float part (scale,
normalise) runs batched next to the model, with the same numbers as the preset applied one
frame at a time. Where the weights come from is :mod:`.weights`.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from pipeline.errors import UsageError
from pipeline.features.hf import HFModelInfo
from pipeline.features.weights import (
    HF_PREFIX,
    RANDOM_SEED,
    RESNETS,
    WeightsInfo,
    assign_state_dict,
    hub_path,
    load_state_dict,
    resolve_image_weights,
)


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

    def normalize(self, batch: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 (N, 3, H, W) → normalised float, batched (same ops as the preset per frame)."""
        x = batch.to(dtype) / 255
        mean = torch.tensor(self.mean, dtype=dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


RESNET_LAYER = "avgpool (global average pool, fc removed)"
# Where a torchvision classifier sits: its last nn.Linear under one of these is removed.
HEADS = ("fc", "heads", "head", "classifier")
# GoogLeNet's and Inception-v3's auxiliary classifiers: training only, dropped with the head.
AUX_PREFIXES = ("aux1.", "aux2.", "AuxLogits.")


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


def load_image_encoder(
    model_name: str, weights: str, resolved: tuple[Any, Any] | None = None
) -> ImageEncoder:
    """Build the frame encoder with its weights loaded (CPU, eval mode): a ResNet with ``fc``
    removed, another torchvision model without its classifier's last Linear, or an ``hf:``
    model's image embedding.

    ``resolved``: what :func:`resolve_image_weights` returned, when the caller already ran it.
    """
    info, w = resolved or resolve_image_weights(model_name, weights)
    if model_name.startswith(HF_PREFIX):
        return load_hf_image_encoder(info)
    if model_name not in RESNETS:
        return load_torchvision_encoder(model_name, info, w)
    import torchvision

    if info.kind == "random":
        torch.manual_seed(RANDOM_SEED)
        model = torchvision.models.get_model(model_name, weights=None)
    else:
        with torch.device("meta"):  # no random init of weights about to be replaced
            model = torchvision.models.get_model(model_name, weights=None)
    dim = model.fc.in_features
    model.fc = nn.Identity()  # the features are the global-average-pool output
    if info.kind != "random":
        path = hub_path(info)
        sd = load_state_dict(path, model_name)
        sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
        assign_state_dict(model, sd, path, model_name)
    fuse_batchnorm(model.eval())
    return ImageEncoder(model_name, model, dim, preset_preprocessing(w), info)


def preset_preprocessing(w: Any, preset: str = "") -> Preprocessing:
    """The numbers of a torchvision weights' ``transforms()`` preset."""
    t = w.transforms()
    return Preprocessing(
        resize_size=int(t.resize_size[0]),
        crop_size=int(t.crop_size[0]),
        mean=tuple(float(v) for v in t.mean),
        std=tuple(float(v) for v in t.std),
        interpolation=t.interpolation.value,
        antialias=bool(t.antialias),
        preset=preset,
    )


def arch_kwargs(model_name: str, w: Any) -> dict[str, Any]:
    """What torchvision's builders set from the weights they are given, so that a weights file
    or a random init gets the network the published weights were trained as."""
    if model_name.startswith("vit_"):
        return {"image_size": int(w.meta["min_size"][0])}  # 384 for the SWAG E2E weights
    if model_name == "maxvit_t":
        return {"input_size": tuple(w.meta["min_size"])}
    if model_name in ("googlenet", "inception_v3"):
        return {"transform_input": True, "aux_logits": False, "init_weights": False}
    return {}


def classifier_linear(model: nn.Module) -> str | None:
    """The name of the classifier's last Linear (``fc``, ``heads.head``, ``classifier.1``...)."""
    last = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name.split(".")[0] in HEADS:
            last = name
    return last


def load_torchvision_encoder(model_name: str, info: WeightsInfo, w: Any) -> ImageEncoder:
    """A torchvision classification model with its classifier's last Linear replaced by
    Identity: the features are that Linear's input (dropout before it is a no-op in eval)."""
    import torchvision

    kwargs = arch_kwargs(model_name, w)
    model = None
    if info.kind == "random":
        torch.manual_seed(RANDOM_SEED)
    else:
        try:
            with torch.device("meta"):  # no random init of weights about to be replaced
                model = torchvision.models.get_model(model_name, weights=None, **kwargs)
        except NotImplementedError:  # RegNets compute their widths with tensors: built on CPU
            model = None
    if model is None:
        model = torchvision.models.get_model(model_name, weights=None, **kwargs)
    head = classifier_linear(model)
    if head is None:
        raise UsageError(f"--image-model {model_name}: its classifier has no Linear layer")
    dim = int(model.get_submodule(head).in_features)
    model.set_submodule(head, nn.Identity())
    if info.kind != "random":
        path = hub_path(info)
        sd = load_state_dict(path, model_name)
        sd = {k: v for k, v in sd.items()
              if not k.startswith((f"{head}.", *AUX_PREFIXES))}
        assign_state_dict(model, sd, path, model_name)
    model.eval()
    if isinstance(model, torchvision.models.ResNet):  # ResNeXt, wide ResNets: same blocks
        fuse_batchnorm(model)
    layer = f"input of {head} (the classifier's last Linear, removed)"
    preset = f"{type(w).__name__}.{w.name}.transforms()"
    return ImageEncoder(model_name, model, dim, preset_preprocessing(w, preset), info, layer)


class ImageEmbedding(nn.Module):
    """A Hugging Face model's projected image embedding (``get_image_features``: CLIP's
    ``image_embeds``) as a module from normalised pixels to rows."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model.get_image_features(pixel_values=x)
        # transformers 5 returns the output object, the projection in pooler_output; 4 a tensor
        return out if isinstance(out, torch.Tensor) else out.pooler_output


def _size(size: Any, key: str) -> int | None:
    v = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(v) if v is not None else None


# PIL's resampling numbers (what preprocessor_config.json holds) -> torchvision's names.
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def hf_preprocessing(proc: Any, name: str) -> Preprocessing:
    """The numbers of a Hugging Face image processor: shortest-side (or height x width)
    resize with its resample, centre crop, 1/255 and its mean/std. UsageError for a config
    this split cannot reproduce (another rescale, a non-square input, an odd resample)."""
    def refuse(why: str) -> UsageError:
        return UsageError(f"--image-model {name}: {type(proc).__name__} {why}")

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
    processor, read from the folder :func:`resolve_image_weights` found."""
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
    enc = ImageEmbedding(model.float().eval().requires_grad_(False))
    with torch.inference_mode():  # the dim as the model gives it
        dim = int(enc(torch.zeros(1, 3, pre.crop_size, pre.crop_size)).shape[-1])
    layer = "get_image_features (the projected image embedding, CLIP's image_embeds)"
    return ImageEncoder(info.name, enc, dim, pre, info, layer)


def fuse_batchnorm(model: nn.Module) -> nn.Module:
    """Fold each eval-mode BatchNorm into the conv before it (same maths, one pass less).

    On a 2-core CPU this is the difference between memory-bound BN/ReLU passes over every
    activation and none; results agree with the unfused model to ~1e-7 relative.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    pairs = [(model, "conv1", "bn1")]
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            pairs += [(block, f"conv{i}", f"bn{i}") for i in (1, 2, 3) if hasattr(block, f"bn{i}")]
            if block.downsample is not None:
                pairs.append((block.downsample, "0", "1"))
    for parent, conv, bn in pairs:
        setattr(parent, conv, fuse_conv_bn_eval(getattr(parent, conv), getattr(parent, bn)))
        setattr(parent, bn, nn.Identity())
    return model
