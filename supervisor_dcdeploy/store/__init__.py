"""Coordination store backends behind one interface (see :mod:`.base`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from .base import (BadVersion, Check, Create, Delete, NodeExists, NodeRead, NoNode, NotEmpty,
                   Op, SessionState, SetData, Store, StoreError, StoreUnauthorized,
                   StoreUnavailable, TransactionFailed)

__all__ = ["BadVersion", "Check", "Create", "Delete", "NodeExists", "NodeRead", "NoNode",
           "NotEmpty", "Op", "SessionState", "SetData", "Store", "StoreError", "StoreUnauthorized",
           "StoreUnavailable", "TransactionFailed", "StoreURLError", "StoreSecurity",
           "open_store", "parse_store_url", "store_security", "store_url_from"]

DEFAULT_ROOT = "/dc"


class StoreURLError(ValueError):
    pass


@dataclass(frozen=True)
class StoreSecurity:
    """The ZooKeeper URL's query: ``auth`` (a private file holding ``user:password``),
    ``ca`` (PEM CA bundle; turns TLS on), ``cert``/``key`` (client certificate, PEM),
    ``tls=1`` (TLS with the system's CAs). Only file names here; nothing is read yet."""

    auth: str | None = None
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    tls: bool = False

    @property
    def use_tls(self) -> bool:
        return self.tls or bool(self.ca or self.cert)


_ZK_QUERY = ("auth", "ca", "cert", "key", "tls")


def store_security(url: str) -> StoreSecurity:
    """The security options of a ``zk://`` URL's query; raises :class:`StoreURLError`
    naming an unknown, repeated or empty option."""
    query = urlsplit(url).query
    if not query:
        return StoreSecurity()
    given: dict[str, str] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in _ZK_QUERY:
            raise StoreURLError(f"store URL {url!r}: unknown option {key!r} "
                                f"(known: {', '.join(_ZK_QUERY)})")
        if key in given:
            raise StoreURLError(f"store URL {url!r}: option {key!r} given twice")
        if not value:
            raise StoreURLError(f"store URL {url!r}: option {key!r} is empty")
        given[key] = value
    if ("cert" in given) != ("key" in given):
        raise StoreURLError(f"store URL {url!r}: give cert= and key= together")
    if given.get("tls", "1") not in ("0", "1"):
        raise StoreURLError(f"store URL {url!r}: tls= must be 0 or 1")
    return StoreSecurity(given.get("auth"), given.get("ca"), given.get("cert"),
                         given.get("key"), given.get("tls") == "1")


def parse_store_url(url: str) -> tuple[str, list[tuple[str, int]], str]:
    """Split ``zk://h1:2181,h2:2181/dc`` or ``consul://host:8500/dc`` into
    (scheme, [(host, port)], root). The root defaults to ``/dc``. A ``zk://`` URL may
    carry security options in its query (:func:`store_security`), e.g.
    ``zk://h1:2281/dc?auth=/etc/dcdeploy/zk.auth&ca=/etc/dcdeploy/zk-ca.pem``."""
    if not url:
        raise StoreURLError("no store given: pass --store URL or set DCDEPLOY_STORE "
                            "(e.g. zk://127.0.0.1:2181/dc)")
    parts = urlsplit(url)
    if parts.scheme not in ("zk", "consul"):
        raise StoreURLError(f"store URL {url!r}: scheme must be zk:// or consul://")
    default_port = 2181 if parts.scheme == "zk" else 8500
    servers = []
    for item in parts.netloc.split(","):
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
        if not host:
            raise StoreURLError(f"store URL {url!r}: server {item!r} has no host")
        try:
            servers.append((host, int(port) if port else default_port))
        except ValueError:
            raise StoreURLError(f"store URL {url!r}: port {port!r} is not a number") from None
    root = parts.path.rstrip("/") or DEFAULT_ROOT
    if parts.scheme == "zk":
        _zk_identity(url, store_security(url))  # a bad credential file stops a host at start
    return parts.scheme, servers, root


def _zk_identity(url: str, sec: StoreSecurity):
    """Read the ``auth=`` identity and check that secret files are private and that
    the certificate files can be read; :class:`StoreURLError` names what is wrong."""
    from .acl import CredentialError, check_private_file, read_identity
    try:
        identity = read_identity(sec.auth, "store credential file (auth=)") \
            if sec.auth else None
        if sec.key:
            check_private_file(Path(sec.key), "store client key (key=)")
    except CredentialError as exc:
        raise StoreURLError(f"store URL {url!r}: {exc}") from None
    for what, name in (("CA file (ca=)", sec.ca), ("client certificate (cert=)", sec.cert)):
        if name and not os.access(name, os.R_OK):
            raise StoreURLError(f"store URL {url!r}: {what} {name} cannot be read")
    return identity


def store_url_from(arg: str | None) -> str:
    return arg or os.environ.get("DCDEPLOY_STORE", "")


def open_store(url: str, session_timeout: float = 10.0) -> Store:
    """Build (not start) the backend for ``url``."""
    scheme, servers, root = parse_store_url(url)
    if scheme == "zk":
        from .zookeeper import ZooKeeperStore
        sec = store_security(url)
        identity = _zk_identity(url, sec)
        return ZooKeeperStore(url, servers, root, session_timeout, identity=identity,
                              security=sec)
    from .consul import ConsulStore
    return ConsulStore(url, servers, root, session_timeout)
