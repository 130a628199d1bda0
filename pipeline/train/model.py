"""The two sequence models over cached features.

``lstm`` is the LRCN setup: an LSTM over the frame-feature sequence and a linear head on its last
valid step (or the mean of its steps). ``attention`` is the multimodal tagging setup: each
modality gets its own (bi)LSTM whose outputs are pooled over time by learned attention, and the
pooled vectors are concatenated before a small classifier; the title (``text``) is a TextCNN
vector beside them and, with ``--attention text-guided``, steers that pooling. Both take, per
modality, a padded batch ``(B, T, D)`` and the true lengths; inputs are normalised with
training statistics kept as buffers, so a checkpoint carries everything predict needs.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from pipeline.shards import TEXT
from pipeline.train.config import ModelSpec, TrainConfig
from pipeline.train.sequences import ClipSequences, batches
from pipeline.train.tasks import get_task
from pipeline.train.text_branch import TextCNN, TextGuidedScore, attend


class Branch(nn.Module):
    """One modality: normalise, run the LSTM over the valid steps, pool to one vector. With
    ``guide_dim`` (text-guided attention) each step is scored against the title's vector."""

    def __init__(
        self, dim: int, hidden: int, layers: int, dropout: float, bidirectional: bool, pool: str,
        guide_dim: int = 0,
    ) -> None:
        super().__init__()
        self.pool = pool
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.lstm = nn.LSTM(
            dim,
            hidden,
            num_layers=layers,
            batch_first=True,
            dropout=dropout if layers > 1 else 0.0,
            bidirectional=bidirectional,
        )
        self.out_dim = hidden * (2 if bidirectional else 1)
        if pool == "attention" and guide_dim:
            self.score = TextGuidedScore(self.out_dim, guide_dim, hidden)
        elif pool == "attention":
            self.score = nn.Sequential(
                nn.Linear(self.out_dim, hidden), nn.Tanh(), nn.Linear(hidden, 1)
            )

    def forward(self, x: torch.Tensor, lengths: torch.Tensor,
                guide: torch.Tensor | None = None) -> torch.Tensor:
        mask = valid_steps(x, lengths)
        has = (lengths > 0).to(x.device, x.dtype)[:, None]
        x = self.normalise(x, mask)
        # A clip without rows in this modality (no audio) runs one zero step, zeroed below.
        packed = pack_padded_sequence(
            x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False
        )
        out, (h, _) = self.lstm(packed)
        if self.pool == "last":
            # h holds the state at each clip's own last step (forward) and first (backward).
            dirs = 2 if self.lstm.bidirectional else 1
            return self.pool_steps(None, torch.cat(list(h[-dirs:]), dim=1), mask, has, guide)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return self.pool_steps(out, None, mask, has, guide)

    def normalise(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The inputs standardised with the training frames' statistics, padding kept zero."""
        return (x - self.mean) / self.std * mask[..., None]

    def pool_steps(self, out: torch.Tensor | None, last: torch.Tensor | None,
                   mask: torch.Tensor, has: torch.Tensor,
                   guide: torch.Tensor | None = None) -> torch.Tensor:
        """The LSTM's outputs ``out`` (B, T, H) over the ``mask``'s valid steps (or ``last``,
        each clip's final states, for ``pool == "last"``) to one vector per clip; a clip
        without rows (``has`` 0) gives zeros. Shared by training and ``export-model``."""
        if self.pool == "last":
            return last * has
        m = mask.to(out.dtype)[..., None]
        if self.pool == "mean":
            return (out * m).sum(1) / m.sum(1).clamp(min=1.0)
        if guide is not None:  # a_t = softmax_t(w^T tanh(W [h_t ; e_text]))
            return attend(out, self.score(out, guide), mask)
        scores = self.score(out).squeeze(-1).masked_fill(~mask, float("-inf"))
        scores = scores.masked_fill(~mask.any(1, keepdim=True), 0.0)  # no valid step: no NaN
        weights = torch.softmax(scores.float(), dim=1).to(out.dtype)
        return (weights[..., None] * out).sum(1) * has


def valid_steps(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, T) True at each clip's valid steps of a padded batch ``x`` (B, T, D)."""
    steps = torch.arange(x.shape[1], device=x.device)
    return steps[None, :] < lengths.to(x.device)[:, None]


class TitleBranch(nn.Module):
    """The title: its frozen token features normalised, then the TextCNN (768 dims)."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.cnn = TextCNN(dim, dropout=dropout)
        self.out_dim = self.cnn.out_dim

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = torch.arange(x.shape[1], device=x.device)[None, :] < lengths.to(x.device)[:, None]
        return self.cnn((x - self.mean) / self.std * mask[..., None], lengths)


class SequenceModel(nn.Module):
    """Per-modality branches, concatenated, then a head with ``n_outputs`` logits/values. The
    ``text`` modality is a :class:`TitleBranch`; with ``text_guided`` (the attention model) its
    vector also steers the attention pooling of the other branches."""

    def __init__(
        self,
        dims: dict[str, int],
        n_outputs: int,
        *,
        model: str = "lstm",
        pool: str = "last",
        hidden: int = 128,
        layers: int = 1,
        dropout: float = 0.2,
        bidirectional: bool = False,
        text_guided: bool = False,
        title_branch: TitleBranch | None = None,
    ) -> None:
        super().__init__()
        pool = "attention" if model == "attention" else pool
        self.modalities = list(dims)
        self.text_guided = text_guided and pool == "attention" and TEXT in dims
        branches: dict[str, nn.Module] = {}
        if TEXT in dims:  # given: the title encoder fine-tuned inside (train.finetune)
            branches[TEXT] = title_branch or TitleBranch(dims[TEXT], dropout)
        guide = branches[TEXT].out_dim if self.text_guided else 0
        for m, d in dims.items():
            if m != TEXT:
                branches[m] = Branch(d, hidden, layers, dropout, bidirectional, pool, guide)
        self.branches = nn.ModuleDict(branches)
        width = sum(b.out_dim for b in self.branches.values())
        if model == "attention":
            # The tagging model puts a fully connected layer between fusion and the classifier.
            self.head = nn.Sequential(
                nn.Dropout(dropout),
                nn.Linear(width, hidden),
                nn.ReLU(),
                nn.Dropout(dropout),
                nn.Linear(hidden, n_outputs),
            )
        else:
            self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, n_outputs))

    @property
    def title_tokens(self):
        """A title's token ids, when the title branch runs its encoder (``--finetune-text``):
        then the model's ``text`` input is those ids; None: the stored token features."""
        title = self.branches[TEXT] if TEXT in self.branches else None
        return getattr(title, "title_tokens", None)

    def set_normalisation(self, stats: dict[str, tuple]) -> None:
        """Store per-modality feature mean/std (from the training frames) in the buffers."""
        for m, (mean, std) in stats.items():
            self.branches[m].mean.copy_(torch.as_tensor(mean))
            self.branches[m].std.copy_(torch.as_tensor(std))

    def forward(self, inputs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        text = self.branches[TEXT](*inputs[TEXT]) if TEXT in self.branches else None
        guide = text if self.text_guided else None
        pooled = [text if m == TEXT else self.branches[m](*inputs[m], guide=guide)
                  for m in self.modalities]
        return self.head(torch.cat(pooled, dim=1))


# --------------------------------------------------------------------------- outputs


def build_model(spec: ModelSpec) -> nn.Module:
    """The model ``spec`` describes (weights not loaded), as its task builds it."""
    return get_task(spec.task).build_model(spec)


def parameter_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """AdamW's parameter groups: every parameter at the run's ``--lr``, but a fine-tuned title
    encoder's (``--finetune-text``) at ``--text-lr`` in a second group of its own."""
    branches = model.branches if isinstance(model, SequenceModel) else {}
    encoder = getattr(branches[TEXT] if TEXT in branches else None, "encoder", None)
    if encoder is None:
        return [{"params": list(model.parameters())}]
    own = {id(p) for p in encoder.parameters()}
    return [{"params": [p for p in model.parameters() if id(p) not in own]},
            {"params": list(encoder.parameters()), "lr": cfg.text_lr}]


def title_tokens_of(model: nn.Module):
    """The model's title tokeniser (a ``--finetune-text`` run's), or None (any other model)."""
    return getattr(model, "title_tokens", None) if isinstance(model, SequenceModel) else None


def to_device(x: dict, device: torch.device) -> dict:
    """Move a batch's padded sequences (lengths stay on the CPU, where packing wants them)."""
    return {m: (a.to(device, non_blocking=True), n) for m, (a, n) in x.items()}


def loss_of(spec: ModelSpec, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The task's loss (MSE on standardised targets, cross-entropy, BCE on tag logits)."""
    return get_task(spec.task).loss(spec, out, y)


def outputs_to_values(spec: ModelSpec, out: torch.Tensor) -> np.ndarray:
    """Model outputs → values (regression), class or tag probabilities."""
    return get_task(spec.task).values(spec, out)


@torch.no_grad()
def run_model(
    model: SequenceModel,
    data: ClipSequences,
    targets: np.ndarray | None,
    spec: ModelSpec,
    device: torch.device,
    batch_size: int = 64,
) -> tuple[np.ndarray, float | None]:
    """Values for every clip of ``data`` and the mean loss when targets are given."""
    model.eval()
    outs, total = [], 0.0
    amp = device.type == "cuda"
    for x, y in batches(data, targets, batch_size):
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            out = model(to_device(x, device))
        if y is not None:
            total += float(loss_of(spec, out, y.to(device))) * len(y)
        outs.append(outputs_to_values(spec, out))
    loss = total / len(data) if targets is not None and len(data) else None
    return (np.concatenate(outs) if outs else np.zeros((0,))), loss
