"""Shared fixtures: synthetic media is made once per session and copied where tests need it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import synth  # noqa: E402

# Two cores: keep torch from oversubscribing when pytest runs beside ffmpeg.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="session")
def numbered_video(media_dir: Path) -> Path:
    """8 s, 25 fps, 160x120, frame-numbered, 1 kHz beeps at 1.0 s and 5.0 s (AAC 44.1 kHz)."""
    return synth.make_video(
        media_dir / "numbered.mp4", duration_s=8.0, fps=25, beeps_at=(1.0, 5.0)
    )
