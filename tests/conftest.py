"""Shared fixtures: one real ZooKeeper per test session, a fresh store root per test
(the kazoo.testing model: real server, chroot per test)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from supervisor_dcdeploy.store import open_store
from supervisor_dcdeploy.zkserver import ZooKeeperServer, free_port


@pytest.fixture(scope="session", autouse=True)
def operator_key(tmp_path_factory):
    """One operator key for the session, named by $DCDEPLOY_SIGN_KEY: the CLI and ops sign
    with it, and every local data center (localdc.Cluster) pins it on its hosts."""
    import os

    from supervisor_dcdeploy import trust
    private, _, _ = trust.generate(tmp_path_factory.mktemp("operator"))
    before = os.environ.get(trust.SIGN_KEY_ENV)
    os.environ[trust.SIGN_KEY_ENV] = str(private)
    try:
        yield trust.load_signer(private)
    finally:
        if before is None:
            os.environ.pop(trust.SIGN_KEY_ENV, None)
        else:
            os.environ[trust.SIGN_KEY_ENV] = before


@pytest.fixture(scope="session")
def zk_server(tmp_path_factory):
    server = ZooKeeperServer(tmp_path_factory.mktemp("zk"), free_port())
    server.start()
    try:
        server.wait_serving(timeout=60)
        yield server
    finally:
        server.kill()


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
