"""The TensorRT side of the build, checked without TensorRT: the export-only directory a user carries to a Jetson,
the trtexec lines in its manifest, and the builder configuration assembled from the command line."""

import json
import subprocess
import sys

import pytest

from ume_edge.backends.tensorrt import builder_settings, is_available
from ume_edge.build import BuildOptions, build
from ume_edge.compile import tensorrt_config
from ume_edge.errors import BuildError


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("jetson") / "avdigits-int8-tensorrt"
    return build(BuildOptions(backend="tensorrt", export_only=True, out=out, max_batch=32, workspace_mb=512,
                              timing_cache=out.parent / "timing.cache"))


def test_export_only_manifest_holds_trtexec_lines_for_tensorrt_10_and_11(exported):
    manifest = json.loads((exported / "manifest.json").read_text())
    audio = next(m for m in manifest["modalities"] if m["name"] == "audio")
    line10, line11 = audio["trtexec"]["10"], audio["trtexec"]["11"]
    assert line10.startswith("trtexec --onnx=tensorrt/audio.onnx --saveEngine=audio.plan")
    for flag in ("--minShapes=audio:1x1x40x48", "--optShapes=audio:16x1x40x48", "--maxShapes=audio:32x1x40x48",
                 "--memPoolSize=workspace:512M", "--timingCacheFile="):
        assert flag in line10 and flag in line11
    assert "--stronglyTyped" in line10 and "--stronglyTyped" not in line11 and "--int8" not in line11
    fusion = manifest["fusion"]["trtexec"]["10"]
    assert "--minShapes=partial_logits:1x2x10,present:1x2" in fusion
    assert (exported / "tensorrt" / "fusion.onnx").is_file()
    assert manifest["tensorrt"] == {"workspace_mb": 512, "dla_core": None, "hardware_compatible": False,
                                    "version_compatible": False, "timing_cache": str(exported.parent / "timing.cache")}
    assert "TensorRT-target ONNX" in manifest["accuracy"]["data"]["engines_run_by"]


def test_export_only_directory_is_refused_by_the_runtime_with_what_to_do(exported):
    from ume_edge.errors import EngineMismatch
    from ume_edge.runtime import Pipeline

    with pytest.raises(EngineMismatch, match="export-only.*--backend tensorrt"):
        Pipeline.load(exported)


def test_builder_configuration_follows_the_command_line():
    options = BuildOptions(backend="tensorrt", max_batch=64, workspace_mb=256, dla_core=1, version_compatible=True)
    settings = builder_settings(tensorrt_config(options, "int8"), trt_major=10)
    assert settings["default_device_type"] == "DLA" and settings["DLA_core"] == 1
    assert settings["builder_flags"] == ["GPU_FALLBACK", "VERSION_COMPATIBLE"]
    assert settings["memory_pool_limits"] == {"WORKSPACE": 256 << 20}
    assert settings["network_flags"] == ["STRONGLY_TYPED"]
    assert settings["profile_batch"] == {"min": 64, "opt": 64, "max": 64}  # DLA: static shapes
    fusion = builder_settings(tensorrt_config(options, "int8", for_fusion=True), trt_major=11)
    assert fusion["default_device_type"] == "GPU" and fusion["profile_batch"] == {"min": 1, "opt": 32, "max": 64}


def test_impossible_configuration_is_refused_before_any_work(tmp_path):
    with pytest.raises(BuildError, match="DLA runs only"):
        build(BuildOptions(backend="tensorrt", export_only=True, precision="fp32", dla_core=0, out=tmp_path / "x"))
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(is_available(), reason="TensorRT and a GPU are present here")
def test_cli_without_tensorrt_is_one_line_with_what_to_do():
    result = subprocess.run([sys.executable, "-m", "ume_edge.build", "--backend", "tensorrt"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "pip install 'ume-edge[tensorrt]'" in result.stderr and "--export-only" in result.stderr


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(not is_available(), reason="TensorRT and a CUDA GPU are required; none on this machine")
def test_real_tensorrt_build_answers_like_onnxruntime(tmp_path, int8_engines, avdigits_test):
    import numpy as np

    from ume_edge.runtime import Pipeline

    plans = Pipeline.load(build(BuildOptions(backend="tensorrt", out=tmp_path / "trt")))
    cpu = Pipeline.load(int8_engines)
    inputs = {n: x[:64] for n, x in avdigits_test[0].items()}
    mixed = {"audio": np.arange(64) % 3 != 0, "image": np.arange(64) % 3 != 1}
    for present in (None, mixed):
        trt_labels = plans.infer(inputs, present=present).labels
        agreement = (trt_labels == cpu.infer(inputs, present=present).labels).mean()
        assert agreement >= 0.95  # two INT8 engines from one calibration; argmax may flip on near-ties
    manifest = json.loads((tmp_path / "trt" / "manifest.json").read_text())
    assert manifest["device"]["kind"] == "gpu" and manifest["versions"]["tensorrt"]
