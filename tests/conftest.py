"""Shared fixtures: synthetic media is made once per session and copied where tests need it."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import synth  # noqa: E402

RESNET18_FILE = "resnet18-f37072fd.pth"  # the names torchvision / torchvggish download to
VGGISH_FILE = "vggish-10086976.pth"
PCA_FILE = "vggish_pca_params-970ea276.pth"

# Two cores: keep torch from oversubscribing when pytest runs beside ffmpeg.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@contextmanager
def ray_cluster() -> Iterator[str]:
    """A local Ray cluster of 2 CPUs in this process (any earlier one shut down first); yields
    its address, and is shut down on leaving."""
    ray = pytest.importorskip("ray", reason="the Ray engine needs pip install 'vpipe[ray]'")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="error")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture
def local_ray() -> Iterator[str]:
    """A local Ray cluster for one test (test_engine's module shares one: ``cluster``)."""
    with ray_cluster() as address:
        yield address


def pytest_configure(config: pytest.Config) -> None:
    """The suite runs on the CPU, GPU or not: its exact comparisons hold there (on a GPU,
    ``--device auto`` would bring fp16/bf16 autocast and TF32). CUDA is hidden from this
    process and every process it starts, unless the tests asked for are the CUDA subset
    (``pytest -m gpu``: tests/test_gpu.py, within stated tolerances)."""
    if not selects_gpu(config.option.markexpr or ""):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def selects_gpu(markexpr: str) -> bool:
    return "gpu" in markexpr and "not gpu" not in markexpr


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A ``gpu`` test runs only with ``-m gpu`` and a CUDA device; else it is skipped."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu:
        return
    if not selects_gpu(config.option.markexpr or ""):
        reason = "CUDA subset: run with `pytest -m gpu` on a machine with a GPU"
    else:
        import torch

        if torch.cuda.is_available():
            return
        reason = "no CUDA device"
    for item in gpu:
        item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny models (``pytestmark = pytest.mark.usefixtures``):
    they gain nothing from threads, and lose a lot when other tests share the cores."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


TITLE_WORDS = "red green blue yellow cat dog runs jumps the a video of".split()


def tiny_bert(folder: Path) -> Path:
    """A random BERT-architecture encoder (16 dims) and a WordPiece vocabulary, saved with
    save_pretrained as a user would save a local text model."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TITLE_WORDS, "##s", "##ed"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def text_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT folder, for --text-model DIR."""
    return tiny_bert(tmp_path_factory.mktemp("text") / "bert")
