"""Every command's ``--help`` shows every option's default."""

import subprocess
import sys

import pytest

COMMANDS = ["ume_edge.build", "ume_edge.train", "ume_edge.serve", "ume_edge.triton_repo", "ume_edge.client",
            "ume_edge.bench report", "ume_edge.data.avdigits"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_every_default(command):
    result = subprocess.run([sys.executable, "-m", *command.split(), "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    entries = result.stdout.split("\n  -")[1:]
    assert entries, result.stdout
    silent = [entry.split()[0] for entry in entries
              if not entry.startswith("h, --help") and "default" not in " ".join(entry.split())]
    assert silent == [], f"{command} --help gives no default for {silent}"
