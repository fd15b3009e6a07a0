"""ONNX Runtime on the CPU: ONNX files run as they are (U8S8 Q/DQ for INT8, fp32 otherwise)."""

from __future__ import annotations

import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ume_edge.backends.base import (
    DEFAULT_OPEN_OPTIONS,
    Backend,
    BackendOptions,
    CompiledFiles,
    CompileJob,
    Engine,
    HostExecutor,
    OpenOptions,
    TritonModel,
    check_threads,
)
from ume_edge.engine_dir import Manifest
from ume_edge.engine_dir.schema import engine_file
from ume_edge.errors import BackendUnavailable, EngineMismatch

_ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
              "amx_int8", "asimd", "asimddp", "i8mm")


def get_version() -> str | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime.__version__


def device_info() -> dict:
    """The CPU this process runs on: architecture and the ISA extensions INT8 kernels care about."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags.update(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {"kind": "cpu", "arch": platform.machine(), "isa": [f for f in _ISA_FLAGS if f in flags]}


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


# Batches up to this size run on a single-threaded session: waking worker threads costs more than they save.
SMALL_BATCH = 4


def _session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # Idle worker threads would otherwise spin for a while after each run and steal the cores from the next
    # engine of the pipeline (measured here: both modalities took 1.8x the sum of each alone).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxRuntimeEngine:
    """One ONNX file with full graph optimisation (it matters for Q/DQ speed): a session with ``threads`` workers
    for large batches and, when that is more than one, a single-threaded one for small batches."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        self.path = Path(path)
        check_threads(threads)
        threads = threads or default_threads()
        self.session = _session(self.path, threads)
        self.small_batch_session = _session(self.path, 1) if threads > 1 else self.session
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = len(next(iter(feeds.values())))
        session = self.small_batch_session if batch <= SMALL_BATCH else self.session
        return dict(zip(self.output_names, session.run(self.output_names, feeds), strict=True))

    def close(self) -> None:
        """Sessions free their memory when dropped; nothing else is held."""
        self.session = self.small_batch_session = None


@dataclass(frozen=True)
class OnnxRuntimeOptions(BackendOptions):
    """ONNX Runtime builds need no options of their own (``--threads`` is every build's)."""

    backend = "onnxruntime"
    title = "ONNX Runtime (with --backend onnxruntime)"


class OnnxRuntimeBackend(Backend[OnnxRuntimeOptions]):
    name = "onnxruntime"
    options_type = OnnxRuntimeOptions
    precisions = ("fp32", "int8")  # no fast fp16 kernels on a CPU
    int8_format = "U8S8"
    fallback_precision = "fp32"

    def unavailable_reason(self) -> str | None:
        return None if get_version() else "onnxruntime is not installed: pip install onnxruntime"

    def version(self) -> str | None:
        return get_version()

    def device(self) -> dict:
        return device_info()

    def compile(self, job: CompileJob[OnnxRuntimeOptions]) -> CompiledFiles:
        engines = {"fusion": shutil.copyfile(job.fusion_onnx, job.staging / "fusion.onnx")}
        for name, candidate in job.chosen.items():
            engines[name] = shutil.copyfile(candidate.file, job.staging / f"{name}.onnx")
        return CompiledFiles(engines={k: Path(v) for k, v in engines.items()}, device=self.device())

    def check_compatible(self, manifest: Manifest, options: OpenOptions = DEFAULT_OPEN_OPTIONS) -> None:
        built, here = manifest.versions.get("onnxruntime"), get_version()
        if here is None:
            raise BackendUnavailable(self.unavailable_reason())
        if str(built).split(".")[:2] != here.split(".")[:2]:
            raise EngineMismatch(f"engines built with ONNX Runtime {built}, this machine has {here}: rebuild here "
                                 f"with `python -m ume_edge.build` or install onnxruntime=={built}")
        if manifest.device.get("arch") != platform.machine():
            raise EngineMismatch(f"engines built on {manifest.device.get('arch')}, this machine is "
                                 f"{platform.machine()}: rebuild on this machine with `python -m ume_edge.build`")

    def open_engine(self, path: Path, options: OpenOptions, device: dict | None = None) -> OnnxRuntimeEngine:
        return OnnxRuntimeEngine(path, options.threads)

    def open(self, directory: Path, manifest: Manifest, options: OpenOptions) -> HostExecutor:
        engines: dict[str, Engine] = {m.name: self.open_engine(directory / engine_file(m).path, options)
                                     for m in manifest.modalities}
        fusion = self.open_engine(directory / engine_file(manifest.fusion).path, options)
        return HostExecutor(engines, fusion, manifest.fusion.modality_order, manifest.model.num_classes)

    def triton_model(self, manifest: Manifest, modality: str | None) -> TritonModel:
        return TritonModel(platform="onnxruntime_onnx", file_name="model.onnx", instance_kind="KIND_CPU")


BACKEND = OnnxRuntimeBackend()
