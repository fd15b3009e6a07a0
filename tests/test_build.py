import subprocess
import sys

import numpy as np
import pytest

from ume_edge import engine_dir
from ume_edge.build import BuildOptions, build
from ume_edge.build.inputs import DEFAULT_CALIB
from ume_edge.build.qdq_rules import check_tensorrt_qdq
from ume_edge.data import avdigits, presence_patterns
from ume_edge.errors import BuildError
from ume_edge.runtime import Pipeline

pytestmark = pytest.mark.slow  # full builds


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ume_edge.build", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def test_default_build_from_the_command_line(tmp_path):
    result = _cli("--precision", "int8", "--out", str(tmp_path / "e"))
    assert result.returncode == 0, result.stderr
    for stage in range(1, 7):
        assert f"[{stage}/6]" in result.stderr
    assert "| audio | int8 | entropy | audio.onnx |" in result.stdout
    assert "| audio+image |" in result.stdout and "| image |" in result.stdout
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["audio.onnx", "fusion.onnx", "image.onnx",
                                                                   "manifest.json", "verification.npz"]


def test_manifest_records_what_a_deployment_needs(int8_engines):
    manifest = engine_dir.load(int8_engines)
    assert manifest.schema_version == engine_dir.SCHEMA_VERSION and manifest.format == engine_dir.FORMAT
    assert manifest.model.name == "avdigits" and manifest.model.source == "reference"
    assert len(manifest.model.sha256) == 64
    assert manifest.backend == "onnxruntime" and manifest.precision == "int8"
    assert {m.name: m.shape for m in manifest.modalities} == {"audio": [1, 40, 48], "image": [1, 28, 28]}
    for m in manifest.modalities:
        assert m.dtype == "float32" and len(m.engine.sha256) == 64 and m.export_max_abs_diff < 1e-4
        assert m.gate[0]["method"] == "entropy" and m.quant_format == "U8S8"
    assert manifest.versions["onnxruntime"] and manifest.device["kind"] == "cpu"
    assert manifest.calibration["data"] == DEFAULT_CALIB == "avdigits:calib"
    assert manifest.calibration["data_sha256"] == engine_dir.file_sha256(avdigits.DATA_FILE)
    assert set(manifest.accuracy["patterns"]) == {"audio+image", "audio", "image"}


def test_int8_costs_at_most_half_a_point_on_every_pattern_of_the_test_split(int8_engines, reference_model,
                                                                            avdigits_test):
    import torch

    pipeline = Pipeline.load(int8_engines)
    inputs, labels = avdigits_test
    for pattern in presence_patterns(["audio", "image"]):
        engine_correct = torch_correct = 0
        for start in range(0, len(labels), 64):
            batch = {n: (x[start:start + 64] if n in pattern else None) for n, x in inputs.items()}
            engine_correct += (pipeline.infer(batch).labels == labels[start:start + 64]).sum()
            with torch.no_grad():
                logits = reference_model({n: (torch.from_numpy(x) if x is not None else None)
                                          for n, x in batch.items()})
            torch_correct += (logits.argmax(1).numpy() == labels[start:start + 64]).sum()
        drop = (torch_correct - engine_correct) / len(labels) * 100
        assert drop <= 0.5, f"INT8 costs {drop:.2f} points on {pattern}"


def test_tensorrt_export_only_writes_files_that_follow_tensorrt_qdq_rules(tmp_path):
    out = build(BuildOptions(backend="tensorrt", export_only=True, out=tmp_path / "trt"))
    manifest = engine_dir.load(out)
    assert manifest.backend == "tensorrt" and manifest.export_only
    assert manifest.device["built"] is False
    for m in manifest.modalities:
        assert m.engine is None and m.onnx.path == f"tensorrt/{m.name}.onnx" and m.quant_format == "S8S8"
        assert check_tensorrt_qdq(out / m.onnx.path) == []
        assert m.calibration.path == f"tensorrt/{m.name}.calibration.json"
    assert sorted(manifest.scripts) == ["build_plans_trt10.sh", "build_plans_trt11.sh"]
    cpu_file = tmp_path / "cpu"
    build(BuildOptions(out=cpu_file))
    assert check_tensorrt_qdq(cpu_file / "audio.onnx") != []  # the CPU engine is U8S8: not for TensorRT


def test_fp32_build_matches_pytorch(tmp_path, reference_model, avdigits_test):
    import torch

    pipeline = Pipeline.load(build(BuildOptions(precision="fp32", out=tmp_path / "fp32")))
    inputs = {n: x[:32] for n, x in avdigits_test[0].items()}
    with torch.no_grad():
        expected = reference_model({n: torch.from_numpy(x) for n, x in inputs.items()}).numpy()
    np.testing.assert_allclose(pipeline.infer(inputs).logits, expected, atol=1e-4)


def test_gate_falls_back_to_fp32_when_int8_costs_too_much(tmp_path, rng):
    # Agreement with fp32 on inputs far outside what calibration saw: INT8 clips them, so every calibration method
    # changes some predictions and none keeps within a 0-point allowance; every modality must fall back, alone.
    noise = {"audio": rng.normal(0, 25, (200, 1, 40, 48)), "image": rng.normal(0, 25, (200, 1, 28, 28))}
    np.savez(tmp_path / "noise.npz", **{k: v.astype(np.float32) for k, v in noise.items()})
    out = build(BuildOptions(max_drop=0.0, eval_data=str(tmp_path / "noise.npz"), out=tmp_path / "strict"))
    manifest = engine_dir.load(out)
    for m in manifest.modalities:
        assert m.precision == "fp32"
        assert [t["method"] for t in m.gate] == ["entropy", "percentile", "minmax"]
        assert not any(t["passed"] for t in m.gate)


def _assert_nothing_written(tmp_path):
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_missing_calibration_file_is_a_one_line_error_and_writes_nothing(tmp_path):
    result = _cli("--calib-data", str(tmp_path / "nope.npz"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: calibration data") and "nope.npz" in last_line and "no such file" in last_line
    assert "Traceback" not in result.stderr
    _assert_nothing_written(tmp_path)


@pytest.mark.parametrize("arrays, message", [
    ({"image": np.zeros((8, 1, 28, 28), np.float32)}, "modality 'audio': no array named 'audio'"),
    ({"image": np.zeros((8, 1, 28, 28), np.float32), "audio": np.zeros((8, 1, 40, 40), np.float32)},
     r"modality 'audio': calibration data .* has shape \[8, 1, 40, 40\], expected \[N, 1, 40, 48\]"),
])
def test_mismatched_calibration_data_names_the_modality(tmp_path, arrays, message):
    np.savez(tmp_path / "calib.npz", **arrays)
    with pytest.raises(BuildError, match=message):
        build(BuildOptions(calib_data=str(tmp_path / "calib.npz"), out=tmp_path / "out"))
    _assert_nothing_written(tmp_path)


def test_encoder_that_will_not_export_is_named(tmp_path):
    (tmp_path / "broken.py").write_text(
        "import torch\n"
        "from ume_edge.model import Modality, UMEModel\n"
        "class Host(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        return torch.from_numpy(x.numpy().reshape(len(x), -1)[:, :4].copy())  # leaves the graph\n"
        "def build():\n"
        "    return UMEModel([Modality('lidar', Host(), (2, 4), 'float32', 4)], 3, name='broken')\n")
    np.savez(tmp_path / "calib.npz", lidar=np.zeros((32, 2, 4), np.float32))
    result = _cli("--model", f"{tmp_path / 'broken.py'}:build", "--calib-data", str(tmp_path / "calib.npz"),
                  "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "modality 'lidar'" in result.stderr and "export" in result.stderr
    _assert_nothing_written(tmp_path)


def test_failed_rebuild_keeps_the_previous_build(tmp_path):
    out = build(BuildOptions(precision="fp32", out=tmp_path / "out"))
    before = (out / "manifest.json").read_text()
    with pytest.raises(BuildError):
        build(BuildOptions(calib_data=str(tmp_path / "missing.npz"), out=out))
    assert (out / "manifest.json").read_text() == before
    assert engine_dir.load(out).precision == "fp32"


def test_help_explains_the_main_options():
    result = _cli("--help")
    assert result.returncode == 0
    for option in ("--precision", "--backend", "--calib-data", "--max-drop", "--export-only"):
        assert option in result.stdout
