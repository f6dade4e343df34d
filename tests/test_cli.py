import subprocess
import sys

import pytest


@pytest.mark.parametrize("command", ["check-r2", "stage", "verify", "list"])
def test_every_command_has_help_with_an_example_or_description(command):
    out = subprocess.run([sys.executable, "-m", "flows", command, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "usage: modelferry " + command in out.stdout
    assert len(out.stdout.splitlines()) > 5


def test_top_level_help_lists_settings():
    out = subprocess.run([sys.executable, "-m", "flows", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "R2_ENDPOINT" in out.stdout and "HF_TOKEN" in out.stdout
