"""The runtimes that execute engine directories, behind one face (``base.Backend``), found by name here.

Optional frameworks (tensorrt, cuda-python) are imported inside methods, so importing this package never fails.
"""

from __future__ import annotations

from functools import cache
from importlib import import_module

from ume_edge.backends.base import Backend

# name -> module holding ``BACKEND``; in order of preference for ``auto``
_MODULES = {"tensorrt": "ume_edge.backends.tensorrt", "onnxruntime": "ume_edge.backends.onnxruntime"}
NAMES = tuple(_MODULES)


@cache
def get(name: str) -> Backend:
    """The backend called ``name``; ``ValueError`` naming the known ones otherwise."""
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; ume-edge knows {', '.join(NAMES)}")
    return import_module(_MODULES[name]).BACKEND


def resolve(name: str) -> Backend:
    """``auto``: the first backend available here (TensorRT where it is usable, else ONNX Runtime)."""
    if name != "auto":
        return get(name)
    return next((backend for backend in map(get, NAMES) if backend.is_available()), get(NAMES[-1]))
