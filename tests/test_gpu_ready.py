"""What a first run on a GPU needs, tested on a CPU: the choices of device and precision (from
the capability they are given), a CPU run resumed with a CUDA scaler, VGGish's postprocessing
in fp32 under autocast, the back-off on out-of-memory, the loader's workers and the device a
features run records. The CUDA-only part is tests/test_gpu.py (marker ``gpu``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.features.encoders import vggish
from pipeline.train import TrainConfig, train
from pipeline.train.config import ModelSpec
from pipeline.train.loop import load_scaler, restore
from pipeline.train.model import build_model
from pipeline.train.synthetic import make_feature_set

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
