"""Issue 10's accuracy targets for the shipped reference model's INT8 files, on the AV-Digits test split."""

import numpy as np
import onnx
import pytest
import torch

from ume_edge.backends.onnxruntime import OnnxRuntimeEngine
from ume_edge.build import BuildOptions, build
from ume_edge.constants import PARTIAL_LOGITS

pytestmark = pytest.mark.slow  # full builds

# Largest |TensorRT-target INT8 - fp32| in any partial logit. The files before issue 10 reached 1.87 (audio) and 1.10
# (image); NVIDIA ModelOpt's, from the same calibration data, 0.34 and 0.14: these are about 1.5x ModelOpt's.
MAX_LOGIT_DIFFERENCE = {"audio": 0.5, "image": 0.25}


def _partial_logits(path, name, x):
    engine = OnnxRuntimeEngine(path)
    return np.concatenate([engine.infer({name: x[i:i + 256]})[PARTIAL_LOGITS] for i in range(0, len(x), 256)])


@pytest.fixture(scope="module")
def tensorrt_export(tmp_path_factory):
    return build(BuildOptions(backend="tensorrt", export_only=True, out=tmp_path_factory.mktemp("trt") / "engines"))


@pytest.mark.parametrize("name", sorted(MAX_LOGIT_DIFFERENCE))
def test_tensorrt_target_files_stay_close_to_fp32_in_every_logit(name, tensorrt_export, reference_model,
                                                                 avdigits_test):
    x = avdigits_test[0][name]
    with torch.no_grad():
        expected = reference_model.partial_logits(name, torch.from_numpy(x)).numpy()
    got = _partial_logits(tensorrt_export / "tensorrt" / f"{name}.onnx", name, x)
    assert np.abs(got - expected).max() <= MAX_LOGIT_DIFFERENCE[name]


@pytest.mark.parametrize("name", sorted(MAX_LOGIT_DIFFERENCE))
def test_no_int8_file_rounds_the_logits_to_an_int8_grid(name, tensorrt_export, int8_engines):
    for path in (tensorrt_export / "tensorrt" / f"{name}.onnx", int8_engines / f"{name}.onnx"):
        graph = onnx.load(path).graph
        producer = next(node for node in graph.node if PARTIAL_LOGITS in node.output)
        assert producer.op_type != "DequantizeLinear", path
