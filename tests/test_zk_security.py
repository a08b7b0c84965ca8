"""The ZooKeeper trust boundary (issue 8, item 3): credentials from private files, the ACL
layout `dcdeploy init` sets up, and mutual TLS. Real ZooKeeper (a TLS-only server with a CA
made for the session, see conftest.secure_zk); the whole rolling deploy on it is
tests/test_rollout.py's ``zookeeper-tls-auth`` case."""

from __future__ import annotations

import json

import pytest
from cluster import Cluster, wait_for
from kazoo.client import KazooClient
from kazoo.exceptions import NoAuthError
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.security import Permissions

from supervisor_dcdeploy import cli, ops
from supervisor_dcdeploy.model import HealthCheck, dumps
from supervisor_dcdeploy.store import (Create, Delete, StoreUnauthorized, SetData,
                                       StoreUnavailable, StoreURLError, TransactionFailed,
                                       open_store, parse_store_url)
from supervisor_dcdeploy.store.acl import (AclPolicy, CredentialError, acl_for, kind_of,
                                           owner_of, read_identity)

SHA = "a" * 64


# -- pure parts ------------------------------------------------------------------------------
def test_acl_layout_never_grants_world_and_gives_hosts_only_their_own_nodes():
    policy = AclPolicy(("op:x",), ("h1:y", "h2:z"))
    paths = ["", "services", "services/api", "staging/api", "staging/api/h1-0000000003",
             "current/api", "current/api/h1", "gate/api", "released/api", "deploy",
             "deploy/item-0000000001", "history", "history/item-0000000001", "hosts",
             "hosts/h1", "peers", "peers/ab12", "peers/ab12/h1", "something/new"]
    for path in paths:
        acl = acl_for(path, policy, "h1:y" if owner_of(path) == "h1" else None)
        assert {a.id.scheme for a in acl} == {"digest"}, path
        perms = {a.id.id: a.perms for a in acl}
        assert perms["op:x"] == Permissions.ALL, path
        assert not perms["h2:z"] & Permissions.ADMIN, path
    def host(path: str, who: str = "h2:z") -> int:
        acl = acl_for(path, policy, "h1:y" if owner_of(path) == "h1" else None)
        return {a.id.id: a.perms for a in acl}[who]
    R, W, C, D = Permissions.READ, Permissions.WRITE, Permissions.CREATE, Permissions.DELETE
    # operator data: read only
    for path in ("services", "services/api", "staging", "hosts", "something/new",
                 "history/item-0000000001"):
        assert host(path) == R, path
    # what the protocol needs of an agent
    assert host("staging/api") == R | C | D and host("current/api") == R | C | D
    assert host("gate/api") == R | W and host("deploy/item-0000000001") == R | W
    assert host("deploy") == R | D and host("history") == R | C
    # a node of h1's: h1 may do anything with it, h2 only read it
    for path in ("current/api/h1", "staging/api/h1-0000000003", "hosts/h1", "peers/ab12/h1"):
        assert host(path) == R and host(path, "h1:y") == Permissions.ALL, path
    assert kind_of("current/api/h1") == "current/*/*" and owner_of("current/api/h1") == "h1"
    assert owner_of("staging/api/web-01-0000000007") == "web-01"
    assert owner_of("services/api") is None


def test_store_url_security_options_are_checked(tmp_path):
    good = tmp_path / "op.auth"
    good.touch(mode=0o600)
    good.write_text("operator:Zq0cM1sQ4v5sXb2kLr8tYw\n")
    assert read_identity(good).user == "operator"
    assert parse_store_url(f"zk://h1:2281/dc?auth={good}")[2] == "/dc"
    loose = tmp_path / "loose.auth"
    loose.write_text("operator:Zq0cM1sQ4v5sXb2kLr8tYw\n")
    loose.chmod(0o644)
    with pytest.raises(StoreURLError, match="chmod 600"):
        parse_store_url(f"zk://h1:2281/dc?auth={loose}")
    with pytest.raises(StoreURLError, match="chmod 600"):
        open_store(f"zk://h1:2281/dc?auth={loose}")
    bad = tmp_path / "bad.auth"
    bad.touch(mode=0o600)
    bad.write_text("no colon here\n")
    with pytest.raises(CredentialError, match="user:password"):
        read_identity(bad)
    bad.write_text("operator:s3cret\n")  # every host can read the hash: must be random
    with pytest.raises(CredentialError, match="at least 16"):
        read_identity(bad)
    for query, problem in (("bogus=1", "unknown option"), (f"cert={good}", "together"),
                           ("auth=", "empty"), (f"auth={tmp_path}/none", "cannot read"),
                           (f"ca={tmp_path}/none.pem", "cannot be read")):
        with pytest.raises(StoreURLError, match=problem):
            parse_store_url(f"zk://h1:2281/dc?{query}")


# -- against the TLS + ACL server -----------------------------------------------------------
def raw_client(secure_root, *, cert: bool = True, timeout: float = 15) -> KazooClient:
    pki = secure_root.pki
    extra = dict(certfile=str(pki.client_cert), keyfile=str(pki.client_key)) if cert else {}
    client = KazooClient(hosts=f"127.0.0.1:{secure_root.server.secure_port}", use_ssl=True,
                         ca=str(pki.ca), check_hostname=True, **extra)
    client.start(timeout=timeout)
    return client


@pytest.fixture
def secured(secure_root):
    """A root set up by init for hosts h1 and h2, with service api defined, staged and
    queued by the operator."""
    secure_root.init(["h1", "h2"])
    op = secure_root.open("operator")
    ops.service_set(op, "api", program="api", quorum=1, health=HealthCheck())
    ops.stage(op, "api", "1", sha256=SHA, urls=["https://builds/api-1.tgz"], size=1)
    ops.deploy(op, ["api"])
    try:
        yield secure_root, op
    finally:
        op.stop()


def test_without_credentials_nothing_under_the_root_can_be_read_or_written(secured):
    secure_root, op = secured
    root = secure_root.root
    client = raw_client(secure_root)
    try:
        for path in ("", "/services", "/services/api", "/staging/api", "/deploy", "/hosts"):
            with pytest.raises(NoAuthError):
                client.create(f"{root}{path}/evil", b"{}")
            with pytest.raises(NoAuthError):
                client.get(f"{root}{path}")
            with pytest.raises(NoAuthError):
                client.get_children(f"{root}{path}")
        for path in ("/services/api", "/staging/api", "/gate/api"):
            with pytest.raises(NoAuthError):
                client.set(f"{root}{path}", dumps({"kind": "cmd", "target": "touch /pwned"}))
        with pytest.raises(NoAuthError):
            client.delete(f"{root}/services/api")
    finally:
        client.stop()
        client.close()
    # The product's client without credentials gets the same answer, as a store error.
    anon = secure_root.open(None)
    try:
        with pytest.raises(StoreUnauthorized):
            anon.set("services/api", b"{}")
        with pytest.raises(StoreUnauthorized):
            anon.get("services/api")
    finally:
        anon.stop()
    assert json.loads(op.get("services/api")[0])["quorum"] == 1  # untouched


def test_the_tls_port_refuses_a_client_without_a_certificate(secured):
    secure_root, _ = secured
    with pytest.raises(KazooTimeoutError):  # every handshake fails until kazoo gives up
        raw_client(secure_root, cert=False, timeout=5).stop()
    store = open_store(secure_root.url("h1", cert=False))
    with pytest.raises(StoreUnavailable):
        store.start(timeout=5)
    raw_client(secure_root, timeout=5).stop()  # the same with the certificate: connects


def test_a_host_does_what_the_protocol_needs_and_nothing_of_others(secured):
    secure_root, op = secured
    h1, h2 = secure_root.open("h1"), secure_root.open("h2")
    try:
        item = h1.children("deploy")[0]
        # -- what an agent does in a deploy, as the agent does it --------------------------
        h2.create("current/api/h2", dumps({"version": "0", "state": "serving"}), ephemeral=True)
        h1.create("current/api/h1", dumps({"version": "0", "state": "serving"}), ephemeral=True)
        h1.set("current/api/h1", dumps({"version": "0", "state": "serving", "since": 1}))
        ready = h1.create("staging/api/h1-", dumps({"version": "1"}), ephemeral=True,
                          sequential=True)
        raw, version = h1.get(f"deploy/{item}")
        h1.commit([SetData("gate/api", dumps({"host": "h1"}), h1.get("gate/api")[1]),
                   Delete("current/api/h1"),
                   SetData(f"deploy/{item}", dumps({**json.loads(raw), "state": "rolling",
                                                    "host": "h1"}), version)])
        h1.delete(f"staging/api/{ready.rpartition('/')[2]}")
        h1.create("current/api/h1", dumps({"version": "1", "state": "serving"}), ephemeral=True)
        h1.set("hosts/h1", dumps({"rack": "r1", "services": ["api"], "last_seen": 1}))
        h1.create("peers/ab12/h1", b"{}", ephemeral=True)
        raw, version = h1.get(f"deploy/{item}")
        h1.commit([Delete(f"deploy/{item}", version),
                   Create(f"history/{item}", dumps({**json.loads(raw), "state": "done"})),
                   SetData("released/api", dumps({"version": "1", "item": item}))])
        assert ops.status(op)["services"]["api"]["released"] == "1"
        # -- what it may not do ---------------------------------------------------------------
        denied = [
            lambda: h1.set("services/api", dumps({"program": "api", "quorum": 0})),
            lambda: h1.create("services/evil", b"{}"),
            lambda: h1.delete("services/api"),
            lambda: h1.set("staging/api", dumps({"version": "6.6.6", "sha256": SHA, "size": 1,
                                                 "urls": ["https://evil/x.tgz"]})),
            lambda: h1.create("deploy/item-", dumps({"service": "api", "version": "0",
                                                     "state": "waiting"}), sequential=True),
            lambda: h1.set("current/api/h2", dumps({"version": "6.6.6"})),
            lambda: h1.set("hosts/h2", dumps({"rack": "evil"})),
            lambda: h1.set(f"history/{item}", b"{}"),
            lambda: h1.create("newtop/x", b""),
        ]
        for attempt in denied:
            with pytest.raises(StoreUnauthorized):
                attempt()
        with pytest.raises(TransactionFailed) as failed:
            h1.commit([Create("deploy/item-", b"{}", sequential=True)])
        assert isinstance(failed.value.cause, StoreUnauthorized)
        # h2's own node names h2 as its only host writer
        acl = {a.id.id: a.perms for a in h2.get_acl("current/api/h2")}
        assert acl[secure_root.digest("h2")] == Permissions.ALL
        assert acl[secure_root.digest("h1")] == Permissions.READ
        assert acl[secure_root.digest("operator")] == Permissions.ALL
        assert json.loads(op.get("current/api/h2")[0])["version"] == "0"
    finally:
        h1.stop()
        h2.stop()


def test_init_is_idempotent_and_a_host_left_out_loses_access(secure_root):
    assert secure_root.init(["h1", "h2"]) > 0
    assert secure_root.init(["h1", "h2"]) == 0
    h2 = secure_root.open("h2")
    try:
        h2.set("hosts/h2", dumps({"rack": "r2", "services": [], "last_seen": 1}))
        assert secure_root.init(["h1"]) > 0  # h2 revoked
        with pytest.raises(StoreUnauthorized):
            h2.set("hosts/h2", dumps({"rack": "r2", "services": [], "last_seen": 2}))
        with pytest.raises(StoreUnauthorized):
            h2.get("services")
    finally:
        h2.stop()


def test_a_revoked_host_hears_no_notifications(secure_root):
    """What lets an agent skip its periodic access check while notifications arrive
    (agent/access.py): the server sends a watch notification only to a session that may
    read the node that changed (ZooKeeper's fix of CVE-2024-23944). Before the revocation
    h2 hears the change h1 hears; after it, h2 hears none of them, and its store's proof
    of access stops moving."""
    secure_root.init(["h1", "h2"])
    op = secure_root.open("operator")
    h1, h2 = secure_root.open("h1"), secure_root.open("h2")
    heard: dict[str, list[str]] = {"h1": [], "h2": []}
    try:
        op.ensure("released/api")
        for name, client in (("h1", h1), ("h2", h2)):
            client.watch_tree("released", lambda kind, path, name=name:
                              heard[name].append(f"{kind} {path}"))
        op.set("released/api", b'{"version": "1"}')
        wait_for(lambda: heard["h1"] and heard["h2"], 15, "both hosts to hear the change")
        assert h2.notified_at is not None
        proof = h2.notified_at
        secure_root.init(["h1"])  # h2 revoked
        before = len(heard["h1"])
        op.set("released/api", b'{"version": "2"}')
        wait_for(lambda: len(heard["h1"]) > before, 15, "h1 to hear the second change")
        h2.sync("")  # not checked against rights: every notification sent before it is in
        assert heard["h2"] == ["changed released/api"]
        assert h2.notified_at == proof
    finally:
        for client in (h1, h2, op):
            client.stop()


def test_without_init_a_credentialed_client_creates_nothing(secure_root):
    h1 = secure_root.open("h1")
    try:
        with pytest.raises(StoreUnauthorized, match="dcdeploy init"):
            h1.create("current/api/h1", b"{}", ephemeral=True)
        assert h1.exists("") is None  # not even the root, world-open
    finally:
        h1.stop()


def test_cli_init_refuses_a_readable_host_credential_file(secure_root, capsys):
    loose = secure_root.directory / "loose.auth"
    loose.write_text("host-h9:pw\n")
    loose.chmod(0o640)
    code = cli.main(["--store", secure_root.url("operator"), "init",
                     "--host-identity", f"h9:{loose}"])
    assert code == 2
    assert "chmod 600" in capsys.readouterr().err
    code = cli.main(["--store", secure_root.url("operator"), "init",
                     "--host-identity", f"h1:{secure_root.auth_file('h1')}"])
    assert code == 0
    h1 = secure_root.open("h1")
    try:
        assert json.loads(h1.get("hosts/h1")[0])["services"] == []
    finally:
        h1.stop()


def test_init_rotates_the_operator_identity(secure_root):
    secure_root.init(["h1"])
    old = secure_root.auth_file("operator")
    kept = old.with_name("old-operator.auth")
    old.rename(kept)  # the next auth_file("operator") is a new identity
    code = cli.main(["--store", secure_root.url("operator"), "init",
                     "--host-identity", f"h1:{secure_root.auth_file('h1')}",
                     "--previous-operator", str(kept)])
    assert code == 0
    new_op = secure_root.open("operator")
    try:
        ops.service_set(new_op, "api", program="api", quorum=1, health=HealthCheck())
    finally:
        new_op.stop()
    stale = open_store(secure_root.url("operator").replace(str(old), str(kept)))
    stale.start(timeout=15)
    try:
        with pytest.raises(StoreUnauthorized):
            stale.get("services/api")
    finally:
        stale.stop()


def test_a_revoked_host_keeps_serving_reports_it_and_recovers_when_readmitted(
        secure_root, workdir):
    """Wrong or revoked credentials are a store the host cannot use: its services keep
    running, its status says why, and it rejoins when `init` lets it in again."""
    secure_root.init(["h0", "h1"])
    op = secure_root.open("operator")
    cluster = Cluster(workdir, op, secure_root.url("operator"), 2,
                      {"A": {"quorum": 1, "healthy_secs": 0.2}},
                      host_store_url=secure_root.url)
    for layout in cluster.hosts.values():  # an idle agent checks its access this often
        layout.agent_extra["store_check_secs"] = "1"
    try:
        cluster.boot({"A": "1"})
        supervisord = cluster.procs["h1"]
        secure_root.init(["h0"])
        wait_for(lambda: cluster.host_status("h1").get("services", {}).get("A", {})
                 .get("store") == "not authorized", 30, "h1 to report its store refused it")
        assert cluster.version("h1", "A") == "1"  # still serving
        assert cluster.procs["h1"] is supervisord and supervisord.poll() is None
        with pytest.raises(StoreUnauthorized):  # its presence is no longer its own
            h1 = secure_root.open("h1")
            try:
                h1.set("current/A/h1", b"{}")
            finally:
                h1.stop()
        secure_root.init(["h0", "h1"])
        wait_for(lambda: cluster.host_status("h1").get("services", {}).get("A", {})
                 .get("store") == "connected", 30, "h1 back on the store")
        cluster.stage("A", "2")
        ops.deploy(op, ["A"])
        wait_for(lambda: cluster.queue_empty() and cluster.all_on("A", "2"), 60,
                 "both hosts on A 2 after h1 was let back in")
    finally:
        cluster.stop_all()
        op.stop()
