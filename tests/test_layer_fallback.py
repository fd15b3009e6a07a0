"""The per-layer fallback, end to end through the command line: a modality whose INT8 no calibration method can save
keeps the few layers that cost the accuracy in float and stays INT8 otherwise (``conformance/outliers.py``: one hidden
unit of the ``imu`` encoder runs 1000x larger than the others, between its first and second layer)."""

import numpy as np
import onnx
import pytest
import torch
from conformance import task

from ume_edge.build.qdq_rules import check_tensorrt_qdq
from ume_edge.constants import DEFAULT_MAX_DROP

pytestmark = pytest.mark.slow  # full builds

FIRST, SECOND, THIRD = (f"/encoder/layers/layers.{i}/Gemm" for i in (0, 2, 4))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    module, folder = task.load("outliers"), tmp_path_factory.mktemp("outliers")
    model = module.grow_outlier(task.train(module.architecture(), *task.dataset(module, 768, seed=0), epochs=4))
    torch.save(model.state_dict(), folder / "outliers.pt")
    np.savez(folder / "calib.npz", **task.dataset(module, 256, seed=1)[0])
    inputs, labels = task.dataset(module, 400, seed=2)
    np.savez(folder / "eval.npz", **inputs, labels=labels)
    return folder


def _kept_in_float(manifest, modality):
    return [layer["layer"] for layer in manifest.modality(modality).float_layers]


def _assert_gated(manifest):
    for pattern, row in manifest.accuracy["patterns"].items():
        assert row["drop"] <= DEFAULT_MAX_DROP, pattern


def test_onnxruntime_build_keeps_the_layers_around_the_outlier_in_float(folder):
    manifest, result = task.build("outliers", folder, "cpu")
    imu = manifest.modality("imu")
    assert imu.precision == "int8" and all(not trial["passed"] for trial in imu.gate)
    # The CPU file quantizes the first layer's output and the second layer's input: both hold the outlier.
    assert sorted(_kept_in_float(manifest, "imu")) == [FIRST, SECOND]
    assert all(layer["drop_if_quantized"] > DEFAULT_MAX_DROP for layer in imu.float_layers)
    assert manifest.modality("gps").precision == "int8" and _kept_in_float(manifest, "gps") == []
    _assert_gated(manifest)
    assert "| imu | int8 (2 layer group(s) float) | entropy |" in result.stdout
    assert f"| imu | {SECOND} | Gemm |" in result.stdout and f"| imu | {FIRST} | Gemm |" in result.stdout
    assert "per-layer fallback: sensitivity of 3 layer group(s)" in result.stderr


def test_tensorrt_export_keeps_only_the_layer_that_reads_the_outlier_in_float(folder):
    manifest, _ = task.build("outliers", folder, "trt", "--backend", "tensorrt", "--export-only")
    assert manifest.modality("imu").precision == "int8" and _kept_in_float(manifest, "imu") == [SECOND]
    _assert_gated(manifest)
    path = folder / "trt" / manifest.modality("imu").onnx.path
    assert check_tensorrt_qdq(path) == []
    graph = onnx.load(path).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    inputs = {n.name: n.input[:2] for n in graph.node if n.op_type == "Gemm"}
    assert not dequantized.intersection(inputs[SECOND]), "no Q/DQ on a layer kept in float"
    assert set(inputs[FIRST]) <= dequantized and set(inputs[THIRD]) <= dequantized
