"""Taking new videos through the stages a feature folder was made with (``vpipe predict RUN
VIDEOS``): the recorded commands read back from each stage folder's ``vpipe.json``, re-aimed at
the new videos and a cache folder, checked before any of them runs.

A stage folder records the command that made it (and, since this module, the folder it ran
in, so that its relative paths mean what they meant). From the run's feature folder back to
the stage that read videos, each recorded command is parsed with the CLI's own option table:
its positional inputs are the folders of the stages before it (or, for the first, the
videos), its options are kept as they were, with paths made absolute. What cannot be
reproduced for new videos is refused with the reason: a stage folder gone, clips cut at the
ranges of a segments file, titles without a titles file for the new videos.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import UsageError
from pipeline.files import content_identity
from pipeline.records import read_run_info
from pipeline.workflow.plan import RUN_ONLY_FLAGS, Step

# The stages a feature folder can descend from (those that read videos or media folders).
MEDIA_STAGES = ("subclip", "extract-frames", "extract-audio", "features")
# Options that made training data, not the features of a clip: not replayed on new videos
# (augmented views: `vpipe predict` predicts the clips themselves).
NOT_REPLAYED = {"--augment", "--views", "--augment-seed"}


@dataclass
class Recorded:
    """One stage folder as its ``vpipe.json`` describes it."""

    name: str
    folder: Path
    inputs: list[Path]  # its positional inputs, absolute
    options: list[str]  # its option words, paths made absolute, run-only options dropped
    params: dict = field(default_factory=dict)  # as recorded in its vpipe.json
    parents: list[Recorded] = field(default_factory=list)  # the stage folders among inputs


def _option_table(command: Any) -> tuple[set[str], set[str]]:
    """The option words of ``command`` that take a value, and those that do not."""
    valued, flags = set(), set()
    for p in command.params:
        if p.param_type_name != "option":
            continue
        names = [*p.opts, *getattr(p, "secondary_opts", [])]
        (flags if getattr(p, "is_flag", False) or getattr(p, "count", False) else valued).update(
            names
        )
    return valued, flags


def split_command(command: Any, args: Sequence[str]) -> tuple[list[str], list[tuple[str, ...]]]:
    """A recorded argument list (after the command's name) as its positional words and its
    options, each option with its value (``("--every", "45")``, ``("--no-audio",)``)."""
    valued, flags = _option_table(command)
    positional: list[str] = []
    options: list[tuple[str, ...]] = []
    words = list(args)
    i = 0
    while i < len(words):
        w = words[i]
        if w == "--":
            positional += words[i + 1:]
            break
        name = w.partition("=")[0]
        if w.startswith("-") and "=" in w and name in valued:
            options.append((name, w.partition("=")[2]))
        elif w in valued and i + 1 < len(words):
            options.append((w, words[i + 1]))
            i += 1
        elif w in flags:
            options.append((w,))
        elif w.startswith("-") and len(w) > 1:
            raise UsageError(f"recorded command: {w!r} is not an option of vpipe {command.name}")
        else:
            positional.append(w)
        i += 1
    return positional, options


def _absolute(value: str, cwd: Path) -> str:
    """A relative path recorded in ``cwd`` as an absolute one, when it names something there."""
    if not value or os.path.isabs(value):
        return value
    there = cwd / value
    return str(there.resolve()) if there.exists() else value


def _guess_cwd(folder: Path, positional: Sequence[str]) -> Path:
    """Where a record written before vpipe recorded its folder ran: the current folder, or the
    nearest folder above the stage folder from which its relative inputs all exist."""
    rel = [p for p in positional if not os.path.isabs(p)]
    for cand in (Path.cwd(), *Path(folder).resolve().parents):
        if all((cand / p).exists() for p in rel):
            return cand
    return Path.cwd()


def read_stage(folder: Path, commands: Mapping[str, Any]) -> Recorded:
    """The command recorded in ``folder/vpipe.json``, and the stage folders it read from."""
    try:
        info = read_run_info(folder)
    except OSError as e:  # a damaged one is its own one-line error (records.DamagedRecord)
        raise UsageError(f"{folder}/vpipe.json: unreadable ({e})") from None
    if not info or info.get("stage") not in MEDIA_STAGES or not info.get("command"):
        raise UsageError(
            f"{folder}: no vpipe.json of a media or features stage, so how its outputs were "
            "made is not known"
        )
    name = info["stage"]
    command = commands[name]
    argv = list(info["command"])
    # argv[0] is the program; the stage's name comes first after it.
    rest = argv[argv.index(name) + 1:] if name in argv else argv[1:]
    positional, options = split_command(command, rest)
    cwd = Path(info["cwd"]) if info.get("cwd") else _guess_cwd(folder, positional)
    kept: list[str] = []
    for opt in options:
        if opt[0] in ("-o", "--out") or opt[0] in RUN_ONLY_FLAGS or opt[0] in NOT_REPLAYED:
            continue
        kept.append(opt[0])
        if len(opt) > 1:
            kept.append(_absolute(opt[1], cwd))
    inputs = [Path(os.path.abspath(cwd / p)) for p in positional]
    rec = Recorded(name, folder, inputs, kept, info.get("params") or {})
    if name != "subclip":  # a stage reading another stage's folder has that stage as parent
        for p in inputs:
            if p.is_dir() and (p / "vpipe.json").is_file():
                rec.parents.append(read_stage(p, commands))
    return rec


def lineage(features: Path, commands: Mapping[str, Any]) -> list[Recorded]:
    """The stages that made ``features``, first stage first (each stage folder once)."""
    if not (features / "vpipe.json").is_file():
        raise UsageError(
            f"{features}: the run's feature folder is gone (or has no vpipe.json): predicting "
            "from videos needs the stage folders its features were made in"
        )
    top = read_stage(features, commands)
    if top.name != "features":
        raise UsageError(f"{features}: made by vpipe {top.name}, not vpipe features")
    order: list[Recorded] = []
    seen: set[Path] = set()

    def visit(r: Recorded) -> None:
        for p in r.parents:
            visit(p)
        if r.folder.resolve() not in seen:
            seen.add(r.folder.resolve())
            order.append(r)

    visit(top)
    for r in order:
        for p in r.inputs:
            if not p.exists():
                raise UsageError(
                    f"{r.folder}: made from {p}, which is gone: how its input was made is not "
                    "known (predict needs the stage folders the run's features came from)"
                )
    return order


def refusals(chain: Sequence[Recorded], titles: str | None) -> list[str]:
    """Why the recorded stages cannot take new videos as they took the old ones (empty: they
    can)."""
    why = []
    for r in chain:
        words = r.options
        if r.name == "subclip" and "--segments" in words:
            seg = words[words.index("--segments") + 1]
            why.append(
                f"the run's clips were cut at the ranges of a segments file ({seg}), which has "
                "none for new videos: cut them with vpipe subclip --segments, take them through "
                "the stages and give vpipe predict the feature folder"
            )
        if r.name == "features" and "--text" in words and titles is None:
            why.append(
                f"the run reads titles (vpipe features --text {words[words.index('--text') + 1]}): "
                "give the new videos' titles with --text CSV (id,text; id = the file stem)"
            )
    return why


def replay_steps(
    chain: Sequence[Recorded],
    videos: Sequence[str],
    work_dir: Path,
    titles: str | None = None,
    *,
    quiet: bool = False,
) -> list[Step]:
    """The recorded stages as steps over ``videos``, each writing ``work_dir/<stage>``."""
    out_of: dict[Path, str] = {}
    steps: list[Step] = []
    for r in chain:
        out = work_dir / r.name
        n = 2
        while str(out) in out_of.values():  # the same stage twice (frames, then audio)
            out, n = work_dir / f"{r.name}-{n}", n + 1
        parents = {p.folder.resolve() for p in r.parents}
        inputs: list[str] = []
        for p in r.inputs:
            if p.resolve() in parents:
                inputs.append(out_of[p.resolve()])
            elif r is chain[0] or not parents:
                inputs.extend(v for v in videos if v not in inputs)
            else:
                raise UsageError(f"{r.folder}: reads {p}, not made by a stage of the run")
        options = list(r.options)
        if titles is not None and "--text" in options:
            options[options.index("--text") + 1] = str(Path(titles).resolve())
        if quiet:
            options.append("--quiet")
        steps.append(Step(r.name, [r.name, *inputs, "-o", str(out), *options], out))
        out_of[r.folder.resolve()] = str(out)
    return steps


def check_steps(
    steps: Sequence[Step], commands: Mapping[str, Any], chain: Sequence[Recorded]
) -> None:
    """Parse every step as its command would and run its own checks (weights looked for and
    compared by content with the ones the recorded stage used), so that nothing runs when a
    later stage would refuse or make other features."""
    from typer._click.exceptions import UsageError as ClickUsageError

    for step, rec in zip(steps, chain, strict=True):
        command = commands[step.name]
        # The folders of earlier steps need not exist yet: parse with "." in their place.
        made = {str(s.out) for s in steps}
        trial = ["." if a in made and a != str(step.out) else a for a in step.args[1:]]
        try:
            ctx = command.make_context(step.name, trial, resilient_parsing=False)
        except ClickUsageError as e:
            raise UsageError(f"the run's {step.name} command: {e.format_message()}") from None
        check = getattr(command, "vpipe_check", None)
        found = check(ctx.params, True) if check is not None else None
        recorded = rec.params
        for key, now in (found or {}).items():
            if key in recorded and not same_identity(recorded[key], now):
                raise UsageError(
                    f"the run's features were made with {key.replace('_', ' ')} {recorded[key]}, "
                    f"and the same options now give {now}: features made now would not be the "
                    "ones the run learned from"
                )


def same_identity(recorded: Any, now: Any) -> bool:
    """Whether an identity found at plan time is the recorded one: by content (a folder or
    file given by another path is the same), and on the keys known before loading (a text
    model's tokenizer class is read when it loads)."""
    recorded, now = content_identity(recorded), content_identity(now)
    if isinstance(recorded, dict) and isinstance(now, dict):
        return {k: recorded.get(k) for k in now} == now
    return recorded == now


def cache_key(steps: Sequence[Step], videos: Sequence[Path], extra: str = "") -> str:
    """What the cache folder's outputs depend on: the stages' options and each video's
    identity (path, size, modification time), so other videos get a folder of their own."""
    h = hashlib.sha256(extra.encode())
    for s in steps:
        h.update(json.dumps(s.args[s.args.index("-o") + 2:]).encode())
    for v in sorted(videos):
        try:
            st = v.stat()
            h.update(f"{v.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:  # a dangling or looping link: the subclip stage fails it by its name
            h.update(f"{os.path.abspath(v)}\0unreadable\n".encode())
    return h.hexdigest()[:12]


def run_features(run: Path) -> Path:
    """The feature folder a run was trained on, as its ``vpipe.json`` records it."""
    try:
        info = read_run_info(run) if (run / "vpipe.json").is_file() else None
    except (OSError, ValueError) as e:
        raise UsageError(f"{run}/vpipe.json: unreadable ({e})") from None
    if not info or info.get("stage") != "train" or "features" not in info.get("params", {}):
        raise UsageError(f"{run}: not a run folder written by vpipe train (no vpipe.json)")
    return Path(info["params"]["features"])


def plan_replay(
    run: Path,
    videos: Sequence[str | os.PathLike],
    commands: Mapping[str, Any],
    *,
    work_dir: Path | None = None,
    titles: str | os.PathLike | None = None,
    quiet: bool = False,
) -> list[Step]:
    """The steps that take ``videos`` through the stages the run's features were made with,
    into ``work_dir`` (default: ``RUN/predict-cache/<key of the options and videos>``, so the
    same videos again find their outputs there); refused before anything runs when those
    stages cannot be reproduced. The last step writes the feature folder."""
    from pipeline.files import sha256_of
    from pipeline.media.scan import find_videos

    run = Path(run)
    chain = lineage(run_features(run), commands)
    why = refusals(chain, None if titles is None else str(titles))
    if why:
        raise UsageError(f"{run}: new videos cannot go through the run's stages: " + "; ".join(why))
    titles = None if titles is None else str(Path(titles).resolve())
    if titles is not None and not Path(titles).is_file():
        raise UsageError(f"--text {titles}: no such file")
    if titles is not None and not any("--text" in r.options for r in chain):
        raise UsageError("--text: the run's features have no titles (made without features --text)")
    # Absolute, links resolved; a link that leads nowhere (dangling, looping) stays itself, so
    # that subclip fails it by its name as it does one found in a folder.
    given = [str(Path(v).resolve()) if Path(v).exists() else os.path.abspath(v) for v in videos]
    for v, g in zip(videos, given, strict=True):
        if not os.path.lexists(g):
            raise UsageError(f"{v}: no such file or folder")
    found = find_videos(given)
    if not found:
        raise UsageError(f"no videos in {', '.join(map(str, videos))}")
    # The run's own folder is part of the key: the cache records absolute paths, so a copied
    # run starts a cache of its own instead of meeting the original's.
    key = cache_key(replay_steps(chain, given, Path("."), titles), found,
                    (sha256_of(titles) if titles else "") + str(run.resolve()))
    work = Path(work_dir) if work_dir is not None else run / "predict-cache" / key
    steps = replay_steps(chain, given, work, titles, quiet=quiet)
    check_steps(steps, commands, chain)
    claim_work_dir(work, key)
    return steps


KEY_FILE = "predict-key.txt"


def claim_work_dir(work: Path, key: str) -> None:
    """Mark ``work`` as the cache of these videos and options; one holding the work of other
    videos is refused (its clips would join the predictions)."""
    marker = work / KEY_FILE
    if marker.is_file():
        if marker.read_text(encoding="utf-8").strip() != key:
            raise UsageError(
                f"--work-dir {work}: holds the stages of other videos or options (its clips "
                "would join these predictions); give another folder, or remove it"
            )
        return
    if work.is_dir() and any(work.iterdir()):
        raise UsageError(f"--work-dir {work}: not empty and not a vpipe predict cache; give "
                         "another folder")
    from pipeline.files import atomic_write_text

    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, key + "\n")
