"""The message header: every field of a message but its tensors, validated on construction.

It travels as compact JSON inside the envelope (broker/envelope.py). The modeled timestamps are
fields here but travel in the envelope's fixed binary prefix, so that the channel emulator can
rewrite them without touching the JSON or the body.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from broker.jsonlimits import loads_bounded
from broker.tensors import COMPRESSIONS
from broker.topics import Kind, is_agent_id, is_destination, is_run_id
from nmoe.errors import WireError

PROTOCOL_VERSION = 2  # 2: the body's digest is BLAKE3 (header key blake3), no longer SHA-256
MAX_META_BYTES = 8 * 1024
MAX_HEADER_BYTES = 16 * 1024  # the JSON header, meta included
MAX_HEADER_DEPTH = 4  # the header object and its meta hold scalars only: depth 2 is all a valid one needs
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_STAGE = re.compile(r"^[A-Za-z0-9_.:-]{0,32}$")

MetaValue = str | int | float | bool | None


def _bad(detail: str) -> WireError:
    return WireError("bad_header", detail)


def _opt_time(value: object, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(f"{name} must be a finite number or None")
    try:
        number = float(value)  # OverflowError for a JSON integer of 309 digits or more
    except OverflowError:
        raise _bad(f"{name} is out of range") from None
    if not math.isfinite(number):
        raise _bad(f"{name} must be a finite number or None")
    return number


def _check_meta(meta: object) -> Mapping[str, MetaValue]:
    if not isinstance(meta, Mapping):
        raise _bad("meta must be a mapping")
    for key, value in meta.items():
        if not isinstance(key, str) or not 0 < len(key) <= 64:
            raise _bad(f"meta key {key!r} must be a str of 1..64 chars")
        if isinstance(value, float) and not math.isfinite(value):
            raise _bad(f"meta[{key!r}] is not finite")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
            raise _bad(f"meta[{key!r}] is out of range")
        if value is not None and not isinstance(value, str | int | float | bool):
            raise _bad(f"meta[{key!r}] must be str, int, float, bool or None")
    frozen = MappingProxyType(dict(meta))
    if len(json.dumps(dict(frozen), separators=(",", ":"))) > MAX_META_BYTES:
        raise WireError("oversized", f"meta is over {MAX_META_BYTES} bytes of JSON")
    return frozen


@dataclass(frozen=True)
class Header:
    """Everything about a message except its tensors; validated on construction."""

    kind: Kind
    run: str
    src: str
    dst: str
    id: str
    t_send: float
    blake3: str
    body_len: int
    round: int = -1
    stage: str = ""
    reply_to: str | None = None
    t_model_send: float | None = None
    t_model_arrive: float | None = None
    meta: Mapping[str, MetaValue] = field(default_factory=dict)
    compression: str = "none"
    version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        if self.version != PROTOCOL_VERSION:
            raise WireError("bad_version", f"protocol {self.version!r}, expected {PROTOCOL_VERSION}")
        try:
            object.__setattr__(self, "kind", Kind(self.kind))
        except ValueError:
            raise _bad(f"unknown kind {self.kind!r}") from None
        if not is_run_id(self.run):
            raise _bad(f"invalid run id {self.run!r}")
        if not is_agent_id(self.src):
            raise _bad(f"invalid src {self.src!r}")
        if not is_destination(self.dst):
            raise _bad(f"invalid dst {self.dst!r}")
        if not isinstance(self.id, str) or not _HEX32.fullmatch(self.id):
            raise _bad("id must be 32 lowercase hex chars")
        reply_to = self.reply_to
        if reply_to is not None and (not isinstance(reply_to, str) or not _HEX32.fullmatch(reply_to)):
            raise _bad("reply_to must be a message id or None")
        if isinstance(self.round, bool) or not isinstance(self.round, int) or not -1 <= self.round < 2**31:
            raise _bad(f"round must be an int >= -1, got {self.round!r}")
        if not isinstance(self.stage, str) or not _STAGE.fullmatch(self.stage):
            raise _bad(f"stage must match {_STAGE.pattern}, got {self.stage!r}")
        t_send = _opt_time(self.t_send, "t_send")
        if t_send is None:
            raise _bad("t_send is required")
        object.__setattr__(self, "t_send", t_send)
        object.__setattr__(self, "t_model_send", _opt_time(self.t_model_send, "t_model_send"))
        object.__setattr__(self, "t_model_arrive", _opt_time(self.t_model_arrive, "t_model_arrive"))
        if not isinstance(self.blake3, str) or not _HEX64.fullmatch(self.blake3):
            raise _bad("blake3 must be 64 lowercase hex chars")
        if isinstance(self.body_len, bool) or not isinstance(self.body_len, int) or self.body_len < 0:
            raise _bad("body_len must be a non-negative int")
        if self.compression not in COMPRESSIONS:
            raise _bad(f"unknown compression {self.compression!r}")
        object.__setattr__(self, "meta", _check_meta(self.meta))

    # JSON carries every field but the modeled stamps, which live in the binary prefix.
    @property
    def transit_s(self) -> float | None:
        """Modeled seconds the channel emulator kept this message on its link (None off the emulator)."""
        if self.t_model_send is None or self.t_model_arrive is None:
            return None
        return self.t_model_arrive - self.t_model_send

    _JSON_KEYS = (
        "v", "kind", "run", "src", "dst", "round", "stage", "id", "reply_to",
        "t_send", "blake3", "body_len", "meta", "compression",
    )  # fmt: skip

    def to_json(self) -> bytes:
        obj = {
            "v": self.version, "kind": self.kind.value, "run": self.run, "src": self.src,
            "dst": self.dst, "round": self.round, "stage": self.stage, "id": self.id,
            "reply_to": self.reply_to, "t_send": self.t_send, "blake3": self.blake3,
            "body_len": self.body_len, "meta": dict(self.meta), "compression": self.compression,
        }  # fmt: skip
        return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()

    @classmethod
    def from_json(cls, raw: bytes, *, t_model_send: float | None, t_model_arrive: float | None) -> Header:
        obj = loads_bounded(
            raw, what="header", max_bytes=MAX_HEADER_BYTES, max_depth=MAX_HEADER_DEPTH, invalid="bad_header"
        )
        if not isinstance(obj, dict) or set(obj) != set(cls._JSON_KEYS):
            raise _bad("header keys do not match the protocol")
        if obj["v"] != PROTOCOL_VERSION:
            raise WireError("bad_version", f"protocol {obj['v']!r}, expected {PROTOCOL_VERSION}")
        fields: dict[str, Any] = {k: obj[k] for k in cls._JSON_KEYS if k != "v"}
        try:
            return cls(**fields, t_model_send=t_model_send, t_model_arrive=t_model_arrive)
        except TypeError as err:  # e.g. a list where a str belongs, caught by a comparison
            raise _bad(str(err)[:200]) from err
