"""ROS 2 messages to numpy arrays, by attribute access only: the same code decodes messages read from a recording
(``mcap_ros2``, ``rosbags``) and those an rclpy subscription delivers.

    array = decode(message, "sensor_msgs/msg/Image")
    stamp_s = timestamp(message, log_time_ns)  # header.stamp when the message has one, else the log time

What each type becomes:

- ``sensor_msgs/msg/Image`` (mono8, mono16, rgb8, bgr8, rgba8, 16UC1, 32FC1): ``[C, H, W]`` in the encoding's
  dtype, channels first as the engines take them (bgr8 is reordered to RGB); ``step`` row padding and
  ``is_bigendian`` are honoured.
- ``sensor_msgs/msg/CompressedImage`` (jpeg, png, decoded with Pillow): ``[C, H, W]`` uint8 (uint16 for 16-bit png).
- ``sensor_msgs/msg/PointCloud2``: ``[N, C]`` float32, one column per field element in the message's field order.
- ``audio_common_msgs/msg/AudioData`` and ``AudioDataStamped``: ``[samples, channels]`` float32, integer PCM scaled to
  [-1, 1); the layout comes from an ``AudioFormat`` (a flag, or an ``AudioInfo`` message).
- ``std_msgs/msg/*MultiArray`` (numeric): the array the layout describes (``dim`` sizes and strides,
  ``data_offset``), in the type's dtype; without dims, ``data[data_offset:]``.

Anything else raises ``UnsupportedMessage`` with one line saying what is supported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ume_edge.errors import UmeEdgeError

HEADER_TIME = "header"
LOG_TIME = "log"
TIME_MODES = (HEADER_TIME, LOG_TIME)

# encoding -> (dtype, channels)
IMAGE_ENCODINGS = {
    "mono8": (np.uint8, 1), "mono16": (np.uint16, 1), "rgb8": (np.uint8, 3), "bgr8": (np.uint8, 3),
    "rgba8": (np.uint8, 4), "16UC1": (np.uint16, 1), "32FC1": (np.float32, 1),
}
COMPRESSED_FORMATS = ("jpeg", "png")
# sensor_msgs/PointField datatype constants -> numpy type
POINT_FIELD_TYPES = {1: np.int8, 2: np.uint8, 3: np.int16, 4: np.uint16, 5: np.int32, 6: np.uint32, 7: np.float32,
                     8: np.float64}
MULTI_ARRAY_TYPES: dict[str, type] = {
    "std_msgs/msg/Float32MultiArray": np.float32, "std_msgs/msg/Float64MultiArray": np.float64,
    "std_msgs/msg/Int8MultiArray": np.int8, "std_msgs/msg/Int16MultiArray": np.int16,
    "std_msgs/msg/Int32MultiArray": np.int32, "std_msgs/msg/Int64MultiArray": np.int64,
    "std_msgs/msg/UInt8MultiArray": np.uint8, "std_msgs/msg/UInt16MultiArray": np.uint16,
    "std_msgs/msg/UInt32MultiArray": np.uint32, "std_msgs/msg/UInt64MultiArray": np.uint64,
    "std_msgs/msg/ByteMultiArray": np.uint8,
}
# PCM sample format -> numpy dtype; integer formats are scaled to [-1, 1)
SAMPLE_FORMATS: dict[str, np.dtype] = {
    "S8": np.dtype("i1"), "U8": np.dtype("u1"), "S16LE": np.dtype("<i2"), "S16BE": np.dtype(">i2"),
    "S32LE": np.dtype("<i4"), "S32BE": np.dtype(">i4"), "F32LE": np.dtype("<f4"), "F32BE": np.dtype(">f4"),
    "F64LE": np.dtype("<f8"), "F64BE": np.dtype(">f8"),
}
AUDIO_TYPES = ("audio_common_msgs/msg/AudioData", "audio_common_msgs/msg/AudioDataStamped")
AUDIO_INFO_TYPE = "audio_common_msgs/msg/AudioInfo"


class UnsupportedMessage(UmeEdgeError):
    """A message type or encoding no decoder handles."""


@dataclass(frozen=True)
class AudioFormat:
    """How PCM bytes are laid out: ``sample_format`` (a key of ``SAMPLE_FORMATS``), interleaved ``channels``."""

    sample_format: str = "S16LE"
    channels: int = 1
    sample_rate: int = 16000

    def __post_init__(self) -> None:
        if self.sample_format not in SAMPLE_FORMATS:
            raise UnsupportedMessage(f"audio sample format {self.sample_format!r} is not supported; use one of "
                                     f"{', '.join(SAMPLE_FORMATS)}")
        if self.channels < 1:
            raise UnsupportedMessage(f"audio needs at least 1 channel, got {self.channels}")

    @classmethod
    def parse(cls, text: str) -> AudioFormat:
        """``"S16LE:2:48000"`` (format[:channels[:rate]]) -> ``AudioFormat``."""
        parts = text.split(":")
        try:
            numbers = [int(part) for part in parts[1:3]]
        except ValueError:
            numbers = []
        if len(parts) > 3 or len(numbers) != len(parts[1:]):
            raise UnsupportedMessage(f"--audio-format expects FORMAT[:CHANNELS[:RATE]] (e.g. S16LE:1:16000), "
                                     f"got {text!r}")
        return cls(parts[0].upper(), *numbers)

    @classmethod
    def from_info(cls, info: Any) -> AudioFormat:
        """From an ``audio_common_msgs/msg/AudioInfo`` message (PCM only)."""
        coding = str(getattr(info, "coding_format", "") or "wave").lower()
        if coding not in ("wave", "pcm", "raw"):
            raise UnsupportedMessage(f"audio coded as {coding!r} is not supported; record raw PCM (coding_format "
                                     f"'wave') or decode it in a --preprocess function")
        return cls(str(info.sample_format).upper(), int(info.channels), int(info.sample_rate))


def supported_types() -> tuple[str, ...]:
    return ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage", "sensor_msgs/msg/PointCloud2",
            *AUDIO_TYPES, *MULTI_ARRAY_TYPES)


def decode(message: Any, msgtype: str, audio_format: AudioFormat | None = None) -> np.ndarray:
    """The message's payload as an array (see the module docstring for each type's shape and dtype)."""
    if msgtype == "sensor_msgs/msg/Image":
        return decode_image(message)
    if msgtype == "sensor_msgs/msg/CompressedImage":
        return decode_compressed_image(message)
    if msgtype == "sensor_msgs/msg/PointCloud2":
        return decode_point_cloud(message)
    if msgtype in AUDIO_TYPES:
        if audio_format is None:
            raise UnsupportedMessage(f"{msgtype} carries PCM bytes without their format; record an AudioInfo topic "
                                     f"or pass --audio-format (e.g. S16LE:1:16000)")
        data = message.audio.data if msgtype.endswith("Stamped") else message.data
        return decode_pcm(data, audio_format)
    if msgtype in MULTI_ARRAY_TYPES:
        return decode_multi_array(message, MULTI_ARRAY_TYPES[msgtype])
    raise UnsupportedMessage(f"no decoder for {msgtype}; the supported types are {', '.join(supported_types())} "
                             f"(or decode it yourself with --preprocess MODALITY=module:function)")


def timestamp(message: Any, log_time_ns: int, mode: str = HEADER_TIME) -> float:
    """Seconds: ``header.stamp`` when the message has a header and ``mode`` is "header", else the log time."""
    if mode not in TIME_MODES:
        raise ValueError(f"time mode must be one of {', '.join(TIME_MODES)}, got {mode!r}")
    header = getattr(message, "header", None)
    if mode == HEADER_TIME and header is not None:
        stamp = header.stamp
        return (int(stamp.sec) * 10**9 + int(stamp.nanosec)) * 1e-9  # as log times are, so equal stamps compare equal
    return log_time_ns * 1e-9


def _bytes(data: Any) -> np.ndarray:
    """A ``uint8[]`` field as a flat uint8 array: numpy (rosbags), bytes (mcap_ros2), array.array (rclpy), list."""
    if isinstance(data, np.ndarray):
        return data.view(np.uint8).reshape(-1)
    if isinstance(data, (list, tuple)):
        return np.asarray(data, dtype=np.uint8)
    return np.frombuffer(data, dtype=np.uint8)


def decode_image(message: Any) -> np.ndarray:
    encoding = str(message.encoding)
    if encoding not in IMAGE_ENCODINGS:
        raise UnsupportedMessage(f"sensor_msgs/msg/Image encoding {encoding!r} is not supported; use one of "
                                 f"{', '.join(IMAGE_ENCODINGS)} or convert it with --preprocess")
    dtype, channels = IMAGE_ENCODINGS[encoding]
    typed = np.dtype(dtype).newbyteorder(">" if message.is_bigendian else "<")
    height, width, step = int(message.height), int(message.width), int(message.step)
    row_bytes = width * channels * typed.itemsize
    raw = _bytes(message.data)
    if step < row_bytes or raw.size < step * height:
        raise UnsupportedMessage(f"sensor_msgs/msg/Image {width}x{height} {encoding}: step {step} and "
                                 f"{raw.size} data bytes are too few for its rows ({row_bytes} bytes each)")
    rows = raw[:step * height].reshape(height, step)[:, :row_bytes]
    pixels = np.ascontiguousarray(rows).view(typed).reshape(height, width, channels)
    if encoding == "bgr8":
        pixels = pixels[..., ::-1]
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)).astype(np.dtype(dtype).newbyteorder("="), copy=False)


def decode_compressed_image(message: Any) -> np.ndarray:
    image_format = str(message.format).lower()
    if not any(name in image_format for name in COMPRESSED_FORMATS):
        raise UnsupportedMessage(f"sensor_msgs/msg/CompressedImage format {message.format!r} is not supported; use "
                                 f"jpeg or png")
    try:
        import io

        from PIL import Image
    except ImportError:
        raise UnsupportedMessage("decoding a CompressedImage needs Pillow: pip install 'ume-edge[sensors]'") from None
    with Image.open(io.BytesIO(_bytes(message.data).tobytes())) as image:
        pixels = np.asarray(image)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def decode_point_cloud(message: Any) -> np.ndarray:
    fields = list(message.fields)
    unknown = [field.name for field in fields if int(field.datatype) not in POINT_FIELD_TYPES]
    if unknown:
        raise UnsupportedMessage(f"sensor_msgs/msg/PointCloud2 field {unknown[0]!r} has an unknown datatype")
    order = ">" if message.is_bigendian else "<"
    columns = [(f"{field.name}_{index}", order + np.dtype(POINT_FIELD_TYPES[int(field.datatype)]).str[1:],
                int(field.offset) + index * np.dtype(POINT_FIELD_TYPES[int(field.datatype)]).itemsize)
               for field in fields for index in range(max(1, int(field.count)))]
    point_step, row_step = int(message.point_step), int(message.row_step)
    height, width = int(message.height), int(message.width)
    if not columns or height * width == 0:
        return np.zeros((height * width, len(columns)), np.float32)
    names = [column[0] for column in columns]
    point = np.dtype({"names": names, "formats": [c[1] for c in columns], "offsets": [c[2] for c in columns],
                      "itemsize": point_step})
    raw = _bytes(message.data)
    if row_step < width * point_step or raw.size < row_step * (height - 1) + width * point_step:
        raise UnsupportedMessage(f"sensor_msgs/msg/PointCloud2 {width}x{height}: {raw.size} data bytes are too few "
                                 f"for point_step {point_step} and row_step {row_step}")
    padded = np.concatenate([raw, np.zeros(row_step * height - raw.size, np.uint8)]) if raw.size < row_step * height \
        else raw[:row_step * height]
    rows = padded.reshape(height, row_step)[:, :width * point_step]
    points = np.ascontiguousarray(rows).view(point).reshape(-1)
    return np.stack([points[name].astype(np.float32) for name in names], axis=1)


def decode_pcm(data: Any, audio_format: AudioFormat) -> np.ndarray:
    dtype = SAMPLE_FORMATS[audio_format.sample_format]
    raw = _bytes(data)
    frame_bytes = dtype.itemsize * audio_format.channels
    if raw.size % frame_bytes:
        raise UnsupportedMessage(f"{raw.size} audio bytes are not whole {audio_format.sample_format} frames of "
                                 f"{audio_format.channels} channel(s); check --audio-format")
    samples = np.frombuffer(raw.tobytes(), dtype=dtype).reshape(-1, audio_format.channels)
    if dtype.kind == "f":
        return samples.astype(np.float32)
    if dtype.kind == "u":
        half = 2 ** (8 * dtype.itemsize - 1)
        return ((samples.astype(np.float64) - half) / half).astype(np.float32)
    return (samples.astype(np.float64) / 2 ** (8 * dtype.itemsize - 1)).astype(np.float32)


def decode_multi_array(message: Any, dtype: type) -> np.ndarray:
    data: np.ndarray = np.asarray(message.data, dtype=dtype).reshape(-1)
    offset = int(message.layout.data_offset)
    dims = list(message.layout.dim)
    if not dims:
        return data[offset:].copy()
    sizes = [int(dim.size) for dim in dims]
    element_strides = [int(dim.stride) for dim in dims[1:]] + [1]
    last = offset + sum((size - 1) * stride for size, stride in zip(sizes, element_strides, strict=True))
    if min(sizes) > 0 and last >= data.size:
        raise UnsupportedMessage(f"a MultiArray layout of sizes {sizes}, strides {[int(d.stride) for d in dims]} "
                                 f"and data_offset {offset} reaches past its {data.size} elements")
    if min(sizes) == 0:
        return np.zeros(sizes, dtype)
    view = np.lib.stride_tricks.as_strided(data[offset:], shape=sizes,
                                           strides=[stride * data.itemsize for stride in element_strides])
    return view.copy()
