"""Reading a workflow file and planning it: every stage and option checked against the CLI's own
commands, each stage turned into the argument list of its ``vpipe`` command."""

from __future__ import annotations

import dataclasses
import re
import shlex
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import UsageError
from pipeline.files import read_user_text


@dataclass(frozen=True)
class StageSpec:
    """How a command is wired: the kinds of folder its positional arguments take (in order),
    the kind it makes, and where its output goes: ``dir`` (``work_dir/<stage>``), a file name
    inside the folder of the first kind it reads (a run's predictions go in the run), or
    ``None`` (no output)."""

    needs: tuple[str, ...]
    makes: str | None
    out: str | None = "dir"
    labels: bool = False
    # One unit of work (no per-item manifest): its --overwrite always starts it again, so the
    # runner passes it only when the output is to be redone.
    whole: bool = False
    # Where in its output the kind it makes is (a search's best run: OUT/best); None: all of it.
    made_at: str | None = None


# The commands a workflow may list. Kinds: "videos" (files/folders of videos, or subclips),
# "media" (frames + audio), "features" (HDF5 shards), "run" (a trained model's folder).
STAGES: dict[str, StageSpec] = {
    "subclip": StageSpec(("videos",), "videos"),
    "extract-frames": StageSpec(("videos",), "media"),
    "extract-audio": StageSpec(("videos",), "media"),
    "features": StageSpec(("media",), "features"),
    "inspect": StageSpec(("features",), None, None),
    "export": StageSpec(("features",), None),
    "train": StageSpec(("features",), "run", labels=True, whole=True),
    "tune": StageSpec(("features",), "run", labels=True, whole=True, made_at="best"),
    "evaluate": StageSpec(("run", "features"), "metrics", "evaluation.json", labels=True),
    "predict": StageSpec(("run", "features"), "predictions", "predictions.jsonl"),
    "export-model": StageSpec(("run",), "model", "model.onnx"),
}
TOP_LEVEL_KEYS = {"name", "description", "inputs", "work_dir", "labels", "engine", "ray_address"}
# Options that change how a stage runs but not what it writes (ignored by "up to date"), and
# those of them that take a value.
RUN_ONLY_FLAGS = {"--quiet", "-q", "--overwrite", "--resume", "--workers", "--engine",
                  "--ray-address"}
RUN_ONLY_VALUES = {"--workers", "--engine", "--ray-address"}


def output_args(args: Sequence[str]) -> list[str]:
    """A stage's arguments without the options that change none of its outputs."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in RUN_ONLY_FLAGS:
            skip = a in RUN_ONLY_VALUES
        elif a.partition("=")[0] not in RUN_ONLY_VALUES:
            out.append(a)
    return out


@dataclass
class Stage:
    name: str
    options: dict[str, Any]
    line: int


@dataclass
class Workflow:
    """A parsed workflow file (nothing checked against the commands yet)."""

    path: Path
    name: str
    inputs: list[str]
    work_dir: str
    labels: str | None
    stages: list[Stage]
    lines: dict[tuple[str, str | None], int] = field(default_factory=dict)
    overrides: set[tuple[str, str | None]] = field(default_factory=set)
    # Where the stages that take --engine run (None: their default, this machine).
    engine: str | None = None
    ray_address: str | None = None

    def line(self, table: str, key: str | None = None) -> int:
        """Line number of ``key`` in ``[table]`` (or of the table header), 0 if unknown."""
        return self.lines.get((table, key), self.lines.get((table, None), 0))

    def error(self, table: str, key: str | None, message: str) -> UsageError:
        if (table, key) in self.overrides:
            return UsageError(f"--set {table}.{key}: {message}")
        return UsageError(f"{self.path}:{self.line(table, key)}: {message}")


@dataclass
class Step:
    """One planned stage: the ``vpipe`` argument list that runs it and where its output goes."""

    name: str
    args: list[str]
    out: Path | None

    def command(self) -> str:
        """The equivalent shell command line."""
        return shlex.join(["vpipe", *self.args])


# --------------------------------------------------------------------------- reading


_HEADER = re.compile(r"^\s*\[\s*(\"?)([^\"\[\]]+?)\1\s*\]\s*(#.*)?$")
_KEY = re.compile(r"^\s*(\"?)([A-Za-z0-9_-]+)\1\s*=")


def _key_lines(text: str) -> dict[tuple[str, str | None], int]:
    """Where each table header and key sits in the file (TOML parsers do not say)."""
    lines: dict[tuple[str, str | None], int] = {}
    table = ""
    for n, raw in enumerate(text.splitlines(), start=1):
        if m := _HEADER.match(raw):
            table = m.group(2).strip()
            lines.setdefault((table, None), n)
        elif m := _KEY.match(raw):
            lines.setdefault((table, m.group(2)), n)
    return lines


def load_workflow(
    path: str | Path,
    *,
    inputs: Sequence[str] | None = None,
    labels: str | None = None,
    work_dir: str | None = None,
    sets: Sequence[str] = (),
    engine: str | None = None,
    ray_address: str | None = None,
) -> Workflow:
    """Read a workflow file; ``inputs``/``labels``/``work_dir`` override the file's values and
    each of ``sets`` (``"stage.option=value"``, value in TOML syntax or a bare word) one option."""
    path = Path(path)
    try:
        text = read_user_text(path)  # not UTF-8: one line naming the byte
    except OSError as e:
        raise UsageError(f"{path}: cannot read the workflow file ({e.strerror})") from e
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: not valid TOML: {e}") from e
    wf = Workflow(path, str(data.get("name", path.stem)), [], "", None, [], _key_lines(text))

    stages = []
    for key, value in data.items():
        if isinstance(value, dict):
            stages.append(Stage(key, value, wf.line(key)))
        elif key not in TOP_LEVEL_KEYS:
            known = ", ".join(sorted(TOP_LEVEL_KEYS))
            raise wf.error("", key, f"unknown setting {key!r} (known: {known}; stages are tables)")
    if not stages:
        raise UsageError(f"{path}: no stages (add tables such as [subclip], [features])")
    wf.stages = stages
    for item in sets:
        stage_name, key, value = _parse_set(item)
        stage = next((st for st in stages if st.name == stage_name), None)
        if stage is None:
            raise UsageError(f"--set {item}: no stage [{stage_name}] in {path}")
        # The key as the file may spell it, the switch's other spelling included.
        same = [k for k in stage.options if _spellings(k) & _spellings(key)]
        if value is UNSET:  # STAGE.OPTION= : the file's value goes, the stage's default holds
            if not same:
                raise UsageError(f"--set {item}: [{stage_name}] in {path} has no {key} to unset")
            for k in same:
                del stage.options[k]
            continue
        for k in same:  # --set replaces the file's value, whichever way it is spelled
            del stage.options[k]
        stage.options[key] = value
        wf.overrides.add((stage_name, key))

    file_inputs = data.get("inputs", [])
    if isinstance(file_inputs, str):
        file_inputs = [file_inputs]
    if not isinstance(file_inputs, list) or not all(isinstance(x, str) for x in file_inputs):
        raise wf.error("", "inputs", "inputs must be a path or a list of paths")
    wf.inputs = list(inputs) if inputs else file_inputs  # none: plan() says so after the checks
    for key in ("work_dir", "labels", "engine", "ray_address"):
        if key in data and not isinstance(data[key], str):
            raise wf.error("", key, f"{key} must be a string")
    wf.engine = engine or data.get("engine")
    wf.ray_address = ray_address or data.get("ray_address")
    if wf.engine not in (None, "local", "ray"):
        raise wf.error("", "engine", f"engine = {wf.engine!r}: use \"local\" or \"ray\"")
    if wf.ray_address and wf.engine != "ray":
        raise wf.error("", "ray_address", "ray_address is for engine = \"ray\"")
    wf.work_dir = work_dir or data.get("work_dir") or f"work/{path.stem}"
    wf.labels = labels or data.get("labels")
    return wf


UNSET = object()  # --set STAGE.OPTION= (nothing after "="): remove the file's value


def _spellings(key: str) -> set[str]:
    """A key and its switch's other spelling (``audio-postprocess``, ``no-audio-postprocess``),
    ``_`` read as ``-``."""
    k = key.replace("_", "-")
    return {k, k[3:] if k.startswith("no-") else f"no-{k}"}


def _parse_set(item: str) -> tuple[str, str, Any]:
    """``"features.image-weights=none"`` -> ("features", "image-weights", "none");
    ``"extract-frames.every="`` -> ("extract-frames", "every", UNSET)."""
    name, sep, raw = item.partition("=")
    stage, dot, key = name.strip().partition(".")
    if not sep or not dot or not stage or not key:
        raise UsageError(f"--set {item}: write STAGE.OPTION=VALUE, e.g. --set subclip.count=2")
    if not raw.strip():
        return stage, key.strip(), UNSET
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word such as none or resnet18
    return stage, key.strip(), value


# --------------------------------------------------------------------------- planning


def _long(opts: Sequence[str]) -> str:
    return next((o for o in opts if o.startswith("--")), opts[0])


def _option_args(wf: Workflow, stage: Stage, param: Any, key: str, value: Any) -> list[str]:
    """The command-line words for one ``key = value`` of a stage table."""
    flag = "--" + key.replace("_", "-")
    inverted = flag in param.secondary_opts
    if param.is_flag:
        if not isinstance(value, bool):
            raise wf.error(stage.name, key, f"{key} is a switch: write {key} = true or false")
        on = value != inverted
        if param.secondary_opts:
            return [_long(param.opts) if on else _long(param.secondary_opts)]
        return [_long(param.opts)] if on else []
    values = value if isinstance(value, list) and param.multiple else [value]
    words = []
    for v in values:
        if isinstance(v, bool) or isinstance(v, dict):
            raise wf.error(stage.name, key, f"{key} takes a value, not {v!r}")
        if isinstance(v, list):  # an option that takes a comma-separated list
            v = ",".join(str(x) for x in v)
        words += [_long(param.opts), str(v)]
    return words


def _find_param(command: Any, key: str) -> Any | None:
    flag = "--" + key.replace("_", "-")
    for p in command.params:
        if (
            flag in p.opts
            or flag in p.secondary_opts
            or (not p.opts[0].startswith("-") and p.name == key.replace("-", "_"))
        ):
            return p
    return None


def plan(
    wf: Workflow,
    commands: Mapping[str, Any],
    *,
    quiet: bool = False,
    overwrite: bool = False,
    fetch: bool = False,
) -> list[Step]:
    """Check the workflow against the CLI's commands and return all its steps, in order.

    ``commands`` maps a command name to its click command (``vpipe``'s own). A command with a
    ``vpipe_check(params, fetch)`` has it run on its parsed options (its own checks of option
    combinations; ``fetch``: also of what it will need, such as weights files). Every error
    names the file and line; nothing runs before the whole file is known to be valid.
    """
    if not wf.inputs:
        # Check every stage and option first (with a stand-in input), then report the inputs.
        plan(dataclasses.replace(wf, inputs=["."]), commands, quiet=quiet, overwrite=overwrite)
        raise UsageError(f"{wf.path}: no inputs (set inputs = [...] in the file, or --input PATH)")
    names = [s.name for s in wf.stages]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise wf.error(dup, None, f"stage [{dup}] appears twice")

    made: dict[str, Any] = {}  # kind -> the latest folder (or file) of that kind
    earlier: set[str] = set()  # outputs of the stages before this one
    steps: list[Step] = []
    for i, stage in enumerate(wf.stages):
        spec = STAGES.get(stage.name)
        if spec is None or stage.name not in commands:
            known = ", ".join(s for s in STAGES if s in commands)
            raise wf.error(stage.name, None, f"unknown stage [{stage.name}] (known: {known})")
        command = commands[stage.name]
        if i == 0:  # the workflow's inputs feed the first stage, whatever kind it reads
            made[spec.needs[0]] = wf.inputs
        positional: list[str] = []
        for kind in spec.needs:
            if kind not in made:
                msg = f"[{stage.name}] needs a {kind} folder: list a stage that makes one before it"
                raise wf.error(stage.name, None, msg)
            got = made[kind]
            positional += got if isinstance(got, list) else [got]

        args, out = _step_args(wf, stage, spec, command, positional)
        if quiet and _find_param(command, "quiet") is not None and "--quiet" not in args:
            args.append("--quiet")
        if overwrite and _find_param(command, "overwrite") is not None:
            args.append("--overwrite")
        # Folders made by earlier stages need not exist yet: parse with "." in their place.
        trial = [
            "." if i <= len(positional) and i > 0 and a in earlier else a
            for i, a in enumerate(args)
        ]
        _check_args(wf, stage, command, trial[1:], fetch)
        steps.append(Step(stage.name, args, Path(out) if out is not None else None))
        if spec.makes is not None and out is not None:
            made[spec.makes] = out if spec.made_at is None else str(Path(out) / spec.made_at)
            earlier.add(made[spec.makes])
    return steps


def _step_args(wf: Workflow, stage: Any, spec: Any, command: Any,
               positional: list[str]) -> tuple[list[str], str | None]:
    """A stage's command line from its table (options checked against ``command``), its
    inputs ``positional`` and the workflow's labels and engine; and its output."""
    out = str(Path(wf.work_dir) / stage.name) if spec.out == "dir" else None
    if spec.out not in (None, "dir"):
        out = str(Path(positional[0]) / spec.out)
    labels = wf.labels if spec.labels else None
    option_words: list[str] = []
    seen: dict[str, str] = {}  # option -> the key that set it
    for key, value in stage.options.items():
        param = _find_param(command, key)
        if param is None or param.name in ("help", "version"):
            msg = f"unknown option {key!r} for [{stage.name}] (see: vpipe {stage.name} --help)"
            raise wf.error(stage.name, key, msg)
        if param.name in seen:  # a switch's two spellings (audio-postprocess, no-...)
            msg = f"{seen[param.name]} and {key} set the same option; keep one"
            raise wf.error(stage.name, key, msg)
        seen[param.name] = key
        if not param.opts[0].startswith("-"):
            msg = f"{key!r} is set by the workflow (the previous stage's output or the inputs)"
            raise wf.error(stage.name, key, msg)
        if param.name == "out":
            out = str(value)
        elif param.name == "labels":
            labels = str(value)
        else:
            option_words += _option_args(wf, stage, param, key, value)
    takes_labels = _find_param(command, "labels") is not None
    if spec.labels and labels is None and takes_labels:
        msg = f'[{stage.name}] needs labels: set labels = "labels.csv" (or --labels CSV)'
        raise wf.error(stage.name, None, msg)
    args = [stage.name, *positional]
    if labels is not None and takes_labels:
        args += ["--labels", labels]
    if out is not None:
        args += ["-o", out]
    args += option_words
    if wf.engine and _find_param(command, "engine") is not None and "--engine" not in args:
        args += ["--engine", wf.engine]
        if wf.ray_address and "--ray-address" not in args:
            args += ["--ray-address", wf.ray_address]
    return args, out


def select(steps: Sequence[Step], start: str | None, until: str | None) -> list[Step]:
    """The steps from ``start`` to ``until`` (names of stages); with ``start``, the folders that
    stage reads from earlier stages must exist already."""
    names = [s.name for s in steps]
    for opt, name in (("--from", start), ("--until", until)):
        if name is not None and name not in names:
            raise UsageError(f"{opt} {name}: not a stage of this workflow ({', '.join(names)})")
    first = names.index(start) if start else 0
    last = names.index(until) if until else len(names) - 1
    if last < first:
        raise UsageError(f"--until {until} comes before --from {start} in the workflow")
    outs = {str(s.out): s.name for s in steps[:first] if s.out is not None}
    for word in steps[first].args[1:]:
        if word in outs and not Path(word).exists():
            raise UsageError(
                f"--from {start}: {word} (the output of {outs[word]}) does not "
                f"exist yet; run the workflow from {outs[word]} or earlier"
            )
    return list(steps[first : last + 1])


def _check_args(wf: Workflow, stage: Stage, command: Any, args: list[str],
                fetch: bool = False) -> None:
    """Let the command parse its argument list (types, ranges, choices) without running it,
    then run its own checks of the values (``vpipe_check``), if it has any."""
    from typer._click.exceptions import BadParameter
    from typer._click.exceptions import UsageError as ClickUsageError

    from pipeline.errors import VpipeError

    try:
        ctx = command.make_context(stage.name, list(args), resilient_parsing=False)
    except BadParameter as e:
        param = getattr(e, "param", None)
        key = _key_of(stage, param)
        if key is None and getattr(param, "name", None) == "labels":
            key = "labels"  # the labels path came from the top of the file
            if "labels" not in stage.options:
                raise wf.error("", "labels", f"[{stage.name}] {e.format_message()}") from None
        raise wf.error(stage.name, key, f"[{stage.name}] {e.format_message()}") from None
    except ClickUsageError as e:
        raise wf.error(stage.name, None, f"[{stage.name}] {e.format_message()}") from None
    check = getattr(command, "vpipe_check", None)
    if check is None:
        return
    try:
        check(ctx.params, fetch)
    except UsageError as e:
        raise wf.error(stage.name, None, f"[{stage.name}] {e}") from None
    except VpipeError as e:  # e.g. weights missing offline: its own exit code
        err = VpipeError(
            f"{wf.path}:{wf.line(stage.name)}: [{stage.name}] {e}\n(in a workflow those "
            f"options are keys of [{stage.name}], e.g. "
            f"image-weights = \"none\", or vpipe run ... --set {stage.name}.image-weights=none)"
            if stage.name == "features" else f"{wf.path}:{wf.line(stage.name)}: [{stage.name}] {e}"
        )
        err.exit_code = e.exit_code
        raise err from None


def _key_of(stage: Stage, param: Any) -> str | None:
    if param is None:
        return None
    for key in stage.options:
        flag = "--" + key.replace("_", "-")
        if flag in param.opts or flag in param.secondary_opts:
            return key
    return None
