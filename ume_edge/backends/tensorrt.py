"""TensorRT on an NVIDIA GPU or Jetson: build a plan from TensorRT-ready ONNX, check that a plan fits this machine,
and run it with device buffers and an optional CUDA graph.

``tensorrt`` and ``cuda-python`` are imported inside functions only, so this module imports on any machine.
Written to the documented TensorRT 10.x / 11.x Python API and cuda-python's runtime bindings.
"""

from __future__ import annotations

import os
import re
import shlex
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ume_edge.errors import BackendUnavailable, BuildError, EngineMismatch, InputError, UmeEdgeError

PRECISIONS = ("fp32", "fp16", "int8")
DLA_PRECISIONS = ("fp16", "int8")
DLA_MAX_BATCH = 4096  # TensorRT docs, "DLA Supported Layers and Restrictions"
AMPERE = (8, 0)  # the oldest compute capability a hardware-compatible (AMPERE_PLUS) plan runs on
MIB = 1 << 20
WEAK_TYPING_FLAGS = {"fp32": [], "fp16": ["FP16"], "int8": ["INT8"]}
TRTEXEC_FLAGS = {"GPU_FALLBACK": "--allowGPUFallback", "VERSION_COMPATIBLE": "--versionCompatible",
                 "FP16": "--fp16", "INT8": "--int8"}
INSTALL_HINT = "pip install 'ume-edge[tensorrt]'"
EXPORT_ONLY_HINT = "or build with --export-only to write TensorRT-ready ONNX and build the plan on the target"
REBUILD_HINT = "rebuild on the target: python -m ume_edge.build --backend tensorrt ..."


def _tensorrt():
    import tensorrt

    return tensorrt


def _cudart():
    try:
        from cuda.bindings import runtime
    except ImportError:  # cuda-python before 12.8
        from cuda import cudart as runtime
    return runtime


def _cuda(result: tuple):
    """Unpack a cuda-python ``(error, *values)`` result, raising on any error."""
    error, *values = result
    if error != _cudart().cudaError_t.cudaSuccess:
        raise UmeEdgeError(f"CUDA call failed: {getattr(error, 'name', error)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def unavailable_reason() -> str | None:
    """One line saying what is missing for TensorRT here and how to get it, or None when it is usable."""
    try:
        _tensorrt()
    except (ImportError, OSError):
        return f"TensorRT is not installed: {INSTALL_HINT} on a machine with an NVIDIA GPU, {EXPORT_ONLY_HINT}"
    try:
        cudart = _cudart()
        error, count = cudart.cudaGetDeviceCount()
    except (ImportError, OSError, RuntimeError):
        return f"cuda-python or the CUDA runtime is missing: {INSTALL_HINT}, {EXPORT_ONLY_HINT}"
    if error != cudart.cudaError_t.cudaSuccess or count == 0:
        return (f"no CUDA GPU is visible ({getattr(error, 'name', error)}): run on a machine with an NVIDIA GPU "
                f"and driver, {EXPORT_ONLY_HINT}")
    return None


def is_available() -> bool:
    return unavailable_reason() is None


def require() -> None:
    reason = unavailable_reason()
    if reason is not None:
        raise BackendUnavailable(reason)


def get_version() -> str | None:
    try:
        return _tensorrt().__version__
    except (ImportError, OSError):
        return None


def device_info(device_id: int = 0, dla_core: int | None = None) -> dict:
    """The GPU a plan is built for or run on, as a manifest records it."""
    properties = _cuda(_cudart().cudaGetDeviceProperties(device_id))
    name = properties.name
    if isinstance(name, bytes):
        name = name.split(b"\0", 1)[0].decode()
    return {"kind": "gpu", "gpu_name": name, "compute_capability": f"{properties.major}.{properties.minor}",
            "tensorrt": get_version(), "dla_core": dla_core}


def default_opt_batch(max_batch: int) -> int:
    """Half the largest batch, rounded down to a power of two, at least 1."""
    half = max(1, max_batch // 2)
    return 1 << (half.bit_length() - 1)


@dataclass
class BuildConfig:
    """How to build one plan. ``strongly_typed`` means the ONNX carries the precision (fp16 tensors or Q/DQ);
    False is for TensorRT 10 only, where an fp32 ONNX is built with the FP16/INT8 builder flags."""

    precision: str = "fp32"
    max_batch: int = 64
    opt_batch: int | None = None
    workspace_mb: int = 1024
    timing_cache: str | os.PathLike | None = None
    dla_core: int | None = None
    hardware_compatible: bool = False
    version_compatible: bool = False
    strongly_typed: bool = True

    def __post_init__(self):
        if self.opt_batch is None:
            self.opt_batch = default_opt_batch(self.max_batch)

    def validate(self) -> None:
        problems = self._general_problems() + (self._dla_problems() if self.dla_core is not None else [])
        if problems:
            raise BuildError("impossible TensorRT build config: " + "; ".join(problems))

    def _general_problems(self) -> list[str]:
        problems = []
        if self.precision not in PRECISIONS:
            problems.append(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.max_batch < 1:
            problems.append(f"max_batch is {self.max_batch}; it must be at least 1")
        elif not 1 <= self.opt_batch <= self.max_batch:
            problems.append(f"opt_batch {self.opt_batch} is outside 1..max_batch ({self.max_batch})")
        if self.workspace_mb < 1:
            problems.append(f"workspace_mb is {self.workspace_mb}; it must be at least 1")
        return problems

    def _dla_problems(self) -> list[str]:
        problems = []
        if self.dla_core < 0:
            problems.append(f"dla_core is {self.dla_core}; DLA cores are numbered from 0")
        if self.precision not in DLA_PRECISIONS:
            problems.append(f"DLA runs only {' and '.join(DLA_PRECISIONS)}, not {self.precision}")
        if self.hardware_compatible:
            problems.append("hardware compatibility (Ampere+) is for discrete GPUs; JetPack and DLA do not support it")
        if self.max_batch > DLA_MAX_BATCH:
            problems.append(f"max_batch {self.max_batch} exceeds the DLA limit of {DLA_MAX_BATCH}")
        return problems


def profile_batches(config: BuildConfig) -> tuple[int, int, int]:
    """(min, opt, max) batch of the optimization profile. DLA has no dynamic shapes: all three are max_batch,
    and a caller pads smaller batches up to it."""
    if config.dla_core is not None:
        return (config.max_batch,) * 3
    return 1, config.opt_batch, config.max_batch


def profile_shapes(input_shape, config: BuildConfig) -> tuple[tuple[int, ...], ...]:
    """(min, opt, max) full input shapes for a per-sample ``input_shape``."""
    return tuple((batch, *input_shape) for batch in profile_batches(config))


def builder_settings(config: BuildConfig, trt_major: int) -> dict:
    """Every setting ``build_engine`` applies, as plain names and numbers (TensorRT enum member names)."""
    config.validate()
    _check_tensorrt_major(config, trt_major)
    # TensorRT 10 is weakly typed unless asked: with FP16/INT8 flags it may run any layer in whichever precision
    # it finds faster. Our ONNX already says the precision (fp32, fp16 tensors, or S8S8 Q/DQ; INT8 comes only from
    # Q/DQ since implicit calibration is deprecated), so strong typing builds exactly what the file says, keeps
    # results close to ONNX Runtime's, and is what TensorRT 11 always does (there the flag is accepted, ignored).
    return {
        "tensorrt_major": trt_major,
        "network_flags": ["STRONGLY_TYPED"] if config.strongly_typed else [],
        "builder_flags": _builder_flags(config),
        "memory_pool_limits": {"WORKSPACE": config.workspace_mb * MIB},
        "profile_batch": dict(zip(("min", "opt", "max"), profile_batches(config))),
        "timing_cache": os.fspath(config.timing_cache) if config.timing_cache else None,
        "default_device_type": "GPU" if config.dla_core is None else "DLA",
        "DLA_core": config.dla_core,
        "hardware_compatibility_level": "AMPERE_PLUS" if config.hardware_compatible else "NONE",
    }


def _check_tensorrt_major(config: BuildConfig, trt_major: int) -> None:
    if trt_major < 10:
        raise BuildError(f"TensorRT {trt_major}.x is too old; ume-edge builds with TensorRT 10 or newer")
    if trt_major >= 11 and not config.strongly_typed:
        raise BuildError("TensorRT 11 removed the FP16/INT8 builder flags: export the ONNX in the target precision "
                         "(fp16 tensors or Q/DQ) and build it strongly typed")


def _builder_flags(config: BuildConfig) -> list[str]:
    flags = [] if config.strongly_typed else list(WEAK_TYPING_FLAGS[config.precision])
    if config.dla_core is not None:
        flags.append("GPU_FALLBACK")
    if config.version_compatible:
        flags.append("VERSION_COMPATIBLE")
    return flags


def build_engine(onnx_path, plan_path, inputs: dict[str, tuple[int, ...]], config: BuildConfig) -> dict:
    """Build and write a plan, save the timing cache, and return the device info a manifest records.
    ``inputs`` maps each input name to its per-sample shape (no batch axis)."""
    trt = _tensorrt()
    settings = builder_settings(config, int(trt.__version__.split(".")[0]))
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_flag_bits(trt.NetworkDefinitionCreationFlag, settings["network_flags"]))
    parser = _parse_onnx(trt, network, logger, onnx_path)  # the parser owns the weights until the build ends
    builder_config = _builder_config(trt, builder, settings)
    _add_profile(builder, builder_config, settings, inputs)
    plan = builder.build_serialized_network(network, builder_config)
    del parser
    if plan is None:
        raise BuildError(f"TensorRT could not build a plan from {onnx_path}; its log above says why")
    Path(plan_path).write_bytes(plan)
    _save_timing_cache(builder_config, settings["timing_cache"])
    return {**device_info(dla_core=config.dla_core), "hardware_compatible": config.hardware_compatible,
            "version_compatible": config.version_compatible}


def _flag_bits(enum, names: list[str]) -> int:
    bits = 0
    for name in names:
        bits |= 1 << int(getattr(enum, name))
    return bits


def _parse_onnx(trt, network, logger, onnx_path):
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.fspath(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT could not parse {onnx_path}: {errors}")
    return parser


def _builder_config(trt, builder, settings: dict):
    builder_config = builder.create_builder_config()
    for pool, limit in settings["memory_pool_limits"].items():
        builder_config.set_memory_pool_limit(getattr(trt.MemoryPoolType, pool), limit)
    for flag in settings["builder_flags"]:
        builder_config.set_flag(getattr(trt.BuilderFlag, flag))
    builder_config.default_device_type = getattr(trt.DeviceType, settings["default_device_type"])
    if settings["DLA_core"] is not None:
        builder_config.DLA_core = settings["DLA_core"]
    level = settings["hardware_compatibility_level"]
    builder_config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, level)
    _load_timing_cache(builder_config, settings["timing_cache"])
    return builder_config


def _add_profile(builder, builder_config, settings: dict, inputs: dict[str, tuple[int, ...]]) -> None:
    profile = builder.create_optimization_profile()
    for name, shape in inputs.items():
        profile.set_shape(name, *((batch, *shape) for batch in settings["profile_batch"].values()))
    builder_config.add_optimization_profile(profile)


def _load_timing_cache(builder_config, path: str | None) -> None:
    if path is None:
        return
    cached = Path(path).read_bytes() if Path(path).exists() else b""
    if not builder_config.set_timing_cache(builder_config.create_timing_cache(cached), ignore_mismatch=False):
        warnings.warn(f"timing cache {path} was made on another device; starting a fresh one", stacklevel=3)
        builder_config.set_timing_cache(builder_config.create_timing_cache(b""), ignore_mismatch=False)


def _save_timing_cache(builder_config, path: str | None) -> None:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(builder_config.get_timing_cache().serialize())


def trtexec_command(onnx_path, plan_path, inputs: dict[str, tuple[int, ...]], config: BuildConfig,
                    trt_major: int = 10) -> str:
    """The trtexec command line that builds the same plan as ``build_engine`` on TensorRT ``trt_major``."""
    settings = builder_settings(config, trt_major)
    args = ["trtexec", f"--onnx={os.fspath(onnx_path)}", f"--saveEngine={os.fspath(plan_path)}"]
    for kind, batch in settings["profile_batch"].items():
        shapes = ",".join(f"{name}:{'x'.join(str(d) for d in (batch, *shape))}" for name, shape in inputs.items())
        args.append(f"--{kind}Shapes={shapes}")
    args.append(f"--memPoolSize=workspace:{config.workspace_mb}M")
    if settings["timing_cache"]:
        args.append(f"--timingCacheFile={settings['timing_cache']}")
    if settings["DLA_core"] is not None:
        args.append(f"--useDLACore={settings['DLA_core']}")
    if settings["hardware_compatibility_level"] == "AMPERE_PLUS":
        args.append("--hardwareCompatibilityLevel=ampere+")
    args += [TRTEXEC_FLAGS[flag] for flag in settings["builder_flags"]]
    if settings["network_flags"] and trt_major == 10:  # trtexec 11 is always strongly typed and lost --fp16/--int8
        args.append("--stronglyTyped")
    return " ".join(shlex.quote(a) for a in args)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


def check_plan_compatible(recorded: dict, current: dict) -> None:
    """Raise ``EngineMismatch`` unless a plan built on ``recorded`` (``build_engine``'s device info) runs on
    ``current`` (``device_info()`` here): same TensorRT and compute capability, or what compatibility allows."""
    problems = _version_problems(recorded, current) + _hardware_problems(recorded, current)
    if problems:
        raise EngineMismatch("the TensorRT plan does not fit this machine: " + "; ".join(problems)
                             + f"; {REBUILD_HINT}")


def _version_problems(recorded: dict, current: dict) -> list[str]:
    built, here = recorded.get("tensorrt"), current.get("tensorrt")
    problem = f"it was built with TensorRT {built} and this machine has TensorRT {here}"
    if built == here:
        return []
    if not recorded.get("version_compatible"):
        return [problem]
    # A version-compatible plan runs on the TensorRT that built it or any newer one, never an older one.
    if _version_tuple(here or "0") >= _version_tuple(built or "0"):
        return []
    return [f"{problem} (a version-compatible plan needs the same or a newer TensorRT)"]


def _hardware_problems(recorded: dict, current: dict) -> list[str]:
    built, here = recorded.get("compute_capability"), current.get("compute_capability")
    problem = (f"it was built for compute capability {built} ({recorded.get('gpu_name')}) and this GPU "
               f"({current.get('gpu_name')}) has compute capability {here}")
    if built == here:
        return []
    if not recorded.get("hardware_compatible"):
        return [problem]
    if _version_tuple(here or "0") >= AMPERE:
        return []
    return [f"{problem} (a hardware-compatible plan needs compute capability 8.0 or newer)"]


class DeviceTensor(NamedTuple):
    """A tensor in GPU memory: where it is, its shape and dtype."""

    pointer: int
    shape: tuple[int, ...]
    dtype: np.dtype


class TensorRTEngine:
    """One plan in one execution context on its own CUDA stream, with device buffers sized for the profile's
    largest batch. Each batch size in ``cuda_graph_batch_sizes`` is captured once as a CUDA graph and replayed.
    ``version_compatible`` lets the runtime load the lean runtime such a plan embeds (host code: trusted plans only).
    """

    def __init__(self, path, device_id: int = 0, cuda_graph_batch_sizes=(), version_compatible: bool = False):
        self.path = Path(path)
        self._cudart = _cudart()
        _cuda(self._cudart.cudaSetDevice(device_id))
        self._load(_tensorrt(), version_compatible)
        self._stream = _cuda(self._cudart.cudaStreamCreate())
        self._buffers = {name: self._allocate(name) for name in self.input_names + self.output_names}
        self._graphs = {}
        for batch in cuda_graph_batch_sizes:
            self._graphs[batch] = self._capture_graph(batch)

    def _load(self, trt, version_compatible: bool) -> None:
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._runtime.engine_host_code_allowed = version_compatible
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

    def _allocate(self, name: str) -> int:
        nbytes = int(np.prod(self.max_shapes[name])) * self.dtypes[name].itemsize
        pointer = int(_cuda(self._cudart.cudaMalloc(nbytes)))
        self._context.set_tensor_address(name, pointer)
        return pointer

    @property
    def stream(self):
        """The CUDA stream every copy and run of this engine is queued on."""
        return self._stream

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Host arrays in, host arrays out: copy in, run (graph replay where captured), copy out, wait."""
        arrays = {n: np.ascontiguousarray(self._feed(feeds, n), dtype=self.dtypes[n]) for n in self.input_names}
        return self.download(self.enqueue(arrays))  # ``arrays`` stays referenced until the wait

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

    def enqueue(self, feeds: dict[str, "np.ndarray | DeviceTensor"]) -> dict[str, DeviceTensor]:
        """Queue the copies in and one run on ``stream`` and return at once, waiting for nothing. A feed is a host
        array (contiguous, this engine's dtype; copied in), a ``DeviceTensor`` elsewhere on the GPU (copied device to
        device) or ``input_tensor``'s own buffer (already in place). Keep host arrays alive until the stream is
        synchronised. The outputs are this engine's buffers: complete once the stream has run, valid until its
        next call."""
        tensors = {n: self._feed(feeds, n) for n in self.input_names}
        batch = self._prepare({n: tuple(t.shape) for n, t in tensors.items()})
        for name, tensor in tensors.items():
            self._copy_in(name, tensor)
        self._run(batch)
        return {n: DeviceTensor(self._buffers[n], tuple(self._context.get_tensor_shape(n)), self.dtypes[n])
                for n in self.output_names}

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

    def _feed(self, feeds: dict, name: str):
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
        _cuda(self._cudart.cudaMemcpyAsync(destination, source, nbytes, kind, self._stream))

    def _run(self, batch: int) -> None:
        graph = self._graphs.get(batch)
        if graph is not None:
            _cuda(self._cudart.cudaGraphLaunch(graph, self._stream))
        elif not self._context.execute_async_v3(int(self._stream)):
            raise UmeEdgeError(f"TensorRT could not enqueue {self.path.name}; its log above says why")

    def _capture_graph(self, batch: int):
        """Record one run at ``batch`` as a CUDA graph. The buffers never move, so the graph stays valid."""
        self._prepare({n: (batch, *self.max_shapes[n][1:]) for n in self.input_names})
        self._run(batch)  # TensorRT updates its state on the first run after a shape change; capture after it
        self.synchronize()
        cudart = self._cudart
        _cuda(cudart.cudaStreamBeginCapture(self._stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal))
        self._run(batch)
        graph = _cuda(cudart.cudaStreamEndCapture(self._stream))
        executable = _cuda(cudart.cudaGraphInstantiate(graph, 0))
        _cuda(cudart.cudaGraphDestroy(graph))
        return executable

    def synchronize(self) -> None:
        _cuda(self._cudart.cudaStreamSynchronize(self._stream))

    def close(self) -> None:
        """Free the graphs, buffers and stream; safe to call twice."""
        if self._stream is None:
            return
        self.synchronize()
        for executable in self._graphs.values():
            _cuda(self._cudart.cudaGraphExecDestroy(executable))
        for pointer in self._buffers.values():
            _cuda(self._cudart.cudaFree(pointer))
        _cuda(self._cudart.cudaStreamDestroy(self._stream))
        self._graphs, self._buffers, self._stream = {}, {}, None
        self._context = self._engine = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def present_runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """``(start, stop)`` of each run of consecutive present rows: ``[1, 1, 0, 1]`` -> ``[(0, 2), (3, 4)]``."""
    edges = np.diff(np.concatenate(([0], np.asarray(rows, np.int8), [0])))
    return [(int(a), int(b)) for a, b in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1))]


class DevicePipeline:
    """``Pipeline.infer`` on one GPU with the partial logits kept there. Only the present rows of each modality go
    through its encoder; strided device-to-device copies place the encoder's ``partial_logits [rows, C]`` at
    ``[row, i, :]`` of the fusion engine's own ``partial_logits [B, M, C]`` input buffer (one 2D copy per run of
    consecutive present rows); the fusion engine runs; only ``logits`` and ``probs`` come back to the host.

    Each engine keeps its own CUDA stream, so the encoders of different modalities may overlap on the GPU. An encoder
    queues its input copy, its run and its 2D copies on its stream and then records an event; the fusion stream waits
    for those events before it runs. ``run`` ends by waiting for the fusion stream, which by then has waited for every
    encoder, so the next ``run`` never overwrites a buffer still in use. The pipeline owns the engines: ``close``
    closes them.
    """

    def __init__(self, engines: dict[str, TensorRTEngine], fusion: TensorRTEngine, modality_order: list[str],
                 num_classes: int):
        self.engines, self.fusion = engines, fusion
        self.modality_order, self.num_classes = list(modality_order), int(num_classes)
        _check_pipeline_engines(engines, fusion, self.modality_order, self.num_classes)
        self._cudart = _cudart()
        self._row_bytes = self.num_classes * np.dtype(np.float32).itemsize
        self._events = {}
        for name in self.modality_order:
            self._events[name] = _cuda(self._cudart.cudaEventCreateWithFlags(self._cudart.cudaEventDisableTiming))

    def run(self, given: dict[str, np.ndarray], mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(logits, probs)``, float32 ``[B, C]``, for presence ``mask`` (bool ``[B, M]``, ``modality_order``) and
        ``given[name]``, the full-batch host input of every modality with at least one present row."""
        mask = self._check(given, mask)
        encoded = {name: self._encode(i, given[name], mask[:, i]) for i, name in enumerate(self.modality_order)
                   if mask[:, i].any()}  # the host inputs stay referenced until the final wait
        for name in encoded:
            _cuda(self._cudart.cudaStreamWaitEvent(self.fusion.stream, self._events[name], 0))
        present = mask.astype(np.float32)
        feeds = {"partial_logits": self.fusion.input_tensor("partial_logits", len(mask)), "present": present}
        outputs = self.fusion.enqueue(feeds)
        fused = self.fusion.download({"logits": outputs["logits"], "probs": outputs["probs"]})
        return fused["logits"], fused["probs"]

    def _encode(self, index: int, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Queue modality ``index``'s encoder on its present rows and the copies of its partial logits into place."""
        name = self.modality_order[index]
        engine = self.engines[name]
        x = np.ascontiguousarray(x if rows.all() else x[rows], dtype=engine.dtypes[name])
        partial = engine.enqueue({name: x})["partial_logits"]
        self._scatter(partial.pointer, index, rows, engine.stream)
        _cuda(self._cudart.cudaEventRecord(self._events[name], engine.stream))
        return x

    def _scatter(self, source: int, index: int, rows: np.ndarray, stream) -> None:
        """Copy compact ``[rows, C]`` partial logits at ``source`` to ``[row, index, :]`` of the fusion input."""
        pitch = len(self.modality_order) * self._row_bytes
        destination = self.fusion.input_tensor("partial_logits", len(rows)).pointer + index * self._row_bytes
        done = 0
        for start, stop in present_runs(rows):
            _cuda(self._cudart.cudaMemcpy2DAsync(destination + start * pitch, pitch,
                                                 source + done * self._row_bytes, self._row_bytes,
                                                 self._row_bytes, stop - start,
                                                 self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream))
            done += stop - start

    def _check(self, given: dict[str, np.ndarray], mask) -> np.ndarray:
        mask = np.asarray(mask)
        if mask.dtype != bool or mask.ndim != 2 or mask.shape[1] != len(self.modality_order) or not len(mask):
            raise InputError(f"mask must be a bool array of shape [batch, {len(self.modality_order)}] (modalities "
                             f"{self.modality_order}), got {mask.dtype} {list(mask.shape)}")
        if not mask.any(axis=1).all():
            raise InputError(f"rows {np.flatnonzero(~mask.any(axis=1))[:10].tolist()} have no modality present")
        for i, name in enumerate(self.modality_order):
            if mask[:, i].any() and (name not in given or len(given[name]) != len(mask)):
                raise InputError(f"modality {name!r} has present rows, so given[{name!r}] must hold all "
                                 f"{len(mask)} rows of the batch")
        return mask

    def close(self) -> None:
        """Close the engines (each waits for its stream first) and free the events; safe to call twice."""
        for engine in [*self.engines.values(), self.fusion]:
            engine.close()
        for event in self._events.values():
            _cuda(self._cudart.cudaEventDestroy(event))
        self._events = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def _check_pipeline_engines(engines: dict, fusion: TensorRTEngine, order: list[str], num_classes: int) -> None:
    """Refuse engines whose tensors do not fit ENGINE_FORMAT.md (names, per-sample shapes, float32 partial logits)."""
    problems = [f"no engine for modality {name!r}" for name in order if name not in engines]
    problems += [p for name in order if name in engines for p in _encoder_problems(name, engines[name], num_classes)]
    problems += _fusion_problems(fusion, len(order), num_classes)
    if problems:
        raise EngineMismatch("these engines do not form a pipeline: " + "; ".join(problems))


def _encoder_problems(name: str, engine: TensorRTEngine, num_classes: int) -> list[str]:
    if engine.input_names != [name] or "partial_logits" not in engine.output_names:
        return [f"{engine.path.name} has inputs {engine.input_names} and outputs {engine.output_names}; expected "
                f"input {name!r} and output 'partial_logits'"]
    shape, dtype = engine.max_shapes["partial_logits"], engine.dtypes["partial_logits"]
    if shape[1:] != (num_classes,) or dtype != np.float32:
        return [f"{engine.path.name} gives partial_logits {dtype} {list(shape)}, "
                f"expected float32 [batch, {num_classes}]"]
    return []


def _fusion_problems(fusion: TensorRTEngine, num_modalities: int, num_classes: int) -> list[str]:
    expected = {"partial_logits": (num_modalities, num_classes), "present": (num_modalities,)}
    found = {n: fusion.max_shapes[n][1:] for n in fusion.input_names}
    if found != expected or not {"logits", "probs"} <= set(fusion.output_names):
        return [f"{fusion.path.name} has inputs {found} and outputs {fusion.output_names}; expected inputs "
                f"{expected} (per sample) and outputs logits and probs"]
    if fusion.dtypes["partial_logits"] != np.float32:
        return [f"{fusion.path.name} takes partial_logits as {fusion.dtypes['partial_logits']}, expected float32"]
    return []
