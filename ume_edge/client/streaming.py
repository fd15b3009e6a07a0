"""Send scheduled requests to a Triton server, or to its replicas, over gRPC (``tritonclient.grpc``),
asynchronously: at most ``concurrency`` in flight, every request limited to ``timeout_s`` (all its tries together),
a request whose replica is unavailable tried again on another (``replicas``), sending stopped after ``max_failures``
failed requests in a row (0: never) or on Ctrl-C, and an answer or an error recorded for every request sent."""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ume_edge.client.options import ClientOptions
from ume_edge.client.replicas import Replicas, is_retryable, resolve_replicas
from ume_edge.client.simulation import ScheduledRequest
from ume_edge.constants import PRESENT

LOGGER = logging.getLogger(__name__)

INTERRUPT_GRACE_S = 1.0  # after Ctrl-C, how long the requests in flight may still answer


@dataclass
class Outcome:
    """One request: sent first at ``sent_s`` (``time.perf_counter``), answered or failed ``latency_s`` later."""

    request: ScheduledRequest
    sent_s: float
    request_id: str = ""
    latency_s: float | None = None
    label: int | None = None
    error: str | None = None
    tries: list[str] = field(default_factory=list)  # the replicas tried in order; the last gave the answer or error
    first_failure_s: float | None = None  # when a replica first failed it (perf_counter)
    answer_id: str | None = None  # the request id the answer carries

    @property
    def answered(self) -> bool:
        return self.error is None and self.label is not None


@dataclass
class StreamResult:
    outcomes: list[Outcome]
    wall_s: float
    stopped: str | None = None  # why it stopped before sending every request
    interrupted: bool = False  # by Ctrl-C
    replicas: list[str] = field(default_factory=list)


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
    """Send ``requests`` (rows of ``inputs``) to ``options.model`` at ``options.url``'s replicas, paced by
    ``options.rate``."""
    replicas = Replicas(resolve_replicas(options.url))
    if len(replicas.addresses) > 1:
        LOGGER.info("%d replicas: %s", len(replicas.addresses), ", ".join(replicas.addresses))
    try:
        datatypes = {name: datatype for name, (datatype, _) in _model_metadata(replicas, options).items()}
        _check_model_takes(options, inputs, requests, datatypes)
        return _send_all(replicas, options, inputs, requests, datatypes)
    finally:
        replicas.close()


def model_input_specs(options: ClientOptions) -> dict[str, tuple[str, list[int]]]:
    """Input name -> (Triton datatype, shape with the batch axis first), from the server's model metadata."""
    replicas = Replicas(resolve_replicas(options.url))
    try:
        return _model_metadata(replicas, options)
    finally:
        replicas.close()


def _model_metadata(replicas: Replicas, options: ClientOptions) -> dict[str, tuple[str, list[int]]]:
    """From the first replica that is available."""
    metadata = replicas.call_any(lambda client: client.get_model_metadata(options.model, as_json=True,
                                                                          client_timeout=options.timeout_s))
    return {tensor["name"]: (tensor["datatype"], [int(size) for size in tensor["shape"]])
            for tensor in metadata["inputs"]}


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


def _send_all(replicas: Replicas, options: ClientOptions, inputs: dict[str, np.ndarray],
              requests: list[ScheduledRequest], datatypes: dict[str, str]) -> StreamResult:
    slots = threading.Semaphore(options.concurrency)
    tally = _Tally(options.max_failures)
    sender = _Sender(replicas, options, slots, tally)
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
            outcome = Outcome(request, time.perf_counter(), request_id=str(len(outcomes)))
            outcomes.append(outcome)
            sender.send(outcome, request_inputs)
            bar.update(tally.done)
        tally.wait_for(len(outcomes), options.timeout_s + 5)
    except KeyboardInterrupt:
        interrupted = True
        with contextlib.suppress(KeyboardInterrupt):
            tally.wait_for(len(outcomes), min(options.timeout_s, INTERRUPT_GRACE_S))
    wall_s = time.perf_counter() - start
    bar.update(tally.done, final=True)
    return StreamResult(outcomes, wall_s, _why_stopped(tally, interrupted, len(outcomes), len(requests)), interrupted,
                        replicas.addresses)


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


class _Sender:
    """Sends a request's tries, one at a time: a try that finds its replica unavailable is sent to a replica the
    request has not tried, while the request's ``timeout_s`` lasts; its answer, or its last error, is recorded once."""

    def __init__(self, replicas: Replicas, options: ClientOptions, slots: threading.Semaphore, tally: _Tally):
        import tritonclient.grpc as grpcclient

        self.replicas, self.model, self.timeout_s = replicas, options.model, options.timeout_s
        self.outputs = [grpcclient.InferRequestedOutput("label")]
        self.slots, self.tally = slots, tally

    def send(self, outcome: Outcome, request_inputs: list) -> None:
        address = self.replicas.pick(outcome.tries)
        assert address is not None, "send is called only while the request has a replica left to try"
        outcome.tries.append(address)
        budget_s = self.timeout_s - (time.perf_counter() - outcome.sent_s)
        self.replicas.clients[address].async_infer(
            self.model, request_inputs, functools.partial(self._on_answer, outcome, request_inputs),
            outputs=self.outputs, request_id=outcome.request_id, client_timeout=budget_s)

    def _on_answer(self, outcome: Outcome, request_inputs: list, result: Any, error: Any) -> None:
        now = time.perf_counter()
        if error is None:
            self.replicas.answered(outcome.tries[-1])
        elif is_retryable(error):
            self.replicas.failed(outcome.tries[-1])
            outcome.first_failure_s = outcome.first_failure_s or now
            if self._can_retry(outcome, now):
                self.send(outcome, request_inputs)
                return
        outcome.latency_s = now - outcome.sent_s
        if error is not None:
            outcome.error = str(error)
        else:
            outcome.label = int(result.as_numpy("label").reshape(-1)[0])
            outcome.answer_id = result.get_response().id
        self.tally.add(failed=error is not None)  # before the slot frees: the sender checks gave_up after taking it
        self.slots.release()

    def _can_retry(self, outcome: Outcome, now: float) -> bool:
        return len(outcome.tries) < len(self.replicas.addresses) and now - outcome.sent_s < self.timeout_s


def _sleep_until(moment: float) -> None:
    delay = moment - time.perf_counter()
    if delay > 0:
        time.sleep(delay)
