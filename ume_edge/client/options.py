"""What one replay against a server does: ``ClientOptions``, checked when made."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ume_edge.client.replicas import parse_url

DEFAULT_MAX_FAILURES = 10


@dataclass(frozen=True)
class ClientOptions:
    """One replay of ``dataset``/``split`` (or of the ``recording``'s ``topics``, modality -> topic) against ``model``
    at ``url`` (one server, or its replicas: see ``replicas``); the fields are the client's flags (see
    ``python -m ume_edge.client --help``). ``requests=None`` sends one request per sample (per frame of a recording);
    ``rate=None`` sends as fast as ``concurrency`` allows; ``metrics_url=None`` scrapes no server figures."""

    url: str = "localhost:8001"
    model: str = "ume"
    dataset: str = "avdigits"
    split: str = "test"
    drop: dict[str, float] = field(default_factory=dict)
    jitter_ms: dict[str, float] = field(default_factory=dict)
    deadline_ms: float | None = None
    rate: float | None = None
    concurrency: int = 1
    requests: int | None = None
    seed: int = 0
    timeout_s: float = 30.0
    max_failures: int = DEFAULT_MAX_FAILURES
    send_mask: bool = False
    metrics_url: str | None = None
    json_out: str | Path | None = None
    progress: bool = False
    recording: str | Path | None = None
    topics: dict[str, str] = field(default_factory=dict)
    label_topic: str | None = None
    time: str = "header"
    loop: int = 1
    start_s: float = 0.0
    duration_s: float | None = None
    preprocess: dict[str, str] = field(default_factory=dict)
    audio_format: str | None = None
    sensor_metrics_port: int | None = None
    sensor_metrics_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        parse_url(self.url)
        if self.concurrency < 1:
            raise ValueError(f"--concurrency must be at least 1, got {self.concurrency}")
        if self.recording is not None:
            self._check_recording()
        elif self.rate is not None and self.rate <= 0:
            raise ValueError(f"--rate must be positive, got {self.rate}")
        elif self.topics or self.label_topic or self.preprocess:
            raise ValueError("--topic, --label-topic and --preprocess read a recording; give it with --recording")
        if not self.timeout_s > 0:
            raise ValueError(f"--timeout-s must be positive, got {self.timeout_s}")
        if self.max_failures < 0:
            raise ValueError(f"--max-failures must be 0 (never stop) or more, got {self.max_failures}")
        if self.sensor_metrics_port is not None and not 0 <= self.sensor_metrics_port <= 65535:
            raise ValueError(f"--metrics-port must be a port (0 to 65535; 0 picks a free one), got "
                             f"{self.sensor_metrics_port}")

    def _check_recording(self) -> None:
        if not self.topics:
            raise ValueError("--recording needs at least one --topic MODALITY=TOPIC (e.g. --topic image=/image)")
        if self.drop or self.jitter_ms:
            raise ValueError("--drop and --jitter-ms simulate a data set's sensors; a recording replays its own "
                             "readings (make one with missing readings: python -m ume_edge.data.avdigits "
                             "--export-recording PATH --drop image=0.2)")
        if self.rate is not None and not self.rate >= 0:
            raise ValueError(f"--rate must be 0 (as fast as possible) or more with --recording, got {self.rate}")
        if self.time not in ("header", "log"):
            raise ValueError(f"--time must be header or log, got {self.time!r}")
        if self.loop < 1:
            raise ValueError(f"--loop must be at least 1, got {self.loop}")
        if not self.start_s >= 0:
            raise ValueError(f"--start must be 0 or more seconds, got {self.start_s}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"--duration must be positive, got {self.duration_s}")
