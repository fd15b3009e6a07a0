"""The TensorRT build's own options (``python -m ume_edge.build --backend tensorrt --workspace-mb ...``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ume_edge.backends.base import BackendOptions


@dataclass(frozen=True)
class TensorRTOptions(BackendOptions):
    """How the plans are built: builder memory, timing cache, DLA core and compatibility."""

    backend = "tensorrt"
    title = "TensorRT (with --backend tensorrt)"

    workspace_mb: int = field(default=1024, metadata={"help": "builder workspace limit (MiB); lower on Jetson"})
    timing_cache: Path | None = field(default=None, metadata={
        "help": "persistent timing cache file: rebuilds reuse kernel timings (default: none)"})
    dla_core: int | None = field(default=None, metadata={
        "help": "build the encoders for this DLA core (Jetson), GPU fallback on (default: GPU only)"})
    hardware_compatible: bool = field(default=False, metadata={
        "help": "plans that run on any Ampere or newer GPU (slower; not on Jetson)"})
    version_compatible: bool = field(default=False, metadata={
        "help": "plans that later TensorRT versions can run (slower)"})
