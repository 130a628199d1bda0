"""Models defined outside vpipe, as a researcher's own module would define them, for
``vpipe train --model own_models:ClassName`` in tests/test_own_model.py."""

from __future__ import annotations

import torch
from torch import nn


class MeanPool(nn.Module):
    """Each modality's valid rows averaged, concatenated, through a small MLP."""

    def __init__(self, dims: dict[str, int], n_outputs: int) -> None:
        super().__init__()
        self.modalities = list(dims)
        width = sum(dims.values())
        self.head = nn.Sequential(nn.Linear(width, 32), nn.ReLU(), nn.Linear(32, n_outputs))

    def forward(self, inputs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        pooled = []
        for m in self.modalities:
            x, lengths = inputs[m]
            n = lengths.to(x.device).clamp(min=1).to(x.dtype)[:, None]
            pooled.append(x.sum(1) / n)  # padding is zero: the sum is over valid rows
        return self.head(torch.cat(pooled, dim=1))


class Recorder(MeanPool):
    """MeanPool that keeps the last inputs it was given (to check what vpipe hands over)."""

    seen: dict = {}

    def forward(self, inputs):
        Recorder.seen = {m: (x.detach().clone(), n.clone()) for m, (x, n) in inputs.items()}
        return super().forward(inputs)


class NeedsMore(nn.Module):
    def __init__(self, dims: dict[str, int], n_outputs: int, depth: int) -> None:
        super().__init__()


class NotAModule:
    pass


class TooWide(MeanPool):
    """Twice the outputs the task asked for."""

    def __init__(self, dims: dict[str, int], n_outputs: int) -> None:
        super().__init__(dims, 2 * n_outputs)


class Tupled(MeanPool):
    def forward(self, inputs):
        return super().forward(inputs), None


class NoParameters(nn.Module):
    def __init__(self, dims: dict[str, int], n_outputs: int) -> None:
        super().__init__()
        self.n = n_outputs

    def forward(self, inputs):
        x, _ = next(iter(inputs.values()))
        return torch.zeros(x.shape[0], self.n)


class NotANumber(MeanPool):
    def forward(self, inputs):
        return super().forward(inputs) * float("nan")


class Packed(nn.Module):
    """An LSTM over each modality's valid rows through pack_padded_sequence (which the ONNX
    exporter cannot trace: the packed batch sizes depend on the lengths' values)."""

    def __init__(self, dims: dict[str, int], n_outputs: int) -> None:
        super().__init__()
        self.modalities = list(dims)
        self.lstms = nn.ModuleDict({m: nn.LSTM(d, 8, batch_first=True) for m, d in dims.items()})
        self.head = nn.Linear(8 * len(dims), n_outputs)

    def forward(self, inputs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        last = []
        for m in self.modalities:
            x, lengths = inputs[m]
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths.clamp(min=1).cpu(),
                                                       batch_first=True, enforce_sorted=False)
            _, (h, _) = self.lstms[m](packed)
            last.append(h[-1] * (lengths > 0).to(x.dtype)[:, None])
        return self.head(torch.cat(last, dim=1))


class Truncating(MeanPool):
    """MeanPool over the batch's first ``max(lengths)`` rows (all of them: the rest is
    padding), cut by a Python int that a trace records as the traced batch's constant."""

    def forward(self, inputs):
        cut = {}
        for m, (x, lengths) in inputs.items():
            n = int(lengths.max())
            cut[m] = (x[:, :n], lengths)
        return super().forward(cut)
