"""Hostile JSON inside frames (issue 11, point 1): bounded before parsing, counted, never fatal.

A header whose ``meta`` nests 3,000 arrays and a safetensors header nesting 20,000 arrays used to
raise RecursionError out of the receiver's connection task; both must be counted rejections, and
the session must keep serving.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from conftest import RUN, needs_mosquitto, raw_client

from agents.bus import BusConfig, BusSession
from broker.envelope import FRAME_MESSAGE, HEADER_LEN, body_digest, pack_prefix
from broker.header import MAX_HEADER_BYTES, Header
from broker.jsonlimits import json_depth, loads_bounded
from broker.server import MosquittoBroker
from broker.tensors import decode_body
from broker.topics import Kind, Topics
from broker.wire import WireError, decode, draft, encode

T = Topics(RUN)


def header_nesting(depth: int, kind: Kind = Kind.CTRL) -> bytes:
    """A whole frame, hash and all correct, whose header ``meta`` nests ``depth`` arrays."""
    d = draft(kind=kind, run=RUN, src="client-0", dst="client-1", meta={"op": "PLACEHOLDER"})
    head = replace(d.header, blake3=d.digest()).to_json()
    head = head.replace(b'"PLACEHOLDER"', b"[" * depth + b"]" * depth)
    return pack_prefix(FRAME_MESSAGE, d.header.id) + HEADER_LEN.pack(len(head)) + head + d.body


def body_nesting(depth: int, kind: Kind = Kind.LATENT) -> bytes:
    """A whole frame whose safetensors header (inside the body) nests ``depth`` arrays."""
    st_header = b'{"__metadata__":{"x":' + b"[" * depth + b"]" * depth + b"}}"
    body = len(st_header).to_bytes(8, "little") + st_header
    d = draft(kind=kind, run=RUN, src="client-0", dst="client-1")
    head = replace(d.header, blake3=body_digest(body), body_len=len(body)).to_json()
    return pack_prefix(FRAME_MESSAGE, d.header.id) + HEADER_LEN.pack(len(head)) + head + body


# -- the depth scan --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "doc",
    [
        1, "text", [], {}, [[[]]], {"a": [1, {"b": [2, [3]]}]},
        {"brackets in a string": "[[[[{{{{", "x": [["]]]]"]]},
        {"quote and backslash escapes": 'a\\"[[[', "b\\": ["\\\\", '"', [{"\\\"": "[{"}]]},
        ["é ü 漢字 [", {"ok": [None, True, 1.5e3]}],
    ],
)  # fmt: skip
def test_json_depth_is_exact_on_valid_json(doc) -> None:
    def depth(x) -> int:
        if isinstance(x, list):
            return 1 + max((depth(v) for v in x), default=0)
        if isinstance(x, dict):
            return 1 + max((depth(v) for v in x.values()), default=0)
        return 0

    raw = json.dumps(doc, ensure_ascii=False).encode()
    assert json_depth(raw) == depth(doc)


def test_json_depth_past_int16_is_still_deep() -> None:
    assert json_depth(b"[" * 100_000) >= 32_767
    assert json_depth(b"[" * 40_000 + b"]" * 40_000 + b"[1]") >= 32_767


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"[" * 3000 + b"]" * 3000, "too_deep"),
        (b'["\\\\"' + b"[" * 3000, "too_deep"),  # an escaped backslash does not open a string
        (b'"\\"' + b"[" * 3000, "bad_header"),  # inside one string: no parser recursion
        (b"x" * 20_000, "oversized"),
        (b"[1, 2", "bad_header"),
        (b"[NaN]", "bad_header"),
        (b"\xff\xfe[\x00]\x00", "bad_header"),  # UTF-16 is not taken
        ('["caf\u00e9"]'.encode("latin-1"), "bad_header"),
    ],
)  # fmt: skip
def test_loads_bounded_refuses_before_parsing(raw: bytes, reason: str) -> None:
    with pytest.raises(WireError) as err:
        loads_bounded(raw, what="header", max_bytes=16 * 1024, max_depth=4, invalid="bad_header")
    assert err.value.reason == reason


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        (b'{"a": [{"b": [1]}]}', {"a": [{"b": [1]}]}),  # four brackets, four deep: at the limit
        (b'{"s": "[[[[[[{{{{"}', {"s": "[[[[[[{{{{"}),  # more brackets than the limit, all in a string
        (b'[[1], [2], [3], [4], [5]]', [[1], [2], [3], [4], [5]]),  # six brackets, two deep
    ],
)  # fmt: skip
def test_loads_bounded_takes_what_is_shallow_enough_with_or_without_the_scan(raw: bytes, value: object) -> None:
    assert loads_bounded(raw, what="header", max_bytes=16 * 1024, max_depth=4, invalid="bad_header") == value
    with pytest.raises(WireError) as err:  # one level deeper is refused (more brackets than allowed: the scan)
        loads_bounded(b"[" + raw + b"]", what="header", max_bytes=16 * 1024, max_depth=json_depth(raw),
                      invalid="bad_header")  # fmt: skip
    assert err.value.reason == "too_deep"


def test_a_deep_header_and_a_deep_safetensors_header_are_wire_errors() -> None:
    with pytest.raises(WireError) as err:
        Header.from_json(b"[" * 3000 + b"]" * 3000, t_model_send=None, t_model_arrive=None)
    assert err.value.reason == "too_deep"
    with pytest.raises(WireError) as err:
        Header.from_json(b" " * (MAX_HEADER_BYTES + 1), t_model_send=None, t_model_arrive=None)
    assert err.value.reason == "oversized"
    frame = body_nesting(20_000)
    with pytest.raises(WireError) as err:
        decode(frame)
    assert err.value.reason == "too_deep"
    with pytest.raises(WireError) as err:
        decode_body((10**9).to_bytes(8, "little") + b"{}")
    assert err.value.reason == "bad_body"


def test_sizes_of_the_two_attacks_match_the_issue() -> None:
    assert 6_000 <= len(header_nesting(3_000)) <= 7_000
    assert 40_000 <= len(body_nesting(20_000)) <= 41_000


def test_real_messages_are_far_from_the_limits() -> None:
    tensors = {f"layer{i}.weight": np.ones((2, 3), np.float32) for i in range(50)}
    msg = decode(encode(kind=Kind.UPDATE, run=RUN, src="client-0", dst="coordinator", tensors=tensors,
                        meta={"samples": 3, "loss": 0.5, "op": "fit"}, compression="int8").payload)  # fmt: skip
    assert set(msg.tensors) == set(tensors)


# -- over a real broker, to a live session ---------------------------------------------------------
@needs_mosquitto
async def test_deep_json_is_counted_and_the_session_keeps_serving(mosquitto: MosquittoBroker) -> None:
    fast = dict(reconnect_initial_s=0.05, reconnect_max_s=0.3, connect_timeout_s=5.0)
    good = encode(kind=Kind.LATENT, run=RUN, src="client-0", dst="client-1",
                  tensors={"h": np.ones((2, 4), np.float32)}).payload  # fmt: skip
    async with (
        BusSession(BusConfig(RUN, "client-1", mosquitto.address_for("client-1"), **fast)) as c1,
        raw_client(mosquitto.address_for("client-0")) as attacker,
    ):
        await attacker.publish(T.rx("client-1", "client-0", Kind.CTRL), header_nesting(3_000), qos=1)
        await attacker.publish(T.rx("client-1", "client-0", Kind.LATENT), body_nesting(20_000), qos=1)
        await attacker.publish(T.rx("client-1", "client-0", Kind.LATENT), good, qos=1)
        msg = await c1.receive(timeout=10)
        assert np.array_equal(msg.tensors["h"], np.ones((2, 4), np.float32))
        assert c1.connected and c1.stats.reconnects == 0
    assert dict(c1.stats.rejected) == {"too_deep": 2}
