"""Each backend owns its build options: ``--help`` groups them by backend, and a build refuses, before any work, the
flags of a backend it does not use (ONNX Runtime once ignored --dla-core and --workspace-mb silently)."""

import subprocess
import sys

import pytest

from ume_edge import backends
from ume_edge.backends.tensorrt.options import TensorRTOptions
from ume_edge.build import BuildOptions, build
from ume_edge.errors import BuildError


def run_build(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ume_edge.build", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("flags, named", [
    (["--dla-core", "0"], "--dla-core 0 is for --backend tensorrt only"),
    (["--backend", "onnxruntime", "--workspace-mb", "512", "--version-compatible"],
     "--workspace-mb 512 --version-compatible are for --backend tensorrt only"),
    (["--backend", "onnxruntime", "--workspace-mb", "1024"], "TensorRT options are for --backend tensorrt only"),
])
def test_a_flag_of_another_backend_is_one_line_and_exit_2(tmp_path, flags, named):
    if backends.resolve("auto").name != "onnxruntime" and "--backend" not in flags:
        pytest.skip("auto picks TensorRT here, which takes --dla-core")
    result = run_build(*flags, "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    assert result.stdout == "" and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: {named}, and this build uses onnxruntime")
    assert result.stderr.rstrip().endswith("or add --backend tensorrt")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_the_library_refuses_another_backends_options_too(tmp_path):
    with pytest.raises(BuildError, match=r"--dla-core 1 is for --backend tensorrt only, and this build uses "
                                         r"onnxruntime; drop it"):
        build(BuildOptions(backend="onnxruntime", backend_options=TensorRTOptions(dla_core=1), out=tmp_path / "out"))
    assert list(tmp_path.iterdir()) == []


def test_help_groups_each_backends_flags_under_its_name():
    result = run_build("--help")
    assert result.returncode == 0, result.stderr
    group = result.stdout.split("TensorRT (with --backend tensorrt):", 1)[1]
    for flag in ("--workspace-mb", "--timing-cache", "--dla-core", "--hardware-compatible", "--version-compatible"):
        assert flag in group


def test_a_backend_flag_keeps_its_type_check():
    result = run_build("--backend", "tensorrt", "--dla-core", "first")
    assert result.returncode == 2 and "argument --dla-core: invalid int value: 'first'" in result.stderr
