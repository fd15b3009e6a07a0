"""What every benchmark shares: the cases it sweeps and how it records them for `python -m ume_edge.bench report`."""

import numpy as np

from ume_edge.data import presence_patterns

BATCHES = (1, 8, 64)
PATTERNS = presence_patterns(["audio", "image"])


def batch_of(inputs, size, pattern=("audio", "image")):
    """The first ``size`` samples, with the modalities outside ``pattern`` absent (None)."""
    return {name: (np.ascontiguousarray(x[:size]) if name in pattern else None) for name, x in inputs.items()}


def record(benchmark, kind, target, backend, precision, batch, **extra):
    benchmark.extra_info.update(kind=kind, target=target, backend=backend, precision=precision, batch=batch, **extra)
