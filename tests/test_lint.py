"""ruff over the package, its tests, benchmarks and tools, and mypy over the package, with the settings in
pyproject.toml, as part of the README's test command."""

import subprocess
import sys

import pytest

from ume_edge.constants import PROJECT_ROOT


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=600)


def test_ruff_finds_nothing_in_the_package_tests_benchmarks_and_tools():
    pytest.importorskip("ruff", reason="ruff is not installed: pip install -e '.[dev]'")
    result = _run("ruff", "check", "ume_edge", "tests", "bench", "tools")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_mypy_finds_nothing_in_the_package():
    pytest.importorskip("mypy", reason="mypy is not installed: pip install -e '.[dev]'")
    result = _run("mypy", "ume_edge")
    assert result.returncode == 0, result.stdout + result.stderr
