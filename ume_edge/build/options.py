"""What a build is asked for (``BuildOptions``), checked before any work, and the backend that will build it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ume_edge import backends
from ume_edge.backends.base import Backend, BackendOptions
from ume_edge.constants import DEFAULT_CALIB_METHOD, DEFAULT_MAX_BATCH, DEFAULT_MAX_DROP, DEFAULT_PRECISION, PRECISIONS
from ume_edge.errors import BackendUnavailable, BuildError


@dataclass
class BuildOptions:
    """Every build's options; ``backend_options`` are the chosen backend's own (its ``options_type``; None: its
    defaults), e.g. ``TensorRTOptions(dla_core=0)`` with ``backend="tensorrt"``."""

    model: str | None = None
    trusted_encoders: tuple[str, ...] = ()
    precision: str = DEFAULT_PRECISION
    backend: str = "auto"
    calib_data: str | None = None
    eval_data: str | None = None
    calib_method: str = DEFAULT_CALIB_METHOD
    max_batch: int = DEFAULT_MAX_BATCH
    max_drop: float = DEFAULT_MAX_DROP
    out: Path | None = None
    export_only: bool = False
    threads: int | None = None
    allow_chance_accuracy: bool = False
    backend_options: BackendOptions | None = None


def check_options(options: BuildOptions) -> None:
    problems = []
    if options.precision not in PRECISIONS:
        problems.append(f"--precision must be one of {', '.join(PRECISIONS)}, not {options.precision!r}")
    if options.max_batch < 1:
        problems.append(f"--max-batch must be at least 1, not {options.max_batch}")
    if not (options.max_drop >= 0 and math.isfinite(options.max_drop)):
        problems.append(f"--max-drop is points of accuracy INT8 may cost (0 or more), not {options.max_drop}")
    if options.threads is not None and options.threads < 1:
        problems.append(f"--threads must be at least 1, not {options.threads}")
    if problems:
        raise BuildError("; ".join(problems))


def resolve_backend(options: BuildOptions) -> tuple[Backend[Any], BackendOptions]:
    """The backend that builds ``options`` and its own options; ``BuildError`` for anything it cannot build."""
    backend = backends.resolve(options.backend)
    backend_options = _own_options(backend, options)
    if options.precision not in backend.precisions:
        raise BuildError(f"{options.precision} is not a precision of {backend.name} (it builds "
                         f"{', '.join(backend.precisions)}); choose another --precision or --backend")
    if options.export_only and not backend.can_export_only:
        raise BuildError(f"--export-only writes files to build engines on another machine; {backend.name} engines "
                         "are built here. Use --export-only with --backend tensorrt, or drop it")
    if not options.export_only and (reason := backend.unavailable_reason()):
        raise BackendUnavailable(reason)
    backend.check_build_options(backend_options, options.precision, options.max_batch, options.export_only)
    return backend, backend_options


def _own_options(backend: Backend[Any], options: BuildOptions) -> BackendOptions:
    given = options.backend_options
    if given is None:
        return backend.options_type()
    if isinstance(given, backend.options_type):
        return given
    flags = given.flags()
    named = " ".join(flags) or f"{given.title.split(' (')[0]} options"
    one = len(flags) == 1
    chosen = " (what --backend auto chose here)" if options.backend == "auto" else ""
    raise BuildError(f"{named} {'is' if one else 'are'} for --backend {given.backend} only, and this build uses "
                     f"{backend.name}{chosen}; drop {'it' if one else 'them'}, or add --backend {given.backend}")
