"""Fixtures for the benchmark suites: the reference model's engines, its PyTorch eager baseline, and real inputs.

Run: pytest bench/ --benchmark-json=RESULTS.json && python -m ume_edge.bench report RESULTS.json
"""

import numpy as np
import pytest

from ume_edge.data import load


def pytest_configure(config):
    config.addinivalue_line("markers", "target: asserts a performance target (ratios measured in the same run)")


@pytest.fixture(scope="session")
def engine_dirs():
    from ume_edge.build import ensure_default_engines

    return {precision: ensure_default_engines(precision) for precision in ("int8", "fp32")}


@pytest.fixture(scope="session")
def pipelines(engine_dirs):
    from ume_edge.runtime import Pipeline

    return {precision: Pipeline.load(path) for precision, path in engine_dirs.items()}


@pytest.fixture(scope="session")
def encoders(pipelines):
    """Each modality's engine on its own, per precision."""
    return {precision: {name: pipeline.open_encoder(name) for name in pipeline.modality_names}
            for precision, pipeline in pipelines.items()}


@pytest.fixture(scope="session")
def torch_model():
    import torch

    from ume_edge.model import load_reference

    torch.set_num_threads(len(__import__("os").sched_getaffinity(0)))
    return load_reference()


@pytest.fixture(scope="session")
def test_inputs():
    inputs, _ = load("avdigits", "test")
    return inputs


@pytest.fixture(autouse=True)
def _p90(request):
    """Add the 90th percentile to each benchmark's extra_info (pytest-benchmark's JSON stops at the quartiles)."""
    yield
    benchmark = request.node.funcargs.get("benchmark")
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None and stats.data:
        benchmark.extra_info["p90_s"] = float(np.percentile(stats.data, 90))
