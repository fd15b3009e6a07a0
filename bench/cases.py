"""What every benchmark shares: the cases it sweeps and how it records them for `python -m ume_edge.bench report`."""

import time

import numpy as np

from ume_edge.data import presence_patterns

BATCHES = (1, 8, 64)
PATTERNS = presence_patterns(["audio", "image"])
ROUNDS = 15


def batch_of(inputs, size, pattern=("audio", "image")):
    """The first ``size`` samples, with the modalities outside ``pattern`` absent (None)."""
    return {name: (np.ascontiguousarray(x[:size]) if name in pattern else None) for name, x in inputs.items()}


def record(benchmark, kind, target, backend, precision, batch, **extra):
    benchmark.extra_info.update(kind=kind, target=target, backend=backend, precision=precision, batch=batch, **extra)


def _timed(fn, calls):
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def interleaved_medians(*fns, rounds=ROUNDS, block_s=0.05):
    """Median seconds per call of each function, measured in alternating blocks so that drift in the machine's
    load hits all alike. Each block starts with an untimed call: the previous block's runtime (PyTorch's OpenMP
    threads, ONNX Runtime's pool) may still hold the cores for a moment, and that belongs to neither."""
    for fn in fns:
        fn()
    calls = [max(1, int(block_s / max(_timed(fn, 1), 1e-6))) for fn in fns]
    samples = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            fn()
            samples[i].append(_timed(fn, calls[i]))
    return [float(np.median(s)) for s in samples]
