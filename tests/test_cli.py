"""The command line: help for every stage, errors as one line with exit 2."""

import subprocess
import sys

import pytest

from cryomatch.cli import build_parser, main
from cryomatch.stages import COMMANDS


def test_top_level_help_lists_every_stage():
    out = subprocess.run(
        [sys.executable, "-m", "cryomatch", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    for name, _, _ in COMMANDS:
        assert name in out.stdout


@pytest.mark.parametrize("name", [c[0] for c in COMMANDS])
def test_every_stage_has_help(name, capsys):
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args([name, "--help"])
    assert stop.value.code == 0
    assert "usage: cryomatch" in capsys.readouterr().out


def test_simulate_particles_help(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["simulate", "particles", "--help"])
    out = capsys.readouterr().out
    for flag in ("--map", "--phantom", "--n", "--snr", "--box", "--seed", "--out"):
        assert flag in out


def test_simulate_runs_from_the_command_line(tmp_path):
    code = main(
        [
            "simulate",
            "particles",
            "--phantom",
            "--n",
            "5",
            "--snr",
            "1",
            "--box",
            "24",
            "--seed",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0 and (tmp_path / "particles.star").is_file()
