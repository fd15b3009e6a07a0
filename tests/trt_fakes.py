"""Small fakes of the documented TensorRT and cuda-python APIs, as far as ume_edge.backends.tensorrt uses them, so the
glue code runs on a machine with neither.

Device memory is host memory: numpy blocks that ``cudaMalloc`` fills with 0xFF bytes (NaN as float32), like
uninitialised GPU memory. Every copy checks that its device side lies inside one allocation. Streams are lazy:
copies, engine runs and graph launches queue on their stream and run only when something waits for them
(``cudaStreamSynchronize``, or another stream reaching a ``cudaStreamWaitEvent`` on an event recorded after them),
so code that forgets to wait reads stale or NaN memory here as it could on a GPU. A copy from host memory reads it
when queued (the driver stages pageable memory); a copy to host memory writes it when its stream runs.
"""

from __future__ import annotations

import ctypes
import enum
import itertools
import types
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest


class FakeStream:
    def __init__(self, handle: int):
        self.handle, self.queued, self.done = handle, [], 0

    def __int__(self):
        return self.handle


class FakeEvent:
    def __init__(self, flags: int):
        self.flags, self.stream, self.count = flags, None, 0


class FakeCuda:
    """cuda-python's runtime module (``cuda.bindings.runtime``), as far as the backend uses it."""

    class cudaError_t(enum.IntEnum):  # noqa: N801 (cuda-python's names)
        cudaSuccess = 0
        cudaErrorInvalidValue = 1
        cudaErrorInvalidPitchValue = 12
        cudaErrorNoDevice = 100

    cudaMemcpyKind = enum.IntEnum("cudaMemcpyKind", "cudaMemcpyHostToDevice cudaMemcpyDeviceToHost "
                                                    "cudaMemcpyDeviceToDevice")
    cudaStreamCaptureMode = enum.IntEnum("cudaStreamCaptureMode", "cudaStreamCaptureModeGlobal")
    cudaEventDisableTiming = 2

    def __init__(self, device_count=1, gpu_name=b"NVIDIA H100 80GB HBM3\0\0", capability=(9, 0)):
        self.device_count, self.gpu_name, self.capability = device_count, gpu_name, capability
        self.memory: dict[int, np.ndarray] = {}
        self.streams: dict[int, FakeStream] = {}
        self.events: list[FakeEvent] = []
        self.capturing: list | None = None
        self.graph_launches = 0
        self.copies: list[dict] = []  # one entry per copy call: kind, width, height, dpitch, spitch
        self._handles = itertools.count(7)

    @property
    def streams_alive(self) -> int:
        return len(self.streams)

    def ok(self, *values):
        return (self.cudaError_t.cudaSuccess, *values)

    # ---------------------------------------------------------------- device
    def cudaGetDeviceCount(self):  # noqa: N802
        if self.device_count == 0:
            return self.cudaError_t.cudaErrorNoDevice, 0
        return self.ok(self.device_count)

    def cudaGetDeviceProperties(self, device):  # noqa: N802
        return self.ok(types.SimpleNamespace(name=self.gpu_name, major=self.capability[0],
                                             minor=self.capability[1]))

    def cudaSetDevice(self, device):  # noqa: N802
        return self.ok()

    # ---------------------------------------------------------------- memory
    def cudaMalloc(self, nbytes):  # noqa: N802
        block = np.full(nbytes, 0xFF, np.uint8)
        self.memory[block.ctypes.data] = block
        return self.ok(block.ctypes.data)

    def cudaFree(self, pointer):  # noqa: N802
        del self.memory[pointer]
        return self.ok()

    def is_device(self, pointer: int, nbytes: int = 1) -> bool:
        return any(base <= pointer and pointer + nbytes <= base + len(block) for base, block in self.memory.items())

    def view(self, pointer, shape, dtype):
        """Device memory at ``pointer`` as an array, read or written at once (not on a stream)."""
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        assert self.is_device(pointer, nbytes), "view outside device memory"
        base = max(b for b in self.memory if b <= pointer)
        offset = pointer - base
        return self.memory[base][offset:offset + nbytes].view(dtype).reshape(shape)

    # ---------------------------------------------------------------- streams and events
    def cudaStreamCreate(self):  # noqa: N802
        stream = FakeStream(next(self._handles))
        self.streams[stream.handle] = stream
        return self.ok(stream)

    def cudaStreamDestroy(self, stream):  # noqa: N802
        self.run_until(stream, stream.done + len(stream.queued))  # CUDA finishes queued work first
        del self.streams[int(stream)]
        return self.ok()

    def cudaStreamSynchronize(self, stream):  # noqa: N802
        self.run_until(stream, stream.done + len(stream.queued))
        return self.ok()

    def enqueue(self, stream, operation: Callable[[], None]) -> None:
        assert int(stream) in self.streams, "work queued on a stream that does not exist"
        if self.capturing is not None:
            self.capturing.append(operation)
        else:
            stream.queued.append(operation)

    def run_until(self, stream, count: int) -> None:
        while stream.done < count:
            operation = stream.queued.pop(0)
            stream.done += 1
            operation()

    def cudaEventCreateWithFlags(self, flags):  # noqa: N802
        event = FakeEvent(flags)
        self.events.append(event)
        return self.ok(event)

    def cudaEventDestroy(self, event):  # noqa: N802
        self.events.remove(event)
        return self.ok()

    def cudaEventRecord(self, event, stream):  # noqa: N802
        assert event in self.events, "recording a destroyed event"
        event.stream, event.count = stream, stream.done + len(stream.queued)
        return self.ok()

    def cudaStreamWaitEvent(self, stream, event, flags):  # noqa: N802
        assert event in self.events and flags == 0
        if event.stream is not None:  # an event never recorded is complete
            target, count = event.stream, event.count
            self.enqueue(stream, lambda: self.run_until(target, count))
        return self.ok()

    # ---------------------------------------------------------------- copies
    def cudaMemcpyAsync(self, destination, source, nbytes, kind, stream):  # noqa: N802
        return self.cudaMemcpy2DAsync(destination, nbytes, source, nbytes, nbytes, 1, kind, stream)

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):  # noqa: N802
        assert self.capturing is None, "copies must stay outside a captured graph"
        if width > dpitch or width > spitch:
            return (self.cudaError_t.cudaErrorInvalidPitchValue,)
        kinds = self.cudaMemcpyKind
        device_src = kind in (kinds.cudaMemcpyDeviceToHost, kinds.cudaMemcpyDeviceToDevice)
        device_dst = kind in (kinds.cudaMemcpyHostToDevice, kinds.cudaMemcpyDeviceToDevice)
        for pointer, pitch, on_device in ((src, spitch, device_src), (dst, dpitch, device_dst)):
            span = (height - 1) * pitch + width if height else 0
            if on_device:
                assert self.is_device(pointer, span), f"{kind.name} reaches outside device memory"
            else:
                assert not self.is_device(pointer), f"{kind.name} got a device pointer for its host side"
        self.copies.append({"kind": kind.name, "width": width, "height": height, "dpitch": dpitch, "spitch": spitch})
        rows = [ctypes.string_at(src + r * spitch, width) if not device_src else src + r * spitch
                for r in range(height)]  # host memory is read now, device memory when the stream runs

        def copy():
            for r, row in enumerate(rows):
                ctypes.memmove(dst + r * dpitch, row, width)

        self.enqueue(stream, copy)
        return self.ok()

    # ---------------------------------------------------------------- graphs
    def cudaStreamBeginCapture(self, stream, mode):  # noqa: N802
        self.capturing = []
        return self.ok()

    def cudaStreamEndCapture(self, stream):  # noqa: N802
        graph, self.capturing = self.capturing, None
        return self.ok(graph)

    def cudaGraphInstantiate(self, graph, flags):  # noqa: N802
        return self.ok(list(graph))

    def cudaGraphDestroy(self, graph):  # noqa: N802
        return self.ok()

    def cudaGraphExecDestroy(self, executable):  # noqa: N802
        return self.ok()

    def cudaGraphLaunch(self, executable, stream):  # noqa: N802
        self.graph_launches += 1
        for operation in executable:
            self.enqueue(stream, operation)
        return self.ok()


WEIGHTS = np.array([[1.0, -2.0], [0.5, 0.0], [3.0, 1.0]], np.float32)


@dataclass
class FakePlan:
    """What a fake plan computes: per-sample input and output shapes, its profile's (min, opt, max) batch, and a
    NumPy function taking the inputs as keyword arguments and returning the outputs. ``batches_run`` records the
    batch of every run that reached the (fake) GPU."""

    inputs: dict[str, tuple[int, ...]]
    outputs: dict[str, tuple[int, ...]]
    compute: Callable[..., dict[str, np.ndarray]]
    batches: tuple[int, int, int] = (1, 4, 8)
    batches_run: list[int] = field(default_factory=list)


def linear_plan() -> FakePlan:
    """The plan the backend tests use: ``y = x @ WEIGHTS`` for ``x [batch, 3]``."""
    return FakePlan({"x": (3,)}, {"y": (2,)}, lambda x: {"y": x @ WEIGHTS})


class FakeTensorRT:
    """tensorrt's builder and runtime, as far as the backend uses them. ``plans`` maps a plan file's bytes to what
    it computes; ``b"serialized plan"`` (what the fake builder writes) is ``linear_plan()``."""

    __version__ = "10.16.1.11"
    NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 1})
    MemoryPoolType = enum.Enum("MemoryPoolType", "WORKSPACE")
    BuilderFlag = enum.Enum("BuilderFlag", "FP16 INT8 GPU_FALLBACK VERSION_COMPATIBLE")
    DeviceType = enum.Enum("DeviceType", "GPU DLA")
    HardwareCompatibilityLevel = enum.Enum("HardwareCompatibilityLevel", "NONE AMPERE_PLUS")
    TensorIOMode = enum.Enum("TensorIOMode", "INPUT OUTPUT")

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            self.severity = severity

    def __init__(self, cuda: FakeCuda, parse_errors=(), plans: dict[bytes, FakePlan] | None = None):
        self.cuda, self.parse_errors = cuda, list(parse_errors)
        self.plans = {b"serialized plan": linear_plan(), **(plans or {})}
        self.built: dict = {}

    @staticmethod
    def nptype(dtype):
        return np.float32

    def Builder(self, logger):  # noqa: N802 (tensorrt's names)
        fake = self

        class Builder:
            def create_network(self, flags):
                fake.built["network_flag_bits"] = flags
                return "network"

            def create_builder_config(self):
                fake.built["config"] = FakeBuilderConfig()
                return fake.built["config"]

            def create_optimization_profile(self):
                return types.SimpleNamespace(set_shape=lambda name, *shapes: fake.built.update(profile=(name, shapes)))

            def build_serialized_network(self, network, config):
                return b"serialized plan"

        return Builder()

    def OnnxParser(self, network, logger):  # noqa: N802
        errors = self.parse_errors
        return types.SimpleNamespace(parse_from_file=lambda path: not errors, num_errors=len(errors),
                                     get_error=lambda i: errors[i])

    def Runtime(self, logger):  # noqa: N802
        fake = self

        def deserialize_cuda_engine(data):
            plan = fake.plans.get(bytes(data))
            return None if plan is None else FakeEngine(fake, plan)

        return types.SimpleNamespace(deserialize_cuda_engine=deserialize_cuda_engine)


class FakeBuilderConfig:
    def __init__(self):
        self.flags, self.pools, self.profiles, self.timing_cache = [], {}, [], None

    def set_memory_pool_limit(self, pool, limit):
        self.pools[pool.name] = limit

    def set_flag(self, flag):
        self.flags.append(flag.name)

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)

    def create_timing_cache(self, data):
        return types.SimpleNamespace(loaded=data, serialize=lambda: b"timings")

    def set_timing_cache(self, cache, ignore_mismatch):
        self.timing_cache = cache
        return True

    def get_timing_cache(self):
        return self.timing_cache


class FakeEngine:
    def __init__(self, trt: FakeTensorRT, plan: FakePlan):
        self.trt, self.plan = trt, plan
        self.names = [*plan.inputs, *plan.outputs]
        self.num_io_tensors = len(self.names)

    def get_tensor_name(self, index):
        return self.names[index]

    def get_tensor_mode(self, name):
        return self.trt.TensorIOMode.INPUT if name in self.plan.inputs else self.trt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return "FLOAT"

    def get_tensor_profile_shape(self, name, profile):
        return [(batch, *self.plan.inputs[name]) for batch in self.plan.batches]

    def create_execution_context(self):
        return FakeContext(self.trt.cuda, self.plan)


class FakeContext:
    def __init__(self, cuda: FakeCuda, plan: FakePlan):
        self.cuda, self.plan, self.shapes, self.addresses, self.plain_runs = cuda, plan, {}, {}, 0

    def set_input_shape(self, name, shape):
        low, high = self.plan.batches[0], self.plan.batches[2]
        if tuple(shape[1:]) != self.plan.inputs[name] or not low <= shape[0] <= high:
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        if name in self.plan.inputs:
            return self.shapes[name]
        return (self.shapes[next(iter(self.plan.inputs))][0], *self.plan.outputs[name])

    def set_tensor_address(self, name, pointer):
        self.addresses[name] = pointer

    def execute_async_v3(self, stream_handle):
        stream = self.cuda.streams[stream_handle]
        shapes = {n: self.get_tensor_shape(n) for n in [*self.plan.inputs, *self.plan.outputs]}
        addresses = dict(self.addresses)  # TensorRT reads shapes and addresses when the run is queued

        def run():
            inputs = {n: self.cuda.view(addresses[n], shapes[n], np.float32).copy() for n in self.plan.inputs}
            self.plan.batches_run.append(shapes[next(iter(self.plan.inputs))][0])
            for name, value in self.plan.compute(**inputs).items():
                self.cuda.view(addresses[name], shapes[name], np.float32)[:] = value

        if self.cuda.capturing is None:
            self.plain_runs += 1
        self.cuda.enqueue(stream, run)
        return True


def install(monkeypatch, module, plans: dict[bytes, FakePlan] | None = None) -> tuple[FakeTensorRT, FakeCuda]:
    """Make ``module`` (ume_edge.backends.tensorrt) use a fresh FakeCuda and a FakeTensorRT holding ``plans``."""
    cuda = FakeCuda()
    trt = FakeTensorRT(cuda, plans=plans)
    monkeypatch.setattr(module, "_cudart", lambda: cuda)
    monkeypatch.setattr(module, "_tensorrt", lambda: trt)
    return trt, cuda


def needs_tensorrt_and_gpu(test):
    """Mark a test that needs real TensorRT and a CUDA GPU; it skips, saying so, where they are missing."""
    from ume_edge.backends import tensorrt as tensorrt_backend

    for mark in (pytest.mark.tensorrt, pytest.mark.gpu,
                 pytest.mark.skipif(not tensorrt_backend.is_available(),
                                    reason="TensorRT and a CUDA GPU are required; none on this machine")):
        test = mark(test)
    return test
