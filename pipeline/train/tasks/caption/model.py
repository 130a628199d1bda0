"""The captioning model: an encoder over the feature sequences and an LSTM decoder that emits a
caption word by word, attending over the encoded steps at each word (soft attention, as
SA-LSTM) or, with ``attention="none"``, starting from the mean-pooled features only.

Each modality is normalised with training statistics (buffers), projected to ``hidden`` and run
through its own bidirectional LSTM; the steps of all modalities form one memory the decoder
attends over. Training is teacher-forced; decoding is greedy or by beam search (``beam`` > 1),
batched over clips, and returns each caption with its mean log-probability per word.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from pipeline.train.config import ModelSpec
from pipeline.train.tasks.caption.vocab import BOS_ID, EOS_ID, PAD_ID


def _mask(lengths: torch.Tensor, t: int, device: torch.device) -> torch.Tensor:
    return torch.arange(t, device=device)[None, :] < lengths.to(device)[:, None]


class Encoder(nn.Module):
    """One modality: normalise, project, a bidirectional LSTM over the valid steps."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.proj = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.lstm = nn.LSTM(hidden, hidden // 2, batch_first=True, bidirectional=True)

    def normalised(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple:
        mask = _mask(lengths, x.shape[1], x.device)
        return (x - self.mean) / self.std * mask[..., None], mask

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, mask = self.normalised(x, lengths)
        packed = pack_padded_sequence(self.proj(x), lengths.clamp(min=1).cpu(), batch_first=True,
                                      enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return out * mask[..., None], mask


class CaptionModel(nn.Module):
    """Encoders per modality, an LSTM decoder with (or without) soft attention, a word head."""

    def __init__(self, dims: dict[str, int], vocab_size: int, *, hidden: int = 128,
                 dropout: float = 0.2, attention: str = "soft") -> None:
        super().__init__()
        hidden += hidden % 2  # two LSTM directions of hidden/2
        self.modalities, self.attention, self.hidden = list(dims), attention, hidden
        self.encoders = nn.ModuleDict({m: Encoder(d, hidden, dropout) for m, d in dims.items()})
        # "none" starts from the mean of the normalised features, as the mean-pooling model.
        pooled = hidden * len(dims) if attention == "soft" else sum(dims.values())
        self.init = nn.Linear(pooled, 2 * hidden)
        self.embed = nn.Embedding(vocab_size, hidden, padding_idx=PAD_ID)
        ctx = hidden if attention == "soft" else 0
        self.cell = nn.LSTMCell(hidden + ctx, hidden)
        if attention == "soft":
            self.att_mem = nn.Linear(hidden, hidden, bias=False)
            self.att_h = nn.Linear(hidden, hidden)
            self.att_v = nn.Linear(hidden, 1, bias=False)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden + ctx, vocab_size)

    def set_normalisation(self, stats: dict[str, tuple]) -> None:
        """Store per-modality feature mean/std (from the training frames) in the buffers."""
        for m, (mean, std) in stats.items():
            self.encoders[m].mean.copy_(torch.as_tensor(mean))
            self.encoders[m].std.copy_(torch.as_tensor(std))

    def encode(self, inputs: dict) -> tuple:
        """(memory (B, S, H) or None, its mask, the decoder's first (h, c))."""
        if self.attention == "none":
            means = []
            for m in self.modalities:
                x, mask = self.encoders[m].normalised(*inputs[m])
                means.append(x.sum(1) / mask.sum(1, keepdim=True).clamp(min=1))
            mem, mask, pooled = None, None, torch.cat(means, 1)
        else:
            outs = [self.encoders[m](*inputs[m]) for m in self.modalities]
            mem = torch.cat([o for o, _ in outs], 1)
            mask = torch.cat([k for _, k in outs], 1)
            pooled = torch.cat([o.sum(1) / k.sum(1, keepdim=True).clamp(min=1) for o, k in outs], 1)
            mask = mask | ~mask.any(1, keepdim=True)  # a clip without any step: no NaN
        h, c = torch.tanh(self.init(pooled)).chunk(2, dim=1)
        return mem, mask, (h.contiguous(), c.contiguous())

    def step(self, word: torch.Tensor, state: tuple, mem, mask) -> tuple[torch.Tensor, tuple]:
        """One word in, the next word's logits and the new state out."""
        e = self.drop(self.embed(word))
        h, c = state
        if mem is not None:
            score = self.att_v(torch.tanh(self.att_mem(mem) + self.att_h(h)[:, None])).squeeze(-1)
            a = torch.softmax(score.float().masked_fill(~mask, float("-inf")), 1).to(mem.dtype)
            ctx = (a[..., None] * mem).sum(1)
            h, c = self.cell(torch.cat([e, ctx], 1), (h, c))
            out = torch.cat([h, ctx], 1)
        else:
            h, c = self.cell(e, (h, c))
            out = h
        return self.head(self.drop(out)), (h, c)

    def forward(self, inputs: dict, words: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: logits (B, L, V) for ``words`` (B, L; ``<bos>`` first)."""
        mem, mask, state = self.encode(inputs)
        logits = []
        for t in range(words.shape[1]):
            out, state = self.step(words[:, t], state, mem, mask)
            logits.append(out)
        return torch.stack(logits, 1)

    @torch.no_grad()
    def generate(self, inputs: dict, max_words: int, beam: int = 1,
                 stop_early: bool | None = None) -> tuple[list, list]:
        """Word ids of each clip's caption (up to ``<eos>``) and its mean log-prob per word."""
        mem, mask, state = self.encode(inputs)
        seqs, mean_logp, steps = self.decode(mem, mask, state, max_words, beam, stop_early)
        steps = int(steps)  # the one wait for the device
        return seqs[:, :steps].tolist(), mean_logp.tolist()

    @torch.no_grad()
    def decode(self, mem, mask, state: tuple, max_words: int, beam: int = 1,
               stop_early: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Beam search from ``encode``'s output, all on the device: each clip's best word ids
        (B, up to max_words + 1), their mean log-prob per word (B,), and how many steps ran until
        every beam had ended (the columns that count). Nothing in the loop waits for the device: the
        steps after the last beam ended change nothing. ``stop_early`` (the default on the CPU,
        where asking costs nothing) leaves the loop then instead; the result is the same."""
        h, c = state
        b, k, dev = h.shape[0], max(1, beam), h.device
        stop_early = dev.type == "cpu" if stop_early is None else stop_early
        rep = lambda x: None if x is None else x.repeat_interleave(k, 0)  # noqa: E731
        mem, mask, h, c = rep(mem), rep(mask), rep(h), rep(c)
        # Beam 0 of each clip starts alive; the others at -inf so the first step fills them.
        score = torch.full((b, k), float("-inf"), device=dev)
        score[:, 0] = 0.0
        word = torch.full((b * k,), BOS_ID, dtype=torch.long, device=dev)
        seqs = torch.zeros((b * k, 0), dtype=torch.long, device=dev)
        done = torch.zeros(b * k, dtype=torch.bool, device=dev)
        first = torch.arange(b, device=dev)[:, None] * k
        stay = torch.arange(b * k, device=dev)
        pad_only = torch.full((self.head.out_features,), float("-inf"), device=dev)
        pad_only[PAD_ID] = 0.0
        steps = torch.zeros((), dtype=torch.long, device=dev)
        for _ in range(max_words + 1):
            ended = done.all()
            steps = steps + (~ended).long()
            logits, (h, c) = self.step(word, (h, c), mem, mask)
            logp = F.log_softmax(logits.float(), -1)
            v = logp.shape[1]
            # A finished beam only extends with <pad> at no cost, keeping its score.
            logp = torch.where(done[:, None], pad_only, logp)
            total = (score.reshape(-1, 1) + logp).reshape(b, k * v)
            top, idx = total.topk(k, dim=1)
            # Once all have ended, a step keeps every beam as it is (topk could reorder ties).
            score = torch.where(ended, score, top)
            origin = torch.where(ended, stay, (idx // v + first).reshape(-1))
            word = torch.where(ended, PAD_ID, (idx % v).reshape(-1))
            seqs = torch.cat([seqs[origin], word[:, None]], 1)
            h, c, done = h[origin], c[origin], done[origin] | (word == EOS_ID)
            word = word.masked_fill(done, PAD_ID)
            if stop_early and bool(done.all()):
                break
        seqs = seqs.reshape(b, k, -1)
        n_words = ((seqs != PAD_ID).sum(-1)).clamp(min=1).float()  # <eos> counted, as scored
        best = score.argmax(1)  # beams are ranked by total log-prob, as topk keeps them
        rows = torch.arange(b, device=dev)
        return seqs[rows, best], score[rows, best] / n_words[rows, best], steps


def build_caption_model(spec: ModelSpec) -> CaptionModel:
    """The caption model ``spec`` describes (weights not loaded)."""
    c = spec.config
    return CaptionModel(spec.dims, len(spec.classes), hidden=c.hidden, dropout=c.dropout,
                        attention=c.caption_attention)


def caption_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per word, padding ignored."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=PAD_ID)
