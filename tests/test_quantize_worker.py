"""ONNX Runtime's quantization tools print and log through the root logger; the build runs them in a worker process
so that a program calling ``build()`` keeps its stdout and logging as they were."""

import logging
import subprocess
import sys

import pytest

from ume_edge.constants import PROJECT_ROOT

pytestmark = pytest.mark.slow  # full builds

# A user's script, with no `if __name__ == "__main__":` guard.
SCRIPT = """
import logging, sys
from ume_edge.build import BuildOptions, build
build(BuildOptions(out=sys.argv[1]))
root = logging.getLogger()
print(logging.getLevelName(root.level), len(root.handlers), "onnxruntime.quantization" in sys.modules)
"""


def test_an_int8_build_leaves_stdout_and_the_root_logger_alone(tmp_path):
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "engines")], capture_output=True,
                            text=True, cwd=PROJECT_ROOT, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{logging.getLevelName(logging.WARNING)} 0 False\n"
    assert result.stderr == ""
