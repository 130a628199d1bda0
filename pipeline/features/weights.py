"""Where the encoders' weights come from, decided before any work starts.

One of three places: a published checkpoint in torch's hub cache (``$TORCH_HOME/hub/checkpoints``,
downloaded there on first use when the machine is online), a state-dict file given by path
(recorded with its sha256), or a seeded random init (``none``, recorded as such). Every file is
looked for first, so one error names all the missing ones with how to provide each.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import UsageError, WeightsUnavailable
from pipeline.files import sha256_of

# The ResNets keep their own path (BatchNorm folded, "imagenet" = V1); every other torchvision
# classification model is taken by name with its registered weights; "hf:NAME" is a Hugging
# Face image encoder (CLIP and kin).
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
HF_PREFIX = "hf:"
# "imagenet" means the classic ImageNet weights (IMAGENET1K_V1, resize 256 / crop 224) for every
# ResNet depth, the ones the captioning and tagging work used; V2 (resize 232) is there when
# asked. For the other models "imagenet" is the model's DEFAULT registered weights.
IMAGE_WEIGHT_NAMES = {
    "imagenet": "IMAGENET1K_V1",
    "imagenet-v1": "IMAGENET1K_V1",
    "imagenet-v2": "IMAGENET1K_V2",
}
RANDOM_SEED = 0  # `none` weights: seeded, so a resumed run equals an uninterrupted one

VGGISH_URL = "https://github.com/harritaylor/torchvggish/releases/download/v0.1/vggish-10086976.pth"
VGGISH_PCA_URL = (
    "https://github.com/harritaylor/torchvggish/releases/download/v0.1/"
    "vggish_pca_params-970ea276.pth"
)
# How else to provide each audio file, for the offline message.
AUDIO_OPTIONS = {
    "--audio-weights": "`--audio-weights PATH` (a state-dict file) or `--audio-model none`",
    "--audio-pca": "`--audio-pca PATH` (a .pth with pca_eigen_vectors and pca_means) or "
    "`--no-audio-postprocess` (raw 128-d embeddings)",
}


@dataclass(frozen=True)
class WeightsInfo:
    """Where weights came from, as recorded in the shard attributes and vpipe.json."""

    kind: str  # "hub", "file" or "random"
    name: str  # the published name, the file path, or "random"
    file: str | None = None
    sha256: str | None = None
    url: str | None = None
    seed: int | None = None

    def attrs(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def identity(self) -> dict[str, Any]:
        """As a resume key: a file by its content, so moving it does not block a resume."""
        return {k: v for k, v in self.attrs().items() if not (self.kind == "file" and k == "name")}


class WeightsRefused(WeightsUnavailable):
    """A weights file given that cannot be used (unreadable, another network): a usage error
    (exit 2), nothing done. Weights merely missing offline stay exit 1, as the stage contract
    says; `vpipe run` stops on either, since the stage made no output."""

    exit_code = 2


class MissingWeights(WeightsUnavailable):
    """A published checkpoint neither in the hub cache nor downloadable, with how to provide it.

    The stage resolves every file first and reports all the missing ones in one error
    (:func:`missing_error`), so an offline user learns them in one run, not one per run.
    """

    def __init__(self, what: str, url: str, path: Path, options: str, reason: str) -> None:
        self.what, self.url, self.path, self.options, self.reason = what, url, path, options, reason
        super().__init__(
            f"{what} weights are not in the cache ({path}) and could not be downloaded "
            f"({reason}). Give {options}, or put {url} at {path} (the torch hub cache: "
            f"$TORCH_HOME/hub/checkpoints/{path.name}, TORCH_HOME defaulting to ~/.cache/torch)"
        )

    def item(self) -> str:
        return (
            f"{self.what} weights ({self.path.name}): download {self.url} into that folder, "
            f"or give {self.options}"
        )


def missing_error(missing: list[MissingWeights]) -> WeightsUnavailable:
    """One error for every missing checkpoint (the single one as it is)."""
    if len(missing) == 1:
        return missing[0]
    first = missing[0]
    lines = [
        f"{len(missing)} weight files are not in the torch hub cache ({first.path.parent}: "
        "$TORCH_HOME/hub/checkpoints, TORCH_HOME defaulting to ~/.cache/torch) and could not be "
        f"downloaded ({first.reason}). For each:",
        *(f"  - {m.item()}" for m in missing),
    ]
    return WeightsUnavailable("\n".join(lines))


def hub_checkpoint(url: str, what: str, options: str) -> Path:
    """The cached file of a published checkpoint, downloaded if missing; else MissingWeights.

    ``options`` says how else to provide it, e.g. "`--image-weights PATH` (a state-dict file)".
    """
    from torch.hub import download_url_to_file, get_dir

    path = Path(get_dir()) / "checkpoints" / os.path.basename(url)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        download_url_to_file(url, str(tmp), progress=False)
        os.replace(tmp, path)
    except Exception as e:  # offline, proxy, HTTP error: all mean the same to the user
        raise MissingWeights(what, url, path, options, f"{type(e).__name__}: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def hub_path(info: WeightsInfo) -> Path:
    """The file a resolved ``hub`` or ``file`` WeightsInfo names."""
    if info.kind == "hub":
        return Path(torch.hub.get_dir()) / "checkpoints" / str(info.file)
    return Path(info.name)


def load_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A state dict from a file (a training checkpoint's ``state_dict``/``model`` unwrapped)."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsRefused(
            f"{path}: not a readable {what} state dict ({type(e).__name__}: {e})"
        ) from None
    for key in ("state_dict", "model"):  # training checkpoints often wrap the state dict
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise WeightsRefused(f"{path}: not a {what} state dict")
    return sd


def assign_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """Load a state dict into a model built on the meta device (every tensor must be there)."""
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise WeightsRefused(f"{path}: does not fit {what} ({_mismatch(model, sd, e)})") from None
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta:  # a tensor the file lacks although strict loading passed
            raise WeightsRefused(f"{path}: does not fit {what} (no {name})")
    model.float()  # half-precision files: the stage decides precision itself


def _mismatch(model: nn.Module, sd: dict, e: RuntimeError) -> str:
    """What differs, in one line: torch's own message is a header line and then every key."""
    want = set(model.state_dict())
    missing = [k for k in model.state_dict() if k not in sd]
    extra = [k for k in sd if k not in want]
    if missing or extra:
        parts = [f"{len(v)} {what} keys, e.g. {v[0]!r}"
                 for what, v in (("missing", missing), ("unexpected", extra)) if v]
        if extra and all(str(k).startswith("module.") for k in sd):
            parts.append("its keys start with 'module.' (saved from a DataParallel wrapper)")
        return "; ".join(parts)
    lines = [x.strip() for x in str(e).splitlines()[1:] if x.strip()]
    return lines[0] if lines else str(e).splitlines()[0]


# --------------------------------------------------------------------------- resolving


def torchvision_models() -> list[str]:
    """The torchvision image classification models, by name (resnet18, vit_b_16, ...)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def check_image_model(model_name: str) -> None:
    """UsageError for an --image-model that is neither a torchvision classification model nor
    ``hf:NAME``: one line, with the nearest names and a few valid ones."""
    if model_name.startswith(HF_PREFIX):
        if not model_name[len(HF_PREFIX):].strip():
            raise UsageError(f"--image-model {model_name!r}: give hf:ORG/NAME or hf:DIR")
        return
    names = torchvision_models()
    if model_name.startswith("squeezenet"):  # its classifier is a conv: no Linear to remove
        raise UsageError(
            f"--image-model {model_name!r}: SqueezeNet ends in a conv classifier, not a "
            "Linear, so it has no feature layer to take; e.g. mobilenet_v3_small is as small"
        )
    if model_name in names:
        return
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


def resolve_image_weights(model_name: str, weights: str) -> tuple[Any, Any]:
    """Find the weights before any work starts; returns their info and the torchvision enum
    member (for ``hf:`` models the model's :class:`HFModelInfo` and None)."""
    check_image_model(model_name)
    if model_name.startswith(HF_PREFIX):
        return resolve_hf_image_model(model_name, weights), None
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


def resolve_hf_image_model(model_name: str, weights: str) -> Any:
    """An ``hf:`` image encoder's files (its weights come with it: --image-weights stays at
    its default)."""
    from pipeline.features.hf import resolve_hf_model

    if weights.lower() != "imagenet":
        raise UsageError(
            f"--image-weights {weights}: {model_name} brings its own weights; leave "
            "--image-weights out (use hf:DIR for a folder saved with save_pretrained)"
        )
    return resolve_hf_model(
        model_name[len(HF_PREFIX):], "--image-model", "image model",
        "preprocessor_config.json included", prefix=HF_PREFIX,
    )


def _file_or_hub(value: str, url: str, what: str, option: str) -> tuple[WeightsInfo, Path]:
    if value == "release":
        path = hub_checkpoint(url, what, AUDIO_OPTIONS[option])
        return WeightsInfo(
            "hub", f"torchvggish {os.path.basename(url)}", file=path.name, url=url
        ), path
    path = Path(value)
    if not path.is_file():
        choices = "release, none," if option == "--audio-weights" else "release"
        raise UsageError(f"{option} {value}: neither {choices} nor an existing file")
    return WeightsInfo("file", str(path.resolve()), file=path.name, sha256=sha256_of(path)), path


def check_audio_options(weights: str, postprocess_on: bool, pca: str) -> None:
    """Refuse random VGGish weights with the release PCA (a UsageError, before any lookup)."""
    if weights == "none" and postprocess_on and pca == "release":
        raise UsageError(
            "--audio-weights none with the release PCA (--audio-postprocess) is meaningless: "
            "the PCA was fitted to the trained VGGish. Add --no-audio-postprocess "
            "(or give --audio-pca PATH)"
        )


def resolve_audio_weights(
    weights: str, postprocess_on: bool, pca: str, missing: list[MissingWeights] | None = None
) -> tuple:
    """Find VGGish weights and PCA parameters before any work starts.

    Every missing published file is looked for before failing: appended to ``missing`` when
    given (the caller reports them with others), else raised together. Random weights with the
    release PCA are refused: the PCA was fitted to the trained network's embeddings, so it
    would only scramble random ones (use --no-audio-postprocess, or give --audio-pca PATH).
    """
    check_audio_options(weights, postprocess_on, pca)
    own: list[MissingWeights] = []
    winfo = wpath = pinfo = ppath = None
    if weights == "none":
        winfo = WeightsInfo("random", "random", seed=RANDOM_SEED)
    else:
        try:
            winfo, wpath = _file_or_hub(weights, VGGISH_URL, "VGGish", "--audio-weights")
        except MissingWeights as e:
            own.append(e)
    if postprocess_on:
        try:
            pinfo, ppath = _file_or_hub(pca, VGGISH_PCA_URL, "VGGish PCA", "--audio-pca")
        except MissingWeights as e:
            own.append(e)
    if missing is not None:
        missing.extend(own)
    elif own:
        raise missing_error(own)
    return winfo, wpath, pinfo, ppath


def resolve_weights(
    image_model: str,
    image_weights: str,
    audio: tuple[str, bool, str] | None,
) -> tuple[tuple[WeightsInfo, Any] | None, tuple | None]:
    """Resolve the image and (``audio``: weights, postprocess, pca) audio files together, so
    that one error names every missing file with how to provide it."""
    if audio:
        check_audio_options(*audio)  # a usage error comes before any download attempt
    missing: list[MissingWeights] = []
    image = None
    try:
        image = resolve_image_weights(image_model, image_weights)
    except MissingWeights as e:
        missing.append(e)
    resolved_audio = resolve_audio_weights(*audio, missing=missing) if audio else None
    if missing:
        raise missing_error(missing)
    return image, resolved_audio
