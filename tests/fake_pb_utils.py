"""A fake ``triton_python_backend_utils`` for running the Python-backend templates without tritonserver.

The module a model imports inside Triton's Python stub is the wheel's pure-Python ``triton_python_backend_utils.py``
(``get_input_tensor_by_name``, ``get_input_config_by_name``, ``triton_string_to_numpy``, ...) plus what the stub
copies in from its pybind11 module (``Tensor``, ``InferenceRequest``, ``InferenceResponse``, ``TritonError``,
``MetricFamily``, ``PreferredMemory``, ...). ``make_pb_utils`` does the same: it loads the REAL Python half from the
installed nvidia-pytriton wheel as a fresh module and sets fakes of the C++ classes on it. Their surface is held to
tests/api_tables/python-backend-*.json (tools/python_backend_table.py reads it from python_backend's source)::

    pb_utils = make_pb_utils({"fusion": lambda inputs: {"logits": ..., "probs": ...}})
    request = pb_utils.InferenceRequest(model_name="fusion", inputs=[pb_utils.Tensor("present", mask)],
                                        requested_output_names=["logits"])
    request.exec().output_tensors()           # what the "fusion" callable returned, as Tensors
    pb_utils.bls_calls                        # [BlsCall("fusion", {"present": mask}, ["logits"], None)]
    pb_utils.metric_values                    # {(family name, (("label", "value"), ...)): value}

BLS ``exec``/``async_exec`` route to ``models[model_name]`` (inputs by name -> outputs by name); an exception it
raises, or an unknown model, becomes an error response, as Triton answers a failed BLS call. ``async_exec`` runs the
call on the running loop's default executor, as the stub does. What the fakes refuse, the real classes refuse too:
``None`` where the binding says ``.none(false)``, an empty tensor name, a dtype Triton has no type for, a negative
counter increment (Triton core refuses it). Parameters without a name in the binding are positional-only here, as
pybind11 makes them (``Tensor(name, array)``, ``Metric.increment(value)``).
"""

from __future__ import annotations

import asyncio
import enum
import functools
import importlib.util
import sysconfig
import threading
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PYTHON_HALF = Path(sysconfig.get_paths()["purelib"]) / "pytriton" / "tritonserver" / "backends" / "python" / \
    "triton_python_backend_utils.py"
TEST_ONLY = ("bls_calls", "metric_values", "models")  # what tests read from the module

Model = Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]]


class _ErrorCode(enum.IntEnum):  # TRITONSERVER_Error_Code (tritonserver.h); the binding's TritonError.__ErrorCode
    UNKNOWN = 0
    INTERNAL = 1
    NOT_FOUND = 2
    INVALID_ARG = 3
    UNAVAILABLE = 4
    UNSUPPORTED = 5
    ALREADY_EXISTS = 6
    CANCELLED = 7


class _MemoryType(enum.IntEnum):
    TRITONSERVER_MEMORY_GPU = 0
    TRITONSERVER_MEMORY_CPU = 1


class _MetricKind(enum.IntEnum):
    COUNTER = 0
    GAUGE = 1
    HISTOGRAM = 2


def _refuse_none(**arguments) -> None:
    for name, value in arguments.items():
        if value is None:
            raise TypeError(f"incompatible function arguments: {name} may not be None")


class TritonError:
    UNKNOWN = _ErrorCode.UNKNOWN
    INTERNAL = _ErrorCode.INTERNAL
    NOT_FOUND = _ErrorCode.NOT_FOUND
    INVALID_ARG = _ErrorCode.INVALID_ARG
    UNAVAILABLE = _ErrorCode.UNAVAILABLE
    UNSUPPORTED = _ErrorCode.UNSUPPORTED
    ALREADY_EXISTS = _ErrorCode.ALREADY_EXISTS
    CANCELLED = _ErrorCode.CANCELLED

    def __init__(self, message, code=_ErrorCode.INTERNAL):
        _refuse_none(message=message, code=code)
        self._message, self._code = str(message), _ErrorCode(code)

    def message(self):
        return self._message

    def code(self):
        return self._code

    def __repr__(self):
        return f"TritonError({self._message!r}, {self._code.name})"


class PreferredMemory:
    def __init__(self, preferred_memory_type, preferred_device_id=0):
        _refuse_none(preferred_memory_type=preferred_memory_type, preferred_device_id=preferred_device_id)
        self._type, self._device_id = _MemoryType(preferred_memory_type), int(preferred_device_id)


class Tensor:
    """A named array; as in Triton, it holds its own contiguous copy (the stub copies it into shared memory)."""

    def __init__(self, arg0, arg1, /):
        if not isinstance(arg0, str) or not isinstance(arg1, np.ndarray):
            raise TypeError(f"Tensor(name: str, array: numpy.ndarray), got ({type(arg0).__name__}, "
                            f"{type(arg1).__name__})")
        if not arg0:
            raise ValueError("Tensor name cannot be an empty string.")
        if _python_half().numpy_to_triton_type(arg1.dtype) is None:
            raise TypeError(f"tensor {arg0!r}: Triton has no type for numpy dtype {arg1.dtype}")
        self._name, self._array = arg0, np.array(arg1, order="C", copy=True)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array

    def shape(self):
        return list(self._array.shape)

    def is_cpu(self):
        return True


class InferenceResponse:
    def __init__(self, output_tensors=(), error=None):
        if error is not None and not isinstance(error, TritonError):
            raise TypeError(f"error must be a TritonError, got {type(error).__name__}")
        self._tensors, self._error = list(output_tensors), error
        if not all(isinstance(tensor, Tensor) for tensor in self._tensors):
            raise TypeError("output_tensors must be Tensors")

    def output_tensors(self):
        return self._tensors

    def has_error(self):
        return self._error is not None

    def error(self):
        return self._error


@dataclass(frozen=True)
class BlsCall:
    model_name: str
    inputs: dict[str, np.ndarray]
    requested_output_names: list[str]
    preferred_memory: PreferredMemory | None


class InferenceRequest:
    """A request Triton hands to ``execute`` (built by tests) or one a model sends over BLS (``exec``)."""

    _triton: _Triton  # set on the subclass make_pb_utils creates

    def __init__(self, request_id="", correlation_id=0, inputs=None, requested_output_names=None, model_name=None,
                 model_version=-1, flags=0, timeout=0, preferred_memory=None, trace=None, parameters=None):
        _refuse_none(inputs=inputs, requested_output_names=requested_output_names, model_name=model_name)
        if not all(isinstance(tensor, Tensor) for tensor in inputs):
            raise TypeError("inputs must be a list of Tensors")
        if preferred_memory is not None and not isinstance(preferred_memory, PreferredMemory):
            raise TypeError("preferred_memory must be a PreferredMemory")
        self._request_id, self._inputs, self._model_name = request_id, list(inputs), model_name
        self._requested = list(requested_output_names)
        self._preferred_memory = preferred_memory

    def inputs(self):
        return self._inputs

    def request_id(self):
        return self._request_id

    def requested_output_names(self):
        return set(self._requested)

    def is_cancelled(self):
        return False

    def exec(self, decoupled=False):
        if decoupled:
            raise NotImplementedError("the fake has no decoupled BLS")
        return self._triton.call(self)

    def async_exec(self, decoupled=False):
        if decoupled:
            raise NotImplementedError("the fake has no decoupled BLS")
        return asyncio.get_running_loop().run_in_executor(None, self._triton.call, self)


class Metric:
    def __init__(self, family: MetricFamily, labels: tuple[tuple[str, str], ...]):
        self._family, self._key = family, (family._name, labels)
        family._triton.metric_values.setdefault(self._key, 0.0)

    def increment(self, arg0, /):
        if self._family._kind == _MetricKind.COUNTER and arg0 < 0:
            raise ValueError(f"metric {self._family._name}: a counter cannot be incremented by a negative value")
        with self._family._triton.lock:
            self._family._triton.metric_values[self._key] += float(arg0)

    def set(self, arg0, /):
        if self._family._kind != _MetricKind.GAUGE:
            raise ValueError(f"metric {self._family._name}: only a gauge can be set")
        self._family._triton.metric_values[self._key] = float(arg0)

    def value(self):
        return self._family._triton.metric_values[self._key]


class MetricFamily:
    COUNTER = _MetricKind.COUNTER
    GAUGE = _MetricKind.GAUGE
    HISTOGRAM = _MetricKind.HISTOGRAM

    _triton: _Triton  # set on the subclass make_pb_utils creates

    def __init__(self, name, description, kind):
        _refuse_none(name=name, description=description, kind=kind)
        self._name, self._description, self._kind = name, description, _MetricKind(kind)
        if self._kind == _MetricKind.HISTOGRAM:
            raise NotImplementedError("the fake has no histograms")

    def Metric(self, labels=None, buckets=None):  # noqa: N802  (the real name)
        labels = labels or {}
        if not all(isinstance(key, str) and isinstance(value, str) for key, value in labels.items()):
            raise TypeError(f"metric {self._name}: labels must map str to str, got {labels!r}")
        return Metric(self, tuple(sorted(labels.items())))


class _Triton:
    """The server side of one fake module: the models BLS reaches, and what tests read."""

    def __init__(self, models: Mapping[str, Model]):
        self.models = dict(models)
        self.bls_calls: list[BlsCall] = []
        self.metric_values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self.lock = threading.Lock()

    def call(self, request: InferenceRequest) -> InferenceResponse:
        inputs = {tensor.name(): tensor.as_numpy() for tensor in request.inputs()}
        with self.lock:
            self.bls_calls.append(BlsCall(request._model_name, inputs, request._requested, request._preferred_memory))
        model = self.models.get(request._model_name)
        if model is None:
            return InferenceResponse(error=TritonError(f"Request for unknown model: '{request._model_name}' is not "
                                                       "found", TritonError.NOT_FOUND))
        try:
            outputs = model(inputs)
            return InferenceResponse([Tensor(name, np.asarray(outputs[name])) for name in request._requested])
        except Exception as error:  # Triton answers a failed model with an error response
            return InferenceResponse(error=TritonError(f"{type(error).__name__}: {error}"))


def load_python_half() -> types.ModuleType:
    """A fresh module of the wheel's real ``triton_python_backend_utils.py``."""
    spec = importlib.util.spec_from_file_location("triton_python_backend_utils", PYTHON_HALF)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def _python_half() -> types.ModuleType:
    return load_python_half()


def make_pb_utils(models: Mapping[str, Model] = (), model_dir: str | Path = "") -> types.ModuleType:
    """``triton_python_backend_utils`` as a model sees it inside the stub, with BLS calls going to ``models``."""
    module = load_python_half()
    triton = _Triton(dict(models))
    namespace = {"_triton": triton, "__module__": __name__}
    # what Stub::StubSetup and Stub::Initialize copy in from c_python_backend_utils
    module.TritonError = TritonError
    module.TritonModelException = type("TritonModelException", (Exception,), {"__module__": __name__})
    module.Tensor = Tensor
    module.InferenceRequest = type("InferenceRequest", (InferenceRequest,), namespace)
    module.InferenceResponse = InferenceResponse
    module.PreferredMemory = PreferredMemory
    module.TRITONSERVER_MEMORY_GPU = _MemoryType.TRITONSERVER_MEMORY_GPU
    module.TRITONSERVER_MEMORY_CPU = _MemoryType.TRITONSERVER_MEMORY_CPU
    module.MetricFamily = type("MetricFamily", (MetricFamily,), namespace)
    module.get_model_dir = lambda: str(model_dir)
    # what tests read
    module.models = triton.models
    module.bls_calls = triton.bls_calls
    module.metric_values = triton.metric_values
    return module
