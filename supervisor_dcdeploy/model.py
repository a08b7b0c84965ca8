"""Domain values read from and written to the coordination store.

Every value that crosses the store boundary is parsed here, once, into a frozen dataclass.
Parsing never trusts the store: anything malformed raises :class:`InvalidData` naming the
path and the field, so an agent can report it and refuse to act on it (DESIGN §6: garbage
written by hand with ``zkCli.sh set`` or ``consul kv put``).
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import math
import re
from dataclasses import asdict, dataclass, field
from itertools import accumulate, count
from operator import sub
from typing import Any, Callable, Mapping

# Patterns are used with fullmatch: "$" would accept a trailing newline.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
SEQ_RE = re.compile(r"[0-9]{1,10}")  # ZooKeeper's and our Consul store's 10-digit sequences

# Bounds on everything read from the store (docs/store-layout.md, "Bounds on every value").
# A value outside them is invalid data, reported and never acted on.
MAX_VALUE_BYTES = 1024 * 1024  # ZooKeeper's default jute.maxbuffer: no node holds more
MAX_DEPTH = 8  # deepest JSON nesting we write is 3 (a host's fetch states)
MAX_INT_DIGITS = 19  # fits in 64 bits
MAX_FLOAT_CHARS = 32  # a float literal longer than this is not one we wrote
MAX_NODE_NAME = 255
MAX_TIMESTAMP = 1e11  # seconds since the epoch (year 5138): staged_at, since, updated, ...
MAX_HOSTS = 100_000  # bound for quorum and max_parallel
MAX_TIMEOUT_SECS = 600.0  # a health check's timeout
MAX_HEALTHY_SECS = 86_400.0  # how long a check must hold after a start
MAX_SIZE_BYTES = 1 << 50  # a release's size (1 PiB)
MAX_LIST = 1000  # depends_on, a host's services, urls, a host's fetch states

DEPLOY_STATES = ("waiting", "rolling", "paused", "failed", "done", "aborted")
ACTIVE_STATES = ("waiting", "rolling")
HEALTH_KINDS = ("http", "tcp", "cmd", "none")


class InvalidData(ValueError):
    """A value in the store (or given by an operator) is malformed.

    ``where`` names the store path or the CLI argument, ``field`` the offending field.
    """

    def __init__(self, where: str, field_name: str, problem: str) -> None:
        self.where = where
        self.field = field_name
        self.problem = problem
        super().__init__(f"{where}: field {field_name!r}: {problem}")


class _Refused(ValueError):
    """Raised from inside json.loads by the number hooks below."""


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _Refused(f"an integer with {len(text.lstrip('-'))} digits "
                       f"(at most {MAX_INT_DIGITS})")
    return int(text)


def _parse_float(text: str) -> float:
    if len(text) > MAX_FLOAT_CHARS:
        raise _Refused(f"a number written with {len(text)} characters "
                       f"(at most {MAX_FLOAT_CHARS})")
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"the number {text} is out of range")
    return value


def _parse_constant(text: str) -> Any:
    raise _Refused(f"{text} is not a number JSON allows")


# A JSON string, or an unterminated one running to the end. The second alternative keeps the
# skip linear: without it, every quote after an unterminated one would rescan to the end.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.S)
_NOT_BRACKET = re.compile(rb"[^\[\]{}]+")
_DEPTH_STEP = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")


def json_depth(raw: bytes) -> int:
    """The deepest bracket nesting of ``raw`` outside strings, without recursion (json.loads
    recurses once per level: 100,000 ``[`` raise RecursionError). For text that is not JSON
    the answer is an upper bound of how deep json.loads gets before it gives up."""
    skeleton = _NOT_BRACKET.sub(b"", _JSON_STRING.sub(b"", raw)).translate(_DEPTH_STEP)
    if not skeleton:
        return 0
    # Opening brackets count 2, closing 0: the depth after i+1 brackets is the sum minus i+1.
    return max(0, max(map(sub, accumulate(skeleton), count(1))))


def _none_instead(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def lenient(text: str) -> Any:
        try:
            return parse(text)
        except _Refused:
            return None
    return lenient


def load_json(where: str, raw: bytes | str | None, *, strict_numbers: bool = True) -> Any:
    """Parse one store value as bounded JSON: at most MAX_VALUE_BYTES, MAX_DEPTH levels,
    integers of at most MAX_INT_DIGITS digits, finite numbers only, valid Unicode. Any
    other input raises :class:`InvalidData`; nothing else escapes. With ``strict_numbers``
    False, refused numbers read as None instead (to salvage the rest of a bad value)."""
    if raw is None:
        raise InvalidData(where, "(node)", "no data")
    if isinstance(raw, str):
        try:
            raw = raw.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidData(where, "(json)", "not valid Unicode") from None
    if not isinstance(raw, (bytes, bytearray)):
        raise InvalidData(where, "(node)", f"expected bytes, got {type(raw).__name__}")
    if len(raw) > MAX_VALUE_BYTES:
        raise InvalidData(where, "(node)", f"{len(raw)} bytes, more than the "
                                           f"{MAX_VALUE_BYTES} a value may have")
    depth = json_depth(bytes(raw))
    if depth > MAX_DEPTH:
        raise InvalidData(where, "(json)", f"nested {depth} levels deep (at most {MAX_DEPTH})")
    try:
        text = raw.decode("utf-8")
        if strict_numbers:
            return json.loads(text, parse_int=_parse_int, parse_float=_parse_float,
                              parse_constant=_parse_constant)
        return json.loads(text, parse_int=_none_instead(_parse_int),
                          parse_float=_none_instead(_parse_float),
                          parse_constant=_none_instead(_parse_constant))
    except _Refused as exc:
        raise InvalidData(where, "(json)", f"refused: {exc}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidData(where, "(json)", f"not valid JSON: {exc}") from None


def _load(where: str, raw: bytes | str | None) -> dict[str, Any]:
    data = load_json(where, raw)
    if not isinstance(data, dict):
        raise InvalidData(where, "(json)", f"expected a JSON object, got {type(data).__name__}")
    return data


def _get(where: str, data: Mapping[str, Any], name: str, kind: type | tuple[type, ...],
         default: Any = ..., ) -> Any:
    if name not in data or data[name] is None:
        if default is ...:
            raise InvalidData(where, name, "missing")
        return default
    value = data[name]
    # bool is an int subclass: never accept it where a number is asked for.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise InvalidData(where, name, f"expected {_kind_name(kind)}, got {value!r}")
    if not isinstance(value, kind):
        raise InvalidData(where, name, f"expected {_kind_name(kind)}, got {_short(value)}")
    if isinstance(value, str):
        check_text(where, name, value)
    elif isinstance(value, list):
        if len(value) > MAX_LIST:
            raise InvalidData(where, name, f"{len(value)} entries (at most {MAX_LIST})")
    elif isinstance(value, float) and not math.isfinite(value):
        raise InvalidData(where, name, f"{value} is not a finite number")
    return value


def _short(value: Any, limit: int = 80) -> str:
    """repr() of a value, cut to ``limit`` characters: problems stay one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def check_text(where: str, field_name: str, value: str) -> str:
    """A string read from the store must be printable Unicode (no lone surrogates, which
    cannot be written to a terminal or a file as UTF-8)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidData(where, field_name, f"{_short(value)} is not valid Unicode") from None
    return value


def check_number(where: str, data: Mapping[str, Any], name: str, default: float,
                 low: float, high: float, *, low_open: bool = False) -> float:
    """A finite number in [low, high] (or (low, high] with ``low_open``)."""
    value = float(_get(where, data, name, (int, float), default))
    if not math.isfinite(value) or value > high or value < low or \
            (low_open and value == low):
        bracket = "(" if low_open else "["
        raise InvalidData(where, name, f"{value:g} is outside {bracket}{low:g}, {high:g}]")
    return value


def check_int(where: str, data: Mapping[str, Any], name: str, default: Any,
              low: int, high: int) -> Any:
    """An integer in [low, high] (or ``default`` when absent)."""
    value = _get(where, data, name, int, default)
    if value is not None and not low <= value <= high:
        raise InvalidData(where, name, f"{value} is outside [{low}, {high}]")
    return value


def check_seq(where: str, node: str) -> int:
    """The sequence number a store node name ends in (``item-0000000042``)."""
    digits = node.rpartition("-")[2]
    if len(node) > MAX_NODE_NAME or not SEQ_RE.fullmatch(digits):
        raise InvalidData(where, "(name)", f"{_short(node)} does not end in a sequence number")
    return int(digits)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__


def check_name(where: str, field_name: str, value: str) -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise InvalidData(where, field_name,
                          f"{_short(value)} is not a valid name (letters, digits, '_', '.', '-'; "
                          "at most 63 characters)")
    return value


def check_version(where: str, field_name: str, value: str) -> str:
    if not isinstance(value, str) or not VERSION_RE.fullmatch(value):
        raise InvalidData(where, field_name,
                          f"{_short(value)} is not a valid version "
                          "(letters, digits, '_', '.', '+', '-')")
    return value


FETCH_FIELDS = ("version", "state", "error")


def check_fetch_states(where: str, fetch: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """A host's ``fetch``: service -> {version, state, error}, each a string or null."""
    if len(fetch) > MAX_LIST:
        raise InvalidData(where, "fetch", f"{len(fetch)} entries (at most {MAX_LIST})")
    out: dict[str, dict[str, str]] = {}
    for svc, states in fetch.items():
        check_name(where, "fetch", svc)
        if not isinstance(states, dict):
            raise InvalidData(where, f"fetch.{svc}", f"expected an object, got {_short(states)}")
        for key, value in states.items():
            if key not in FETCH_FIELDS:
                raise InvalidData(where, f"fetch.{svc}", f"unknown field {_short(key)}")
            if value is None:
                continue
            if not isinstance(value, str):
                raise InvalidData(where, f"fetch.{svc}.{key}",
                                  f"expected str, got {_short(value)}")
            check_text(where, f"fetch.{svc}.{key}", value)
        out[svc] = dict(states)
    return out


@functools.lru_cache(maxsize=32)
def _torrent_problem(b64: str) -> str | None:
    """Why a staged ``torrent`` (base64 metainfo) is unusable, or None. Cached: agents read
    the same staged release every cycle."""
    from .p2p.torrent import check_metainfo  # bencode with depth and size limits
    try:
        meta = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        return f"not base64: {exc}"
    try:
        check_metainfo(meta)
    except ValueError as exc:
        return f"not a usable torrent metainfo: {exc}"
    return None


def check_torrent(where: str, field_name: str, b64: str) -> str:
    problem = _torrent_problem(b64)
    if problem:
        raise InvalidData(where, field_name, problem)
    return b64


def dumps(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def version_key(version: str) -> tuple:
    """Natural sort key: ``1.10`` is newer than ``1.9``."""
    parts = re.split(r"(\d+)", version)
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts if p)


@dataclass(frozen=True)
class HealthCheck:
    kind: str = "none"  # http | tcp | cmd | none
    target: str = ""  # URL, host:port or shell command; may use {host} and host-local vars
    timeout: float = 2.0

    @classmethod
    def parse(cls, where: str, data: Any) -> "HealthCheck":
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise InvalidData(where, "health", f"expected an object, got {_short(data)}")
        kind = _get(where, data, "kind", str)
        if kind not in HEALTH_KINDS:
            raise InvalidData(where, "health.kind", f"{_short(kind)} is not one of {HEALTH_KINDS}")
        target = _get(where, data, "target", str, "")
        if kind != "none" and not target:
            raise InvalidData(where, "health.target", f"a {kind} check needs a target")
        if kind == "tcp" and target.rpartition(":")[2].strip("{}") == "":
            raise InvalidData(where, "health.target", f"{_short(target)} is not HOST:PORT")
        timeout = check_number(where, data, "timeout", 2.0, 0.0, MAX_TIMEOUT_SECS,
                               low_open=True)
        return cls(kind, target, timeout)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ServiceSpec:
    """``/dc/services/<svc>``: how a service is rolled."""

    name: str
    program: str
    quorum: int
    depends_on: tuple[str, ...] = ()
    max_parallel: int = 1
    health: HealthCheck = field(default_factory=HealthCheck)
    healthy_secs: float = 0.0
    preload: bool = False

    @classmethod
    def parse(cls, name: str, raw: bytes | str | None, where: str | None = None) -> "ServiceSpec":
        where = where or f"services/{name}"
        check_name(where, "name", name)
        data = _load(where, raw)
        program = check_name(where, "program", _get(where, data, "program", str))
        quorum = check_int(where, data, "quorum", ..., 0, MAX_HOSTS)
        deps = _get(where, data, "depends_on", list, [])
        for i, dep in enumerate(deps):
            check_name(where, f"depends_on[{i}]", dep)
        if name in deps:
            raise InvalidData(where, "depends_on", f"service {name!r} cannot depend on itself")
        max_parallel = check_int(where, data, "max_parallel", 1, 1, MAX_HOSTS)
        healthy_secs = check_number(where, data, "healthy_secs", 0.0, 0.0, MAX_HEALTHY_SECS)
        return cls(name=name, program=program, quorum=quorum, depends_on=tuple(deps),
                   max_parallel=max_parallel,
                   health=HealthCheck.parse(where, data.get("health")),
                   healthy_secs=healthy_secs,
                   preload=_get(where, data, "preload", bool, False))

    def to_json(self) -> bytes:
        return dumps({"program": self.program, "quorum": self.quorum,
                      "depends_on": list(self.depends_on), "max_parallel": self.max_parallel,
                      "health": self.health.to_dict(), "healthy_secs": self.healthy_secs,
                      "preload": self.preload})


@dataclass(frozen=True)
class StagedRelease:
    """``/dc/staging/<svc>`` data: the release hosts should prefetch."""

    service: str
    version: str
    sha256: str
    size: int | None = None
    urls: tuple[str, ...] = ()
    torrent: str | None = None  # base64 of the .torrent metainfo (issue: p2p distribution)
    staged_at: float = 0.0

    @classmethod
    def parse(cls, service: str, raw: bytes | str | None,
              where: str | None = None) -> "StagedRelease":
        where = where or f"staging/{service}"
        data = _load(where, raw)
        version = check_version(where, "version", _get(where, data, "version", str))
        sha = _get(where, data, "sha256", str).lower()
        if not SHA256_RE.fullmatch(sha):
            raise InvalidData(where, "sha256", f"{_short(sha)} is not 64 hex digits")
        size = check_int(where, data, "size", None, 0, MAX_SIZE_BYTES)
        urls = data.get("urls")
        if urls is None and isinstance(data.get("url"), str):
            urls = [data["url"]]
        urls = urls or []
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            raise InvalidData(where, "urls", f"expected a list of URLs, got {_short(urls)}")
        if len(urls) > MAX_LIST:
            raise InvalidData(where, "urls", f"{len(urls)} entries (at most {MAX_LIST})")
        for i, url in enumerate(urls):
            check_text(where, f"urls[{i}]", url)
            if not re.match(r"(https?|file)://", url):
                raise InvalidData(where, f"urls[{i}]",
                                  f"{_short(url)}: scheme must be http, https or file")
        torrent = _get(where, data, "torrent", str, None)
        if torrent:
            check_torrent(where, "torrent", torrent)
        if not urls and not torrent:
            raise InvalidData(where, "urls", "a staged release needs a url or a torrent")
        staged_at = check_number(where, data, "staged_at", 0.0, 0.0, MAX_TIMESTAMP)
        return cls(service, version, sha, size, tuple(urls), torrent, staged_at)

    def to_json(self) -> bytes:
        data: dict[str, Any] = {"version": self.version, "sha256": self.sha256,
                                "urls": list(self.urls), "staged_at": self.staged_at}
        if self.size is not None:
            data["size"] = self.size
        if self.torrent:
            data["torrent"] = self.torrent
        return dumps(data)


@dataclass(frozen=True)
class CurrentEntry:
    """``/dc/current/<svc>/<host>``: the host serves ``version`` (ephemeral)."""

    host: str
    version: str
    state: str = "serving"
    since: float = 0.0
    rack: str = ""

    @classmethod
    def parse(cls, service: str, host: str, raw: bytes | str | None) -> "CurrentEntry":
        where = f"current/{service}/{host}"
        check_name(where, "(name)", host)
        data = _load(where, raw)
        return cls(host=host,
                   version=check_version(where, "version", _get(where, data, "version", str)),
                   state=_get(where, data, "state", str, "serving"),
                   since=check_number(where, data, "since", 0.0, 0.0, MAX_TIMESTAMP),
                   rack=_get(where, data, "rack", str, ""))

    def to_json(self) -> bytes:
        return dumps({"version": self.version, "state": self.state, "since": self.since,
                      "rack": self.rack})


@dataclass(frozen=True)
class StagingEntry:
    """``/dc/staging/<svc>/<seq>-<host>``: ``host`` holds ``version`` and is ready to roll."""

    node: str  # the znode name, "<host>-<seq>" (sequence suffix added by the store)
    seq: int
    host: str
    version: str

    @classmethod
    def parse(cls, service: str, node: str, raw: bytes | str | None) -> "StagingEntry":
        where = f"staging/{service}/{node}"
        host, sep, seq = node.rpartition("-")
        if not sep or len(node) > MAX_NODE_NAME or not SEQ_RE.fullmatch(seq):
            raise InvalidData(where, "(name)", f"{_short(node)} is not <host>-<sequence>")
        check_name(where, "(name)", host)
        data = _load(where, raw)
        version = check_version(where, "version", _get(where, data, "version", str))
        return cls(node, int(seq), host, version)


@dataclass(frozen=True)
class DeployItem:
    """``/dc/deploy/<seq>``: one service to roll to one version."""

    node: str
    seq: int
    service: str
    version: str
    state: str = "waiting"
    reason: str | None = None
    host: str | None = None  # the host that failed it, when failed
    updated: float = 0.0
    data_version: int = -1  # the store's version of the node, for CAS writes

    @classmethod
    def parse(cls, node: str, raw: bytes | str | None, data_version: int = -1,
              where: str | None = None) -> "DeployItem":
        where = where or f"deploy/{node}"
        seq = check_seq(where, node)
        data = _load(where, raw)
        state = _get(where, data, "state", str, "waiting")
        if state not in DEPLOY_STATES:
            raise InvalidData(where, "state", f"{_short(state)} is not one of {DEPLOY_STATES}")
        return cls(node=node, seq=seq,
                   service=check_name(where, "service", _get(where, data, "service", str)),
                   version=check_version(where, "version", _get(where, data, "version", str)),
                   state=state, reason=_get(where, data, "reason", str, None),
                   host=_get(where, data, "host", str, None),
                   updated=check_number(where, data, "updated", 0.0, 0.0, MAX_TIMESTAMP),
                   data_version=data_version)

    def to_json(self) -> bytes:
        return dumps({"service": self.service, "version": self.version, "state": self.state,
                      "reason": self.reason, "host": self.host, "updated": self.updated})


@dataclass(frozen=True)
class HostInfo:
    """``/dc/hosts/<host>``: the registry of hosts, online or not (persistent)."""

    name: str
    rack: str = ""
    services: tuple[str, ...] = ()
    last_seen: float = 0.0
    fetch: Mapping[str, Any] = field(default_factory=dict)  # svc -> {version, state, error}

    @classmethod
    def parse(cls, name: str, raw: bytes | str | None) -> "HostInfo":
        where = f"hosts/{name}"
        check_name(where, "(name)", name)
        data = _load(where, raw)
        services = _get(where, data, "services", list, [])
        for i, svc in enumerate(services):
            check_name(where, f"services[{i}]", svc)
        return cls(name, _get(where, data, "rack", str, ""), tuple(services),
                   check_number(where, data, "last_seen", 0.0, 0.0, MAX_TIMESTAMP),
                   check_fetch_states(where, _get(where, data, "fetch", dict, {})))

    def to_json(self) -> bytes:
        return dumps({"rack": self.rack, "services": list(self.services),
                      "last_seen": self.last_seen, "fetch": dict(self.fetch)})
