import signal

import numpy as np
import pytest
from clocks import ManualClock  # tests/clocks.py; pytest puts tests/ on sys.path

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


@pytest.fixture(scope="session")
def served_reference(int8_engines):
    """``python -m ume_edge.serve`` of the reference INT8 build, one for the whole session: for tests that only send
    requests to it (a test that stops, kills or reconfigures a server starts its own)."""
    pytest.importorskip("pytriton")  # ships the tritonserver binary
    from ume_edge.serve import ServeProcess
    from ume_edge.serving.server_config import Endpoints, free_ports

    process = ServeProcess(int8_engines, Endpoints("127.0.0.1", *free_ports(3)))
    process.start(timeout_s=180)
    yield process
    assert process.stop(signal.SIGTERM) == 0, process.log_tail()


@pytest.fixture
def clock():
    """A clock that moves only when the test moves it (``clock.advance_ms``)."""
    return ManualClock()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def pytest_collection_modifyitems(items):
    """A test that starts a real tritonserver is slow: ``pytest -m "not slow"`` leaves it out."""
    for item in items:
        if item.get_closest_marker("triton") is not None:
            item.add_marker(pytest.mark.slow)
