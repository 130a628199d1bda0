"""Hugging Face models, found before any work: a folder saved with ``save_pretrained``, else a
hub name in the standard cache (``$HF_HOME/hub``, downloaded there when online). The title
encoder (``--text-model``) and the ``hf:`` image encoders (``--image-model hf:NAME``) share
this lookup, its offline message and the identity it records (the hub revision, or a folder's
files by sha256)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import UsageError, WeightsUnavailable
from pipeline.files import sha256_of

# Files whose content identifies a local model folder (weights, config, vocabulary).
IDENTITY_SUFFIXES = (".safetensors", ".bin", ".json", ".txt", ".model")


@dataclass(frozen=True)
class HFModelInfo:
    """Which model, from where: recorded in the shard attributes and vpipe.json."""

    name: str  # the hub name or the folder given
    kind: str  # "hub" or "folder"
    folder: str  # where the files were read from
    revision: str | None = None  # the hub commit of a cached snapshot
    sha256: dict[str, str] | None = None  # a folder's files, by name
    tokenizer: str = ""

    def attrs(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def identity(self) -> dict[str, Any]:
        """Where the weights came from: the hub revision, or a folder's files' sha256."""
        # Not the folder read: a hub snapshot's path depends on this machine's HF_HOME.
        return {k: v for k, v in self.attrs().items() if k != "folder" and v != ""}


def hub_cache_dir() -> Path:
    """The hub cache models are looked for in ($HF_HOME/hub by default)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def resolve_hf_model(
    name: str, option: str, what: str, contents: str, prefix: str = "", hint: str = ""
) -> HFModelInfo:
    """Find a model's files: a local folder, else the hub cache (downloaded there when
    online). WeightsUnavailable (exit 1) naming the model, the cache and ``OPTION DIR`` when
    neither has it. ``option`` and ``what`` name it in messages (``--text-model``, "text
    model"), ``prefix`` the scheme before the name (``hf:``); ``contents``: what the folder
    must hold besides the weights; ``hint`` ends the offline message (another way on)."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise UsageError(
                f"{option} {prefix}{folder}: no config.json (save the model with save_pretrained)"
            )
        sums = {
            f.name: sha256_of(f)
            for f in sorted(folder.iterdir())
            if f.is_file() and f.suffix in IDENTITY_SUFFIXES
        }
        return HFModelInfo(
            name=prefix + str(folder), kind="folder", folder=str(folder), sha256=sums
        )
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(name, local_files_only=True)
    except Exception:
        try:
            path = snapshot_download(name)
        except Exception as e:  # offline, unknown name, proxy: all mean the same to the user
            raise WeightsUnavailable(
                f"{what} {prefix + name!r} is not in the Hugging Face cache ({hub_cache_dir()}, "
                f"$HF_HOME/hub) and could not be downloaded ({type(e).__name__}). Give "
                f"`{option} {prefix}DIR` (a folder saved with save_pretrained, {contents}), "
                f"or fetch the model into that cache on a machine that is online{hint}"
            ) from None
    return HFModelInfo(name=prefix + name, kind="hub", folder=path, revision=Path(path).name)


def load_text_model(folder: str | Path) -> tuple[Any, Any]:
    """The tokenizer and the ``transformers`` encoder of a found model's folder (no download):
    what `vpipe features` encodes titles with and `vpipe train --finetune-text` fine-tunes."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    # transformers 5 draws a "Loading weights" bar on stderr: vpipe's lines are its own.
    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        return tokenizer, AutoModel.from_pretrained(folder, local_files_only=True)
    finally:
        if shown:
            logging.enable_progress_bar()


def max_tokens(model: Any) -> int:
    """How many tokens a title may have: the model's position table (positions past it cannot
    be encoded; titles are far shorter anyway)."""
    return int(getattr(model.config, "max_position_embeddings", 512) or 512)


def tokenize_titles(tokenizer: Any, titles: list[str], limit: int) -> Any:
    """The titles' token ids and attention mask, padded to the longest, as torch tensors:
    the one tokenisation of titles, so that training feeds a title's tokens exactly as the
    features were encoded from them (special tokens included)."""
    return tokenizer(titles, padding=True, truncation=True, max_length=limit,
                     return_tensors="pt")
