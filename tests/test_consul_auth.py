"""The Consul backend's ACL token and TLS come from config, and an ACL denial, also the 409
one inside /v1/txn, is an authorization error, never a CAS conflict (docs/consul.md).

Against tests/fakeconsul.py, whose ACL and txn answers follow Consul's source
(agent/consul/txn_endpoint.go, kvs_endpoint.go, acl/errors.go); not a real Consul."""

from __future__ import annotations

import json
import ssl
import subprocess
import uuid
from pathlib import Path

import pytest
import requests
from fakeconsul import FakeConsul

from supervisor_dcdeploy.store import (BadVersion, Create, SetData, StoreUnauthorized,
                                       StoreUnavailable, StoreURLError, TransactionFailed,
                                       open_store)
from supervisor_dcdeploy.store.consul import consul_auth


def secret_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


# -- where the token and TLS settings come from ----------------------------------------
def test_token_file_from_the_url_wins_over_the_environment(tmp_path):
    token = secret_file(tmp_path / "token", "s3cr3t-token\n")
    auth = consul_auth(f"consul://c:8500/dc?token_file={token}",
                       {"CONSUL_HTTP_TOKEN": "from-env"})
    assert auth.token == "s3cr3t-token" and str(token) in auth.source
    assert auth.scheme == "http" and auth.cert is None
    env = consul_auth("consul://c:8500/dc", {"CONSUL_HTTP_TOKEN": "from-env"})
    assert env.token == "from-env" and env.source == "CONSUL_HTTP_TOKEN"
    env_file = consul_auth("consul://c:8500/dc", {"CONSUL_HTTP_TOKEN_FILE": str(token)})
    assert env_file.token == "s3cr3t-token"
    assert consul_auth("consul://c:8500/dc", {}).token is None


def test_tls_settings_from_the_url(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    cert = tmp_path / "client.pem"
    cert.write_text("x")
    key = secret_file(tmp_path / "client.key", "x")
    auth = consul_auth(f"consul://c:8501/dc?ca_file={ca}&client_cert={cert}"
                       f"&client_key={key}", {})
    assert auth.scheme == "https" and auth.verify == str(ca)
    assert auth.cert == (str(cert), str(key))
    assert consul_auth("consul://c:8501/dc?tls=1", {}).scheme == "https"
    assert consul_auth("consul://c:8501/dc", {"CONSUL_CACERT": str(ca)}).verify == str(ca)


@pytest.mark.parametrize("query,mode,fragment", [
    ("token_file={tok}", 0o644, "readable by group or others (mode 0644)"),
    ("token_file={tok}", 0o640, "chmod 600"),
    ("token_file={dir}/missing", 0o600, "No such file"),
    ("token_file={dir}", 0o600, "not a regular file"),
    ("token=abc", 0o600, "do not put the ACL token in the URL"),
    ("tokenfile={tok}", 0o600, "unknown option 'tokenfile'"),
    ("token_file={tok}&token_file={tok}", 0o600, "once"),
    ("client_cert={tok}", 0o600, "client_cert and client_key go together"),
    ("client_cert={tok}&client_key={key}", 0o600, "client_key"),
    ("tls=maybe", 0o600, "not 1/true"),
    ("tls=0&ca_file={tok}", 0o600, "tls=0 with a CA"),
    ("ca_file={dir}/nope.pem", 0o600, "no such file"),
])
def test_bad_auth_settings_are_refused_with_the_reason(tmp_path, query, mode, fragment):
    tok = secret_file(tmp_path / "token", "abc", mode)
    key = secret_file(tmp_path / "client.key", "k", 0o644)  # a private key anyone can read
    url = "consul://c:8500/dc?" + query.format(tok=tok, dir=tmp_path, key=key)
    with pytest.raises(StoreURLError) as exc:
        consul_auth(url, {})
    assert fragment in str(exc.value)
    with pytest.raises(StoreURLError):  # open_store says the same (the CLI prints it)
        open_store(url)


def test_an_empty_or_multi_word_token_file_is_refused(tmp_path):
    for text in ("\n", "two words\n", "x" * 5000):
        tok = secret_file(tmp_path / "token", text)
        with pytest.raises(StoreURLError, match="one ACL token"):
            consul_auth(f"consul://c/dc?token_file={tok}", {})


# -- ACL denials against the fake --------------------------------------------------------
@pytest.fixture
def fake():
    f = FakeConsul().start()
    try:
        yield f
    finally:
        f.close()


def open_with(fake: FakeConsul, root: str, tmp_path: Path, secret: str | None):
    query = ""
    if secret is not None:
        query = f"?token_file={secret_file(tmp_path / f'token-{uuid.uuid4().hex}', secret)}"
    store = open_store(f"consul://{fake.address}/{root}{query}", session_timeout=10)
    return store


def test_the_fake_answers_denials_as_consul_does(fake):
    """The shapes the backend relies on: 409 + Errors inside /v1/txn, 403 outside, 403 "ACL
    not found" for an unknown token, filtered listings (from Consul's source)."""
    secret = fake.add_token({"dc/": "write", "dc/services/": "read"})
    accessor = fake.tokens[secret].accessor
    base = f"http://{fake.address}/v1"
    headers = {"X-Consul-Token": secret}
    assert requests.put(f"{base}/kv/dc/hosts/h1", data=b"x", headers=headers).json() is True
    assert requests.put(f"{base}/kv/dc/services/api", data=b"x", headers=headers,
                        ).status_code == 403
    ops = [{"KV": {"Verb": "set", "Key": "dc/hosts/h2", "Value": ""}},
           {"KV": {"Verb": "cas", "Key": "dc/services/api", "Value": "", "Index": 0}}]
    answer = requests.put(f"{base}/txn", data=json.dumps(ops), headers=headers)
    assert answer.status_code == 409
    body = answer.json()
    assert body["Results"] is None
    assert body["Errors"] == [{"OpIndex": 1, "What": (
        f"Permission denied: token with AccessorID '{accessor}' lacks permission "
        "'key:write' on \"dc/services/api\"")}]
    assert requests.get(f"{base}/kv/dc/hosts/h2", headers=headers).status_code == 404
    anonymous = requests.put(f"{base}/kv/dc/hosts/h1", data=b"x")
    assert anonymous.status_code == 403 and "anonymous token" in anonymous.text
    unknown = requests.put(f"{base}/txn", data=json.dumps(ops),
                           headers={"X-Consul-Token": "nope"})
    assert unknown.status_code == 403 and unknown.text == "ACL not found"
    other = fake.add_token({"dc/hosts/": "write"})
    listed = requests.get(f"{base}/kv/dc/?keys", headers={"X-Consul-Token": other})
    assert listed.json() == ["dc/hosts/h1"]
    assert requests.get(f"{base}/kv/dc/services/api?raw",
                        headers={"X-Consul-Token": other}).status_code == 403


def test_a_txn_denial_is_unauthorized_not_a_conflict(fake, tmp_path):
    root = f"dc-{uuid.uuid4().hex[:8]}"
    operator = fake.add_token({root: "write"})
    host = fake.add_token({root: "write", f"{root}/services/": "read",
                           f"{root}/.seq/deploy": "read"})
    op = open_with(fake, root, tmp_path, operator)
    op.start(timeout=10)
    try:
        op.create("services/api", b'{"quorum": 1}')
        op.create("deploy", b"")
        _, spec_version = op.get("services/api")
        h = open_with(fake, root, tmp_path, host)
        h.start(timeout=10)
        try:
            h.create("hosts/h1", b"{}")  # allowed: its own part of the tree
            # A write among others in one transaction: refused as a whole, by name.
            with pytest.raises(StoreUnauthorized) as exc:
                h.commit([SetData("hosts/h1", b'{"x": 1}'),
                          SetData("services/api", b'{"quorum": 0}', spec_version)])
            assert f"{root}/services/api" in str(exc.value)
            assert "Permission denied" in str(exc.value) and "token_file" in str(exc.value)
            assert not isinstance(exc.value, TransactionFailed)
            assert h.get("hosts/h1")[0] == b"{}"  # nothing of it was applied
            assert op.get("services/api")[0] == b'{"quorum": 1}'
            with pytest.raises(StoreUnauthorized):
                h.set("services/api", b'{"quorum": 0}')
            # A sequential create whose counter it may not write: refused at once, not
            # retried as contention until the deadline.
            with pytest.raises(StoreUnauthorized) as exc:
                h.create("deploy/item-", b"{}", sequential=True)
            assert ".seq/deploy" in str(exc.value)
            # A real conflict, with a token that may write, is still a conflict.
            with pytest.raises(TransactionFailed) as conflict:
                op.commit([Create("hosts/h2", b""),
                           SetData("services/api", b"{}", spec_version + 1000)])
            assert isinstance(conflict.value.cause, BadVersion)
        finally:
            h.stop()
    finally:
        op.stop()


def test_no_token_or_an_unknown_one_cannot_start(fake, tmp_path):
    fake.add_token({"dc": "write"})
    anonymous = open_with(fake, "dc", tmp_path, None)
    with pytest.raises(StoreUnavailable) as exc:
        anonymous.start(timeout=3)
    assert isinstance(exc.value.__cause__, StoreUnauthorized)
    assert "anonymous token" in str(exc.value)
    unknown = open_with(fake, "dc", tmp_path, "not-a-token")
    with pytest.raises(StoreUnavailable) as exc:
        unknown.start(timeout=3)
    assert isinstance(exc.value.__cause__, StoreUnauthorized)
    assert "does not know the token" in str(exc.value)


def test_the_token_file_wins_over_consul_http_token(fake, tmp_path, monkeypatch):
    secret = fake.add_token({"dc": "write"})
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "stale-token-from-the-environment")
    store = open_with(fake, "dc", tmp_path, secret)
    store.start(timeout=5)
    try:
        store.create("x", b"1")
        assert store.get("x")[0] == b"1"
    finally:
        store.stop()


# -- TLS -------------------------------------------------------------------------------
def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def pki(tmp_path) -> Path:
    """A test CA, a server certificate for 127.0.0.1 and a client certificate."""
    d = tmp_path / "pki"
    d.mkdir()
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=dcdeploy test CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
                      ("client", "extendedKeyUsage=clientAuth")):
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN=dcdeploy {name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "1",
                 "-extfile", f"{name}.ext", cwd=d)
        (d / f"{name}.key").chmod(0o600)
    # A second CA that signed nothing here: trusting it alone must fail.
    _openssl("req", "-x509", *ec, "-keyout", "other.key", "-out", "other.pem", "-days", "1",
             "-subj", "/CN=another CA", cwd=d)
    return d


def test_tls_with_a_ca_and_a_client_certificate(tmp_path, pki):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki / "server.pem", pki / "server.key")
    ctx.load_verify_locations(pki / "ca.pem")
    ctx.verify_mode = ssl.CERT_REQUIRED  # Consul's verify_incoming
    fake = FakeConsul(tls=ctx).start()
    try:
        secret = fake.add_token({"dc": "write"})
        token = secret_file(tmp_path / "token", secret)
        base = f"consul://{fake.address}/dc?token_file={token}&ca_file={pki / 'ca.pem'}"
        client = f"&client_cert={pki / 'client.pem'}&client_key={pki / 'client.key'}"
        store = open_store(base + client)
        store.start(timeout=10)
        try:
            store.create("tls", b"ok")
            assert store.get("tls")[0] == b"ok"
        finally:
            store.stop()
        for url, fragment in ((base, "SSLError"),  # no client certificate
                              (base.replace("ca.pem", "other.pem") + client, "SSLError"),
                              (f"consul://{fake.address}/dc?token_file={token}", "")):
            st = open_store(url)
            with pytest.raises(StoreUnavailable) as exc:
                st.start(timeout=2)
            assert fragment in str(exc.value)
    finally:
        fake.close()


def test_the_agent_refuses_to_start_with_a_readable_token_file(tmp_path):
    from supervisor_dcdeploy.agent.config import ConfigError, load
    token = secret_file(tmp_path / "token", "abc", 0o644)
    conf = tmp_path / "agent.conf"
    conf.write_text(f"[agent]\nstore = consul://c:8500/dc?token_file={token}\nroot = /x\n"
                    "insecure_unsigned = true\n"
                    "[service:api]\nport = 80\n")
    with pytest.raises(ConfigError, match="readable by group or others"):
        load(conf)
    token.chmod(0o600)
    assert load(conf).store.endswith(f"token_file={token}")
