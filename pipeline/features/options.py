"""The options of ``vpipe features``: one frozen dataclass, whose defaults the CLI shows.

:class:`FeatureOptions` is :class:`BaseOptions` (what every run has) plus a field for each
option an encoder family declares (:attr:`~pipeline.features.encoders.registry.Encoder.options`,
e.g. VGGish's ``audio_postprocess`` and ``audio_pca``), made when this module is imported.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import UsageError
from pipeline.features.encoders import declared_options
from pipeline.features.text import DEFAULT_MAX_CHARS, DEFAULT_TEXT_MODEL
from pipeline.runner import default_workers, usable_cores

DTYPES = ("float32", "float16")
# The options that decide the output as they are (the encoders add their weights' identity).
RECORDED = ("image_model", "audio_model", "dtype", "compression", "shard_size")
COMPRESSIONS = ("none", "gzip", "lzf")


def loader_workers(device_type: str = "cpu") -> int:
    """Loader processes. On a CPU, the usable cores less one left to the model (its threads
    use the rest), up to 4; on CUDA every usable core less one, as the GPU consumes frames
    several times faster than a core decodes them (PIL decode + resize: 0.4-1.5k frames/s,
    an H100's ResNet-50 in fp16: near 10k)."""
    if device_type == "cuda":
        return max(1, usable_cores() - 1)
    return default_workers(reserved_cores=1)


@dataclass(frozen=True)
class BaseOptions:
    """Everything that decides the contents of the shards, plus how fast they are made, but
    the encoder families' own options (:class:`FeatureOptions` adds those)."""

    image_model: str = "resnet50"
    image_weights: str = "imagenet"
    audio_model: str = "vggish"
    audio_weights: str = "release"
    dtype: str = "float32"
    compression: str = "none"
    shard_size: int = 256
    # --from-video: decode the clips themselves, sampling frames as extract-frames does.
    from_video: bool = False
    fps: float | None = None
    every: int | None = None
    # --text: each clip's title (a titles file) through a frozen transformers encoder.
    text: str | None = None
    text_max_chars: int = DEFAULT_MAX_CHARS
    text_model: str = DEFAULT_TEXT_MODEL
    # --video-model: windows of the clip through a video classifier (none: no /video group);
    # recorded through its family's identity only when on, so other runs' parameters stay.
    video_model: str = "none"
    video_weights: str = "default"
    # Speed only: not part of the recorded parameters.
    batch_size: int = 0  # 0: chosen by timing the run's first frames (.batching)
    workers: int | None = None  # None: loader_workers() for the run's device
    compile: bool = False  # torch.compile the image model (pays off on long runs only)
    device: str = "auto"
    precision: str = "auto"

    def check(self) -> None:
        """Refuse option values that cannot work (a UsageError, before anything is read); the
        encoders' own options are their families' to check (:mod:`.encoders`)."""
        from pipeline.device import PRECISIONS, check_device_name

        check_device_name(self.device)  # here too, as Ray's actors only see it once they start
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype {self.dtype!r}: use float32 or float16")
        if self.compression not in COMPRESSIONS:
            raise UsageError(f"--compression {self.compression!r}: use none, gzip or lzf")
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision {self.precision!r}: use auto, fp32, fp16 or bf16")
        if self.shard_size < 1:
            raise UsageError("--shard-size must be at least 1")
        if self.workers is not None and self.workers < 0:
            raise UsageError("--workers must be 0 (decode in the model's process) or more")
        if self.batch_size < 0:
            raise UsageError("--batch-size must be 0 (chosen by measuring) or more")
        if self.text_max_chars < 0:
            raise UsageError("--text-max-chars must be 0 (no cut) or more")
        if self.video_model == "none":
            given = [f"--{k.replace('_', '-')}" for k in ("video_fps", "video_frames",
                                                          "video_stride")
                     if getattr(self, k, None) is not None]
            if given:
                raise UsageError(f"{'/'.join(given)} shape the windows of --video-model: "
                                 "give one (e.g. --video-model r2plus1d_18)")
        if self.from_video:
            self.sampler()  # validates fps/every
        elif self.fps is not None or self.every is not None:
            raise UsageError("--fps/--every sample frames from videos: they need --from-video")

    def encoder_names(self) -> dict[str, str]:
        """The model each modality of the run is encoded with, by modality (the registry of
        :mod:`.encoders` says which family takes it; ``none``: a modality left out)."""
        names = {"image": self.image_model, "audio": self.audio_model}
        if self.text:
            names["text"] = self.text_model
        if self.video_model != "none":
            names["video"] = self.video_model
        return names

    def sampling(self) -> tuple[float | None, int | None]:
        """(fps, every) for --from-video: extract-frames' default (1 frame/s) when neither."""
        if self.fps is None and self.every is None:
            return 1.0, None
        return self.fps, self.every

    def sampler(self) -> Any:
        from pipeline.media import FrameSampler

        fps, every = self.sampling()
        return FrameSampler(fps=fps, every=every)


def with_declared_options() -> type[BaseOptions]:
    """The options class of :class:`BaseOptions` and the families' declared options."""
    fields = [(o.name, o.type, field(default=o.default)) for o in declared_options()]
    cls = dataclasses.make_dataclass("FeatureOptions", fields, bases=(BaseOptions,),
                                     frozen=True)
    cls.__module__ = __name__  # picklable by name (Ray ships the options to its tasks)
    cls.__doc__ = ("The options of a features run: :class:`BaseOptions` and the encoder "
                   "families' own (" + ", ".join(f.name for f in dataclasses.fields(cls)
                                                 if f.name not in BASE_FIELDS) + ").")
    return cls


def recorded_options() -> tuple[str, ...]:
    """The options a features run records as given: :data:`RECORDED` and the families' own
    options that say so (a re-run with other values is refused)."""
    return (*RECORDED, *(o.name for o in declared_options() if o.recorded))


BASE_FIELDS = frozenset(f.name for f in dataclasses.fields(BaseOptions))
FeatureOptions = with_declared_options()
