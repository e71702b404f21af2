"""The fastdistill command line: --version, the CUDA version as major.minor, help texts."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

import fastdistill
from fastdistill import _extension, cli


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"fastdistill {fastdistill.__version__}"


def test_python_dash_m_runs_the_same_command():
    p = subprocess.run([sys.executable, "-m", "fastdistill", "--version"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == f"fastdistill {fastdistill.__version__}"


@pytest.mark.parametrize("raw,text", [(13000, "13.0"), (12040, "12.4"), (11080, "11.8"), ("12080", "12.8"),
                                      ("13.0", "13.0"), (None, None)])
def test_cuda_version_text(raw, text):
    assert cli.cuda_version_text(raw) == text


def test_info_prints_cuda_as_major_minor(monkeypatch, capsys):
    build = dict(_extension.build_info() or {}, with_cuda=True, cuda_version=13000)
    monkeypatch.setattr(_extension, "build_info", lambda: build)
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    if _extension.is_loaded():
        assert "CUDA kernels compiled: yes (CUDA 13.0)" in out
    assert "13000" not in out


def _parsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli._build_parser()
    found = {"fastdistill": parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update({f"fastdistill {name}": p for name, p in action.choices.items()})
    return found


def test_every_command_and_flag_has_clean_help():
    parsers = _parsers()
    assert {"fastdistill info", "fastdistill selftest", "fastdistill demo"} <= set(parsers)
    for name, parser in parsers.items():
        text = parser.format_help()
        assert "``" not in text and ":func:" not in text and ":class:" not in text, f"{name} --help has markup"
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help and action.help.strip(), f"{name}: {action.option_strings or action.dest} has no help"
    demo_seed = [a for a in parsers["fastdistill demo"]._actions if "--seed" in a.option_strings]
    assert demo_seed and "seed" in demo_seed[0].help


def test_plain_text_strips_rest_markup():
    assert cli.plain_text("The ``fastdistill`` command, :func:`fastdistill.run`::\n") == \
        "The fastdistill command, fastdistill.run:\n"
