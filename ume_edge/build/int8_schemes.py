"""The CPU file of an encoder with attention (a Transformer): its two INT8 schemes, and the timing that picks one.

A Transformer's CPU file quantizes only what ONNX Runtime runs fast in int8, the weighted operations (Conv, and
MatMul and Gemm with a constant weight); attention's MatMuls of two activations, Softmax, LayerNorm, GELU and every
element-wise op stay in float, with no Q/DQ around them, so that the session fuses them (BiasGelu,
SkipLayerNormalization) as in the fp32 file. Two ways to get there:

- ``static``: Q/DQ on the weighted operations' inputs, from the calibration ranges, read by nothing else; MatMul and
  Gemm outputs stay in float, so each runs as one ``MatMulIntegerToFloat``.
- ``dynamic``: ``quantize_dynamic``: each MatMul quantizes its input from that input's own range at every call
  (``DynamicQuantizeMatMul``); no calibration.

ONNX Runtime's transformer optimizer (``onnxruntime.transformers.optimizer``) is not run: on torch's
``nn.TransformerEncoderLayer`` export it fuses no Attention (the pattern does not match), only SkipLayerNormalization
and BiasGelu, which the session's own optimizer fuses in the files above as well, and the static quantizer no longer
finds the MatMuls of its output (measured here: 0.93x fp32 at batch 32).

The gate scores both schemes and keeps, of those within ``--max-drop``, the faster one on this machine
(``time_schemes``: both files timed alternately, in the same process, at batch 1 and at a batch of up to 32).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ume_edge.build.quantize import WEIGHTED_OPS, _constant_behind, _graph_tables, cpu_float_nodes

STATIC, DYNAMIC = "static", "dynamic"
FLOAT_OUTPUT_OPS = ["MatMul", "Gemm"]
TIMING_BATCH = 32
TIMING_ROUNDS = 5
BATCH1_CALLS = 10
# The dynamic scheme is kept only when it is faster than static by more than this (geometric mean of the two batch
# sizes' time ratios): below it the difference is this machine's noise, and the calibrated scheme is the default.
SPEED_MARGIN = 0.05


def attention_matmuls(graph) -> list[str]:
    """MatMuls of two activations (attention's scores and its weighted sum)."""
    constants, producers = _graph_tables(graph)
    return [node.name for node in graph.node if node.op_type == "MatMul"
            and all(_constant_behind(name, constants, producers) is None for name in node.input)]


def has_attention(graph) -> bool:
    return any(node.op_type == "Softmax" for node in graph.node) and bool(attention_matmuls(graph))


def float_nodes(graph, extra: tuple[str, ...]) -> list[str]:
    """What both schemes leave in float: the node that writes the logits, attention's MatMuls and ``extra``."""
    return [*cpu_float_nodes(graph), *attention_matmuls(graph), *extra]


def quantize_static_file(prepared: Path, out: Path, reader, common: dict, extra_float: tuple[str, ...]) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_static

    graph = onnx.load(str(prepared), load_external_data=False).graph
    quantize_static(str(prepared), str(out), reader, activation_type=QuantType.QUInt8,
                    op_types_to_quantize=list(WEIGHTED_OPS), nodes_to_exclude=float_nodes(graph, extra_float),
                    extra_options={"OpTypesToExcludeOutputQuantization": FLOAT_OUTPUT_OPS}, **common)
    model = onnx.load(str(out))
    _unquantized_for_float_ops(model.graph)
    onnx.save(model, str(out))


def _unquantized_for_float_ops(graph) -> None:
    """ONNX Runtime's quantizer hands a quantized tensor's one Q/DQ pair to all its consumers; give the float ones
    (the residual Add, LayerNorm, Shape) the tensor itself again, so that only weighted ops read dequantized values."""
    quantized_from = {node.output[0]: node.input[0] for node in graph.node if node.op_type == "QuantizeLinear"}
    float_source = {node.output[0]: quantized_from[node.input[0]] for node in graph.node
                    if node.op_type == "DequantizeLinear" and node.input[0] in quantized_from}
    for node in graph.node:
        if node.op_type not in WEIGHTED_OPS:
            for i, name in enumerate(node.input):
                if name in float_source:
                    node.input[i] = float_source[name]


def quantize_dynamic_file(prepared: Path, out: Path, extra_float: tuple[str, ...]) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(prepared), load_external_data=False).graph
    quantize_dynamic(str(prepared), str(out), per_channel=True, weight_type=QuantType.QInt8,
                     op_types_to_quantize=FLOAT_OUTPUT_OPS, nodes_to_exclude=float_nodes(graph, extra_float),
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def _per_call_s(engine, feeds: dict[str, np.ndarray], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        engine.infer(feeds)
    return (time.perf_counter() - start) / calls


def time_schemes(files: dict[str, Path], open_engine: Callable, name: str, samples: np.ndarray,
                 max_batch: int) -> dict[str, dict[str, float]]:
    """Milliseconds per call of each file at batch 1 and at ``min(TIMING_BATCH, max_batch)`` rows: medians of
    ``TIMING_ROUNDS`` rounds that take the files in turn (load that comes and goes hits both), after an untimed call."""
    batches = sorted({1, min(TIMING_BATCH, max_batch, len(samples))})
    engines = {scheme: open_engine(path) for scheme, path in files.items()}
    try:
        times: dict[str, dict[int, list[float]]] = {scheme: {b: [] for b in batches} for scheme in files}
        for batch in batches:
            feeds = {name: np.ascontiguousarray(samples[:batch])}
            calls = BATCH1_CALLS if batch == 1 else 1
            for engine in engines.values():
                engine.infer(feeds)
            for _ in range(TIMING_ROUNDS):
                for scheme, engine in engines.items():
                    times[scheme][batch].append(_per_call_s(engine, feeds, calls))
    finally:
        for engine in engines.values():
            engine.close()
    return {scheme: {f"ms_batch_{b}": round(float(np.median(t)) * 1e3, 3) for b, t in by_batch.items()}
            for scheme, by_batch in times.items()}


def faster(timings: dict[str, dict[str, float]]) -> tuple[str, str]:
    """The scheme to keep and why, from ``time_schemes``' timings of both."""
    ratios = [timings[DYNAMIC][key] / timings[STATIC][key] for key in timings[STATIC]]
    relative = math.prod(ratios) ** (1 / len(ratios))
    shown = ", ".join(f"{key.removeprefix('ms_')} {timings[DYNAMIC][key]:.2f} ms against {timings[STATIC][key]:.2f}"
                      for key in timings[STATIC])
    if relative < 1 - SPEED_MARGIN:
        return DYNAMIC, f"both within --max-drop; dynamic is faster here ({shown})"
    return STATIC, f"both within --max-drop; dynamic is not more than {SPEED_MARGIN:.0%} faster here ({shown})"
