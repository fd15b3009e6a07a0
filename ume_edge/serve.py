"""Serve an engine directory over Triton's gRPC/HTTP API.

    python -m ume_edge.serve [--engines DIR] [--grpc-port 8001] [--http-port 8000] [--metrics-port 8002]

Models:

* ``ume``: one optional input per modality (names, shapes and dtypes from the manifest); outputs ``logits`` and
  ``probs`` (float32 ``[batch, C]``) and ``label`` (int64 ``[batch, 1]``).
* ``ume_<modality>``: that modality's encoder alone; input ``<modality>``, output ``partial_logits``.

Dynamic batching is on. ``ume`` answers the requests of one batch with a single ``Pipeline.infer``: requests are
stacked with per-row presence masks, so requests with different presence patterns could share it, and an absent
modality is never computed. (Triton's dynamic batcher itself only groups requests that carry the same set of
inputs, i.e. the same presence pattern, when a model has optional inputs.)

A bad request gets an error response of its own that names the problem, while the other requests of its batch are
answered. Triton itself turns away unknown inputs, wrong shapes or dtypes, a batch above the maximum and a request
with no input at all; what only the model can see (NaN, ...) is found here.

Two runtimes, both the tritonserver that the nvidia-pytriton wheel ships:

* ``--runtime pytriton`` (default): PyTriton binds the models as Python callables in this process. PyTriton 0.7
  has no per-request error (an exception fails the whole batch), so ``install_per_request_errors`` extends the
  small proxy module PyTriton hands to Triton's Python backend: a response carrying ``ERROR_OUTPUT`` becomes a
  Triton error for that request only.
* ``--runtime python-backend``: a generated repository of Triton Python-backend models (``python -m
  ume_edge.triton_repo --entry pipeline --encoder-backend python``) on the standalone tritonserver. The pipeline
  runs inside Triton's own Python stub, without PyTriton's extra process hop: lower latency.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ume_edge.errors import InputError
from ume_edge import engine_dir
from ume_edge.constants import ENTRY_MODEL, PARTIAL_LOGITS, encoder_model_name
from ume_edge.serving.repository import write_repository
from ume_edge.tritonserver import ServerProcess, TritonServer, apply_pytriton_libpython_fix

LOGGER = logging.getLogger("ume_edge.serve")
RUNTIMES = ("pytriton", "python-backend")
DEFAULT_MAX_QUEUE_DELAY_US = 0  # measured here: any delay only adds latency at low load; queued requests still batch
ERROR_OUTPUT = "__ume_error__"
READY_LINE = "  stop with Ctrl-C (SIGINT) or SIGTERM"  # the banner's last line: serving has started


# ---------------------------------------------------------------------------------------------------------------
# answering a batch of requests (shared by both runtimes)


@dataclass
class Rejected:
    """A request that gets an error response instead of outputs."""

    message: str


def answer_requests(pipeline, requests: list[dict[str, np.ndarray]]) -> list[dict | Rejected]:
    """Outputs (or the reason for refusing) for each request of one batch, with one ``Pipeline.infer`` call.

    Each request maps the present modalities to arrays. The valid requests are stacked, with a presence mask per
    row; if the pipeline still refuses the stack (a value problem such as NaN), each request is answered alone so
    the error lands on the request that caused it.
    """
    names = [spec.name for spec in pipeline.modalities]
    checked = [_check_request(request, names) for request in requests]
    valid = [i for i, item in enumerate(checked) if not isinstance(item, Rejected)]
    answers: list = list(checked)
    for index, answer in zip(valid, _answer_valid(pipeline, [requests[i] for i in valid])):
        answers[index] = answer
    return answers


def _check_request(request: dict, names: list[str]) -> Rejected | None:
    unknown = sorted(set(request) - set(names))
    if unknown:
        return Rejected(f"unknown input {unknown[0]!r}; the inputs are {', '.join(names)}")
    if not request:
        return Rejected(f"no modality present; send at least one of {', '.join(names)}")
    return None


def _answer_valid(pipeline, batch: list[dict]) -> list[dict | Rejected]:
    if not batch:
        return []
    try:
        return _infer_stacked(pipeline, batch)
    except InputError as error:
        if len(batch) == 1:
            return [Rejected(str(error))]
        return [_answer_valid(pipeline, [request])[0] for request in batch]


def _infer_stacked(pipeline, batch: list[dict]) -> list[dict]:
    bounds = np.cumsum([0] + [len(next(iter(request.values()))) for request in batch])
    inputs, present = {}, {}
    for spec in pipeline.modalities:
        members = [i for i, request in enumerate(batch) if spec.name in request]
        if not members:
            inputs[spec.name] = None  # absent from the whole batch: its encoder does not run
            continue
        inputs[spec.name] = _stack(spec.name, batch, members, bounds)
        present[spec.name] = np.zeros(bounds[-1], bool)
        for i in members:
            present[spec.name][bounds[i]:bounds[i + 1]] = True
    result = pipeline.infer(inputs, present=present)
    labels = result.labels.astype(np.int64).reshape(-1, 1)
    return [{"logits": result.logits[a:b], "probs": result.probs[a:b], "label": labels[a:b]}
            for a, b in zip(bounds[:-1], bounds[1:])]


def _stack(name: str, batch: list[dict], members: list[int], bounds: np.ndarray) -> np.ndarray:
    """The modality's rows at their batch positions; rows of requests without it stay zero (and masked out)."""
    if len(members) == len(batch) == 1:
        return batch[0][name]
    if len(members) == len(batch):
        return np.concatenate([request[name] for request in batch])
    first = batch[members[0]][name]
    stacked = np.zeros((bounds[-1], *first.shape[1:]), first.dtype)
    for i in members:
        stacked[bounds[i]:bounds[i + 1]] = batch[i][name]
    return stacked


def answer_encoder_requests(engine, name: str, input_name: str, output_name: str,
                            arrays: list[np.ndarray]) -> list[dict | Rejected]:
    """``partial_logits`` of one modality's engine for each request; non-finite input is refused per request."""
    answers: list = [None] * len(arrays)
    valid = []
    for index, array in enumerate(arrays):
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            answers[index] = Rejected(f"input {name!r} holds NaN or infinite values; send finite values, or leave "
                                      f"{name!r} out if that sensor has no reading")
        else:
            valid.append(index)
    if valid:
        logits = engine.infer({input_name: np.concatenate([arrays[i] for i in valid])})[output_name]
        bounds = np.cumsum([0] + [len(arrays[i]) for i in valid])
        for index, a, b in zip(valid, bounds[:-1], bounds[1:]):
            answers[index] = {"partial_logits": logits[a:b]}
    return answers


# ---------------------------------------------------------------------------------------------------------------
# runtime 1: PyTriton

_PROXY_ERROR_HOOK = f'''

# --- appended by ume_edge.serve: a response carrying "{ERROR_OUTPUT}" becomes that request's own error ---
_pytriton_wrap_response = _wrap_response


def _wrap_response(response, requested_outputs_names, model_outputs_dict):
    if response.data is not None and "{ERROR_OUTPUT}" in response.data:
        message = response.data["{ERROR_OUTPUT}"].reshape(-1)[0]
        message = message.decode("utf-8", "replace") if isinstance(message, bytes) else str(message)
        code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
        error = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
        return pb_utils.InferenceResponse(output_tensors=[], error=error)
    return _pytriton_wrap_response(response, requested_outputs_names, model_outputs_dict)
'''


def install_per_request_errors() -> bool:
    """Teach PyTriton's proxy model to answer one request of a batch with an error. False if this PyTriton differs."""
    import pytriton
    from pytriton.models.model import Model

    original = getattr(Model, "get_proxy_model_files", None)
    proxy_source = Path(pytriton.__file__).parent / "proxy" / "model.py"
    if original is None or "def _wrap_response(" not in proxy_source.read_text():
        return False
    if getattr(original, "_ume_error_hook", False):
        return True

    def get_proxy_model_files(self):
        files = original(self)
        key = f"file:{self.model_version}/model.py"
        if key in files:
            files[key] = files[key] + _PROXY_ERROR_HOOK.encode()
        return files

    get_proxy_model_files._ume_error_hook = True
    Model.get_proxy_model_files = get_proxy_model_files
    return True


def _to_pytriton(answers: list[dict | Rejected], per_request_errors: bool) -> list[dict]:
    rejected = [answer.message for answer in answers if isinstance(answer, Rejected)]
    if rejected and not per_request_errors:
        raise InputError("; ".join(rejected))  # without the proxy hook the whole batch fails, naming the problems
    return [{ERROR_OUTPUT: np.array([a.message.encode("utf-8")])} if isinstance(a, Rejected) else a for a in answers]


class EntryModel:
    """PyTriton callable of ``ume``."""

    def __init__(self, pipeline, per_request_errors: bool = True):
        self.pipeline, self.per_request_errors = pipeline, per_request_errors

    def __call__(self, requests) -> list[dict]:
        return _to_pytriton(answer_requests(self.pipeline, [dict(r.data) for r in requests]), self.per_request_errors)


class EncoderModel:
    """PyTriton callable of ``ume_<modality>``."""

    def __init__(self, pipeline, name: str, per_request_errors: bool = True):
        self.engine = pipeline.open_encoder(name)
        self.name, self.input_name, self.output_name = name, name, PARTIAL_LOGITS
        self.per_request_errors = per_request_errors

    def __call__(self, requests) -> list[dict]:
        arrays = [request.data[self.name] for request in requests]
        answers = answer_encoder_requests(self.engine, self.name, self.input_name, self.output_name, arrays)
        return _to_pytriton(answers, self.per_request_errors)


def bind_models(triton, pipeline, max_queue_delay_us: int, per_request_errors: bool) -> list[str]:
    """Bind ``ume`` and one ``ume_<modality>`` per encoder; returns the model names."""
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

    config = ModelConfig(max_batch_size=pipeline.max_batch,
                         batcher=DynamicBatcher(max_queue_delay_microseconds=max_queue_delay_us))
    classes = pipeline.num_classes
    triton.bind(
        model_name=ENTRY_MODEL,
        infer_func=EntryModel(pipeline, per_request_errors),
        inputs=[Tensor(name=s.name, shape=tuple(s.shape), dtype=np.dtype(s.dtype), optional=True)
                for s in pipeline.modalities],
        outputs=[Tensor(name="logits", shape=(classes,), dtype=np.float32),
                 Tensor(name="probs", shape=(classes,), dtype=np.float32),
                 Tensor(name="label", shape=(1,), dtype=np.int64)],
        config=config,
    )
    for spec in pipeline.modalities:
        triton.bind(
            model_name=encoder_model_name(spec.name),
            infer_func=EncoderModel(pipeline, spec.name, per_request_errors),
            inputs=[Tensor(name=spec.name, shape=tuple(spec.shape), dtype=np.dtype(spec.dtype))],
            outputs=[Tensor(name="partial_logits", shape=(classes,), dtype=np.float32)],
            config=config,
        )
    return [ENTRY_MODEL] + [encoder_model_name(spec.name) for spec in pipeline.modalities]


@dataclass
class ServeOptions:
    engines: Path
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US
    threads: int | None = None
    runtime: str = "pytriton"
    tensorstore: bool = False


def serve_pytriton(options: ServeOptions, stop: threading.Event) -> int:
    apply_pytriton_libpython_fix()  # before pytriton starts tritonserver: its Python stub must load our libpython
    if not options.tensorstore:
        # Sensor-sized tensors travel faster base64-encoded than through PyTriton's shared-memory store
        # (measured here: batch-1 p50 2.1 ms instead of 2.9 ms). Read by PyTriton and by its proxy in the stub.
        os.environ["PYTRITON_NO_TENSORSTORE"] = "1"
    from pytriton.triton import Triton, TritonConfig

    from ume_edge.runtime import Pipeline

    pipeline = Pipeline.load(options.engines, threads=options.threads)
    per_request_errors = install_per_request_errors()
    if not per_request_errors:
        LOGGER.warning("this PyTriton cannot answer one request of a batch with an error; a bad request will fail "
                       "the batch it shares")
    config = TritonConfig(grpc_port=options.grpc_port, http_port=options.http_port,
                          metrics_port=options.metrics_port, log_verbose=0)
    with Triton(config=config) as triton:
        models = bind_models(triton, pipeline, options.max_queue_delay_us, per_request_errors)
        triton.run()
        print(_banner(options, models), flush=True)
        while not stop.wait(0.5):
            if not triton.is_alive():
                print("error: tritonserver stopped unexpectedly; see its log above", file=sys.stderr)
                return 1
    return 0


# ---------------------------------------------------------------------------------------------------------------
# runtime 2: generated Python-backend models on the standalone tritonserver


def serve_python_backend(options: ServeOptions, stop: threading.Event) -> int:
    with tempfile.TemporaryDirectory(prefix="ume-edge-models-") as repository:
        written = write_repository(options.engines, repository, encoder_backend="python", entry="pipeline",
                                   max_queue_delay_us=options.max_queue_delay_us, threads=options.threads)
        server = TritonServer(repository, grpc_port=options.grpc_port, http_port=options.http_port,
                              metrics_port=options.metrics_port)
        with server:
            print(_banner(options, [path.name for path in written]) + f"\n  log      {server.log_path}", flush=True)
            while not stop.wait(0.5):
                if server.process.poll() is not None:
                    print(f"error: tritonserver exited ({server.process.returncode}):\n{server.log_tail()}",
                          file=sys.stderr)
                    return 1
    return 0


def serve(options: ServeOptions, stop: threading.Event | None = None) -> int:
    """Run until ``stop`` is set (SIGINT/SIGTERM in ``main``) or the server dies; 0 on a clean stop."""
    stop = stop or threading.Event()
    run = serve_pytriton if options.runtime == "pytriton" else serve_python_backend
    code = run(options, stop)
    if code == 0:
        print("ume-edge serve: stopped", flush=True)
    return code


def _banner(options: ServeOptions, models: list[str]) -> str:
    return "\n".join([
        f"ume-edge serving {options.engines} ({options.runtime})",
        f"  gRPC     localhost:{options.grpc_port}",
        f"  HTTP     http://localhost:{options.http_port}",
        f"  metrics  http://localhost:{options.metrics_port}/metrics",
        f"  models   {', '.join(models)}",
        READY_LINE,
    ])


# ---------------------------------------------------------------------------------------------------------------
# as a child process (tests, benchmarks) and the command line


class ServeProcess(ServerProcess):
    """``python -m ume_edge.serve`` as a child process, ready once every model is (for tests and benchmarks).

    >>> with ServeProcess("engines/avdigits-int8-onnxruntime", grpc_port=8001) as server:
    ...     server.grpc_url
    """

    name = "ume-edge-serve"

    def __init__(self, engines: str | os.PathLike, *, grpc_port: int = 8001, http_port: int = 8000,
                 metrics_port: int = 8002, runtime: str = "pytriton",
                 max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US, extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None, keep_log: bool = False):
        super().__init__(grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port, keep_log=keep_log)
        self.engines, self.runtime = Path(engines), runtime
        self.max_queue_delay_us = max_queue_delay_us
        self.extra_args = list(extra_args or [])
        self.env = env

    def command(self) -> list[str]:
        return [sys.executable, "-m", "ume_edge.serve", "--engines", str(self.engines), "--runtime", self.runtime,
                "--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port),
                "--metrics-port", str(self.metrics_port), "--max-queue-delay-us", str(self.max_queue_delay_us),
                *self.extra_args]

    def environment(self) -> dict[str, str]:
        return {**os.environ, **(self.env or {})}

    def ready_paths(self) -> list[str]:
        manifest = engine_dir.read_manifest(self.engines)
        models = [ENTRY_MODEL] + [encoder_model_name(name) for name in manifest.modality_names]
        return [f"/v2/models/{name}/ready" for name in models]

    def is_ready(self) -> bool:
        return super().is_ready() and READY_LINE in self.log()

    def stop(self, signum: int = signal.SIGTERM, timeout_s: float = 60.0) -> int | None:
        return super().stop(signum, timeout_s)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ume_edge.serve",
        description="Serve an engine directory over Triton's gRPC/HTTP API: model 'ume' (one optional input per "
                    "modality; outputs logits, probs, label) and one 'ume_<modality>' model per encoder, with "
                    "dynamic batching.",
    )
    parser.add_argument("--engines", type=Path, default=None,
                        help="engine directory (default: the reference INT8 build, built first if missing)")
    parser.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001)")
    parser.add_argument("--http-port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (default 8002)")
    parser.add_argument("--max-queue-delay-us", type=int, default=DEFAULT_MAX_QUEUE_DELAY_US,
                        help="how long the dynamic batcher may hold a request to grow a batch, in microseconds "
                             f"(default {DEFAULT_MAX_QUEUE_DELAY_US}: requests queued meanwhile are batched anyway)")
    parser.add_argument("--runtime", choices=RUNTIMES, default="pytriton",
                        help="pytriton: models are PyTriton callables in this process (default); python-backend: "
                             "generated Triton Python-backend models, lower latency")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: all cores)")
    parser.add_argument("--tensorstore", action="store_true",
                        help="pytriton runtime: pass tensors through PyTriton's shared-memory store (faster for "
                             "large tensors, slower for sensor-sized ones)")
    return parser.parse_args(argv)


def _default_engines() -> Path:
    from ume_edge.build import ensure_default_engines

    return Path(ensure_default_engines())


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=os.environ.get("UME_EDGE_LOG", "WARNING"))
    engines = args.engines or _default_engines()
    if not (engines / "manifest.json").is_file():
        print(f"error: {engines} is not an engine directory (no manifest.json); build one with "
              "python -m ume_edge.build", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    options = ServeOptions(engines=engines, grpc_port=args.grpc_port, http_port=args.http_port,
                           metrics_port=args.metrics_port, max_queue_delay_us=args.max_queue_delay_us,
                           threads=args.threads, runtime=args.runtime, tensorstore=args.tensorstore)
    return serve(options, stop)


if __name__ == "__main__":
    sys.exit(main())
