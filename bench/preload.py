#!/usr/bin/env python3
"""What ``preload`` buys a service right after its switch: major page faults, time from
start to healthy and the latency of its first requests, with and without preload.

One local host (real supervisord, the real agent, a real ZooKeeper; supervisor_dcdeploy.lab).
Each release holds ``bench/preload_app.py`` and ``--data-mib`` of random data: an index of
``--startup-mib`` the service reads whole at start (through mmap) before it listens, and
blobs whose random pages each request touches (through mmap). Every run defines the service
with ``preload`` on or off (the arm), stages a new version through the store (the agent
downloads it from a file:// URL, verifies, unpacks and, with preload, warms it and pins it
with mlock up to ``mlock_cap`` = the release's size), waits until the host is in the ready
queue, then evicts the page cache (``--evict``: ``all`` drops the whole machine's with
/proc/sys/vm/drop_caches, root only; ``release`` evicts only the release's files with
POSIX_FADV_DONTNEED, as Transmission's verify does; ``none``), and deploys. From the new
process: its major faults (/proc/<pid>/stat) when it first answers, and after the first
``--requests`` requests; start (the process's start time) to first answer; each request's
latency. Arms alternate (cold, preload, preload, cold, ...), ``--repeats`` runs each.

What eviction models: memory pressure, or a swarm download, between the download and the
switch. Pages warmed but not pinned are evicted like any others, so with ``--evict`` the
preload arm keeps only what mlock pinned; with ``--evict none`` both arms start from what
the download left in the cache.

    python bench/preload.py [--data-mib 256] [--startup-mib 64] [--requests 200]
        [--pages 16] [--repeats 3] [--evict all|release|none] [--json]

Progress goes to stderr (structlog); ``--json`` prints only the result on stdout.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import structlog

from supervisor_dcdeploy import logs, ops
from supervisor_dcdeploy.files import sha256_file
from supervisor_dcdeploy.model import HealthCheck
from supervisor_dcdeploy.p2p.warm import drop_cache, residency
from supervisor_dcdeploy.store import NoNode, layout, open_store
from supervisor_dcdeploy.waiting import wait_for

from supervisor_dcdeploy.lab import sample
from supervisor_dcdeploy.lab.hostenv import descendants, host_rpc
from supervisor_dcdeploy.lab.localdc import Cluster
from supervisor_dcdeploy.lab.zkserver import ZooKeeperServer, free_port

MiB = 1 << 20
SVC = "data"
APP = Path(__file__).with_name("preload_app.py")
SAMPLE_APP = Path(sample.__file__).with_name("app.py")  # preload_app.py imports it
BLOB_BYTES = 32 * MiB  # the blobs are files of at most this size
ARMS = ("cold", "preload")
CLK_TCK = os.sysconf("SC_CLK_TCK")

log = structlog.get_logger("bench.preload")


# -- pure helpers ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ProcStat:
    """The fields of /proc/<pid>/stat this bench reads."""

    minflt: int
    majflt: int
    starttime: int  # clock ticks after boot

    @classmethod
    def parse(cls, text: str) -> "ProcStat":
        """Parse one /proc/<pid>/stat line. The command name (field 2) is in parentheses
        and may hold spaces and parentheses itself: fields are counted after the *last*
        ')'. Raises ValueError on a line that is not one."""
        head, sep, rest = text.rpartition(")")
        fields = rest.split()
        if not sep or "(" not in head or len(fields) < 20:
            raise ValueError(f"not a /proc/<pid>/stat line: {text[:80]!r}")
        # fields[0] is field 3 (state): field n is fields[n - 3]
        return cls(minflt=int(fields[7]), majflt=int(fields[9]), starttime=int(fields[19]))


def parse_proc_io(text: str) -> dict[str, int]:
    """/proc/<pid>/io as {field: value} ("read_bytes": what the process had read from
    storage, read-ahead it started included). Raises ValueError on a malformed line."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise ValueError(f"not a /proc/<pid>/io line: {line[:80]!r}")
        out[key.strip()] = int(value)
    return out


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (0 < q <= 100): a value that was measured.
    Raises ValueError for no values or a q out of range."""
    if not values:
        raise ValueError("no values")
    if not 0 < q <= 100:
        raise ValueError(f"percentile {q} is not in (0, 100]")
    ordered = sorted(values)
    rank = -(-len(ordered) * q // 100)  # ceil(n * q / 100), at least 1
    return ordered[max(1, int(rank)) - 1]


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """The first request's latency, p50, p99 and max, in milliseconds."""
    return {"first_ms": round(seconds[0] * 1e3, 3),
            "p50_ms": round(percentile(seconds, 50) * 1e3, 3),
            "p99_ms": round(percentile(seconds, 99) * 1e3, 3),
            "max_ms": round(max(seconds) * 1e3, 3)}


def arm_order(arms: Sequence[str], repeats: int) -> list[str]:
    """Runs in the order A B B A A B ...: each arm goes first as often as the other (for
    two arms and an even count), so a drift of the machine's load favours neither."""
    order: list[str] = []
    for i in range(repeats):
        order += list(arms) if i % 2 == 0 else list(reversed(arms))
    return order


SUMMARY_KEYS = ("majflt_at_healthy", "majflt_requests", "majflt_total", "majflt_load",
                "read_mib_at_healthy", "read_mib_requests",
                "start_to_healthy_s", "load_s", "first_ms", "p50_ms", "p99_ms", "max_ms",
                "stage_to_ready_s", "resident_at_switch")


def arm_summary(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The median over an arm's runs of each measured number (keys absent from a run are
    left out); raises ValueError for no runs."""
    if not runs:
        raise ValueError("an arm without runs")
    out: dict[str, Any] = {"runs": len(runs)}
    for key in SUMMARY_KEYS:
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            out[key] = round(statistics.median(values), 4)
    return out


def ratios(cold: dict[str, Any], warm: dict[str, Any]) -> dict[str, float | None]:
    """cold / preload of each summary number both have; None where preload's is 0
    (a ratio to nothing: read the two numbers)."""
    out: dict[str, float | None] = {}
    for key in SUMMARY_KEYS:
        if key in cold and key in warm and key != "resident_at_switch":
            out[key] = round(cold[key] / warm[key], 2) if warm[key] else None
    return out


def data_files(total: int, startup: int) -> list[tuple[str, int]]:
    """(name, size) of the release's data: ``index.bin`` of ``startup`` bytes, then
    ``blob-NN.bin`` files of at most BLOB_BYTES for the rest. Raises ValueError when the
    sizes leave no index or no blob."""
    if not 0 < startup < total:
        raise ValueError(f"the startup part ({startup} bytes) must be more than 0 and less "
                         f"than the data ({total} bytes): the requests read the rest")
    files = [("index.bin", startup)]
    rest, i = total - startup, 0
    while rest > 0:
        size = min(BLOB_BYTES, rest)
        files.append((f"blob-{i:02d}.bin", size))
        rest -= size
        i += 1
    return files


# -- the release --------------------------------------------------------------------------

def make_data(src: Path, total: int, startup: int) -> None:
    """Random bytes (incompressible, like a model or an index) in ``src/data/``."""
    data = src / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name, size in data_files(total, startup):
        with open(data / name, "wb") as fh:
            left = size
            while left:
                chunk = min(left, 8 * MiB)
                fh.write(os.urandom(chunk))
                left -= chunk


def pack(out_dir: Path, version: str, src: Path, madvise: str = "normal") -> tuple[Path, str]:
    """An uncompressed tar of app.py, release.json and data/; return (path, sha256).
    ``madvise``: how the service maps its blobs (preload_app.py)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{SVC}-{version}.tar"
    meta = src / f"release-{version}.json"
    meta.write_text(json.dumps({"service": SVC, "version": version, "madvise": madvise}))
    with tarfile.open(path, "w") as tar:
        tar.add(APP, arcname="app.py")
        tar.add(SAMPLE_APP, arcname="sample_app.py")
        tar.add(meta, arcname="release.json")
        tar.add(src / "data", arcname="data")
    meta.unlink()
    return path, sha256_file(path)


def evict(path: Path, how: str) -> None:
    """Evict the page cache before the switch: ``all`` (the machine's, root only),
    ``release`` (the release's files only) or ``none``."""
    if how == "all":
        os.sync()  # dirty pages cannot be dropped: write them first
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
    elif how == "release":
        drop_cache(path)


def read_ahead_kb(path: Path) -> int | None:
    """The read-ahead of the block device holding ``path`` (what a fault reads around
    with MADV_NORMAL), or None when sysfs does not say."""
    dev = os.stat(path).st_dev
    try:
        queue = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
        for candidate in (queue / "queue", queue / ".." / "queue"):
            if (candidate / "read_ahead_kb").is_file():
                return int((candidate / "read_ahead_kb").read_text())
    except (OSError, ValueError):
        pass
    return None


def device_probe(data: Path, reads: int = 400) -> dict[str, float]:
    """What this machine's storage costs, read around the page cache (O_DIRECT) from the
    release's source files: the sequential rate of reading ``index.bin`` in 1 MiB blocks,
    and the latency of random 4 KiB reads in ``blob-00.bin`` (what one major fault of a
    MADV_RANDOM mapping waits for). For scaling the results to other disks."""
    import mmap
    import random
    rng = random.Random(0)
    buf = mmap.mmap(-1, 1 << 20)  # page-aligned, as O_DIRECT wants
    fd = os.open(data / "index.bin", os.O_RDONLY | os.O_DIRECT)
    try:
        size, done = os.fstat(fd).st_size, 0
        started = time.perf_counter()
        while done < size:
            n = os.preadv(fd, [buf], done)
            if n <= 0:
                break
            done += n
        seq_s = time.perf_counter() - started
    finally:
        os.close(fd)
    page = memoryview(buf)[:4096]
    fd = os.open(data / "blob-00.bin", os.O_RDONLY | os.O_DIRECT)
    try:
        pages = os.fstat(fd).st_size // 4096
        times = []
        for _ in range(reads):
            started = time.perf_counter()
            os.preadv(fd, [page], rng.randrange(pages) * 4096)
            times.append(time.perf_counter() - started)
    finally:
        os.close(fd)
        page.release()
        buf.close()
    return {"seq_read_mb_s": round(done / seq_s / 1e6, 1),
            "random_4k_read_p50_ms": round(percentile(times, 50) * 1e3, 4),
            "random_4k_read_p99_ms": round(percentile(times, 99) * 1e3, 4)}


def disk_of(path: Path) -> str:
    """``major:minor`` of the whole disk holding ``path`` (a partition's parent): the
    device blkio throttling rules name."""
    dev = os.stat(path).st_dev
    sysdir = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    if (sysdir / "partition").is_file():
        return (sysdir.resolve().parent / "dev").read_text().strip()
    return f"{os.major(dev)}:{os.minor(dev)}"


def parse_throttle(text: str) -> tuple[int, int]:
    """``MBPS:IOPS`` (e.g. ``125:3000``, a cloud volume's baseline) -> (bytes/s, IO/s).
    Raises ValueError naming what is wrong."""
    rate, sep, iops = text.partition(":")
    try:
        bps, ios = int(float(rate) * 1e6), int(iops)
    except ValueError:
        raise ValueError(f"--throttle {text!r}: want MBPS:IOPS, e.g. 125:3000") from None
    if not sep or bps <= 0 or ios <= 0:
        raise ValueError(f"--throttle {text!r}: want MBPS:IOPS, both above 0, e.g. 125:3000")
    return bps, ios


class Throttle:
    """A cgroup-v1 blkio group limiting reads from one disk (bytes/s and IO/s): what the
    host's processes read from storage goes at most that fast, as on a slower disk. Page
    cache hits are not affected. Root only."""

    ROOT = Path("/sys/fs/cgroup/blkio")

    def __init__(self, disk: str, bps: int, iops: int) -> None:
        self.disk, self.bps, self.iops = disk, bps, iops
        self.path = self.ROOT / f"dcdeploy-preload-{os.getpid()}"

    def create(self) -> "Throttle":
        if not (self.ROOT / "cgroup.procs").is_file():
            raise RuntimeError(f"{self.ROOT}: no cgroup-v1 blkio hierarchy here, so no "
                               "--throttle (run without it)")
        self.path.mkdir(exist_ok=True)
        (self.path / "blkio.throttle.read_bps_device").write_text(f"{self.disk} {self.bps}\n")
        (self.path / "blkio.throttle.read_iops_device").write_text(
            f"{self.disk} {self.iops}\n")
        return self

    def add(self, pids: Iterable[int]) -> None:
        for pid in pids:
            try:
                (self.path / "cgroup.procs").write_text(f"{pid}\n")
            except ProcessLookupError:
                pass  # gone meanwhile

    def holds(self, pid: int) -> bool:
        """Whether ``pid`` is in the group (its reads are limited)."""
        try:
            return str(pid) in (self.path / "cgroup.procs").read_text().split()
        except OSError:
            return False

    def remove(self) -> None:
        """Move what is left back to the root group and remove the group."""
        try:
            for pid in (self.path / "cgroup.procs").read_text().split():
                try:
                    (self.ROOT / "cgroup.procs").write_text(f"{pid}\n")
                except ProcessLookupError:
                    pass
            self.path.rmdir()
        except OSError as exc:
            log.warning("bench.throttle_left", bench="preload", path=str(self.path),
                        error=str(exc))

    def to_json(self) -> dict[str, Any]:
        return {"disk": self.disk, "read_mb_s": self.bps / 1e6, "read_iops": self.iops}


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


# -- the new process, seen from outside ------------------------------------------------------

def proc_stat(pid: int) -> ProcStat:
    return ProcStat.parse(Path(f"/proc/{pid}/stat").read_text())


def io_read_bytes(pid: int) -> int:
    return parse_proc_io(Path(f"/proc/{pid}/io").read_text())["read_bytes"]


def get_json(port: int, path: str, timeout: float = 5.0) -> dict[str, Any] | None:
    """The JSON body of a 200 answer, or None (refused, not 200, not JSON)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        return json.loads(body) if resp.status == 200 else None
    except (OSError, ValueError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def wait_serving(port: int, version: str, timeout: float) -> tuple[dict[str, Any], float]:
    """Poll ``/`` every 2 ms until the new version answers; return its answer and when
    (CLOCK_BOOTTIME, the clock of /proc's start times). The old process answers with its
    own version until it is stopped, the new one refuses until it listens."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = get_json(port, "/", timeout=1.0)
        if answer is not None and answer.get("version") == version:
            return answer, time.clock_gettime(time.CLOCK_BOOTTIME)
        time.sleep(0.002)
    raise TimeoutError(f"version {version} did not answer on port {port} in {timeout:g}s")


# -- the bench ------------------------------------------------------------------------------

class Bench:
    """One host running ``data`` against a ZooKeeper of its own (or at ``store_url``);
    :meth:`run` measures one switch."""

    def __init__(self, workdir: Path, data_bytes: int, startup_bytes: int,
                 evict_how: str, madvise: str = "normal", store_url: str | None = None,
                 throttle: Throttle | None = None) -> None:
        self.workdir = workdir
        self.throttle = throttle
        self.madvise = madvise
        self.data_bytes = data_bytes
        self.evict_how = evict_how
        self.src = workdir / "src"
        self.artifacts = workdir / "artifacts"
        make_data(self.src, data_bytes, startup_bytes)
        self.zk = None if store_url else ZooKeeperServer(workdir / "zk", free_port())
        self.store_url = store_url
        self.store: Any = None
        self.dc: Cluster | None = None
        self.version = 0

    def start(self) -> None:
        url = self.store_url
        if self.zk is not None:
            self.zk.start()
            self.zk.wait_serving()
            url = f"zk://127.0.0.1:{self.zk.client_port}/dc"
        assert url is not None
        self.store = open_store(url)
        self.store.start()
        self.dc = Cluster(self.workdir, self.store, url, 1, {SVC: {}}, racks=1,
                          poll_interval=1.0)
        host = self.dc.hosts["h0"]
        # Pin the whole release (the agent runs as root here: CAP_IPC_LOCK).
        host.agent_extra["mlock_cap"] = str(2 * self.data_bytes)
        host.start_timeout = 120.0  # a cold load of the index may take a while
        self.define(preload=False)
        self.stage()
        self.dc.start()
        if self.throttle is not None:  # supervisord and all below it, services to come too
            proc: Any = self.dc.procs["h0"]
            self.throttle.add([proc.pid, *descendants(proc.pid)])
        wait_for(lambda: self.dc.version("h0", SVC) == "1", 300, "the first version serving")

    def stop(self) -> None:
        if self.dc is not None:
            self.dc.stop_all()
        if self.store is not None:
            self.store.stop()
        if self.zk is not None:
            self.zk.kill()

    @property
    def port(self) -> int:
        assert self.dc is not None
        return self.dc.hosts["h0"].services[SVC]

    def define(self, preload: bool) -> None:
        assert self.dc is not None
        ops.service_set(self.store, SVC, program=SVC, quorum=0, max_parallel=1,
                        health=HealthCheck(kind="http", path="/health", port="port",
                                           timeout=2.0),
                        healthy_secs=0.0, preload=preload, signer=self.dc.signer)

    def stage(self) -> tuple[str, float]:
        """Pack and stage the next version; return it and when it was staged (monotonic)."""
        assert self.dc is not None
        self.version += 1
        version = str(self.version)
        shutil.rmtree(self.artifacts, ignore_errors=True)  # the last one is installed
        path, sha = pack(self.artifacts, version, self.src, self.madvise)
        staged_at = time.monotonic()
        ops.stage(self.store, SVC, version, sha256=sha, urls=[f"file://{path}"],
                  size=path.stat().st_size, signer=self.dc.signer)
        return version, staged_at

    def ready(self, version: str) -> bool:
        """Whether the host joined the ready queue for ``version`` (downloaded, verified,
        installed and, with preload, warmed: the agent queues only after all of it)."""
        base = layout.staged(SVC)
        for child in self.store.children(base):
            try:
                if json.loads(self.store.get(f"{base}/{child}")[0]).get("version") == version:
                    return True
            except (NoNode, ValueError):  # gone meanwhile, or not JSON: not this one
                continue
        return False

    def run(self, arm: str, requests: int, pages: int) -> dict[str, Any]:
        """One switch to a new version with ``preload`` on (arm "preload") or off."""
        assert self.dc is not None
        host = self.dc.hosts["h0"]
        self.define(preload=arm == "preload")
        version, staged_at = self.stage()
        # What preload costs: the host queues only once warm (download, unpack, read, pin).
        wait_for(lambda: self.ready(version), 300, f"h0 ready to roll {SVC} {version}",
                 interval=0.02)
        stage_to_ready = time.monotonic() - staged_at
        release = host.root / SVC / "releases" / version
        resident_before, total = residency(release)
        evict(release, self.evict_how)
        resident_at_switch, _ = residency(release)
        preload_status = self.dc.host_status("h0").get("services", {}).get(SVC, {}) \
            .get("preload")
        old_pid = host_rpc(host).supervisor.getProcessInfo(SVC)["pid"]
        load_before = loadavg()
        log.info("bench.switch", arm=arm, version=version, resident_before=resident_before,
                 resident_at_switch=resident_at_switch, total=total, bench="preload")
        deployed_at = time.clock_gettime(time.CLOCK_BOOTTIME)
        self.dc.deploy([SVC])
        answer, serving_at = wait_serving(self.port, version, 300)
        pid = int(answer["pid"])
        at_healthy, read_at_healthy = proc_stat(pid), io_read_bytes(pid)
        latencies = []
        for k in range(requests):
            started = time.perf_counter()
            if get_json(self.port, f"/read?seed={k}&pages={pages}") is None:
                raise RuntimeError(f"request {k} to version {version} failed")
            latencies.append(time.perf_counter() - started)
        after, read_after = proc_stat(pid), io_read_bytes(pid)
        stats = get_json(self.port, "/stats") or {}
        wait_for(lambda: self.dc.queue_empty(), 120, f"the deploy of {version} to finish")
        result = {
            "arm": arm, "version": version, "pid": pid, "old_pid": old_pid,
            "throttled": self.throttle is not None and self.throttle.holds(pid),
            "release_bytes": total, "resident_before_evict": resident_before,
            "resident_at_switch": round(resident_at_switch / total, 4) if total else None,
            "preload_status": preload_status if arm == "preload" else None,
            "majflt_at_healthy": at_healthy.majflt,
            "majflt_requests": after.majflt - at_healthy.majflt,
            "majflt_total": after.majflt,
            "majflt_load": stats.get("majflt_load"),
            "read_mib_at_healthy": round(read_at_healthy / MiB, 2),
            "read_mib_requests": round((read_after - read_at_healthy) / MiB, 2),
            "load_s": round(stats["load_s"], 4) if "load_s" in stats else None,
            "start_to_healthy_s": round(serving_at - at_healthy.starttime / CLK_TCK, 3),
            "deploy_to_healthy_s": round(serving_at - deployed_at, 3),
            "stage_to_ready_s": round(stage_to_ready, 3),
            **latency_summary(latencies),
            "loadavg": [load_before, loadavg()]}
        log.info("bench.run", bench="preload", **{k: v for k, v in result.items()
                                                  if k != "preload_status"})
        return result


def measure(workdir: Path, *, data_bytes: int, startup_bytes: int, requests: int,
            pages: int, repeats: int, evict_how: str, madvise: str = "normal",
            arms: Sequence[str] = ARMS, store_url: str | None = None,
            throttle: tuple[int, int] | None = None) -> dict[str, Any]:
    """Run every arm ``repeats`` times (alternating); return the result document.
    ``store_url``: a ZooKeeper root to use instead of starting a ZooKeeper; ``throttle``:
    (bytes/s, IO/s) for the host's reads from its disk."""
    runs: list[dict[str, Any]] = []
    device: dict[str, Any] = {}
    started_load = loadavg()
    limit = Throttle(disk_of(workdir), *throttle) if throttle else None
    bench = None
    try:
        if limit is not None:
            limit.create()
        bench = Bench(workdir, data_bytes, startup_bytes, evict_how, madvise, store_url,
                      limit)
        log.info("bench.start", bench="preload", data_bytes=data_bytes,
                 startup_bytes=startup_bytes, evict=evict_how, madvise=madvise,
                 throttle=limit.to_json() if limit else None)
        bench.start()
        device = device_probe(bench.src / "data")
        if limit is not None:  # the same probe from inside the group, then back out
            limit.add([os.getpid()])
            try:
                device["throttled"] = device_probe(bench.src / "data")
            finally:
                (Throttle.ROOT / "cgroup.procs").write_text(f"{os.getpid()}\n")
        log.info("bench.device", bench="preload", **device)
        for arm in arm_order(arms, repeats):
            runs.append(bench.run(arm, requests, pages))
    finally:
        if bench is not None:
            bench.stop()
        if limit is not None:
            limit.remove()
    per_arm = {arm: {**arm_summary([r for r in runs if r["arm"] == arm]),
                     "all": [r for r in runs if r["arm"] == arm]} for arm in arms}
    result: dict[str, Any] = {
        "data_bytes": data_bytes, "startup_bytes": startup_bytes, "requests": requests,
        "pages_per_request": pages, "repeats": repeats, "evict": evict_how,
        "madvise": madvise, "read_ahead_kb": read_ahead_kb(workdir),
        "throttle": limit.to_json() if limit else None,
        "device": device, "arms": per_arm, "loadavg": [started_load, loadavg()],
        "cpus": os.cpu_count()}
    if "cold" in per_arm and "preload" in per_arm:
        result["ratio_cold_over_preload"] = ratios(per_arm["cold"], per_arm["preload"])
    return result


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-mib", type=int, default=256)
    parser.add_argument("--startup-mib", type=int, default=64,
                        help="of the data, what the service reads whole at start")
    parser.add_argument("--requests", type=int, default=200,
                        help="the first requests measured after the switch")
    parser.add_argument("--pages", type=int, default=16, help="random pages per request")
    parser.add_argument("--repeats", type=int, default=3, help="runs per arm")
    parser.add_argument("--evict", choices=("all", "release", "none"), default="all")
    parser.add_argument("--madvise", choices=("normal", "random"), default="normal",
                        help="how the service maps the blobs: normal (the kernel reads "
                             "around each fault) or random (MADV_RANDOM: a page per fault)")
    parser.add_argument("--throttle", metavar="MBPS:IOPS",
                        help="limit the host's reads from its disk (cgroup-v1 blkio, root), "
                             "e.g. 125:3000 for a cloud volume's baseline")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.requests < 1 or args.pages < 1 or args.repeats < 1:
        parser.error("--requests, --pages and --repeats must be at least 1")
    try:
        data_files(args.data_mib * MiB, args.startup_mib * MiB)
    except ValueError as exc:
        parser.error(str(exc))
    throttle = None
    if args.throttle:
        try:
            throttle = parse_throttle(args.throttle)
        except ValueError as exc:
            parser.error(str(exc))
    if (args.evict == "all" or throttle) and os.geteuid() != 0:
        parser.error("--evict all (/proc/sys/vm/drop_caches) and --throttle (a blkio "
                     "cgroup) need root: run as root, or use --evict release without "
                     "--throttle")
    logs.configure("info")
    workdir = Path(tempfile.mkdtemp(prefix="dcdeploy-preload-"))
    try:
        result = measure(workdir, data_bytes=args.data_mib * MiB,
                         startup_bytes=args.startup_mib * MiB, requests=args.requests,
                         pages=args.pages, repeats=args.repeats, evict_how=args.evict,
                         madvise=args.madvise, throttle=throttle)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    else:
        for arm, summary in result["arms"].items():
            print(arm, {k: v for k, v in summary.items() if k != "all"})
        print("cold / preload", result.get("ratio_cold_over_preload"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
