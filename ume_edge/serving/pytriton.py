"""``serve --runtime pytriton``: the models as PyTriton callables in the serving process, through PyTriton's public API.

PyTriton has no per-request error: when a request of a batch cannot be answered, the whole batch fails with one
message that names each refused request (its position in the batch and why); the other requests of that batch get the
same error and may be sent again. The default runtime (``python-backend``) answers each request on its own. Presence
metrics are not served here (they need the Python backend's metrics API inside Triton's stub).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from typing import cast

import numpy as np

from ume_edge.constants import ENTRY_MODEL, LABEL, LOGITS, PARTIAL_LOGITS, PRESENT, PROBS, encoder_model_name
from ume_edge.errors import InputError
from ume_edge.serving.batching import Rejected, answer_encoder_requests, answer_requests
from ume_edge.serving.tritonserver import apply_pytriton_libpython_fix, make_temp_folder
from ume_edge.serving.watchdog import descendants

LOGGER = logging.getLogger(__name__)


def all_answers_or_refusal(answers: list[dict | Rejected]) -> list[dict]:
    """The outputs of a batch in which every request was answered, or ``InputError`` naming each refused one."""
    refused = [f"request {i + 1} of {len(answers)}: {a.message}" for i, a in enumerate(answers)
               if isinstance(a, Rejected)]
    if refused:
        raise InputError("this batch could not be answered; " + "; ".join(refused))
    return cast(list[dict], answers)


class EntryModel:
    """PyTriton callable of ``ume``."""

    def __init__(self, pipeline):
        self.pipeline = pipeline

    def __call__(self, requests) -> list[dict]:
        return all_answers_or_refusal(answer_requests(self.pipeline, [dict(request.data) for request in requests]))


class EncoderModel:
    """PyTriton callable of ``ume_<modality>``."""

    def __init__(self, pipeline, name: str):
        self.engine, self.name = pipeline.open_encoder(name), name

    def __call__(self, requests) -> list[dict]:
        arrays = [request.data[self.name] for request in requests]
        return all_answers_or_refusal(answer_encoder_requests(self.engine, self.name, PARTIAL_LOGITS, arrays))


def bind_models(triton, pipeline, max_queue_delay_us: int) -> list[str]:
    """Bind ``ume`` and one ``ume_<modality>`` per encoder; returns the model names."""
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

    config = ModelConfig(max_batch_size=pipeline.max_batch,
                         batcher=DynamicBatcher(max_queue_delay_microseconds=max_queue_delay_us))
    classes = pipeline.num_classes
    triton.bind(
        model_name=ENTRY_MODEL, infer_func=EntryModel(pipeline),
        inputs=[Tensor(name=s.name, shape=tuple(s.shape), dtype=np.dtype(s.dtype), optional=True)
                for s in pipeline.modalities]
        + [Tensor(name=PRESENT, shape=(len(pipeline.modalities),), dtype=np.bool_, optional=True)],
        outputs=[Tensor(name=LOGITS, shape=(classes,), dtype=np.float32),
                 Tensor(name=PROBS, shape=(classes,), dtype=np.float32),
                 Tensor(name=LABEL, shape=(1,), dtype=np.int64)],
        config=config,
    )
    for spec in pipeline.modalities:
        triton.bind(
            model_name=encoder_model_name(spec.name), infer_func=EncoderModel(pipeline, spec.name),
            inputs=[Tensor(name=spec.name, shape=tuple(spec.shape), dtype=np.dtype(spec.dtype))],
            outputs=[Tensor(name=PARTIAL_LOGITS, shape=(classes,), dtype=np.float32)],
            config=config,
        )
    return [ENTRY_MODEL] + [encoder_model_name(spec.name) for spec in pipeline.modalities]


def serve(options, stop: threading.Event, watchdog, announce) -> int:
    """Serve ``options.engines`` until ``stop`` is set; 0 on a clean stop."""
    apply_pytriton_libpython_fix()  # before pytriton starts tritonserver: its Python stub must load our libpython
    if not options.tensorstore:
        # Sensor-sized tensors travel faster base64-encoded than through PyTriton's shared-memory store
        # (measured here: batch-1 p50 2.1 ms instead of 2.9 ms). Read by PyTriton and by its proxy in the stub.
        os.environ["PYTRITON_NO_TENSORSTORE"] = "1"
    from pytriton.triton import Triton

    from ume_edge.runtime import Pipeline

    pipeline = Pipeline.load(options.engines, threads=options.threads)
    folder = make_temp_folder("pytriton")
    watchdog.watch_path(folder)
    workspace, log_file = folder / "workspace", options.log_file or folder / "tritonserver.log"
    arguments = options.server.pytriton_arguments(log_file=None if options.verbose else log_file)
    with Triton(**arguments, workspace=workspace) as triton:
        models = bind_models(triton, pipeline, options.server.max_queue_delay_us)
        triton.run()
        for child in descendants(os.getpid()):
            if child != watchdog.process.pid:
                watchdog.watch_tree(child)
        announce(models, log_file)
        while not stop.wait(0.5):
            if not triton.is_alive():
                LOGGER.error("error: tritonserver stopped unexpectedly; see %s", log_file)
                return 1
    pipeline.close()
    shutil.rmtree(folder, ignore_errors=True)
    return 0
