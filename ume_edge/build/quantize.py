"""Calibration and Q/DQ quantisation per target, and the fp16 conversion.

One calibration pass per modality gives two files (docs/development.md, "ONNX Runtime INT8 on x86 CPUs"):

- **U8S8** for ONNX Runtime on the CPU: uint8 activations, int8 per-channel weights, on the operators ONNX Runtime's
  quantizer knows (so that whole chains run in int8: 2-4x faster than fp32 here) except Softmax and LayerNorm
  (``CPU_FLOAT_OP_TYPES``). The node that writes the graph output stays in float: the logits are never
  rounded to an int8 grid.
  An encoder with attention (a Transformer) gets what CPU runtimes run fast instead: only its weighted operations
  in int8, by static Q/DQ or by dynamic quantization, whichever the gate finds faster (``int8_schemes``).
- **S8S8** for TensorRT, placed as NVIDIA documents it (TensorRT developer guide, "Explicit Quantization", Q/DQ
  layer-placement recommendations): the inputs of weighted operations quantized, their outputs not, so LayerNorm,
  Softmax, GELU, embeddings and the graph output stay in float. ``qdq_rules`` checks what TensorRT accepts.

The second file reuses the first one's ranges through ONNX Runtime's calibration cache, and so does every
re-quantization of the per-layer fallback (no second calibration).

ONNX Runtime's quantization tools print their progress (its histogram calibrators call ``print``) and log through the
root logger (module-level ``logging.warning``, which configures the root logger when it has no handler). Neither may
reach the caller's process, so they run in a worker process of our own (``Quantizer``): its stdout goes to /dev/null,
and the warnings it logs come back with each result and are logged here at DEBUG.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ume_edge.errors import BuildError

LOGGER = logging.getLogger(__name__)
CALIB_METHODS = ("entropy", "percentile", "minmax")
CALIB_BATCH = 32
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # the weight is input 1 of each
# TensorRT's INT8 tensor-core GEMM kernels need both the reduction (K) and the output (N) dimension to be at least 16;
# below that Q/DQ buys no speed and costs accuracy (NVIDIA ModelOpt excludes such GEMMs: _MIN_MATMUL_DIM = 16). A
# classifier head over a few classes is the usual case.
MIN_TENSORRT_GEMM_DIM = 16
# The CPU file quantizes every operator ONNX Runtime's quantizer knows but these: Softmax (its input carries attention
# scores and an additive -1e4 mask that one int8 grid cannot hold together: a Transformer lost 19 points that way) and
# the normalizations (no int8 kernel on the CPU, so Q/DQ there only adds error). Both cost no measurable speed on the
# edge-size Transformer here; keeping the embeddings' Gather in float did (15%), so it stays quantized in this file.
CPU_FLOAT_OP_TYPES = ("Softmax", "LayerNormalization", "InstanceNormalization")
TENSORRT_QDQ_OPTIONS = {
    "ActivationSymmetric": True, "WeightSymmetric": True,  # zero-point 0
    "QuantizeBias": False,  # float biases
    "DedicatedQDQPair": False,  # one Q/DQ pair per tensor, shared by its consumers (as ModelOpt does)
    "OpTypesToExcludeOutputQuantization": list(WEIGHTED_OPS),  # quantize the inputs of weighted ops, not outputs
    "AddQDQPairToWeight": True,  # float weights behind Q/DQ: TensorRT quantizes them when it builds the plan
    "QDQOpTypePerChannelSupportToAxis": {"MatMul": -1},  # MatMul weights are [..., K, N]: output channels last
}


@dataclass(frozen=True)
class QuantizedFiles:
    """The two Q/DQ files of one modality, the calibration ranges they share, and the pre-processed fp32 model they
    were made from (re-quantizations start from it)."""

    cpu_u8s8: Path
    tensorrt_s8s8: Path
    calibration_cache: Path
    prepared: Path
    input_name: str
    method: str
    float_nodes: tuple[str, ...] = ()
    cpu_dynamic: Path | None = None  # an encoder with attention: its dynamically quantized CPU file


def _check_method(method: str) -> None:
    if method not in CALIB_METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {', '.join(CALIB_METHODS)}")


def _ort_method(method: str):
    from onnxruntime.quantization import CalibrationMethod

    _check_method(method)
    return {"entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile,
            "minmax": CalibrationMethod.MinMax}[method]


def _reader(input_name: str, samples: np.ndarray):
    from onnxruntime.quantization import CalibrationDataReader

    # ORT's histogram calibrators stack per-batch outputs, so every batch must have the same size: the tail that
    # does not fill a batch is left out.
    size = min(CALIB_BATCH, len(samples))
    usable = len(samples) // size * size

    class ArrayReader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{input_name: samples[i:i + size]} for i in range(0, usable, size)])

        def get_next(self):
            return next(self.batches, None)

    return ArrayReader()


# ---------------------------------------------------------------------------------------------------------------
# placement


def _constant_behind(name: str, constants: dict, producers: dict):
    """The constant array a tensor holds, looking through Identity nodes (how exporters share a weight); else None."""
    while name not in constants and name in producers and producers[name].op_type == "Identity":
        name = producers[name].input[0]
    return constants.get(name)


def _graph_tables(graph) -> tuple[dict, dict]:
    from onnx import numpy_helper

    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    return constants, producers


def _weighted_nodes(graph) -> list:
    """Conv, ConvTranspose, Gemm and MatMul nodes whose input 1 is a constant (a MatMul of two activations, as in
    attention, is not a weighted operation)."""
    constants, producers = _graph_tables(graph)
    return [node for node in graph.node if node.op_type in WEIGHTED_OPS and len(node.input) > 1
            and _constant_behind(node.input[1], constants, producers) is not None]


def _gemm_dims(node, weight: np.ndarray) -> tuple[int, int]:
    """(K, N) of a Gemm or MatMul from its weight: Gemm B is [N, K] with transB=1, else [K, N]; MatMul B [..., K, N]."""
    trans_b = any(a.name == "transB" and a.i for a in node.attribute)
    k, n = weight.shape[-2:]
    return (n, k) if node.op_type == "Gemm" and trans_b else (k, n)


def tensorrt_float_nodes(graph) -> list[str]:
    """Nodes of quantized op types that NVIDIA's placement leaves in float: MatMuls of two activations, and GEMMs
    too small for INT8 tensor cores (K or N below ``MIN_TENSORRT_GEMM_DIM``)."""
    constants, producers = _graph_tables(graph)
    weighted = {node.name for node in _weighted_nodes(graph)}
    names = []
    for node in graph.node:
        if node.op_type not in WEIGHTED_OPS:
            continue
        if node.name not in weighted:
            names.append(node.name)
        elif node.op_type in ("Gemm", "MatMul"):
            weight = _constant_behind(node.input[1], constants, producers)
            if weight.ndim >= 2 and min(_gemm_dims(node, weight)) < MIN_TENSORRT_GEMM_DIM:
                names.append(node.name)
    return names


def tensorrt_quantizes_any(fp32_path: Path) -> bool:
    """Whether NVIDIA's placement leaves any weighted node of the model to quantize."""
    import onnx

    graph = onnx.load(str(fp32_path), load_external_data=False).graph
    return bool({node.name for node in _weighted_nodes(graph)} - set(tensorrt_float_nodes(graph)))


def cpu_op_types() -> list[str]:
    """What ``quantize_static`` quantizes when not told (its two operator registries), less ``CPU_FLOAT_OP_TYPES``."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return sorted((set(QDQRegistry) | set(QLinearOpsRegistry)) - set(CPU_FLOAT_OP_TYPES))


def cpu_float_nodes(graph) -> list[str]:
    """The nodes that write a graph output: their output is never quantized in the CPU file."""
    outputs = {o.name for o in graph.output}
    return [node.name for node in graph.node if outputs.intersection(node.output)]


# ---------------------------------------------------------------------------------------------------------------
# the worker process


def _calibrate_and_quantize(fp32_path: Path, samples_path: Path, files: QuantizedFiles) -> QuantizedFiles:
    """Both files, and for an encoder with attention the dynamically quantized CPU file too (``files.cpu_dynamic``,
    else None)."""
    import onnx
    from onnxruntime.quantization import quant_pre_process

    from ume_edge.build.int8_schemes import has_attention, quantize_dynamic_file

    files.calibration_cache.unlink(missing_ok=True)
    quant_pre_process(str(fp32_path), str(files.prepared), skip_symbolic_shape=True)
    _quantize_twice(files, _reader(files.input_name, np.load(samples_path)))
    if files.cpu_dynamic is None or not has_attention(onnx.load(str(files.prepared), load_external_data=False).graph):
        return replace(files, cpu_dynamic=None)
    quantize_dynamic_file(files.prepared, files.cpu_dynamic, files.float_nodes)
    return files


def _quantize_twice(files: QuantizedFiles, reader) -> None:
    """The CPU file (calibrating on ``reader`` unless the cache holds the ranges), then the TensorRT file from the
    cache; ``files.float_nodes`` stay in float in both."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from ume_edge.build.int8_schemes import has_attention, quantize_static_file

    graph = onnx.load(str(files.prepared), load_external_data=False).graph
    common = dict(quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
                  calibrate_method=_ort_method(files.method), calibration_cache_path=files.calibration_cache)
    if has_attention(graph):
        quantize_static_file(files.prepared, files.cpu_u8s8, reader, common, files.float_nodes)
    else:
        quantize_static(str(files.prepared), str(files.cpu_u8s8), reader, activation_type=QuantType.QUInt8,
                        op_types_to_quantize=cpu_op_types(),
                        nodes_to_exclude=[*cpu_float_nodes(graph), *files.float_nodes], **common)
    quantize_static(str(files.prepared), str(files.tensorrt_s8s8), None, activation_type=QuantType.QInt8,
                    op_types_to_quantize=list(WEIGHTED_OPS),
                    nodes_to_exclude=[*tensorrt_float_nodes(graph), *files.float_nodes],
                    extra_options=dict(TENSORRT_QDQ_OPTIONS), **common)


class _CollectedWarnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def run_worker_loop() -> None:
    """The worker's loop: a pickled ``(function, args)`` per request on stdin, a pickled reply on what was stdout.
    fd 1 itself goes to /dev/null (``print`` and native writes alike), and a handler on this process's root logger
    collects the warnings so that ONNX Runtime's module-level logging calls print nothing."""
    replies = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    warnings = _CollectedWarnings()
    logging.getLogger().addHandler(warnings)
    while True:
        try:
            function, args = pickle.load(sys.stdin.buffer)
        except EOFError:
            return
        warnings.messages.clear()
        try:
            reply = ("ok", function(*args), warnings.messages)
        except Exception as error:  # any failure goes back to the build, which names the modality
            reply = ("error", f"{type(error).__name__}: {error}", warnings.messages)
        pickle.dump(reply, replies)
        replies.flush()


# ---------------------------------------------------------------------------------------------------------------
# the build's side


class Quantizer:
    """Calibrates and quantizes in one worker process (``python -c``, not multiprocessing: nothing of the caller's
    ``__main__`` is imported again, so a script needs no ``if __name__ == "__main__":`` guard), started on first use
    and kept for the whole build. Use as a context manager, or ``close()``."""

    def __init__(self):
        self._process: subprocess.Popen | None = None
        self._stderr = None

    def __enter__(self) -> Quantizer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._process is not None:
            assert self._process.stdin is not None  # started with stdin=PIPE
            with contextlib.suppress(BrokenPipeError):  # a worker that died leaves the pipe broken
                self._process.stdin.close()
            self._process.wait()
            self._stderr.close()
            self._process = self._stderr = None

    def calibrate(self, fp32_path: Path, input_name: str, samples: np.ndarray, method: str,
                  work_dir: Path) -> QuantizedFiles:
        """Calibrate ``fp32_path`` once on ``samples`` and write the U8S8 (CPU) and S8S8 (TensorRT) Q/DQ files."""
        _check_method(method)
        stem = work_dir / f"{input_name}-{method}"
        files = QuantizedFiles(stem.with_suffix(".u8s8.onnx"), stem.with_suffix(".s8s8.onnx"),
                               stem.with_suffix(".calibration.json"), stem.with_suffix(".prep.onnx"), input_name,
                               method, cpu_dynamic=stem.with_suffix(".dynamic.onnx"))
        samples_path = stem.with_suffix(".samples.npy")
        np.save(samples_path, samples)
        try:
            return self._run(_calibrate_and_quantize, fp32_path, samples_path, files)
        finally:
            samples_path.unlink()

    def requantize(self, files: QuantizedFiles, float_nodes: list[str], tag: str) -> QuantizedFiles:
        """Both static files again from ``files``' calibration ranges, with ``float_nodes`` left in float; ``tag``
        names the new files."""
        stem = files.prepared.with_name(f"{files.input_name}-{files.method}-{tag}")
        variant = replace(files, cpu_u8s8=stem.with_suffix(".u8s8.onnx"), tensorrt_s8s8=stem.with_suffix(".s8s8.onnx"),
                          float_nodes=tuple(float_nodes), cpu_dynamic=None)
        self._run(_quantize_twice, variant, None)
        return variant

    def _start(self) -> None:
        command = f"import sys; sys.path[:] = {sys.path!r}; from {__name__} import run_worker_loop; run_worker_loop()"
        self._stderr = tempfile.TemporaryFile()
        self._process = subprocess.Popen([sys.executable, "-c", command], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=self._stderr)

    def _run(self, function, *args):
        if self._process is None:
            self._start()
        try:
            pickle.dump((function, args), self._process.stdin)
            self._process.stdin.flush()
            status, value, warnings = pickle.load(self._process.stdout)
        except (EOFError, BrokenPipeError, pickle.UnpicklingError):
            raise BuildError(f"the INT8 quantization worker process died: {self._worker_error()}") from None
        for message in warnings:
            LOGGER.debug("onnxruntime.quantization: %s", message)
        if status == "error":
            raise RuntimeError(value)
        return value

    def _worker_error(self) -> str:
        assert self._process is not None  # ``_run`` started it
        code = self._process.wait()
        self._stderr.seek(0)
        lines = self._stderr.read().decode(errors="replace").strip().splitlines()
        self.close()
        return f"exit code {code}" + (f", last line: {lines[-1]}" if lines else "")


def to_fp16(fp32_path: Path, out_path: Path) -> Path:
    """An fp16 copy of the model with fp32 inputs and outputs (TensorRT 11 takes precision from the ONNX)."""
    import onnx
    from onnxconverter_common import float16

    model = float16.convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    onnx.save(model, str(out_path))
    return out_path
