"""Everything vpipe knows about ffmpeg and PyAV, and the only place that knows them: the binary
(:mod:`.ffmpeg`), what a file is (:mod:`.probe`), finding videos in folders (:mod:`.scan`),
decoding a clip in one pass into sampled RGB frames and resampled PCM audio (:mod:`.decode`),
that audio's mono downmix and alignment (:mod:`.audio`), and cutting clips out of a
source with the binary (:mod:`.cut`).
The stages never import ``av`` or call ffmpeg themselves; they use the names below.
"""

from __future__ import annotations

from pipeline.media.cut import (
    copyable_to_mp4,
    cut_exact,
    cut_keyframes,
    snap_down_us,
)
from pipeline.media.decode import (
    FrameSampler,
    decode,
    decode_span,
    iter_frames,
    scaled_size,
)
from pipeline.media.ffmpeg import (
    FFMPEG_ENV,
    FFmpeg,
    chosen_ffmpeg,
    ffmpeg_exe,
    ffmpeg_version,
    locate_ffmpeg,
    media_versions,
    run_ffmpeg,
)
from pipeline.media.probe import (
    ERR_DETECT,
    UNINDEXED_FORMATS,
    FrameTimes,
    MediaInfo,
    decoding_damage,
    display_rotation,
    frame_times,
    keyframe_times,
    probe,
    upright_size,
)
from pipeline.media.scan import (
    SourceRef,
    find_videos,
    scan_sources,
)

__all__ = [
    "ERR_DETECT",
    "FFMPEG_ENV",
    "FFmpeg",
    "FrameSampler",
    "FrameTimes",
    "MediaInfo",
    "SourceRef",
    "UNINDEXED_FORMATS",
    "chosen_ffmpeg",
    "copyable_to_mp4",
    "cut_exact",
    "cut_keyframes",
    "decode",
    "decode_span",
    "decoding_damage",
    "display_rotation",
    "ffmpeg_exe",
    "ffmpeg_version",
    "find_videos",
    "frame_times",
    "iter_frames",
    "keyframe_times",
    "locate_ffmpeg",
    "media_versions",
    "probe",
    "run_ffmpeg",
    "scaled_size",
    "scan_sources",
    "snap_down_us",
    "upright_size",
]
