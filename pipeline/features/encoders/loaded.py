"""The encoders of a run, loaded on its device and precision (:class:`Encoders`): what the
stage, the sources and the Ray actors call to turn frames, audio examples and titles into rows."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.device import autocast_dtype, cuda_math, pick_device, pick_precision
from pipeline.features.batching import CallSize, ModelBatch
from pipeline.features.encoders import resolve_encoders
from pipeline.features.encoders.image import ImageEncoder
from pipeline.features.encoders.video import WINDOW_BATCH_FRAMES, VideoWindows
from pipeline.features.options import FeatureOptions
from pipeline.runner import usable_cores


@dataclass
class Encoders:
    """The image and (optional) audio and title encoders of a run, on its device and
    precision."""

    image: ImageEncoder
    audio: Any  # the audio family's encoder (.dim, .embed, .input, .attrs), or None
    device: torch.device
    precision: str
    text: Any = None  # the title encoder (.dim, .encode, .attrs), or None
    batching: ModelBatch | None = None  # None: each batch in one call, as given
    channels_last: bool = True  # the image model's memory layout (and its inputs')
    identities: dict[str, dict[str, Any]] = field(default_factory=dict)  # by modality
    math: dict[str, Any] = field(default_factory=dict)  # CUDA's math settings (device.cuda_math)
    # A clip's audio examples go in one call, unless one ran out of memory.
    audio_calls: CallSize = field(default_factory=lambda: CallSize("audio examples of a clip"))
    video: Any = None  # the clip-level video encoder (.dim, .model, .input, .attrs), or None
    video_precision: str = "fp32"  # the video model's (see load_encoders)
    video_calls: CallSize = field(default_factory=lambda: CallSize("video windows of a clip"))

    @property
    def video_dim(self) -> int:
        return self.video.dim if self.video is not None else 0

    @property
    def video_input(self) -> Any:
        """What loader workers need to cut a clip into windows (None: no video encoder)."""
        return self.video.input if self.video is not None else None

    def embed_video(self, windows: VideoWindows | None) -> np.ndarray:
        """A clip's windows (uint8 (V, T, 3, h, w)) -> float32 rows (V, dim), normalised as
        the weights' preset says, a few windows a call (a long clip's windows never meet in
        one call, so memory does not grow with the clip)."""
        if self.video is None or windows is None or not windows.frames.shape[0]:
            return np.zeros((0, self.video_dim), np.float32)
        cast = autocast_dtype(self.video_precision)
        pre = self.video.preprocessing
        if self.video_calls.limit is None:
            # On CUDA at most WINDOW_BATCH_FRAMES frames a call; on a CPU one window a call,
            # the fastest per window (r2plus1d_18, 2 cores: 0.86 s alone, 0.96 in twos,
            # 1.09 in fours: benchmarks/video_features.py).
            self.video_calls.limit = (max(1, WINDOW_BATCH_FRAMES // windows.frames.shape[1])
                                      if self.device.type == "cuda" else 1)

        def call(x: torch.Tensor) -> np.ndarray:
            x = pre.normalize(x.to(self.device, non_blocking=True))
            with torch.inference_mode():
                return self.video.model(x.to(cast) if cast else x).float().cpu().numpy()

        return self.video_calls.run(windows.frames, call)

    @property
    def audio_dim(self) -> int:
        return self.audio.dim if self.audio is not None else 0

    @property
    def text_dim(self) -> int:
        return self.text.dim if self.text is not None else 0

    @property
    def audio_input(self) -> Any:
        """What loader workers make of a clip's audio for the audio encoder (None: no audio)."""
        return self.audio.input if self.audio is not None else None

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
        """Audio rows of a clip's examples (none without an audio encoder or examples)."""
        if self.audio is None or examples is None:
            return np.zeros((0, self.audio_dim), np.float32)
        cast = autocast_dtype(self.precision)
        with torch.autocast(self.device.type, dtype=cast or torch.float32,
                            enabled=cast is not None):
            return self.audio_calls.run(examples, lambda x: self.audio.embed(x.to(self.device)))

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
        if self.video is not None:
            out["video"] = {**self.video.attrs(), "precision": self.video_precision}
        return out

    def identity(self) -> dict[str, Any]:
        """What of the encoders decides the output, for the run's recorded parameters."""
        ids = self.identities
        return {
            **ids.get("image", {}),
            **ids.get("audio", {}),
            "precision": self.precision,
            # Only with --text, so that the parameters of runs without it stay as they were.
            **ids.get("text", {}),
            # Only with --video-model, likewise.
            **({"video_model": self.video.name, **ids["video"]} if self.video is not None
               else {}),
        }


def load_encoders(opts: FeatureOptions) -> Encoders:
    """Models, weights, device and precision: all resolved before any shard is started."""
    opts.check()
    device = pick_device(opts.device)
    precision = pick_precision(opts.precision, device)
    # Image batches are one size (the chosen call size): cuDNN may time its kernels for it.
    math = cuda_math(precision, fixed_shapes=True) if device.type == "cuda" else {}
    resolved = resolve_encoders(opts)
    loaded = {m: r.load(opts) for m, r in resolved.items()}
    identities = {m: r.family.identity(r.weights, loaded[m]) for m, r in resolved.items()}
    image, audio, text = loaded["image"], loaded.get("audio"), loaded.get("text")
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(usable_cores())
    image.model.to(device)
    if audio is not None:
        audio.to(device)
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
    video = loaded.get("video")
    # The video model on a CPU stays fp32 unless bf16 is asked for: oneDNN's bf16 Conv3d is
    # ~34x slower there (r2plus1d_18, one 16-frame window, 2 cores: fp32 3.8 s, bf16 129 s).
    video_precision = ("fp32" if device.type == "cpu" and opts.precision == "auto"
                       else precision)
    if video is not None:  # whole-model weights in half precision, as the image model's
        video.model.to(device)
        if autocast_dtype(video_precision) is not None:
            video.model.to(autocast_dtype(video_precision))
    if text is not None:  # the title encoder follows the image encoder's device and precision
        text.to(device, cast)
    batching = ModelBatch(device.type, opts.batch_size, compiled=opts.compile)
    return Encoders(image, audio, device, precision, text, batching, channels_last, identities,
                    math, video=video, video_precision=video_precision)
