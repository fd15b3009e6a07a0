"""How a plan is built: the configuration a build asks for, the builder settings it means for a TensorRT major
version, and the builder itself (TensorRT's Python API, 10.x and 11.x)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ume_edge.backends.tensorrt import api
from ume_edge.backends.tensorrt.compat import dla_problem
from ume_edge.errors import BuildError

LOGGER = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
DLA_PRECISIONS = ("fp16", "int8")
DLA_MAX_BATCH = 4096  # TensorRT docs, "DLA Supported Layers and Restrictions"
MIB = 1 << 20
SUPPORTED_MAJORS = (10, 11)
# TensorRT 10 on DLA: weakly typed (see builder_settings), with the precisions the layers may take.
DLA_WEAK_TYPING_FLAGS = {"fp16": ["FP16"], "int8": ["INT8", "FP16"]}


@dataclass
class BuildConfig:
    """How to build one plan from an ONNX file that carries its precision (fp32, fp16 tensors, or S8S8 Q/DQ)."""

    precision: str = "fp32"
    max_batch: int = 64
    opt_batch: int | None = None
    workspace_mb: int = 1024
    timing_cache: str | os.PathLike | None = None
    dla_core: int | None = None
    hardware_compatible: bool = False
    version_compatible: bool = False

    def __post_init__(self):
        if self.opt_batch is None:
            self.opt_batch = default_opt_batch(self.max_batch)

    def validate(self) -> None:
        problems = self._general_problems() + (self._dla_problems() if self.dla_core is not None else [])
        if problems:
            raise BuildError("impossible TensorRT build config: " + "; ".join(problems))

    def _general_problems(self) -> list[str]:
        problems = []
        assert self.opt_batch is not None  # __post_init__ sets it
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
        assert self.dla_core is not None  # validate calls this only for a DLA build
        if self.dla_core < 0:
            problems.append(f"dla_core is {self.dla_core}; DLA cores are numbered from 0")
        if self.precision not in DLA_PRECISIONS:
            problems.append(f"DLA runs only {' and '.join(DLA_PRECISIONS)}, not {self.precision}")
        if self.hardware_compatible:
            problems.append("hardware compatibility (Ampere+) is for discrete GPUs; JetPack and DLA do not support it")
        if self.max_batch > DLA_MAX_BATCH:
            problems.append(f"max_batch {self.max_batch} exceeds the DLA limit of {DLA_MAX_BATCH}")
        return problems


def default_opt_batch(max_batch: int) -> int:
    """Half the largest batch, rounded down to a power of two, at least 1."""
    half = max(1, max_batch // 2)
    return 1 << (half.bit_length() - 1)


def profile_batches(config: BuildConfig) -> tuple[int, int, int]:
    """(min, opt, max) batch of the optimization profile. DLA has no dynamic shapes: all three are max_batch, and
    the engine pads smaller batches up to it."""
    if config.dla_core is not None:
        return (config.max_batch,) * 3
    assert config.opt_batch is not None  # __post_init__ sets it
    return 1, config.opt_batch, config.max_batch


def builder_settings(config: BuildConfig, tensorrt_version: str) -> dict:
    """Every setting ``build_engine`` applies for TensorRT ``tensorrt_version``, as TensorRT enum member names."""
    config.validate()
    major = api.version_tuple(tensorrt_version)[0]
    if major not in SUPPORTED_MAJORS:
        raise BuildError(f"TensorRT {tensorrt_version} is not supported; ume-edge builds with TensorRT "
                         f"{' or '.join(map(str, SUPPORTED_MAJORS))}")
    if config.dla_core is not None and (problem := dla_problem(tensorrt_version)):
        raise BuildError(problem)
    # Our ONNX already says each tensor's precision (fp32, fp16 tensors, or S8S8 Q/DQ; INT8 comes only from Q/DQ since
    # implicit calibration is deprecated), so a strongly typed network builds exactly what the file says. TensorRT 11
    # is always strongly typed and has no precision flags. TensorRT 10 on DLA is the exception: DLA runs only fp16 and
    # int8 layers, and TensorRT 10 refuses the FP16 flag on a strongly typed network (NVIDIA/TensorRT#4253), so there
    # the network is weakly typed; with the INT8 flag the Q/DQ nodes set the int8 layers' scales (explicit
    # quantization: no calibrator) and FP16 lets the layers between them run in fp16 on the DLA.
    weakly_typed = major == 10 and config.dla_core is not None
    flags = list(DLA_WEAK_TYPING_FLAGS[config.precision]) if weakly_typed else []
    flags += ["GPU_FALLBACK"] if config.dla_core is not None else []
    flags += ["VERSION_COMPATIBLE"] if config.version_compatible else []
    return {
        "tensorrt_major": major,
        "network_flags": ["STRONGLY_TYPED"] if major == 10 and not weakly_typed else [],
        "builder_flags": flags,
        "memory_pool_limits": {"WORKSPACE": config.workspace_mb * MIB},
        "profile_batch": dict(zip(("min", "opt", "max"), profile_batches(config), strict=True)),
        "timing_cache": os.fspath(config.timing_cache) if config.timing_cache else None,
        "default_device_type": "GPU" if config.dla_core is None else "DLA",
        "DLA_core": config.dla_core,
        "hardware_compatibility_level": "AMPERE_PLUS" if config.hardware_compatible else "NONE",
    }


def build_engine(onnx_path, plan_path, inputs: dict[str, tuple[int, ...]], config: BuildConfig) -> dict:
    """Build and write a plan, save the timing cache, and return the device a manifest records.
    ``inputs`` maps each input name to its per-sample shape (no batch axis)."""
    trt = api.tensorrt()
    settings = builder_settings(config, trt.__version__)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    _check_dla_cores(builder, config)
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
    return {**api.device_info(), "dla_core": config.dla_core, "hardware_compatible": config.hardware_compatible,
            "version_compatible": config.version_compatible}


def _check_dla_cores(builder, config: BuildConfig) -> None:
    if config.dla_core is not None and config.dla_core >= builder.num_DLA_cores:
        raise BuildError(f"--dla-core {config.dla_core}: this device has {builder.num_DLA_cores} DLA core(s); "
                         "DLA is on Jetson AGX/NX modules only")


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
        LOGGER.warning("timing cache %s was made on another device or TensorRT; starting a fresh one", path)
        builder_config.set_timing_cache(builder_config.create_timing_cache(b""), ignore_mismatch=False)


def _save_timing_cache(builder_config, path: str | None) -> None:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(builder_config.get_timing_cache().serialize())
