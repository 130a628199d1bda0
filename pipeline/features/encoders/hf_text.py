"""The title encoder (``--text``, ``--text-model``): a frozen Hugging Face ``transformers``
encoder that turns each title into per-token features. Its weights come through the standard
hub cache (``HF_HOME``) or a folder saved with ``save_pretrained`` (:mod:`pipeline.hf`);
which one, and its revision or files' sha256, is recorded. The titles themselves are
:mod:`pipeline.features.text`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, ClassVar

import numpy as np

from pipeline.features.encoders.registry import Encoder, register_encoder
from pipeline.hf import (
    HFModelInfo,
    load_text_model,
    max_tokens,
    resolve_hf_model,
    tokenize_titles,
)

# The other ways on, offline: the title encoder is the one model a run can do without.
OFFLINE_HINT = ("; or run without titles (leave out --text; for the tagging workflow: "
                "`vpipe run video-tagging-notext`)")


@register_encoder
class HFText(Encoder):
    """``--text-model NAME|DIR``: any transformers encoder with a tokenizer."""

    modality: ClassVar[str] = "text"
    label: ClassVar[str] = "a Hugging Face name or folder"
    # Known at plan time but for the tokenizer's class, read when loaded: `vpipe predict`
    # compares what is known (workflow.replay.same_identity) before any stage runs.
    identity_at_plan: ClassVar[bool] = True
    collects_missing: ClassVar[bool] = False  # the hub lookup raises its own error

    @classmethod
    def claims(cls, name: str) -> bool:
        return True

    @classmethod
    def resolve(cls, name: str, opts: Any, missing: list) -> Any:
        return resolve_text_model(name)

    @classmethod
    def identity(cls, resolved: Any, encoder: Any = None) -> dict[str, Any]:
        # The tokenizer's class is part of it, known once the encoder is loaded.
        return {"text_model": (encoder or resolved).identity()}

    @classmethod
    def load(cls, name: str, opts: Any, resolved: Any) -> TextEncoder:
        return TextEncoder(resolved)  # on the CPU: the bundle moves it


# The title encoder's identity: a Hugging Face model's (see :mod:`pipeline.hf`).
TextModelInfo = HFModelInfo


def resolve_text_model(name: str) -> TextModelInfo:
    """Find the encoder's files before any work: a local folder, else the hub cache (downloaded
    there when online). WeightsUnavailable (exit 1) naming the model, the cache and
    ``--text-model DIR`` when neither has it."""
    return resolve_hf_model(name, "--text-model", "text model", "tokenizer included",
                            hint=OFFLINE_HINT)


class TextEncoder:
    """A frozen ``transformers`` encoder in inference mode: titles in, the last hidden state of
    every token out, special tokens ([CLS], [SEP]) included, as the TextCNN reads them
    (``vpipe train --finetune-text`` runs the same model on the same tokens, and trains it)."""

    def __init__(self, info: TextModelInfo, device: str = "cpu", dtype: Any = None) -> None:
        import torch

        self.tokenizer, model = load_text_model(info.folder)
        model = model.to(device=device, dtype=dtype or torch.float32)
        self.model = model.eval().requires_grad_(False)  # frozen: never trained here
        self.device = device
        self.dim = int(model.config.hidden_size)
        self.max_tokens = max_tokens(model)
        self.info = TextModelInfo(**{**asdict(info), "tokenizer": type(self.tokenizer).__name__})

    def to(self, device: Any, dtype: Any = None) -> TextEncoder:
        """The model on ``device`` in ``dtype`` (None: float32)."""
        import torch

        self.model.to(device=device, dtype=dtype or torch.float32)
        self.device = device
        return self

    def attrs(self) -> dict[str, Any]:
        """The /text group's attributes (``max_chars`` is the stage's to add)."""
        info = self.info
        return {"model": info.name, "weights": self.identity(), "tokenizer": info.tokenizer,
                "special_tokens": "included"}

    def identity(self) -> dict[str, Any]:
        """Where the weights came from: the hub revision, or a folder's files' sha256."""
        return self.info.identity()

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> list[np.ndarray]:
        """Each text's token features ``(tokens, dim)`` float32, batched with padding."""
        import torch

        out: list[np.ndarray] = []
        for start in range(0, len(texts), batch_size):
            batch = list(texts[start : start + batch_size])
            enc = tokenize_titles(self.tokenizer, batch, self.max_tokens).to(self.device)
            with torch.inference_mode():
                hidden = self.model(**enc).last_hidden_state.float().cpu().numpy()
            lengths = enc["attention_mask"].sum(dim=1).tolist()
            out.extend(hidden[i, : int(n)].copy() for i, n in enumerate(lengths))
        return out

