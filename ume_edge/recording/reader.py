"""Read a robot's recording without ROS: an MCAP file with ROS 2 CDR messages (``mcap`` and ``mcap-ros2-support``),
or a rosbag2 folder in either storage, MCAP or sqlite3 (``rosbags``).

    with Recording.open(path) as recording:
        recording.topics                      # {topic: msgtype}
        for message in recording.messages(["/camera/image"]):
            message.topic, message.msgtype, message.log_time_ns, message.message

Messages come in log-time order and have attribute access (``message.header.stamp.sec``). A rosbag2 folder's types
that ``rosbags`` does not ship (``audio_common_msgs``, say) are read from the definitions stored in the bag. A file
that cannot be read (truncated, not a recording) raises ``RecordingError`` with one line.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ume_edge.errors import UmeEdgeError

LOGGER = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'ume-edge[sensors]'"


class RecordingError(UmeEdgeError):
    """A recording that cannot be read as asked."""


@dataclass(frozen=True)
class RecordedMessage:
    topic: str
    msgtype: str
    log_time_ns: int
    message: Any


def require(module: str) -> Any:
    """Import one of the recording libraries, or say in one line how to install them."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise RecordingError(f"reading and writing recordings needs {module.split('.')[0]} "
                             f"(mcap, mcap-ros2-support, rosbags): {INSTALL_HINT}") from None


class Recording(abc.ABC):
    """An open recording; use ``Recording.open(path)`` as a context manager."""

    def __init__(self, path: Path):
        self.path = path
        self.topics: dict[str, str] = {}

    @staticmethod
    def open(path: str | Path) -> Recording:
        path = Path(path)
        if path.is_dir():
            return _Rosbag2(path)
        if path.is_file():
            return _McapFile(path)
        raise RecordingError(f"{path}: no such file or folder (expected an .mcap file or a rosbag2 folder)")

    def __enter__(self) -> Recording:
        try:
            self._open()
        except RecordingError:
            raise
        except Exception as error:  # each library has its own exceptions for a file it cannot parse
            self.close()
            raise self._unreadable(error) from None
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def messages(self, topics: Iterable[str]) -> Iterator[RecordedMessage]:
        """The messages of ``topics`` in log-time order."""
        try:
            yield from self._messages(list(topics))
        except RecordingError:
            raise
        except Exception as error:
            raise self._unreadable(error) from None

    def check_topics(self, topics: Iterable[str]) -> None:
        """One line naming the recording's topics when one of ``topics`` is not in it."""
        for topic in topics:
            if topic not in self.topics:
                have = ", ".join(f"{name} ({msgtype})" for name, msgtype in sorted(self.topics.items())) or "none"
                raise RecordingError(f"{self.path} has no topic {topic!r}; its topics: {have}")

    def _unreadable(self, error: Exception) -> RecordingError:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return RecordingError(f"{self.path}: not a readable recording ({type(error).__name__}"
                              f"{': ' + detail[:160] if detail else ''}); is it truncated or corrupt?")

    @abc.abstractmethod
    def _open(self) -> None:
        """Each storage format's own."""

    @abc.abstractmethod
    def _messages(self, topics: list[str]) -> Iterator[RecordedMessage]:
        """Each storage format's own."""

    @abc.abstractmethod
    def close(self) -> None:
        """Each storage format's own."""


class _McapFile(Recording):
    def __init__(self, path: Path):
        super().__init__(path)
        self._stream: Any = None

    def _open(self) -> None:
        reader_module = require("mcap.reader")
        decoder = require("mcap_ros2.decoder")
        self._stream = self.path.open("rb")
        self._reader = reader_module.make_reader(self._stream, validate_crcs=True,
                                                 decoder_factories=[decoder.DecoderFactory()])
        summary = self._reader.get_summary()
        if summary is None:
            raise RecordingError(f"{self.path}: an MCAP file without its summary section; is it truncated? "
                                 f"(`mcap recover` can rebuild it)")
        self.topics = {channel.topic: summary.schemas[channel.schema_id].name
                       for channel in summary.channels.values()}

    def _messages(self, topics: list[str]) -> Iterator[RecordedMessage]:
        for schema, channel, message, decoded in self._reader.iter_decoded_messages(topics=topics,
                                                                                   log_time_order=True):
            yield RecordedMessage(channel.topic, schema.name, message.log_time, decoded)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None


class _Rosbag2(Recording):
    def __init__(self, path: Path):
        super().__init__(path)
        self._reader: Any = None

    def _open(self) -> None:
        rosbag2 = require("rosbags.rosbag2")
        typesys = require("rosbags.typesys")
        self._reader = rosbag2.Reader(self.path)
        self._reader.open()
        self._typestore = typesys.get_typestore(typesys.Stores.LATEST)
        self._register_missing_types(typesys)
        self.topics = {connection.topic: connection.msgtype for connection in self._reader.connections}

    def _register_missing_types(self, typesys: Any) -> None:
        for connection in self._reader.connections:
            definition = getattr(connection, "msgdef", None)
            text = getattr(definition, "data", definition)
            if connection.msgtype in self._typestore.types or not text:
                continue
            self._typestore.register(typesys.get_types_from_msg(text, connection.msgtype))
            LOGGER.debug("registered %s from the definition stored in %s", connection.msgtype, self.path)

    def _messages(self, topics: list[str]) -> Iterator[RecordedMessage]:
        connections = [connection for connection in self._reader.connections if connection.topic in topics]
        for connection, log_time_ns, raw in self._reader.messages(connections=connections):
            yield RecordedMessage(connection.topic, connection.msgtype, log_time_ns,
                                  self._typestore.deserialize_cdr(raw, connection.msgtype))

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
