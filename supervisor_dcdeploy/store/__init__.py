"""Coordination store backends behind one interface (see :mod:`.base`)."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from .base import (BadVersion, Check, Create, Delete, NodeExists, NoNode, NotEmpty, Op,
                   SessionState, SetData, Store, StoreError, StoreUnauthorized,
                   StoreUnavailable, TransactionFailed)

__all__ = ["BadVersion", "Check", "Create", "Delete", "NodeExists", "NoNode", "NotEmpty", "Op",
           "SessionState", "SetData", "Store", "StoreError", "StoreUnauthorized",
           "StoreUnavailable", "TransactionFailed", "StoreURLError", "open_store",
           "parse_store_url", "store_url_from"]

DEFAULT_ROOT = "/dc"


class StoreURLError(ValueError):
    pass


def parse_store_url(url: str) -> tuple[str, list[tuple[str, int]], str]:
    """Split ``zk://h1:2181,h2:2181/dc`` or ``consul://host:8500/dc`` into
    (scheme, [(host, port)], root). The root defaults to ``/dc``."""
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
    return parts.scheme, servers, root


def store_url_from(arg: str | None) -> str:
    return arg or os.environ.get("DCDEPLOY_STORE", "")


def open_store(url: str, session_timeout: float = 10.0) -> Store:
    """Build (not start) the backend for ``url``."""
    scheme, servers, root = parse_store_url(url)
    if scheme == "zk":
        from .zookeeper import ZooKeeperStore
        return ZooKeeperStore(url, servers, root, session_timeout)
    from .consul import ConsulStore
    return ConsulStore(url, servers, root, session_timeout)
