"""What the ROS 2 node does: ``NodeOptions`` (the node's flags), checked when made, and the ``--topic`` syntax."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ume_edge.constants import ENTRY_MODEL
from ume_edge.recording.decoders import HEADER_TIME, TIME_MODES, AudioFormat

DEFAULT_RESULT_TOPIC = "/ume/probs"
DEFAULT_DIAGNOSTICS_TOPIC = "/diagnostics"  # where diagnostic_aggregator and rqt_robot_monitor look
MESSAGE_TYPE = re.compile(r"\w+/msg/\w+")


@dataclass(frozen=True)
class TopicSpec:
    """One sensor: the topic its modality is read from, and the message type (``None``: looked up on the graph)."""

    name: str
    msgtype: str | None = None

    @classmethod
    def parse(cls, text: str) -> tuple[str, TopicSpec]:
        """``"image=/camera/image:sensor_msgs/msg/Image"`` -> ``("image", TopicSpec(...))``; the type is optional
        (ROS 2 topic names cannot hold ':')."""
        modality, _, rest = text.partition("=")
        topic, _, msgtype = rest.partition(":")
        if not modality or not topic:
            raise ValueError(f"--topic expects MODALITY=TOPIC[:TYPE] (e.g. image=/camera/image_raw:sensor_msgs/msg/"
                             f"Image), got {text!r}")
        if msgtype and not MESSAGE_TYPE.fullmatch(msgtype):
            raise ValueError(f"--topic {text!r}: the message type must read package/msg/Name, got {msgtype!r}")
        return modality, cls(topic, msgtype or None)


@dataclass(frozen=True)
class NodeOptions:
    """The node's configuration; the fields are ``python -m ume_edge.ros2``'s flags (see its ``--help``)."""

    topics: dict[str, TopicSpec]
    url: str = "localhost:8001"
    model: str = ENTRY_MODEL
    preprocess: dict[str, str] = field(default_factory=dict)  # modality -> "module:function"
    audio_format: AudioFormat | None = None
    time_mode: str = HEADER_TIME
    deadline_ms: float = 50.0
    window_ms: float | None = None
    required: tuple[str, ...] = ()
    max_age_ms: dict[str, float] = field(default_factory=dict)
    offset_ms: dict[str, float] = field(default_factory=dict)
    max_open: int | None = None
    result_topic: str = DEFAULT_RESULT_TOPIC
    diagnostics_topic: str = DEFAULT_DIAGNOSTICS_TOPIC
    diagnostics_period_s: float = 1.0
    stale_after_s: float = 2.0
    max_in_flight: int = 8
    timeout_s: float = 5.0
    discovery_timeout_s: float = 5.0
    node_name: str = "ume_edge"
    metrics_port: int | None = None  # the sensors' figures as Prometheus metrics (ume_edge.client.sensor_health)
    metrics_host: str = "0.0.0.0"

    def __post_init__(self) -> None:
        if not self.topics:
            raise ValueError("give at least one --topic MODALITY=TOPIC[:TYPE]")
        known = set(self.topics)
        for flag, names in (("--preprocess", self.preprocess), ("--required", self.required),
                            ("--max-age-ms", self.max_age_ms), ("--offset-ms", self.offset_ms)):
            unknown = sorted(set(names) - known)
            if unknown:
                raise ValueError(f"{flag} names {', '.join(unknown)}, which no --topic reads (the modalities are "
                                 f"{', '.join(self.topics)})")
        if self.time_mode not in TIME_MODES:
            raise ValueError(f"--time must be one of {', '.join(TIME_MODES)}, got {self.time_mode!r}")
        for flag, value in (("--deadline-ms", self.deadline_ms), ("--diagnostics-period-s", self.diagnostics_period_s),
                            ("--stale-after-s", self.stale_after_s), ("--timeout-s", self.timeout_s)):
            if not value > 0:
                raise ValueError(f"{flag} must be positive, got {value}")
        if self.max_in_flight < 1:
            raise ValueError(f"--max-in-flight must be at least 1, got {self.max_in_flight}")

    def sync_policies(self) -> dict:
        """The ``SensorSync`` keyword options that were set (those left out keep SensorSync's defaults)."""
        policies: dict = {"required": list(self.required), "max_age_ms": self.max_age_ms,
                          "offset_ms": self.offset_ms, "max_open": self.max_open}
        return {name: value for name, value in policies.items() if value}

    @property
    def poll_period_s(self) -> float:
        """How often deadlines are checked when no message arrives: a quarter of the deadline, at least 1 ms."""
        return max(self.deadline_ms / 4e3, 1e-3)
