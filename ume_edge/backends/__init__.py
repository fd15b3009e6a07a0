"""The runtimes that execute engine directories, behind one face (``base.Backend``), found by name here.

Optional frameworks (tensorrt, cuda-python) are imported inside methods, so importing this package never fails.
"""

from __future__ import annotations

from functools import cache
from importlib import import_module
from typing import Any

from ume_edge.backends.base import Backend, BackendOptions
from ume_edge.engine_dir import BACKEND_NAMES

NAMES = BACKEND_NAMES  # in order of preference for ``auto``
_MODULES = {name: f"ume_edge.backends.{name}" for name in NAMES}  # each holds ``BACKEND``


@cache
def get(name: str) -> Backend[Any]:
    """The backend called ``name``; ``ValueError`` naming the known ones otherwise."""
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; ume-edge knows {', '.join(NAMES)}")
    return import_module(_MODULES[name]).BACKEND


def resolve(name: str) -> Backend[Any]:
    """``auto``: the first backend available here (TensorRT where it is usable, else ONNX Runtime)."""
    if name != "auto":
        return get(name)
    return next((backend for backend in map(get, NAMES) if backend.is_available()), get(NAMES[-1]))


def options_types() -> dict[str, type[BackendOptions]]:
    """Each backend's options dataclass, by backend name."""
    return {name: get(name).options_type for name in NAMES}
