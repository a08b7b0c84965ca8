"""The operator CLI against a real ZooKeeper (no hosts needed for these)."""

from __future__ import annotations

import functools
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from supervisor_dcdeploy import ops
from supervisor_dcdeploy.cli import main as cli

SHA = "c" * 64


def test_service_definition_and_listing(run, store):
    def health_of(svc):
        return json.loads(store.get(f"services/{svc}")[0])["health"]

    assert run("service", "set", "db", "--quorum", "2", "--max-parallel", "2",
               "--health-tcp", "127.0.0.1:{port}")[0] == 0
    code, out, _ = run("service", "set", "api", "--quorum", "1", "--depends-on", "db",
                       "--health-http", "http://127.0.0.1:{port}/health", "--healthy-secs", "3")
    assert code == 0 and "depends on db" in out
    code, out, _ = run("service", "list")
    assert [line.split()[0] for line in out.splitlines()] == ["api", "db"]
    code, out, _ = run("service", "show", "api")
    shown = json.loads(out)
    assert shown["quorum"] == 1 and shown["depends_on"] == ["db"]
    # The old loopback URL is stored as a path and a port variable (docs/protocol.md).
    assert health_of("api") == {"kind": "http", "path": "/health", "port": "port",
                               "timeout": 2.0}
    assert run("service", "set", "web", "--quorum", "1", "--health-cmd", "ready")[0] == 0
    assert health_of("web") == {"kind": "cmd", "check": "ready", "timeout": 2.0}
    assert run("service", "set", "web", "--quorum", "1", "--health-http", "/ok",
               "--health-port", "admin_port")[0] == 0
    assert health_of("web") == {"kind": "http", "path": "/ok", "port": "admin_port",
                                "timeout": 2.0}
    code, _, err = run("service", "show", "nope")
    assert code == 2 and '"nope" is not defined' in err


@pytest.mark.parametrize("argv,fragment", [
    (("service", "set", "x", "--quorum", "-1"), "quorum"),
    (("service", "set", "x", "--quorum", "1", "--max-parallel", "0"), "max_parallel"),
    (("service", "set", "x", "--quorum", "1", "--depends-on", "ghost"),
     '"ghost", which is not defined'),
    (("service", "set", "bad name", "--quorum", "1"), "not a valid name"),
    (("service", "set", "x", "--quorum", "1", "--health-http", "ftp://h"), "health.target"),
    (("service", "set", "x", "--quorum", "1", "--health-http", "http://10.0.0.9:80/"),
     "agent.conf"),
    (("service", "set", "x", "--quorum", "1", "--health-tcp", "no-such key"), "health.port"),
    (("service", "set", "x", "--quorum", "1", "--health-cmd", "curl -sf http://x/"),
     "[check:NAME]"),
    (("service", "set", "x", "--quorum", "1", "--health-tcp", "h:1", "--health-cmd", "true"),
     "at most one"),
    (("stage", "ghost", "1", "--url", "file:///x", "--sha256", SHA), '"ghost" is not defined'),
    (("stage", "db", "1"), "needs --url"),
    (("deploy", "db"), "no staged release"),
    (("pause",), "queue is empty"),
    (("resume",), "queue is empty"),
    (("abort",), "nothing to abort"),
])
def test_bad_arguments_exit_2_with_the_reason(run, argv, fragment):
    run("service", "set", "db", "--quorum", "1")
    code, out, err = run(*argv)
    assert code == 2, (out, err)
    assert fragment in err


def test_bad_store_url_and_unreachable_store(capsys):
    assert cli(["--store", "etcd://x/dc", "status"]) == 2
    assert "zk:// or consul://" in capsys.readouterr().err
    assert cli(["--store", "zk://127.0.0.1:1/dc", "--timeout", "1", "status"]) == 1
    assert "no answer within 1s" in capsys.readouterr().err


def test_pause_resume_abort_and_status(run):
    run("service", "set", "db", "--quorum", "1")
    run("service", "set", "api", "--quorum", "1", "--depends-on", "db")
    for svc in ("db", "api"):
        assert run("stage", svc, "2", "--url", "file:///x.tgz", "--sha256", SHA,
                   "--size", "100")[0] == 0
    code, out, _ = run("deploy", "api", "db")
    assert code == 0
    code, out, _ = run("status", "--json")
    status = json.loads(out)
    assert [(d["service"], d["state"]) for d in status["deploy"]] == [("db", "waiting"),
                                                                       ("api", "waiting")]
    assert status["deploy"][0]["reason"] == \
        "waiting for hosts to download and verify (0 hosts online, fewer than one)"
    assert status["services"]["api"]["depends_on"] == ["db"]
    assert status["services"]["db"]["staged"]["version"] == "2"
    # Re-staging a service that is being deployed is refused.
    code, _, err = run("stage", "db", "3", "--url", "file:///y.tgz", "--sha256", SHA,
                       "--size", "100")
    assert code == 2 and "being deployed" in err
    assert run("pause")[0] == 0
    code, out, _ = run("status", "--json")
    assert json.loads(out)["deploy"][0]["state"] == "paused"
    code, out, _ = run("status")
    assert "db             2            paused" in out
    assert run("resume")[0] == 0
    code, out, _ = run("status", "--json")
    assert json.loads(out)["deploy"][0]["state"] == "rolling"
    code, out, _ = run("abort")
    assert code == 0 and "aborted 2" in out
    code, out, _ = run("history", "--json")
    assert [h["state"] for h in json.loads(out)] == ["aborted", "aborted"]
    code, out, _ = run("status", "--json")
    assert json.loads(out)["deploy"] == []


# -- the staged size (issue 8): required, learned when it can be, refused when not -------------

def staged_of(store, svc):
    return ops.status(store)["services"][svc]["staged"]


@pytest.mark.parametrize("size", ["0", "-5", "abc", "1.5", "true", str((1 << 50) + 1)])
def test_stage_refuses_a_size_that_is_not_a_byte_count(run, store, capsys, size):
    run("service", "set", "db", "--quorum", "1")
    with pytest.raises(SystemExit) as exc:
        run("stage", "db", "2", "--url", "file:///x.tgz", "--sha256", SHA, "--size", size)
    assert exc.value.code == 2 and "--size" in capsys.readouterr().err
    assert staged_of(store, "db") is None


def test_stage_without_a_size_it_cannot_learn_asks_for_size(run, store):
    run("service", "set", "db", "--quorum", "1")
    code, _, err = run("stage", "db", "2", "--url", "file:///nonexistent/x.tgz",
                       "--url", "ftp://x/y", "--sha256", SHA)
    assert code == 2 and "--size BYTES" in err
    assert staged_of(store, "db") is None


def test_stage_takes_the_size_of_a_local_file(run, store, tmp_path):
    art = tmp_path / "a.tgz"
    art.write_bytes(b"x" * 1234)
    run("service", "set", "db", "--quorum", "1")
    code, out, _ = run("stage", "db", "2", "--url", art.as_uri(), "--sha256", SHA)
    assert code == 0 and "1234 bytes" in out
    assert staged_of(store, "db")["size"] == 1234


def test_stage_takes_the_size_from_a_head_request(run, store, tmp_path):
    (tmp_path / "a.tgz").write_bytes(b"y" * 4321)
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        run("service", "set", "db", "--quorum", "1")
        # The first URL answers 404: the next one tells.
        code, _, err = run("stage", "db", "2", "--url", f"{base}/missing.tgz",
                           "--url", f"{base}/a.tgz", "--sha256", SHA)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert code == 0, err
    assert staged_of(store, "db")["size"] == 4321
    # An explicit --size wins over what the server says.
    code, _, err = run("stage", "db", "3", "--url", f"{base}/a.tgz", "--sha256", SHA,
                       "--size", "77")
    assert code == 0, err
    assert staged_of(store, "db")["size"] == 77


def test_stage_path_computes_the_size_itself(run, store, tmp_path):
    art = tmp_path / "a.tgz"
    art.write_bytes(b"x")
    run("service", "set", "db", "--quorum", "1")
    code, _, err = run("stage", "db", "2", "--path", str(art), "--size", "5")
    assert code == 2 and "--size go with --url" in err
