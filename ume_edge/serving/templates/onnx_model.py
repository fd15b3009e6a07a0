"""Run ``model.onnx`` with ONNX Runtime inside Triton's Python backend (for Tritons without the onnxruntime backend).

``python -m ume_edge.triton_repo --encoder-backend python`` copies this file next to each encoder's (and the
fusion's) ``model.onnx``, with the request contract beside it (``ume_contract.py``). Inputs and outputs are the ones
in ``config.pbtxt``. The requests of one batch are stacked into a single ``session.run`` and the outputs split back
per request; if that run fails, each request runs alone, so only the one that caused the failure gets an error.

A request is refused on its own, with the contract's text, when a float input holds NaN or Inf, an integer input
holds an id outside its valid range (never below 0), or, for the fusion, a ``present`` row holds anything but 0 and 1
or no 1 at all.

Parameters (``config.pbtxt``, all optional): ``intra_op_threads`` (default 0 = ONNX Runtime's choice, else 1 to the
machine's cores), ``allow_spinning`` ("0" or "1", default "0": many small sessions share the cores, so idle threads
should sleep) and ``value_ranges`` (JSON, input name -> ``[low, high)`` of the valid integer ids).
"""

import json
import os
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
import ume_contract as contract


def _threads(text):
    cores = os.cpu_count() or 1
    if not text.isdigit() or int(text) > cores:
        raise ValueError(f"parameter intra_op_threads={text!r}: give 0 (ONNX Runtime's choice) or 1 to {cores} "
                         "(the cores of this machine)")
    return int(text)


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = _threads(parameters.get("intra_op_threads", "0"))
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", parameters.get("allow_spinning", "0"))
        options.log_severity_level = 3
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.model_name = args["model_name"]
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [tensor["name"] for tensor in config["input"]]
        self.output_names = [tensor["name"] for tensor in config["output"]]
        value_ranges = json.loads(parameters.get("value_ranges", "{}"))
        self.specs = {tensor["name"]: contract.ModalitySpec(
            tensor["name"], tuple(tensor["dims"]), np.dtype(pb_utils.triton_string_to_numpy(tensor["data_type"])),
            None if tensor["name"] not in value_ranges else tuple(value_ranges[tensor["name"]]))
            for tensor in config["input"]}

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
        except Exception:  # answered below, request by request
            for index in valid:
                responses[index] = self._run_alone(feeds_per_request[index])
            return responses
        bounds = np.cumsum([0] + [len(feeds_per_request[i][self.input_names[0]]) for i in valid])
        for index, start, end in zip(valid, bounds[:-1], bounds[1:], strict=True):
            tensors = [pb_utils.Tensor(name, output[start:end])
                       for name, output in zip(self.output_names, outputs, strict=True)]
            responses[index] = pb_utils.InferenceResponse(tensors)
        return responses

    def _run_alone(self, feeds):
        try:
            outputs = self.session.run(self.output_names, feeds)
        except Exception as error:
            refused = contract.failed(error)
            return contract.error_response(pb_utils, self.model_name, str(refused), refused.reason)
        return pb_utils.InferenceResponse([pb_utils.Tensor(name, output)
                                           for name, output in zip(self.output_names, outputs, strict=True)])

    def _refusal(self, feeds):
        """An error response naming what is wrong with one request's inputs, else None."""
        try:
            for name, array in feeds.items():
                if name == contract.PRESENT:
                    contract.check_fusion_presence(array)
                else:
                    contract.check_values(self.specs[name], array)
        except contract.Refused as refused:
            return contract.error_response(pb_utils, self.model_name, str(refused), refused.reason)
        return None
