"""Issue 8: every hostile release of the proofs of concept, through the real agent on real
ZooKeeper and real supervisord (tests/test_unpack_safety.py has the unit tests of fetch.py
and the aliased-chain tar.gz through the agent).

One local data center of two hosts serves service A at version 1 for the whole module; each
case stages a signed hostile release (a new version), queues its deploy, checks that every
host refuses it and keeps serving 1 untouched, then aborts. The hosts' agent.conf sets
``unpack_max_bytes`` to 64 MiB so that a bomb which got past the ratio bound would still be
stopped there (and the reason would name that limit, not the ratio: the test would fail)."""

from __future__ import annotations

import hashlib
import os
import threading
import xmlrpc.client
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import pytest
from cluster import Cluster, wait_for
from hostile import MiB, aliased_chain, make_zip, tar_bomb, tar_entries, zip_bomb

from supervisor_dcdeploy import fetch, ops
from supervisor_dcdeploy.cli import main as cli
from supervisor_dcdeploy.lab.sample import build_release
from supervisor_dcdeploy.store import open_store

UNPACK_MAX_BYTES = 64 * MiB
LIMITS = fetch.Limits(max_bytes=UNPACK_MAX_BYTES)  # what the hosts' agent.conf amounts to


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rpc(layout: Any) -> Any:
    from supervisor.xmlrpc import SupervisorTransport
    transport = SupervisorTransport(None, None, f"unix://{layout.sock}")
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)


def pids(cluster: Cluster) -> dict[tuple[str, str], int]:
    """(host, program) -> pid, for the service and the agent (an event listener)."""
    out = {}
    for h, layout in cluster.hosts.items():
        for program in ("A", "dcdeploy-agent"):
            info = rpc(layout).supervisor.getProcessInfo(program)
            assert info["statename"] == "RUNNING", (h, program, info["statename"])
            out[(h, program)] = int(info["pid"])
    return out


def new_bytes(layout: Any) -> int:
    """Bytes of regular files the agent may write for a new release: the download cache and
    every release directory but the running 1 (temporary unpack directories included)."""
    total = 0
    releases = layout.root / "A" / "releases"
    tops = [layout.root / ".cache"]
    try:
        tops += [p for p in releases.iterdir() if p.name != "1"]
    except FileNotFoundError:
        pass
    for top in tops:
        for dirpath, _, files in os.walk(top):
            for name in files:
                try:
                    total += (Path(dirpath) / name).lstat().st_size
                except FileNotFoundError:
                    pass  # removed meanwhile: the refusal cleaning up
    return total


class PeakBytes:
    """Samples :func:`new_bytes` of every host in a thread while a case runs. A sampler can
    miss a short peak, so this is a lower bound of what was on disk at once; a bound check
    that was off (128 MiB of zeros written) is far above any limit and shows up."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.base = {h: new_bytes(layout) for h, layout in cluster.hosts.items()}
        self.peak = dict.fromkeys(cluster.hosts, 0)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            for h, layout in self.cluster.hosts.items():
                self.peak[h] = max(self.peak[h], new_bytes(layout) - self.base[h])
            if self.stop.wait(0.01):
                return

    def done(self) -> dict[str, int]:
        self.stop.set()
        self.thread.join(timeout=10)
        return self.peak


@dataclass
class DC:
    cluster: Cluster
    store: Any
    store_url: str
    workdir: Path
    outside: Path  # a directory beside the hosts' file_root, not under it
    oversized_url: str  # an HTTP server that sends more than any staged size (OversizedBody)
    pids: dict[tuple[str, str], int] = field(default_factory=dict)
    version: int = 1

    def next_version(self) -> str:
        self.version += 1
        return str(self.version)


OVERSIZED_SENT = 64 * MiB  # what the server sends, whatever the staged size


class OversizedBody(BaseHTTPRequestHandler):
    """Answers every GET with 200 and 64 MiB of body, without a Content-Length (so a host
    cannot refuse it before reading): only the staged size can stop the download."""

    protocol_version = "HTTP/1.0"  # the body ends when the connection closes

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        chunk = b"z" * MiB
        try:
            for _ in range(OVERSIZED_SENT // MiB):
                self.wfile.write(chunk)
        except OSError:
            pass  # the host hung up: what it should do

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def cluster(zk_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DC]:
    import uuid
    base = tmp_path_factory.mktemp("hostile")
    workdir, outside = base / "dc", base / "outside"
    workdir.mkdir()
    outside.mkdir()
    store_url = f"zk://127.0.0.1:{zk_server.client_port}/t{uuid.uuid4().hex[:12]}"
    store = open_store(store_url)
    store.start(timeout=15)
    c = Cluster(workdir, store, store_url, 2, {"A": {"quorum": 1, "max_parallel": 1}})
    for layout in c.hosts.values():
        layout.agent_extra["unpack_max_bytes"] = str(UNPACK_MAX_BYTES)
    server = ThreadingHTTPServer(("127.0.0.1", 0), OversizedBody)
    server.daemon_threads = True
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    try:
        c.boot({"A": "1"})
        dc = DC(c, store, store_url, workdir, outside,
                f"http://127.0.0.1:{server.server_address[1]}/A.tar.gz")
        dc.pids = pids(c)
        yield dc
    finally:
        c.stop_all()
        store.stop()
        server.shutdown()
        server.server_close()
        serving.join(timeout=10)


# ------------------------------------------------------------------------------ the cases

@dataclass
class Hostile:
    url: str
    sha256: str
    size: int
    error: Callable[[str], bool]   # the refusal every host must report
    kind: str                      # "verify": the item shows blocked; "fetch": it waits
    bound: int                     # most new bytes per host (cache + unpacking)


def chain_zip(dc: DC, version: str) -> Hostile:
    """The sample release plus the aliased symlink chain, as a zip."""
    good, _ = build_release(dc.workdir / "build", "A", version)
    path = make_zip(dc.workdir / "artifacts" / f"A-{version}-chain.zip",
                    tar_entries(good) + aliased_chain())
    data = path.read_bytes()
    return Hostile(path.as_uri(), sha(data), len(data),
                   lambda e: "a16/l" in e and "symlink" in e, "verify",
                   bound=len(data) + MiB)


def ratio_bomb(builder: Callable[[Path], Path], name: str) -> Callable[[DC, str], Hostile]:
    def make(dc: DC, version: str) -> Hostile:
        path = builder(dc.workdir / "artifacts" / f"A-{version}-{name}")
        data = path.read_bytes()
        assert 128 * MiB / len(data) > 900, "the archive really is ~1000:1"
        budget = LIMITS.budget(len(data))
        assert budget < UNPACK_MAX_BYTES < 128 * MiB
        return Hostile(path.as_uri(), sha(data), len(data),
                       lambda e: "unpack_max_ratio" in e and f"more than {budget} bytes" in e,
                       "verify", bound=len(data) + budget)
    return make


def dev_zero(dc: DC, version: str) -> Hostile:
    size = 64 * MiB  # what the attacker stages; read from /dev/zero it would all be written
    return Hostile("file:///dev/zero", sha(bytes(size)), size,
                   lambda e: "/dev/zero" in e and "refused" in e
                   and ("file_root" in e or "not a regular file" in e), "fetch", bound=0)


def outside_file_root(dc: DC, version: str) -> Hostile:
    """A genuine, correctly digested release, but outside the hosts' file_root: were the
    root not enforced, the deploy would go through and the test would see version 2."""
    path, digest = build_release(dc.outside, "A", version)
    return Hostile(path.as_uri(), digest, path.stat().st_size,
                   lambda e: str(path) in e and "file_root" in e, "fetch", bound=0)


def larger_than_staged(dc: DC, version: str) -> Hostile:
    """A server sending 64 MiB for a release staged (and signed) at 1 MiB: every host stops
    at the first byte past the staged size, before it is written."""
    size = 1 * MiB
    return Hostile(dc.oversized_url, sha(b"z" * size), size,
                   lambda e: "staged size" in e and str(size) in e
                   and ("larger" in e or "does not have" in e), "verify", bound=size)


CASES: dict[str, Callable[[DC, str], Hostile]] = {
    "aliased-chain-zip": chain_zip,
    "zip-bomb": ratio_bomb(zip_bomb, "bomb.zip"),
    "tar-gz-1000-to-1": ratio_bomb(tar_bomb, "bomb.tar.gz"),
    "file-dev-zero": dev_zero,
    "file-outside-file-root": outside_file_root,
    "larger-than-staged-size": larger_than_staged,
}


def host_fetch(dc: DC, h: str) -> dict:
    """The host's fetch of A as published in /dc/hosts (through ops.status)."""
    return ops.status(dc.store)["hosts"].get(h, {}).get("services", {}).get("A", {}) \
        .get("fetch", {})


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_release_is_refused_and_1_keeps_serving(case: str, cluster: DC,
                                                        capsys: pytest.CaptureFixture) -> None:
    dc, c = cluster, cluster.cluster
    if dc.store.children("deploy"):  # what an earlier case left queued
        ops.abort(dc.store)
    version = dc.next_version()
    bad = CASES[case](dc, version)
    before = set(dc.workdir.rglob("*"))
    peak = PeakBytes(c)
    try:
        ops.stage(dc.store, "A", version, sha256=bad.sha256, urls=[bad.url], size=bad.size,
                  signer=c.signer)
        c.deploy(["A"])

        # Every host refuses it and says why, in /dc/hosts and in its own status.json.
        def settled(h: str) -> bool:  # refused, or (a check that failed) installed
            f = host_fetch(dc, h)
            return f.get("version") == version and f.get("state") in ("failed", "installed")
        wait_for(lambda: all(settled(h) for h in c.hosts), 60,
                 f"every host to be done fetching {case}")
        for h in c.hosts:
            published = host_fetch(dc, h)
            assert published["state"] == "failed", (h, published)
            assert bad.error(str(published.get("error"))), (h, published)
            assert published["kind"] == bad.kind, (h, published)
            # status.json is written after the store in a cycle: wait for this cycle's.
            def local_failure(h: str = h) -> dict:
                f = c.host_status(h)["services"]["A"]["fetch"]
                return f if f.get("version") == version and "error" in f else {}
            local = wait_for(local_failure, 30, f"{h}'s status.json to show the refusal")
            assert bad.error(local["error"]), local

        # dcdeploy status names it: the item (blocked when the bytes can never verify) ...
        item = ops.status(dc.store)["deploy"][0]
        if bad.kind == "verify":
            wait_for(lambda: ops.status(dc.store)["deploy"][0]["state"] == "blocked", 30,
                     "the deploy to show every host's refusal")
            item = ops.status(dc.store)["deploy"][0]
            assert f"{len(c.hosts)} hosts failed to verify {version}:" in item["reason"]
            assert all(f"{h}: " in item["reason"] for h in c.hosts)
            assert bad.error(item["reason"])
        else:  # a download refused here may heal (a host's config): the item waits
            assert item["state"] in ("waiting", "rolling") and item["version"] == version
            assert "waiting for hosts to download and verify" in (item["reason"] or "")
        # ... and the text output shows every host's error.
        capsys.readouterr()
        assert cli(["--store", dc.store_url, "status"]) == 0
        out = capsys.readouterr().out
        for h in c.hosts:
            line = next(ln for ln in out.splitlines() if ln.lstrip().startswith(h))
            assert f"[{version} failed: " in line and bad.error(line), line
    finally:
        peaks = peak.done()

    # Nothing written outside the release; no half-unpacked release left behind.
    assert not list(dc.workdir.rglob("evil")), "a member landed outside the release"
    created = {p for p in set(dc.workdir.rglob("*")) - before if "releases" in p.parts}
    assert created == set(), f"left in a releases directory: {sorted(created)}"
    for h, layout in c.hosts.items():
        assert sorted(p.name for p in (layout.root / "A" / "releases").iterdir()) == ["1"]
        cache = layout.root / ".cache"
        assert not [p for p in cache.iterdir() if p.name.endswith(".part")], "partial download"
        if bad.kind == "fetch":
            assert not (cache / f"{bad.sha256}.artifact").exists()
        # The bytes on disk stayed within the bounds (the archive itself plus the budget).
        assert peaks[h] <= bad.bound, (h, peaks[h], bad.bound)

    # The old version keeps serving, from the same processes; nobody was restarted.
    assert dc.store.children("staging/A") == []
    for h in c.hosts:
        assert c.version(h, "A") == "1"
    assert pids(c) == dc.pids, "a service or an agent was restarted"
    ops.abort(dc.store)
