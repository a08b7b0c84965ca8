"""Regression for the chaos finding of ``bench/chaos.py --trials 30 --seed 1202``, trial 11
(``disk_full`` then ``reboot_isolated`` on h1): with its disk full, h1 switched to the new
version but could not record that it had passed its health check; rebooted while cut off
from the store, it started the old version while the fleet ran the new one (L3).

The exact trial is not replayed (its timing is the machine's); the test does the same
thing on purpose: h1's disk (a tmpfs) is full while it switches, then h1 is rebooted with
the store unreachable and must start the version it switched to. Runs on the namespace
testbed (root, one testbed per machine at a time)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from needs import netns_reason, require, zookeeper_reason

from supervisor_dcdeploy.localstate import read_state
from supervisor_dcdeploy.store import NoNode
from supervisor_dcdeploy.lab.testbed.bed import BedConfig, ServiceDef, Testbed, leftovers
from supervisor_dcdeploy.lab.testbed.faults import DiskFull, RebootIsolated
from supervisor_dcdeploy.lab.testbed.recorder import wait_for


@pytest.fixture
def bed(tmp_path):
    require(netns_reason(), zookeeper_reason())
    base = tmp_path / "bed"
    testbed = Testbed(BedConfig(hosts=4, racks=2, base=base, disk_host="h1",
                                services=(ServiceDef("a", 8001, 2, healthy_secs=1.0),)))
    try:
        testbed.up()
        yield testbed
    finally:
        testbed.down()
        left = {k: v for k, v in leftovers(base).items() if v}
        assert not left, left


def _local(bed: Testbed, host: str) -> dict:
    return read_state(bed.hosts[host].layout.root).get("services", {}).get("a", {})


def _registered(bed: Testbed, host: str) -> str | None:
    assert bed.store is not None
    try:
        return json.loads(bed.store.get(f"current/a/{host}")[0])["version"]
    except NoNode:
        return None


def test_switch_on_a_full_disk_survives_an_isolated_reboot(bed):
    store = bed.store
    assert store is not None
    root = bed.hosts["h1"].layout.root
    bed.stage("a", "2")
    # Every host fetches and queues 2 while there is space: the release is on h1's disk.
    wait_for(lambda: len(store.children("staging/a")) == 4, 120,
             "every host to fetch, verify and queue a 2")
    assert _local(bed, "h1")["active"] == "1"

    disk = DiskFull(bed, "h1")
    disk.inject()
    try:
        # The fault took effect: not one more byte fits on h1's disk.
        assert shutil.disk_usage(root).free == 0
        with pytest.raises(OSError):
            with open(root / ".probe", "wb") as fh:
                fh.write(b"x" * 4096)
                fh.flush()
                os.fsync(fh.fileno())
        bed.deploy(["a"])
        # h1 switches with its disk full and passes the health check; it registers as
        # serving 2 only after it has tried to record that locally.
        wait_for(lambda: _registered(bed, "h1") == "2", 120, "h1 registered serving a 2")
        assert shutil.disk_usage(root).free == 0, "the disk was freed before the record"
    finally:
        (root / ".probe").unlink(missing_ok=True)
        disk.heal()
    assert disk.detail.get("supervisord_died") is not True, \
        "h1's supervisord died of the full disk: the reboot below would not be the first"

    reboot = RebootIsolated(bed, "h1")
    reboot.inject()
    try:
        wait_for(lambda: bed.version("h1", "a") is not None, 45,
                 "h1 serving a after the isolated reboot")
        # No switch can start without the store, so what it serves is what it started.
        assert bed.version("h1", "a") == "2"
        assert _local(bed, "h1")["active"] == "2"
        # Recovery's own health check then marks it verified again.
        wait_for(lambda: _local(bed, "h1").get("verified") is True, 30,
                 f"h1's recovery to verify a 2 (local state {_local(bed, 'h1')})")
    finally:
        reboot.heal()
    wait_for(bed.queue_empty, 120, "the deploy to finish")
    assert {h: bed.version(h, "a") for h in bed.hosts} == {h: "2" for h in bed.hosts}
