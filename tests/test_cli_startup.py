"""The CLI's start and end: heavy imports with the garbage collector off (then frozen out of
its way), and the console entry's objects frozen before the interpreter's teardown. The time
it saves is measured by benchmarks/startup.py; these check the behaviour."""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli.app import preload

ROOT = Path(__file__).resolve().parents[1]


def fresh_python(code: str) -> list[str]:
    """The words ``code`` prints in a new interpreter (where nothing is imported yet)."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                          stdout=subprocess.PIPE, text=True).stdout.split()


@pytest.fixture
def probe_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A module that records, as it is imported, whether the collector was on."""
    name = f"vpipe_probe_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text("import gc\nENABLED = gc.isenabled()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_preload_imports_with_the_collector_off_then_on_and_frozen(probe_module: str) -> None:
    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    preload(probe_module)
    assert sys.modules[probe_module].ENABLED is False
    assert gc.isenabled()
    assert gc.get_freeze_count() > frozen
    # Imported already: nothing is frozen again. (Frozen objects that other threads free in
    # the meantime leave the permanent generation: the count may only drop.)
    frozen = gc.get_freeze_count()
    preload(probe_module)
    assert gc.get_freeze_count() <= frozen


def test_preload_leaves_a_disabled_collector_disabled(probe_module: str) -> None:
    gc.disable()
    try:
        preload(probe_module)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_failing_import_still_restores_the_collector(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "vpipe_probe_broken.py").write_text("raise ImportError('broken on purpose')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match="broken on purpose"):
        preload("vpipe_probe_broken")
    assert gc.isenabled()


@pytest.mark.parametrize("argv, frozen", [("None", True), ("['--version']", False)])
def test_only_the_console_entry_freezes_at_its_end(argv: str, frozen: bool) -> None:
    """`vpipe` itself (argv None) freezes before exiting; a call with its own argv (`vpipe
    run`'s stages, tests) does not, so that a long process keeps collecting."""
    code = (
        "import gc, sys\n"
        "from pipeline.cli import main\n"
        "sys.argv = ['vpipe', '--version']\n"
        f"rc = main({argv})\n"
        "print(rc, gc.get_freeze_count() > 0)\n"
    )
    out = fresh_python(code)
    assert out[-2:] == ["0", str(frozen)]


@pytest.mark.parametrize("model, vision", [("resnet50", True), ("hf:openai/clip-vit-base-patch32",
                                                                  False), (None, False)])
def test_preload_torch_takes_torchvision_only_for_a_torchvision_model(model, vision) -> None:
    code = (
        "import sys\n"
        "from pipeline.cli.app import preload_torch\n"
        f"preload_torch({model!r})\n"
        "print('torch' in sys.modules, 'torchvision' in sys.modules)\n"
    )
    out = fresh_python(code)
    assert out[-2:] == ["True", str(vision)]
