"""Shared fixtures: one real ZooKeeper per test session, a fresh store root per test
(the kazoo.testing model: real server, chroot per test).

Markers (registered in setup.cfg) are given here, from what a test uses, so that test files
need no decorations: ``netns`` for the namespace modules, ``integration`` for tests that use
a real ZooKeeper, the Consul fake, supervisord or a demo data center, ``unit`` for the rest
(``pytest -m unit`` runs in seconds and starts no server; a unit test that tries to start
ZooKeeper fails)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from supervisor_dcdeploy.cli import main as cli
from supervisor_dcdeploy.store import open_store
from supervisor_dcdeploy.lab.zkserver import ZooKeeperServer, free_port, make_test_pki

from needs import unavailable

# Modules whose tests build network namespaces (root, fixed interface names, the testbed's
# machine-wide lock): never run beside another copy of themselves.
NETNS_MODULES = {"test_p2p_swarm", "test_swarm_deploy", "test_testbed", "test_testbed_chaos",
                 "test_testbed_faults", "test_testbed_durable"}
# Fixtures that start a real server (ZooKeeper, the Consul fake) or a cluster of hosts.
INTEGRATION_FIXTURES = {"zk_server", "secure_zk", "store_url", "store", "cluster", "any_cluster",
                        "serial_cluster", "backend", "st", "consul", "trackers"}
# Modules that start processes themselves (supervisord, a demo data center).
INTEGRATION_MODULES = {"test_demo", "test_supervisor_plugin", "test_p2p_ltengine",
                       "test_prober_process"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        if module in NETNS_MODULES:
            item.add_marker(pytest.mark.netns)
        elif module in INTEGRATION_MODULES or \
                INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
        else:
            item.add_marker(pytest.mark.unit)


# The node ids of the unit tests being run now (setup, call and teardown), for the guard below.
_UNIT_RUNNING: list[str] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    unit = item.get_closest_marker("unit") is not None
    if unit:
        _UNIT_RUNNING.append(item.nodeid)
    try:
        yield
    finally:
        if unit:
            _UNIT_RUNNING.pop()


@pytest.fixture(scope="session", autouse=True)
def _unit_tests_start_no_zookeeper():
    """Keeps the ``unit`` marker honest: a unit test that reaches for ZooKeeper fails, also
    through a session fixture it pulls in (set up before any function-scoped patch could
    apply, which is why this wraps ``start`` for the whole session)."""
    start = ZooKeeperServer.start

    def guarded(self, *args, **kwargs):
        if _UNIT_RUNNING:
            raise AssertionError(f"{_UNIT_RUNNING[-1]} is marked unit but starts ZooKeeper; "
                                 "use a fixture from INTEGRATION_FIXTURES (tests/conftest.py)")
        return start(self, *args, **kwargs)

    ZooKeeperServer.start = guarded
    try:
        yield
    finally:
        ZooKeeperServer.start = start


@pytest.fixture
def require_root():
    """``require_root(reason)``: skip the test locally, fail it under CI=true, with the
    reason (see tests/needs.py)."""
    return unavailable


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


@pytest.fixture
def run(store_url, capsys):
    """``run(*argv)``: the ``dcdeploy`` CLI in-process on this test's store root; returns
    (exit code, stdout, stderr)."""
    def _run(*argv: str) -> tuple[int, str, str]:
        code = cli(["--store", store_url, *argv])
        out, err = capsys.readouterr()
        return code, out, err
    return _run
