"""The web server's store side on a real ZooKeeper: watches drive the reads, bursts
coalesce, and the number of open pages does not change the number of store reads."""

from __future__ import annotations

import http.client
import json
import threading
import time
import uuid

import pytest
from cluster import wait_for
from fakeconsul import FakeConsul

from supervisor_dcdeploy import ops
from supervisor_dcdeploy.model import HostInfo
from supervisor_dcdeploy.store import open_store
from supervisor_dcdeploy.web import WebServer


@pytest.fixture(params=["zookeeper", "consul-fake"])
def backend(request, store_url):
    """The real ZooKeeper, and the Consul backend against the in-process fake of Consul's
    HTTP API (whose watches fire on any change: more refreshes, still coalesced)."""
    fake = None
    url = store_url
    if request.param == "consul-fake":
        fake = FakeConsul().start()
        url = f"consul://{fake.address}/dc-{uuid.uuid4().hex[:12]}"
    st = open_store(url)
    st.start(timeout=15)
    try:
        yield st
    finally:
        st.stop()
        if fake is not None:
            fake.close()


class Stream:
    """One open page: reads the SSE stream in a thread, keeps every page it was sent."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.pages: list[dict] = []
        self.conn = http.client.HTTPConnection(*address, timeout=30)
        self.conn.request("GET", "/events")
        self.resp = self.conn.getresponse()
        assert self.resp.getheader("Content-Type") == "text/event-stream"
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for line in self.resp:
                if line.startswith(b"data: "):
                    self.pages.append(json.loads(line[6:]))
        except (OSError, ValueError):
            return

    def close(self) -> None:
        self.conn.close()


def test_watches_feed_every_page_with_one_read_per_change(backend):
    store = backend
    ops.service_set(store, "A", program="A", quorum=1)
    server = WebServer(store, "127.0.0.1", 0, min_interval=0.3).start()
    streams = []
    try:
        wait_for(lambda: server.feed.reads >= 1, 10, "the first read")
        reads = server.feed.reads
        streams = [Stream(server.address) for _ in range(5)]
        wait_for(lambda: all(s.pages for s in streams), 10, "every page's first state")
        assert server.feed.reads == reads  # pages opened: no store read

        # One change reaches every page, through one refresh (the watch, not polling).
        store.create("hosts/h9", HostInfo("h9", "r7", ("A",)).to_json())
        wait_for(lambda: all(any(r["rack"] == "r7" for r in s.pages[-1]["racks"])
                             for s in streams), 10, "h9 on every page")
        assert 1 <= server.feed.reads - reads <= 2, server.feed.reads - reads

        # A burst of 60 writes is served by a few reads: at most one per min_interval.
        before, started = server.feed.reads, time.monotonic()
        for i in range(60):
            store.create(f"hosts/b{i}", HostInfo(f"b{i}", "burst", ("A",)).to_json())
        wait_for(lambda: sum(len(r["hosts"]) for r in streams[0].pages[-1]["racks"]
                             if r["rack"] == "burst") == 60, 15, "the burst on the page")
        elapsed = time.monotonic() - started
        made = server.feed.reads - before
        print(f"burst: 60 writes -> {made} reads in {elapsed:.2f}s")
        assert made <= elapsed / 0.3 + 2, (made, elapsed)
        assert made < 60
    finally:
        for s in streams:
            s.close()
        server.stop()
