"""JSON from the wire, bounded before it is parsed: size first, then nesting depth.

Python's ``json`` recurses once per nested array or object, so a few kilobytes of ``[`` raise
RecursionError (not a ValueError) from deep inside the decoder; the message headers and the
safetensors header inside a body are JSON received from other agents. :func:`loads_bounded`
refuses a document that is too long or nests too deep before ``json.loads`` sees it, and turns
every parse failure into a :class:`WireError`.

The depth is found by a pre-scan over the raw bytes rather than by a hand-written bounded parser:
the scan is a few vectorized numpy passes (linear, in C, about 20 ms for a 4 MiB safetensors
header), whereas a parser of our own in Python would be slower by orders of magnitude and a second
JSON grammar to keep right. It counts ``[`` and ``{`` outside strings. Escapes are neutralised
first (``\\\\`` then ``\\"``), which is exact for every valid JSON prefix; past the point where
a document stops being valid JSON the count may be anything, but the parser never recurses there.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from nmoe.errors import WireError

_OPEN = np.zeros(256, np.int16)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1
_QUOTE = ord('"')


def json_depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON document (0 for a scalar).

    Exact for valid JSON; for invalid JSON, at least the depth any valid prefix reaches (which
    is all a recursive parser can reach before it fails).
    """
    text = raw.replace(b"\\\\", b"__").replace(b'\\"', b"__")
    codes = np.frombuffer(text, np.uint8)
    # Parity of the quotes seen so far: odd inside a string. uint8 wraps at 256, parity survives.
    in_string = np.cumsum(codes == _QUOTE, dtype=np.uint8) & 1
    steps = np.where(in_string == 0, _OPEN[codes], np.int16(0))
    # int16 may wrap past 32767, but every +1 step passes through each depth on the way, so the
    # maximum is still at least min(depth, 32767): enough to compare with any sane limit.
    return int(np.cumsum(steps, dtype=np.int16).max(initial=0))


def loads_bounded(raw: bytes, *, what: str, max_bytes: int, max_depth: int, invalid: str) -> Any:
    """``json.loads(raw)`` once ``raw`` is known to be at most ``max_bytes`` long and nest at most
    ``max_depth`` deep; every failure is a WireError: ``oversized``, ``too_deep``, or ``invalid``
    (the caller's reason for a document that is not JSON). NaN and Infinity are refused."""
    if len(raw) > max_bytes:
        raise WireError("oversized", f"{what} is {len(raw)} bytes > {max_bytes}")
    # No document nests deeper than it has brackets: a header with few needs no scan (the scan's
    # numpy passes cost about 10 µs even for a few hundred bytes, twice per message).
    brackets = raw.count(b"[") + raw.count(b"{")
    if brackets > max_depth and (depth := json_depth(raw)) > max_depth:
        shown = f">= {depth}" if depth >= np.iinfo(np.int16).max else str(depth)
        raise WireError("too_deep", f"{what} nests {shown} levels > {max_depth}")
    try:
        # Decoded here, strictly: json.loads(bytes) would also take UTF-16 and UTF-32, whose
        # escapes the byte scan above does not see. UTF-8 never puts an ASCII byte inside a
        # multi-byte character, so the scan is exact on it.
        text = raw.decode("utf-8")
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise WireError(invalid, f"{what} is not valid UTF-8 JSON") from err


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not allowed")
