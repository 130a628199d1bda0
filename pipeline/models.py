"""The networks of ``vpipe features``: ResNet frame encoders and VGGish, weights and inputs.

Weights come from one of three places, decided before any work starts: a published checkpoint
in torch's hub cache (``$TORCH_HOME/hub/checkpoints``, downloaded there on first use when the
machine is online), a state-dict file given by path (recorded with its sha256), or a seeded
random init (``none``, recorded as such). Frame preprocessing is the one the weights define
(torchvision's ``ImageClassification`` preset); it is split so that the uint8 part (decode,
resize, crop) runs in loader workers and the float part (scale, normalise) runs batched next to
the model, with the same numbers as the preset applied one frame at a time.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import UsageError, WeightsUnavailable

IMAGE_MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
# "imagenet" means the classic ImageNet weights (IMAGENET1K_V1, resize 256 / crop 224) for every
# depth, the ones the captioning and tagging work used; V2 (resize 232) is there when asked.
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
AUDIO_DIM = 128


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def _load_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
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


def _assign(model: nn.Module, sd: dict[str, torch.Tensor], path: Path, what: str) -> None:
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


# --------------------------------------------------------------------------- images


@dataclass(frozen=True)
class Preprocessing:
    """The weights' preprocessing: resize shorter side, centre crop, ImageNet normalisation."""

    resize_size: int = 256
    crop_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    antialias: bool = True

    def attrs(self) -> dict[str, Any]:
        return {**asdict(self), "decode": "PIL, RGB", "scale": "1/255"}

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
        im = F.resize(
            im,
            [self.resize_size],
            interpolation=modes(self.interpolation),
            antialias=self.antialias,
        )
        im = F.center_crop(im, [self.crop_size])
        return im if isinstance(im, torch.Tensor) else F.pil_to_tensor(im)

    def normalize(self, batch: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 (N, 3, H, W) → normalised float, batched (same ops as the preset per frame)."""
        x = batch.to(dtype) / 255
        mean = torch.tensor(self.mean, dtype=dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


@dataclass
class ImageEncoder:
    """A ResNet up to its global average pool, with its preprocessing and provenance."""

    name: str
    model: nn.Module
    dim: int
    preprocessing: Preprocessing
    weights: WeightsInfo

    def attrs(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "weights": self.weights.attrs(),
            "layer": "avgpool (global average pool, fc removed)",
            "dim": self.dim,
            "preprocessing": self.preprocessing.attrs(),
        }


def _weights_enum(model_name: str) -> Any:
    from torchvision.models import get_model_weights

    return get_model_weights(model_name)


def resolve_image_weights(model_name: str, weights: str) -> tuple[WeightsInfo, Any]:
    """Find the weights before any work starts; returns their info and the torchvision enum."""
    if model_name not in IMAGE_MODELS:
        raise UsageError(f"--image-model {model_name!r}: choose one of {', '.join(IMAGE_MODELS)}")
    enum = _weights_enum(model_name)
    key = weights.lower()
    if key == "none":
        return WeightsInfo("random", "random", seed=RANDOM_SEED), enum.IMAGENET1K_V1
    if key in IMAGE_WEIGHT_NAMES:
        tag = IMAGE_WEIGHT_NAMES[key]
        if not hasattr(enum, tag):
            raise UsageError(f"--image-weights {weights}: {model_name} has no {tag} weights")
        w = getattr(enum, tag)
        path = hub_checkpoint(
            w.url,
            f"{model_name} {tag}",
            "`--image-weights PATH` (a state-dict file) or `--image-weights none` (random init)",
        )
        return WeightsInfo("hub", f"{enum.__name__}.{tag}", file=path.name, url=w.url), w
    path = Path(weights)
    if not path.is_file():
        raise UsageError(
            f"--image-weights {weights}: neither imagenet, imagenet-v2, none, nor an existing file"
        )
    return WeightsInfo("file", str(path.resolve()), file=path.name, sha256=sha256_of(path)), (
        enum.IMAGENET1K_V1
    )


def load_image_encoder(
    model_name: str, weights: str, resolved: tuple[WeightsInfo, Any] | None = None
) -> ImageEncoder:
    """Build the ResNet with ``fc`` removed and its weights loaded (CPU, eval mode).

    ``resolved``: what :func:`resolve_image_weights` returned, when the caller already ran it.
    """
    import torchvision

    info, w = resolved or resolve_image_weights(model_name, weights)
    if info.kind == "random":
        torch.manual_seed(RANDOM_SEED)
        model = torchvision.models.get_model(model_name, weights=None)
    else:
        with torch.device("meta"):  # no random init of weights about to be replaced
            model = torchvision.models.get_model(model_name, weights=None)
    dim = model.fc.in_features
    model.fc = nn.Identity()  # the features are the global-average-pool output
    if info.kind != "random":
        path = Path(torch.hub.get_dir()) / "checkpoints" / info.file
        path = path if info.kind == "hub" else Path(info.name)
        sd = _load_state_dict(path, model_name)
        _assign(model, {k: v for k, v in sd.items() if not k.startswith("fc.")}, path, model_name)
    fuse_batchnorm(model.eval())
    t = w.transforms()
    pre = Preprocessing(
        resize_size=int(t.resize_size[0]),
        crop_size=int(t.crop_size[0]),
        mean=tuple(float(v) for v in t.mean),
        std=tuple(float(v) for v in t.std),
        interpolation=t.interpolation.value,
        antialias=bool(t.antialias),
    )
    return ImageEncoder(model_name, model, dim, pre, info)


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


# --------------------------------------------------------------------------- precision, device


def cpu_has_bf16() -> bool:
    """True when the CPU runs bf16 matmuls natively (AVX512-BF16 or AMX)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device!r}: use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is available")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {device!r}: use auto, cpu or cuda[:N]")
    return dev


def pick_precision(precision: str, device: torch.device) -> str:
    """fp32, fp16 or bf16. ``auto``: fp16 on CUDA; bf16 on a CPU with native bf16, else fp32.

    Measured on a 2-core AVX512-BF16 CPU: ResNet-50 bf16 autocast ran 2.5x faster than fp32
    (24.8 vs 10.1 frames/s, batch 16), so ``auto`` takes it there; bf16 changes the numbers.
    """
    if precision == "auto":
        if device.type == "cuda":
            return "fp16"
        return "bf16" if cpu_has_bf16() else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise UsageError("--precision fp16 needs a CUDA device; use bf16 or fp32 on a CPU")
    return precision


def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)


# --------------------------------------------------------------------------- audio


@dataclass
class AudioEncoder:
    """VGGish (torchvggish's network) with the optional PCA + 8-bit quantisation of the release."""

    model: nn.Module
    weights: WeightsInfo
    pca: tuple[torch.Tensor, torch.Tensor] | None  # (eigenvectors (128,128), means (128,1))
    pca_info: WeightsInfo | None

    def attrs(self) -> dict[str, Any]:
        from torchvggish import vggish_params as p

        return {
            "model": "vggish",
            "weights": self.weights.attrs(),
            "sample_rate": p.SAMPLE_RATE,
            "window_s": p.EXAMPLE_WINDOW_SECONDS,
            "hop_s": p.EXAMPLE_HOP_SECONDS,
            "postprocess": self.pca_info.attrs() if self.pca is not None else "none",
            "dim": AUDIO_DIM,
            "input": "log-mel 96x64 (25 ms window, 10 ms hop, 125-7500 Hz), mono, resampled",
        }

    def embed(self, examples: torch.Tensor) -> np.ndarray:
        """(N, 1, 96, 64) log-mel examples → (N, 128) float32 embeddings."""
        if examples.shape[0] == 0:
            return np.zeros((0, AUDIO_DIM), np.float32)
        with torch.inference_mode():
            x = self.model(examples)
            if self.pca is not None:
                x = postprocess(x.float(), *self.pca)
        return x.float().cpu().numpy()


def postprocess(emb: torch.Tensor, matrix: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """The AudioSet release's PCA/whitening, clip to [-2, 2], quantise to 0..255 (as floats)."""
    from torchvggish import vggish_params as p

    lo, hi = p.QUANTIZE_MIN_VAL, p.QUANTIZE_MAX_VAL
    x = torch.mm(matrix, emb.t() - means).t()
    return torch.round((torch.clamp(x, lo, hi) - lo) * (255.0 / (hi - lo)))


# How else to provide each audio file, for the offline message.
AUDIO_OPTIONS = {
    "--audio-weights": "`--audio-weights PATH` (a state-dict file) or `--audio-model none`",
    "--audio-pca": "`--audio-pca PATH` (a .pth with pca_eigen_vectors and pca_means) or "
    "`--no-audio-postprocess` (raw 128-d embeddings)",
}


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


def load_audio_encoder(
    weights: str, postprocess_on: bool, pca: str = "release", resolved: tuple | None = None
) -> AudioEncoder:
    """VGGish with its weights (``release``, ``none`` or a file) and optional PCA parameters.

    ``resolved``: what :func:`resolve_audio_weights` returned, when the caller already ran it.
    """
    from torchvggish.torchvggish import VGG, make_layers

    winfo, wpath, pinfo, ppath = resolved or resolve_audio_weights(weights, postprocess_on, pca)
    if wpath is None:
        torch.manual_seed(RANDOM_SEED)
        model = VGG(make_layers(), postprocess=False)  # its own Postprocessor would download
    else:
        with torch.device("meta"):
            model = VGG(make_layers(), postprocess=False)
        _assign(model, _load_state_dict(wpath, "VGGish"), wpath, "VGGish")
    pca_t = None
    if ppath is not None:
        try:
            params = torch.load(ppath, map_location="cpu", weights_only=False)
        except Exception as e:  # a damaged or foreign file: one line, not a traceback
            raise WeightsRefused(
                f"{ppath}: not a readable PCA parameters file ({type(e).__name__}: {e})"
            ) from None
        try:
            pca_t = (
                torch.as_tensor(np.asarray(params["pca_eigen_vectors"])).float(),
                torch.as_tensor(np.asarray(params["pca_means"]).reshape(-1, 1)).float(),
            )
        except (KeyError, TypeError, IndexError, ValueError):
            raise WeightsRefused(
                f"{ppath}: PCA file needs pca_eigen_vectors and pca_means"
            ) from None
        # Checked here: a wrong shape would otherwise fail every clip, one by one.
        dims = (tuple(pca_t[0].shape), tuple(pca_t[1].shape))
        if dims != ((AUDIO_DIM, AUDIO_DIM), (AUDIO_DIM, 1)):
            raise WeightsRefused(
                f"{ppath}: PCA eigenvectors {dims[0]} and means {dims[1][0]}: VGGish needs "
                f"({AUDIO_DIM}, {AUDIO_DIM}) and {AUDIO_DIM}"
            )
    return AudioEncoder(model.eval(), winfo, pca_t, pinfo)


def audio_examples(wav_path: str | os.PathLike) -> tuple[torch.Tensor, np.ndarray]:
    """VGGish input examples of a wav file (as torchvggish builds them) and their start times."""
    import soundfile as sf
    from torchvggish import vggish_input
    from torchvggish import vggish_params as p

    data, sr = sf.read(str(wav_path), dtype="int16", always_2d=False)
    samples = data / 32768.0
    n = samples.shape[0] * p.SAMPLE_RATE / sr  # length at 16 kHz
    # Fewer samples than one 0.96 s example: torchvggish would fail on a negative frame count.
    if (
        n
        < p.EXAMPLE_WINDOW_SECONDS * p.SAMPLE_RATE
        + (p.STFT_WINDOW_LENGTH_SECONDS - p.STFT_HOP_LENGTH_SECONDS) * p.SAMPLE_RATE
    ):
        return torch.zeros((0, 1, p.NUM_FRAMES, p.NUM_BANDS)), np.zeros(0)
    try:
        ex = vggish_input.waveform_to_examples(samples, sr, return_tensor=False)
    except ValueError:  # resampling left it just under one example
        return torch.zeros((0, 1, p.NUM_FRAMES, p.NUM_BANDS)), np.zeros(0)
    ex = torch.from_numpy(np.ascontiguousarray(ex, dtype=np.float32))[:, None]
    return ex, np.arange(ex.shape[0]) * p.EXAMPLE_HOP_SECONDS
