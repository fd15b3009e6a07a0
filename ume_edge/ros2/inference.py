"""Frames to asynchronous Triton requests (``tritonclient.grpc`` ``async_infer``), at most ``max_in_flight`` at a
time: a frame that finds them all busy is skipped and counted, so a slow server never blocks a ROS callback."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ume_edge.client.streaming import grpc_inputs
from ume_edge.constants import PROBS
from ume_edge.sync import Frame

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInput:
    """One input of the served model, from its metadata: Triton datatype and shape (batch dimension first)."""

    datatype: str
    shape: tuple[int, ...]


def model_inputs(client: Any, model: str, timeout_s: float) -> dict[str, ModelInput]:
    """Input name -> ``ModelInput``, from the server's model metadata."""
    metadata = client.get_model_metadata(model, as_json=True, client_timeout=timeout_s)
    return {tensor["name"]: ModelInput(tensor["datatype"], tuple(int(d) for d in tensor["shape"]))
            for tensor in metadata["inputs"]}


@dataclass
class InferenceCounts:
    sent: int = 0
    answered: int = 0
    failed: int = 0
    skipped_busy: int = 0
    in_flight: int = 0
    last_latency_ms: float | None = None
    last_error: str | None = None  # of the last answer; None when it succeeded


class Inference:
    """Sends frames to ``model``; ``on_answer(frame, probs)`` runs on tritonclient's thread for each answer."""

    def __init__(self, client: Any, model: str, datatypes: dict[str, str], on_answer: Callable[[Frame, np.ndarray],
                 None], max_in_flight: int, timeout_s: float):
        self.client, self.model, self.datatypes = client, model, datatypes
        self.on_answer, self.max_in_flight, self.timeout_s = on_answer, max_in_flight, timeout_s
        self._counts = InferenceCounts()
        self._changed = threading.Condition()

    def counts(self) -> InferenceCounts:
        with self._changed:
            return InferenceCounts(**vars(self._counts))

    def submit(self, frame: Frame) -> bool:
        """Send one frame (its present modalities, batch of one); ``False`` when every slot was busy."""
        import tritonclient.grpc as grpcclient

        with self._changed:
            if self._counts.in_flight >= self.max_in_flight:
                self._counts.skipped_busy += 1
                return False
            self._counts.in_flight += 1
            self._counts.sent += 1
        arrays = {name: np.expand_dims(reading, 0) for name, reading in frame.inputs.items() if reading is not None}
        self.client.async_infer(self.model, grpc_inputs(arrays, self.datatypes), self._callback(frame),
                                outputs=[grpcclient.InferRequestedOutput(PROBS)], client_timeout=self.timeout_s)
        return True

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request is in flight; ``False`` if some still are after ``timeout_s``."""
        with self._changed:
            return self._changed.wait_for(lambda: self._counts.in_flight == 0, timeout=timeout_s)

    def _callback(self, frame: Frame) -> Callable[[Any, Any], None]:
        sent_s = time.perf_counter()

        def callback(result: Any, error: Any) -> None:
            probs = None if error is not None else result.as_numpy(PROBS).reshape(-1)
            try:
                if probs is not None:
                    self.on_answer(frame, probs)
            except Exception as publish_error:  # rclpy's, after a shutdown; nobody above this thread would see it
                LOGGER.warning("an answer was not published: %s: %s", type(publish_error).__name__, publish_error)
            finally:
                self._settle(time.perf_counter() - sent_s, error)
        return callback

    def _settle(self, latency_s: float, error: Any) -> None:
        with self._changed:
            counts = self._counts
            counts.in_flight -= 1
            counts.last_latency_ms = latency_s * 1e3
            counts.last_error = None if error is None else str(error)
            if error is None:
                counts.answered += 1
            else:
                counts.failed += 1
                LOGGER.warning("a request for the frame failed: %s", error)
            self._changed.notify_all()
