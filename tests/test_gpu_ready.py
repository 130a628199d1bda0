"""What a first run on a GPU needs, tested on a CPU: the choices of device and precision (from
the capability they are given), a CPU run resumed with a CUDA scaler, VGGish's postprocessing
in fp32 under autocast, the back-off on out-of-memory, the loader's workers and the device a
features run records. The CUDA-only part is tests/test_gpu.py (marker ``gpu``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_features import args, assert_same_features, make_media

from pipeline import device
from pipeline.cli import main
from pipeline.device import fallback_reason, pick_device, pick_precision
from pipeline.errors import UsageError
from pipeline.features.batching import CallSize, ModelBatch, OutOfMemory
from pipeline.features.encoders import vggish
from pipeline.train import TrainConfig, train
from pipeline.train.config import ModelSpec
from pipeline.train.loop import load_scaler, restore
from pipeline.train.model import build_model
from pipeline.train.synthetic import make_feature_set


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """3 clips: 3/4/3 frames, with 2.1 s, no and 0.5 s of audio."""
    return make_media(tmp_path_factory.mktemp("m") / "media",
                      {"a_0": (3, 2.1), "b_0": (4, None), "b_1": (3, 0.5)})


@pytest.fixture(scope="module")
def done(tmp_path_factory, media, weights):
    """A run that fitted (shard size 2)."""
    out = tmp_path_factory.mktemp("f") / "features"
    assert main(args(media, out, weights, "--shard-size", "2")) == 0
    return out


# ---------------------------------------------------------------- item 3: the scaler on resume


def test_a_cpu_runs_state_restores_into_an_enabled_scaler(tmp_path):
    """A CPU run's last.pt holds a disabled scaler's empty state. Resumed on CUDA, the scaler
    is enabled: here the CPU's own GradScaler, enabled (the same class and the same refusal),
    takes a real last.pt through restore() and starts afresh."""
    csv_path, _ = make_feature_set(tmp_path / "f", "regression", n_sources=10, seed=1)
    cfg = TrainConfig(hidden=8, epochs=1, batch_size=8, val_fraction=0.2, test_fraction=0.2)
    train(tmp_path / "f", csv_path, tmp_path / "run", cfg, quiet=True)
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["scaler"] == {}
    with pytest.raises(RuntimeError, match="empty"):  # torch's refusal, unguarded
        torch.amp.GradScaler("cpu", enabled=True).load_state_dict(state["scaler"])

    model = build_model(ModelSpec.from_dict(state["meta"]))
    opt = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    at = restore(state, model, opt, scaler, torch.device("cpu"))
    assert at.epochs_done == 1
    assert scaler.is_enabled() and scaler.get_scale() == 65536.0  # a new scaler's scale
    for k, v in state["model"].items():
        assert torch.equal(model.state_dict()[k], v)


def test_a_cuda_scaler_state_into_a_disabled_scaler_is_a_no_op():
    saved = torch.amp.GradScaler("cpu", enabled=True, init_scale=1024.0).state_dict()
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    load_scaler(disabled, saved)
    assert not disabled.is_enabled() and disabled.state_dict() == {}
    enabled = torch.amp.GradScaler("cpu", enabled=True)
    load_scaler(enabled, saved)
    assert enabled.get_scale() == 1024.0  # a non-empty state is taken as saved


# ---------------------------------------------------------- item 4: VGGish postprocess in fp32


def test_vggish_postprocessing_runs_in_fp32_under_autocast(weights):
    """Under bf16 autocast (CUDA's fp16 the same way) the network runs in half precision, but
    the PCA and quantisation are fp32's: equal to postprocessing the same raw rows in fp32."""
    enc = vggish.load_audio_encoder(str(weights["audio"]), True, str(weights["pca"]))
    g = torch.Generator().manual_seed(0)
    ex = torch.randn(6, 1, 96, 64, generator=g) * 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = enc.embed(ex)
        with torch.inference_mode():
            raw = enc.model(ex)
    want = vggish.postprocess(raw.float(), *enc.pca).numpy()
    np.testing.assert_array_equal(got, want)
    # The test can fail: the same postprocessing under autocast moves values.
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.inference_mode():
        half = vggish.postprocess(raw.float(), *enc.pca).float().numpy()
    assert (half != want).any()


# ------------------------------------------------------------- item 6: out-of-memory back-off


def oom_above(limit: int, call):
    """``call``, made to fail as a GPU does when a call holds more than ``limit`` items."""
    sizes = []

    def limited(x):
        sizes.append(int(x.shape[0]))
        if x.shape[0] > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return call(x)

    return limited, sizes


def test_model_calls_halve_on_out_of_memory_and_keep_the_size():
    model = torch.nn.Linear(6, 3)
    x = torch.randn(40, 6)
    with torch.inference_mode():
        want = model(x).numpy()
    batch = ModelBatch("cpu", size=32)
    call, sizes = oom_above(10, lambda t: model(t).detach().numpy())
    with torch.inference_mode():
        got = batch.run(x, call)
    np.testing.assert_array_equal(got, want)
    assert sizes[:3] == [32, 16, 8] and set(sizes[3:]) <= {8}  # halved twice, then kept
    assert batch.size == 8
    assert batch.report() == {"size": 8, "chosen": "halved after running out of memory",
                              "out_of_memory_at": [32, 16]}


def test_out_of_memory_while_tuning_ends_the_tuning_at_half_the_size():
    batch = ModelBatch("cuda")  # candidates 32..256, tuned
    batch.expect(10_000)
    call, sizes = oom_above(40, lambda t: t[:, :1].numpy())
    got = batch.run(torch.arange(300.0).reshape(300, 1), call)
    np.testing.assert_array_equal(got[:, 0], np.arange(300.0))
    assert batch.size == 32 and batch.out_of_memory == [64]


def test_one_item_that_does_not_fit_is_one_clear_error():
    call, _ = oom_above(0, lambda t: t.numpy())
    with pytest.raises(OutOfMemory, match="out of memory with 1 of the frames") as e:
        ModelBatch("cpu", size=4).run(torch.zeros(4, 2), call)
    assert "\n" not in str(e.value)
    with pytest.raises(OutOfMemory, match="1 of the audio examples"):
        CallSize("audio examples of a clip").run(torch.zeros(3, 2), call)


def test_vggish_calls_of_a_long_clip_halve_on_out_of_memory(weights):
    """A clip's examples in one call, until one runs out of memory: the rows are the same."""
    enc = vggish.load_audio_encoder(str(weights["audio"]), True, str(weights["pca"]))
    ex = torch.randn(5, 1, 96, 64, generator=torch.Generator().manual_seed(1))
    want = enc.embed(ex)
    calls = CallSize("audio examples of a clip")
    call, sizes = oom_above(2, enc.embed)
    got = calls.run(ex, call)
    np.testing.assert_allclose(got, want, atol=1e-5)  # other call sizes: float rounding
    assert sizes == [5, 2, 2, 1] and calls.report() == {"size": 2, "out_of_memory_at": [5]}


def test_a_features_run_out_of_memory_halves_its_calls_and_records_it(tmp_path, monkeypatch,
                                                                       media, weights, done):
    """A run whose image model calls of more than 2 frames fail as a full GPU fails: the same
    shards as the run that fitted, the size used in vpipe.json."""
    from pipeline.features.encoders.loaded import Encoders

    real = Encoders._embed_call

    def limited(self, imgs):
        if imgs.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real(self, imgs)

    monkeypatch.setattr(Encoders, "_embed_call", limited)
    out = tmp_path / "f"
    assert main(args(media, out, weights, "--shard-size", "2")) == 0
    assert_same_features(out, done)
    info = json.loads((out / "vpipe.json").read_text())
    assert info["model_batch"]["size"] == 2
    assert info["model_batch"]["out_of_memory_at"] == [4]


# --------------------------------------------- items 1 and 8: workers, throughput, the device


def test_loader_workers_take_every_core_but_one_on_cuda(monkeypatch):
    from pipeline.features import options

    monkeypatch.setattr(options, "usable_cores", lambda: 16)
    monkeypatch.setattr("pipeline.runner.usable_cores", lambda: 16)
    assert options.loader_workers("cuda") == 15
    assert options.loader_workers("cpu") == 4  # a CPU's model threads need the cores
    monkeypatch.setattr(options, "usable_cores", lambda: 1)
    monkeypatch.setattr("pipeline.runner.usable_cores", lambda: 1)
    assert options.loader_workers("cuda") == options.loader_workers("cpu") == 1


def test_vpipe_json_records_the_device_and_the_throughput(done):
    info = json.loads((done / "vpipe.json").read_text())
    dev = info["device"]
    assert dev["type"] == "cpu" and dev["cores"] >= 1 and "name" in dev
    assert "device" not in info["params"] and "workers" not in info["params"]
    t = info["throughput"]
    assert t["loader_workers"] == 1 and t["frames"] == 10
    assert t["loader_frames_per_s"] > 0 and t["model_frames_per_s"] > 0
    assert 0 <= t["waiting_for_loader_s"] <= t["seconds"]
    assert t["model_seconds"] <= t["seconds"]


def test_a_resume_on_another_device_is_allowed(tmp_path, media, weights):
    """--device is not a recorded parameter: auto, then cpu, goes on in the same folder."""
    out = tmp_path / "f"
    assert main([*args(media, out, weights, "--shard-size", "2"), "--device", "auto"]) == 0
    assert main([*args(media, out, weights, "--shard-size", "2"), "--device", "cpu"]) == 0
    info = json.loads((out / "vpipe.json").read_text())
    assert info["counts"]["already_done"] == 3


# ------------------------------------------------- items 7, 8, 9: device and precision choice


@pytest.mark.parametrize(("asked", "capability", "chosen"), [
    ("auto", (9, 0), "bf16"), ("auto", (8, 0), "bf16"), ("auto", (7, 5), "fp16"),
    ("fp16", (9, 0), "fp16"), ("fp32", (7, 0), "fp32"), ("bf16", (8, 6), "bf16"),
])
def test_precision_on_cuda_follows_the_gpus_capability(asked, capability, chosen):
    assert pick_precision(asked, torch.device("cuda", 0), capability) == chosen


def test_bf16_on_a_gpu_without_it_is_a_usage_error():
    with pytest.raises(UsageError, match="compute capability 8.0 .* this one is 7.5"):
        pick_precision("bf16", torch.device("cuda", 0), (7, 5))
    with pytest.raises(UsageError, match="fp16 needs a CUDA device"):
        pick_precision("fp16", torch.device("cpu"))


def test_a_cuda_device_is_made_the_current_one(monkeypatch):
    """--device cuda:1 must not leave GPU 0 current (the pin thread, the trainer's RNG)."""
    made = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", made.append)
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    assert pick_device("cuda") == torch.device("cuda", 0)
    assert pick_device("auto") == torch.device("cuda", 0)
    assert made == [torch.device("cuda", 1), torch.device("cuda", 0), torch.device("cuda", 0)]
    with pytest.raises(UsageError, match=r"2 CUDA device\(s\) \(cuda:0 to cuda:1\)"):
        pick_device("cuda:2")
    assert pick_device("cpu") == torch.device("cpu") and len(made) == 3


def test_cpu_fallback_with_an_nvidia_driver_names_the_reason(monkeypatch, capsys):
    assert fallback_reason(None, "13.0", "no driver") is None  # no NVIDIA driver: nothing
    assert "CPU-only build" in fallback_reason("550.54", None, None)
    why = fallback_reason("550.54", "13.0", "The NVIDIA driver on your system is too old "
                          "(found version 12040).\nPlease update")
    assert why == ("NVIDIA driver 550.54 found, but CUDA 13.0 (this torch's build, which needs "
                   "a recent enough driver) is not usable: The NVIDIA driver on your system is "
                   "too old (found version 12040).")
    monkeypatch.setattr(device, "nvidia_driver", lambda: "550.54")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device, "_warned", set())
    assert pick_device("auto") == torch.device("cpu")
    assert pick_device("auto") == torch.device("cpu")
    err = capsys.readouterr().err
    assert err.count("vpipe: warning: running on the CPU: NVIDIA driver 550.54 found") == 1
    with pytest.raises(UsageError, match=r"no CUDA device is available \(NVIDIA driver 550"):
        pick_device("cuda")


def test_no_driver_no_warning(monkeypatch, capsys):
    monkeypatch.setattr(device, "nvidia_driver", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    assert capsys.readouterr().err == ""


def test_the_driver_version_is_read_from_proc(monkeypatch, tmp_path):
    text = ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.95.05  Release "
            "Build  (dvs-builder@U22-I3-AF03-09-1)  Tue Sep 23 09:18:39 UTC 2025\n")
    real = device.Path

    def fake(p):
        return tmp_path / "version" if p == "/proc/driver/nvidia/version" else real(p)

    (tmp_path / "version").write_text(text)
    monkeypatch.setattr(device, "Path", fake)
    assert device.nvidia_driver() == "580.95.05"
    (tmp_path / "version").write_text(text.replace("Open Kernel Module for x86_64",
                                                   "UNIX x86_64 Kernel Module"))
    assert device.nvidia_driver() == "580.95.05"


# --------------------------------------------------- item 5: VGGish batched across clips


def test_the_clips_finished_in_a_batch_share_one_audio_call(weights, monkeypatch):
    """Equal, row for row, to one call per clip (the quantised values included); a failed
    clip and a clip without audio in between."""
    from pipeline.features.embed import audio_rows
    from pipeline.features.encoders.loaded import Encoders

    enc = Encoders(None, vggish.load_audio_encoder(str(weights["audio"]), True,
                                                   str(weights["pca"])),
                   torch.device("cpu"), "fp32")
    g = torch.Generator().manual_seed(3)
    ex = [torch.randn(n, 1, 96, 64, generator=g) * 2 for n in (3, 1, 4)]
    done = [(0, (ex[0], None), None), (1, (None, np.zeros(0)), None),
            (2, (ex[1], None), "bad frame"), (3, (ex[2], None), None),
            (4, (ex[2][:0], None), None)]
    calls = []
    real = enc.audio.embed
    monkeypatch.setattr(enc.audio, "embed", lambda x: calls.append(x.shape[0]) or real(x))
    got = audio_rows(done, enc)
    assert calls == [7]  # one call of the examples of every clip that did not fail
    assert got[2] is None
    assert [r.shape[0] for r in (got[0], got[1], got[3], got[4])] == [3, 0, 4, 0]
    for rows, x in ((got[0], ex[0]), (got[3], ex[2])):
        np.testing.assert_array_equal(rows, real(x))


# ------------------------------------------------------- item 9: the trainer's prefetch


def test_prefetched_batches_come_in_order_and_errors_in_their_place():
    from pipeline.train.loop import prefetched

    assert list(prefetched(iter(range(50)), depth=2)) == list(range(50))
    assert list(prefetched(iter(range(5)), depth=0)) == list(range(5))

    def failing():
        yield 1
        yield 2
        raise ValueError("shard 3 unreadable")

    got = []
    with pytest.raises(ValueError, match="shard 3"):
        for b in prefetched(failing(), depth=2):
            got.append(b)
    assert got == [1, 2]


def test_a_consumer_that_stops_early_ends_the_prefetch_thread():
    import threading
    import time

    from pipeline.train.loop import prefetched

    made = []

    def endless():
        i = 0
        while True:
            made.append(i)
            yield i
            i += 1

    gen = prefetched(endless(), depth=2)
    assert next(gen) == 0
    gen.close()
    deadline = time.time() + 5
    while any(t.name == "vpipe-prefetch" for t in threading.enumerate()):
        assert time.time() < deadline, "the prefetch thread did not end"
        time.sleep(0.05)
    assert len(made) <= 5  # it ran at most a few batches ahead


def test_pinned_reaches_every_tensor_of_a_batch(monkeypatch):
    from collections import namedtuple

    from pipeline.train.loop import pinned

    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: t + 1000)  # no GPU to pin for
    Pair = namedtuple("Pair", "x y")
    batch = ({"image": (torch.zeros(2), torch.tensor([1, 2]))},
             Pair(torch.ones(1), [torch.ones(1)]), "ids")
    x, pair, ids = pinned(batch)
    assert x["image"][0].tolist() == [1000, 1000] and x["image"][1].tolist() == [1001, 1002]
    assert isinstance(pair, Pair) and pair.x.item() == 1001 and pair.y[0].item() == 1001
    assert ids == "ids"


def test_without_proc_the_driver_comes_from_nvidia_smi(monkeypatch):
    import subprocess

    real = device.Path
    monkeypatch.setattr(device, "Path", lambda p: real("/nonexistent") / p.lstrip("/"))
    monkeypatch.setattr(device.shutil, "which", lambda name: None)
    assert device.nvidia_driver() is None  # no /proc entry, no nvidia-smi: no driver
    monkeypatch.setattr(device.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(device.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 0, stdout="580.95.05\n580.95.05\n", stderr=""))
    assert device.nvidia_driver() == "580.95.05"
