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
from pathlib import Path

import pytest

from supervisor_dcdeploy import decisions as d
from supervisor_dcdeploy import ops, svcadmin
from supervisor_dcdeploy import waitdeploy as w
from supervisor_dcdeploy.ctlplugin import render
from supervisor_dcdeploy.model import (CurrentEntry, DeployItem, HostInfo, ServiceSpec,
                                       StagedRelease, StagingEntry)
from supervisor_dcdeploy.store import NoNode, StoreError

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

LINE_TABLE = [
    ("rolling shows hosts on the version", outcome("rolling", False, False),
     ["rolling", "2/5 hosts on 2"], ["("]),
    ("blocked shows the reason", outcome("blocked", False, False, reason="quorum: 3 online"),
     ["blocked", "(quorum: 3 online)"], []),
    ("failed shows host and reason", outcome("failed", True, False, host="h2",
                                             reason="bad health"),
     ["failed", "host h2: bad health"], ["hosts on"]),
    ("done shows the count", outcome("done", True, True, reason="all 5 online"),
     ["done", "2/5 hosts on 2"], ["all 5 online"]),
    ("unknown service shows no count", outcome("waiting", False, False, service="db"),
     ["waiting"], ["hosts on"]),
]


@pytest.mark.parametrize("desc,o,has,lacks", LINE_TABLE, ids=[t[0] for t in LINE_TABLE])
def test_progress_line(desc, o, has, lacks):
    line = w.progress_line(o, SERVICES)
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


@pytest.mark.parametrize("given,node", [("7", "item-0000000007"),
                                        ("item-0000000007", "item-0000000007")])
def test_item_node(given, node):
    assert w.item_node(given) == node


class HistoryStore:
    """Only what wait_items reads besides the status: history/<item>."""

    def __init__(self, records=None, fail_gets=0):
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
    return {"deploy": list(queue), "services": SERVICES}


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
        staged=StagedRelease("api", "2", SHA, urls=("file:///x",)),
        current={h: CurrentEntry(h, v) for h, v in current.items()},
        staging=[StagingEntry(f"{h}-{i:010d}", i, h, "2") for i, h in enumerate(staging)],
        queue=[DeployItem(ITEM, 4, "api", "2")],
        hosts={h: HostInfo(h, "r1", ("api",), 0.0, {"api": f} if f else {})
               for h, f in fetch.items()})


BAD = {"version": "2", "state": "failed", "error": "artifact has sha256 ff.., staged aa.."}
RETRYING = {"version": "2", "state": "downloading", "error": "artifact has sha256 ff.."}

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
    ("hosts already on 2 need nothing", {"h0": BAD, "h1": None, "h2": None},
     {"h0": "1", "h1": "2", "h2": "2"}, (), "blocked", "1 hosts failed to verify 2: h0"),
    ("a host in the ready queue: not blocked", {"h0": BAD, "h1": BAD, "h2": None}, {},
     ("h2",), "waiting", None),
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
