"""What the data-parallel front and its engine cores say to each other over ZMQ, as msgpack (msgspec).

One ROUTER socket at the front, one DEALER per engine core (its identity: its rank). Typed messages
decode straight into the engine's own dataclasses (``SamplingParams``, ``RequestOutput``,
``EngineStats``), so nothing is converted by hand on either side.
"""
from __future__ import annotations

import pickle
from typing import Any, Union

import msgspec

from runtime.contracts.sampling_params import SamplingParams
from runtime.engine.outputs import EngineStats, RequestOutput


# ---- front -> engine core ------------------------------------------------------------------
class Start(msgspec.Struct, tag=True):
    """Every core said hello: build the engine; the data-parallel ranks meet at ``master`` (expert parallelism)."""
    master: str | None


class AddRequest(msgspec.Struct, tag=True):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    images: bytes | None = None  # pickled (see pack_images): decoded images are not msgpack types


class AbortRequests(msgspec.Struct, tag=True):
    request_ids: list[str]


class CallCore(msgspec.Struct, tag=True):
    """``EngineCore.<method>(*args)`` between two steps (the profiler's start and stop)."""
    call_id: int
    method: str
    args: list[Any]


class Ping(msgspec.Struct, tag=True):
    """The front is alive (an engine core on another node leaves when it stops hearing from it)."""


class Shutdown(msgspec.Struct, tag=True):
    pass


ToCore = Union[Start, AddRequest, AbortRequests, CallCore, Ping, Shutdown]


# ---- engine core -> front ------------------------------------------------------------------
class Hello(msgspec.Struct, tag=True):
    rank: int
    pid: int
    host: str


class Ready(msgspec.Struct, tag=True):
    rank: int
    max_model_len: int
    num_kv_blocks: int


class Outputs(msgspec.Struct, tag=True):
    """What a step changed, and the core's load; also sent alone as a heartbeat."""
    rank: int
    outputs: list[RequestOutput]
    stats: EngineStats
    failed: list[tuple[str, str]] = []  # (request id, why): refused by the core after the front took it


class CallDone(msgspec.Struct, tag=True):
    rank: int
    call_id: int
    result: Any = None
    error: str | None = None
    error_type: str | None = None


class Died(msgspec.Struct, tag=True):
    rank: int
    reason: str


FromCore = Union[Hello, Ready, Outputs, CallDone, Died]

_encoder = msgspec.msgpack.Encoder()
_to_core = msgspec.msgpack.Decoder(ToCore)
_from_core = msgspec.msgpack.Decoder(FromCore)


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def decode_to_core(data: bytes) -> ToCore:
    return _to_core.decode(data)


def decode_from_core(data: bytes) -> FromCore:
    return _from_core.decode(data)


def pack_images(images: list | None) -> bytes | None:
    return pickle.dumps(list(images)) if images else None


def unpack_images(data: bytes | None) -> list | None:
    # Only the front that started this core sends here (the same user, the same trust as its pipe to a worker).
    return pickle.loads(data) if data else None
