"""ONNX Runtime on the CPU: the engine class and what a manifest records about this runtime."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np

_ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
              "amx_int8", "asimd", "asimddp", "i8mm")


def is_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


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
        threads = threads or default_threads()
        self.session = _session(self.path, threads)
        self.small_batch_session = _session(self.path, 1) if threads > 1 else self.session
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = len(next(iter(feeds.values())))
        session = self.small_batch_session if batch <= SMALL_BATCH else self.session
        return dict(zip(self.output_names, session.run(self.output_names, feeds)))
