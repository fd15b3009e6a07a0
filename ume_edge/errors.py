"""Exceptions a user can act on. Each message says what went wrong and what to do next."""

from collections.abc import Iterator
from contextlib import contextmanager

from ume_edge.serving import contract


class UmeEdgeError(Exception):
    """Base class for every error ume-edge raises on purpose."""


class InputError(UmeEdgeError, ValueError):
    """An inference input is malformed: wrong name, shape, dtype, values, or presence. ``reason`` is a short word
    for counting refusals (``nan``, ``shape``, ``dtype``, ``no_modality``, ``unknown_input``, ``mask``, ...)."""

    def __init__(self, message: str, reason: str = "invalid"):
        super().__init__(message)
        self.reason = reason


@contextmanager
def refusals_as_input_errors() -> Iterator[None]:
    """The request contract's refusals as ``InputError``, the error ume-edge's Python API raises for bad inputs."""
    try:
        yield
    except contract.Refused as refused:
        raise InputError(str(refused), refused.reason) from None


class BackendUnavailable(UmeEdgeError):
    """A runtime (TensorRT, a GPU, Triton) is not installed or not usable here."""


class EngineMismatch(UmeEdgeError):
    """An engine directory does not fit this machine, runtime or its own manifest."""


class BuildError(UmeEdgeError):
    """A build stage failed; the message names the modality and the cause."""
