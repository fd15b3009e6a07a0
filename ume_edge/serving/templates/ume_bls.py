"""ume-edge entry model for Triton's Python backend (BLS): run only the encoders whose inputs are present, then fuse.

``python -m ume_edge.triton_repo`` copies this file to ``<repository>/ume/1/model.py`` and writes the config:
one ``optional: true`` input per modality, outputs ``logits``/``probs`` (float32 [C]) and ``label`` (int64 [1]),
and parameters naming the modality order, the encoder models and the fusion model, and (optional) ``value_ranges``:
JSON, modality -> ``[low, high)`` of its valid integer ids (ids below 0 are refused without it).

One ``execute`` call receives the requests the dynamic batcher grouped. Bad requests get their own error
response (NaN or Inf, ids outside the valid range, wrong sizes); the rest are stacked: each modality's present rows go to its encoder in one call (concurrently, with
``async_exec``), an absent modality's encoder is never called, and the fusion runs once on the ``[B, M, C]`` partial
logits and the ``[B, M]`` presence mask. If that fails, each request runs alone, so only its culprit gets the error.
"""

import asyncio
import json

import numpy as np
import triton_python_backend_utils as pb_utils


class BadRequest(ValueError):
    """The client sent something this model cannot answer; the message says what and how to fix it."""


def _error(message, invalid_argument=False):
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None) if invalid_argument else None
    error = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


def _cpu_outputs():
    """Ask BLS for outputs in CPU memory (TensorRT encoders would otherwise answer in GPU memory)."""
    if hasattr(pb_utils, "PreferredMemory"):
        return {"preferred_memory": pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)}
    return {}


def _response(outputs):
    return pb_utils.InferenceResponse([pb_utils.Tensor(name, value) for name, value in outputs.items()])


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.modalities = json.loads(parameters["modality_order"])
        self.encoder_models = json.loads(parameters["encoder_models"])
        self.encoder_output = parameters["encoder_output"]
        self.fixed_batch = json.loads(parameters.get("encoder_fixed_batch", "{}"))
        self.fusion_model = parameters["fusion_model"]
        self.max_batch = int(config["max_batch_size"])
        self.num_classes = int(pb_utils.get_output_config_by_name(config, "logits")["dims"][0])
        self.dtypes = {name: pb_utils.triton_string_to_numpy(pb_utils.get_input_config_by_name(
            config, name)["data_type"]) for name in self.modalities}
        self.memory = _cpu_outputs()
        self.value_ranges = json.loads(parameters.get("value_ranges", "{}"))

    async def execute(self, requests):
        parsed = [self._parse_or_error(request) for request in requests]
        good = [index for index, item in enumerate(parsed) if isinstance(item, dict)]
        responses = [item if not isinstance(item, dict) else None for item in parsed]
        if not good:
            return responses
        try:
            results = await self._infer([parsed[index] for index in good])
        except Exception:  # an encoder or the fusion failed on some rows: find whose, request by request
            for index in good:
                responses[index] = await self._answer_alone(parsed[index])
            return responses
        for index, result in zip(good, results):
            responses[index] = _response(result)
        return responses

    async def _answer_alone(self, request):
        try:
            return _response((await self._infer([request]))[0])
        except Exception as error:
            return _error(f"ume: inference failed: {error}")

    # -- validation ----------------------------------------------------------------------------------------

    def _parse_or_error(self, request):
        try:
            return self._parse(request)
        except BadRequest as error:
            return _error(f"ume: {error}", invalid_argument=True)

    def _parse(self, request):
        """{modality: array} for the present modalities of one request, or BadRequest naming the problem."""
        present = {}
        for name in self.modalities:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                present[name] = self._check(name, tensor.as_numpy())
        if not present:
            raise BadRequest(f"no modality present; send at least one of the inputs {', '.join(self.modalities)}")
        sizes = {name: array.shape[0] for name, array in present.items()}
        if len(set(sizes.values())) > 1:
            raise BadRequest(f"inputs disagree on the batch size ({sizes}); send the same number of rows for each")
        return present

    def _check(self, name, array):
        if array.ndim == 0 or array.shape[0] == 0:
            raise BadRequest(f"input {name!r} has no rows (shape {list(array.shape)}); leave it out instead")
        if array.shape[0] > self.max_batch:
            raise BadRequest(f"input {name!r} has {array.shape[0]} rows, above the maximum batch {self.max_batch}; "
                             "split the request")
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            bad_rows = np.flatnonzero(~np.isfinite(array.reshape(array.shape[0], -1)).all(axis=1))
            raise BadRequest(f"input {name!r} holds NaN or infinite values (rows {bad_rows[:8].tolist()}); "
                             f"send finite values, or leave {name!r} out if that sensor has no reading")
        if np.issubdtype(array.dtype, np.integer):
            self._check_ids(name, array)
        return array

    def _check_ids(self, name, array):
        low, high = self.value_ranges.get(name, (0, None))
        outside = (array < low) if high is None else (array < low) | (array >= high)
        if outside.any():
            rows = np.flatnonzero(outside.reshape(array.shape[0], -1).any(axis=1))
            valid = f"[{low}, {high})" if high is not None else f"{low} or more"
            raise BadRequest(f"input {name!r}: value {array[outside][0]} (rows {rows[:8].tolist()}) is outside the "
                             f"valid ids {valid}; send ids the model was trained with")

    # -- inference -----------------------------------------------------------------------------------------

    async def _infer(self, batch):
        sizes = [next(iter(request.values())).shape[0] for request in batch]
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        total = int(offsets[-1])
        partial = np.zeros((total, len(self.modalities), self.num_classes), np.float32)
        present = np.zeros((total, len(self.modalities)), np.float32)
        rows_by_modality = {}
        for index, name in enumerate(self.modalities):
            members = [i for i, request in enumerate(batch) if name in request]
            if members:  # an absent modality's encoder is never called
                rows = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in members])
                rows_by_modality[name] = (index, rows, np.concatenate([batch[i][name] for i in members]))
        outputs = await asyncio.gather(*(self._encode(name, stacked) for name, (_, _, stacked)
                                         in rows_by_modality.items()))
        for (index, rows, _), partial_logits in zip(rows_by_modality.values(), outputs):
            partial[rows, index] = partial_logits
            present[rows, index] = 1.0
        fused = await self._call(self.fusion_model, {"partial_logits": partial, "present": present},
                                 ["logits", "probs"])
        labels = np.argmax(fused["logits"], axis=1).astype(np.int64)[:, None]
        return [{"logits": fused["logits"][a:b], "probs": fused["probs"][a:b], "label": labels[a:b]}
                for a, b in zip(offsets[:-1], offsets[1:])]

    async def _encode(self, name, stacked):
        """The encoder's partial logits for ``stacked``; an encoder that runs one fixed batch only (a DLA plan) gets
        the rows padded with zeros to it, and only the real rows are kept."""
        rows, fixed = len(stacked), self.fixed_batch.get(name)
        if fixed is not None and rows < fixed:
            stacked = np.concatenate([stacked, np.zeros((fixed - rows, *stacked.shape[1:]), stacked.dtype)])
        result = await self._call(self.encoder_models[name], {name: stacked}, [self.encoder_output])
        return result[self.encoder_output][:rows]

    async def _call(self, model_name, inputs, output_names):
        request = pb_utils.InferenceRequest(
            model_name=model_name,
            inputs=[pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in inputs.items()],
            requested_output_names=output_names,
            **self.memory,
        )
        response = await request.async_exec()
        if response.has_error():
            raise RuntimeError(f"model {model_name!r} answered: {response.error().message()}")
        return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy().copy() for name in output_names}
