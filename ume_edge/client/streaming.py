"""Send scheduled requests to a Triton server over gRPC (``tritonclient.grpc``), asynchronously: at most
``concurrency`` in flight, every call limited to ``timeout_s``, sending stopped after ``max_failures`` failed
requests in a row (0: never) or on Ctrl-C, and an answer or an error recorded for every request sent."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ume_edge.client.options import ClientOptions
from ume_edge.client.simulation import ScheduledRequest
from ume_edge.constants import PRESENT

INTERRUPT_GRACE_S = 1.0  # after Ctrl-C, how long the requests in flight may still answer


@dataclass
class Outcome:
    request: ScheduledRequest
    sent_s: float
    latency_s: float | None = None
    label: int | None = None
    error: str | None = None


@dataclass
class StreamResult:
    outcomes: list[Outcome]
    wall_s: float
    stopped: str | None = None  # why it stopped before sending every request
    interrupted: bool = False  # by Ctrl-C


class Progress:
    """``[#####.....] 512/1000`` on stderr, redrawn at most every 0.2 s."""

    def __init__(self, total: int, enabled: bool, width: int = 30):
        self.total, self.enabled, self.width = total, enabled, width
        self._last = 0.0

    def update(self, done: int, final: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not final and now - self._last < 0.2):
            return
        self._last = now
        filled = int(self.width * done / max(1, self.total))
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} requests")
        if final:
            sys.stderr.write("\n")
        sys.stderr.flush()


def grpc_inputs(arrays: dict[str, np.ndarray], datatypes: dict[str, str] | None = None) -> list:
    """``tritonclient.grpc.InferInput`` list for ``{name: array}`` (datatype from the array unless given)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    tensors = []
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        datatype = (datatypes or {}).get(name) or np_to_triton_dtype(array.dtype)
        tensor = grpcclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def stream(options: ClientOptions, inputs: dict[str, np.ndarray], requests: list[ScheduledRequest]) -> StreamResult:
    """Send ``requests`` (rows of ``inputs``) to ``options.model`` at ``options.url``, paced by ``options.rate``."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(options.url)
    try:
        datatypes = _model_inputs(client, options.model, options.timeout_s)
        _check_model_takes(options, inputs, requests, datatypes)
        return _send_all(client, options, inputs, requests, datatypes)
    finally:
        client.close()


def model_input_specs(options: ClientOptions) -> dict[str, tuple[str, list[int]]]:
    """Input name -> (Triton datatype, shape with the batch axis first), from the server's model metadata."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(options.url)
    try:
        metadata = client.get_model_metadata(options.model, as_json=True, client_timeout=options.timeout_s)
    finally:
        client.close()
    return {tensor["name"]: (tensor["datatype"], [int(size) for size in tensor["shape"]])
            for tensor in metadata["inputs"]}


def _model_inputs(client: Any, model: str, timeout_s: float) -> dict[str, str]:
    """Input name -> Triton datatype, from the server's model metadata."""
    metadata = client.get_model_metadata(model, as_json=True, client_timeout=timeout_s)
    return {tensor["name"]: tensor["datatype"] for tensor in metadata["inputs"]}


def _check_model_takes(options: ClientOptions, inputs: dict[str, np.ndarray], requests: list[ScheduledRequest],
                       datatypes: dict[str, str]) -> None:
    from tritonclient.utils import np_to_triton_dtype

    model, url = options.model, options.url
    missing = [name for request in requests for name in request.present if name not in datatypes][:1]
    if missing:
        raise ValueError(f"model {model!r} at {url} has no input {missing[0]!r} (it has {', '.join(datatypes)})")
    if options.send_mask and PRESENT not in datatypes:
        raise ValueError(f"model {model!r} at {url} takes no {PRESENT!r} mask; drop --send-mask")
    for name, array in inputs.items():
        wanted = datatypes.get(name)
        if wanted and np_to_triton_dtype(array.dtype) != wanted:
            raise ValueError(f"the data set's {name} is {array.dtype} but model {model!r} takes {wanted}; "
                             f"convert it before saving the .npz")


def _send_all(client: Any, options: ClientOptions, inputs: dict[str, np.ndarray], requests: list[ScheduledRequest],
              datatypes: dict[str, str]) -> StreamResult:
    import tritonclient.grpc as grpcclient

    outputs = [grpcclient.InferRequestedOutput("label")]
    slots = threading.Semaphore(options.concurrency)
    tally = _Tally(options.max_failures)
    outcomes: list[Outcome] = []
    bar = Progress(len(requests), options.progress)
    start = time.perf_counter()
    interrupted = False
    try:
        for request in requests:
            if options.rate:
                _sleep_until(start + request.send_at_s)
            request_inputs = _request_inputs(inputs, request, datatypes, options.send_mask)
            slots.acquire()
            if tally.gave_up:
                break
            outcome = Outcome(request, time.perf_counter())
            outcomes.append(outcome)
            client.async_infer(options.model, request_inputs, _on_answer(outcome, slots, tally), outputs=outputs,
                               client_timeout=options.timeout_s)
            bar.update(tally.done)
        tally.wait_for(len(outcomes), options.timeout_s + 5)
    except KeyboardInterrupt:
        interrupted = True
        with contextlib.suppress(KeyboardInterrupt):
            tally.wait_for(len(outcomes), min(options.timeout_s, INTERRUPT_GRACE_S))
    wall_s = time.perf_counter() - start
    bar.update(tally.done, final=True)
    return StreamResult(outcomes, wall_s, _why_stopped(tally, interrupted, len(outcomes), len(requests)), interrupted)


def _request_inputs(inputs: dict[str, np.ndarray], request: ScheduledRequest, datatypes: dict[str, str],
                    send_mask: bool) -> list:
    """The request's present modalities; with ``send_mask``, every modality (zeros where absent) and the ``present``
    mask, so that the server can batch requests of every presence pattern together."""
    if not send_mask:
        return grpc_inputs({name: inputs[name][request.sample: request.sample + 1] for name in request.present},
                           datatypes)
    order = [name for name in datatypes if name != PRESENT]
    arrays = {name: (inputs[name][request.sample: request.sample + 1] if name in request.present
                     else np.zeros_like(inputs[name][:1])) for name in order}
    arrays[PRESENT] = np.array([[name in request.present for name in order]])
    return grpc_inputs(arrays, datatypes)


def _why_stopped(tally: _Tally, interrupted: bool, sent: int, scheduled: int) -> str | None:
    if interrupted:
        return f"interrupted (Ctrl-C); sent {sent} of {scheduled}"
    if tally.gave_up:
        return (f"stopped after {tally.max_failures} failed requests in a row (--max-failures {tally.max_failures}); "
                f"sent {sent} of {scheduled}")
    return None


class _Tally:
    """How many answers came back, and whether ``max_failures`` failed in a row (0: never give up)."""

    def __init__(self, max_failures: int):
        self.max_failures = max_failures
        self.done = self.failures_in_a_row = 0
        self.gave_up = False
        self._changed = threading.Condition()

    def add(self, failed: bool) -> None:
        with self._changed:
            self.done += 1
            self.failures_in_a_row = self.failures_in_a_row + 1 if failed else 0
            self.gave_up = self.gave_up or 0 < self.max_failures <= self.failures_in_a_row
            self._changed.notify_all()

    def wait_for(self, count: int, timeout_s: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.done >= count, timeout=timeout_s)


def _on_answer(outcome: Outcome, slots: threading.Semaphore, tally: _Tally) -> Callable[[Any, Any], None]:
    def callback(result: Any, error: Any) -> None:
        outcome.latency_s = time.perf_counter() - outcome.sent_s
        if error is not None:
            outcome.error = str(error)
        else:
            outcome.label = int(result.as_numpy("label").reshape(-1)[0])
        tally.add(failed=error is not None)  # before the slot frees: the sender checks gave_up after taking it
        slots.release()
    return callback


def _sleep_until(moment: float) -> None:
    delay = moment - time.perf_counter()
    if delay > 0:
        time.sleep(delay)
