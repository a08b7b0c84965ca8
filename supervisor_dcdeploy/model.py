"""Domain values read from and written to the coordination store.

Every value that crosses the store boundary is parsed here, once, into a frozen dataclass.
Parsing never trusts the store: anything malformed raises :class:`InvalidData` naming the
path and the field, so an agent can report it and refuse to act on it (docs/design.md §6: garbage
written by hand with ``zkCli.sh set`` or ``consul kv put``).
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import math
import re
from dataclasses import dataclass, field
from itertools import accumulate, count
from operator import sub
from typing import Any, Callable, ClassVar, Mapping

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
MAX_HOST_PARALLEL = 64  # a deploy's --host-parallel

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


def _signature(where: str, data: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The operator's ``"signature"`` object, kept as is (checked by trust.py)."""
    value = data.get("signature")
    if value is not None and not isinstance(value, dict):
        raise InvalidData(where, "signature", f"expected an object, got {value!r}")
    return value


def _with_signature(data: dict[str, Any], signature: Mapping[str, Any] | None) -> dict:
    if signature is not None:
        data["signature"] = dict(signature)
    return data


FETCH_FIELDS = ("version", "state", "error", "kind")


def check_fetch_states(where: str, fetch: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """A host's ``fetch``: service -> {version, state, error, kind}, each a string or null."""
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


@functools.lru_cache(maxsize=32)
def _torrent_size(b64: str) -> int:
    """The payload bytes a torrent (already checked by :func:`check_torrent`) describes."""
    from .p2p.torrent import torrent_size
    return torrent_size(base64.b64decode(b64, validate=True))


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
    """A service's health check as the store may state it: *which* check, never *how*.

    The store is not trusted to say what a host runs or connects to (docs/protocol.md,
    "Health checks"), so a spec only names things each host resolves from its own
    ``agent.conf``:

    - ``{"kind": "http", "path": "/health", "port": "port"}``: ``GET`` of ``path`` on the
      host's own ``address`` (``[service:NAME] address``, default ``127.0.0.1``) at the port
      held by the host-local variable ``port`` (a key of ``[service:NAME]``; a number is
      taken as the port itself);
    - ``{"kind": "tcp", "port": "port"}``: a TCP connect to the same address and port;
    - ``{"kind": "cmd", "check": "NAME"}``: the argv of ``[check:NAME]`` in the host's
      ``agent.conf``, run without a shell;
    - ``{"kind": "none"}``.

    Old specs with a ``target`` are read only where that is safe: an http or tcp target on
    the loopback (or ``{address}``) whose port is a ``{var}`` or a number is converted; any
    other target, and every ``cmd`` target (a shell command from the store), is refused as
    :class:`InvalidData` with the migration in words.
    """

    kind: str = "none"  # http | tcp | cmd | none
    path: str = "/"  # http: the URL path on the host's own address
    port: str | int = "port"  # http, tcp: a [service:NAME] key holding the port, or a port number
    check: str = ""  # cmd: the name of a [check:NAME] section in the host's agent.conf
    timeout: float = 2.0

    FIELDS: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "http": ("path", "port"), "tcp": ("port",), "cmd": ("check",), "none": ()}
    PORT_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
    PATH_RE = re.compile(r"/[\x21-\x7e]{0,511}")  # printable ASCII, no space, bounded
    MAX_TIMEOUT = MAX_TIMEOUT_SECS
    # Old-style targets kept readable: loopback (or the host's own {address}) only.
    _LEGACY_HOST = r"(?:127\.0\.0\.1|localhost|\[::1\]|\{address\})"
    _LEGACY_PORT = r"(?:\{(?P<key>[A-Za-z_][A-Za-z0-9_]{0,62})\}|(?P<num>[0-9]{1,5}))"
    LEGACY_HTTP_RE = re.compile(rf"http://{_LEGACY_HOST}:{_LEGACY_PORT}(?P<path>/[\x21-\x7e]*)?")
    LEGACY_TCP_RE = re.compile(rf"{_LEGACY_HOST}:{_LEGACY_PORT}")

    @classmethod
    def parse(cls, where: str, data: Any) -> "HealthCheck":
        """Validate ``health`` of a spec; raises :class:`InvalidData` naming the field."""
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise InvalidData(where, "health", f"expected an object, got {_short(data)}")
        kind = _get(where, data, "kind", str)
        if kind not in HEALTH_KINDS:
            raise InvalidData(where, "health.kind", f"{_short(kind)} is not one of {HEALTH_KINDS}")
        timeout = cls._timeout(where, data.get("timeout", 2.0))
        if "target" in data:
            return cls._legacy(where, kind, data, timeout)
        allowed = {"kind", "timeout", *cls.FIELDS[kind]}
        extra = sorted(set(data) - allowed)
        if extra:
            raise InvalidData(where, f"health.{extra[0]}",
                              f"not a field of a {kind} check (fields: {sorted(allowed)})")
        if kind == "none":
            return cls()
        if kind == "cmd":
            name = _get(where, data, "check", str, "")
            if not name:
                raise InvalidData(where, "health.check",
                                  "a cmd check names a [check:NAME] section of the hosts' "
                                  "agent.conf, e.g. {\"kind\": \"cmd\", \"check\": \"api\"}")
            return cls(kind="cmd", check=check_name(where, "health.check", name),
                       timeout=timeout)
        port = cls._port(where, data.get("port", "port"))
        if kind == "tcp":
            return cls(kind="tcp", port=port, timeout=timeout)
        path = _get(where, data, "path", str, "/")
        if not cls.PATH_RE.fullmatch(path):
            raise InvalidData(where, "health.path",
                              f"{path[:80]!r} is not a URL path (starts with '/', printable "
                              "ASCII without spaces, at most 512 characters)")
        return cls(kind="http", path=path, port=port, timeout=timeout)

    @classmethod
    def _timeout(cls, where: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not 0 < value <= cls.MAX_TIMEOUT:  # False for NaN; ints compared exactly
            raise InvalidData(where, "health.timeout",
                              f"expected seconds in (0, {cls.MAX_TIMEOUT:g}], got {value!r:.40}")
        return float(value)

    @classmethod
    def _port(cls, where: str, value: Any) -> str | int:
        if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536:
            return value
        if isinstance(value, str) and cls.PORT_KEY_RE.fullmatch(value):
            return value
        raise InvalidData(where, "health.port",
                          f"expected the name of a host-local variable holding the port (a "
                          f"key of [service:NAME] in agent.conf, e.g. \"port\") or a port "
                          f"number, got {value!r:.40}")

    @classmethod
    def _legacy(cls, where: str, kind: str, data: dict, timeout: float) -> "HealthCheck":
        target = _get(where, data, "target", str, "")
        extra = sorted(set(data) - {"kind", "target", "timeout"})
        if extra:
            raise InvalidData(where, f"health.{extra[0]}", "not a field of an old-style check")
        if kind == "none":
            return cls()
        if kind == "cmd":
            raise InvalidData(where, "health.target",
                              "a command from the store is never run (it would run as root on "
                              "every host): define it in each host's agent.conf as [check:NAME] "
                              "argv = ... and name it here: {\"kind\": \"cmd\", \"check\": "
                              "\"NAME\"} (dcdeploy service set SVC --health-cmd NAME)")
        pattern = cls.LEGACY_HTTP_RE if kind == "http" else cls.LEGACY_TCP_RE
        found = pattern.fullmatch(target)
        if found is None:
            example = ('{"kind": "http", "path": "/health", "port": "port"}' if kind == "http"
                       else '{"kind": "tcp", "port": "port"}')
            raise InvalidData(where, "health.target",
                              f"{target[:120]!r}: a {kind} check's address comes from each "
                              f"host's agent.conf, not from the store; only targets on "
                              f"127.0.0.1, localhost, [::1] or {{address}} with a {{var}} or "
                              f"numeric port are still read. Write {example} instead")
        port: str | int = found["key"] if found["key"] else int(found["num"])
        port = cls._port(where, port)
        if kind == "tcp":
            return cls(kind="tcp", port=port, timeout=timeout)
        path = found["path"] or "/"
        if "{" in path or "}" in path or not cls.PATH_RE.fullmatch(path):
            raise InvalidData(where, "health.target",
                              f"{target[:120]!r}: the path may not use host variables; write "
                              '{"kind": "http", "path": "/health", "port": "port"}')
        return cls(kind="http", path=path, port=port, timeout=timeout)

    def to_dict(self) -> dict[str, Any]:
        """The store form: only the fields of this kind (stable, for spec comparison)."""
        out: dict[str, Any] = {"kind": self.kind}
        for name in self.FIELDS[self.kind]:
            out[name] = getattr(self, name)
        if self.kind != "none":
            out["timeout"] = self.timeout
        return out

    def describe(self) -> str:
        """The check in words, for the CLI and status lines."""
        if self.kind == "http":
            return f"http GET {self.path} on the host's address, port {self.port}"
        if self.kind == "tcp":
            return f"tcp connect to the host's address, port {self.port}"
        if self.kind == "cmd":
            return f"the host's local check {self.check!r}"
        return "none"


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
    # Rollout policy (policy.Policy: rack budget, rack order, canaries...); its fields are
    # top-level keys of the spec's JSON, written only when not the default.
    policy: Any = field(default_factory=lambda: _policy_class()())
    signature: Mapping[str, Any] | None = None  # the operator's (trust.py), not a field

    @property
    def verify_peers(self) -> bool:
        """Count only hosts that answer a probe at the gate (docs/policy.md, peers.py): a
        policy field, signed with the rest of the policy."""
        return bool(self.policy.verify_peers)

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
                   preload=_get(where, data, "preload", bool, False),
                   policy=_policy_class().parse(where, data),
                   signature=_signature(where, data))

    def to_json(self) -> bytes:
        return dumps(_with_signature(
            {"program": self.program, "quorum": self.quorum,
             "depends_on": list(self.depends_on), "max_parallel": self.max_parallel,
             "health": self.health.to_dict(), "healthy_secs": self.healthy_secs,
             "preload": self.preload, **self.policy.to_dict()}, self.signature))


def _policy_class() -> Any:
    """policy.Policy, imported late: policy.py builds on this module."""
    from .policy import Policy
    return Policy


@dataclass(frozen=True)
class StagedRelease:
    """``/dc/staging/<svc>`` data: the release hosts should prefetch."""

    service: str
    version: str
    sha256: str
    size: int  # bytes of the artifact: bounds every download of it (docs/store-layout.md)
    urls: tuple[str, ...] = ()
    torrent: str | None = None  # base64 of the .torrent metainfo (issue: p2p distribution)
    staged_at: float = 0.0
    signature: Mapping[str, Any] | None = None  # the operator's (trust.py), not a field

    @classmethod
    def parse(cls, service: str, raw: bytes | str | None,
              where: str | None = None) -> "StagedRelease":
        where = where or f"staging/{service}"
        data = _load(where, raw)
        version = check_version(where, "version", _get(where, data, "version", str))
        sha = _get(where, data, "sha256", str).lower()
        if not SHA256_RE.fullmatch(sha):
            raise InvalidData(where, "sha256", f"{_short(sha)} is not 64 hex digits")
        # Required: a host stops a download at the first byte past it (issue 8), and it is
        # signed with the rest, so a store writer cannot raise it.
        size = check_int(where, data, "size", ..., 1, MAX_SIZE_BYTES)
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
            described = _torrent_size(torrent)
            if described != size:
                raise InvalidData(where, "torrent", f"describes {described} bytes, the staged "
                                                    f"size is {size}")
        if not urls and not torrent:
            raise InvalidData(where, "urls", "a staged release needs a url or a torrent")
        staged_at = check_number(where, data, "staged_at", 0.0, 0.0, MAX_TIMESTAMP)
        return cls(service, version, sha, size, tuple(urls), torrent, staged_at,
                   _signature(where, data))

    def to_json(self) -> bytes:
        data: dict[str, Any] = {"version": self.version, "sha256": self.sha256,
                                "size": self.size, "urls": list(self.urls),
                                "staged_at": self.staged_at}
        if self.torrent:
            data["torrent"] = self.torrent
        return dumps(_with_signature(data, self.signature))


@dataclass(frozen=True)
class CurrentEntry:
    """``/dc/current/<svc>/<host>``: the host serves ``version`` (ephemeral)."""

    host: str
    version: str
    state: str = "serving"
    since: float = 0.0
    rack: str = ""
    # The switch that brought this host to ``version`` (stop, start, healthy seconds):
    # collected into the item's history record on completion (docs/policy.md).
    switch: Mapping[str, Any] | None = None
    # Where other hosts can run this host's health check: "http://ADDR:PORT/PATH" or
    # "tcp://ADDR:PORT" (agent.conf probe_address; verify_peers, docs/policy.md).
    probe: str | None = None

    @classmethod
    def parse(cls, service: str, host: str, raw: bytes | str | None) -> "CurrentEntry":
        where = f"current/{service}/{host}"
        check_name(where, "(name)", host)
        data = _load(where, raw)
        switch = data.get("switch")
        probe = _get(where, data, "probe", str, None)
        if probe is not None and not PROBE_RE.fullmatch(probe):
            raise InvalidData(where, "probe", f"{_short(probe)} is not http://ADDR:PORT/PATH "
                                              "or tcp://ADDR:PORT")
        return cls(host=host,
                   version=check_version(where, "version", _get(where, data, "version", str)),
                   state=_get(where, data, "state", str, "serving"),
                   since=check_number(where, data, "since", 0.0, 0.0, MAX_TIMESTAMP),
                   rack=_get(where, data, "rack", str, ""),
                   switch=None if switch is None else check_switch(f"{where} switch", switch),
                   probe=probe)

    def to_json(self) -> bytes:
        data: dict[str, Any] = {"version": self.version, "state": self.state,
                                "since": self.since, "rack": self.rack}
        if self.switch is not None:
            data["switch"] = dict(self.switch)
        if self.probe is not None:
            data["probe"] = self.probe
        return dumps(data)


PROBE_RE = re.compile(r"(http://[A-Za-z0-9.:\[\]-]{1,255}:[0-9]{1,5}/[\x21-\x7e]{0,511}"
                      r"|tcp://[A-Za-z0-9.:\[\]-]{1,255}:[0-9]{1,5})")


@dataclass(frozen=True)
class StagingEntry:
    """``/dc/staging/<svc>/<seq>-<host>``: ``host`` holds ``version`` and is ready to roll."""

    node: str  # the znode name, "<host>-<seq>" (sequence suffix added by the store)
    seq: int
    host: str
    version: str
    rack: str = ""  # the host's rack, for rack budgets ("" when not given)

    @classmethod
    def parse(cls, service: str, node: str, raw: bytes | str | None) -> "StagingEntry":
        where = f"staging/{service}/{node}"
        host, sep, seq = node.rpartition("-")
        if not sep or len(node) > MAX_NODE_NAME or not SEQ_RE.fullmatch(seq):
            raise InvalidData(where, "(name)", f"{_short(node)} is not <host>-<sequence>")
        check_name(where, "(name)", host)
        data = _load(where, raw)
        version = check_version(where, "version", _get(where, data, "version", str))
        return cls(node, int(seq), host, version, _get(where, data, "rack", str, ""))


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
    signature: Mapping[str, Any] | None = None  # over service + version (trust.py)
    # The services this item waits for (every service it depends on, directly or not, as
    # `dcdeploy deploy` found them): an item ahead in the queue of one of these, or of its
    # own service, must be done first; others roll at the same time. None (an item written
    # by hand): it waits for every item ahead, as the queue always did.
    after: tuple[str, ...] | None = None
    # `dcdeploy deploy --host-parallel N`: how many of its services a host may switch at
    # once while this item rolls (None: 1).
    host_parallel: int | None = None
    # `dcdeploy deploy --max-down-per-rack K --rack-order [R1,R2,...]`: this item's rack
    # policy, over the service spec's (None / False: the spec's). Signed when set.
    max_down_per_rack: int | None = None
    rack_order: bool = False
    rack_names: tuple[str, ...] = ()
    # Canaries and the plan (issue 10, docs/policy.md). The operator's: ``canary`` (how
    # many), ``soak_secs``, ``approved`` (signed with service and version when set) and
    # ``predicted_s``. The hosts' (state fields, like ``state``): ``canaries`` (the set,
    # recorded by the first gate commit), ``canaries_done_at``, ``rollback`` (a canary
    # failed during the hold: the canaries go back), ``started_at`` (first take-down) and
    # ``timings`` (per host: stop, start, healthy seconds; written on completion).
    canary: int = 0
    soak_secs: float = 0.0
    approved: bool = False
    predicted_s: float | None = None
    canaries: tuple[str, ...] = ()
    canaries_done_at: float | None = None
    rollback: bool = False
    started_at: float | None = None
    timings: tuple[Mapping[str, Any], ...] = ()

    @classmethod
    def parse(cls, node: str, raw: bytes | str | None, data_version: int = -1,
              where: str | None = None) -> "DeployItem":
        where = where or f"deploy/{node}"
        seq = check_seq(where, node)
        data = _load(where, raw)
        state = _get(where, data, "state", str, "waiting")
        if state not in DEPLOY_STATES:
            raise InvalidData(where, "state", f"{_short(state)} is not one of {DEPLOY_STATES}")
        after = _get(where, data, "after", list, None)
        if after is not None:
            for i, dep in enumerate(after):
                check_name(where, f"after[{i}]", dep)
            after = tuple(after)
        host_parallel = check_int(where, data, "host_parallel", None, 1, MAX_HOST_PARALLEL)
        return cls(node=node, seq=seq, after=after, host_parallel=host_parallel,
                   **rack_override(where, data),
                   service=check_name(where, "service", _get(where, data, "service", str)),
                   version=check_version(where, "version", _get(where, data, "version", str)),
                   state=state, reason=_get(where, data, "reason", str, None),
                   host=_get(where, data, "host", str, None),
                   updated=check_number(where, data, "updated", 0.0, 0.0, MAX_TIMESTAMP),
                   data_version=data_version, signature=_signature(where, data),
                   **_item_policy(where, data))

    def to_json(self) -> bytes:
        data: dict[str, Any] = {"service": self.service, "version": self.version,
                                "state": self.state, "reason": self.reason, "host": self.host,
                                "updated": self.updated}
        # Only fields that differ from their defaults: items without canaries keep the
        # bytes they always had.
        for name, default in ITEM_POLICY_DEFAULTS.items():
            value = getattr(self, name)
            if value != default:
                data[name] = list(value) if isinstance(value, tuple) else value
        if self.after is not None:
            data["after"] = list(self.after)
        if self.host_parallel is not None:
            data["host_parallel"] = self.host_parallel
        if self.max_down_per_rack is not None:
            data["max_down_per_rack"] = self.max_down_per_rack
        if self.rack_order:
            data["rack_order"] = list(self.rack_names) if self.rack_names else True
        return dumps(_with_signature(data, self.signature))


MAX_SOAK_SECS = 7 * 24 * 3600.0
MAX_PREDICTED_SECS = 1e9
SWITCH_FIELDS = ("stop_s", "start_s", "healthy_s")
ITEM_POLICY_DEFAULTS: dict[str, Any] = {
    "canary": 0, "soak_secs": 0.0, "approved": False, "predicted_s": None, "canaries": (),
    "canaries_done_at": None, "rollback": False, "started_at": None, "timings": ()}


def check_switch(where: str, data: Any) -> dict[str, Any]:
    """One switch's timing as a host records it: ``{"host"?, "version", "stop_s",
    "start_s", "healthy_s", "at"}``, seconds finite and in [0, 86400]."""
    if not isinstance(data, dict):
        raise InvalidData(where, "(json)", f"expected an object, got {_short(data)}")
    out: dict[str, Any] = {}
    for name in SWITCH_FIELDS:
        out[name] = check_number(where, data, name, ..., 0.0, 86_400.0)
    out["version"] = check_version(where, "version", _get(where, data, "version", str))
    out["at"] = check_number(where, data, "at", 0.0, 0.0, MAX_TIMESTAMP)
    if "host" in data:
        out["host"] = check_name(where, "host", _get(where, data, "host", str))
    return out


def rack_override(where: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """A deploy item's rack policy fields (the same bounds as a spec's): ``max_down_per_rack``
    1..MAX_HOSTS, ``rack_order`` true (racks sorted) or a list of rack names, no repeats.
    Raises :class:`InvalidData` naming the field."""
    k = check_int(where, data, "max_down_per_rack", None, 1, MAX_HOSTS)
    order = _get(where, data, "rack_order", (bool, list), False)
    names: tuple[str, ...] = ()
    if isinstance(order, list):
        for i, rack in enumerate(order):
            check_name(where, f"rack_order[{i}]", rack)
        if len(set(order)) != len(order):
            raise InvalidData(where, "rack_order", f"names a rack twice: {_short(order)}")
        names, order = tuple(order), True
    return {"max_down_per_rack": k, "rack_order": bool(order), "rack_names": names}


def _item_policy(where: str, data: Mapping[str, Any]) -> dict[str, Any]:
    canaries = _get(where, data, "canaries", list, [])
    for i, host in enumerate(canaries):
        check_name(where, f"canaries[{i}]", host)
    timings = _get(where, data, "timings", list, [])
    predicted = _get(where, data, "predicted_s", (int, float), None)
    if predicted is not None:
        predicted = check_number(where, data, "predicted_s", 0.0, 0.0, MAX_PREDICTED_SECS)
    done_at = _get(where, data, "canaries_done_at", (int, float), None)
    started = _get(where, data, "started_at", (int, float), None)
    return {"canary": check_int(where, data, "canary", 0, 0, MAX_HOSTS),
            "soak_secs": check_number(where, data, "soak_secs", 0.0, 0.0, MAX_SOAK_SECS),
            "approved": _get(where, data, "approved", bool, False),
            "predicted_s": predicted,
            "canaries": tuple(canaries),
            "canaries_done_at": None if done_at is None else check_number(
                where, data, "canaries_done_at", 0.0, 0.0, MAX_TIMESTAMP),
            "rollback": _get(where, data, "rollback", bool, False),
            "started_at": None if started is None else check_number(
                where, data, "started_at", 0.0, 0.0, MAX_TIMESTAMP),
            "timings": tuple(check_switch(f"{where} timings[{i}]", t)
                             for i, t in enumerate(timings))}


@dataclass(frozen=True)
class HostInfo:
    """``/dc/hosts/<host>``: the registry of hosts, online or not (persistent)."""

    name: str
    rack: str = ""
    services: tuple[str, ...] = ()
    last_seen: float = 0.0
    fetch: Mapping[str, Any] = field(default_factory=dict)  # svc -> {version, state, error}
    refused: tuple[str, ...] = ()  # operator data this host refused (trust.py)

    @classmethod
    def parse(cls, name: str, raw: bytes | str | None) -> "HostInfo":
        where = f"hosts/{name}"
        check_name(where, "(name)", name)
        data = _load(where, raw)
        services = _get(where, data, "services", list, [])
        for i, svc in enumerate(services):
            check_name(where, f"services[{i}]", svc)
        refused = _get(where, data, "refused", list, [])
        if len(refused) > MAX_LIST:
            raise InvalidData(where, "refused", f"{len(refused)} entries (at most {MAX_LIST})")
        for i, reason in enumerate(refused):
            if not isinstance(reason, str):
                raise InvalidData(where, f"refused[{i}]", f"expected str, got {_short(reason)}")
            check_text(where, f"refused[{i}]", reason)
        return cls(name, _get(where, data, "rack", str, ""), tuple(services),
                   check_number(where, data, "last_seen", 0.0, 0.0, MAX_TIMESTAMP),
                   check_fetch_states(where, _get(where, data, "fetch", dict, {})),
                   tuple(refused))

    def to_json(self) -> bytes:
        data = {"rack": self.rack, "services": list(self.services),
                "last_seen": self.last_seen, "fetch": dict(self.fetch)}
        if self.refused:
            data["refused"] = list(self.refused)
        return dumps(data)
