"""The TensorRT Q/DQ validator, run on small models that ONNX Runtime really quantized."""

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from ume_edge.build.qdq_rules import assert_tensorrt_qdq, check_tensorrt_qdq, count_qdq
from ume_edge.build.quantize import TENSORRT_QDQ_OPTIONS, WEIGHTED_OPS
from ume_edge.errors import BuildError

INPUT_SHAPE = (1, 8, 8)


class ConvLinearNet(torch.nn.Module):
    """Conv (weight axis 0), Linear (exported as Gemm with transB=1) and a bare MatMul with a constant weight."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.fc = torch.nn.Linear(4 * 6 * 6, 5)
        self.projection = torch.nn.Parameter(torch.randn(5, 3))

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1)) @ self.projection


class RandomBatches(CalibrationDataReader):
    def __init__(self):
        rng = np.random.default_rng(0)
        self.batches = iter([{"x": rng.standard_normal((4, *INPUT_SHAPE), dtype=np.float32)} for _ in range(4)])

    def get_next(self):
        return next(self.batches, None)


@pytest.fixture(scope="module")
def fp32_path(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("qdq") / "net.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # dynamo=False is the TorchScript exporter, on purpose
        torch.onnx.export(ConvLinearNet().eval(), (torch.randn(1, *INPUT_SHAPE),), str(path), input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
                          dynamo=False, opset_version=17)
    return path


def quantize(fp32_path, name, **options):
    out = fp32_path.with_name(name)
    quantize_static(str(fp32_path), str(out), RandomBatches(), quant_format=QuantFormat.QDQ, **options)
    return out


@pytest.fixture(scope="module")
def s8s8_path(fp32_path):
    return quantize(fp32_path, "s8s8.onnx", activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    per_channel=True, op_types_to_quantize=list(WEIGHTED_OPS), extra_options=TENSORRT_QDQ_OPTIONS)


def node_named(model, name):
    return next(n for n in model.graph.node if n.name == name)


def test_symmetric_s8s8_per_channel_file_is_clean(s8s8_path):
    assert check_tensorrt_qdq(s8s8_path) == []
    assert_tensorrt_qdq(s8s8_path)
    # x, the Flatten output and the Gemm output (the inputs of Conv, Gemm and MatMul), and the three weights
    assert count_qdq(s8s8_path) == {"quantize": 6, "dequantize": 6, "weights_per_channel": 3,
                                    "weights_per_tensor": 0, "quantized_biases": 0}


def test_ort_puts_weight_scales_on_the_output_channel_axis(s8s8_path):
    model = onnx.load(s8s8_path)
    axes = {n.name: helper.get_attribute_value(n.attribute[0]) for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.attribute}
    assert axes == {"conv.weight_DequantizeLinear": 0, "fc.weight_DequantizeLinear": 0,
                    "projection_DequantizeLinear": 1}


def test_default_u8s8_fails_on_uint8_zero_points_and_bias(fp32_path):
    path = quantize(fp32_path, "u8s8.onnx", activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    violations = check_tensorrt_qdq(path)
    assert "QuantizeLinear 'x_QuantizeLinear' quantizes to uint8; TensorRT accepts only signed int8, never uint8 " \
           "(quantize with activation_type=QuantType.QInt8)" in violations
    assert any(v.startswith("QuantizeLinear 'x_QuantizeLinear' has zero-point") and "not 0" in v for v in violations)
    assert "DequantizeLinear 'conv.bias_DequantizeLinear' dequantizes an int32 tensor (a quantized bias); " \
           "TensorRT needs float biases: quantize with QuantizeBias=False" in violations
    assert count_qdq(path)["quantized_biases"] == 2


def test_per_tensor_weights_are_accepted(fp32_path):
    path = quantize(fp32_path, "per_tensor.onnx", activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    per_channel=False, op_types_to_quantize=list(WEIGHTED_OPS), extra_options=TENSORRT_QDQ_OPTIONS)
    assert check_tensorrt_qdq(path) == []
    assert count_qdq(path)["weights_per_tensor"] == 3


def test_weight_scales_on_the_input_axis_fail(s8s8_path):
    model = onnx.load(s8s8_path)
    node_named(model, "fc.weight_DequantizeLinear").attribute[0].i = 1
    assert check_tensorrt_qdq(model) == [
        "DequantizeLinear 'fc.weight_DequantizeLinear' (weight of Gemm '/fc/Gemm') has per-channel scales of "
        "shape [5] on axis 1; TensorRT needs 5 scales on the output-channel axis 0"]


def test_a_quantize_shared_by_two_dequantizes_is_accepted(s8s8_path):
    model = onnx.load(s8s8_path)
    quantize_x = node_named(model, "x_QuantizeLinear")
    dequantize_x = node_named(model, "x_DequantizeLinear")
    model.graph.node.append(helper.make_node("DequantizeLinear", [quantize_x.output[0], *dequantize_x.input[1:]],
                                             ["x_again"], name="x_second_DequantizeLinear"))
    model.graph.output.append(helper.make_tensor_value_info("x_again", onnx.TensorProto.FLOAT, None))
    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])  # still a valid model

    assert check_tensorrt_qdq(model) == []


def test_a_dequantize_shared_by_two_nodes_is_accepted(s8s8_path):
    model = onnx.load(s8s8_path)
    dequantize_x = node_named(model, "x_DequantizeLinear")
    model.graph.output.append(helper.make_tensor_value_info(dequantize_x.output[0], onnx.TensorProto.FLOAT, None))

    assert check_tensorrt_qdq(model) == []


def test_a_weight_behind_an_identity_is_still_a_weight(s8s8_path):
    model = onnx.load(s8s8_path)
    quantize_weight = node_named(model, "conv.weight_QuantizeLinear")
    quantize_weight.input[0] = "conv.weight_shared"
    model.graph.node.insert(0, helper.make_node("Identity", ["conv.weight"], ["conv.weight_shared"]))
    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    assert check_tensorrt_qdq(model) == []
    assert count_qdq(model)["weights_per_channel"] == 3
    node_named(model, "conv.weight_DequantizeLinear").attribute[0].i = 1
    assert check_tensorrt_qdq(model) == [
        "DequantizeLinear 'conv.weight_DequantizeLinear' (weight of Conv '/conv/Conv') has per-channel scales of "
        "shape [4] on axis 1; TensorRT needs 4 scales on the output-channel axis 0"]


def test_an_activation_with_per_channel_scales_fails(s8s8_path):
    model = onnx.load(s8s8_path)
    scale = next(i for i in model.graph.initializer if i.name == "x_scale")
    scale.CopyFrom(onnx.numpy_helper.from_array(np.full(2, onnx.numpy_helper.to_array(scale), np.float32), "x_scale"))

    assert check_tensorrt_qdq(model) == [
        "QuantizeLinear 'x_QuantizeLinear' has an activation scale of shape [2]; TensorRT needs per-tensor (scalar) "
        "activation scales",
        "DequantizeLinear 'x_DequantizeLinear' has an activation scale of shape [2]; TensorRT needs per-tensor "
        "(scalar) activation scales"]


def test_a_file_without_qdq_is_not_an_int8_file(fp32_path):
    assert check_tensorrt_qdq(fp32_path) == [
        "no QuantizeLinear/DequantizeLinear nodes: an INT8 file for TensorRT must carry explicit Q/DQ "
        "(TensorRT dropped implicit INT8 calibration)"]


def test_assert_raises_build_error_listing_every_violation(fp32_path):
    path = quantize(fp32_path, "listed.onnx", activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    count = len(check_tensorrt_qdq(path))
    with pytest.raises(BuildError) as raised:
        assert_tensorrt_qdq(path, what="modality 'image'")
    message = str(raised.value)
    assert message.startswith(f"modality 'image' breaks {count} TensorRT Q/DQ rule(s):\n  - ")
    assert message.count("\n  - ") == count
