"""Every command's ``--help`` shows every option's default."""

import os
import subprocess
import sys

import pytest

COMMANDS = ["ume_edge.build", "ume_edge.train", "ume_edge.serve", "ume_edge.triton_repo", "ume_edge.client",
            "ume_edge.verify", "ume_edge.ros2", "ume_edge.bench report", "ume_edge.data.avdigits"]


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


def test_the_console_command_lists_every_verb_with_one_line_each():
    result = subprocess.run([sys.executable, "-m", "ume_edge", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    listed = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")]
    assert listed == ["build", "serve", "triton-repo", "client", "ros2", "verify", "bench", "train"]


def test_a_verb_shows_its_own_help():
    result = subprocess.run([sys.executable, "-m", "ume_edge", "build", "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m ume_edge.build") and "--calib-data" in result.stdout


def test_an_unknown_verb_is_refused_naming_the_verbs():
    result = subprocess.run([sys.executable, "-m", "ume_edge", "deploy"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "unknown verb 'deploy'" in result.stderr and "triton-repo" in result.stderr


NEEDS_TORCH = {
    "build": ["-m", "ume_edge.build"],
    "ume-edge build": ["-m", "ume_edge", "build"],
    "ume-edge train": ["-m", "ume_edge", "train"],
    "python -m ume_edge.train": ["-m", "ume_edge.train"],
    "ume-edge serve": ["-m", "ume_edge", "serve"],
    "ume-edge triton-repo": ["-m", "ume_edge", "triton-repo", "--out", "repo"],
}


@pytest.mark.parametrize("command", NEEDS_TORCH)
def test_a_command_that_needs_torch_names_the_extra_in_one_line(command, tmp_path):
    """Where ``import torch`` fails (a ``torch`` module first on the path raises as a missing one does), and no
    engines exist under the working directory, so serve and triton-repo would build the default ones."""
    (tmp_path / "torch.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
    result = subprocess.run([sys.executable, *NEEDS_TORCH[command]], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 2, result.stderr
    doing = command if "train" in command else "building engines"
    assert result.stderr.splitlines()[-1] == (f"error: {doing} needs PyTorch, which is not installed: "
                                              "pip install 'ume-edge[build]'")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "engines").exists() and not (tmp_path / "repo").exists()
