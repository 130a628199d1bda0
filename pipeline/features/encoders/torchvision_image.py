"""The torchvision image encoders: a ResNet runs up to its global average pool with BatchNorm
folded into the convs; any other torchvision classification model (ViT, ConvNeXt,
EfficientNet, RegNet, MobileNet, ...) runs up to the input of its classifier's last Linear.
Their weights are a registered torchvision checkpoint from the torch hub cache, a state-dict
file or a seeded random init (:mod:`..weights`); their preprocessing is the numbers of the
weights' ``ImageClassification`` preset, split as :class:`.image.Preprocessing` says.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # torch where a model runs: the CLI reads the families' options
    from torch import nn

from pipeline.errors import UsageError
from pipeline.features.encoders.hf_image import HF_PREFIX
from pipeline.features.encoders.image import ImageEncoder, Preprocessing
from pipeline.features.encoders.registry import Encoder, register_encoder
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

# The ResNets keep their own path (BatchNorm folded, "imagenet" = V1); every other torchvision
# classification model is taken by name with its registered weights.
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
# "imagenet" means the classic ImageNet weights (IMAGENET1K_V1, resize 256 / crop 224) for every
# ResNet depth, the ones the captioning and tagging work used; V2 (resize 232) is there when
# asked. For the other models "imagenet" is the model's DEFAULT registered weights.
IMAGE_WEIGHT_NAMES = {
    "imagenet": "IMAGENET1K_V1",
    "imagenet-v1": "IMAGENET1K_V1",
    "imagenet-v2": "IMAGENET1K_V2",
}
# Where a torchvision classifier sits: its last nn.Linear under one of these is removed.
HEADS = ("fc", "heads", "head", "classifier")
# GoogLeNet's and Inception-v3's auxiliary classifiers: training only, dropped with the head.
AUX_PREFIXES = ("aux1.", "aux2.", "AuxLogits.")


@register_encoder
class TorchvisionImage(Encoder):
    """``--image-model NAME``: a torchvision classification model; ``--image-weights``."""

    modality: ClassVar[str] = "image"
    label: ClassVar[str] = "a torchvision classification model"

    @classmethod
    def claims(cls, name: str) -> bool:
        return not name.startswith(HF_PREFIX)  # those are the Hugging Face family's

    @classmethod
    def check(cls, name: str, opts: Any) -> None:
        check_image_model(name)

    @classmethod
    def resolve(cls, name: str, opts: Any, missing: list) -> Any:
        try:
            return resolve_torchvision_weights(name, opts.image_weights)
        except MissingWeights as e:
            missing.append(e)
            return None

    @classmethod
    def identity(cls, resolved: Any, encoder: Any = None) -> dict[str, Any]:
        return {"image_weights": resolved[0].identity()}

    @classmethod
    def load(cls, name: str, opts: Any, resolved: Any) -> ImageEncoder:
        return load_torchvision_image(name, *resolved)


# --------------------------------------------------------------------------- weights


def torchvision_models() -> list[str]:
    """The torchvision image classification models, by name (resnet18, vit_b_16, ...)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))



def check_image_model(model_name: str) -> None:
    """UsageError for an --image-model that is not a torchvision classification model: one
    line, with the nearest names and a few valid ones (``hf:NAME`` among them)."""
    names = torchvision_models()
    if model_name.startswith("squeezenet"):  # its classifier is a conv: no Linear to remove
        raise UsageError(
            f"--image-model {model_name!r}: SqueezeNet ends in a conv classifier, not a "
            "Linear, so it has no feature layer to take; e.g. mobilenet_v3_small is as small"
        )
    if model_name in names:
        return
    import torchvision

    if model_name in torchvision.models.list_models(module=torchvision.models.video):
        raise UsageError(
            f"--image-model {model_name!r}: a video classifier (it takes windows of frames, "
            f"not one frame): give it as --video-model {model_name} (with --from-video)"
        )
    import difflib

    near = difflib.get_close_matches(model_name, names, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(near)}? " if near else ""
    raise UsageError(
        f"--image-model {model_name!r}: not a torchvision classification model; {hint}"
        f"e.g. resnet50, vit_b_16, convnext_tiny, efficientnet_b0, mobilenet_v3_small "
        f"({len(names)} in all: torchvision.models.list_models()), or "
        "hf:openai/clip-vit-base-patch32 (a Hugging Face image encoder)"
    )




def _weights_enum(model_name: str) -> Any:
    from torchvision.models import get_model_weights

    return get_model_weights(model_name)


def preset_weights(model_name: str, enum: Any) -> Any:
    """The registered weights whose architecture and preprocessing a weights file or a random
    init gets: IMAGENET1K_V1 for the ResNets (as before), the DEFAULT ones for the rest."""
    return enum.IMAGENET1K_V1 if model_name in RESNETS else enum.DEFAULT


def _weights_tag(model_name: str, enum: Any, weights: str) -> str | None:
    """The registered weights' name ``weights`` asks for (imagenet, imagenet-v2, or an enum
    member such as IMAGENET1K_SWAG_E2E_V1), or None when it names none."""
    key = weights.lower()
    if key == "imagenet" and model_name not in RESNETS:
        return enum.DEFAULT.name  # DEFAULT is an alias: record the member it stands for
    if key in IMAGE_WEIGHT_NAMES:
        return IMAGE_WEIGHT_NAMES[key]
    member = enum.__members__.get(weights.upper())
    return member.name if member is not None else None

def resolve_torchvision_weights(model_name: str, weights: str) -> tuple[Any, Any]:
    """Find the weights before any work starts; returns their info and the torchvision enum
    member whose architecture and preprocessing they get."""
    enum = _weights_enum(model_name)
    if weights.lower() == "none":
        return WeightsInfo("random", "random", seed=RANDOM_SEED), preset_weights(model_name, enum)
    tag = _weights_tag(model_name, enum, weights)
    if tag is not None:
        if tag not in enum.__members__:
            raise UsageError(f"--image-weights {weights}: {model_name} has no {tag} weights")
        w = enum[tag]
        path = hub_checkpoint(
            w.url,
            f"{model_name} {tag}",
            "`--image-weights PATH` (a state-dict file) or `--image-weights none` (random init)",
        )
        return WeightsInfo("hub", f"{enum.__name__}.{tag}", file=path.name, url=w.url), w
    path = Path(weights)
    if not path.is_file():
        named = ", ".join(m for m in enum.__members__ if m != "DEFAULT")
        raise UsageError(
            f"--image-weights {weights}: neither imagenet, imagenet-v2, none, one of "
            f"{model_name}'s weights ({named}), nor an existing file"
        )
    return WeightsInfo("file", str(path.resolve()), file=path.name, sha256=sha256_of(path)), (
        preset_weights(model_name, enum)
    )


# --------------------------------------------------------------------------- networks


def load_torchvision_image(model_name: str, info: WeightsInfo, w: Any) -> ImageEncoder:
    """Build the frame encoder with its weights loaded (CPU, eval mode): a ResNet with ``fc``
    removed, another torchvision model without its classifier's last Linear."""
    import torch
    from torch import nn

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
    from torch import nn

    last = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name.split(".")[0] in HEADS:
            last = name
    return last


def load_torchvision_encoder(model_name: str, info: WeightsInfo, w: Any) -> ImageEncoder:
    """A torchvision classification model with its classifier's last Linear replaced by
    Identity: the features are that Linear's input (dropout before it is a no-op in eval)."""
    import torch
    import torchvision
    from torch import nn

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


def fuse_batchnorm(model: nn.Module) -> nn.Module:
    """Fold each eval-mode BatchNorm into the conv before it (same maths, one pass less).

    On a 2-core CPU this is the difference between memory-bound BN/ReLU passes over every
    activation and none; results agree with the unfused model to ~1e-7 relative.
    """
    from torch import nn
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
