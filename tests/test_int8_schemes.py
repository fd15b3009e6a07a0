"""The INT8 files of an encoder with attention (``ume_edge.build.int8_schemes``): a small Transformer exported and
quantized by the build's own code. The CPU file puts Q/DQ only on the weighted operations' inputs (none around
element-wise ops, Softmax or LayerNorm), the dynamic file needs no calibration, the TensorRT file keeps NVIDIA's
placement; a model without attention keeps the CPU file it had. And a manifest from before ``int8_scheme`` loads."""

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from ume_edge import engine_dir
from ume_edge.build.export import export_modality
from ume_edge.build.int8_schemes import DYNAMIC, STATIC, attention_matmuls, faster, has_attention
from ume_edge.build.qdq_rules import check_tensorrt_qdq
from ume_edge.build.quantize import WEIGHTED_OPS, Quantizer
from ume_edge.model import Modality, UMEModel

LENGTH, VOCAB = 16, 50
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Erf", "Pow", "Sqrt", "Tanh", "Relu", "Sigmoid", "Where"}
FLOAT_OPS = {"Softmax", "LayerNormalization"}


class TinyTransformer(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, width)
        layer = nn.TransformerEncoderLayer(width, 2, 2 * width, dropout=0.0, activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, tokens):
        return self.encoder(self.tokens(tokens)).mean(dim=1)


def _quantized(tmp_path, modality: Modality, samples: np.ndarray):
    torch.manual_seed(0)
    model = UMEModel([modality], 4, name="tiny").eval()
    fp32 = tmp_path / f"{modality.name}.onnx"
    export_modality(model, modality.name, fp32, samples[:8])
    with Quantizer() as quantizer:
        return quantizer.calibrate(fp32, modality.name, samples, "minmax", tmp_path)


@pytest.fixture(scope="module")
def transformer_files(tmp_path_factory):
    tokens = np.random.default_rng(0).integers(1, VOCAB, (32, LENGTH)).astype(np.int64)
    return _quantized(tmp_path_factory.mktemp("tiny"), Modality("text", TinyTransformer(), (LENGTH,), "int64", 32),
                      tokens)


def _consumers(graph) -> dict[str, list]:
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def ops_reading_dequantized(graph) -> list[str]:
    """The op types that read a dequantized activation (a QuantizeLinear -> DequantizeLinear pair), one entry per
    read. (Dequantized constants are left out: the exporter shares equal initializers, such as a Gemm's zero bias and
    a LayerNorm's, and the Gemm's int32 bias then reaches the LayerNorm too, exactly.)"""
    consumers = _consumers(graph)
    quantized = {node.output[0] for node in graph.node if node.op_type == "QuantizeLinear"}
    return [consumer.op_type for node in graph.node if node.op_type == "DequantizeLinear" and node.input[0] in quantized
            for consumer in consumers.get(node.output[0], [])]


def test_transformer_cpu_file_quantizes_only_the_weighted_ops(transformer_files):
    graph = onnx.load(transformer_files.cpu_u8s8).graph
    assert has_attention(graph)
    read = ops_reading_dequantized(graph)
    assert not ELEMENTWISE & set(read) and not FLOAT_OPS & set(read), read
    # 2 layers x (in-projection, out-projection, FFN x2); the head's Gemm writes the logits and stays in float
    assert read == ["MatMul"] * len(read) or sorted(set(read)) == ["Gemm", "MatMul"]
    assert len(read) == 8, read
    quantized_inputs = {node.input[0] for node in graph.node if node.op_type == "QuantizeLinear"}
    producers = {out: node.op_type for node in graph.node for out in node.output}
    assert not {producers.get(name) for name in quantized_inputs} & set(WEIGHTED_OPS)  # their outputs stay in float


def test_transformer_dynamic_file_needs_no_calibration(transformer_files):
    graph = onnx.load(transformer_files.cpu_dynamic).graph
    ops = {node.op_type for node in graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    assert not {"QuantizeLinear", "DequantizeLinear"} & ops
    assert {"Softmax", "LayerNormalization"} <= ops and "Erf" in ops  # left as they were, in float


def test_transformer_tensorrt_file_keeps_nvidia_placement(transformer_files):
    assert check_tensorrt_qdq(transformer_files.tensorrt_s8s8) == []
    graph = onnx.load(transformer_files.tensorrt_s8s8).graph
    read = ops_reading_dequantized(graph)
    assert {"MatMul", "Gemm"} <= set(read) and not (FLOAT_OPS | {"Erf", "Div"}) & set(read), read
    dequantized = {node.output[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    attention = set(attention_matmuls(onnx.load(transformer_files.prepared).graph))
    assert attention and not [n.name for n in graph.node if n.name in attention and dequantized & set(n.input)]


def test_a_model_without_attention_keeps_its_cpu_file(tmp_path):
    mlp = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
    samples = np.random.default_rng(0).normal(size=(32, 6)).astype(np.float32)
    files = _quantized(tmp_path, Modality("imu", mlp, (6,), "float32", 32), samples)
    assert files.cpu_dynamic is None
    graph = onnx.load(files.cpu_u8s8).graph
    producers = {out: node.op_type for node in graph.node for out in node.output}
    quantized_outputs = [producers.get(n.input[0]) for n in graph.node if n.op_type == "QuantizeLinear"]
    assert "Gemm" in quantized_outputs  # whole chains in int8, as before: each Gemm's output is quantized too


def test_the_faster_scheme_is_kept_only_beyond_the_noise():
    slower = {"ms_batch_1": 1.0, "ms_batch_32": 10.0}
    assert faster({STATIC: slower, DYNAMIC: {"ms_batch_1": 0.8, "ms_batch_32": 8.0}})[0] == DYNAMIC
    assert faster({STATIC: slower, DYNAMIC: {"ms_batch_1": 0.98, "ms_batch_32": 9.9}})[0] == STATIC
    scheme, why = faster({STATIC: slower, DYNAMIC: {"ms_batch_1": 1.5, "ms_batch_32": 12.0}})
    assert scheme == STATIC and "batch_32 12.00 ms against 10.00" in why


def test_a_manifest_without_int8_scheme_loads(int8_engines, tmp_path):
    copy = shutil.copytree(int8_engines, tmp_path / "old")
    manifest_path = copy / engine_dir.MANIFEST_FILE
    data = json.loads(manifest_path.read_text())
    for modality in data["modalities"]:
        modality.pop("int8_scheme", None)
    manifest_path.write_text(json.dumps(data))
    assert [m.int8_scheme for m in engine_dir.load(copy).modalities] == [{}, {}]
