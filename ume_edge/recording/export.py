"""Write a data set as a robot's recording, with the real writers: an MCAP file (``mcap-ros2-support``'s writer) or a
rosbag2 folder in MCAP or sqlite3 storage (``rosbags``' writer).

    python -m ume_edge.data.avdigits --export-recording avdigits.mcap --samples 200 --drop image=0.2,audio=0.2

Sample ``i`` is stamped ``START_S + i * period_s``. A ``[1, H, W]`` image modality becomes a
``sensor_msgs/msg/Image`` in 32FC1 holding the exact float values, so it decodes to the model's input as is;
every other modality becomes a ``std_msgs/msg/Float32MultiArray`` whose layout gives the array's shape. Each
reading is left out with its ``drop`` probability, and is logged a few milliseconds after its stamp (uniform in
``[0, MAX_DELAY_S)``, as a sensor's message reaches the recorder). The label of every sample is a
``std_msgs/msg/Int32`` on ``LABEL_TOPIC``, logged at the sample's stamp. Topics are ``/<modality>``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ume_edge.recording.reader import RecordingError, require

FORMATS = ("mcap", "rosbag2-mcap", "rosbag2-sqlite3")
LABEL_TOPIC = "/label"
START_S = 1_700_000_000  # a plausible ROS time, so that stamps are as large as a robot's
DEFAULT_PERIOD_S = 0.1
MAX_DELAY_S = 0.01
IMAGE_TYPE, ARRAY_TYPE, LABEL_TYPE = "sensor_msgs/msg/Image", "std_msgs/msg/Float32MultiArray", "std_msgs/msg/Int32"


def topic_for(modality: str) -> str:
    return f"/{modality}"


def export_recording(path: str | Path, inputs: dict[str, np.ndarray], labels: np.ndarray | None, fmt: str = "mcap",
                     drop: dict[str, float] | None = None, seed: int = 0,
                     period_s: float = DEFAULT_PERIOD_S) -> dict[str, np.ndarray]:
    """Write the samples of ``inputs`` (and ``labels``) as a recording; returns, per modality, which samples have a
    reading in it."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    drop = dict(drop or {})
    unknown = sorted(set(drop) - set(inputs))
    if unknown:
        raise ValueError(f"--drop names {unknown[0]!r}; the modalities are {', '.join(inputs)}")
    if any(not 0.0 <= p < 1.0 for p in drop.values()):
        raise ValueError(f"--drop probabilities must be in [0, 1), got {drop}")
    path = Path(path)
    if path.exists():
        raise ValueError(f"{path} exists; choose a new path for the recording")
    rng = np.random.default_rng(seed)
    samples = len(next(iter(inputs.values())))
    kept = {name: rng.random(samples) >= drop.get(name, 0.0) for name in inputs}
    delays = {name: rng.uniform(0.0, MAX_DELAY_S, samples) for name in inputs}
    events = sorted(_events(inputs, labels, kept, delays, period_s), key=lambda event: event[0])
    typestore = require("rosbags.typesys").get_typestore(require("rosbags.typesys").Stores.LATEST)
    write = _write_mcap if fmt == "mcap" else _write_rosbag2
    write(path, fmt, typestore, _topic_types(inputs, labels), events)
    return kept


def _events(inputs: dict[str, np.ndarray], labels: np.ndarray | None, kept: dict[str, np.ndarray],
            delays: dict[str, np.ndarray], period_s: float) -> list[tuple[int, int, str, Callable[[Any], Any]]]:
    """(log_time_ns, stamp_ns, topic, message maker) for every reading and label."""
    events = []
    for index in range(len(next(iter(inputs.values())))):
        stamp_ns = round((START_S + index * period_s) * 1e9)
        for name, array in inputs.items():
            if kept[name][index]:
                maker = _image if _is_image(name, array) else _multi_array
                events.append((stamp_ns + round(delays[name][index] * 1e9), stamp_ns, topic_for(name),
                               _bind(maker, array[index], stamp_ns)))
        if labels is not None:
            events.append((stamp_ns, stamp_ns, LABEL_TOPIC, _bind(_label, int(labels[index]), stamp_ns)))
    return events


def _bind(maker: Callable, value: Any, stamp_ns: int) -> Callable[[Any], Any]:
    return lambda types: maker(types, value, stamp_ns)


def _is_image(name: str, array: np.ndarray) -> bool:
    return name == "image" and array.ndim == 4 and array.shape[1] == 1


def _topic_types(inputs: dict[str, np.ndarray], labels: np.ndarray | None) -> dict[str, str]:
    types = {topic_for(name): IMAGE_TYPE if _is_image(name, array) else ARRAY_TYPE for name, array in inputs.items()}
    return {**types, LABEL_TOPIC: LABEL_TYPE} if labels is not None else types


class _Dicts:
    """Builds messages as the plain dicts mcap-ros2-support's writer serialises."""

    @staticmethod
    def make(msgtype: str, **fields: Any) -> dict:
        return fields


class _Classes:
    """Builds messages as the typestore's classes, which rosbags' CDR serialiser takes."""

    def __init__(self, typestore: Any):
        self.typestore = typestore

    def make(self, msgtype: str, **fields: Any) -> Any:
        return self.typestore.types[msgtype](**fields)


def _header(types: Any, stamp_ns: int, frame_id: str) -> Any:
    stamp = types.make("builtin_interfaces/msg/Time", sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9)
    return types.make("std_msgs/msg/Header", stamp=stamp, frame_id=frame_id)


def _image(types: Any, sample: np.ndarray, stamp_ns: int) -> Any:
    pixels = np.ascontiguousarray(sample[0], dtype="<f4")
    height, width = pixels.shape
    return types.make(IMAGE_TYPE, header=_header(types, stamp_ns, "camera"), height=height, width=width,
                      encoding="32FC1", is_bigendian=0, step=width * 4, data=pixels.view(np.uint8).reshape(-1))


def _multi_array(types: Any, sample: np.ndarray, stamp_ns: int) -> Any:
    values = np.ascontiguousarray(sample, dtype=np.float32)
    strides = [int(np.prod(values.shape[axis:])) for axis in range(values.ndim)]
    dims = [types.make("std_msgs/msg/MultiArrayDimension", label=f"dim{axis}", size=size, stride=stride)
            for axis, (size, stride) in enumerate(zip(values.shape, strides, strict=True))]
    layout = types.make("std_msgs/msg/MultiArrayLayout", dim=dims, data_offset=0)
    return types.make(ARRAY_TYPE, layout=layout, data=values.reshape(-1))


def _label(types: Any, label: int, stamp_ns: int) -> Any:
    return types.make(LABEL_TYPE, data=label)


def _write_mcap(path: Path, fmt: str, typestore: Any, topic_types: dict[str, str], events: list) -> None:
    writer_module = require("mcap_ros2.writer")
    with path.open("wb") as stream:
        writer = writer_module.Writer(stream)
        schemas = {msgtype: writer.register_msgdef(msgtype, typestore.generate_msgdef(msgtype, ros_version=2)[0])
                   for msgtype in set(topic_types.values())}
        dicts = _Dicts()
        for log_time_ns, stamp_ns, topic, make in events:
            message = _plain(make(dicts))
            writer.write_message(topic, schemas[topic_types[topic]], message, log_time=log_time_ns,
                                 publish_time=stamp_ns)
        writer.finish()


def _plain(message: Any) -> Any:
    """numpy arrays as what mcap-ros2-support serialises: bytes for uint8[], lists otherwise."""
    if isinstance(message, dict):
        return {key: _plain(value) for key, value in message.items()}
    if isinstance(message, list):
        return [_plain(value) for value in message]
    if isinstance(message, np.ndarray):
        return message.tobytes() if message.dtype == np.uint8 else message.tolist()
    return message


def _write_rosbag2(path: Path, fmt: str, typestore: Any, topic_types: dict[str, str], events: list) -> None:
    rosbag2 = require("rosbags.rosbag2")
    storage = rosbag2.StoragePlugin.MCAP if fmt == "rosbag2-mcap" else rosbag2.StoragePlugin.SQLITE3
    classes = _Classes(typestore)
    try:
        with rosbag2.Writer(path, version=9, storage_plugin=storage) as writer:
            connections = {topic: writer.add_connection(topic, msgtype, typestore=typestore)
                           for topic, msgtype in topic_types.items()}
            for log_time_ns, _, topic, make in events:
                writer.write(connections[topic], log_time_ns,
                             typestore.serialize_cdr(make(classes), topic_types[topic]))
    except rosbag2.WriterError as error:
        raise RecordingError(f"{path}: {error}") from None
