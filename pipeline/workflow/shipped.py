"""The workflow files that come with vpipe, found by name from any folder.

They live in the checkout's ``workflows/`` folder; a wheel installs the same files into
``<prefix>/share/vpipe/workflows`` (pyproject's ``data-files``). ``vpipe run trailer-rating``
finds ``trailer-rating.toml`` there when no file of that name is in the current folder;
``vpipe workflows`` lists them and copies one out to edit.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path

from pipeline.errors import UsageError


def folders() -> list[Path]:
    """Where shipped workflows may be, first found first: the checkout beside the package (a
    clone, an editable install), then the installed data folder."""
    here = Path(__file__).resolve().parents[2] / "workflows"
    data = Path(sysconfig.get_path("data")) / "share" / "vpipe" / "workflows"
    prefix = Path(sys.prefix) / "share" / "vpipe" / "workflows"
    out: list[Path] = []
    for d in (here, data, prefix):
        if d.is_dir() and d not in out:
            out.append(d)
    return out


def shipped() -> dict[str, Path]:
    """Name (the file's stem) -> path of every shipped workflow."""
    found: dict[str, Path] = {}
    for d in folders():
        for p in sorted(d.glob("*.toml"), key=lambda p: p.stem):
            found.setdefault(p.stem, p)
    return found


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A workflow file: the path if it exists, else a name's ``NAME.toml`` in the current
    folder (what `vpipe workflows --copy NAME` wrote there, to be edited), else the shipped
    workflow of that name (a missing ``workflows/trailer-rating.toml`` is the shipped
    ``trailer-rating`` too)."""
    p = Path(name_or_path)
    if p.exists():
        return p
    if not p.suffix and p.with_suffix(".toml").is_file():
        return p.with_suffix(".toml")
    files = shipped()
    hit = files.get(p.stem)
    if hit is not None:
        return hit
    names = ", ".join(files) or "none found"
    raise UsageError(f"{name_or_path}: no such workflow file, and no shipped workflow of that "
                     f"name (shipped: {names}; see vpipe workflows)")


def summary(path: Path, width: int = 90) -> str:
    """The first sentence of the file's opening comment, cut to about ``width`` characters."""
    words: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        text = line[1:]
        if not text.strip() or text.startswith("   "):  # the paragraph ends, or an example
            break
        words.append(text.strip())
    first = " ".join(words)
    first = first.split(". ")[0].rstrip(".")
    if len(first) > width:
        first = first[: first.rfind(" ", 0, width - 3)] + " ..."
    return first


def copy_out(name: str, dest: str | os.PathLike = ".", *, force: bool = False) -> Path:
    """Copy the shipped workflow ``name`` into the folder ``dest`` (or to the file ``dest``
    when it ends in .toml); an existing file is kept unless ``force``."""
    files = shipped()
    if name not in files:
        raise UsageError(f"{name}: no shipped workflow of that name (shipped: {', '.join(files)})")
    d = Path(dest)
    target = d if d.suffix == ".toml" else d / files[name].name
    if target.exists() and not force:
        raise UsageError(f"{target}: already exists (--force to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.copyfile(files[name], tmp)
    os.replace(tmp, target)
    return target
