"""The CUDA subset (``pytest -m gpu``, on a machine with a GPU; skipped elsewhere, and left out
of the default run, which hides CUDA: tests/conftest.py). What only a GPU can show: where the
models and the RNG land, the precision chosen from the GPU's capability, a run resumed from CPU
to CUDA and back, a real out-of-memory halving the calls, and the features against the CPU's
within stated tolerances. Not yet run on a GPU: none was at hand when it was written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_features import args, make_media

from pipeline.cli import main
from pipeline.device import describe_device, pick_device, pick_precision
from pipeline.features.batching import ModelBatch
from pipeline.features.encoders import vggish
from pipeline.shards import open_features
from pipeline.train import TrainConfig, train
from pipeline.train.synthetic import make_feature_set

pytestmark = pytest.mark.gpu

LAST = f"cuda:{torch.cuda.device_count() - 1}" if torch.cuda.is_available() else "cuda"


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return make_media(tmp_path_factory.mktemp("m") / "media",
                      {"a_0": (5, 3.1), "b_0": (4, None), "b_1": (3, 1.5)})


def features(media, weights, out, *extra):
    assert main(args(media, out, weights, *extra)) == 0
    return out


@pytest.fixture(scope="module")
def on_cpu(tmp_path_factory, media, weights):
    return features(media, weights, tmp_path_factory.mktemp("c") / "f", "--device", "cpu")


def test_the_device_chosen_is_current_and_recorded():
    dev = pick_device(LAST)
    assert dev.type == "cuda" and torch.cuda.current_device() == dev.index
    info = describe_device(dev)
    assert info["name"] and info["capability"] and info["cuda"] == torch.version.cuda
    assert info["driver"]  # /proc/driver/nvidia/version is there with a driver loaded


def test_precision_auto_follows_the_capability():
    dev = pick_device("cuda")
    cap = torch.cuda.get_device_capability(dev)
    assert pick_precision("auto", dev) == ("bf16" if cap >= (8, 0) else "fp16")


def test_fp32_features_on_cuda_equal_the_cpus(tmp_path, media, weights, on_cpu):
    """fp32 is IEEE on CUDA (TF32 off): ResNet rows within 1e-4 of the largest, VGGish's
    quantised values equal but for rare one-step flips (a value on a rounding edge)."""
    out = features(media, weights, tmp_path / "f", "--device", LAST)
    info = json.loads((out / "vpipe.json").read_text())
    assert info["device"]["type"] == "cuda" and info["device"]["tf32"] is False
    assert info["device"]["index"] == int(LAST.split(":")[1])
    with open_features(out) as gpu, open_features(on_cpu) as cpu:
        for cid in cpu.clip_ids:
            ref = cpu[cid].image
            if ref.size:
                assert np.abs(gpu[cid].image - ref).max() <= 1e-4 * np.abs(ref).max()
            a, b = gpu[cid].audio, cpu[cid].audio
            assert a.shape == b.shape
            if b.size:
                assert np.abs(a - b).max() <= 1 and (a != b).mean() <= 0.01


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_features_are_close_to_the_cpus(tmp_path, media, weights, on_cpu,
                                                       precision):
    dev = pick_device("cuda")
    if precision == "bf16" and torch.cuda.get_device_capability(dev) < (8, 0):
        pytest.skip("no bf16 on this GPU")
    out = features(media, weights, tmp_path / "f", "--device", "cuda", "--precision", precision)
    with open_features(out) as gpu, open_features(on_cpu) as cpu:
        for cid in cpu.clip_ids:
            ref, got = cpu[cid].image, gpu[cid].image
            if ref.size:
                cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) *
                                            np.linalg.norm(got, axis=1))
                assert cos.min() > 0.995
                assert np.abs(got - ref).max() <= 3e-2 * np.abs(ref).max()
            a, b = gpu[cid].audio, cpu[cid].audio
            if b.size:  # postprocessing in fp32: only the network's rounding moves values,
                # by a few of the 255 steps at most (a broken path moves them by tens)
                assert a.shape == b.shape and np.abs(a - b).mean() <= 2.0


def test_a_real_out_of_memory_halves_the_call():
    dev = pick_device("cuda")
    free, _ = torch.cuda.mem_get_info(dev)
    per_item = free // 3  # 4 items cannot fit, 2 can

    def call(x):
        held = torch.empty(int(x.shape[0]) * per_item, dtype=torch.uint8, device=dev)
        del held
        return x.numpy()

    batch = ModelBatch("cuda", size=8)
    got = batch.run(torch.arange(8.0).reshape(8, 1), call)
    np.testing.assert_array_equal(got[:, 0], np.arange(8.0))
    assert batch.size == 2 and batch.out_of_memory == [8, 4]


def test_vggish_fp16_changes_no_quantised_value_through_postprocessing(weights):
    enc = vggish.load_audio_encoder(str(weights["audio"]), True, str(weights["pca"]))
    enc.to(torch.device("cuda"))
    ex = torch.randn(64, 1, 96, 64, generator=torch.Generator().manual_seed(0)).cuda()
    with torch.autocast("cuda", dtype=torch.float16):
        got = enc.embed(ex)
        with torch.inference_mode():
            raw = enc.model(ex)
    want = vggish.postprocess(raw.float(), *enc.pca).cpu().numpy()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("first,then", [("cpu", "cuda"), ("cuda", "cpu")])
def test_training_resumes_across_devices(tmp_path, first, then):
    csv_path, _ = make_feature_set(tmp_path / "f", "classification", n_sources=20, seed=1)
    base = dict(hidden=16, batch_size=8, val_fraction=0.2, test_fraction=0.2, dropout=0.3)
    train(tmp_path / "f", csv_path, tmp_path / "run", TrainConfig(**base, epochs=2,
                                                                   device=first), quiet=True)
    s = train(tmp_path / "f", csv_path, tmp_path / "run",
              TrainConfig(**base, epochs=4, device=then), resume=True, quiet=True)
    assert s["epochs_run"] == 4
    info = json.loads((tmp_path / "run" / "vpipe.json").read_text())
    assert info["device"]["type"] == then


def test_a_resumed_run_on_another_gpu_draws_the_same_dropout(tmp_path):
    """The CUDA RNG saved is the model's GPU's: a run cut and resumed on the last GPU ends
    with the weights of the same run uninterrupted there."""
    csv_path, _ = make_feature_set(tmp_path / "f", "multilabel", n_sources=20, seed=1)
    cfg = dict(hidden=16, batch_size=8, val_fraction=0.2, test_fraction=0.2, dropout=0.3,
               model="attention", device=LAST)
    train(tmp_path / "f", csv_path, tmp_path / "whole", TrainConfig(**cfg, epochs=4), quiet=True)
    train(tmp_path / "f", csv_path, tmp_path / "cut", TrainConfig(**cfg, epochs=2), quiet=True)
    train(tmp_path / "f", csv_path, tmp_path / "cut", TrainConfig(**cfg, epochs=4), resume=True,
          quiet=True)
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    for k, v in a["model"].items():  # atomics in CUDA's backward: not bit for bit
        torch.testing.assert_close(v, b["model"][k], rtol=1e-3, atol=1e-5, msg=k)


def test_caption_beam_search_never_waits_for_the_gpu():
    """The decode loop runs with CUDA's sync check set to fail on any wait; its captions are
    those of generate, which waits once at the end."""
    from pipeline.train.tasks.caption.model import CaptionModel

    torch.manual_seed(0)
    model = CaptionModel({"image": 8}, 12, hidden=16).cuda().eval()
    lengths = torch.tensor([5, 3, 1])
    x = {"image": (torch.randn(3, 5, 8).cuda(), lengths)}
    enc = model.encode(x)  # packing the sequences needs the lengths on the host
    torch.cuda.set_sync_debug_mode("error")
    try:
        ids, mean_logp, steps = model.decode(*enc, 10, beam=3, stop_early=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert model.generate(x, 10, beam=3) == (ids[:, :int(steps)].tolist(), mean_logp.tolist())
