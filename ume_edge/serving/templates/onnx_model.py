"""Run ``model.onnx`` with ONNX Runtime inside Triton's Python backend (for Tritons without the onnxruntime backend).

``python -m ume_edge.triton_repo --encoder-backend python`` copies this file next to each encoder's (and the
fusion's) ``model.onnx``. Inputs and outputs are the ones in ``config.pbtxt``. The requests of one batch are
stacked into a single ``session.run`` and the outputs split back per request.

Parameters (``config.pbtxt``, all optional): ``intra_op_threads`` (default 0 = ONNX Runtime's choice) and
``allow_spinning`` ("0" or "1", default "0": many small sessions share the cores, so idle threads should sleep).
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = int(parameters.get("intra_op_threads", "0"))
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", parameters.get("allow_spinning", "0"))
        options.log_severity_level = 3
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.model_name = args["model_name"]
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [tensor["name"] for tensor in config["input"]]
        self.output_names = [tensor["name"] for tensor in config["output"]]

    def execute(self, requests):
        feeds_per_request = [
            {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.input_names}
            for request in requests
        ]
        responses = [self._refusal(feeds) for feeds in feeds_per_request]
        valid = [index for index, response in enumerate(responses) if response is None]
        if not valid:
            return responses
        stacked = {name: np.concatenate([feeds_per_request[i][name] for i in valid]) for name in self.input_names}
        try:
            outputs = self.session.run(self.output_names, stacked)
        except Exception as error:
            message = f"{self.model_name}: ONNX Runtime failed: {error}"
            for index in valid:
                responses[index] = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))
            return responses
        bounds = np.cumsum([0] + [len(feeds_per_request[i][self.input_names[0]]) for i in valid])
        for index, start, end in zip(valid, bounds[:-1], bounds[1:]):
            responses[index] = pb_utils.InferenceResponse(
                [pb_utils.Tensor(name, output[start:end]) for name, output in zip(self.output_names, outputs)])
        return responses

    def _refusal(self, feeds):
        """An error response for a request with non-finite float input, else None."""
        for name, array in feeds.items():
            if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
                message = (f"{self.model_name}: input {name!r} holds NaN or infinite values; send finite values, "
                           f"or leave {name!r} out if that sensor has no reading")
                return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))
        return None
