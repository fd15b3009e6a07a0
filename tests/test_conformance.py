"""The conformance suite: encoder families users deploy, each built through the command line as a user would.

Two models (``tests/conformance/*.py:build``), three modalities each, float32 and int64 inputs:

- robot: ResNet-style camera (BatchNorm, residual adds, strided stages, global pooling), a 1-D convolutional encoder
  over raw microphone waveforms, and a PointNet-style lidar encoder (shared MLP, max-pool over the points);
- assistant: MobileNet-style camera (depthwise and pointwise convolutions, Hardswish, SiLU, squeeze-and-excitation),
  a depth encoder of Conv -> BatchNorm -> GELU and LayerNorm (the model of issue 10), and a Transformer over int64
  tokens (embeddings, positional embeddings, multi-head attention, LayerNorm, GELU, mean pooling).

Each model is trained for a few seconds on a synthetic task (``conformance/task.py``) in which every modality carries
its own noisy view of the class. Then, for each: fp32 engines equal PyTorch on every presence pattern; INT8 engines
for ONNX Runtime pass the gate and keep their logits close to fp32; the TensorRT export follows TensorRT's rules and
NVIDIA's Q/DQ placement.

Logit closeness, the measure held: for each modality, the largest |INT8 - fp32| partial logit over the evaluation
data, divided by the spread (max - min) of the fp32 partial logits over the same data, at most
``MAX_RELATIVE_LOGIT_ERROR``.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conformance import task
from test_int8_schemes import ops_reading_dequantized  # tests/ is on sys.path

from ume_edge import engine_dir
from ume_edge.backends.onnxruntime import OnnxRuntimeEngine
from ume_edge.build.int8_schemes import DYNAMIC, STATIC
from ume_edge.build.qdq_rules import check_tensorrt_qdq, count_qdq
from ume_edge.build.quantize import WEIGHTED_OPS
from ume_edge.constants import DEFAULT_MAX_DROP, PARTIAL_LOGITS
from ume_edge.data import presence_patterns
from ume_edge.runtime import Pipeline

pytestmark = pytest.mark.slow

FAMILIES = {"robot": {"camera": "ResNet", "mic": "1-D conv over waveforms", "lidar": "PointNet"},
            "assistant": {"camera": "MobileNet", "depth": "Conv-BN-GELU-LayerNorm", "text": "Transformer"}}
TRAIN_ROWS, CALIBRATION_ROWS, EVALUATION_ROWS, EPOCHS = 768, 256, 400, 4
MAX_RELATIVE_LOGIT_ERROR = 0.05
FP32_TOLERANCE = 1e-4


@dataclass
class Trained:
    name: str
    folder: Path
    model: torch.nn.Module
    inputs: dict[str, np.ndarray]
    labels: np.ndarray

    def family(self, modality: str) -> str:
        return f"{self.name}/{modality} ({FAMILIES[self.name][modality]})"

    def build(self, out: str, *options: str) -> engine_dir.Manifest:
        return task.build(self.name, self.folder, out, *options)[0]

    def partial_logits(self, modality: str) -> np.ndarray:
        with torch.no_grad():
            return self.model.partial_logits(modality, torch.from_numpy(self.inputs[modality])).numpy()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def trained(request, tmp_path_factory) -> Trained:
    name, folder = request.param, tmp_path_factory.mktemp(request.param)
    module = task.load(name)
    model = task.train(module.architecture(), *task.dataset(module, TRAIN_ROWS, seed=0), epochs=EPOCHS)
    torch.save(model.state_dict(), folder / f"{name}.pt")
    np.savez(folder / "calib.npz", **task.dataset(module, CALIBRATION_ROWS, seed=1)[0])
    inputs, labels = task.dataset(module, EVALUATION_ROWS, seed=2)
    np.savez(folder / "eval.npz", **inputs, labels=labels)
    return Trained(name, folder, model, inputs, labels)


def relative_logit_error(path: Path, modality: str, trained: Trained) -> float:
    engine = OnnxRuntimeEngine(path)
    got = engine.infer({modality: trained.inputs[modality]})[PARTIAL_LOGITS]
    expected = trained.partial_logits(modality)
    return float(np.abs(got - expected).max() / (expected.max() - expected.min()))


def test_fp32_engines_equal_pytorch_on_every_presence_pattern(trained):
    manifest = trained.build("fp32", "--precision", "fp32")
    inputs = {name: x[:64] for name, x in trained.inputs.items()}
    with Pipeline.load(trained.folder / "fp32") as pipeline:
        for pattern in presence_patterns(manifest.fusion.modality_order):
            batch = {name: (x if name in pattern else None) for name, x in inputs.items()}
            with torch.no_grad():
                expected = trained.model({n: None if x is None else torch.from_numpy(x) for n, x in batch.items()})
            np.testing.assert_allclose(pipeline.infer(batch).logits, expected.numpy(), rtol=FP32_TOLERANCE,
                                       atol=FP32_TOLERANCE, err_msg=f"{trained.name}, pattern {pattern}")


def test_int8_engines_pass_the_gate_and_keep_their_logits_close(trained):
    manifest = trained.build("int8", "--precision", "int8")
    for record in manifest.modalities:
        family, path = trained.family(record.name), trained.folder / "int8" / record.engine.path
        assert record.precision == "int8" and record.quant_format == "U8S8", f"{family} fell back: {record.gate}"
        graph = onnx.load(path).graph
        assert not _quantized_graph_outputs(graph), f"{family}: the CPU file clips the logits"
        if FAMILIES[trained.name][record.name] == "Transformer":
            assert record.int8_scheme["scheme"] in (STATIC, DYNAMIC) and record.int8_scheme["why"], family
            read = ops_reading_dequantized(graph)
            assert set(read) <= {"MatMul", "Gemm"}, f"{family}: Q/DQ around {set(read) - {'MatMul', 'Gemm'}}"
        else:
            assert record.int8_scheme == {"scheme": STATIC}, family
        error = relative_logit_error(path, record.name, trained)
        assert error <= MAX_RELATIVE_LOGIT_ERROR, f"{family}: INT8 logits off by {error:.3f} of their range"
    for pattern, row in manifest.accuracy["patterns"].items():
        assert row["drop"] <= DEFAULT_MAX_DROP, f"{trained.name}, pattern {pattern}: INT8 costs {row['drop']} points"


def test_tensorrt_export_follows_tensorrt_rules_and_nvidia_placement(trained):
    manifest = trained.build("tensorrt", "--backend", "tensorrt", "--export-only")
    for record in manifest.modalities:
        family, path = trained.family(record.name), trained.folder / "tensorrt" / record.onnx.path
        assert check_tensorrt_qdq(path) == [] and manifest.tensorrt_rules[record.name] == [], family
        graph = onnx.load(path).graph
        assert not _quantized_graph_outputs(graph), f"{family}: the graph output passes through Q/DQ"
        assert _placement_problems(graph) == [], family
        counts = count_qdq(path)
        assert counts["quantize"] == counts["dequantize"] == len(_quantized_inputs(graph)), f"{family}: {counts}"
        error = relative_logit_error(path, record.name, trained)
        assert error <= MAX_RELATIVE_LOGIT_ERROR, f"{family}: TensorRT-target logits off by {error:.3f} of their range"


# ---------------------------------------------------------------------------------------------------------------
# reading a Q/DQ graph


def _producers(graph) -> dict:
    return {output: node for node in graph.node for output in node.output}


def _quantized_graph_outputs(graph) -> list[str]:
    producers = _producers(graph)
    return [o.name for o in graph.output if producers[o.name].op_type == "DequantizeLinear"]


def _weighted_consumers(graph) -> list:
    """Conv/ConvTranspose/Gemm/MatMul nodes whose weight (input 1) is a dequantized constant."""
    producers = _producers(graph)
    constants = {i.name for i in graph.initializer}

    def dequantized_constant(name):
        node = producers.get(name)
        if node is None or node.op_type != "DequantizeLinear":
            return False
        source = node.input[0]
        return source in constants or (source in producers and producers[source].op_type == "QuantizeLinear"
                                       and producers[source].input[0] in constants)

    return [n for n in graph.node if n.op_type in WEIGHTED_OPS and dequantized_constant(n.input[1])]


def _quantized_inputs(graph) -> set[str]:
    """Every dequantized tensor a weighted node reads: its activation and its weight."""
    return {name for node in _weighted_consumers(graph) for name in node.input[:2]}


def _placement_problems(graph) -> list[str]:
    """NVIDIA's placement: Q/DQ only on the inputs of weighted operations. A dequantized activation may also reach a
    residual Add that shares it (as ModelOpt places them), nothing else: never LayerNorm, Softmax, GELU, an
    embedding's Gather, or a MatMul of two activations (attention)."""
    weighted = {node.name for node in _weighted_consumers(graph)}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    problems = []
    for node in graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        readers = consumers.get(node.output[0], [])
        if not any(r.name in weighted for r in readers):
            problems.append(f"{node.name} feeds no weighted operation ({sorted(r.op_type for r in readers)})")
        problems += [f"{node.name} feeds {r.op_type} {r.name}" for r in readers
                     if r.name not in weighted and r.op_type != "Add"]
    return problems
