"""`--help` for users: values named N, X, PATH, TEXT or by their choices (no Python types such as
<list[Path]> or <int range>), arguments in capitals, and `vpipe --help` giving each command's
first sentence whole."""

from __future__ import annotations

import re

import pytest

from pipeline.cli import command, main

COMMANDS = sorted(command().commands)


@pytest.mark.parametrize("name", COMMANDS)
def test_help_names_values_as_the_readme_does(name: str, capsys) -> None:
    assert main([name, "--help"]) == 0
    text = capsys.readouterr().out
    # How the Python types would show (<clip_id> in a help text is the README's placeholder)
    types = r"<(int|float|str|bool|path|file|dir|list\[[^>]*\]|[a-z]+ range|[a-z]+\|[a-z|]+)>"
    assert not re.search(types, text), text
    usage = text.splitlines()[0]
    args = re.findall(r"\{([^}]*)\}", usage)
    assert all(a.isupper() for a in args), usage


def test_the_command_list_is_not_cut(capsys) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    listing = text[text.index("Commands:"):]
    assert "..." not in listing
    assert all(name in listing for name in COMMANDS)
    assert "Cut each video into non-overlapping subclips" in listing


@pytest.mark.parametrize("argv, says", [
    (["nosuch"], "vpipe: error: no such command 'nosuch' (see vpipe --help)"),
    (["features", "--bogus", "x"], "vpipe: error: no such option: --bogus"),
    (["train"], "vpipe: error: missing argument 'FEATURES' (see vpipe train --help)"),
])
def test_a_usage_error_of_the_command_line_is_one_vpipe_line(argv, says, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(says), err
