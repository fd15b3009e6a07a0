"""ume-edge entry model for Triton's Python backend that runs the whole pipeline inside Triton's Python stub.

``python -m ume_edge.triton_repo --entry pipeline`` copies this file to ``<repository>/ume/1/model.py``, the request
contract beside it (``ume_contract.py``) and the engine directory to ``<repository>/ume/1/engines/``; Triton's Python
environment needs ``ume-edge`` installed. The requests of one batch are answered by a single ``Pipeline.infer``,
stacked with per-row presence masks (an absent modality is never computed); a bad request gets its own error response
naming the problem. Requests that carry the optional ``present`` mask (and every modality) share batches whatever
their presence pattern. Counters by presence pattern go to Triton's metrics endpoint (``ume_contract.EntryMetrics``).
"""

import json
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
import ume_contract as contract

from ume_edge.runtime import Pipeline
from ume_edge.serving.batching import Rejected, answer_checked, check_request


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        engines = Path(args["model_repository"]) / args["model_version"] / "engines"
        self.pipeline = Pipeline.load(engines, threads=int(parameters.get("threads", "0")) or None)
        self.names = self.pipeline.modality_names
        self.metrics = contract.EntryMetrics(pb_utils)

    def _arrays(self, request):
        tensors = {name: pb_utils.get_input_tensor_by_name(request, name) for name in [*self.names, contract.PRESENT]}
        return {name: tensor.as_numpy() for name, tensor in tensors.items() if tensor is not None}

    def execute(self, requests):
        started = time.perf_counter()
        checked = [check_request(self._arrays(request), self.pipeline) for request in requests]
        rows = sum(item.rows for item in checked if not isinstance(item, Rejected))
        answers = answer_checked(self.pipeline, checked)
        elapsed_us = (time.perf_counter() - started) * 1e6
        if rows:
            self.metrics.batch(rows)
        responses = []
        for item, answer in zip(checked, answers, strict=True):
            if isinstance(answer, Rejected):
                self.metrics.rejected(answer.reason)
                responses.append(contract.error_response(pb_utils, contract.ENTRY_MODEL, answer.message, answer.reason))
                continue
            self.metrics.answered(item.patterns(self.names), elapsed_us)
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in answer.items()]))
        return responses

    def finalize(self):
        self.metrics.close()
        self.pipeline.close()
