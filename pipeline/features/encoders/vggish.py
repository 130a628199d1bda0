"""VGGish (``--audio-model vggish``): torchvggish's network with the AudioSet release's PCA and
8-bit quantisation when asked (``--audio-postprocess``, ``--audio-pca``), its options, where
its weights come from (the release's files in the torch hub cache, state-dict files, or a
seeded random init), what it records, and its input: log-mel examples of 16 kHz mono PCM as
torchvggish builds them (:class:`VggishInput`, in the loader workers; one function for wavs and
decoded audio). ``--audio-model none`` (:class:`NoAudio`) is registered here too: the
parameters a run without audio records are the keys VGGish's runs record, set to None.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:  # torch where the network runs: the CLI reads this module's options
    import torch
    from torch import nn

from pipeline.errors import MediaError, UsageError
from pipeline.features.encoders.registry import Encoder, EncoderOption, register_encoder
from pipeline.features.weights import (
    RANDOM_SEED,
    MissingWeights,
    WeightsInfo,
    WeightsRefused,
    assign_state_dict,
    hub_checkpoint,
    load_state_dict,
    missing_error,
)
from pipeline.files import sha256_of

AUDIO_DIM = 128
VGGISH_URL = "https://github.com/harritaylor/torchvggish/releases/download/v0.1/vggish-10086976.pth"
VGGISH_PCA_URL = (
    "https://github.com/harritaylor/torchvggish/releases/download/v0.1/"
    "vggish_pca_params-970ea276.pth"
)
# How else to provide each audio file, for the offline message.
AUDIO_OPTIONS = {
    "--audio-weights": "`--audio-weights PATH` (a state-dict file), `--audio-weights none` "
    "(seeded random weights, with `--no-audio-postprocess`) or `--audio-model none` (no audio)",
    "--audio-pca": "`--audio-pca PATH` (a .pth with pca_eigen_vectors and pca_means) or "
    "`--no-audio-postprocess` (raw 128-d embeddings)",
}


@register_encoder
class VGGish(Encoder):
    """``--audio-model vggish``, with ``--audio-weights``, ``--audio-postprocess`` and
    ``--audio-pca``."""

    modality: ClassVar[str] = "audio"
    label: ClassVar[str] = "vggish"
    options: ClassVar[tuple[EncoderOption, ...]] = (
        EncoderOption(
            "audio_postprocess", True, "--audio-postprocess/--no-audio-postprocess",
            "VGGish: apply the AudioSet release's PCA + 8-bit quantisation to the embeddings "
            "(--no-audio-postprocess: raw 128-d embeddings, no PCA file needed).",
            recorded=True,
        ),
        # Recorded as the file it resolves to (identity()'s audio_pca), not as given.
        EncoderOption("audio_pca", "release", "--audio-pca",
                      "VGGish's PCA parameters: release (hub cache) or a .pth file."),
    )

    @classmethod
    def claims(cls, name: str) -> bool:
        return name == "vggish"

    @classmethod
    def check(cls, name: str, opts: Any) -> None:
        check_audio_options(opts.audio_weights, opts.audio_postprocess, opts.audio_pca)

    @classmethod
    def resolve(cls, name: str, opts: Any, missing: list) -> Any:
        return resolve_audio_weights(
            opts.audio_weights, opts.audio_postprocess, opts.audio_pca, missing
        )

    @classmethod
    def identity(cls, resolved: Any, encoder: Any = None) -> dict[str, Any]:
        winfo, _, pinfo, _ = resolved
        return {"audio_weights": winfo.identity(),
                "audio_pca": pinfo.identity() if pinfo is not None else None}

    @classmethod
    def load(cls, name: str, opts: Any, resolved: Any) -> AudioEncoder:
        return load_audio_encoder(
            opts.audio_weights, opts.audio_postprocess, opts.audio_pca, resolved
        )


@register_encoder
class NoAudio(Encoder):
    """``--audio-model none``: no audio rows (the /audio group is there, of dim 0)."""

    modality: ClassVar[str] = "audio"
    label: ClassVar[str] = "none"

    @classmethod
    def claims(cls, name: str) -> bool:
        return name == "none"

    @classmethod
    def resolve(cls, name: str, opts: Any, missing: list) -> Any:
        return None

    @classmethod
    def identity(cls, resolved: Any, encoder: Any = None) -> dict[str, Any]:
        # As runs without audio have always recorded them, so their folders still resume.
        return {"audio_weights": None, "audio_pca": None}

    @classmethod
    def load(cls, name: str, opts: Any, resolved: Any) -> None:
        return None


# --------------------------------------------------------------------------- the network


@dataclass
class AudioEncoder:
    """VGGish (torchvggish's network) with the optional PCA + 8-bit quantisation of the release."""

    model: nn.Module
    weights: WeightsInfo
    pca: tuple[torch.Tensor, torch.Tensor] | None  # (eigenvectors (128,128), means (128,1))
    pca_info: WeightsInfo | None
    dim: int = AUDIO_DIM

    @property
    def input(self) -> VggishInput:
        """The loader workers' part: PCM to log-mel examples (picklable, no model)."""
        return VggishInput()

    def to(self, device: torch.device) -> AudioEncoder:
        """The network and the PCA parameters on ``device``."""
        self.model.to(device)
        self.pca = self.pca and (self.pca[0].to(device), self.pca[1].to(device))
        return self

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
        import torch

        if examples.shape[0] == 0:
            return np.zeros((0, AUDIO_DIM), np.float32)
        with torch.inference_mode():
            x = self.model(examples)
            if self.pca is not None:
                # In fp32 whatever the run's precision: under fp16 autocast the PCA's matmul
                # moved about 0.8% of the quantised values by one step.
                with torch.autocast(x.device.type, enabled=False):
                    x = postprocess(x.float(), *self.pca)
        return x.float().cpu().numpy()



def postprocess(emb: torch.Tensor, matrix: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """The AudioSet release's PCA/whitening, clip to [-2, 2], quantise to 0..255 (as floats)."""
    import torch
    from torchvggish import vggish_params as p

    lo, hi = p.QUANTIZE_MIN_VAL, p.QUANTIZE_MAX_VAL
    x = torch.mm(matrix, emb.t() - means).t()
    return torch.round((torch.clamp(x, lo, hi) - lo) * (255.0 / (hi - lo)))


def load_audio_encoder(
    weights: str, postprocess_on: bool, pca: str = "release", resolved: tuple | None = None
) -> AudioEncoder:
    """VGGish with its weights (``release``, ``none`` or a file) and optional PCA parameters.

    ``resolved``: what :func:`resolve_audio_weights` returned, when the caller already ran it.
    """
    import torch
    from torchvggish.torchvggish import VGG, make_layers

    winfo, wpath, pinfo, ppath = resolved or resolve_audio_weights(weights, postprocess_on, pca)
    if wpath is None:
        torch.manual_seed(RANDOM_SEED)
        model = VGG(make_layers(), postprocess=False)  # its own Postprocessor would download
    else:
        with torch.device("meta"):
            model = VGG(make_layers(), postprocess=False)
        assign_state_dict(model, load_state_dict(wpath, "VGGish"), wpath, "VGGish")
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


# --------------------------------------------------------------------------- its input


@dataclass(frozen=True)
class VggishInput:
    """What the loader workers make of a clip's audio for VGGish (sent to them, picklable)."""

    rate_hz: int = 16000  # the decoder resamples to it, as extract-frames does

    def from_pcm(self, pcm: np.ndarray, rate_hz: int) -> tuple[torch.Tensor, np.ndarray]:
        return audio_examples(pcm, rate_hz)

    def from_wav(self, wav_path: str | os.PathLike, n_samples: int | None = None,
                 sample_rate_hz: int | None = None) -> tuple[torch.Tensor, np.ndarray]:
        return wav_examples(wav_path, n_samples, sample_rate_hz)


def audio_examples(pcm: np.ndarray, rate_hz: int) -> tuple[torch.Tensor, np.ndarray]:
    """VGGish input examples of int16 mono samples (as torchvggish builds them from a wav) and
    their start times; none for less than one 0.96 s example."""
    import torch
    from torchvggish import vggish_input
    from torchvggish import vggish_params as p

    empty = torch.zeros((0, 1, p.NUM_FRAMES, p.NUM_BANDS)), np.zeros(0)
    samples = pcm / 32768.0
    n = samples.shape[0] * p.SAMPLE_RATE / rate_hz  # length at 16 kHz
    # Fewer samples than one example: torchvggish would fail on a negative frame count.
    short = (
        p.EXAMPLE_WINDOW_SECONDS * p.SAMPLE_RATE
        + (p.STFT_WINDOW_LENGTH_SECONDS - p.STFT_HOP_LENGTH_SECONDS) * p.SAMPLE_RATE
    )
    if n < short:
        return empty
    try:
        ex = vggish_input.waveform_to_examples(samples, rate_hz, return_tensor=False)
    except ValueError:  # resampling left it just under one example
        return empty
    ex = torch.from_numpy(np.ascontiguousarray(ex, dtype=np.float32))[:, None]
    return ex, np.arange(ex.shape[0]) * p.EXAMPLE_HOP_SECONDS


def wav_examples(wav_path: str | os.PathLike, n_samples: int | None = None,
                 sample_rate_hz: int | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """:func:`audio_examples` of a wav file's samples, checked by :func:`read_wav`."""
    return audio_examples(*read_wav(wav_path, n_samples, sample_rate_hz))


def read_wav(wav_path: str | os.PathLike, n_samples: int | None = None,
             sample_rate_hz: int | None = None) -> tuple[np.ndarray, int]:
    """A wav's int16 samples and rate. A wav that cannot be read, or that does not hold the
    ``n_samples`` at ``sample_rate_hz`` its extract-frames record says (None: not checked), is
    a MediaError naming the file and the cause: read as it was, a truncated wav gave fewer
    VGGish examples or none, and its clip passed as ok."""
    import soundfile as sf

    try:
        data, rate = sf.read(str(wav_path), dtype="int16", always_2d=False)
    except RuntimeError as e:  # libsndfile's error: not a wav, a header cut short
        why = getattr(e, "error_string", None) or str(e)
        raise MediaError(f"{wav_path}: not a readable wav ({why})") from None
    except OSError as e:
        raise MediaError(f"{wav_path}: cannot read ({e.strerror or e})") from None
    if sample_rate_hz is not None and rate != sample_rate_hz:
        raise MediaError(f"{wav_path}: its samples are at {rate} Hz, the extract-frames record "
                         f"says {sample_rate_hz} Hz")
    if n_samples is not None and data.shape[0] != n_samples:
        raise MediaError(f"{wav_path}: holds {data.shape[0]} samples, the extract-frames record "
                         f"says {n_samples} (changed since; run extract-frames again)")
    return data, rate

# --------------------------------------------------------------------------- weights


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
