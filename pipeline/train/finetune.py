"""``vpipe train --finetune-text``: the title encoder that ``vpipe features --text`` ran, loaded
again and trained inside the model, the TextCNN on top (the tagging setup's ``ernie_freeze``
switch turned off).

The encoder is the one the shards' ``/text`` attributes record: found where ``vpipe features``
found it (its folder, also relative to the folder that command ran in, or the Hugging Face
cache) and checked against the record by content (the hub revision, or the folder's files by
sha256, and the tokenizer's class) before anything is written; one that cannot be found,
cannot be loaded or is not the recorded one is one line (:class:`TextEncoderUnavailable`,
exit 2). Its input is each clip's title as the shards keep it (``/text/strings``: the title
after the ``--text-max-chars`` cut), tokenised by the one tokenisation of titles
(:func:`pipeline.hf.tokenize_titles`), so that the tokens are the ones the features were
encoded from (their count is checked against the clip's stored rows). The encoder's weights
are the model's (``branches.text.encoder.*`` in ``best.pt`` and ``last.pt``), trained at
``--text-lr`` in a second AdamW parameter group; ``evaluate`` and ``predict`` load the encoder
from its source again, checked the same way, and the fine-tuned weights from the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import UsageError, VpipeError, one_line
from pipeline.files import content_identity
from pipeline.hf import HFModelInfo, load_text_model, max_tokens, resolve_hf_model, tokenize_titles
from pipeline.records import read_run_info
from pipeline.shards import TEXT, FeatureStore
from pipeline.train.config import ModelSpec
from pipeline.train.model import TitleBranch


class TextEncoderUnavailable(UsageError):
    """The title encoder a ``--finetune-text`` run needs cannot be found or loaded, or is not
    the one the features were made with (exit 2, before training)."""


@dataclass(frozen=True)
class TitleTokens:
    """A title as the encoder's token ids, ``(tokens,)`` int64, exactly as ``vpipe features``
    tokenised it (special tokens included); a clip without a title has none."""

    tokenizer: Any
    limit: int

    def __call__(self, title: str) -> np.ndarray:
        if not title:
            return np.zeros((0,), np.int64)
        ids = tokenize_titles(self.tokenizer, [title], self.limit)["input_ids"][0]
        return ids.numpy().astype(np.int64)


@dataclass
class TitleEncoder:
    """The loaded encoder, its tokens, and the record a run keeps of it (``ModelSpec``)."""

    model: nn.Module
    tokens: TitleTokens
    record: dict


def encoder_record(store: FeatureStore, features: Path) -> dict:
    """What a run records of the features' title encoder: the recorded ``model`` and
    ``weights`` of ``/text``, and ``where`` it is found now (an absolute folder, a hub name)."""
    attrs = store.attrs(TEXT)
    name, weights = str(attrs.get("model", "")), attrs.get("weights")
    if not name or not isinstance(weights, dict):
        raise TextEncoderUnavailable(f"--finetune-text: {features}: the shards' /text group "
                                     "records no text model; make the features again with "
                                     "`vpipe features --text`")
    where = name
    if weights.get("kind") == "folder" and not Path(name).expanduser().is_absolute():
        # As typed to `vpipe features`: relative to the folder that command ran in.
        info = read_run_info(features) or {}
        ran_in = Path(info["cwd"]) if info.get("cwd") else None
        if not Path(name).is_dir() and ran_in is not None and (ran_in / name).is_dir():
            where = str(ran_in / name)
        where = str(Path(where).expanduser().resolve())
    return {"model": name, "where": where, "weights": weights}


def load_encoder(record: dict) -> TitleEncoder:
    """The recorded encoder, loaded on the CPU and checked against the record;
    :class:`TextEncoderUnavailable` naming the model and the cause otherwise."""
    name = record["model"]
    said = f"--finetune-text: the text model {name!r} the features' titles were encoded with"
    where = record["where"]
    if record["weights"].get("kind") == "folder" and not Path(where).is_dir():
        if not Path(name).is_dir():  # as typed to `vpipe features`, from here: a last try
            raise TextEncoderUnavailable(f"{said} cannot be found: no folder {where}")
        where = name
    try:
        info = resolve_hf_model(where, "--text-model", "text model", "tokenizer included")
    except VpipeError as e:
        where = "" if where == name else f" (looked for at {where})"
        raise TextEncoderUnavailable(
            f"{said} cannot be found{where}: {one_line(str(e)).split('. ')[0]}") from None
    try:
        # Loading draws nothing from the run's seeded generator: the other weights are
        # initialised as a run without --finetune-text initialises them.
        with torch.random.fork_rng(devices=[]):
            tokenizer, model = load_text_model(info.folder)
    except Exception as e:  # transformers raises OSError, ValueError, ...: one line for all
        raise TextEncoderUnavailable(
            f"{said} cannot be loaded from {info.folder}: {type(e).__name__}: "
            f"{one_line(str(e)).strip()[:300]}") from None
    now = HFModelInfo(**{**info.attrs(), "tokenizer": type(tokenizer).__name__}).identity()
    if differs := differences(content_identity(record["weights"]), content_identity(now)):
        raise TextEncoderUnavailable(
            f"{said} is not the one at {info.folder} now ({'; '.join(differs)}); fine-tune "
            "the encoder that made the features, or make them again with this one")
    return TitleEncoder(model.float(), TitleTokens(tokenizer, max_tokens(model)), record)


def differences(recorded: dict, now: dict, where: str = "") -> list[str]:
    """What differs between two identities, as ``key: recorded then, now`` (a folder's files
    by name: ``sha256 config.json: 1a2b3c4d5e6f... then, 6f5e4d3c2b1a... now``)."""
    out = []
    for k in sorted(set(recorded) | set(now)):
        a, b = recorded.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{where}{k} ")
        elif a != b:
            short = [v[:12] + "..." if isinstance(v, str) and len(v) == 64 else v for v in (a, b)]
            out.append(f"{where}{k}: {short[0]!r} then, {short[1]!r} now")
    return out


def check_encoder(store: FeatureStore, features: Path, dim: int) -> TitleEncoder:
    """``--finetune-text``'s check before anything is written: the features' encoder found,
    loaded and the recorded one, its width the stored rows'."""
    enc = load_encoder(encoder_record(store, features))
    width = int(enc.model.config.hidden_size)
    if width != dim:
        raise TextEncoderUnavailable(
            f"--finetune-text: the text model {enc.record['model']!r} gives {width} dims, "
            f"the features' /text rows have {dim}")
    return enc


class FinetunedTitleBranch(TitleBranch):
    """The title branch of ``--finetune-text``: token ids through the encoder (trained), then
    the frozen branch's normalisation (the statistics of the stored features, the encoder's
    before training) and TextCNN."""

    def __init__(self, encoder: TitleEncoder, dim: int, dropout: float) -> None:
        super().__init__(dim, dropout)
        self.encoder = encoder.model
        self.title_tokens = encoder.tokens

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        steps = torch.arange(ids.shape[1], device=ids.device)
        # A clip without a title attends to one padding token; the TextCNN zeroes its vector.
        mask = steps[None, :] < lengths.to(ids.device).clamp(min=1)[:, None]
        hidden = self.encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return super().forward(hidden.float(), lengths)


def title_branch(spec: ModelSpec) -> FinetunedTitleBranch:
    """The fine-tuned title branch of a run's model (the encoder as loaded: a checkpoint's
    weights go over it)."""
    if not spec.text_encoder:
        raise UsageError("this run fine-tunes its text encoder but does not record which one "
                         "(config.json has no text_encoder)")
    return FinetunedTitleBranch(load_encoder(spec.text_encoder), spec.dims[TEXT],
                                spec.config.dropout)

