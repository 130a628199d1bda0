"""pipeline.features.images: torchvision classifiers other than the ResNets and ``hf:``
CLIP-style encoders, against reference forward passes of the same weights and images.

Weights are made here: seeded random state dicts saved with torch.save (as a user's file, or
put in a temporary torch hub cache under the published file name), and a tiny CLIP saved with
save_pretrained beside its image processor. The references are the libraries' own: a
torchvision model with the state dict loaded, its classifier Linear's input caught by a
forward hook, on the weights' ``transforms()`` of the same PIL image; CLIP's
``get_image_features`` on what the saved processor makes of it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from test_features import make_media

from pipeline.cli import main
from pipeline.errors import UsageError, WeightsUnavailable
from pipeline.features.encoders import hf_image, torchvision_image
from pipeline.features.encoders import image as images
from pipeline.files import sha256_of
from pipeline.shards import open_features

# A frame size whose centre crop for the tiny CLIP (resized to 59 x 32) has a margin of 27:
# torchvision would round its offset to 14, the processor truncates it to 13.
ODD = (95, 51)


def frame_file(tmp_path: Path, size: tuple[int, int] = ODD, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8))
    path = tmp_path / f"frame-{seed}.jpg"
    small.resize(size, Image.BILINEAR).save(path)
    return path


def random_state_dict(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A seeded state dict with non-trivial BatchNorm statistics, as trained weights have."""
    torch.manual_seed(seed)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model.state_dict()


def published_architecture(name: str) -> torch.nn.Module:
    """The network torchvision builds for ``name`` when given its DEFAULT weights (the file
    layout those weights have: GoogLeNet's auxiliary classifiers included)."""
    if name == "googlenet":
        return torchvision.models.googlenet(weights=None, aux_logits=True, transform_input=True,
                                            init_weights=False)
    return torchvision.models.get_model(name, weights=None)


def reference_rows(model: torch.nn.Module, head: str, transform, paths: list[Path]) -> np.ndarray:
    """The input of the classifier Linear ``head``, per frame, caught by a forward hook."""
    caught: list[torch.Tensor] = []
    hook = model.get_submodule(head).register_forward_hook(
        lambda mod, inp, out: caught.append(inp[0][0].clone()))
    model.eval()
    with torch.no_grad():
        for p in paths:
            model(transform(Image.open(p).convert("RGB"))[None])
    hook.remove()
    return torch.stack(caught).numpy()


def our_rows(enc: images.ImageEncoder, paths: list[Path]) -> np.ndarray:
    """The stage's split: uint8 resize/crop per frame, then the batched normalise and model."""
    u8 = torch.stack([enc.preprocessing.load_uint8(p) for p in paths])
    with torch.no_grad():
        return enc.model(enc.preprocessing.normalize(u8)).numpy()


def close(a: np.ndarray, ref: np.ndarray, rel: float) -> None:
    assert a.shape == ref.shape
    assert np.abs(a - ref).max() <= rel * np.abs(ref).max()


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vit") / "vit_b_32.pth"
    torch.save(random_state_dict(torchvision.models.vit_b_32(), seed=3), path)
    return path


def test_vit_features_from_a_weights_file_equal_the_head_input(tmp_path: Path,
                                                               vit_file: Path) -> None:
    paths = [frame_file(tmp_path)]
    enc = images.load_image_encoder("vit_b_32", str(vit_file))
    assert (enc.dim, enc.weights.kind, enc.weights.sha256) == (768, "file", sha256_of(vit_file))
    ref_model = torchvision.models.vit_b_32()
    ref_model.load_state_dict(torch.load(vit_file))
    t = torchvision.models.ViT_B_32_Weights.DEFAULT.transforms()
    close(our_rows(enc, paths), reference_rows(ref_model, "heads.head", t, paths), 1e-5)
    a = enc.attrs()
    assert a["layer"] == "input of heads.head (the classifier's last Linear, removed)"
    assert a["preprocessing"]["preset"] == "ViT_B_32_Weights.IMAGENET1K_V1.transforms()"
    assert "resize_on" not in a["preprocessing"]  # torchvision's own resize and crop


@pytest.mark.parametrize(
    ("name", "head", "dim"),
    [("efficientnet_b0", "classifier.1", 1280), ("regnet_y_400mf", "fc", 440),
     ("googlenet", "fc", 1024)],
)
def test_cnn_features_equal_the_head_input(tmp_path: Path, name: str, head: str,
                                           dim: int) -> None:
    """EfficientNet (bicubic preset), RegNet (not buildable on the meta device), GoogLeNet
    (aux classifiers in the file, input transform): each equals its reference. MobileNet (a
    hardswish layer before the last Linear) is the CLI test's."""
    ref_model = published_architecture(name)
    path = tmp_path / f"{name}.pth"
    torch.save(random_state_dict(ref_model, seed=4), path)
    paths = [frame_file(tmp_path)]
    enc = images.load_image_encoder(name, str(path))
    assert enc.dim == dim
    t = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    assert enc.preprocessing.interpolation == t.interpolation.value
    close(our_rows(enc, paths), reference_rows(ref_model, head, t, paths), 1e-5)


def test_hub_weights_by_name_from_the_torch_cache(tmp_path: Path, monkeypatch) -> None:
    """`imagenet` is the model's DEFAULT weights, read from $TORCH_HOME/hub/checkpoints under
    the file name of its URL; a registered enum name works too."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    w = torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(random_state_dict(torchvision.models.mobilenet_v3_small(), seed=5),
               cache / os.path.basename(w.url))
    for given in ("imagenet", "IMAGENET1K_V1", "imagenet1k_v1"):
        info, got = images.resolve_image_weights("mobilenet_v3_small", given)
        assert got == w
        assert info.attrs() == {"kind": "hub", "name": "MobileNet_V3_Small_Weights.IMAGENET1K_V1",
                                "file": os.path.basename(w.url), "url": w.url}
    enc = images.load_image_encoder("mobilenet_v3_small", "imagenet")
    ref = images.load_image_encoder("mobilenet_v3_small",
                                    str(cache / os.path.basename(w.url)))
    x = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(enc.model(enc.preprocessing.normalize(x)),
                                   ref.model(ref.preprocessing.normalize(x)), rtol=0, atol=0)


def test_missing_hub_weights_offline_name_the_cache_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    with pytest.raises(WeightsUnavailable) as e:
        images.resolve_image_weights("vit_b_16", "IMAGENET1K_SWAG_E2E_V1")
    msg = str(e.value)
    assert msg.startswith("vit_b_16 IMAGENET1K_SWAG_E2E_V1 weights are not in the cache")
    assert "vit_b_16_swag-9ac1b537.pth" in msg and "--image-weights PATH" in msg
    assert "--image-weights none" in msg and "\n" not in msg
    assert not list((tmp_path / "hub" / "checkpoints").iterdir())


def test_unknown_weights_name_lists_the_models_own(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as e:
        images.resolve_image_weights("vit_b_16", "swag")
    msg = str(e.value)
    assert "IMAGENET1K_SWAG_E2E_V1" in msg and "nor an existing file" in msg
    with pytest.raises(UsageError, match="convnext_tiny has no IMAGENET1K_V2"):
        images.resolve_image_weights("convnext_tiny", "imagenet-v2")


def test_random_init_is_seeded_and_takes_the_default_preset() -> None:
    a = images.load_image_encoder("mobilenet_v3_small", "none")
    b = images.load_image_encoder("mobilenet_v3_small", "none")
    assert a.weights.attrs() == {"kind": "random", "name": "random", "seed": 0}
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)
    # The SWAG ViT preset (384, bicubic) when those weights are named: the architecture too.
    w = torchvision.models.ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1
    assert torchvision_image.arch_kwargs("vit_b_16", w) == {"image_size": 384}
    pre = torchvision_image.preset_preprocessing(w)
    assert (pre.resize_size, pre.crop_size, pre.interpolation) == (384, 384, "bicubic")


# --------------------------------------------------------------------------- hf: (CLIP)


def tiny_clip(folder: Path) -> Path:
    """A random CLIP (32 px, 8 px patches, 32 hidden, 2 layers, 24-d projection) and its image
    processor (shortest edge 32, crop 32, bicubic), saved with save_pretrained."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(6)
    config = CLIPConfig(
        text_config={"vocab_size": 99, "hidden_size": 16, "intermediate_size": 32,
                     "num_hidden_layers": 1, "num_attention_heads": 2,
                     "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1,
                     "pad_token_id": 1},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32,
                       "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 4},
        projection_dim=24,
    )
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32},
                       crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def reference_clip(folder: Path, pils: list[Image.Image]) -> np.ndarray:
    """CLIP's own: get_image_features of what the saved processor makes of each image."""
    from transformers import AutoImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(folder).eval()
    proc = AutoImageProcessor.from_pretrained(folder)
    rows = []
    with torch.no_grad():
        for im in pils:
            out = model.get_image_features(**proc(images=im, return_tensors="pt"))
            rows.append((out if isinstance(out, torch.Tensor) else out.pooler_output)[0])
    return torch.stack(rows).numpy()


def test_clip_features_equal_get_image_features(tmp_path: Path, clip_dir: Path) -> None:
    """Frames of two sizes, one with an odd crop margin: the processor's numbers exactly."""
    paths = [frame_file(tmp_path, seed=s) for s in (0, 1)] + [frame_file(tmp_path, (40, 70), 2)]
    enc = images.load_image_encoder(f"hf:{clip_dir}", "imagenet")
    assert enc.dim == 24 and enc.weights.kind == "folder"
    ref = reference_clip(clip_dir, [Image.open(p).convert("RGB") for p in paths])
    np.testing.assert_allclose(our_rows(enc, paths), ref, atol=1e-5, rtol=0)
    a = enc.attrs()
    assert a["model"] == f"hf:{clip_dir}"
    assert a["layer"].startswith("get_image_features")
    assert a["weights"]["sha256"]["model.safetensors"] == sha256_of(clip_dir / "model.safetensors")
    assert a["weights"]["sha256"]["preprocessor_config.json"] == sha256_of(
        clip_dir / "preprocessor_config.json")
    pre = a["preprocessing"]
    assert (pre["resize_size"], pre["crop_size"], pre["interpolation"]) == (32, 32, "bicubic")
    assert (pre["resize_on"], pre["crop_offset"]) == ("tensor", "floor")
    assert pre["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])


def test_a_pil_backend_processor_is_followed_exactly(tmp_path: Path) -> None:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pre = hf_image.hf_preprocessing(proc, "hf:x")
    assert pre.resize_on == "PIL"
    im = Image.open(frame_file(tmp_path)).convert("RGB")
    ours = pre.normalize(pre.uint8_from_image(im)[None])
    torch.testing.assert_close(ours, proc(images=im, return_tensors="pt")["pixel_values"],
                               rtol=0, atol=1e-6)


def test_hf_models_bring_their_weights_and_need_a_processor(tmp_path: Path,
                                                            clip_dir: Path) -> None:
    with pytest.raises(UsageError, match="brings its own weights"):
        images.resolve_image_weights(f"hf:{clip_dir}", "none")
    with pytest.raises(UsageError, match=r"--image-model hf:\S+: no config.json"):
        images.resolve_image_weights(f"hf:{tmp_path}", "imagenet")
    bare = tmp_path / "no-processor"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        (bare / f).write_bytes((clip_dir / f).read_bytes())
    with pytest.raises(UsageError, match="cannot load it") as e:
        images.load_image_encoder(f"hf:{bare}", "imagenet")
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- the CLI


def cli(media: Path, out: Path, *extra: str) -> list[str]:
    return ["features", str(media), "-o", str(out), "--audio-model", "none", "--precision",
            "fp32", "--batch-size", "3", "--workers", "1", "-q", *extra]


def test_cli_mobilenet_and_clip_from_frame_folders(tmp_path: Path, clip_dir: Path) -> None:
    """`vpipe features --image-model X --image-weights FILE` on extract-frames folders: rows
    equal the references; the shard attributes say model, weights and preprocessing."""
    media = make_media(tmp_path / "media", {"a_0": (3, None), "b_0": (2, None)}, size=ODD)
    frames = {c: sorted((media / c / "frames").glob("*.jpg")) for c in ("a_0", "b_0")}
    ref_model = torchvision.models.mobilenet_v3_small()
    wfile = tmp_path / "mnv3.pth"
    torch.save(random_state_dict(ref_model, seed=7), wfile)
    out = tmp_path / "mnv3"
    assert main(cli(media, out, "--image-model", "mobilenet_v3_small", "--image-weights",
                    str(wfile))) == 0
    t = torchvision.models.MobileNet_V3_Small_Weights.DEFAULT.transforms()
    with open_features(out) as store:
        for cid, paths in frames.items():
            close(store[cid].image, reference_rows(ref_model, "classifier.3", t, paths), 1e-5)
        a = store.attrs("image")
        assert (a["model"], a["dim"]) == ("mobilenet_v3_small", 1024)
        assert a["weights"]["sha256"] == sha256_of(wfile)
        assert a["layer"] == "input of classifier.3 (the classifier's last Linear, removed)"
        pre = a["preprocessing"]
        assert (pre["resize_size"], pre["crop_size"], pre["interpolation"]) == (
            256, 224, "bilinear")
        assert pre["preset"] == "MobileNet_V3_Small_Weights.IMAGENET1K_V1.transforms()"
    params = json.loads((out / "vpipe.json").read_text())["params"]
    assert params["image_model"] == "mobilenet_v3_small"
    assert params["image_weights"]["sha256"] == sha256_of(wfile)

    out = tmp_path / "clip"
    assert main(cli(media, out, "--image-model", f"hf:{clip_dir}")) == 0
    with open_features(out) as store:
        for cid, paths in frames.items():
            ref = reference_clip(clip_dir, [Image.open(p).convert("RGB") for p in paths])
            np.testing.assert_allclose(store[cid].image, ref, atol=1e-5, rtol=0)
        a = store.attrs("image")
        assert a["dim"] == 24 and a["weights"]["kind"] == "folder"
    params = json.loads((out / "vpipe.json").read_text())["params"]
    assert params["image_weights"]["sha256"]["model.safetensors"] == sha256_of(
        clip_dir / "model.safetensors")


def test_cli_clip_from_video_equals_clip_on_decoded_frames(tmp_path: Path,
                                                           clip_dir: Path) -> None:
    import synth

    from pipeline.media import iter_frames

    video = synth.make_video(tmp_path / "v.mp4", duration_s=2.0, size=(90, 52))
    out = tmp_path / "f"
    assert main(cli(video, out, "--from-video", "--fps", "2", "--image-model",
                    f"hf:{clip_dir}")) == 0
    decoded = [Image.fromarray(f) for _, f in iter_frames(video, fps=2)]
    with open_features(out) as store:
        rows = store["v"].image
        assert rows.shape == (4, 24)
        np.testing.assert_allclose(rows, reference_clip(clip_dir, decoded), atol=1e-5, rtol=0)


def test_cli_unknown_model_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    media = make_media(tmp_path / "media", {"a_0": (1, None)})
    assert main(cli(media, tmp_path / "f", "--image-model", "vit_b_99")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--image-model 'vit_b_99'" in err[0], err
    assert "did you mean" in err[0] and "vit_b_16" in err[0]
    assert not (tmp_path / "f").exists()


def test_plan_check_accepts_new_names_and_refuses_unknown(clip_dir: Path) -> None:
    from pipeline.cli.features_cmds import check_features

    check_features({"image_model": "convnext_tiny", "audio_model": "none"}, fetch=False)
    check_features({"image_model": f"hf:{clip_dir}", "audio_model": "none"}, fetch=True)
    with pytest.raises(UsageError, match="'convnext_tiy'.*did you mean convnext_tiny"):
        check_features({"image_model": "convnext_tiy", "audio_model": "none"}, fetch=False)


def test_cli_hf_model_missing_offline_names_cache_and_option(tmp_path: Path) -> None:
    media = make_media(tmp_path / "media", {"a_0": (1, None)})
    out = tmp_path / "f"
    env = {**os.environ, "HF_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run(
        [sys.executable, "-m", "pipeline",
         *cli(media, out, "--image-model", "hf:openai/clip-vit-base-patch32")],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "vpipe: error: image model 'hf:openai/clip-vit-base-patch32' is not in the Hugging "
        "Face cache"), err
    assert str(tmp_path / "empty" / "hub") in err[0] and "--image-model hf:DIR" in err[0]
    assert not out.exists()
