"""Where the encoders' weights come from, decided before any work starts: what every family
of :mod:`.encoders` shares.

One of three places: a published checkpoint in torch's hub cache (``$TORCH_HOME/hub/checkpoints``,
downloaded there on first use when the machine is online), a state-dict file given by path
(recorded with its sha256), or a seeded random init (``none``, recorded as such). Every file is
looked for first, so one error names all the missing ones with how to provide each.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch only where a file is read: the CLI imports this module
    import torch
    from torch import nn

from pipeline.errors import WeightsUnavailable

RANDOM_SEED = 0  # `none` weights: seeded, so a resumed run equals an uninterrupted one


@dataclass(frozen=True)
class WeightsInfo:
    """Where weights came from, as recorded in the shard attributes and vpipe.json."""

    kind: str  # "hub", "file" or "random"
    name: str  # the published name, the file path, or "random"
    file: str | None = None
    sha256: str | None = None
    url: str | None = None
    seed: int | None = None

    def attrs(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def identity(self) -> dict[str, Any]:
        """As a resume key: a file by its content, so moving it does not block a resume."""
        return {k: v for k, v in self.attrs().items() if not (self.kind == "file" and k == "name")}


class WeightsRefused(WeightsUnavailable):
    """A weights file given that cannot be used (unreadable, another network): a usage error
    (exit 2), nothing done. Weights merely missing offline stay exit 1, as the stage contract
    says; `vpipe run` stops on either, since the stage made no output."""

    exit_code = 2


class MissingWeights(WeightsUnavailable):
    """A published checkpoint neither in the hub cache nor downloadable, with how to provide it.

    The stage resolves every file first and reports all the missing ones in one error
    (:func:`missing_error`), so an offline user learns them in one run, not one per run.
    """

    def __init__(self, what: str, url: str, path: Path, options: str, reason: str) -> None:
        self.what, self.url, self.path, self.options, self.reason = what, url, path, options, reason
        super().__init__(
            f"{what} weights are not in the cache ({path}) and could not be downloaded "
            f"({reason}). Give {options}, or put {url} at {path} (the torch hub cache: "
            f"$TORCH_HOME/hub/checkpoints/{path.name}, TORCH_HOME defaulting to ~/.cache/torch)"
        )

    def item(self) -> str:
        return (
            f"{self.what} weights ({self.path.name}): download {self.url} into that folder, "
            f"or give {self.options}"
        )


def missing_error(missing: list[MissingWeights]) -> WeightsUnavailable:
    """One error for every missing checkpoint (the single one as it is)."""
    if len(missing) == 1:
        return missing[0]
    first = missing[0]
    lines = [
        f"{len(missing)} weight files are not in the torch hub cache ({first.path.parent}: "
        "$TORCH_HOME/hub/checkpoints, TORCH_HOME defaulting to ~/.cache/torch) and could not be "
        f"downloaded ({first.reason}). For each:",
        *(f"  - {m.item()}" for m in missing),
    ]
    return WeightsUnavailable("\n".join(lines))


def hub_checkpoint(url: str, what: str, options: str) -> Path:
    """The cached file of a published checkpoint, downloaded if missing; else MissingWeights.

    ``options`` says how else to provide it, e.g. "`--image-weights PATH` (a state-dict file)".
    """
    from torch.hub import download_url_to_file, get_dir

    path = Path(get_dir()) / "checkpoints" / os.path.basename(url)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        download_url_to_file(url, str(tmp), progress=False)
        os.replace(tmp, path)
    except Exception as e:  # offline, proxy, HTTP error: all mean the same to the user
        raise MissingWeights(what, url, path, options, f"{type(e).__name__}: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def hub_path(info: WeightsInfo) -> Path:
    """The file a resolved ``hub`` or ``file`` WeightsInfo names."""
    if info.kind == "hub":
        from torch.hub import get_dir

        return Path(get_dir()) / "checkpoints" / str(info.file)
    return Path(info.name)


def load_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A state dict from a file (a training checkpoint's ``state_dict``/``model`` unwrapped)."""
    import torch

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsRefused(
            f"{path}: not a readable {what} state dict ({type(e).__name__}: {e})"
        ) from None
    for key in ("state_dict", "model"):  # training checkpoints often wrap the state dict
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise WeightsRefused(f"{path}: not a {what} state dict")
    return sd


def assign_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """Load a state dict into a model built on the meta device (every tensor must be there)."""
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise WeightsRefused(f"{path}: does not fit {what} ({_mismatch(model, sd, e)})") from None
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta:  # a tensor the file lacks although strict loading passed
            raise WeightsRefused(f"{path}: does not fit {what} (no {name})")
    model.float()  # half-precision files: the stage decides precision itself


def _mismatch(model: nn.Module, sd: dict, e: RuntimeError) -> str:
    """What differs, in one line: torch's own message is a header line and then every key."""
    want = set(model.state_dict())
    missing = [k for k in model.state_dict() if k not in sd]
    extra = [k for k in sd if k not in want]
    if missing or extra:
        parts = [f"{len(v)} {what} keys, e.g. {v[0]!r}"
                 for what, v in (("missing", missing), ("unexpected", extra)) if v]
        if extra and all(str(k).startswith("module.") for k in sd):
            parts.append("its keys start with 'module.' (saved from a DataParallel wrapper)")
        return "; ".join(parts)
    lines = [x.strip() for x in str(e).splitlines()[1:] if x.strip()]
    return lines[0] if lines else str(e).splitlines()[0]
