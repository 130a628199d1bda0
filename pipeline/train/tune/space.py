"""The search space of ``vpipe tune``: ``--search`` terms read, checked and written back.

A term is ``OPTION=VALUES`` with OPTION a ``vpipe train`` option (``batch-size`` or
``batch_size``) and VALUES a range ``LOW..HIGH`` (``:log`` for a log scale) or choices
``A,B,C``. A range is of integers when the option takes an integer (``hidden=32..256``),
else of floats. Every value at the ends of a range and every choice is checked as ``vpipe train``
checks its options, so a space that would make a trial fail on its options is refused before
anything is written.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import asdict, dataclass, replace
from typing import Any

from pipeline.errors import UsageError
from pipeline.train.config import NOT_OPTIONS, TrainConfig

# Train options a search may not vary, and why.
NOT_SEARCHED = {
    **dict.fromkeys(("device", "stream", "threads"), "does not change what is learned"),
    **dict.fromkeys(("task", "val_fraction", "test_fraction", "folds", *NOT_OPTIONS),
                    "would change the splits the trials are compared on"),
    "modalities": "cannot be searched (a list)",
    # --seed also deals the sources into train/val/test (and folds): trials drawing other seeds
    # would each be scored on other val clips, and the best be the luckiest split
    "seed": "draws the split too: each trial would be scored on other val clips",
}


@dataclass(frozen=True)
class Dimension:
    """One searched option: a range (``low``, ``high``, ``log``) or ``choices``."""

    name: str  # the TrainConfig field
    kind: type  # int, float, bool or str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple = ()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def term(self) -> str:
        """The term as written canonically (``lr=0.0001..0.01:log``)."""
        key = self.name.replace("_", "-")
        if self.choices:
            return f"{key}={','.join(_word(v) for v in self.choices)}"
        return f"{key}={_num(self.low)}..{_num(self.high)}" + (":log" if self.log else "")

    def distribution(self) -> Any:
        """The Optuna distribution of this dimension."""
        from optuna.distributions import (
            CategoricalDistribution,
            FloatDistribution,
            IntDistribution,
        )

        if self.choices:
            return CategoricalDistribution(list(self.choices))
        if self.kind is int:
            return IntDistribution(int(self.low), int(self.high), log=self.log)
        return FloatDistribution(float(self.low), float(self.high), log=self.log)


def _num(x: float | None) -> str:
    return str(int(x)) if isinstance(x, int) else repr(x)


def _word(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def option_kinds() -> dict[str, type]:
    """The searchable train options and the type of their values."""
    kinds = {}
    for name, default in asdict(TrainConfig()).items():
        if name in NOT_SEARCHED:
            continue
        kinds[name] = str if default is None else type(default)
    return kinds


def parse_space(terms: list[str], base: TrainConfig) -> list[Dimension]:
    """``--search`` (each value one or more terms separated by spaces) as dimensions, each
    checked against the train options ``base`` holds; a usage error names the bad term."""
    words = [w for t in terms for w in shlex.split(t)]
    if not words:
        raise UsageError("--search: give at least one OPTION=VALUES term, e.g. "
                         "--search 'lr=1e-4..1e-2:log hidden=64,128,256'")
    dims: dict[str, Dimension] = {}
    for word in words:
        dim = parse_term(word)
        if dim.name in dims:
            raise UsageError(f"--search {word}: {dim.flag} is searched twice")
        check_values(word, dim, base)
        dims[dim.name] = dim
    return list(dims.values())


def parse_term(word: str) -> Dimension:
    """One ``OPTION=VALUES`` term, its values read as the option's type."""
    key, sep, values = word.partition("=")
    name = key.strip().lstrip("-").replace("-", "_")
    kinds = option_kinds()
    if not sep or not name or not values:
        raise UsageError(f"--search {word}: write OPTION=LOW..HIGH[:log] or OPTION=A,B,C")
    if name not in kinds:
        why = NOT_SEARCHED.get(name, "is not a train option")
        raise UsageError(f"--search {word}: --{name.replace('_', '-')} {why} (searchable: "
                         f"{', '.join(k.replace('_', '-') for k in kinds)})")
    kind = kinds[name]
    if ".." in values:
        if kind not in (int, float):
            raise UsageError(f"--search {word}: --{name.replace('_', '-')} takes choices A,B,C")
        low_text, _, rest = values.partition("..")
        high_text, colon, scale = rest.partition(":")
        if colon and scale != "log":
            raise UsageError(f"--search {word}: after a range, only :log (a log scale)")
        low, high = _value(word, kind, low_text), _value(word, kind, high_text)
        if not low < high:
            raise UsageError(f"--search {word}: a range goes from low to high")
        if scale and low <= 0:
            raise UsageError(f"--search {word}: a :log range must start above 0")
        return Dimension(name, kind, low, high, log=bool(scale))
    choices = tuple(dict.fromkeys(_value(word, kind, v) for v in values.split(",")))
    return Dimension(name, kind, choices=choices)


def _value(word: str, kind: type, text: str) -> Any:
    text = text.strip()
    try:
        if kind is bool:
            if text.lower() not in ("true", "false"):
                raise ValueError(text)
            return text.lower() == "true"
        if kind is int:
            return int(text)
        if kind is float:
            x = float(text)
            if not math.isfinite(x):
                raise ValueError(text)
            return x
    except ValueError:
        name = {bool: "true or false", int: "a whole number", float: "a number"}[kind]
        raise UsageError(f"--search {word}: {text!r} is not {name}") from None
    if not text:
        raise UsageError(f"--search {word}: an empty choice")
    return text


def check_values(word: str, dim: Dimension, base: TrainConfig) -> None:
    """Refuse a dimension whose ends or choices ``vpipe train`` would refuse."""
    from pipeline.train.inputs import check_config

    for v in dim.choices or (dim.low, dim.high):
        try:
            check_config(replace(base, **{dim.name: v}))
        except UsageError as e:
            raise UsageError(f"--search {word}: {e}") from None


def describe(dims: list[Dimension]) -> str:
    """The space as one canonical string (recorded in ``vpipe.json``)."""
    return " ".join(d.term() for d in dims)


# --------------------------------------------------------------------------- the best options


def cli_words(options: dict[str, Any]) -> list[str]:
    """Options as ``vpipe train`` words (``--lr 0.001 --bidirectional``)."""
    words: list[str] = []
    for name, v in options.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(v, bool):
            words.append(flag if v else "--no-" + flag[2:])
        else:
            words += [flag, _word(v)]
    return words


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def set_line(options: dict[str, Any], stage: str = "train") -> str:
    """``vpipe run`` overrides: ``--set train.lr=0.001 --set train.hidden=64``."""
    return " ".join("--set " + shlex.quote(f"{stage}.{k.replace('_', '-')}={toml_value(v)}")
                    for k, v in options.items())


def workflow_snippet(options: dict[str, Any], stage: str = "train") -> str:
    """The options as lines of a workflow's ``[train]`` table."""
    lines = [f"[{stage}]"] + [f"{k.replace('_', '-')} = {toml_value(v)}"
                              for k, v in options.items()]
    return "\n".join(lines) + "\n"
