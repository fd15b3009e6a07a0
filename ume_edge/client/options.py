"""What one replay against a server does: ``ClientOptions``, checked when made."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MAX_FAILURES = 10


@dataclass(frozen=True)
class ClientOptions:
    """One replay of ``dataset``/``split`` against ``model`` at ``url``; the fields are the client's flags (see
    ``python -m ume_edge.client --help``). ``requests=None`` sends one request per sample; ``rate=None`` sends as fast
    as ``concurrency`` allows; ``metrics_url=None`` scrapes no server figures."""

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

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"--concurrency must be at least 1, got {self.concurrency}")
        if self.rate is not None and self.rate <= 0:
            raise ValueError(f"--rate must be positive, got {self.rate}")
        if not self.timeout_s > 0:
            raise ValueError(f"--timeout-s must be positive, got {self.timeout_s}")
        if self.max_failures < 0:
            raise ValueError(f"--max-failures must be 0 (never stop) or more, got {self.max_failures}")
