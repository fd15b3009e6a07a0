"""ume-edge entry model for Triton's Python backend (BLS): run only the encoders whose rows are present, then fuse.

``python -m ume_edge.triton_repo`` copies this file to ``<repository>/ume/1/model.py``, the request contract beside it
(``ume_contract.py``; numpy only, so ume-edge need not be installed) and writes the config: one ``optional: true``
input per modality and the optional ``present`` mask (bool ``[M]`` per row, with every modality), outputs
``logits``/``probs`` (float32 [C]) and ``label`` (int64 [1]), and parameters naming the modality order, the encoder
models and the fusion model, and (optional) ``value_ranges``: JSON, modality -> ``[low, high)`` of its valid integer
ids, and ``encoder_fixed_batch``: JSON, modality -> the one batch its engine runs (a DLA plan).

One ``execute`` call receives the requests the dynamic batcher grouped. A request the contract refuses gets its own
error response; the rest are stacked: each modality's present rows go to its encoder in one call (concurrently, with
``async_exec``), an absent modality's encoder is never called, and the fusion runs once on the ``[B, M, C]`` partial
logits and the ``[B, M]`` presence mask. If that fails, each request runs alone, so only its culprit gets the error.
The counters by presence pattern are those of the pipeline entry (``ume_contract.EntryMetrics``).
"""

import asyncio
import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils
import ume_contract as contract


def _cpu_outputs():
    """Ask BLS for outputs in CPU memory (TensorRT encoders would otherwise answer in GPU memory)."""
    if hasattr(pb_utils, "PreferredMemory"):
        return {"preferred_memory": pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)}
    return {}


def _response(outputs):
    return pb_utils.InferenceResponse([pb_utils.Tensor(name, value) for name, value in outputs.items()])


def _specs(config, names, value_ranges):
    specs = []
    for name in names:
        tensor = pb_utils.get_input_config_by_name(config, name)
        value_range = value_ranges.get(name)
        specs.append(contract.ModalitySpec(name, tuple(int(d) for d in tensor["dims"]),
                                           np.dtype(pb_utils.triton_string_to_numpy(tensor["data_type"])),
                                           None if value_range is None else tuple(value_range)))
    return specs


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
        self.num_classes = int(pb_utils.get_output_config_by_name(config, contract.LOGITS)["dims"][0])
        self.specs = _specs(config, self.modalities, json.loads(parameters.get("value_ranges", "{}")))
        self.memory = _cpu_outputs()
        self.metrics = contract.EntryMetrics(pb_utils)

    async def execute(self, requests):
        started = time.perf_counter()
        checked = [self._check(request) for request in requests]
        good = [index for index, item in enumerate(checked) if isinstance(item, contract.Request)]
        answers = list(checked)
        if good:
            self.metrics.batch(sum(checked[index].rows for index in good))
            try:
                results = await self._infer([checked[index] for index in good])
            except Exception:  # an encoder or the fusion failed on some rows: find whose, request by request
                results = [await self._answer_alone(checked[index]) for index in good]
            for index, result in zip(good, results, strict=True):
                answers[index] = result
        elapsed_us = (time.perf_counter() - started) * 1e6
        return [self._respond(item, answer, elapsed_us) for item, answer in zip(checked, answers, strict=True)]

    def _check(self, request):
        arrays = {}
        for name in [*self.modalities, contract.PRESENT]:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                arrays[name] = tensor.as_numpy()
        try:
            return contract.check_request(arrays, self.specs, self.max_batch)
        except contract.Refused as refused:
            return refused

    def _respond(self, item, answer, elapsed_us):
        if isinstance(answer, contract.Refused):
            self.metrics.rejected(answer.reason)
            return contract.error_response(pb_utils, contract.ENTRY_MODEL, str(answer), answer.reason)
        self.metrics.answered(item.patterns(self.modalities), elapsed_us)
        return _response(answer)

    async def _answer_alone(self, request):
        try:
            return (await self._infer([request]))[0]
        except Exception as error:
            return contract.failed(error)

    async def _infer(self, batch):
        offsets = np.concatenate([[0], np.cumsum([request.rows for request in batch])])
        present = np.concatenate([request.mask for request in batch])
        partial = np.zeros((len(present), len(self.modalities), self.num_classes), np.float32)
        stacked = {name: np.concatenate([request.arrays[name][request.mask[:, index]] for request in batch
                                         if name in request.arrays])
                   for index, name in enumerate(self.modalities) if present[:, index].any()}
        outputs = await asyncio.gather(*(self._encode(name, rows) for name, rows in stacked.items()))
        for name, partial_logits in zip(stacked, outputs, strict=True):
            index = self.modalities.index(name)
            partial[present[:, index], index] = partial_logits  # an absent modality's encoder is never called
        fused = await self._call(self.fusion_model, {"partial_logits": partial, contract.PRESENT: present.astype(
            np.float32)}, [contract.LOGITS, contract.PROBS])
        logits, probs = fused[contract.LOGITS], fused[contract.PROBS]
        labels = np.argmax(logits, axis=1).astype(np.int64)[:, None]
        return [{contract.LOGITS: logits[a:b], contract.PROBS: probs[a:b], contract.LABEL: labels[a:b]}
                for a, b in zip(offsets[:-1], offsets[1:], strict=True)]

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

    def finalize(self):
        self.metrics.close()
