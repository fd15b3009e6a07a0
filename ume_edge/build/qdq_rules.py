"""The Q/DQ rules of TensorRT's explicit quantization, checked on an ONNX file before any build.

Only what NVIDIA documents, each rule with its source in a comment:

- [TYPES] TensorRT developer guide, "Working with Quantized Types": the quantization scheme is symmetric, the INT8
  type signed ("INT8 (signed 8-bit integer)"); scaling is "per-tensor, per-channel, or block-wise".
- [Q-OP] / [DQ-OP] TensorRT operator reference, "Quantize" / "Dequantize": the scale "must be a build-time
  constant", a scalar for per-tensor or a 1-D tensor for per-channel quantization; "the zero_point must only contain
  zero-valued coefficients"; the quantized side is int8, float8 or int4 (no uint8, no int32).
- [WEIGHTS] Developer guide, "Explicit Quantization", "Quantized Weights": weights are given in high precision
  behind a Quantize, or pre-quantized behind a Dequantize; per-channel weight scales run along the output-channel
  axis (K of a convolution's KCRS kernel).

What TensorRT accepts is accepted: a Q/DQ pair shared by several consumers (NVIDIA's ModelOpt writes them), per-tensor
weight scales, a weight reached through Identity nodes. Placement (which tensors carry Q/DQ) is not a rule here:
``quantize`` places them as NVIDIA recommends.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ume_edge.build.quantize import WEIGHTED_OPS
from ume_edge.errors import BuildError

QUANTIZE = "QuantizeLinear"
DEQUANTIZE = "DequantizeLinear"
ONNX_DEFAULT_DQ_AXIS = 1


@dataclass
class _GraphIndex:
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    producers: dict[str, onnx.NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)

    @classmethod
    def of(cls, graph: onnx.GraphProto) -> _GraphIndex:
        index = cls()
        index.constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                index.constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
            if node.op_type == "Identity" and node.input[0] in index.constants:  # an exporter sharing a weight
                index.constants[node.output[0]] = index.constants[node.input[0]]
            for name in node.output:
                index.producers[name] = node
            for name in filter(None, node.input):
                index.consumers.setdefault(name, []).append(node)
        return index


def check_tensorrt_qdq(model_or_path: onnx.ModelProto | str | os.PathLike) -> list[str]:
    """Every way the file breaks TensorRT's Q/DQ rules, one readable sentence each; empty when it is clean."""
    graph = _load(model_or_path).graph
    index = _GraphIndex.of(graph)
    qdq_nodes = [n for n in graph.node if n.op_type in (QUANTIZE, DEQUANTIZE)]
    if not qdq_nodes:  # "Explicit Quantization": INT8 comes from Q/DQ; implicit calibration is deprecated since 10.1
        return ["no QuantizeLinear/DequantizeLinear nodes: an INT8 file for TensorRT must carry explicit Q/DQ "
                "(TensorRT dropped implicit INT8 calibration)"]
    return [violation for node in qdq_nodes for violation in _node_violations(node, index)]


def violations_error(subject: str, violations: list[str]) -> BuildError:
    """The error a TensorRT build gives for ``violations`` of ``subject`` (a file or a modality)."""
    listing = "\n".join(f"  - {v}" for v in violations)
    return BuildError(f"{subject} breaks {len(violations)} TensorRT Q/DQ rule(s):\n{listing}")


def assert_tensorrt_qdq(model_or_path: onnx.ModelProto | str | os.PathLike, what: str | None = None) -> None:
    """Raise ``BuildError`` listing every violation; ``what`` names the file or modality in the message."""
    violations = check_tensorrt_qdq(model_or_path)
    if violations:
        subject = what or (str(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) else "the model")
        raise violations_error(subject, violations)


def count_qdq(model_or_path: onnx.ModelProto | str | os.PathLike) -> dict[str, int]:
    """How many Q and DQ nodes the file has, and how its weights and biases are quantized."""
    graph = _load(model_or_path).graph
    index = _GraphIndex.of(graph)
    counts = dict.fromkeys(("quantize", "dequantize", "weights_per_channel", "weights_per_tensor",
                            "quantized_biases"), 0)
    for node in graph.node:
        if node.op_type == QUANTIZE:
            counts["quantize"] += 1
        if node.op_type != DEQUANTIZE:
            continue
        counts["dequantize"] += 1
        if _quantized_dtype(node, index) == np.int32:
            counts["quantized_biases"] += 1
        elif _weight_consumer(node, index) is not None:
            scale = index.constants.get(node.input[1])
            if scale is None:
                raise BuildError(f"{_label(node)} has a weight scale computed at run time; cannot count its weights")
            per_tensor = scale.size == 1
            counts["weights_per_tensor" if per_tensor else "weights_per_channel"] += 1
    return counts


def _load(model_or_path) -> onnx.ModelProto:
    return model_or_path if isinstance(model_or_path, onnx.ModelProto) else onnx.load(os.fspath(model_or_path))


def _label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} {node.name or node.output[0]!r}"


def _node_violations(node: onnx.NodeProto, index: _GraphIndex) -> list[str]:
    dtype = _quantized_dtype(node, index)
    if node.op_type == DEQUANTIZE and dtype == np.int32:
        # [DQ-OP]: a Dequantize takes int8, float8 or int4; an int32 (quantized bias) input is no TensorRT layer.
        return [f"{_label(node)} dequantizes an int32 tensor (a quantized bias); TensorRT needs float biases: "
                "quantize with QuantizeBias=False"]
    violations = _dtype_violations(node, dtype) + _zero_point_violations(node, index)
    weight_consumer = _weight_consumer(node, index)
    if weight_consumer is None:
        return violations + _activation_scale_violations(node, index)
    return violations + _weight_scale_violations(node, weight_consumer, index)


def _dtype_violations(node: onnx.NodeProto, dtype: np.dtype | None) -> list[str]:
    # [TYPES], [Q-OP]: INT8 is signed; a Quantize outputs int8, float8 or int4, never uint8.
    if dtype is None or dtype == np.int8:
        return []
    hint = " (quantize with activation_type=QuantType.QInt8)" if dtype == np.uint8 else ""
    return [f"{_label(node)} quantizes to {np.dtype(dtype).name}; TensorRT accepts only signed int8, "
            f"never uint8{hint}"]


def _zero_point_violations(node: onnx.NodeProto, index: _GraphIndex) -> list[str]:
    # [TYPES]: symmetric quantization; [Q-OP], [DQ-OP]: "the zero_point must only contain zero-valued coefficients".
    if len(node.input) < 3 or not node.input[2]:
        return []
    zero_point = index.constants.get(node.input[2])
    if zero_point is None:
        return [f"{_label(node)} has a zero-point computed at run time; TensorRT needs a constant zero-point of 0"]
    if np.any(zero_point != 0):
        shown = np.unique(zero_point)[:4].tolist()
        return [f"{_label(node)} has zero-point {shown}, not 0; TensorRT quantization is symmetric "
                "(quantize with ActivationSymmetric=True, WeightSymmetric=True)"]
    return []


def _activation_scale_violations(node: onnx.NodeProto, index: _GraphIndex) -> list[str]:
    # [Q-OP], [DQ-OP]: the scale "must be a build-time constant"; per-channel scales are for weights ([WEIGHTS]), so an
    # activation takes one scale: a scalar.
    scale = index.constants.get(node.input[1])
    if scale is None:
        return [f"{_label(node)} has a scale computed at run time; TensorRT needs a constant scale"]
    if scale.size != 1:
        return [f"{_label(node)} has an activation scale of shape {list(scale.shape)}; TensorRT needs per-tensor "
                "(scalar) activation scales"]
    return []


def _weight_scale_violations(node: onnx.NodeProto, consumer: onnx.NodeProto, index: _GraphIndex) -> list[str]:
    # [Q-OP], [DQ-OP]: a build-time constant scale, a scalar (per-tensor, accepted: [TYPES]) or 1-D (per-channel);
    # [WEIGHTS]: per-channel along the output channels.
    scale = index.constants.get(node.input[1])
    where = f"{_label(node)} (weight of {consumer.op_type} {consumer.name or consumer.output[0]!r})"
    if scale is None:
        return [f"{where} has a scale computed at run time; TensorRT needs constant weight scales"]
    if scale.size == 1:
        return []
    weight = _weight_array(node, index)
    assert weight is not None  # ``consumer`` was found, so ``node`` quantizes a constant weight
    expected_axis = _output_channel_axis(consumer, weight.ndim)
    channels = weight.shape[expected_axis]
    axis = _axis(node, weight.ndim)
    if scale.ndim != 1 or axis != expected_axis or scale.size != channels:
        return [f"{where} has per-channel scales of shape {list(scale.shape)} on axis {axis}; TensorRT needs "
                f"{channels} scales on the output-channel axis {expected_axis}"]
    return []


def _weight_array(node: onnx.NodeProto, index: _GraphIndex) -> np.ndarray | None:
    """The constant a Q/DQ quantizes: its own input, or the input of the QuantizeLinear feeding a DQ."""
    source = node.input[0]
    if source in index.constants:
        return index.constants[source]
    producer = index.producers.get(source)
    if node.op_type == DEQUANTIZE and producer is not None and producer.op_type == QUANTIZE:
        return index.constants.get(producer.input[0])
    return None


def _weight_consumer(node: onnx.NodeProto, index: _GraphIndex) -> onnx.NodeProto | None:
    """The Conv/ConvTranspose/Gemm/MatMul whose weight input this Q/DQ produces, if it quantizes a weight."""
    if _weight_array(node, index) is None:
        return None
    outputs = [node.output[0]]
    if node.op_type == QUANTIZE:
        outputs = [dq.output[0] for dq in index.consumers.get(node.output[0], []) if dq.op_type == DEQUANTIZE]
    while outputs:
        output = outputs.pop()
        for consumer in index.consumers.get(output, []):
            if consumer.op_type == "Identity":
                outputs.append(consumer.output[0])
            elif consumer.op_type in WEIGHTED_OPS and len(consumer.input) > 1 and consumer.input[1] == output:
                return consumer
    return None


def _output_channel_axis(consumer: onnx.NodeProto, weight_rank: int) -> int:
    """Conv weights are [out, in, k...]; ConvTranspose [in, out, k...]; Gemm B is [out, in] when transB=1
    and [in, out] otherwise; MatMul B is [..., in, out]. TensorRT scales weights along the output channels."""
    if consumer.op_type == "Conv":
        return 0
    if consumer.op_type == "ConvTranspose":
        return 1
    if consumer.op_type == "Gemm":
        trans_b = next((helper.get_attribute_value(a) for a in consumer.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return weight_rank - 1


def _axis(node: onnx.NodeProto, rank: int) -> int:
    axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), ONNX_DEFAULT_DQ_AXIS)
    return axis + rank if axis < 0 else axis


def _quantized_dtype(node: onnx.NodeProto, index: _GraphIndex) -> np.dtype | None:
    """The integer type on the quantized side of a Q or DQ, or None where the file does not say."""
    if len(node.input) > 2 and node.input[2] in index.constants:
        return index.constants[node.input[2]].dtype
    if node.op_type == QUANTIZE:
        output_dtype = next((a.i for a in node.attribute if a.name == "output_dtype"), 0)
        return np.dtype(helper.tensor_dtype_to_np_dtype(output_dtype)) if output_dtype else np.dtype(np.uint8)
    if node.input[0] in index.constants:
        return index.constants[node.input[0]].dtype
    producer = index.producers.get(node.input[0])
    return _quantized_dtype(producer, index) if producer is not None and producer.op_type == QUANTIZE else None
