"""The README stays true: its Python examples run (on a tiny run in place of ``runs/demo``) and the CLI
commands and flags it names exist."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from iddpm.cli.main import main

README = Path(__file__).resolve().parents[2] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("readme") / "run"
    assert main(["train", "--preset", "digits", "--num_channels", "32", "--num_res_blocks", "1",
                 "--diffusion_steps", "100", "--batch_size", "8", "--max_steps", "2", "--save_interval", "2",
                 "--run_dir", str(run_dir), "--no_progress"]) == 0
    return run_dir


def test_python_examples_run(tiny_run, tmp_path, monkeypatch, capsys):
    blocks = _blocks("python")
    assert len(blocks) >= 2, "README lost its API examples"
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        code = code.replace('"runs/demo"', repr(str(tiny_run)))
        exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})  # noqa: S102
    assert "fid" in capsys.readouterr().out


def test_cli_commands_and_flags_exist():
    """Every `iddpm CMD --flag` in the README's bash blocks is accepted by that command's parser."""
    import argparse

    from iddpm.cli.main import build_parser

    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    seen = 0
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0]
            words = shlex.split(line) if "iddpm" in line else []
            if "iddpm" not in words:
                continue
            words = words[words.index("iddpm") + 1:]
            if not words or words[0].startswith("-"):
                continue
            sub = subparsers.choices[words[0]]
            nested = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
            if nested and len(words) > 1 and words[1] in nested[0].choices:  # e.g. `iddpm export diffusers`
                sub = nested[0].choices[words[1]]
            known = {opt for a in sub._actions for opt in a.option_strings}
            for w in words[1:]:
                if w.startswith("--"):
                    assert w.split("=", 1)[0] in known, f"README: `iddpm {words[0]}` has no flag {w}"
                    seen += 1
    assert seen > 20
