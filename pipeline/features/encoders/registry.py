"""The encoder interface and the registry by name that the stage, the CLI's plan-time checks
and ``vpipe run`` read: one class per family of networks, registered with
:func:`register_encoder`, found with :func:`encoder_for`.

A family is a class of class methods (nothing is built until :meth:`Encoder.load`), with the
modality it feeds (``image``, ``audio``, ``text``, ``video``): a family owns its options,
its usage checks, where its weights come from, what it records, and its preprocessing.
Nothing outside a family's module asks which family it is.

A family's own options (beyond the ``--<modality>-model``/``-weights`` every modality has) are
declared once, in its :attr:`Encoder.options`: :class:`~pipeline.features.options.FeatureOptions`
gains a field for each, ``vpipe features`` a flag, workflows a key, and the run's recorded
parameters the value where the option says so. A family module imports no torch at import
time (the CLI reads these declarations); its models import it when they load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from pipeline.errors import UsageError

MODALITIES = ("image", "audio", "text", "video")


@dataclass(frozen=True)
class EncoderOption:
    """One option of an encoder family: a field of the options (``name``), a flag of
    ``vpipe features`` (``flags``: ``--name`` or ``--name/--no-name`` for a switch) and a key
    of a workflow's [features] table, all from this one declaration."""

    name: str  # the options' field, and the key in vpipe.json's parameters when recorded
    default: Any
    flags: str
    help: str
    # Recorded in the run's parameters as given (a re-run with another value is refused);
    # False where the family records what the value resolves to instead (a file's digest).
    recorded: bool = False
    # The value's type where the default (None: "decided later") does not say it.
    value_type: type | None = None

    @property
    def type(self) -> Any:
        if self.value_type is not None:
            return self.value_type | None
        return type(self.default)


class Encoder:
    """One family of encoders of one modality (the interface; see the families' modules)."""

    modality: ClassVar[str]
    label: ClassVar[str]  # how the usage errors list it (vggish, hf:NAME, ...)
    identity_at_plan: ClassVar[bool] = True  # whether identity() needs no loaded encoder
    options: ClassVar[tuple[EncoderOption, ...]] = ()  # the family's own options
    collects_missing: ClassVar[bool] = True  # resolve() appends missing files, never raises

    @classmethod
    def claims(cls, name: str) -> bool:
        """Whether ``name`` (the --<modality>-model value) is one of this family's."""
        raise NotImplementedError

    @classmethod
    def check(cls, name: str, opts: Any) -> None:
        """UsageError for options that cannot work, before any file is looked for."""

    @classmethod
    def resolve(cls, name: str, opts: Any, missing: list) -> Any:
        """Find the weights before any work; a published file neither cached nor downloadable
        is appended to ``missing`` (:class:`~pipeline.features.weights.MissingWeights`), so
        that one error names every missing file. Returns what :meth:`load` takes."""
        raise NotImplementedError

    @classmethod
    def identity(cls, resolved: Any, encoder: Any = None) -> dict[str, Any]:
        """What of the weights decides the output, keyed as the run's recorded parameters
        (``encoder``: the loaded one, when there is one)."""
        raise NotImplementedError

    @classmethod
    def load(cls, name: str, opts: Any, resolved: Any) -> Any:
        """The encoder on the CPU, in eval mode (None: this modality is off)."""
        raise NotImplementedError


_REGISTRY: list[type[Encoder]] = []


def register_encoder(cls: type[Encoder]) -> type[Encoder]:
    """Class decorator: make a family findable by :func:`encoder_for`."""
    if cls.modality not in MODALITIES:
        raise ValueError(f"{cls.__name__}: unknown modality {cls.modality!r}")
    taken = {o.name for o in declared_options()}
    for o in cls.options:
        if o.name in taken or not o.name.startswith(f"{cls.modality}_"):
            raise ValueError(f"{cls.__name__}: option {o.name!r} is taken, or does not start "
                             f"with its modality ({cls.modality}_)")
    _REGISTRY.append(cls)
    return cls


def declared_options() -> list[EncoderOption]:
    """Every registered family's own options, in registration order."""
    return [o for cls in _REGISTRY for o in cls.options]


def encoders_of(modality: str) -> list[type[Encoder]]:
    """The registered families of one modality, in registration order."""
    return [c for c in _REGISTRY if c.modality == modality]


def encoder_for(modality: str, name: str) -> type[Encoder]:
    """The family that takes ``name`` for ``modality``; UsageError naming the choices."""
    for cls in encoders_of(modality):
        if cls.claims(name):
            return cls
    choices = [c.label for c in encoders_of(modality)]
    listed = ", ".join(choices[:-1]) + f" or {choices[-1]}" if len(choices) > 1 else choices[0]
    raise UsageError(f"--{modality}-model {name!r}: use {listed}")
