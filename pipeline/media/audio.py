"""A clip's audio as the stages want it: mono, at one rate, as s16, sample 0 at the clip's first
video frame."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from pipeline.media.probe import UNINDEXED_FORMATS


def float_to_s16(x: np.ndarray) -> np.ndarray:
    """Float samples (full scale 1.0) as int16 the way libswresample converts them: rounded to
    nearest (ties to even), saturated at full scale, never wrapped."""
    return np.clip(np.rint(x * 32768.0), -32768, 32767).astype(np.int16)


def mono_of(frame) -> np.ndarray:
    """A packed float mono or stereo frame's samples as mono: a stereo frame's channel mean."""
    x = frame.to_ndarray().reshape(-1)
    if frame.layout.nb_channels == 1:
        return x
    return (x[0::2].astype(np.float64) + x[1::2]) * 0.5


class AudioAligner:
    """Resamples to ``rate``, downmixes to mono (:func:`mono_of`), converts to s16, aligns
    sample 0 with the clip start and stops at the stream's declared end (or ``duration_s``).

    A mono stream stays as it is. Any other is first folded down to stereo by libswresample's
    standard matrix (what ``ffmpeg -ac 2`` gives: a 5.1's centre into both sides at -3 dB, its
    surrounds at -3 dB into their side, LFE dropped), then the two channels are averaged: the
    convention of VGGish's own input code (``np.mean(data, axis=1)``) and of ``ffmpeg -ac 1``
    to s16 for a stereo source, and a 5.1 track at the level of its own stereo fold-down.

    The resampler outputs float, not s16: for an integer output libswresample scales its
    rematrix so that the coefficients of each output channel sum to at most 1, which would
    make a 5.1 fold-down's level depend on its channel count. The s16 conversion of the mean
    then saturates what exceeds full scale.
    """

    def __init__(self, stream, rate: int, origin: float, duration_s: float | None = None
                 ) -> None:
        self.rate = rate
        self.origin = origin
        self.resampler = None  # made for the first frame's channel count
        self.n = 0  # samples emitted
        self.skip = 0  # samples still to drop at the start (audio began before the video)
        self.started = False
        self.limit = None  # declared end of the audio stream, in output samples
        guessed = stream.container.format.name in UNINDEXED_FORMATS  # no declared length
        if stream.duration is not None and stream.time_base is not None and not guessed:
            a0 = float(stream.start_time * stream.time_base) if stream.start_time else 0.0
            end = a0 + float(stream.duration * stream.time_base) - origin
            self.limit = max(0, round(end * rate))
        if duration_s is not None:  # the clip ends there, whatever the stream declares
            cut = round(duration_s * rate)
            self.limit = cut if self.limit is None else min(self.limit, cut)

    def push(self, frame) -> Iterator[tuple[str, float, np.ndarray]]:
        if not self.started:
            import av

            self.started = True
            layout = "mono" if frame.layout.nb_channels == 1 else "stereo"
            self.resampler = av.AudioResampler(format="flt", layout=layout, rate=self.rate)
            offset = (float(frame.time) - self.origin) if frame.time is not None else 0.0
            if offset > 0:  # the audio starts after the video: silence until it does
                yield from self._out(np.zeros(round(offset * self.rate), np.int16))
            else:
                self.skip = round(-offset * self.rate)
        for out in self.resampler.resample(frame):
            yield from self._out(float_to_s16(mono_of(out)))

    def flush(self) -> Iterator[tuple[str, float, np.ndarray]]:
        if self.resampler is None:
            return
        for out in self.resampler.resample(None):
            yield from self._out(float_to_s16(mono_of(out)))

    def _out(self, x: np.ndarray) -> Iterator[tuple[str, float, np.ndarray]]:
        if self.skip:
            cut = min(self.skip, len(x))
            x, self.skip = x[cut:], self.skip - cut
        if self.limit is not None:
            x = x[: max(0, self.limit - self.n)]
        if len(x):
            t = self.n / self.rate
            self.n += len(x)
            yield "audio", t, x
