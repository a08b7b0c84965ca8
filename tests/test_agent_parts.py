"""The agent's parts without a store: the typed status, the fetch manager's hand-off
between threads, and a service reconciler's download steps (agent/status.py,
agent/fetching.py, agent/reconciler.py)."""

from __future__ import annotations

import dataclasses
import threading
from types import SimpleNamespace

import pytest
import structlog

from supervisor_dcdeploy import decisions, trust
from supervisor_dcdeploy.agent.config import AgentConfig
from supervisor_dcdeploy.agent.fetching import FetchManager
from supervisor_dcdeploy.agent.reconciler import HostContext, ServiceReconciler
from supervisor_dcdeploy.agent.status import (
    FetchProgress,
    FetchStatus,
    HostStatus,
    PreloadStatus,
    ServiceStatus,
    VerifyPeersStatus,
)
from supervisor_dcdeploy.fetch import DownloadError, VerificationError, write_marker
from supervisor_dcdeploy.localstate import LocalState, ReleaseDir
from supervisor_dcdeploy.model import (CurrentEntry, DeployItem, HealthCheck, ServiceSpec,
                                      StagedRelease, StagingEntry)
from supervisor_dcdeploy.waiting import wait_for

SHA = "ab" * 32
OTHER_SHA = "cd" * 32


def test_service_status_json_leaves_out_what_was_never_set():
    status = ServiceStatus(phase="serving", reason="ok", invalid=("deploy/x: bad",),
                           fetch=FetchStatus("2", "downloading", via="http", done=3),
                           preload=PreloadStatus(10, 8, 0, None))
    assert status.to_json() == {
        "phase": "serving", "reason": "ok", "invalid": ["deploy/x: bad"],
        "fetch": {"version": "2", "state": "downloading", "via": "http", "done": 3},
        "preload": {"bytes": 10, "resident": 8, "locked": 0, "mlock_error": None}}
    assert "error" not in ServiceStatus(phase="stopping").to_json()
    with pytest.raises(dataclasses.FrozenInstanceError):
        status.phase = "down"  # type: ignore[misc]


def test_verify_peers_status_json_keeps_every_key_as_status_json_had_it():
    """test_verify_peers reads services.<svc>.verify_peers from status.json: the gate's
    probe record keeps a position that is None (not in the queue) as null."""
    probes = VerifyPeersStatus(probes=3, seconds=0.0123, silent=("h2",), passed=True,
                               position=None, verified_position=0)
    assert ServiceStatus(verify_peers=probes).to_json() == {"verify_peers": {
        "probes": 3, "seconds": 0.0123, "silent": ["h2"], "passed": True,
        "position": None, "verified_position": 0}}


def test_host_status_json_has_the_keys_of_status_json():
    snapshot = HostStatus("h0", "r1", "connected", reads=4, writes=2, cycles=7,
                          cycle_errors=1, trusted_keys=("k1",), insecure_unsigned=False,
                          services={"A": ServiceStatus(version="1")})
    assert snapshot.to_json() == {
        "host": "h0", "rack": "r1", "store": "connected",
        "store_ops": {"reads": 4, "writes": 2}, "cycles": 7, "cycle_errors": 1,
        "trust": {"keys": ["k1"], "insecure_unsigned": False},
        "services": {"A": {"version": "1"}}}
    assert dataclasses.replace(snapshot, swarm={"peers": 1}).to_json()["swarm"] == \
        {"peers": 1}


def _cfg(tmp_path, services=("A",)) -> AgentConfig:
    return AgentConfig(host="h0", rack="r0", store="zk://127.0.0.1:1/dc", root=tmp_path,
                       services={s: {} for s in services})


def _staged(version="2", sha=SHA) -> StagedRelease:
    return StagedRelease("A", version, sha, size=3, urls=("file:///nowhere",))


def test_fetch_manager_publishes_progress_as_values_from_its_thread(tmp_path):
    """The fetch thread's progress reaches other threads as immutable values; the job is
    busy until the download returns, and the agent is woken when it does."""
    half, finish = threading.Event(), threading.Event()
    woken = threading.Event()

    def fetch(svc, staged, rd, progress):
        progress(5, 10)
        half.set()
        assert finish.wait(20)

    manager = FetchManager(_cfg(tmp_path), None, woken.set, structlog.get_logger(), fetch)
    try:
        rd = ReleaseDir(tmp_path, "A")
        manager.start("A", _staged(), rd, preload=False, transport="http")
        assert manager.progress("A") is not None
        assert half.wait(20)
        assert manager.progress("A") == FetchProgress("http", 5, 10)
        assert manager.busy("A") and manager.shas() == {SHA}
        copy = manager.progress_json()
        copy["A"]["done"] = 999  # a copy: the manager's value does not change
        assert manager.progress_json() == {"A": {"via": "http", "done": 5, "total": 10}}
        finish.set()
        wait_for(lambda: not manager.busy("A"), 20, "the download to end")
        assert woken.wait(20)
        assert manager.job("A").future.exception() is None
        manager.forget("A")
        assert manager.job("A") is None and manager.shas() == set()
    finally:
        finish.set()
        manager.shutdown()


class _Coord:
    """Nothing of the coordinator is used by the download steps."""


def _reconciler(tmp_path, fetch) -> tuple[ServiceReconciler, threading.Event]:
    cfg = _cfg(tmp_path)
    woken = threading.Event()
    log = structlog.get_logger()
    manager = FetchManager(cfg, None, woken.set, log, fetch)
    ctx = HostContext(cfg=cfg, log=log, sup=SimpleNamespace(), local=LocalState(tmp_path),
                      counters=trust.CounterLog(tmp_path), metrics=SimpleNamespace(),
                      fetches=manager, dist=None, coord=_Coord(), wake=woken.set,
                      connected=lambda: True, wake_by=lambda when: None)
    return ServiceReconciler("A", ctx), woken


def _view(staged: StagedRelease) -> decisions.ServiceView:
    return decisions.ServiceView("A", None, staged, {}, [], [])


def test_reconciler_reports_a_download_then_the_installed_release(tmp_path):
    def fetch(svc, staged, rd, progress):
        progress(3, 3)
        write_marker(rd.path(staged.version), version=staged.version, sha256=staged.sha256)

    r, _ = _reconciler(tmp_path, fetch)
    try:
        view = _view(_staged())
        r.prefetch(view)
        assert r.status.fetch == FetchStatus("2", "downloading")
        wait_for(lambda: not r.ctx.fetches.busy("A"), 20, "the download to end")
        r.prefetch(view)
        assert r.status.fetch == FetchStatus("2", "installed", via="http")
        assert r.published_fetch() == {}  # nothing failed: nothing for the store
    finally:
        r.ctx.fetches.shutdown()


def test_reconciler_reads_a_failed_download_from_its_job_and_paces_the_retry(tmp_path):
    calls = []

    def fetch(svc, staged, rd, progress):
        calls.append(staged.version)
        raise VerificationError("bytes of sha256 " + OTHER_SHA, expected=SHA,
                                actual=OTHER_SHA)

    r, _ = _reconciler(tmp_path, fetch)
    try:
        view = _view(_staged())
        r.prefetch(view)
        wait_for(lambda: not r.ctx.fetches.busy("A"), 20, "the download to fail")
        r.prefetch(view)
        fetch_status = r.status.fetch
        assert fetch_status is not None
        assert (fetch_status.state, fetch_status.kind) == ("failed", "verify")
        assert OTHER_SHA in (fetch_status.error or "")
        assert r.ctx.fetches.job("A") is None  # the finished job was taken
        # For the store: the failure without what was learnt from the fetched bytes.
        published = r.published_fetch()
        assert published["state"] == "failed" and OTHER_SHA not in published["error"]
        assert SHA in published["error"]
        r.prefetch(view)  # within FETCH_RETRY_SECS: no second download
        assert calls == ["2"]
    finally:
        r.ctx.fetches.shutdown()


def test_a_retry_keeps_the_last_error_in_view_and_in_the_store(tmp_path, monkeypatch):
    """dcdeploy status counts hosts that failed to verify: a retry running does not hide
    the failure before it."""
    monkeypatch.setattr("supervisor_dcdeploy.agent.reconciler.FETCH_RETRY_SECS", 0.0)
    go = threading.Event()
    calls = []

    def fetch(svc, staged, rd, progress):
        calls.append(staged.version)
        if len(calls) == 1:
            raise DownloadError("HTTP 404 for file:///nowhere")
        assert go.wait(20)

    r, _ = _reconciler(tmp_path, fetch)
    try:
        view = _view(_staged())
        r.prefetch(view)
        wait_for(lambda: not r.ctx.fetches.busy("A"), 20, "the first download to fail")
        r.prefetch(view)  # reads the failure and, the pause being 0 here, retries
        assert r.ctx.fetches.busy("A")  # a second download started
        r.prefetch(view)  # the next cycle, while the retry runs
        assert r.status.fetch == FetchStatus("2", "downloading", via="http",
                                             error="HTTP 404 for file:///nowhere",
                                             kind="fetch")
        assert r.published_fetch() == {"version": "2", "state": "downloading",
                                       "error": "HTTP 404 for file:///nowhere",
                                       "kind": "fetch"}
        # A newer release is a new download, without the old release's error.
        go.set()
        wait_for(lambda: not r.ctx.fetches.busy("A"), 20, "the retry to end")
        r.prefetch(_view(_staged("3", OTHER_SHA)))
        assert r.status.fetch == FetchStatus("3", "downloading")
    finally:
        go.set()
        r.ctx.fetches.shutdown()


class _QueueCoord:
    """A coordinator holding one ready queue, in which this host's entry appears as soon
    as it joins (as the mirror records its own writes)."""

    def __init__(self, view: decisions.ServiceView) -> None:
        self.base = view
        self.entries = list(view.staging)

    def view(self, svc, queue, invalid):
        return dataclasses.replace(self.base, staging=list(self.entries))

    def enter_queue(self, svc, version, rack=""):
        seq = len(self.entries) + 10
        node = f"h0-{seq:010d}"
        self.entries.append(StagingEntry(node, seq, "h0", version, rack))
        return node

    def drop_entry(self, svc, node):
        self.entries = [e for e in self.entries if e.node != node]

    def set_front(self, svc, front):
        pass

    def wait_ahead(self, svc, nodes):
        pass


def test_a_host_that_joins_the_queue_first_in_line_goes_to_the_gate_in_the_same_cycle(
        tmp_path):
    """Back from another service's switch, a host joins this service's ready queue at the
    back; when nobody is ahead of it, it may pass the gate at once: the cycle decides on
    the queue with its new entry, not on the one read before it joined (a cycle later,
    bench/waves.py)."""
    r, _ = _reconciler(tmp_path, fetch=None)
    try:
        for version in ("1", "2"):
            r.rd.path(version).mkdir(parents=True)
        r.rd.point_current("1")
        write_marker(r.rd.path("2"), version="2", sha256=SHA)
        r.ctx.local.update("A", active="1", verified=True)
        spec = ServiceSpec(name="A", program="A", quorum=1, health=HealthCheck(kind="none"))
        item = DeployItem(node="item-0000000001", seq=1, service="A", version="2", after=())
        view = decisions.ServiceView(
            "A", spec, _staged(), {"h0": CurrentEntry("h0", "1"), "h1": CurrentEntry("h1", "2")},
            [], [item])
        r.ctx.coord = _QueueCoord(view)  # type: ignore[assignment]
        r.ctx.sup = SimpleNamespace(state=lambda program: "RUNNING")
        gates = []
        r.pass_gate_and_switch = lambda program, spec: gates.append(program)
        r.reconcile([item], [], "connected")
        assert [e.host for e in r.ctx.coord.entries] == ["h0"]
        assert gates == ["A"], r.status.reason
    finally:
        r.ctx.fetches.shutdown()


class _SwarmThatFails:
    """A distribution whose swarm download fails as a stall does (agent/distribution.py)."""

    link_bps = 1.0  # a slow link: fetch_transport chooses the swarm for any release
    mlock_cap = 0

    def __init__(self) -> None:
        self.calls = 0

    def fetch(self, staged, target, progress):
        self.calls += 1
        raise DownloadError("fetch of 00ff stalled: no new data for 10 s at 0/3 bytes, "
                            "0 peers connected")


@pytest.mark.parametrize("url_works", [True, False], ids=["url-works", "url-missing"])
def test_a_failed_swarm_download_goes_on_from_the_urls_and_the_status_says_so(
        tmp_path, url_works):
    """#12 item 6: the status names the swarm failure that sent the fetch to the URLs
    (``swarm_error``, ``via`` "http"); when the URLs fail too, the error names both."""
    from supervisor_dcdeploy.fetch import sha256_file
    from supervisor_dcdeploy.lab.sample import build_release
    art, sha = build_release(tmp_path / "art", "A", "2")
    assert sha256_file(art) == sha
    staged = StagedRelease("A", "2", sha, size=art.stat().st_size, urls=(art.as_uri(),),
                           torrent="dG9ycmVudA==")  # only its presence matters here
    if not url_works:
        art.unlink()
    r, _ = _reconciler(tmp_path / "root", fetch=None)
    swarm = _SwarmThatFails()
    r.ctx.dist = swarm
    r.ctx.fetches.dist = swarm
    r.ctx.cfg.extra["file_root"] = str(tmp_path / "art")
    try:
        view = _view(staged)
        r.prefetch(view)
        wait_for(lambda: not r.ctx.fetches.busy("A"), 30, "the download to end")
        r.prefetch(view)
        fetch = r.status.fetch
        assert swarm.calls == 1 and fetch is not None
        assert fetch.swarm_error is not None and "stalled" in fetch.swarm_error
        if url_works:
            assert (fetch.state, fetch.via) == ("installed", "http") and not fetch.failed()
            assert r.published_fetch() == {}
        else:
            assert (fetch.state, fetch.kind) == ("failed", "fetch")
            assert "swarm download had failed first" in fetch.error
            assert art.name in fetch.error  # the URL's own failure comes first
            published = r.published_fetch()
            assert "stalled" in published["error"] and art.name in published["error"]
    finally:
        r.ctx.fetches.shutdown()


@pytest.mark.parametrize("healthy_secs", [0.0, 3600.0], ids=["held", "still-holding"])
def test_an_agent_back_in_its_switch_hold_records_the_version_verified_once_it_held(
        tmp_path, healthy_secs):
    """Chaos seed 1806: h2's agent was killed in the hold of b 7; its successor found 7
    running and served it, but nothing recorded it verified, so an isolated reboot later
    started 6. The hold runs again when the agent is back (with the store unreachable too,
    as here) and 7 is recorded verified once it has lasted ``healthy_secs``."""
    r, _ = _reconciler(tmp_path, fetch=None)
    try:
        for version in ("6", "7"):
            r.rd.path(version).mkdir(parents=True)
            write_marker(r.rd.path(version), version=version, sha256=SHA)
        r.rd.point_current("7")
        spec = ServiceSpec(name="A", program="A", quorum=1, health=HealthCheck(kind="none"),
                           healthy_secs=healthy_secs)
        r.ctx.local.update("A", active="7", previous="6", verified=False,
                           spec=spec.to_json().decode())
        r.ctx.sup = SimpleNamespace(state=lambda program: "RUNNING")
        r.reconcile(None, [], "disconnected")
        st = LocalState(tmp_path).get("A")  # as read after a reboot
        assert (st.active, st.verified) == ("7", healthy_secs == 0.0)
    finally:
        r.ctx.fetches.shutdown()
