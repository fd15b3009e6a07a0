"""Runtimes that execute per-modality engines. Each module has the same face:

``is_available() -> bool``, ``get_version() -> str | None``, ``device_info() -> dict``, and an engine class
constructed from a file with ``input_names``, ``output_names`` and ``infer(feeds: dict) -> dict``.
Optional frameworks are imported inside functions, so importing this package never fails.
"""

from importlib import import_module

BACKENDS = ("onnxruntime", "tensorrt")


def get_backend(name: str):
    """The backend module called ``name`` (``onnxruntime`` or ``tensorrt``)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return import_module(f"ume_edge.backends.{name}")


def open_engine(path, threads: int | None = None):
    """An engine for one file: ``.plan`` -> TensorRT, ``.onnx`` -> ONNX Runtime on the CPU."""
    from pathlib import Path

    if Path(path).suffix == ".plan":
        return get_backend("tensorrt").TensorRTEngine(path)
    return get_backend("onnxruntime").OnnxRuntimeEngine(path, threads)
