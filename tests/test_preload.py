"""Preloading (#12 item 5): the agent's pins (agent/fetching.py), the pure helpers of
``bench/preload.py``, and the bench itself at a small size: the preload arm's new process
takes fewer major faults than the cold one's (counts, never timings)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import structlog

from supervisor_dcdeploy.agent.config import AgentConfig
from supervisor_dcdeploy.agent.fetching import FetchManager
from supervisor_dcdeploy.localstate import ReleaseDir
from supervisor_dcdeploy.model import StagedRelease
from supervisor_dcdeploy.p2p import warm
from supervisor_dcdeploy.waiting import wait_for

_PATH = Path(__file__).resolve().parent.parent / "bench" / "preload.py"
_spec = importlib.util.spec_from_file_location("bench_preload", _PATH)
preload = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
sys.modules.setdefault("bench_preload", preload)
_spec.loader.exec_module(preload)  # type: ignore[union-attr]

MiB = 1 << 20


# -- the bench's pure helpers ------------------------------------------------------------

def test_proc_stat_counts_fields_after_the_last_parenthesis():
    # A command name with a space and a ')' of its own: naive splitting shifts every field.
    fields = ["S", "1", "2", "3", "0", "-1", "4194304", "111", "0", "7", "0", "5", "6", "0",
              "0", "20", "0", "1", "0", "98765", "1000"]
    line = "4242 (my ) app) " + " ".join(fields) + "\n"
    stat = preload.ProcStat.parse(line)
    assert (stat.minflt, stat.majflt, stat.starttime) == (111, 7, 98765)
    own = preload.ProcStat.parse(Path("/proc/self/stat").read_text())
    assert own.starttime > 0 and own.minflt > 0


@pytest.mark.parametrize("text", ["", "4242 app S 1 2", "4242 (app) S 1 2 3"])
def test_proc_stat_refuses_what_is_not_a_stat_line(text):
    with pytest.raises(ValueError, match="not a /proc/<pid>/stat line"):
        preload.ProcStat.parse(text)


def test_proc_io_reads_every_field():
    text = "rchar: 10\nwchar: 20\nsyscr: 3\nsyscw: 4\nread_bytes: 4096\nwrite_bytes: 0\n" \
           "cancelled_write_bytes: 0\n"
    assert preload.parse_proc_io(text)["read_bytes"] == 4096
    with pytest.raises(ValueError, match="not a /proc/<pid>/io line"):
        preload.parse_proc_io("read_bytes 4096")


@pytest.mark.parametrize("values, q, expected", [
    ([5.0], 50, 5.0), ([5.0], 99, 5.0),
    ([1.0, 2.0, 3.0, 4.0], 50, 2.0), ([4.0, 3.0, 2.0, 1.0], 50, 2.0),
    (list(range(1, 101)), 99, 99), (list(range(1, 101)), 100, 100),
    (list(range(1, 201)), 99, 198), ([1.0, 9.0], 99, 9.0),
])
def test_percentile_is_a_measured_value_by_nearest_rank(values, q, expected):
    assert preload.percentile(values, q) == expected


@pytest.mark.parametrize("values, q", [([], 50), ([1.0], 0), ([1.0], 101)])
def test_percentile_refuses_no_values_and_ranks_out_of_range(values, q):
    with pytest.raises(ValueError):
        preload.percentile(values, q)


def test_latency_summary_is_in_milliseconds():
    assert preload.latency_summary([0.002] + [0.001] * 98 + [0.5]) == \
        {"first_ms": 2.0, "p50_ms": 1.0, "p99_ms": 2.0, "max_ms": 500.0}  # 99th of 100


def test_arms_alternate_which_goes_first():
    assert preload.arm_order(("cold", "preload"), 3) == \
        ["cold", "preload", "preload", "cold", "cold", "preload"]
    order = preload.arm_order(("cold", "preload"), 4)
    assert order.count("cold") == order.count("preload") == 4
    assert [order[i] for i in range(0, 8, 2)].count("cold") == 2  # each first twice


def test_arm_summary_takes_medians_and_ratios_skip_a_zero():
    runs = [{"majflt_total": 10, "p50_ms": 2.0}, {"majflt_total": 30, "p50_ms": 4.0},
            {"majflt_total": 20, "p50_ms": 3.0, "load_s": None}]
    cold = preload.arm_summary(runs)
    assert cold == {"runs": 3, "majflt_total": 20, "p50_ms": 3.0}
    warm_arm = preload.arm_summary([{"majflt_total": 0, "p50_ms": 1.5}])
    assert preload.ratios(cold, warm_arm) == {"majflt_total": None, "p50_ms": 2.0}
    with pytest.raises(ValueError):
        preload.arm_summary([])


def test_data_files_split_the_rest_into_blobs():
    files = preload.data_files(100 * MiB, 10 * MiB)
    assert files[0] == ("index.bin", 10 * MiB)
    assert sum(size for _, size in files) == 100 * MiB
    assert all(0 < size <= preload.BLOB_BYTES for _, size in files[1:])
    assert [name for name, _ in files[1:]] == ["blob-00.bin", "blob-01.bin", "blob-02.bin"]
    for total, startup in ((10, 0), (10, 10), (10, 11)):
        with pytest.raises(ValueError, match="startup part"):
            preload.data_files(total, startup)


def test_bench_refuses_sizes_that_leave_no_blobs(capsys):
    with pytest.raises(SystemExit):
        preload.main(["--data-mib", "8", "--startup-mib", "8"])
    assert "startup part" in capsys.readouterr().err


# -- the agent's pins ----------------------------------------------------------------------

def _manager(tmp_path: Path, mlock_cap: int) -> FetchManager:
    cfg = AgentConfig(host="h0", rack="r0", store="zk://127.0.0.1:1/dc", root=tmp_path,
                      services={"A": {}}, extra={"mlock_cap": str(mlock_cap)})

    def install(svc, staged, rd, progress):  # the download: a release of one file
        target = rd.path(staged.version)
        target.mkdir(parents=True)
        (target / "data.bin").write_bytes(os.urandom(256 * 1024))

    return FetchManager(cfg, None, lambda: None, structlog.get_logger(), install)


def _fetch(manager: FetchManager, rd: ReleaseDir, version: str, preload_on: bool) -> None:
    staged = StagedRelease("A", version, f"{int(version):064x}", size=1, urls=("file:///x",))
    manager.start("A", staged, rd, preload=preload_on, transport="http")
    wait_for(lambda: not manager.busy("A"), 20, f"the fetch of {version}")
    assert manager.job("A").future.exception() is None


def test_preload_pins_without_a_swarm_and_unpins_the_superseded_release(tmp_path):
    """No swarm engine (dist None): mlock_cap from agent.conf still applies. Each new
    release of the service releases the pins of the one before, with or without preload."""
    manager = _manager(tmp_path, mlock_cap=1 * MiB)
    rd = ReleaseDir(tmp_path, "A")
    before = warm.locked_bytes()
    try:
        _fetch(manager, rd, "1", True)
        status = manager.preload("A")
        assert status is not None and status.mlock_error is None, status
        assert status.locked == status.bytes == 256 * 1024
        assert warm.locked_bytes() - before == 256 * 1024
        _fetch(manager, rd, "2", True)
        assert warm.locked_bytes() - before == 256 * 1024  # 1's pins are gone, 2's held
        assert warm.unlock(rd.path("1")) == 0 and warm.unlock(rd.path("2")) == 1
        _fetch(manager, rd, "3", True)
        _fetch(manager, rd, "4", False)  # preload turned off: 3 is superseded all the same
        assert warm.locked_bytes() == before
    finally:
        for v in ("1", "2", "3", "4"):
            warm.unlock(rd.path(v))
        manager.shutdown()


# -- the bench, small ----------------------------------------------------------------------

def test_preload_arm_takes_fewer_major_faults_than_the_cold_one(tmp_path, store_url):
    """The real agent and supervisord, 4 MiB of data (under the default 8 MiB
    RLIMIT_MEMLOCK of a user without CAP_IPC_LOCK), the release's pages evicted before each
    switch (POSIX_FADV_DONTNEED: this machine's other processes keep their cache). Only
    the pinned arm finds its data resident, and its process faults less."""
    result = preload.measure(tmp_path, data_bytes=4 * MiB, startup_bytes=1 * MiB,
                             requests=20, pages=16, repeats=1, evict_how="release",
                             madvise="random", store_url=store_url)
    cold, pinned = result["arms"]["cold"], result["arms"]["preload"]
    assert cold["resident_at_switch"] < 0.5, cold  # the eviction happened
    assert pinned["resident_at_switch"] == 1.0, pinned  # mlock kept every page
    assert pinned["all"][0]["preload_status"]["locked"] == pinned["all"][0]["release_bytes"]
    # MADV_RANDOM: each of the 320 touches of an evicted page is a fault of its own.
    assert cold["majflt_requests"] > 20, cold
    assert pinned["majflt_total"] < cold["majflt_total"], (pinned, cold)
    assert pinned["read_mib_requests"] < cold["read_mib_requests"], (pinned, cold)


@pytest.mark.parametrize("text, expected", [("125:3000", (125_000_000, 3000)),
                                            ("0.5:100", (500_000, 100))])
def test_throttle_is_megabytes_and_iops(text, expected):
    assert preload.parse_throttle(text) == expected


@pytest.mark.parametrize("text", ["125", "125:", ":3000", "0:3000", "125:0", "fast:3000",
                                  "125:-1"])
def test_throttle_refuses_what_is_not_two_positive_numbers(text):
    with pytest.raises(ValueError, match="MBPS:IOPS"):
        preload.parse_throttle(text)


def test_disk_of_names_a_block_device_with_its_own_rules(tmp_path):
    disk = preload.disk_of(tmp_path)
    major, minor = (int(x) for x in disk.split(":"))
    sysdir = Path(f"/sys/dev/block/{disk}")
    if not sysdir.exists():  # tmpfs, overlay: no block device to throttle
        assert major == 0
    else:
        assert not (sysdir / "partition").exists()  # a whole disk, never a partition
