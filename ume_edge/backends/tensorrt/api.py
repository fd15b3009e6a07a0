"""The two optional frameworks, imported only when called: ``tensorrt`` and cuda-python's runtime bindings.

Tests replace ``tensorrt`` and ``cudart`` here (and only here) with fakes held to tables of the real APIs.
"""

from __future__ import annotations

import re

from ume_edge.errors import BackendUnavailable, UmeEdgeError

INSTALL_HINT = "pip install 'ume-edge[tensorrt]'"
EXPORT_ONLY_HINT = "or build with --export-only to write TensorRT-ready ONNX and build the plans on the target"


def tensorrt():
    import tensorrt as trt

    return trt


def cudart():
    try:
        from cuda.bindings import runtime
    except ImportError:  # cuda-python before 12.8
        from cuda import cudart as runtime
    return runtime


def call(result: tuple):
    """Unpack a cuda-python ``(error, *values)`` result, raising on any error."""
    error, *values = result
    if error != cudart().cudaError_t.cudaSuccess:
        raise UmeEdgeError(f"CUDA call failed: {getattr(error, 'name', error)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def version() -> str | None:
    try:
        return tensorrt().__version__
    except (ImportError, OSError):
        return None


def version_tuple(text: str | None) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text or "0"))


def unavailable_reason() -> str | None:
    """One line saying what is missing for TensorRT here and how to get it, or None when it is usable."""
    try:
        tensorrt()
    except (ImportError, OSError):
        return f"TensorRT is not installed: {INSTALL_HINT} on a machine with an NVIDIA GPU, {EXPORT_ONLY_HINT}"
    try:
        runtime = cudart()
        error, count = runtime.cudaGetDeviceCount()
    except (ImportError, OSError, RuntimeError):
        return f"cuda-python or the CUDA runtime is missing: {INSTALL_HINT}, {EXPORT_ONLY_HINT}"
    if error != runtime.cudaError_t.cudaSuccess or count == 0:
        return (f"no CUDA GPU is visible ({getattr(error, 'name', error)}): run on a machine with an NVIDIA GPU "
                f"and driver, {EXPORT_ONLY_HINT}")
    return None


def require() -> None:
    reason = unavailable_reason()
    if reason is not None:
        raise BackendUnavailable(reason)


def device_info(device_id: int = 0) -> dict:
    """The GPU a plan is built for or run on, as a manifest records it."""
    properties = call(cudart().cudaGetDeviceProperties(device_id))
    name = properties.name
    if isinstance(name, bytes):
        name = name.split(b"\0", 1)[0].decode()
    return {"kind": "gpu", "gpu_name": name, "compute_capability": f"{properties.major}.{properties.minor}",
            "tensorrt": version()}
