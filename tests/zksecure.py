"""A ZooKeeper store with credentials, ACLs and mutual TLS for tests: a second server with
a TLS-only client port and a CA made for the test session (docs/security.md)."""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from supervisor_dcdeploy import ops
from supervisor_dcdeploy.store import open_store
from supervisor_dcdeploy.store.acl import read_identity
from supervisor_dcdeploy.lab.zkserver import TestPKI, ZooKeeperServer

OPERATOR = "operator"


@dataclass
class SecureRoot:
    """One fresh store root on the TLS server. ``url(who)`` is the URL of ``who``
    ("operator", a host name, or None for no credentials)."""

    server: ZooKeeperServer
    pki: TestPKI
    directory: Path
    root: str = field(default_factory=lambda: f"/s{uuid.uuid4().hex[:12]}")

    def auth_file(self, who: str) -> Path:
        path = self.directory / f"{who}.auth"
        if not path.exists():
            user = OPERATOR if who == OPERATOR else f"host-{who}"
            path.touch(mode=0o600)
            path.write_text(f"{user}:{secrets.token_urlsafe(24)}\n")
        return path

    def url(self, who: str | None, *, cert: bool = True) -> str:
        query = [f"ca={self.pki.ca}"]
        if cert:
            query += [f"cert={self.pki.client_cert}", f"key={self.pki.client_key}"]
        if who is not None:
            query.insert(0, f"auth={self.auth_file(who)}")
        return f"zk://127.0.0.1:{self.server.secure_port}{self.root}?{'&'.join(query)}"

    def digest(self, who: str) -> str:
        return read_identity(self.auth_file(who)).digest_id

    def init(self, hosts: list[str]) -> int:
        """``dcdeploy init`` with the operator's credentials for ``hosts``."""
        store = open_store(self.url(OPERATOR))
        store.start(timeout=15)
        try:
            return ops.init(store, {h: self.digest(h) for h in hosts})
        finally:
            store.stop()

    def open(self, who: str | None):
        store = open_store(self.url(who))
        store.start(timeout=15)
        return store
