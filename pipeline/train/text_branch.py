"""The text branch of the tagging model: a TextCNN over the frozen encoder's token features,
and the text-guided attention pooling in which its vector steers the image/audio LSTMs' steps.

:class:`~pipeline.train.model.SequenceModel` uses both: ``--modalities ...,text`` adds the
TextCNN vector to the fusion, ``--attention text-guided`` scores the other branches' steps by it.
"""

from __future__ import annotations

import torch
from torch import nn

WINDOWS = (2, 3, 4)  # the research setup's TextCNN: 256 filters each, 768 dims concatenated
FILTERS = 256


class TextCNN(nn.Module):
    """Token features ``(B, W, D)`` with their lengths to one vector ``(B, 768)``: a 1-d
    convolution per window, tanh, max over the valid positions, concatenated, dropout."""

    def __init__(
        self,
        dim: int,
        filters: int = FILTERS,
        windows: tuple[int, ...] = WINDOWS,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.windows = windows
        self.convs = nn.ModuleList(nn.Conv1d(dim, filters, w) for w in windows)
        self.drop = nn.Dropout(dropout)
        self.out_dim = filters * len(windows)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # Pad to the widest window so a one-token title still gives every window a position.
        pad = max(0, max(self.windows) - x.shape[1])
        return self.pool_windows(nn.functional.pad(x, (0, 0, 0, pad)), lengths)

    def pool_windows(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` on token rows ``(B, T', D)`` already padded to at least the widest
        window; any further zero rows change nothing (``export-model`` pads by a fixed
        ``max(windows) - 1``, which a graph of any title length can do)."""
        x = x.transpose(1, 2)  # (B, D, T')
        lengths = lengths.to(x.device)
        pooled = []
        for w, conv in zip(self.windows, self.convs, strict=True):
            y = torch.tanh(conv(x))  # (B, F, T' - w + 1)
            # Positions whose window reaches past the title's end are left out (at least one).
            valid = (lengths - w + 1).clamp(min=1)
            pos = torch.arange(y.shape[2], device=x.device)
            mask = pos[None, :] < valid[:, None]
            pooled.append(y.masked_fill(~mask[:, None, :], float("-inf")).amax(dim=2))
        has = (lengths > 0).to(x.dtype)[:, None]  # a clip without a title: a zero vector
        return self.drop(torch.cat(pooled, dim=1) * has)


class TextGuidedScore(nn.Module):
    """Attention scores ``w^T tanh(W [h_t ; e_text])`` for every step ``t`` of an LSTM output."""

    def __init__(self, step_dim: int, text_dim: int, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(step_dim + text_dim, hidden)
        self.w = nn.Linear(hidden, 1, bias=False)

    def forward(self, out: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        e = text[:, None, :].expand(-1, out.shape[1], -1)
        return self.w(torch.tanh(self.proj(torch.cat([out, e], dim=2)))).squeeze(-1)


def attend(out: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum_t softmax_t(scores) h_t`` over the valid steps (a clip with none: zeros)."""
    scores = scores.masked_fill(~mask, float("-inf"))
    scores = scores.masked_fill(~mask.any(1, keepdim=True), 0.0)
    weights = torch.softmax(scores.float(), dim=1).to(out.dtype)
    return (weights[..., None] * out).sum(1) * mask.any(1, keepdim=True).to(out.dtype)
