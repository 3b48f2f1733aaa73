"""The tfweave console script: every subcommand answers --help without importing TensorFlow."""

import subprocess
import sys

import pytest

from tfweave import cli


@pytest.mark.parametrize("command", sorted(cli.SUBCOMMANDS))
def test_every_subcommand_has_help(command):
    result = subprocess.run([sys.executable, "-m", "tfweave.cli", command, "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"tfweave {command}" in result.stdout


def test_help_does_not_import_tensorflow():
    probe = ("import sys; from tfweave import cli; cli.build_parser(); "
             "print('tensorflow' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=60)
    assert result.stdout.strip() == "False", result.stderr


def test_unknown_subcommand_is_refused_with_usage():
    result = subprocess.run([sys.executable, "-m", "tfweave.cli", "frobnicate"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
