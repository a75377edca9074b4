"""``--kv-transfer-config``: an instance's side of prefill/decode disaggregation (runtime/engine/kv_connector.py)."""
from __future__ import annotations

import json
from dataclasses import dataclass

KV_ROLES = ("kv_producer", "kv_consumer", "kv_both")
KV_CONNECTORS = ("zmq",)  # runtime/engine/zmq_kv_connector.py: KV blocks over TCP


@dataclass(frozen=True)
class KVTransferConfig:
    kv_role: str
    kv_connector: str = "zmq"  # KV_CONNECTORS
    kv_port: int = 14579  # the producer serves its saved KV here
    kv_ip: str = "127.0.0.1"  # ... at this address, which consumers connect to
    transfer_timeout_s: float = 30.0  # a consumer's fetch gives up after it; a producer's saved KV expires after it

    def __post_init__(self) -> None:
        if self.kv_role not in KV_ROLES:
            raise ValueError(f"kv_role must be one of {', '.join(KV_ROLES)}, got {self.kv_role!r}")
        if self.kv_connector not in KV_CONNECTORS:
            raise ValueError(f"kv_connector must be one of {', '.join(KV_CONNECTORS)}, got {self.kv_connector!r}")
        if not isinstance(self.kv_port, int) or not 0 < self.kv_port < 65536:
            raise ValueError(f"kv_port must be a TCP port, got {self.kv_port!r}")
        if not self.transfer_timeout_s > 0:
            raise ValueError(f"transfer_timeout_s must be positive, got {self.transfer_timeout_s!r}")

    @property
    def is_producer(self) -> bool:
        return self.kv_role in ("kv_producer", "kv_both")

    @property
    def is_consumer(self) -> bool:
        return self.kv_role in ("kv_consumer", "kv_both")

    @classmethod
    def parse(cls, value: "KVTransferConfig | dict | str") -> "KVTransferConfig":
        """From the object itself, its dict, or its JSON (``--kv-transfer-config``), with errors naming the field."""
        if isinstance(value, KVTransferConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"kv_transfer_config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError(f"kv_transfer_config must be a JSON object, got {type(value).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"kv_transfer_config: unknown field(s) {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(known))}")
        if "kv_role" not in value:
            raise ValueError("kv_transfer_config needs kv_role")
        return cls(**value)
