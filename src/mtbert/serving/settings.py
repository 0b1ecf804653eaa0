"""The settings of `mtbert serve`, apart from the app so that the command line can read
their defaults without importing FastAPI."""

from __future__ import annotations

from dataclasses import dataclass

from mtbert.config import ConfigError


@dataclass(frozen=True)
class ServeSettings:
    """Limits, batching and access of a server (the options of `mtbert serve`)."""

    max_batch: int = 64  # inputs per forward pass
    max_wait_ms: float = 5.0  # how long the oldest queued input waits for others
    max_queue: int = 1024  # inputs waiting; a request that would pass it gets a 503
    max_inputs: int = 256  # inputs per request (413 above)
    max_chars: int = 2000  # characters per text (422 above); texts are cut at max_length tokens
    max_body_bytes: int = 1 << 20  # request body (413 above)
    request_timeout_s: float = 60.0  # a request without its results by then gets a 504
    api_key: str | None = None  # set: /v1/* and /metrics need "Authorization: Bearer KEY"

    def __post_init__(self):
        for name in ("max_batch", "max_queue", "max_inputs", "max_chars", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}: must be at least 1, got "
                                  f"{getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ConfigError(f"--max-wait-ms: must be at least 0, got {self.max_wait_ms}")
        if not self.request_timeout_s > 0:
            raise ConfigError(f"--request-timeout-s: must be more than 0, got "
                              f"{self.request_timeout_s}")
        if self.max_inputs > self.max_queue:
            raise ConfigError(f"--max-inputs ({self.max_inputs}) cannot exceed --max-queue "
                              f"({self.max_queue}): such a request could never be queued")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("the API key is empty")
