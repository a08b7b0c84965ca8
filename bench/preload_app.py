#!/usr/bin/env python3
"""The service inside bench/preload.py's releases (shipped as ``app.py``).

At start it maps every file under ``data/`` and reads ``data/index.bin`` whole, page by
page, through the mapping (what a service loading an index or a model does), and only
then listens: its health check answers once the load is done. Requests touch random pages
of the other files (``data/blob-*.bin``) through their mappings, so a page that is not in
the page cache costs the request a major fault and a disk read.

GET /              -> 200 {"service", "version", "pid"}
GET /health        -> 200 {"healthy": true}
GET /stats         -> 200 {"load_s", "majflt_load", "pid", "version"}: seconds and major
                      faults of the load (the interpreter's own start-up left out)
GET /read?seed=S&pages=P -> 200 {"sum", "pages"}: one byte of each of P pages chosen by
                      random.Random(S) over the blobs (the same pages for the same S)

``"madvise": "random"`` in release.json maps the blobs with MADV_RANDOM (no read-around:
a fault reads its own page only); by default the kernel reads around each fault
(the device's read_ahead_kb).

Standard library only: the release must run with any Python 3. The release ships the
sample app (supervisor_dcdeploy/lab/sample/app.py) beside this file as ``sample_app.py``:
its JSON handler and server are used here.
"""

import argparse
import json
import mmap
import os
import random
import time
from urllib.parse import parse_qs, urlsplit

from sample_app import JsonHandler, Server

HERE = os.path.dirname(os.path.realpath(__file__))
DATA = os.path.join(HERE, "data")
PAGE = mmap.PAGESIZE
with open(os.path.join(HERE, "release.json")) as fh:
    RELEASE = json.load(fh)


def majflt() -> int:
    """This process's major faults so far (/proc/self/stat, field 12)."""
    with open("/proc/self/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[9])


def open_map(path: str) -> mmap.mmap:
    with open(path, "rb") as fh:
        return mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ)


class Data:
    """The mapped files: the index (read whole at start) and the blobs (read on demand)."""

    def __init__(self) -> None:
        started, faults = time.monotonic(), majflt()
        self.index = open_map(os.path.join(DATA, "index.bin"))
        total = 0
        for offset in range(0, len(self.index), PAGE):  # one byte per page: every page in
            total += self.index[offset]
        self.blobs = [open_map(os.path.join(DATA, name))
                      for name in sorted(os.listdir(DATA)) if name.startswith("blob-")]
        if RELEASE.get("madvise") == "random":  # no read-around: a fault reads its page
            for m in self.blobs:
                m.madvise(mmap.MADV_RANDOM)
        self.pages = [len(m) // PAGE for m in self.blobs]
        self.load_s = time.monotonic() - started
        self.majflt_load = majflt() - faults
        self.checksum = total

    def read(self, seed: int, pages: int) -> int:
        rng = random.Random(seed)
        total = 0
        for _ in range(pages):
            i = rng.randrange(len(self.blobs))
            total += self.blobs[i][rng.randrange(self.pages[i]) * PAGE]
        return total


class Handler(JsonHandler):
    data: Data

    def do_GET(self):  # noqa: N802 (http.server's naming)
        url = urlsplit(self.path)
        if url.path == "/health":
            body = {"healthy": True}
        elif url.path == "/stats":
            body = {"load_s": self.data.load_s, "majflt_load": self.data.majflt_load,
                    "pid": os.getpid(), "version": RELEASE["version"]}
        elif url.path == "/read":
            query = parse_qs(url.query)
            pages = int(query.get("pages", ["16"])[0])
            body = {"sum": self.data.read(int(query.get("seed", ["0"])[0]), pages),
                    "pages": pages}
        else:
            body = {"service": RELEASE["service"], "version": RELEASE["version"],
                    "pid": os.getpid()}
        self.send_json(200, body)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bind", default="127.0.0.1")
    args = parser.parse_args()
    Handler.data = Data()  # before listening: healthy means loaded
    Server((args.bind, args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
