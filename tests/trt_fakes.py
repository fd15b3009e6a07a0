"""Fakes of TensorRT (10.3, 10.16, 11.4) and cuda-python's runtime (12.9, 13), held to tables of the real APIs.

Every enum of a fake takes its members and values from the table of the version it claims (tests/api_tables/), so
TensorRT 11.4's ``BuilderFlag`` has no FP16 or INT8 and ``getattr(trt.BuilderFlag, "FP16")`` fails there as it would.
Methods take the real parameter names; properties the real API makes read-only are read-only.
``test_api_tables.py`` checks each fake against its table; names that exist only for tests are listed in
``TENSORRT_TEST_ONLY`` and ``CUDA_TEST_ONLY``.

What the fakes model, beyond names:

* Plans (fake_trtexec.py's format) carry the ONNX they were built from; an engine computes with ONNX Runtime on it.
* Deserializing refuses (returns None and logs, as TensorRT does) a plan of another TensorRT release or GPU (unless
  version- or hardware-compatible), a version-compatible plan unless ``Runtime.engine_host_code_allowed`` was set
  first, and a DLA plan on a release or device without DLA. ``Runtime.DLA_core`` (default -1, "unset" in
  NvInferRuntime.h) picks the core a DLA plan runs on; unset runs it on core 0 (the behaviour issue 9 reports: "a plan
  built for core 1 runs on core 0"; not checked against a Jetson). A DLA plan's profile is fixed at the largest
  batch.
* The builder refuses precision flags on a strongly typed network (TensorRT 10; NVIDIA/TensorRT#4253); TensorRT 11
  networks are always strongly typed. A timing cache from another release or GPU does not match
  (``set_timing_cache`` returns False unless ``ignore_mismatch``).
* Device memory is host memory that ``cudaMalloc`` fills with 0xFF bytes (NaN as float32), like uninitialised GPU
  memory; every copy checks that its device side lies inside one allocation. Streams are lazy: copies, runs and graph
  launches queue on their stream and run only when something waits for them (``cudaStreamSynchronize``, or a stream
  reaching a ``cudaStreamWaitEvent`` on an event recorded after them), so code that forgets a wait reads stale or NaN
  memory here as it could on a GPU. A copy from host memory reads it when queued (the driver stages pageable memory);
  a copy to host memory writes it when its stream runs.
* Stream capture is per stream: runs and device-to-device copies on a capturing stream go into the graph; a host copy,
  a synchronisation or an event on it invalidates the capture (``cudaErrorStreamCaptureUnsupported``), and
  ``cudaStreamEndCapture`` then returns ``cudaErrorStreamCaptureInvalidated`` and no graph. ``alive()`` lists every
  allocation, stream, event, graph and capture not yet freed or ended.
"""

from __future__ import annotations

import ctypes
import enum
import functools
import itertools
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from api_conformance import load_cuda, load_tensorrt  # tests/api_conformance.py; pytest puts tests/ on sys.path
from fake_trtexec import (
    H100,
    PRECISION_FLAGS,
    Device,
    PlanHeader,
    has_dla,
    parse_plan,
    release_tuple,
    serialize_plan,
    timing_cache_bytes,
    timing_cache_matches,
)

TENSORRT_VERSIONS = {"10.3": "10.3.0", "10.16": "10.16.1.11", "11.4": "11.4.0.106"}  # table -> release it claims
CUDA_VERSIONS = ("12.9", "13")
TENSORRT_TEST_ONLY = {"builds", "deserialized", "runs", "parse_errors", "while_capturing"}
CUDA_TEST_ONLY = {"view", "copies", "graph_launches", "alive", "invalidate_captures", "allocations_left", "device"}
ONNX_TO_TENSORRT = {1: "FLOAT", 10: "HALF", 3: "INT8", 2: "UINT8", 6: "INT32", 7: "INT64", 9: "BOOL"}
NUMPY_TYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "UINT8": np.uint8, "INT32": np.int32,
               "INT64": np.int64, "BOOL": np.bool_}

@functools.cache
def _enum(package: str, version: str, name: str) -> type[enum.IntEnum]:
    """The enum ``name`` of a real API, as an IntEnum with the table's members and values (aliases included)."""
    table = load_tensorrt(version) if package == "tensorrt" else load_cuda(version)
    return enum.IntEnum(name.rpartition(".")[2], table["enums"][name])


# ---------------------------------------------------------------- cuda-python


class FakeStream:
    """A ``cudaStream_t``: ``int()`` gives its handle, as cuda-python's does."""

    def __init__(self, handle: int):
        self._handle, self._queued, self._done = handle, [], 0
        self._capture: list | None = None  # the operations of an active capture
        self._capture_invalidated = False

    def __int__(self):
        return self._handle


class FakeEvent:
    def __init__(self, flags: int):
        self._flags, self._stream, self._count = flags, None, 0


class FakeGraph:
    def __init__(self, operations: list):
        self._operations = operations


class FakeCuda:
    """cuda-python's runtime module (``cuda.bindings.runtime``) of ``version``, on one fake ``device``."""

    def __init__(self, version: str = "12.9", device: Device = H100, device_count: int = 1):
        self.device, self._device_count = device, device_count
        for name in ("cudaError_t", "cudaMemcpyKind", "cudaStreamCaptureMode", "cudaStreamCaptureStatus"):
            setattr(self, name, _enum("cuda", version, name))
        self.cudaEventDisableTiming = load_cuda(version)["attributes"]["cudaEventDisableTiming"]["value"]
        self._memory: dict[int, np.ndarray] = {}
        self._streams: dict[int, FakeStream] = {}
        self._events: list[FakeEvent] = []
        self._graphs: list[FakeGraph] = []
        self._executables: list[FakeGraph] = []
        self._handles = itertools.count(7)
        self.copies: list[dict] = []  # one entry per copy call: kind, width, height, dpitch, spitch
        self.graph_launches = 0
        self.invalidate_captures = False  # make every capture fail, as an operation TensorRT cannot capture would
        self.allocations_left: int | None = None  # cudaMalloc fails with cudaErrorMemoryAllocation after these

    def _ok(self, *values):
        return (self.cudaError_t.cudaSuccess, *values)

    def _error(self, name: str, *values):
        return (self.cudaError_t[name], *values)

    def alive(self) -> dict[str, int]:
        """What was created and not yet freed, destroyed or ended; all zero when nothing leaked."""
        return {"allocations": len(self._memory), "streams": len(self._streams), "events": len(self._events),
                "graphs": len(self._graphs), "graph_executables": len(self._executables),
                "capturing_streams": sum(s._capture is not None for s in self._streams.values())}

    # ---------------------------------------------------------------- device
    def cudaGetDeviceCount(self):  # noqa: N802
        if self._device_count == 0:
            return self._error("cudaErrorNoDevice", 0)
        return self._ok(self._device_count)

    def cudaGetDeviceProperties(self, device):  # noqa: N802
        if not 0 <= device < self._device_count:
            return self._error("cudaErrorInvalidDevice", None)
        name = self.device.gpu_name.encode().ljust(256, b"\0")
        major, minor = self.device.compute_capability
        return self._ok(types.SimpleNamespace(name=name, major=major, minor=minor))

    def cudaSetDevice(self, device):  # noqa: N802
        return self._ok() if 0 <= device < self._device_count else self._error("cudaErrorInvalidDevice")

    # ---------------------------------------------------------------- memory
    def cudaMalloc(self, size):  # noqa: N802
        if self.allocations_left == 0:
            return self._error("cudaErrorMemoryAllocation", 0)
        if self.allocations_left is not None:
            self.allocations_left -= 1
        block = np.full(size, 0xFF, np.uint8)
        self._memory[block.ctypes.data] = block
        return self._ok(block.ctypes.data)

    def cudaFree(self, devPtr):  # noqa: N802, N803
        if self._memory.pop(int(devPtr), None) is None:
            return self._error("cudaErrorInvalidValue")
        return self._ok()

    def _is_device(self, pointer: int, nbytes: int = 1) -> bool:
        return any(base <= pointer and pointer + nbytes <= base + len(block) for base, block in self._memory.items())

    def view(self, pointer, shape, dtype) -> np.ndarray:
        """Device memory at ``pointer`` as an array, read or written at once (not on a stream)."""
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        assert self._is_device(pointer, nbytes), "view outside device memory"
        base = max(b for b in self._memory if b <= pointer)
        offset = pointer - base
        return self._memory[base][offset:offset + nbytes].view(dtype).reshape(shape)

    # ---------------------------------------------------------------- streams and events
    def _stream(self, stream) -> FakeStream:
        found = self._streams.get(int(stream))
        assert found is not None, "a stream that does not exist (never created, or destroyed)"
        return found

    def cudaStreamCreate(self):  # noqa: N802
        stream = FakeStream(next(self._handles))
        self._streams[int(stream)] = stream
        return self._ok(stream)

    def cudaStreamDestroy(self, stream):  # noqa: N802
        stream = self._stream(stream)
        if stream._capture is not None:
            return self._error("cudaErrorStreamCaptureUnsupported")
        self._run_until(stream, stream._done + len(stream._queued))  # CUDA finishes queued work first
        del self._streams[int(stream)]
        return self._ok()

    def cudaStreamSynchronize(self, stream):  # noqa: N802
        stream = self._stream(stream)
        if stream._capture is not None:
            return self._unsupported_while_capturing(stream)
        self._run_until(stream, stream._done + len(stream._queued))
        return self._ok()

    def _unsupported_while_capturing(self, stream: FakeStream):
        stream._capture_invalidated = True
        return self._error("cudaErrorStreamCaptureUnsupported")

    def _enqueue(self, stream, operation) -> None:
        stream = self._stream(stream)
        (stream._capture if stream._capture is not None else stream._queued).append(operation)

    def _capturing(self, stream) -> bool:
        return self._stream(stream)._capture is not None

    def _run_until(self, stream: FakeStream, count: int) -> None:
        while stream._done < count:
            operation = stream._queued.pop(0)
            stream._done += 1
            operation()

    def cudaEventCreateWithFlags(self, flags):  # noqa: N802
        event = FakeEvent(flags)
        self._events.append(event)
        return self._ok(event)

    def cudaEventDestroy(self, event):  # noqa: N802
        if event not in self._events:
            return self._error("cudaErrorInvalidResourceHandle")
        self._events.remove(event)
        return self._ok()

    def cudaEventRecord(self, event, stream):  # noqa: N802
        assert event in self._events, "recording a destroyed event"
        target = self._stream(stream)
        if target._capture is not None:  # the fakes do not model events inside a capture
            return self._unsupported_while_capturing(target)
        event._stream, event._count = target, target._done + len(target._queued)
        return self._ok()

    def cudaStreamWaitEvent(self, stream, event, flags):  # noqa: N802
        assert event in self._events and flags == 0
        if self._capturing(stream):
            return self._unsupported_while_capturing(self._stream(stream))
        if event._stream is not None:  # an event never recorded is complete
            target, count = event._stream, event._count
            self._enqueue(stream, lambda: self._run_until(target, count))
        return self._ok()

    # ---------------------------------------------------------------- copies
    def cudaMemcpyAsync(self, dst, src, count, kind, stream):  # noqa: N802
        return self.cudaMemcpy2DAsync(dst, count, src, count, count, 1, kind, stream)

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):  # noqa: N802
        if width > dpitch or width > spitch:
            return self._error("cudaErrorInvalidPitchValue")
        kind = self.cudaMemcpyKind(kind)
        kinds = self.cudaMemcpyKind
        device_src = kind in (kinds.cudaMemcpyDeviceToHost, kinds.cudaMemcpyDeviceToDevice)
        device_dst = kind in (kinds.cudaMemcpyHostToDevice, kinds.cudaMemcpyDeviceToDevice)
        for pointer, pitch, on_device in ((src, spitch, device_src), (dst, dpitch, device_dst)):
            span = (height - 1) * pitch + width if height else 0
            if on_device:
                assert self._is_device(pointer, span), f"{kind.name} reaches outside device memory"
            else:
                assert not self._is_device(pointer), f"{kind.name} got a device pointer for its host side"
        if self._capturing(stream) and kind != kinds.cudaMemcpyDeviceToDevice:  # pageable host memory
            return self._unsupported_while_capturing(self._stream(stream))
        self.copies.append({"kind": kind.name, "width": width, "height": height, "dpitch": dpitch, "spitch": spitch})
        rows = [ctypes.string_at(src + r * spitch, width) if not device_src else src + r * spitch
                for r in range(height)]  # host memory is read now, device memory when the stream runs

        def copy():
            for r, row in enumerate(rows):
                ctypes.memmove(dst + r * dpitch, row, width)

        self._enqueue(stream, copy)
        return self._ok()

    # ---------------------------------------------------------------- graphs
    def cudaStreamBeginCapture(self, stream, mode):  # noqa: N802
        target = self._stream(stream)
        self.cudaStreamCaptureMode(mode)  # a mode that does not exist raises, as cuda-python does
        if target._capture is not None:
            return self._error("cudaErrorIllegalState")
        target._capture, target._capture_invalidated = [], self.invalidate_captures
        return self._ok()

    def cudaStreamEndCapture(self, stream):  # noqa: N802
        target = self._stream(stream)
        if target._capture is None:
            return self._error("cudaErrorIllegalState", None)
        operations, target._capture = target._capture, None
        if target._capture_invalidated:
            return self._error("cudaErrorStreamCaptureInvalidated", None)
        graph = FakeGraph(operations)
        self._graphs.append(graph)
        return self._ok(graph)

    def cudaGraphInstantiate(self, graph, flags):  # noqa: N802
        assert graph in self._graphs, "instantiating a graph that does not exist"
        executable = FakeGraph(list(graph._operations))
        self._executables.append(executable)
        return self._ok(executable)

    def cudaGraphDestroy(self, graph):  # noqa: N802
        if graph not in self._graphs:
            return self._error("cudaErrorInvalidValue")
        self._graphs.remove(graph)
        return self._ok()

    def cudaGraphExecDestroy(self, graphExec):  # noqa: N802, N803
        if graphExec not in self._executables:
            return self._error("cudaErrorInvalidValue")
        self._executables.remove(graphExec)
        return self._ok()

    def cudaGraphLaunch(self, graphExec, stream):  # noqa: N802, N803
        assert graphExec in self._executables, "launching a destroyed graph"
        self.graph_launches += 1
        for operation in graphExec._operations:
            self._enqueue(stream, operation)
        return self._ok()


# ---------------------------------------------------------------- TensorRT


class FakeTensorRT:
    """The ``tensorrt`` module of one table version (``TENSORRT_VERSIONS``), claiming to be ``release`` (default: the
    table's own), on ``cuda``'s device."""

    def __init__(self, cuda: FakeCuda, version: str = "10.16", release: str | None = None):
        table = load_tensorrt(version)
        self.__version__ = release or TENSORRT_VERSIONS[version]
        assert release_tuple(self.__version__)[:2] == release_tuple(version)[:2], "a release of another table"
        self._cuda, self._version = cuda, version
        for name in ("NetworkDefinitionCreationFlag", "MemoryPoolType", "BuilderFlag", "DeviceType",
                     "HardwareCompatibilityLevel", "TensorIOMode", "DataType", "ExecutionContextAllocationStrategy"):
            setattr(self, name, _enum("tensorrt", version, name))
        self.Logger = type("Logger", (FakeLogger,), {"Severity": _enum("tensorrt", version, "ILogger.Severity")})
        for member in self.Logger.Severity:
            setattr(self.Logger, member.name, member)
        for name, base in (("Builder", FakeBuilder), ("Runtime", FakeRuntime), ("OnnxParser", FakeOnnxParser)):
            setattr(self, name, type(name, (base,), {"_trt": self}))
        assert table["attributes"]["__version__"]["value"] == TENSORRT_VERSIONS[version]
        self.builds: list[dict] = []  # what each build_serialized_network call was asked for
        self.deserialized: list[dict] = []  # each deserialize_cuda_engine: the runtime's settings, whether it loaded
        self.runs: list[dict] = []  # each run that reached the (fake) GPU: the plan's inputs, batch, DLA core
        self.parse_errors: list[str] = []  # the ONNX parser fails with these
        self.while_capturing = "enqueue"  # what execute_async_v3 does on a capturing stream: enqueue, refuse, raise

    def nptype(self, trt_type):
        return NUMPY_TYPES[self.DataType(trt_type).name]

    @property
    def _major(self) -> int:
        return release_tuple(self.__version__)[0]

    def _log(self, logger, severity: str, message: str) -> None:
        logger.log(self.Logger.Severity[severity], message)


class FakeLogger:
    def __init__(self, min_severity=2):
        self.min_severity = self.Severity(min_severity)

    def log(self, severity, msg):
        if self.Severity(severity) <= self.min_severity:
            print(f"[TensorRT {self.Severity(severity).name}] {msg}", file=sys.stderr)


class FakeBuilder:
    _trt: FakeTensorRT

    def __init__(self, logger):
        self._logger = logger

    @property
    def logger(self):
        return self._logger

    @property
    def num_DLA_cores(self):  # noqa: N802
        return self._trt._cuda.device.dla_cores if has_dla(self._trt.__version__) else 0

    def create_network(self, flags=0):
        return FakeNetwork(self._trt, flags)

    def create_builder_config(self):
        return FakeBuilderConfig(self._trt)

    def create_optimization_profile(self):
        return FakeOptimizationProfile()

    def build_serialized_network(self, network, config):
        trt, profile = self._trt, config._profiles[0] if config._profiles else None
        flags = [f.name for f in trt.BuilderFlag if config.get_flag(f)]
        dla = config.default_device_type == trt.DeviceType.DLA
        trt.builds.append({"network_flags": network.flags, "builder_flags": flags, "pools": dict(config._pools),
                           "default_device_type": trt.DeviceType(config.default_device_type).name,
                           "DLA_core": config.DLA_core, "profile": dict(profile._shapes) if profile else None,
                           "hardware_compatibility_level":
                               trt.HardwareCompatibilityLevel(config.hardware_compatibility_level).name,
                           "timing_cache": config._timing_cache._data if config._timing_cache else None})
        problem = self._problem(network, config, profile, flags, dla)
        if problem:
            trt._log(self._logger, "ERROR", problem)
            return None
        cache = config._timing_cache
        if cache is not None:
            cache._entries += 1
        shapes = {name: [list(s) for s in ((high,) * 3 if dla else (low, opt, high))]
                  for name, (low, opt, high) in profile._shapes.items()}
        header = PlanHeader(trt.__version__, trt._cuda.device.gpu_name,
                            "{}.{}".format(*trt._cuda.device.compute_capability), network._strongly_typed, flags,
                            shapes, dla, "VERSION_COMPATIBLE" in flags,
                            trt.HardwareCompatibilityLevel(config.hardware_compatibility_level).name == "AMPERE_PLUS")
        return serialize_plan(header, network._onnx)

    def _problem(self, network, config, profile, flags: list[str], dla: bool) -> str | None:
        """Why TensorRT would refuse this build, or None."""
        if network._onnx is None:
            return "the network is empty (no ONNX was parsed into it)"
        if network._strongly_typed and (refused := [f for f in flags if f in PRECISION_FLAGS]):
            return (f"Error Code 2: Internal Error (Assertion !config.getFlag(BuilderFlag::k{refused[0]}) failed. "
                    "Precision flags are not allowed for a strongly typed network)")
        if profile is None or set(profile._shapes) != set(network._inputs):
            return f"an optimization profile must give the shapes of every input {sorted(network._inputs)}"
        for name, (low, opt, high) in profile._shapes.items():
            per_sample = network._inputs[name]
            if any(tuple(s[1:]) != per_sample for s in (low, opt, high)) or not low[0] <= opt[0] <= high[0]:
                return f"invalid profile for {name}: {low} {opt} {high} (per sample {per_sample})"
        if dla and (not has_dla(self._trt.__version__) or not 0 <= config.DLA_core < self.num_DLA_cores):
            return f"DLA core {config.DLA_core} is not available (TensorRT {self._trt.__version__}, " \
                   f"{self.num_DLA_cores} DLA core(s))"
        return None


class FakeNetwork:
    """``INetworkDefinition``: the flags it was created with and, once parsed, the ONNX and its inputs."""

    def __init__(self, trt: FakeTensorRT, flags: int):
        self._flags, self._onnx, self._inputs = flags, None, {}
        bit = int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        self._strongly_typed = trt._major >= 11 or bool(flags >> bit & 1)  # 11: always, the flag is ignored

    @property
    def flags(self):
        return self._flags

    def get_flag(self, flag):
        return bool(self._flags >> int(flag) & 1)


class FakeOnnxParser:
    _trt: FakeTensorRT

    def __init__(self, network, logger):
        self._network, self._logger, self._errors = network, logger, []

    @property
    def num_errors(self):
        return len(self._errors)

    def get_error(self, index):
        return self._errors[index]

    def parse_from_file(self, model):
        import onnx

        self._errors = list(self._trt.parse_errors)
        if not self._errors:
            try:
                graph = onnx.load(model, load_external_data=False).graph
            except Exception as error:  # onnx raises DecodeError and others; TensorRT reports a parse error
                self._errors = [f"failed to parse {model}: {type(error).__name__}"]
            else:
                initializers = {i.name for i in graph.initializer}
                self._network._inputs = {i.name: tuple(d.dim_value for d in i.type.tensor_type.shape.dim[1:])
                                         for i in graph.input if i.name not in initializers}
                self._network._onnx = Path(model).read_bytes()
        return not self._errors


class FakeOptimizationProfile:
    def __init__(self):
        self._shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

    def set_shape(self, input, min, opt, max):  # noqa: A002 (TensorRT's names)
        self._shapes[input] = (tuple(min), tuple(opt), tuple(max))

    def get_shape(self, input):  # noqa: A002
        return [list(s) for s in self._shapes[input]]


class FakeBuilderConfig:
    def __init__(self, trt: FakeTensorRT):
        self._trt, self._pools, self._profiles, self._timing_cache = trt, {}, [], None
        self.flags = 0
        self.default_device_type = trt.DeviceType.GPU
        self.DLA_core = -1
        self.hardware_compatibility_level = trt.HardwareCompatibilityLevel.NONE

    def set_flag(self, flag):
        self.flags |= 1 << int(self._trt.BuilderFlag(flag))

    def get_flag(self, flag):
        return bool(self.flags >> int(flag) & 1)

    def set_memory_pool_limit(self, pool, pool_size):
        self._pools[self._trt.MemoryPoolType(pool).name] = pool_size

    def get_memory_pool_limit(self, pool):
        return self._pools[self._trt.MemoryPoolType(pool).name]

    def add_optimization_profile(self, profile):
        self._profiles.append(profile)
        return len(self._profiles) - 1

    def create_timing_cache(self, serialized_timing_cache):
        return FakeTimingCache(self._trt, bytes(serialized_timing_cache))

    def set_timing_cache(self, cache, ignore_mismatch):
        if cache._data and not ignore_mismatch and not timing_cache_matches(cache._data, self._trt.__version__,
                                                                              self._trt._cuda.device):
            return False
        self._timing_cache = cache
        return True

    def get_timing_cache(self):
        return self._timing_cache


class FakeTimingCache:
    def __init__(self, trt: FakeTensorRT, data: bytes):
        self._trt, self._data, self._entries = trt, data, 0

    def serialize(self):
        return timing_cache_bytes(self._trt.__version__, self._trt._cuda.device, self._entries)


class FakeRuntime:
    _trt: FakeTensorRT

    def __init__(self, logger):
        self._logger = logger
        self.engine_host_code_allowed = False
        self.DLA_core = -1

    @property
    def logger(self):
        return self._logger

    @property
    def num_DLA_cores(self):  # noqa: N802
        return self._trt._cuda.device.dla_cores if has_dla(self._trt.__version__) else 0

    def deserialize_cuda_engine(self, serialized_engine):
        trt = self._trt
        record = {"host_code_allowed": self.engine_host_code_allowed, "DLA_core": self.DLA_core}
        parsed = parse_plan(bytes(serialized_engine))
        problem = "the file is not a TensorRT plan" if parsed is None else self._problem(parsed[0])
        trt.deserialized.append({**record, "loaded": problem is None, "problem": problem})
        if problem:
            trt._log(self._logger, "ERROR", f"IRuntime::deserializeCudaEngine: {problem}")
            return None
        header, onnx_bytes = parsed
        return FakeEngine(trt, self._logger, header, onnx_bytes, max(self.DLA_core, 0) if header.dla else None)

    def _problem(self, plan: PlanHeader) -> str | None:
        trt, device = self._trt, self._trt._cuda.device
        here = release_tuple(trt.__version__)
        if plan.tensorrt != trt.__version__ and not (plan.version_compatible and
                                                      here >= release_tuple(plan.tensorrt)):
            return f"the plan's version tag ({plan.tensorrt}) does not match this TensorRT ({trt.__version__})"
        if plan.version_compatible and not self.engine_host_code_allowed:
            return "a version-compatible plan holds host code: set engine_host_code_allowed to load it"
        capability = "{}.{}".format(*device.compute_capability)
        if plan.compute_capability != capability and not (plan.hardware_compatible and
                                                          device.compute_capability >= (8, 0)):
            return f"the plan was generated on an incompatible device ({plan.gpu_name}, {plan.compute_capability})"
        if plan.dla and not 0 <= max(self.DLA_core, 0) < self.num_DLA_cores:
            return f"DLA core {self.DLA_core} is not available ({self.num_DLA_cores} DLA core(s) here)"
        return None


class FakeEngine:
    """``ICudaEngine`` of a fake plan: its tensors from the ONNX, its profile from the plan."""

    def __init__(self, trt: FakeTensorRT, logger, header: PlanHeader, onnx_bytes: bytes, dla_core: int | None):
        import onnx

        self._trt, self._logger, self._header, self._onnx, self._dla_core = trt, logger, header, onnx_bytes, dla_core
        graph = onnx.load_from_string(onnx_bytes).graph
        initializers = {i.name for i in graph.initializer}
        self._modes, self._dtypes, self._shapes = {}, {}, {}
        for mode, values in (("INPUT", [i for i in graph.input if i.name not in initializers]),
                             ("OUTPUT", list(graph.output))):
            for value in values:
                tensor = value.type.tensor_type
                self._modes[value.name] = trt.TensorIOMode[mode]
                self._dtypes[value.name] = trt.DataType[ONNX_TO_TENSORRT[tensor.elem_type]]
                self._shapes[value.name] = (-1, *(d.dim_value for d in tensor.shape.dim[1:]))
        self._names = list(self._modes)
        self._session = None

    @property
    def num_io_tensors(self):
        return len(self._names)

    @property
    def num_optimization_profiles(self):
        return 1

    def get_tensor_name(self, index):
        return self._names[index]

    def get_tensor_mode(self, name):
        return self._modes[name]

    def get_tensor_dtype(self, name):
        return self._dtypes[name]

    def get_tensor_shape(self, name):
        if self._modes[name] == self._trt.TensorIOMode.INPUT and self._fixed_batch():
            return (self._fixed_batch(), *self._shapes[name][1:])
        return self._shapes[name]

    def get_tensor_profile_shape(self, name, profile_index):
        assert profile_index == 0 and self._modes[name] == self._trt.TensorIOMode.INPUT
        return [tuple(shape) for shape in self._header.profile[name]]

    def _fixed_batch(self) -> int | None:
        low, _, high = next(iter(self._header.profile.values()))
        return high[0] if low[0] == high[0] else None

    def create_execution_context(self, strategy=0):
        return FakeContext(self)

    def _compute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """What the plan computes: its ONNX, run by ONNX Runtime on the CPU."""
        import onnxruntime as ort

        if self._session is None:
            options = ort.SessionOptions()
            options.intra_op_num_threads = options.inter_op_num_threads = 1
            self._session = ort.InferenceSession(self._onnx, options, providers=["CPUExecutionProvider"])
        names = [o.name for o in self._session.get_outputs()]
        return dict(zip(names, self._session.run(names, inputs), strict=True))


class FakeContext:
    """``IExecutionContext``: shapes and addresses are read when a run is queued, as TensorRT reads them."""

    def __init__(self, engine: FakeEngine):
        self._engine, self._input_shapes, self._addresses = engine, {}, {}

    @property
    def engine(self):
        return self._engine

    def _inputs(self) -> list[str]:
        return [n for n in self._engine._names if self._engine._modes[n] == self._engine._trt.TensorIOMode.INPUT]

    def set_input_shape(self, name, shape):
        profile = self._engine.get_tensor_profile_shape(name, 0)
        shape = tuple(shape)
        within = len(shape) == len(profile[0]) and all(
            lo <= s <= hi for lo, s, hi in zip(profile[0], shape, profile[2], strict=True))
        if not within:
            return False
        self._input_shapes[name] = shape
        return True

    def get_tensor_shape(self, name):
        if name in self._input_shapes:
            return self._input_shapes[name]
        if self._engine.get_tensor_mode(name) == self._engine._trt.TensorIOMode.INPUT:
            return self._engine.get_tensor_shape(name)
        batch = self._input_shapes[self._inputs()[0]][0] if self._input_shapes else -1
        return (batch, *self._engine._shapes[name][1:])

    def set_tensor_address(self, name, memory):
        self._addresses[name] = int(memory)
        return True

    def execute_async_v3(self, stream_handle):
        engine, trt = self._engine, self._engine._trt
        cuda = trt._cuda
        missing = [n for n in engine._names if n not in self._addresses] + \
                  [n for n in self._inputs() if n not in self._input_shapes]
        capturing = cuda._capturing(stream_handle)
        if capturing and trt.while_capturing == "raise":
            raise RuntimeError("enqueueV3 failed while the stream was capturing")
        if missing or (capturing and trt.while_capturing == "refuse"):
            trt._log(engine._logger, "ERROR", f"enqueueV3: cannot run (unset: {missing or 'none'})")
            return False
        shapes = {n: tuple(self.get_tensor_shape(n)) for n in engine._names}
        addresses = dict(self._addresses)
        dtypes = {n: trt.nptype(engine._dtypes[n]) for n in engine._names}

        def run():
            inputs = {n: cuda.view(addresses[n], shapes[n], dtypes[n]).copy() for n in self._inputs()}
            trt.runs.append({"inputs": list(inputs), "batch": shapes[self._inputs()[0]][0],
                             "dla_core": engine._dla_core})
            for name, value in engine._compute(inputs).items():
                cuda.view(addresses[name], shapes[name], dtypes[name])[:] = value

        cuda._enqueue(stream_handle, run)
        return True


# ---------------------------------------------------------------- installing them


def install(monkeypatch, version: str = "10.16", release: str | None = None, device: Device = H100,
            cuda_version: str = "12.9") -> tuple[FakeTensorRT, FakeCuda]:
    """Make ``ume_edge.backends.tensorrt.api`` hand out a fresh FakeTensorRT of ``version`` (claiming ``release``) and
    a FakeCuda on ``device``: the one place the backend imports them."""
    from ume_edge.backends.tensorrt import api

    cuda = FakeCuda(cuda_version, device)
    trt = FakeTensorRT(cuda, version, release)
    monkeypatch.setattr(api, "cudart", lambda: cuda)
    monkeypatch.setattr(api, "tensorrt", lambda: trt)
    return trt, cuda


def batches_run(trt: FakeTensorRT, input_name: str) -> list[int]:
    """The batch of every run, in order, of the plans whose first input is ``input_name``."""
    return [run["batch"] for run in trt.runs if run["inputs"][0] == input_name]


def needs_tensorrt_and_gpu(test):
    """Mark a test that needs real TensorRT and a CUDA GPU; it skips, saying so, where they are missing."""
    from ume_edge import backends

    for mark in (pytest.mark.tensorrt, pytest.mark.gpu,
                 pytest.mark.skipif(not backends.get("tensorrt").is_available(),
                                    reason="TensorRT and a CUDA GPU are required; none on this machine")):
        test = mark(test)
    return test
