"""Bencoding (BEP 3), the small subset a tracker and a metainfo reader need.

Pure functions; :func:`decode` rejects anything that is not canonical enough to round-trip
(trailing data, leading zeros, unsorted dictionaries are accepted but re-encode sorted).

Decoding is bounded, since metainfo comes from the store and announces from the network:
at most ``MAX_DEPTH`` nested lists/dictionaries (a 100,000-deep ``llll...`` would otherwise
raise RecursionError), ``MAX_INPUT`` bytes and integers of at most ``MAX_INT_DIGITS`` digits.
Every violation is a :class:`BencodeError` naming the offset.

Why not torf's decoder: torf 4.3 ships one only as a private module (``torf._flatbencode``,
its copy of the unmaintained flatbencode), so any torf release may move it. It has no
depth, size or integer bound: it decodes a 100,000-deep ``llll...`` into a value that
then raises RecursionError in whatever walks it (``repr`` does), and a 5,000-digit integer
raises a bare ValueError from ``int()``. It gives no byte spans, which :func:`info_span`
needs (the infohash is the SHA-1 of the ``info`` bytes as written, not as re-encoded), and
its encoder takes only bytes keys. A depth pre-check in front of it would have to tokenize
string lengths to tell a structural ``l`` from one inside a string: a second parser of the
same grammar, as long as this one. So this module stays; torf builds the torrents.
"""

from __future__ import annotations

import re
from typing import Any, Union

Value = Union[int, bytes, list, dict]


MAX_DEPTH = 32  # a metainfo needs 5 (dict > info > files > file > path)
MAX_INPUT = 1024 * 1024  # the store's value limit; a metainfo of 1 MiB describes ~50,000 pieces
MAX_INT_DIGITS = 20
_INT = re.compile(rb"-?[0-9]+")


class BencodeError(ValueError):
    """The input is not valid bencoding; the message names the offset."""


def _check_input(data: bytes, max_size: int) -> None:
    if not isinstance(data, (bytes, bytearray)):
        raise BencodeError(f"expected bytes, got {type(data).__name__}")
    if len(data) > max_size:
        raise BencodeError(f"{len(data)} bytes, more than the {max_size} allowed")


def encode(value: Any) -> bytes:
    """Encode ints, bytes, str (as UTF-8), lists/tuples and dicts (keys sorted as bytes).

    Raises :class:`TypeError` for anything else (floats, None, bools)."""
    out: list[bytes] = []
    _encode(value, out)
    return b"".join(out)


def _encode(value: Any, out: list[bytes]) -> None:
    if isinstance(value, bool):
        raise TypeError("bencode has no booleans; use 0 or 1")
    if isinstance(value, int):
        out.append(b"i%de" % value)
    elif isinstance(value, (bytes, bytearray)):
        out.append(b"%d:" % len(value))
        out.append(bytes(value))
    elif isinstance(value, str):
        _encode(value.encode("utf-8"), out)
    elif isinstance(value, (list, tuple)):
        out.append(b"l")
        for item in value:
            _encode(item, out)
        out.append(b"e")
    elif isinstance(value, dict):
        out.append(b"d")
        items = [(k.encode("utf-8") if isinstance(k, str) else bytes(k), v)
                 for k, v in value.items()]
        for key, item in sorted(items):
            _encode(key, out)
            _encode(item, out)
        out.append(b"e")
    else:
        raise TypeError(f"cannot bencode {type(value).__name__}")


def decode(data: bytes, max_size: int = MAX_INPUT) -> Value:
    """Decode one bencoded value that spans all of ``data``; raise :class:`BencodeError`."""
    _check_input(data, max_size)
    value, end = _decode(data, 0)
    if end != len(data):
        raise BencodeError(f"trailing data at offset {end}")
    return value


def decode_prefix(data: bytes, start: int = 0) -> tuple[Value, int, int]:
    """Decode one value starting at ``start``; return (value, start, end) so a caller can
    hash the exact bytes of a sub-value (the ``info`` dictionary of a metainfo)."""
    _check_input(data, MAX_INPUT)
    value, end = _decode(data, start)
    return value, start, end


def _decode(data: bytes, i: int, depth: int = 0) -> tuple[Value, int]:
    if i >= len(data):
        raise BencodeError(f"unexpected end at offset {i}")
    c = data[i:i + 1]
    if c == b"i":
        end = data.find(b"e", i)
        if end < 0:
            raise BencodeError(f"unterminated integer at offset {i}")
        text = data[i + 1:end]
        if len(text) > MAX_INT_DIGITS + 1:  # and a sign
            raise BencodeError(f"integer at offset {i} has more than {MAX_INT_DIGITS} digits")
        if not _INT.fullmatch(text) or (text.startswith(b"0") and len(text) > 1) \
                or text.startswith(b"-0"):
            raise BencodeError(f"bad integer {text!r} at offset {i}")
        return int(text), end + 1
    if c.isdigit():
        colon = data.find(b":", i, i + MAX_INT_DIGITS + 1)
        if colon < 0 or not data[i:colon].isdigit():
            raise BencodeError(f"bad string length at offset {i}")
        length = int(data[i:colon])
        start, end = colon + 1, colon + 1 + length
        if end > len(data):
            raise BencodeError(f"string at offset {i} runs past the end")
        return data[start:end], end
    if c in (b"l", b"d") and depth >= MAX_DEPTH:
        raise BencodeError(f"nested deeper than {MAX_DEPTH} levels at offset {i}")
    if c == b"l":
        items = []
        i += 1
        while data[i:i + 1] != b"e":
            item, i = _decode(data, i, depth + 1)
            items.append(item)
        return items, i + 1
    if c == b"d":
        result: dict[bytes, Value] = {}
        i += 1
        while data[i:i + 1] != b"e":
            key, i = _decode(data, i, depth + 1)
            if not isinstance(key, bytes):
                raise BencodeError(f"dictionary key at offset {i} is not a string")
            result[key], i = _decode(data, i, depth + 1)
        return result, i + 1
    raise BencodeError(f"unexpected byte {c!r} at offset {i}")


def info_span(metainfo: bytes) -> tuple[int, int]:
    """(start, end) of the ``info`` value's bytes inside a metainfo dictionary.

    The infohash is the SHA-1 of exactly these bytes, as written (BEP 3)."""
    _check_input(metainfo, MAX_INPUT)
    if metainfo[:1] != b"d":
        raise BencodeError("metainfo is not a dictionary")
    i = 1
    while metainfo[i:i + 1] != b"e":
        key, i = _decode(metainfo, i, 1)
        start = i
        _, i = _decode(metainfo, i, 1)
        if key == b"info":
            return start, i
    raise BencodeError("metainfo has no 'info' dictionary")
