"""Triton model configurations (``config.pbtxt``, protobuf text format) written without a protobuf dependency: the
renderer, and the pieces the repository's models are configured from (tensors, batching and instance groups, string
parameters).
"""

from __future__ import annotations

import json

TRITON_DTYPES = {
    "float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64", "int64": "TYPE_INT64",
    "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL",
}


class Ident(str):
    """An enum value (``TYPE_FP32``, ``KIND_CPU``): written without quotes."""


def to_pbtxt(message: dict) -> str:
    return "\n".join(_message_lines(message, 0)) + "\n"


def _message_lines(message: dict, depth: int) -> list[str]:
    lines: list[str] = []
    for key, value in message.items():
        lines += _field_lines(key, value, depth)
    return lines


def _field_lines(key: str, value, depth: int) -> list[str]:
    pad = "  " * depth
    if isinstance(value, dict):
        return [f"{pad}{key} {{", *_message_lines(value, depth + 1), f"{pad}}}"]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        lines = [f"{pad}{key} ["]
        for index, item in enumerate(value):
            comma = "," if index < len(value) - 1 else ""
            lines += [f"{pad}  {{", *_message_lines(item, depth + 2), f"{pad}  }}{comma}"]
        return lines + [f"{pad}]"]
    if isinstance(value, list):
        return [f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]"]
    return [f"{pad}{key}: {_scalar(value)}"]


def _scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Ident):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # its escapes (\" \\ \n) are valid text-format escapes
    return str(value)


def string_parameters(values: dict[str, str]) -> list[dict]:
    """The ``parameters`` field, every value a string."""
    return [{"key": key, "value": {"string_value": value}} for key, value in values.items()]


def tensor(name: str, dtype: str, dims, optional: bool = False) -> dict:
    """An ``input`` or ``output`` entry; ``dtype`` as NumPy names it, ``dims`` without the batch dimension."""
    entry: dict[str, object] = {"name": name, "data_type": Ident(TRITON_DTYPES[dtype]), "dims": [int(d) for d in dims]}
    if optional:
        entry["optional"] = True
    return entry


def scheduling(max_batch: int, instances: int, kind: str, max_queue_delay_us: int,
               secondary_devices: tuple[dict, ...] = ()) -> dict:
    """Dynamic batching up to ``max_batch`` and one instance group of ``instances`` of ``kind``."""
    group = {"count": int(instances), "kind": Ident(kind)}
    if secondary_devices:
        group["secondary_devices"] = [{"kind": Ident(d["kind"]), "device_id": int(d["device_id"])}
                                      for d in secondary_devices]
    return {
        "max_batch_size": int(max_batch),
        "dynamic_batching": {"max_queue_delay_microseconds": int(max_queue_delay_us)},
        "instance_group": [group],
    }
