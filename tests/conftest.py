import numpy as np
import pytest

from ume_edge.data import load


@pytest.fixture(scope="session")
def avdigits_test():
    return load("avdigits", "test")


@pytest.fixture(scope="session")
def reference_model():
    from ume_edge.model import load_reference

    return load_reference()


@pytest.fixture(scope="session")
def int8_engines():
    """The reference model's INT8 ONNX Runtime build, as `python -m ume_edge.build --precision int8` makes it."""
    from ume_edge.build import ensure_default_engines

    return ensure_default_engines("int8")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def pytest_collection_modifyitems(items):
    """A test that starts a real tritonserver is slow: ``pytest -m "not slow"`` leaves it out."""
    for item in items:
        if item.get_closest_marker("triton") is not None:
            item.add_marker(pytest.mark.slow)
