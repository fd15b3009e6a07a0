"""ume-edge entry model for Triton's Python backend that runs the whole pipeline inside Triton's Python stub.

``python -m ume_edge.triton_repo --entry pipeline`` copies this file to ``<repository>/ume/1/model.py`` and the
engine directory to ``<repository>/ume/1/engines/``; Triton's Python environment needs ``ume-edge`` installed.
The requests of one batch are answered by a single ``Pipeline.infer``, stacked with per-row presence masks (an
absent modality is never computed); a bad request gets its own error response naming the problem.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from ume_edge.runtime import Pipeline
from ume_edge.serve import Rejected, answer_requests


def _error(message):
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    error = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        engines = Path(args["model_repository"]) / args["model_version"] / "engines"
        self.pipeline = Pipeline.load(engines, threads=int(parameters.get("threads", "0")) or None)
        self.names = [spec.name for spec in self.pipeline.modalities]

    def execute(self, requests):
        inputs = []
        for request in requests:
            tensors = {name: pb_utils.get_input_tensor_by_name(request, name) for name in self.names}
            inputs.append({name: tensor.as_numpy() for name, tensor in tensors.items() if tensor is not None})
        responses = []
        for answer in answer_requests(self.pipeline, inputs):
            if isinstance(answer, Rejected):
                responses.append(_error(f"ume: {answer.message}"))
            else:
                responses.append(pb_utils.InferenceResponse(
                    [pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in answer.items()]))
        return responses
