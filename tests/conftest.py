"""Shared fixtures: synthetic media is made once per session and copied where tests need it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import synth  # noqa: E402

RESNET18_FILE = "resnet18-f37072fd.pth"  # the names torchvision / torchvggish download to
VGGISH_FILE = "vggish-10086976.pth"
PCA_FILE = "vggish_pca_params-970ea276.pth"

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


@pytest.fixture(scope="session")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Seeded random resnet18 / VGGish / PCA parameters, saved as state-dict files."""
    import numpy as np
    import torch
    import torchvision
    from torchvggish.torchvggish import VGG, make_layers

    d = tmp_path_factory.mktemp("weights")
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18().state_dict(), d / RESNET18_FILE)
    torch.save(VGG(make_layers(), postprocess=False).state_dict(), d / VGGISH_FILE)
    g = np.random.default_rng(2)
    pca = {"pca_eigen_vectors": g.standard_normal((128, 128)) * 0.1,
           "pca_means": g.standard_normal(128)}
    torch.save(pca, d / PCA_FILE)
    return {"image": d / RESNET18_FILE, "audio": d / VGGISH_FILE, "pca": d / PCA_FILE}
