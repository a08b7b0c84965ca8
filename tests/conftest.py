"""Shared fixtures: one real ZooKeeper per test session, a fresh store root per test
(the kazoo.testing model: real server, chroot per test)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from supervisor_dcdeploy.store import open_store
from supervisor_dcdeploy.zkserver import ZooKeeperServer, free_port, make_test_pki


@pytest.fixture(scope="session")
def zk_server(tmp_path_factory):
    server = ZooKeeperServer(tmp_path_factory.mktemp("zk"), free_port())
    server.start()
    try:
        server.wait_serving(timeout=60)
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="session")
def secure_zk(tmp_path_factory):
    """A second ZooKeeper whose client port is TLS only and demands a client certificate
    from a CA made for this session (tests/zksecure.py)."""
    base = tmp_path_factory.mktemp("zk-tls")
    pki = make_test_pki(base / "pki")
    server = ZooKeeperServer(base / "data", free_port(), secure_port=free_port(),
                             tls_cert=pki.server_cert, tls_key=pki.server_key, tls_ca=pki.ca,
                             client_auth="need")
    server.start()
    try:
        server.wait_serving(timeout=60)
        yield server, pki
    finally:
        server.kill()


@pytest.fixture
def secure_root(secure_zk, tmp_path):
    from zksecure import SecureRoot
    server, pki = secure_zk
    creds = tmp_path / "creds"
    creds.mkdir(mode=0o700)
    return SecureRoot(server, pki, creds)


@pytest.fixture
def store_url(zk_server) -> str:
    return f"zk://127.0.0.1:{zk_server.client_port}/t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def store(store_url):
    st = open_store(store_url)
    st.start(timeout=15)
    try:
        yield st
    finally:
        st.stop()


@pytest.fixture
def workdir(tmp_path) -> Path:
    return tmp_path
