"""One TensorRT plan in one execution context on its own CUDA stream, with device buffers and optional CUDA graphs."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ume_edge.backends.tensorrt import api
from ume_edge.backends.tensorrt.compat import REBUILD_HINT
from ume_edge.errors import EngineMismatch, InputError, UmeEdgeError

LOGGER = logging.getLogger(__name__)


class DeviceTensor(NamedTuple):
    """A tensor in GPU memory: where it is, its shape and dtype."""

    pointer: int
    shape: tuple[int, ...]
    dtype: np.dtype


class TensorRTEngine:
    """One plan, with device buffers sized for the profile's largest batch.

    * ``version_compatible``: the plan embeds TensorRT's lean runtime, which the runtime may load only when allowed
      (``engine_host_code_allowed``; host code from the plan: trusted plans only).
    * ``dla_core``: the DLA core the plan's DLA layers run on (``Runtime.DLA_core``, set before deserializing).
    * A plan with a fixed batch (DLA has no dynamic shapes) takes any batch up to it: host inputs are padded with
      zeros to the fixed batch and only the real rows come back.
    * Each batch size in ``cuda_graph_batch_sizes`` is captured once as a CUDA graph and replayed; a capture that
      fails is ended and that batch size runs with plain launches (as trtexec does).
    """

    def __init__(self, path, device_id: int = 0, cuda_graph_batch_sizes=(), version_compatible: bool = False,
                 dla_core: int | None = None):
        self.path = Path(path)
        self._cudart = api.cudart()
        self._stream: Any = None  # a cuda-python cudaStream_t
        self._buffers: dict[str, int] = {}
        self._graphs: dict[int, Any] = {}  # batch size -> cuda-python cudaGraphExec_t
        api.call(self._cudart.cudaSetDevice(device_id))
        self._load(api.tensorrt(), version_compatible, dla_core)
        try:
            self._stream = api.call(self._cudart.cudaStreamCreate())
            for name in self.input_names + self.output_names:
                self._buffers[name] = self._allocate(name)
            for batch in cuda_graph_batch_sizes:
                self._capture_graph(batch)
        except BaseException:
            self.close()
            raise

    def _load(self, trt, version_compatible: bool, dla_core: int | None) -> None:
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._runtime.engine_host_code_allowed = version_compatible
        if dla_core is not None:
            self._runtime.DLA_core = dla_core
        self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self._engine is None:
            raise EngineMismatch(f"TensorRT {trt.__version__} could not load {self.path} (its log above says why); "
                                 f"{REBUILD_HINT}")
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self.input_names = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        self.dtypes = {n: np.dtype(trt.nptype(self._engine.get_tensor_dtype(n))) for n in names}
        self.profiles = {n: tuple(tuple(s) for s in self._engine.get_tensor_profile_shape(n, 0))
                         for n in self.input_names}
        self._set_input_shapes({n: self.profiles[n][2] for n in self.input_names})
        self.max_shapes = {n: self.profiles[n][2] for n in self.input_names}
        self.max_shapes.update({n: tuple(self._context.get_tensor_shape(n)) for n in self.output_names})
        low, _, high = self.profiles[self.input_names[0]]
        self.fixed_batch = high[0] if low[0] == high[0] else None

    def _allocate(self, name: str) -> int:
        nbytes = int(np.prod(self.max_shapes[name])) * self.dtypes[name].itemsize
        pointer = int(api.call(self._cudart.cudaMalloc(nbytes)))
        self._context.set_tensor_address(name, pointer)
        return pointer

    @property
    def stream(self):
        """The CUDA stream every copy and run of this engine is queued on."""
        return self._stream

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Host arrays in, host arrays out: copy in, run (graph replay where captured), copy out, wait."""
        arrays = {n: np.ascontiguousarray(self._feed(feeds, n), dtype=self.dtypes[n]) for n in self.input_names}
        rows = len(next(iter(arrays.values())))
        outputs = self.download(self.enqueue(arrays))  # ``arrays`` stays referenced until the wait
        return {name: value[:rows] for name, value in outputs.items()}

    def infer_device(self, feeds: dict[str, int], batch_size: int) -> dict[str, DeviceTensor]:
        """Device pointers in (each a ``[batch_size, *shape]`` tensor), device tensors out, with no host copy.
        The outputs live in this engine's buffers and stay valid until its next call."""
        tensors = {n: DeviceTensor(int(self._feed(feeds, n)), (batch_size, *self.max_shapes[n][1:]), self.dtypes[n])
                   for n in self.input_names}
        outputs = self.enqueue(tensors)
        self.synchronize()
        return outputs

    def input_tensor(self, name: str, batch_size: int) -> DeviceTensor:
        """This engine's own buffer for input ``name`` at ``batch_size``. Write it on the device (ordered before the
        run on ``stream``), then feed it to ``enqueue``, which copies nothing for it."""
        if name not in self.input_names:
            raise InputError(f"{self.path.name} has no input {name!r}; it takes {self.input_names}")
        return DeviceTensor(self._buffers[name], (batch_size, *self.max_shapes[name][1:]), self.dtypes[name])

    def enqueue(self, feeds: Mapping[str, np.ndarray | DeviceTensor]) -> dict[str, DeviceTensor]:
        """Queue the copies in and one run on ``stream`` and return at once, waiting for nothing. A feed is a host
        array (contiguous, this engine's dtype; copied in), a ``DeviceTensor`` elsewhere on the GPU (copied device to
        device) or ``input_tensor``'s own buffer (already in place). Keep host arrays alive until the stream is
        synchronised. The outputs are this engine's buffers: complete once the stream has run, valid until its
        next call. A plan with a fixed batch runs at that batch: its first rows are the inputs' rows."""
        tensors = {n: self._padded(self._feed(feeds, n)) for n in self.input_names}
        batch = self._prepare({n: tuple(t.shape) for n, t in tensors.items()})
        for name, tensor in tensors.items():
            self._copy_in(name, tensor)
        self._run(batch)
        return {n: DeviceTensor(self._buffers[n], tuple(self._context.get_tensor_shape(n)), self.dtypes[n])
                for n in self.output_names}

    def _padded(self, tensor):
        if self.fixed_batch is None or tensor.shape[0] == self.fixed_batch:
            return tensor
        if isinstance(tensor, DeviceTensor) or not 0 < tensor.shape[0] < self.fixed_batch:
            raise InputError(f"{self.path.name} runs batch {self.fixed_batch} only (a DLA plan); give a host array "
                             f"of at most {self.fixed_batch} rows, got shape {list(tensor.shape)}")
        padded = np.zeros((self.fixed_batch, *tensor.shape[1:]), tensor.dtype)
        padded[:len(tensor)] = tensor
        return padded

    def download(self, tensors: dict[str, DeviceTensor]) -> dict[str, np.ndarray]:
        """Copy device tensors into new host arrays on ``stream`` (after all that is queued there) and wait."""
        arrays = {n: np.empty(t.shape, t.dtype) for n, t in tensors.items()}
        for name, array in arrays.items():
            self._copy(array.ctypes.data, tensors[name].pointer, array.nbytes,
                       self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost)
        self.synchronize()
        return arrays

    def _copy_in(self, name: str, tensor) -> None:
        if np.dtype(tensor.dtype) != self.dtypes[name]:
            raise InputError(f"input {name!r} is {np.dtype(tensor.dtype)}; {self.path.name} takes {self.dtypes[name]}")
        kind = self._cudart.cudaMemcpyKind
        nbytes = int(np.prod(tensor.shape)) * self.dtypes[name].itemsize
        if isinstance(tensor, DeviceTensor):
            if int(tensor.pointer) != self._buffers[name]:
                self._copy(self._buffers[name], int(tensor.pointer), nbytes, kind.cudaMemcpyDeviceToDevice)
        elif not tensor.flags.c_contiguous:
            raise InputError(f"input {name!r} must be a C-contiguous array")
        else:
            self._copy(self._buffers[name], tensor.ctypes.data, nbytes, kind.cudaMemcpyHostToDevice)

    def _feed(self, feeds: Mapping, name: str):
        if name not in feeds:
            raise InputError(f"input {name!r} is missing; {self.path.name} takes {self.input_names}")
        return feeds[name]

    def _prepare(self, shapes: dict[str, tuple[int, ...]]) -> int:
        """Check input shapes against the profile, set them, and return the batch size."""
        for name, shape in shapes.items():
            low, _, high = self.profiles[name]
            if len(shape) != len(high) or tuple(shape[1:]) != high[1:] or not low[0] <= shape[0] <= high[0]:
                raise InputError(f"input {name!r} has shape {list(shape)}; {self.path.name} takes "
                                 f"[batch, {', '.join(map(str, high[1:]))}] with batch {low[0]}..{high[0]}")
        self._set_input_shapes(shapes)
        return next(iter(shapes.values()))[0]

    def _set_input_shapes(self, shapes: dict[str, tuple[int, ...]]) -> None:
        for name, shape in shapes.items():
            if not self._context.set_input_shape(name, tuple(shape)):
                raise InputError(f"TensorRT refused shape {list(shape)} for input {name!r} of {self.path.name}")

    def _copy(self, destination: int, source: int, nbytes: int, kind) -> None:
        api.call(self._cudart.cudaMemcpyAsync(destination, source, nbytes, kind, self._stream))

    def _run(self, batch: int) -> None:
        graph = self._graphs.get(batch)
        if graph is not None:
            api.call(self._cudart.cudaGraphLaunch(graph, self._stream))
        elif not self._context.execute_async_v3(int(self._stream)):
            raise UmeEdgeError(f"TensorRT could not enqueue {self.path.name}; its log above says why")

    def _capture_graph(self, batch: int) -> None:
        """Record one run at ``batch`` as a CUDA graph. The buffers never move, so the graph stays valid."""
        self._prepare({n: (batch, *self.max_shapes[n][1:]) for n in self.input_names})
        self._run(batch)  # TensorRT updates its state on the first run after a shape change; capture after it
        self.synchronize()
        cudart = self._cudart
        api.call(cudart.cudaStreamBeginCapture(self._stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal))
        enqueued = False
        try:
            enqueued = self._context.execute_async_v3(int(self._stream))
        finally:  # always end the capture, or the stream stays capturing; the graph of a failed one is discarded
            error, graph = cudart.cudaStreamEndCapture(self._stream)
            failed = not enqueued or error != cudart.cudaError_t.cudaSuccess
            if failed and graph:
                api.call(cudart.cudaGraphDestroy(graph))
        if failed:
            LOGGER.warning("%s: CUDA-graph capture at batch %d failed (%s); that batch runs without a graph",
                           self.path.name, batch, getattr(error, "name", error) if enqueued else "enqueue failed")
            return
        try:
            self._graphs[batch] = api.call(cudart.cudaGraphInstantiate(graph, 0))
        finally:
            api.call(cudart.cudaGraphDestroy(graph))

    def synchronize(self) -> None:
        api.call(self._cudart.cudaStreamSynchronize(self._stream))

    def close(self) -> None:
        """Free the graphs, buffers and stream; safe to call twice, and on a half-built engine."""
        if self._stream is not None:
            self.synchronize()
        for executable in self._graphs.values():
            api.call(self._cudart.cudaGraphExecDestroy(executable))
        for pointer in self._buffers.values():
            api.call(self._cudart.cudaFree(pointer))
        if self._stream is not None:
            api.call(self._cudart.cudaStreamDestroy(self._stream))
        self._graphs, self._buffers, self._stream = {}, {}, None
        self._context = self._engine = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
