"""pipeline.features.encoders (the registry, the families) and .weights, pipeline.device:
weights resolution, preprocessing split, BN folding, device and precision choice, VGGish
input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchvision
from PIL import Image

from pipeline import device
from pipeline.errors import UsageError, WeightsUnavailable
from pipeline.features import FeatureOptions, weights
from pipeline.features.encoders import image as images
from pipeline.features.encoders import resolve_encoders, torchvision_image, vggish
from pipeline.files import sha256_of


@pytest.fixture()
def frame(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8))
    path = tmp_path / "000000.jpg"
    small.resize((90, 50), Image.BILINEAR).save(path)
    return path


def test_uint8_part_then_batched_normalise_equals_the_preset(frame: Path) -> None:
    pre = images.Preprocessing()
    preset = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.transforms()
    u8 = pre.load_uint8(frame)
    assert u8.dtype == torch.uint8 and u8.shape == (3, 224, 224)
    ours = pre.normalize(torch.stack([u8, u8]))[1]
    ref = preset(Image.open(frame).convert("RGB"))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_imagenet_v2_preprocessing_comes_from_its_weights() -> None:
    _, w = images.resolve_image_weights("resnet50", "none")
    assert w.transforms().resize_size == [256]
    with pytest.raises(UsageError, match="resnet18 has no IMAGENET1K_V2"):
        images.resolve_image_weights("resnet18", "imagenet-v2")


def test_folded_batchnorm_keeps_the_features() -> None:
    torch.manual_seed(0)
    plain = torchvision.models.resnet18()
    plain.fc = torch.nn.Identity()
    plain.eval()
    for m in plain.modules():  # non-trivial running statistics, as trained weights have
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    folded = torchvision.models.resnet18()
    folded.fc = torch.nn.Identity()
    folded.load_state_dict(plain.state_dict())
    torchvision_image.fuse_batchnorm(folded.eval())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = plain(x), folded(x)
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()


def test_weights_file_is_recorded_with_its_sha256(tmp_path: Path) -> None:
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    enc = images.load_image_encoder("resnet18", str(path))
    assert enc.dim == 512
    assert enc.weights.kind == "file" and enc.weights.sha256 == sha256_of(path)
    assert enc.attrs()["preprocessing"]["crop_size"] == 224


def test_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(WeightsUnavailable, match="does not fit resnet34"):
        images.load_image_encoder("resnet34", str(path))


def test_unknown_model_or_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as e:
        images.resolve_image_weights("resnet5", "none")
    msg = str(e.value)
    assert "\n" not in msg and "--image-model 'resnet5'" in msg
    assert "did you mean resnet50" in msg and "vit_b_16" in msg and "hf:" in msg
    with pytest.raises(UsageError, match="SqueezeNet ends in a conv classifier"):
        images.resolve_image_weights("squeezenet1_1", "none")
    with pytest.raises(UsageError, match="nor an existing file"):
        images.resolve_image_weights("resnet18", str(tmp_path / "nope.pth"))


def test_random_weights_are_seeded_so_reruns_agree() -> None:
    a = images.load_image_encoder("resnet18", "none")
    b = images.load_image_encoder("resnet18", "none")
    assert a.weights.attrs() == {"kind": "random", "name": "random", "seed": 0}
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_cpu_bf16_detection_follows_cpuinfo_flags() -> None:
    flags = Path("/proc/cpuinfo").read_text().split()
    assert device.cpu_has_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_precision_rules() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # On CUDA: bf16 from Ampere (8.0) on, fp16 before (the capability given, not read).
    assert device.pick_precision("auto", cuda, (7, 5)) == "fp16"
    assert device.pick_precision("auto", cuda, (8, 0)) == "bf16"
    assert device.pick_precision("auto", cpu) == ("bf16" if device.cpu_has_bf16() else "fp32")
    assert device.pick_precision("fp32", cpu) == "fp32"
    with pytest.raises(UsageError, match="fp16 needs a CUDA device"):
        device.pick_precision("fp16", cpu)
    with pytest.raises(UsageError):
        device.pick_device("tpu")


@pytest.mark.parametrize(
    ("seconds", "rate", "expected"),
    [(0.5, 16000, 0), (0.9749, 16000, 0), (0.975, 16000, 1), (2.9, 16000, 3), (3.0, 44100, 3)],
)
def test_audio_examples_count_and_start_times(tmp_path: Path, seconds, rate, expected) -> None:
    wav = tmp_path / "a.wav"
    n = int(round(seconds * rate))
    data = (np.sin(np.arange(n) * 0.05) * 10000).astype(np.int16)
    sf.write(wav, data, rate, subtype="PCM_16")
    ex, ts = vggish.wav_examples(wav)
    assert ex.shape == (expected, 1, 96, 64)
    np.testing.assert_allclose(ts, np.arange(expected) * 0.96)


def test_postprocess_matches_torchvggish_postprocessor() -> None:
    from torchvggish.torchvggish import Postprocessor

    g = torch.Generator().manual_seed(0)
    matrix, means = torch.randn(128, 128, generator=g) * 0.1, torch.randn(128, 1, generator=g)
    emb = torch.rand(5, 128, generator=g) * 3
    pp = Postprocessor.__new__(Postprocessor)  # its __init__ downloads the PCA parameters
    pp._pca_matrix, pp._pca_means = matrix, means
    torch.testing.assert_close(vggish.postprocess(emb, matrix, means), pp.postprocess(emb))


def test_offline_download_names_the_cache_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    with pytest.raises(WeightsUnavailable) as e:
        vggish.load_audio_encoder("release", postprocess_on=False)
    msg = str(e.value)
    assert "--audio-weights PATH" in msg and "vggish-10086976.pth" in msg
    assert not list((tmp_path / "hub" / "checkpoints").iterdir())  # no partial file left


def test_offline_missing_files_are_reported_together(tmp_path: Path, monkeypatch) -> None:
    """resolve_encoders looks for every file before failing: one error lists all three."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    with pytest.raises(WeightsUnavailable) as e:
        resolve_encoders(FeatureOptions(image_model="resnet18", image_weights="imagenet"))
    msg = str(e.value)
    assert msg.startswith("3 weight files are not in the torch hub cache")
    for name in ("resnet18-f37072fd.pth", "vggish-10086976.pth", "vggish_pca_params-970ea276.pth",
                 "--image-weights PATH", "--audio-weights PATH", "--audio-model none",
                 "--audio-pca PATH", "--no-audio-postprocess"):
        assert name in msg
    # Random image weights and no audio: nothing to look for, nothing missing.
    found = resolve_encoders(FeatureOptions(image_model="resnet18", image_weights="none",
                                            audio_model="none"))
    assert found["image"].weights[0].kind == "random" and found["audio"].weights is None
    # The PCA alone missing: its own message, with the way to do without it.
    vggish_file = tmp_path / "vggish.pth"
    torch.save({}, vggish_file)
    with pytest.raises(weights.MissingWeights) as e:
        vggish.resolve_audio_weights(str(vggish_file), True, "release")
    assert "--audio-pca PATH" in str(e.value) and "--no-audio-postprocess" in str(e.value)
    assert not list((tmp_path / "hub" / "checkpoints").iterdir())


def test_random_vggish_needs_no_release_pca(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--no-audio-postprocess"):
        vggish.resolve_audio_weights("none", True, "release")
    winfo, wpath, pinfo, ppath = vggish.resolve_audio_weights("none", False, "release")
    assert (winfo.kind, wpath, pinfo, ppath) == ("random", None, None, None)
    pca = tmp_path / "pca.pth"  # a PCA file asked for by path is the user's call
    torch.save({"pca_eigen_vectors": np.eye(128), "pca_means": np.zeros(128)}, pca)
    enc = vggish.load_audio_encoder("none", True, str(pca))
    assert enc.weights.kind == "random" and enc.pca_info.kind == "file"


def test_a_family_declares_its_options_once_and_they_reach_everything() -> None:
    """A family added with one option (as a new module would add it): the options gain the
    field, `vpipe features` the flag after --audio-weights (and so workflows the key: they are
    the command's options), the recorded parameters the value; the CLI imports no torch."""
    code = """
import sys, typer
from typing import ClassVar
from pipeline.features.encoders import Encoder, EncoderOption, register_encoder
from pipeline.features import options
from pipeline.cli.features_cmds import with_encoder_options

@register_encoder
class Loud(Encoder):
    modality: ClassVar[str] = "audio"
    label: ClassVar[str] = "loud"
    options: ClassVar = (EncoderOption("audio_gain", 1.5, "--audio-gain", "Gain.", recorded=True),)

def command(audio_weights: str = "release", quiet: bool = False, **encoder_options) -> None:
    print(sorted(encoder_options.items()))

app = typer.Typer()
app.command()(with_encoder_options(command))
cls = options.with_declared_options()  # as importing the options makes it, all families known
print(cls().audio_gain, cls(audio_gain=2.0).audio_gain)
print("audio_gain" in options.recorded_options(), "audio_pca" in options.recorded_options())
typer.main.get_command(app).main(["--audio-gain", "3", "--no-audio-postprocess"],
                                 standalone_mode=False)
from pipeline.cli import command as every_command
every_command()  # the whole CLI, as `vpipe --help` builds it
print('torch' in sys.modules)
"""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True)
    assert run.stdout.splitlines() == [
        "1.5 2.0", "True False",
        "[('audio_gain', 3.0), ('audio_pca', 'release'), ('audio_postprocess', False), "
        "('video_fps', None), ('video_frames', None), ('video_stride', None)]", "False"]



def test_vggish_declares_its_options_and_they_are_checked_from_the_declaration() -> None:
    declared = {o.name: o for o in vggish.VGGish.options}
    assert set(declared) == {"audio_postprocess", "audio_pca"}
    assert FeatureOptions().audio_postprocess is True and FeatureOptions().audio_pca == "release"
    with pytest.raises(UsageError, match="--no-audio-postprocess"):
        vggish.VGGish.check("vggish", FeatureOptions(audio_weights="none"))
    vggish.VGGish.check("vggish", FeatureOptions(audio_weights="none", audio_postprocess=False))
