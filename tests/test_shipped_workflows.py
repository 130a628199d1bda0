"""Shipped workflows by name: `vpipe run trailer-rating` and `vpipe workflows` from any folder,
in a checkout and in a wheel installed into a fresh virtual environment."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.stem for p in (ROOT / "workflows").glob("*.toml"))


def test_run_by_name_from_an_empty_folder_is_the_file(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(ROOT / "workflows" / "trailer-rating.toml"), "--dry-run"]) == 0
    by_path = capsys.readouterr().out
    assert main(["run", "trailer-rating", "--dry-run"]) == 0
    got = capsys.readouterr()
    assert got.out == by_path and by_path.startswith("vpipe subclip trailers -o work/")
    assert "the shipped workflow" in got.err
    # The README's command, run from a project folder without a workflows/ folder of its own.
    assert main(["run", "workflows/trailer-rating.toml", "--dry-run"]) == 0
    assert capsys.readouterr().out == by_path
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing


def test_a_local_file_wins_over_the_shipped_one(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "videos").mkdir()
    Path("demo").write_text('inputs = ["videos"]\n[extract-frames]\nfps = 3\n', encoding="utf-8")
    assert main(["run", "demo", "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith("vpipe extract-frames videos")


def test_unknown_names_say_what_is_shipped(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["run", "trailer-ratings", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "trailer-ratings: no such workflow file, and no shipped workflow" in err
    assert all(name in err for name in SHIPPED)


def test_workflows_lists_and_copies_out(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["workflows"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [x.split()[0] for x in lines[: len(SHIPPED)]] == SHIPPED
    assert any("Trailer rating, the LRCN setup" in x for x in lines)
    assert main(["workflows", "--copy", "video-tagging"]) == 0
    copied = tmp_path / "video-tagging.toml"
    assert copied.read_bytes() == (ROOT / "workflows" / "video-tagging.toml").read_bytes()
    copied.write_text("# mine\n", encoding="utf-8")
    assert main(["workflows", "--copy", "video-tagging"]) == 2
    assert "already exists (--force to replace it)" in capsys.readouterr().err
    assert copied.read_text() == "# mine\n"  # kept
    assert main(["workflows", "--copy", "video-tagging", "--force"]) == 0
    assert main(["workflows", "--copy", "captioning", "--to", "cfg/my-captions.toml"]) == 0
    assert (tmp_path / "cfg" / "my-captions.toml").is_file()
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]
    assert main(["workflows", "--copy", "nope"]) == 2


def test_a_copied_workflow_in_the_current_folder_comes_first(tmp_path: Path, capsys,
                                                             monkeypatch) -> None:
    # Regression (issue 27, 3.2): after `vpipe workflows --copy trailer-rating` and an edit,
    # `vpipe run trailer-rating` still ran the shipped file.
    monkeypatch.chdir(tmp_path)
    assert main(["workflows", "--copy", "trailer-rating"]) == 0
    mine = tmp_path / "trailer-rating.toml"
    mine.write_text(mine.read_text(encoding="utf-8").replace("count = 3", "count = 2"),
                    encoding="utf-8")
    capsys.readouterr()
    assert main(["run", "trailer-rating", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert "vpipe run: trailer-rating: the file trailer-rating.toml" in err
    assert "--count 2" in out.splitlines()[0]
    mine.unlink()
    assert main(["run", "trailer-rating", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert "the shipped workflow" in err and "--count 3" in out.splitlines()[0]


@pytest.mark.slow
def test_a_wheel_install_finds_its_workflows(tmp_path: Path) -> None:
    """pip install of the built wheel (no checkout beside it): the files come as data files."""
    wheels, venv, empty = tmp_path / "wheels", tmp_path / "venv", tmp_path / "project"
    empty.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(wheels), str(ROOT)], check=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (wheel,) = wheels.glob("vpipe-*.whl")
    py = venv / "bin" / "python"
    # This environment's pip installs into the new one; its other packages serve as deps.
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q",
                    "--no-deps", str(wheel)], check=True)
    env = {"PYTHONPATH": sysconfig.get_paths()["purelib"], "PATH": "/usr/bin:/bin"}
    where = subprocess.run([str(py), "-c", "import pipeline; print(pipeline.__file__)"],
                           capture_output=True, text=True, env=env, cwd=empty, check=True)
    assert where.stdout.startswith(str(venv))  # the installed copy, not this checkout
    listed = subprocess.run([str(venv / "bin" / "vpipe"), "workflows"], capture_output=True,
                            text=True, env=env, cwd=empty, check=True).stdout
    assert [x.split()[0] for x in listed.splitlines()[: len(SHIPPED)]] == SHIPPED
    assert str(venv / "share" / "vpipe" / "workflows") in listed
    dry = subprocess.run([str(venv / "bin" / "vpipe"), "run", "trailer-rating", "--dry-run"],
                         capture_output=True, text=True, env=env, cwd=empty, check=True)
    assert dry.stdout.startswith("vpipe subclip trailers -o work/trailer-rating/subclip")


def test_run_help_names_every_shipped_workflow(capsys) -> None:
    # Regression (issue 27, 3.10): video-tagging-notext was left out.
    assert main(["run", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")  # wrapped at a hyphen
    assert all(name in text for name in SHIPPED), text
