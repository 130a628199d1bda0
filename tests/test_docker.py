"""The Dockerfiles against what they install: no Docker engine runs here, so what can drift is
checked as text. Each installs vpipe with `pip install -c constraints.txt` (its extras from
pyproject.toml, each pinned in constraints.txt), in the Python CI tests (pyproject's
target), with workflows/ copied before the install (they are installed as data files), caches
where a --user run can write, and every file it copies present."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = ["docker/Dockerfile", "docker/Dockerfile.cuda"]


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#") and "==" in line:
            name, version = line.split("==", 1)
            out[name.strip().lower().replace("_", "-")] = version.strip()
    return out


def instructions(path: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments out."""
    text = re.sub(r"^\s*#.*\n", "", (ROOT / path).read_text(), flags=re.M)
    text = text.replace("\\\n", " ")
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln.strip() else "")
            for ln in text.splitlines() if ln.strip()]


@pytest.mark.parametrize("path", DOCKERFILES)
def test_the_install_is_pyprojects_at_constraints_versions(path):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runs = [a for i, a in instructions(path) if i == "RUN" and "pip install" in a]
    assert len(runs) == 1
    m = re.search(r"pip install -c constraints\.txt '?\.(\[([a-z,]+)\])?'?(\s|$)", runs[0])
    assert m, runs[0]
    extras = m.group(2).split(",") if m.group(2) else []
    pinned = pins()
    for extra in extras:
        assert extra in project["optional-dependencies"], extra
    for spec in [*project["dependencies"],
                 *(d for e in extras for d in project["optional-dependencies"][e])]:
        req = Requirement(spec)
        name = req.name.lower().replace("_", "-")
        assert name in pinned, f"{name} is not pinned in constraints.txt"
        assert req.specifier.contains(pinned[name]), f"{name}=={pinned[name]} not in {spec}"
    if path.endswith(".cuda"):
        assert extras == ["ray"]  # several GPUs: --engine ray


@pytest.mark.parametrize("path", DOCKERFILES)
def test_python_copies_and_caches(path):
    steps = instructions(path)
    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]["target-version"]
    python = f"{target[2]}.{target[3:]}"  # py311 -> 3.11, the version CI tests
    base = " ".join(a for i, a in steps if i in ("FROM", "ARG"))
    assert f"python:{python}-" in base, base
    copies = [n for n, (i, a) in enumerate(steps) if i == "COPY"]
    install = next(n for n, (i, a) in enumerate(steps) if i == "RUN" and "pip install" in a)
    copied = [p for n in copies for p in steps[n][1].split()[:-1]]
    assert "workflows" in copied and all(n < install for n in copies)
    for p in copied:
        assert (ROOT / p).exists(), p
    env = " ".join(a for i, a in steps if i == "ENV")
    for var in ("TORCH_HOME=/cache/torch", "HF_HOME=/cache/huggingface"):
        assert var in env
    made = " ".join(a for i, a in steps if i == "RUN" and "chmod 1777" in a)
    assert "/cache/torch" in made and "/cache/huggingface" in made


def test_the_cuda_image_can_compile_and_is_not_root():
    steps = instructions("docker/Dockerfile.cuda")
    runs = " ".join(a for i, a in steps if i == "RUN")
    assert re.search(r"apt-get install .*\bgcc\b", runs)  # Triton builds a C module at run time
    users = [a for i, a in steps if i == "USER"]
    assert users and users[-1] not in ("root", "0")
    env = " ".join(a for i, a in steps if i == "ENV")
    assert "NVIDIA_VISIBLE_DEVICES=all" in env and "compute" in env
    # torch's wheels bring CUDA: a CUDA base image would ship it twice.
    assert not any(i == "FROM" and "nvidia/cuda" in a for i, a in steps)
    assert "nvidia/cuda" not in " ".join(a for i, a in steps if i == "ARG")
