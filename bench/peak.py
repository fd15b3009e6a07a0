"""Compute against this CPU's limit: multiply-accumulates counted from an ONNX graph, and the practical peak of ONNX
Runtime here, measured by INT8 and fp32 GEMM and convolution microbenchmarks run as ume-edge runs its engines."""

from __future__ import annotations

import functools
import json
import math
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The operators whose multiply-accumulates are counted: those of the models ume-edge deploys. The rest (activations,
# norms, Q/DQ, pooling, softmax) do a few operations per value they move, and are left out.
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _with_batch(model, batch: int):
    """A copy of ``model`` whose inputs have ``batch`` rows instead of a symbolic batch dimension."""
    import onnx

    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    del fixed.graph.value_info[:]
    initializers = {i.name for i in fixed.graph.initializer}
    for graph_input in fixed.graph.input:
        if graph_input.name not in initializers:
            first = graph_input.type.tensor_type.shape.dim[0]
            if not first.HasField("dim_value"):
                first.dim_value = batch
    return fixed


def _folded(path: Path, batch: int):
    """The graph at ``batch`` rows with its shape arithmetic folded into constants by ONNX Runtime's basic
    optimisations (which keep every multiply-accumulate: they fold constants and merge MatMul + Add into Gemm).
    ONNX shape inference cannot follow that arithmetic in PyTorch's exports (the ``Div`` and ``Mod`` of a ``Shape``
    that size attention heads), and leaves the shapes after it unknown."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as folder:
        fixed, folded = Path(folder) / "fixed.onnx", Path(folder) / "folded.onnx"
        onnx.save(_with_batch(onnx.load(str(path)), batch), str(fixed))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(folded)
        ort.InferenceSession(str(fixed), options, providers=["CPUExecutionProvider"])
        return onnx.load(str(folded))


def _shapes(model) -> dict[str, tuple[int | None, ...]]:
    """Every tensor's shape from ONNX shape inference; dimensions it could not resolve are None."""
    import onnx

    graph = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True).graph
    shapes = {i.name: tuple(i.dims) for i in graph.initializer}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        if value.type.tensor_type.HasField("shape"):
            shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else None
                                       for d in value.type.tensor_type.shape.dim)
    return shapes


def _node_macs(node, shapes: dict[str, tuple[int | None, ...]]) -> int:
    def shape(name):
        found = shapes.get(name)
        if found is None or None in found:
            raise ValueError(f"{node.op_type} {node.name!r}: shape inference left {name!r} unknown ({found})")
        return found

    if node.op_type == "Conv":  # every output element: (input channels / group) x kernel
        return math.prod(shape(node.output[0])) * math.prod(shape(node.input[1])[1:])
    if node.op_type == "ConvTranspose":  # every input element: (output channels / group) x kernel
        return math.prod(shape(node.input[0])) * math.prod(shape(node.input[1])[1:])
    a = shape(node.input[0])
    if node.op_type == "Gemm":
        trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
        return math.prod(shape(node.output[0])) * (a[0] if trans_a else a[1])
    return math.prod(shape(node.output[0])) * a[-1]  # MatMul, batched and broadcast ones included


@functools.cache
def count_macs(path: str | Path, batch: int) -> dict[str, int]:
    """Multiply-accumulates of one call on ``batch`` rows, per operator type in ``COMPUTE_OPS``, from the ONNX file
    at ``path`` with shapes from ONNX shape inference at that batch."""
    import onnx

    model = _folded(Path(path), batch)
    compute = [node for node in model.graph.node if node.op_type in COMPUTE_OPS]
    before = sum(node.op_type in COMPUTE_OPS for node in onnx.load(str(path), load_external_data=False).graph.node)
    if len(compute) != before:
        raise ValueError(f"{path}: folding left {len(compute)} of its {before} {'/'.join(COMPUTE_OPS)} nodes; "
                         "the others' multiply-accumulates would go uncounted")
    shapes = _shapes(model)
    macs = Counter()
    for node in compute:
        macs[node.op_type] += _node_macs(node, shapes)
    return dict(macs)


def total_macs(path: str | Path, batch: int) -> int:
    return sum(count_macs(path, batch).values())


# ---------------------------------------------------------------------------------------------------------------
# the peak: ONNX Runtime microbenchmarks


@dataclass(frozen=True)
class Microbenchmark:
    """A single compute operator sized to keep both cores busy: its name (the case's target), precision, input shape,
    and weight shape (a MatMul's [K, N], a convolution's [C_out, C_in, kH, kW])."""

    name: str
    precision: str
    input_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]

    @property
    def id(self) -> str:
        return f"{self.name}-{self.precision}"

    @property
    def op_type(self) -> str:
        return "MatMul" if len(self.weight_shape) == 2 else "Conv"

    def inputs(self, seed: int = 0) -> dict[str, np.ndarray]:
        return {"x": np.random.default_rng(seed).normal(0, 1, self.input_shape).astype(np.float32)}


# The conv is ResNet-18's stage-3 convolution at 224x224; of the shapes tried here (1024^3 and 2048^3 MatMuls, 3x3
# convs of 64-512 channels at 7x7 to 28x28) it gave ONNX Runtime's best INT8 rate.
SHAPES = {"matmul-1024x1024x1024": ((1024, 1024), (1024, 1024)),
          "conv3x3-256ch-14x14": ((16, 256, 14, 14), (256, 256, 3, 3))}
MICROBENCHMARKS = tuple(Microbenchmark(name, precision, *shapes) for name, shapes in SHAPES.items()
                        for precision in ("int8", "fp32"))


def _float_model(bench: Microbenchmark):
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(1).normal(0, 0.05, bench.weight_shape).astype(np.float32)
    if bench.op_type == "MatMul":
        node, output = helper.make_node("MatMul", ["x", "w"], ["y"]), [bench.input_shape[0], bench.weight_shape[1]]
    else:
        node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=bench.weight_shape[2:], pads=[1, 1, 1, 1])
        output = [bench.input_shape[0], bench.weight_shape[0], *bench.input_shape[2:]]
    graph = helper.make_graph([node], bench.name, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                 bench.input_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, output)],
                              [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


class _Reader:
    """Calibration data for quantize_static: a few random inputs."""

    def __init__(self, bench: Microbenchmark, samples: int = 2):
        self.feeds = iter([bench.inputs(seed) for seed in range(samples)])

    def get_next(self):
        return next(self.feeds, None)


def write_microbenchmark(bench: Microbenchmark, folder: Path) -> Path:
    """The ONNX file of ``bench``: fp32 as built, INT8 as ume-edge's CPU files are (U8S8 Q/DQ, per-channel weights,
    ``quantize_static``)."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{bench.id}.onnx"
    onnx.save(_float_model(bench), str(path))
    if bench.precision == "int8":
        quantize_static(str(path), str(path), _Reader(bench), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return path


# ---------------------------------------------------------------------------------------------------------------
# where an engine's time goes: ONNX Runtime's profiler


def profile_by_op(path: Path, feeds: dict[str, np.ndarray], runs: int, folder: Path) -> dict[str, float]:
    """Seconds per call spent in each operator type (as ONNX Runtime runs it, after its graph optimisations) by the
    engine file at ``path`` with the session options of ume-edge's engines, from ONNX Runtime's profiler; the rest of
    each call is ``between ops``."""
    import onnxruntime as ort

    from ume_edge.backends.onnxruntime import OnnxRuntimeEngine

    options = OnnxRuntimeEngine(path).session.get_session_options()
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / path.stem)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(runs + 1):  # the first run allocates; it is left out
        session.run(None, feeds)
    trace = json.loads(Path(session.end_profiling()).read_text())
    return _times_by_op(trace, runs)


def _times_by_op(trace: list[dict], runs: int) -> dict[str, float]:
    """Seconds per call in each operator type over the last ``runs`` runs of a profiler trace."""
    timed = sorted((e for e in trace if e.get("cat") == "Session" and e["name"] == "model_run"),
                   key=lambda e: e["ts"])[-runs:]
    by_op = Counter()
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= timed[0]["ts"]:
            by_op[event["args"]["op_name"]] += event["dur"]
    by_op["between ops"] = sum(e["dur"] for e in timed) - sum(by_op.values())
    return {op: us / runs / 1e6 for op, us in by_op.most_common()}
