"""Operator experience (issue 11, items 3-5): ``deploy --wait`` / ``wait`` and the
newcomer's stumbles, each fixed. Pure decisions are table-tested; the rest runs on real
parts (ZooKeeper, supervisord hosts, a seeder) and asserts on exit codes, stdout and what
the store or a host's status holds, never on log lines."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cluster import Cluster, wait_for

from supervisor_dcdeploy import decisions as d
from supervisor_dcdeploy import ops, svcadmin
from supervisor_dcdeploy import waitdeploy as w
from supervisor_dcdeploy.agent.config import load
from supervisor_dcdeploy.agent.worker import Agent
from supervisor_dcdeploy.ctlplugin import render
from supervisor_dcdeploy.lab.hostenv import (DROPIN_PYTHON, HostLayout, dropin_text, host_rpc,
                                         stop_host, wait_rpc, write_host)
from supervisor_dcdeploy.model import (CurrentEntry, DeployItem, HostInfo, ServiceSpec,
                                       StagedRelease, StagingEntry)
from supervisor_dcdeploy.store import NoNode, StoreError
from supervisor_dcdeploy.supervisorctl_client import SupervisorShuttingDown
from supervisor_dcdeploy.lab.zkserver import free_port

ITEM = "item-0000000004"
SHA = "a" * 64


def q(state, reason=None, host=None, item=ITEM, service="api", version="2"):
    return {"item": item, "service": service, "version": version, "state": state,
            "reason": reason, "host": host}


# ----------------------------------------------------------------- wait: pure decisions

OUTCOME_TABLE = [
    # (description, queue, history record, state, final, ok)
    ("waiting in the queue", [q("waiting")], None, "waiting", False, False),
    ("rolling", [q("rolling")], None, "rolling", False, False),
    ("blocked goes on (the block may clear)", [q("blocked", "quorum: ...")], None,
     "blocked", False, False),
    ("paused goes on (resume may come)", [q("paused")], None, "paused", False, False),
    ("failed in the queue ends the wait", [q("failed", "host h1: 2 failed", "h1")], None,
     "failed", True, False),
    ("done in history", [], {"state": "done", "service": "api", "version": "2"}, "done",
     True, True),
    ("aborted in history", [], {"state": "aborted", "reason": "aborted by operator"},
     "aborted", True, False),
    ("in neither: gone", [], None, "gone", True, False),
    ("another item in the queue does not count", [q("rolling", item="item-0000000009")],
     {"state": "done"}, "done", True, True),
]


@pytest.mark.parametrize("desc,queue,record,state,final,ok", OUTCOME_TABLE,
                         ids=[t[0] for t in OUTCOME_TABLE])
def test_item_outcome(desc, queue, record, state, final, ok):
    o = w.item_outcome(ITEM, queue, record)
    assert (o.state, o.final, o.ok) == (state, final, ok)


def outcome(state, final, ok, **kw):
    return w.ItemOutcome(item=kw.pop("item", ITEM), state=state, final=final, ok=ok,
                         service=kw.pop("service", "api"), version="2", **kw)


OVERALL_TABLE = [
    ("all done", [outcome("done", True, True), outcome("done", True, True)], 0),
    ("one still rolling", [outcome("done", True, True), outcome("rolling", False, False)],
     None),
    ("one failed while another waits", [outcome("failed", True, False, host="h1",
                                                reason="boom"),
                                        outcome("waiting", False, False)], 1),
    ("aborted", [outcome("aborted", True, False, reason="aborted by operator")], 1),
    ("gone", [outcome("gone", True, False)], 1),
]


@pytest.mark.parametrize("desc,outcomes,code", OVERALL_TABLE, ids=[t[0] for t in OVERALL_TABLE])
def test_overall_exit_code(desc, outcomes, code):
    assert w.overall(outcomes).code == code


def test_failure_names_host_and_reason_once():
    named = outcome("failed", True, False, host="h1", reason="host h1: 2 failed its check")
    assert w.overall([named]).message == \
        f"{ITEM} (api 2) failed: host h1: 2 failed its check"
    unnamed = outcome("failed", True, False, host="h3", reason="cannot check 2")
    assert w.overall([unnamed]).message == f"{ITEM} (api 2) failed: host h3: cannot check 2"


SERVICES = {"api": {"versions": {"1": 3, "2": 2}}}
# Six hosts run api; h5 is down mid-switch (not counted in versions).
HOSTS = {f"h{i}": {"services": {"api": {}}} for i in range(6)}
STATUS = {"services": SERVICES, "hosts": {**HOSTS, "db1": {"services": {"db": {}}}}}

LINE_TABLE = [
    ("rolling shows hosts on the version, of all hosts", outcome("rolling", False, False),
     ["rolling", "2/6 hosts on 2"], ["("]),
    ("blocked shows the reason", outcome("blocked", False, False, reason="quorum: 3 online"),
     ["blocked", "(quorum: 3 online)"], []),
    ("failed shows host and reason", outcome("failed", True, False, host="h2",
                                             reason="bad health"),
     ["failed", "host h2: bad health"], ["hosts on"]),
    ("done shows the count", outcome("done", True, True, reason="all 5 online"),
     ["done", "2/6 hosts on 2"], ["all 5 online"]),
    ("unknown service shows no count", outcome("waiting", False, False, service="db"),
     ["waiting"], ["hosts on"]),
]


@pytest.mark.parametrize("desc,o,has,lacks", LINE_TABLE, ids=[t[0] for t in LINE_TABLE])
def test_progress_line(desc, o, has, lacks):
    line = w.progress_line(o, STATUS)
    assert line.startswith(ITEM)
    assert all(h in line for h in has), line
    assert not any(x in line for x in lacks), line


def test_screen_plain_prints_only_changed_lines():
    screen = w.Screen(io.StringIO(), tty=False)
    assert screen.render(["a 1", "b 1"]) == "a 1\nb 1\n"
    assert screen.render(["a 1", "b 1"]) == ""
    assert screen.render(["a 2", "b 1"]) == "a 2\n"
    assert "\033" not in screen.render(["a 3", "b 2"])


def test_screen_tty_redraws_in_place():
    screen = w.Screen(io.StringIO(), tty=True)
    assert screen.render(["a 1", "b 1"]) == "\033[2Ka 1\n\033[2Kb 1\n"
    assert screen.render(["a 2", "b 1"]) == "\033[2F\033[2Ka 2\n\033[2Kb 1\n"
    narrow = w.Screen(io.StringIO(), tty=True, width=5)
    assert narrow.render(["abcdefgh"]) == "\033[2Kabcd\n"  # never wraps


@pytest.mark.parametrize("given,node", [("7", "item-0000000007"),
                                        ("item-0000000007", "item-0000000007")])
def test_item_node(given, node):
    assert w.item_node(given) == node


class HistoryStore:
    """Only what wait_items reads besides the status: history/<item>."""

    def __init__(self, records=None):
        self.records = records or {}
        self.gets = 0

    def get(self, path, watch=None):
        self.gets += 1
        node = path.rpartition("/")[2]
        if node not in self.records:
            raise NoNode(path)
        return json.dumps(self.records[node]).encode(), 0


class Clock:
    def __init__(self):
        self.t = 0.0
        self.sleeps = []

    def __call__(self):
        return self.t

    def sleep(self, secs):
        self.sleeps.append(secs)
        self.t += secs


def run_wait(statuses, store=None, timeout=None, tty=False):
    """wait_items against a scripted series of statuses (the last one repeats)."""
    calls = []

    def status(_store):
        calls.append(1)
        item = statuses[min(len(calls), len(statuses)) - 1]
        if isinstance(item, BaseException):
            raise item
        return item

    out, err, clock = io.StringIO(), io.StringIO(), Clock()
    code = w.wait_items(store or HistoryStore(), [ITEM], out=out, err=err, tty=tty,
                        timeout=timeout, status=status, clock=clock, sleep=clock.sleep)
    return code, out.getvalue(), err.getvalue(), clock, len(calls)


def st(*queue):
    return {**STATUS, "deploy": list(queue)}


def test_wait_done_exits_0_after_one_read_per_second():
    store = HistoryStore({ITEM: {"state": "done", "service": "api", "version": "2"}})
    code, out, err, clock, reads = run_wait([st(q("waiting")), st(q("rolling")), st()], store)
    assert code == 0 and reads == 3
    assert clock.sleeps == [1.0, 1.0]  # at most one status read per second
    assert "done" in out.splitlines()[-1] and err == ""


def test_wait_failed_exits_1_with_host_and_reason():
    code, out, err, _, _ = run_wait([st(q("rolling")),
                                     st(q("failed", "2 failed its health check", "h3"))])
    assert code == 1
    assert "host h3: 2 failed its health check" in err


def test_wait_times_out_with_3():
    code, _, err, clock, reads = run_wait([st(q("blocked", "quorum"))], timeout=2.5)
    assert code == 3 and "timed out after 2.5s" in err and "blocked" in err
    assert clock.t == 2.5 and reads == 4  # t=0, 1, 2, 2.5


def test_wait_rides_out_a_store_error():
    store = HistoryStore({ITEM: {"state": "done"}})
    code, out, _, _, _ = run_wait([StoreError("connection lost"), st()], store)
    assert code == 0 and "store unavailable" in out


def test_ctrl_c_stops_waiting_not_the_deploy():
    code, _, err, _, _ = run_wait([st(q("rolling")), KeyboardInterrupt()])
    assert code == 130 and "the deploy goes on" in err


# ------------------------------------------------------- (6) an unverifiable release

def verify_view(fetch, current=None, staging=()):
    """Three hosts on 1, deploying 2; ``fetch``: host -> its fetch report for api."""
    current = current if current is not None else {"h0": "1", "h1": "1", "h2": "1"}
    return d.ServiceView(
        service="api", spec=ServiceSpec("api", "api", quorum=2),
        staged=StagedRelease("api", "2", SHA, 1, urls=("file:///x",)),
        current={h: CurrentEntry(h, v) for h, v in current.items()},
        staging=[StagingEntry(f"{h}-{i:010d}", i, h, "2") for i, h in enumerate(staging)],
        queue=[DeployItem(ITEM, 4, "api", "2")],
        hosts={h: HostInfo(h, "r1", ("api",), 0.0, {"api": f} if f else {})
               for h, f in fetch.items()})


BAD = {"version": "2", "state": "failed", "error": "artifact has sha256 ff.., staged aa..",
       "kind": "verify"}
RETRYING = {"version": "2", "state": "downloading", "error": "artifact has sha256 ff..",
            "kind": "verify"}
FULL = {"version": "2", "state": "failed", "error": "no space left", "kind": "fetch"}

VERIFY_TABLE = [
    ("every host failed", {"h0": BAD, "h1": BAD, "h2": BAD}, {}, (), "blocked",
     "3 hosts failed to verify 2: h0: artifact has sha256"),
    ("a host retrying keeps its last error", {"h0": BAD, "h1": RETRYING, "h2": BAD}, {}, (),
     "blocked", "3 hosts failed to verify 2"),
    ("one host still downloading", {"h0": BAD, "h1": {"version": "2", "state": "downloading"},
                                    "h2": BAD}, {}, (), "waiting", "download and verify"),
    ("one host has not reported", {"h0": BAD, "h1": BAD, "h2": None}, {}, (), "waiting",
     "download and verify"),
    ("a failure for another version does not count",
     {"h0": BAD, "h1": BAD, "h2": {**BAD, "version": "1.5"}}, {}, (), "waiting",
     "download and verify"),
    ("a full disk may heal: not blocked", {"h0": BAD, "h1": BAD, "h2": FULL}, {}, (),
     "waiting", "download and verify"),
    ("hosts already on 2 need nothing", {"h0": BAD, "h1": None, "h2": None},
     {"h0": "1", "h1": "2", "h2": "2"}, (), "blocked", "1 hosts failed to verify 2: h0"),
    ("a host in the ready queue: not blocked", {"h0": BAD, "h1": BAD, "h2": None}, {},
     ("h2",), "waiting", None),
    # #12 item 6: a swarm download and then the URL failed on every host: not blocked (a
    # URL may come back), but the reason names the hosts and their errors.
    ("every download failed: waiting, with why", {"h0": FULL, "h1": FULL, "h2": FULL}, {},
     (), "waiting", "3 hosts failed to download 2 and retry: h0: no space left; h1: no"),
    ("one download failed: named too", {"h0": None, "h1": FULL, "h2": None}, {}, (),
     "waiting", "; 1 hosts failed to download 2 and retry: h1: no space left"),
]


@pytest.mark.parametrize("desc,fetch,current,staging,state,fragment", VERIFY_TABLE,
                         ids=[t[0] for t in VERIFY_TABLE])
def test_unverifiable_release_shows_blocked(desc, fetch, current, staging, state, fragment):
    v = verify_view(fetch, current or None, staging)
    got_state, reason = d.deploy_status(v, v.queue[0])
    assert got_state == state, reason
    if fragment is None:
        assert reason is None or "failed to verify" not in reason
    else:
        assert fragment in reason


def test_a_waiting_deploy_names_five_failed_downloads_and_counts_the_rest():
    v = verify_view({f"h{i}": FULL for i in range(8)},
                    {f"h{i}": "1" for i in range(8)})
    state, reason = d.deploy_status(v, v.queue[0])
    assert state == "waiting"
    assert "8 hosts failed to download 2 and retry: h0: no space left" in reason
    assert "h4: no space left; and 3 more" in reason and "h5" not in reason.split(
        "retry:")[1]


# ------------------------------------------------------- (7) quorum 0, service delete

@pytest.mark.parametrize("quorum,force,refused", [(0, False, True), (0, True, False),
                                                  (1, False, False), (3, False, False)])
def test_quorum_zero_needs_force(quorum, force, refused):
    assert (svcadmin.quorum_refusal("api", quorum, force) is not None) == refused


DS = svcadmin.DeleteState
DELETE_TABLE = [
    ("idle service", DS(True, (), (), ()), False, None),
    ("undefined", DS(False, (), (), ()), True, "not defined"),
    ("queued", DS(True, (ITEM,), (), ()), False, "queued for deploy"),
    ("queued, forced", DS(True, (ITEM,), (), ()), True, None),
    ("hosts online", DS(True, (), ("h1", "h0"), ()), False, "2 host(s) online"),
    ("hosts online, forced", DS(True, (), ("h1",), ()), True, None),
    ("a dependency, even forced", DS(True, (), (), ("web",)), True, "dependency of web"),
]


@pytest.mark.parametrize("desc,state,force,fragment", DELETE_TABLE,
                         ids=[t[0] for t in DELETE_TABLE])
def test_delete_refusal(desc, state, force, fragment):
    got = svcadmin.delete_refusal("api", state, force)
    assert (got is None) if fragment is None else (fragment in got)


# ------------------------------------------- (8) README code blocks paste as written

README = Path(__file__).resolve().parent.parent / "README.md"


def shell_blocks(text):
    """The lines of the README's ```sh blocks."""
    out, inside = [], False
    for line in text.splitlines():
        if line.strip().startswith("```"):
            inside = not inside and line.strip() in ("```sh", "```bash", "```shell")
            continue
        if inside:
            out.append(line)
    return out


def test_readme_shell_blocks_have_no_pipe_meaning_or():
    lines = shell_blocks(README.read_text())
    assert any(line.startswith("dcdeploy ") for line in lines)
    assert [line for line in lines if "|" in line] == []


def test_readme_shell_block_scanner_sees_a_pipe():
    assert shell_blocks("```sh\ndcdeploy pause | dcdeploy resume\n```\n") == \
        ["dcdeploy pause | dcdeploy resume"]


# ----------------------------------------- (4) garbage in the store, on supervisorctl

def test_supervisorctl_status_shows_store_problems_once():
    problem = "deploy/item-0000000001: field '(json)': not valid JSON"
    state = {"status": {"host": "h0", "services": {
        "api": {"version": "1", "process": "RUNNING", "phase": "serving",
                "invalid": [problem]},
        "db": {"version": "1", "process": "RUNNING", "phase": "serving",
               "invalid": [problem, "staging/db: bad"]}}}}
    text = render(state)
    assert text.count(problem) == 1 and "staging/db: bad" in text
    assert "PROBLEMS" not in render({"status": {"host": "h0", "services": {
        "api": {"version": "1", "process": "RUNNING", "phase": "serving"}}}})


# --------------------------------------------------- on real parts: a local data center

DC_SERVICES = {"A": {"quorum": 2, "max_parallel": 1, "healthy_secs": 0.3}}


@pytest.fixture
def dc(workdir, store, store_url):
    c = Cluster(workdir, store, store_url, 3, DC_SERVICES, poll_interval=0.5)
    try:
        c.boot({"A": "1"})
        yield c
    finally:
        c.stop_all()


def test_deploy_wait_exits_0_when_done(dc, run):
    dc.stage("A", "2")
    code, out, err = run("deploy", "A", "--wait", "--timeout", "120")
    assert code == 0, (out, err)
    assert dc.all_on("A", "2") and dc.queue_empty()
    assert [h["state"] for h in dc.history()] == ["done"]
    assert out.splitlines()[0].startswith("queued item-") and "done" in out.splitlines()[-1]


def test_deploy_wait_exits_1_with_host_and_reason(dc, run):
    dc.stage("A", "2", broken=True)
    code, out, err = run("deploy", "A", "--wait", "--timeout", "120")
    assert code == 1, (out, err)
    item = dc.status()["deploy"][0]
    assert item["state"] == "failed" and item["host"] in dc.hosts
    assert f"host {item['host']}" in err and item["reason"] in err
    assert dc.all_on("A", "1")  # the failed host rolled back


def test_deploy_wait_exits_3_on_timeout_and_the_deploy_goes_on(dc, run):
    # Quorum 3 of 3 hosts: no host may go down, the item stays blocked.
    ops.service_set(dc.store, "A", program="A", quorum=3)
    dc.stage("A", "2")
    code, out, err = run("deploy", "A", "--wait", "--timeout", "3")
    assert code == 3, (out, err)
    assert "timed out after 3s" in err
    queued = dc.status()["deploy"]
    assert [(i["service"], i["state"]) for i in queued] == [("A", "blocked")]


def test_wait_on_an_item_already_queued(dc, run):
    dc.stage("A", "2")
    code, out, _ = run("deploy", "A")
    assert code == 0
    node = out.split()[1].rstrip(":")
    code, out, err = run("wait", node, "--timeout", "120")
    assert code == 0, (out, err)
    assert dc.all_on("A", "2")
    # Done items are found in history; an unknown item is a usage error; an empty queue
    # has nothing to wait for.
    assert run("wait", node.rpartition("-")[2].lstrip("0"))[0] == 0
    code, _, err = run("wait", "item-0000009999")
    assert code == 2 and "no deploy item item-0000009999" in err
    assert run("wait")[0] == 0


def test_unverifiable_release_blocks_with_the_hosts_errors(dc, run):
    dc.stage("A", "2", sha="f" * 64)  # no host can verify it
    assert run("deploy", "A")[0] == 0

    def blocked():
        item = dc.status()["deploy"][0]
        return item if item["state"] == "blocked" else None

    item = wait_for(blocked, 60, "the unverifiable item to show blocked")
    assert item["reason"].startswith("3 hosts failed to verify 2: ")
    assert all(f"{h}: " in item["reason"] for h in dc.hosts)
    # (7) a service queued with hosts online is not deleted without --force
    code, _, err = run("service", "delete", "A")
    assert code == 2 and "queued for deploy" in err
    assert dc.store.exists("services/A") is not None
    # (4) garbage in the store shows on the host's supervisorctl status
    dc.store.create("deploy/item-", b"{not json", sequential=True)
    layout = dc.hosts["h0"]

    def ctl_status():
        res = subprocess.run([sys.executable, "-m", "supervisor.supervisorctl", "-c",
                              str(layout.conf), "dcdeploy", "status"],
                             capture_output=True, text=True, timeout=30)
        return res.stdout if "PROBLEMS" in res.stdout else None

    text = wait_for(ctl_status, 30, "supervisorctl dcdeploy status to show the problem")
    assert "deploy/item-" in text and "not valid JSON" in text


def test_aborted_item_behind_garbage_keeps_service_and_version(store, run):
    store.ensure("deploy")
    store.create("deploy/item-", b"garbage", sequential=True)
    ops.service_set(store, "api", program="api", quorum=1)
    ops.stage(store, "api", "2.1", sha256=SHA, urls=["file:///x.tgz"], size=1)
    item = ops.deploy(store, ["api"])[0]
    code, out, _ = run("abort")
    assert code == 0 and item.node in out
    hist = {h["item"]: h for h in ops.history(store)}
    assert (hist[item.node]["service"], hist[item.node]["version"],
            hist[item.node]["state"]) == ("api", "2.1", "aborted")
    assert hist[item.node]["reason"] == "aborted by operator (was waiting)"


@pytest.mark.parametrize("argv,fragment", [
    (("deploy", "api", "--timeout", "5"), "--timeout goes with --wait"),
    (("deploy", "api", "--wait", "--timeout", "0"), "above 0"),
    (("deploy", "api", "--wait", "--timeout", "nan"), "above 0"),
    (("wait", "--timeout", "-1"), "above 0"),
])
def test_wait_options_refused_before_anything_is_queued(store, run, argv, fragment):
    ops.service_set(store, "api", program="api", quorum=1)
    ops.stage(store, "api", "2", sha256=SHA, urls=["file:///x.tgz"], size=1)
    code, _, err = run(*argv)
    assert code == 2 and fragment in err
    assert store.children("deploy") == []


def test_service_delete_and_quorum_zero(store, run):
    code, _, err = run("service", "set", "api", "--quorum", "0")
    assert code == 2 and "--force" in err and store.exists("services/api") is None
    code, _, err = run("service", "set", "api", "--quorum", "0", "--force")
    assert code == 0 and "warning" in err
    assert json.loads(store.get("services/api")[0])["quorum"] == 0
    assert run("service", "set", "web", "--quorum", "1", "--depends-on", "api")[0] == 0
    code, _, err = run("service", "delete", "api", "--force")
    assert code == 2 and "dependency of web" in err
    assert run("service", "delete", "web")[0] == 0
    assert run("stage", "api", "2", "--url", "file:///x.tgz", "--sha256", SHA,
               "--size", "100")[0] == 0
    assert run("service", "delete", "api")[0] == 0
    for path in ("services/api", "staging/api", "current/api", "services/web"):
        assert store.exists(path) is None, path
    code, _, err = run("service", "delete", "api")
    assert code == 2 and "not defined" in err


# ------------------------------------------------------- (10) supervisord shutting down

class ShuttingDownSupervisor:
    def state(self, program):
        raise SupervisorShuttingDown("supervisord is shutting down")

    def stop(self, program):
        self.state(program)

    def start(self, program):
        self.state(program)


def test_supervisord_shutting_down_stops_the_agent_cleanly(tmp_path, store_url, store):
    conf = tmp_path / "agent.conf"
    conf.write_text(f"[agent]\nhost = h0\nstore = {store_url}\nroot = {tmp_path}\n"
                    "insecure_unsigned = true\n"
                    "poll_interval = 0.2\n\n[service:api]\nport = 1\n")
    ops.service_set(store, "api", program="api", quorum=1)
    agent = Agent(load(conf), supervisor=ShuttingDownSupervisor())
    runner = threading.Thread(target=agent.run, daemon=True)
    runner.start()
    runner.join(timeout=30)
    stopped = not runner.is_alive()
    if not stopped:  # leave no thread behind even when the test fails
        agent.stopping.set()
        agent.wake.set()
        runner.join(timeout=10)
    assert stopped, "the agent kept cycling against a supervisord that is shutting down"
    status = json.loads((tmp_path / "status.json").read_text())["services"]["api"]
    assert status["phase"] == "stopping" and "error" not in status
    assert store.children("current/api") == []


# supervisord stops its groups one after the other, highest priority number first: this
# program stops after the service and before the agent, and takes 3 s to (SIGWINCH is
# ignored, then SIGKILL), so the agent's cycles (every 0.5 s, and on each PROCESS_STATE
# event) certainly run while supervisord is shutting down.
LINGERER = """
[program:lingerer]
command = /bin/sleep 600
autostart = true
priority = 500
stopsignal = WINCH
stopwaitsecs = 3
"""


def test_supervisorctl_shutdown_is_a_normal_stop_for_the_agent(workdir, store, store_url):
    """A real supervisord shutting down: the agent hears SHUTDOWN_STATE and ends with phase
    ``stopping`` and no error on any service; its presence goes."""
    c = Cluster(workdir, store, store_url, 2, {"A": {"quorum": 1}}, poll_interval=0.5)
    c.hosts["h0"].extra_programs = LINGERER
    try:
        c.boot({"A": "1"})
        wait_for(lambda: c.host_status("h0").get("services", {}).get("A", {})
                 .get("phase") == "serving", 30, "h0 to settle on serving A")
        layout = c.hosts["h0"]
        host_rpc(layout).supervisor.shutdown()
        c.procs.pop("h0").wait(timeout=60)
        services = json.loads((layout.root / "status.json").read_text())["services"]
        assert {svc: (info.get("phase"), info.get("error"))
                for svc, info in services.items()} == {"A": ("stopping", None)}
        wait_for(lambda: "h0" not in store.children("current/A"), 30, "h0's presence to go")
    finally:
        c.stop_all()


# ------------------------------------------------- (2) the drop-in without supervisord's PATH

def test_dropin_runs_the_agent_with_a_path_lacking_the_venv(tmp_path, store_url, store):
    ops.service_set(store, "A", program="A", quorum=1)
    layout = HostLayout(name="p0", rack="r0", root=tmp_path / "p0", store_url=store_url,
                        services={"A": free_port()})
    write_host(layout)
    # The shipped drop-in with only what the README says to change: the venv's place.
    dropin = dropin_text()
    assert DROPIN_PYTHON.startswith("/opt/dcdeploy/venv/") and DROPIN_PYTHON in dropin
    dropin = dropin.replace("/opt/dcdeploy/venv", sys.prefix)
    dropin = dropin.replace("/etc/dcdeploy/agent.conf", str(layout.agent_conf))
    dropin = dropin.replace("/var/log/supervisor/", f"{layout.root}/logs/")
    (layout.root / "conf.d" / "dcdeploy.conf").write_text(dropin)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    assert f"{sys.prefix}/bin" not in env["PATH"]
    proc = subprocess.Popen([sys.executable, "-m", "supervisor.supervisord", "-n", "-c",
                             str(layout.conf)], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_rpc(layout)
        wait_for(lambda: host_rpc(layout).supervisor.getProcessInfo("dcdeploy-agent")
                 ["statename"] in ("RUNNING", "BACKOFF", "FATAL"), 30, "the agent to start")
        wait_for(lambda: (layout.root / "status.json").exists(), 30, "the agent's status")
        assert host_rpc(layout).supervisor.getProcessInfo("dcdeploy-agent")["statename"] \
            == "RUNNING"
        assert json.loads((layout.root / "status.json").read_text())["store"] == "connected"
    finally:
        stop_host(layout, proc)


# ------------------------------------------------ (11) stage --path: stdout is the output

def test_stage_path_stdout_holds_only_the_command_output(tmp_path, store_url, store):
    ops.service_set(store, "A", program="A", quorum=1)
    release = tmp_path / "A-2.tar.gz"
    release.write_bytes(os.urandom(64 * 1024))
    seed_dir = tmp_path / "seed"
    base = [sys.executable, "-m", "supervisor_dcdeploy.cli", "--store", store_url]
    env = {**os.environ, "DCDEPLOY_LOG_LEVEL": "info"}  # logs on, and still not on stdout
    start = subprocess.run([*base, "seed", "start", "--dir", str(seed_dir), "--host", "build",
                            "--address", "127.0.0.1", "--rpc-port", str(free_port()),
                            "--peer-port", str(free_port()), "--tracker-port",
                            str(free_port())], capture_output=True, text=True, env=env,
                           timeout=120)
    try:
        assert start.returncode == 0, start.stderr
        assert start.stdout.startswith("seeder running: pid ") and \
            len(start.stdout.splitlines()) == 1, start.stdout
        res = subprocess.run([*base, "stage", "A", "2", "--path", str(release),
                              "--seed-dir", str(seed_dir)], capture_output=True, text=True,
                             env=env, timeout=300)
        assert res.returncode == 0, res.stderr
        assert len(res.stdout.splitlines()) == 1 and res.stdout.startswith("staged A 2 "), \
            res.stdout
    finally:
        subprocess.run([*base, "seed", "stop", "--dir", str(seed_dir)], timeout=60,
                       capture_output=True)
