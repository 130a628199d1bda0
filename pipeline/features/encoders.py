"""The networks of ``vpipe features`` as a run uses them: VGGish with its input, and
:class:`Encoders`, the frame encoder (:mod:`.images`), VGGish and the title encoder on the
run's device and precision. VGGish takes log-mel examples of 16 kHz mono PCM, as torchvggish
builds them, with the AudioSet release's PCA and quantisation when asked; where the weights
come from is :mod:`.weights`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.device import autocast_dtype, pick_device, pick_precision
from pipeline.errors import MediaError
from pipeline.features.batching import ModelBatch
from pipeline.features.images import ImageEncoder, Preprocessing, load_image_encoder
from pipeline.features.options import FeatureOptions
from pipeline.features.text import TextEncoder, resolve_text_model
from pipeline.features.weights import (
    RANDOM_SEED,
    WeightsInfo,
    WeightsRefused,
    assign_state_dict,
    load_state_dict,
    resolve_audio_weights,
    resolve_weights,
)
from pipeline.runner import usable_cores

__all__ = ["AudioEncoder", "Encoders", "ImageEncoder", "Preprocessing", "load_encoders"]

AUDIO_DIM = 128


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


def audio_examples(pcm: np.ndarray, rate_hz: int) -> tuple[torch.Tensor, np.ndarray]:
    """VGGish input examples of int16 mono samples (as torchvggish builds them from a wav) and
    their start times; none for less than one 0.96 s example."""
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


# --------------------------------------------------------------------------- the set a run uses


@dataclass
class Encoders:
    """The image and (optional) audio and title encoders of a run, on its device and
    precision."""

    image: ImageEncoder
    audio: AudioEncoder | None
    device: torch.device
    precision: str
    text: TextEncoder | None = None
    batching: ModelBatch | None = None  # None: each batch in one call, as given
    channels_last: bool = True  # the image model's memory layout (and its inputs')

    @property
    def audio_dim(self) -> int:
        return AUDIO_DIM if self.audio is not None else 0

    @property
    def text_dim(self) -> int:
        return self.text.dim if self.text is not None else 0

    def embed_texts(self, titles: list[str]) -> list[np.ndarray]:
        """Each title's token features ``(tokens, dim)``, all titles in batched calls."""
        if self.text is None or not titles:
            return []
        return self.text.encode(titles)

    def embed_images(self, imgs: torch.Tensor) -> np.ndarray:
        """A batch of uint8 images (N, 3, crop, crop) -> float32 features (N, dim), in model
        calls of the size :attr:`batching` chose."""
        if self.batching is None:
            return self._embed_call(imgs)
        return self.batching.run(imgs, self._embed_call)

    def _embed_call(self, imgs: torch.Tensor) -> np.ndarray:
        """One model call: normalised as the weights' preset says, cast to the precision, in
        the model's memory layout."""
        x = self.image.preprocessing.normalize(imgs.to(self.device, non_blocking=True))
        cast = autocast_dtype(self.precision)
        if cast is not None:
            x = x.to(cast)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return self.image.model(x).float().cpu().numpy()

    def embed_audio(self, examples: torch.Tensor | None) -> np.ndarray:
        """VGGish rows of a clip's examples (none without an audio encoder or examples)."""
        if self.audio is None or examples is None:
            return np.zeros((0, self.audio_dim), np.float32)
        cast = autocast_dtype(self.precision)
        with torch.autocast(self.device.type, dtype=cast or torch.float32,
                            enabled=cast is not None):
            return self.audio.embed(examples.to(self.device))

    def attrs(self) -> dict[str, dict]:
        """The shard attributes of /image and /audio (sampling is the source's to add)."""
        audio = (
            {**self.audio.attrs(), "precision": self.precision}
            if self.audio is not None
            else {"model": "none", "dim": 0}
        )
        out = {"image": {**self.image.attrs(), "precision": self.precision}, "audio": audio}
        if self.text is not None:
            out["text"] = {**self.text.attrs(), "precision": self.precision}
        return out

    def identity(self) -> dict[str, Any]:
        """What of the encoders decides the output, for the run's recorded parameters."""
        audio = self.audio
        return {
            "image_weights": self.image.weights.identity(),
            "audio_weights": audio.weights.identity() if audio else None,
            "audio_pca": audio.pca_info.identity() if audio and audio.pca_info else None,
            "precision": self.precision,
            # Only with --text, so that the parameters of runs without it stay as they were.
            **({"text_model": self.text.identity()} if self.text is not None else {}),
        }


def load_encoders(opts: FeatureOptions) -> Encoders:
    """Models, weights, device and precision: all resolved before any shard is started."""
    opts.check()
    device = pick_device(opts.device)
    precision = pick_precision(opts.precision, device)
    want_audio = opts.audio_model == "vggish"
    # Every weights file is looked for first: one error lists all the missing ones.
    image_w, audio_w = resolve_weights(
        opts.image_model,
        opts.image_weights,
        (opts.audio_weights, opts.audio_postprocess, opts.audio_pca) if want_audio else None,
    )
    text_info = resolve_text_model(opts.text_model) if opts.text else None
    image = load_image_encoder(opts.image_model, opts.image_weights, image_w)
    audio = None
    if want_audio:
        audio = load_audio_encoder(
            opts.audio_weights, opts.audio_postprocess, opts.audio_pca, audio_w
        )
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(usable_cores())
    image.model.to(device)
    if audio is not None:
        audio.model.to(device)
        audio.pca = audio.pca and (audio.pca[0].to(device), audio.pca[1].to(device))
    cast = autocast_dtype(precision)
    if cast is not None:
        # Half-precision weights rather than autocast: the BN-folded convs are all there is,
        # and autocast would re-cast every weight at every call (bf16, 2 cores: +7%).
        image.model.to(cast)
    # Channels last on a CPU as on CUDA, in every precision. ResNet-50 alone, batch 8, 2 cores:
    # fp32 13.4 frames/s against 10.6 contiguous (AMD EPYC, no AVX512); bf16 +28% (a Xeon).
    channels_last = True
    image.model.to(memory_format=torch.channels_last)
    if opts.compile:
        # Compiled on its first call (tens of seconds on a CPU), for the one call size.
        image.model = torch.compile(image.model, dynamic=False)
    # The title encoder follows the image encoder's device and precision.
    text = TextEncoder(text_info, device, cast) if text_info is not None else None
    batching = ModelBatch(device.type, opts.batch_size, compiled=opts.compile)
    return Encoders(image, audio, device, precision, text, batching, channels_last)
