"""A small data center of local hosts on one machine: real supervisord processes with the
real agent, against a real ZooKeeper, and an independent prober that records what every
host's service endpoint answers. Used by the demo, the integration tests and bench/."""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import ops, trust
from .hostenv import (HostLayout, start_host, stop_host, wait_rpc,
                                         write_host)
from ..model import HealthCheck
from .sample import build_release
from ..store import Store, layout
from ..waiting import wait_for
from .zkserver import free_port

__all__ = ["Cluster", "Prober", "Sample", "get_version", "wait_for"]


def get_version(address: str, port: int, timeout: float = 0.25) -> str | None:
    """The version a service endpoint serves, or None when it does not answer 200."""
    conn = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            return None
        return json.loads(body)["version"]
    except (OSError, ValueError, KeyError, http.client.HTTPException):
        return None
    finally:
        conn.close()


@dataclass
class Sample:
    t: float
    versions: dict[tuple[str, str], str | None]  # (host, svc) -> version or None


@dataclass
class Prober:
    """Samples every endpoint in rounds, at ``hz`` rounds per second or more."""

    endpoints: dict[tuple[str, str], tuple[str, int]]
    hz: float = 40.0
    timeout: float = 0.2  # per answer; longer on a loaded machine (a down port refuses at once)
    samples: list[Sample] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        period = 1.0 / self.hz
        keys = list(self.endpoints)
        # Endpoints are asked in parallel so one slow answer does not slow the round.
        with ThreadPoolExecutor(max_workers=max(1, len(keys))) as pool:
            while not self._stop.is_set():
                started = time.monotonic()
                answers = pool.map(lambda k: get_version(*self.endpoints[k], timeout=self.timeout),
                                   keys)
                self.samples.append(Sample(time.time(), dict(zip(keys, answers))))
                self._stop.wait(max(0.0, period - (time.monotonic() - started)))

    def start(self) -> "Prober":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def rate(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        return (len(self.samples) - 1) / (self.samples[-1].t - self.samples[0].t)

    def max_gap(self) -> float:
        return max((b.t - a.t for a, b in zip(self.samples, self.samples[1:])), default=0.0)

    def serving(self, sample: Sample, svc: str) -> int:
        return sum(1 for (h, s), v in sample.versions.items() if s == svc and v is not None)

    def first_seen(self, svc: str, version: str, hosts: set[str] | None = None) -> float | None:
        for sample in self.samples:
            for (h, s), v in sample.versions.items():
                if s == svc and v == version and (hosts is None or h in hosts):
                    return sample.t
        return None

    def seen(self, host: str, svc: str) -> list[tuple[float, str | None]]:
        return [(s.t, s.versions[(host, svc)]) for s in self.samples]


class Cluster:
    """``n`` hosts running ``services`` (name -> spec kwargs), all on 127.0.0.1.

    The data center has an operator key: the one named by ``$DCDEPLOY_SIGN_KEY`` when it
    is set (the test suite sets one), else a new one in ``<workdir>/keys``. Every host pins
    it, and what the cluster writes as the operator is signed with it (``signer``).
    ``insecure_unsigned=True`` makes hosts that pin nothing and accept unsigned data."""

    def __init__(self, workdir: Path, store: Store, store_url: str, n: int,
                 services: dict[str, dict], racks: int = 2, poll_interval: float = 1.0,
                 host_store_url: Callable[[str], str] | None = None,
                 insecure_unsigned: bool = False) -> None:
        """``host_store_url(host)``: each host's own store URL (its own credentials);
        default: ``store_url`` for every host."""
        self.workdir = workdir
        self.store = store
        self.store_url = store_url
        self.services = services
        self.hosts: dict[str, HostLayout] = {}
        self.procs: dict[str, object] = {}
        self.artifacts = workdir / "artifacts"
        self.signer: trust.Signer | None = None
        pinned = None
        if not insecure_unsigned:
            self.signer = trust.default_signer()
            keys = workdir / "keys"
            if self.signer is None:
                private, _, _ = trust.generate(keys)
                self.signer = trust.load_signer(private)
            else:  # pin the environment's key: its public half, beside the hosts
                keys.mkdir(parents=True, exist_ok=True)
                (keys / "operator.pub").write_bytes(self.signer.public.public_bytes(
                    trust.serialization.Encoding.PEM,
                    trust.serialization.PublicFormat.SubjectPublicKeyInfo))
            pinned = str(keys / "*.pub")
        for i in range(n):
            name = f"h{i}"
            self.hosts[name] = HostLayout(
                name=name, rack=f"r{i % racks}", root=workdir / name,
                store_url=host_store_url(name) if host_store_url else store_url,
                services={svc: free_port() for svc in services}, session_timeout=4.0,
                start_timeout=15.0, agent_extra={"poll_interval": str(poll_interval),
                                                 # artifacts are file:// URLs in workdir
                                                 "file_root": str(workdir)},
                trusted_keys=pinned)

    # -- operator side --------------------------------------------------------------
    def define(self) -> None:
        for svc, spec in self.services.items():
            spec = {"health": HealthCheck(kind="http", path="/health", port="port",
                                          timeout=1.0), **spec}
            ops.service_set(self.store, svc, program=svc, signer=self.signer, **spec)

    def release(self, svc: str, version: str, broken: bool = False) -> tuple[str, str]:
        path, sha = build_release(self.artifacts, svc, version, broken=broken)
        return f"file://{path}", sha

    def stage(self, svc: str, version: str, broken: bool = False, sha: str | None = None):
        url, real_sha = self.release(svc, version, broken)
        size = Path(url.removeprefix("file://")).stat().st_size
        return ops.stage(self.store, svc, version, sha256=sha or real_sha, urls=[url],
                         size=size, signer=self.signer)

    def deploy(self, names: list[str]):
        return ops.deploy(self.store, names, signer=self.signer)

    # -- hosts ----------------------------------------------------------------------
    def start(self, name: str | None = None) -> None:
        for host in ([name] if name else list(self.hosts)):
            layout = self.hosts[host]
            write_host(layout)
            self.procs[host] = start_host(layout)
        for host in ([name] if name else list(self.hosts)):
            wait_rpc(self.hosts[host])

    def kill(self, name: str) -> None:
        """``kill -9`` of the host: supervisord, the agent and the services at once."""
        stop_host(self.hosts[name], self.procs.pop(name), signal.SIGKILL)

    def stop_all(self) -> None:
        for name in list(self.procs):
            stop_host(self.hosts[name], self.procs.pop(name), signal.SIGKILL)

    def endpoints(self) -> dict[tuple[str, str], tuple[str, int]]:
        return {(h, svc): (layout.address, port) for h, layout in self.hosts.items()
                for svc, port in layout.services.items()}

    def prober(self, hz: float = 40.0) -> Prober:
        return Prober(self.endpoints(), hz)

    def version(self, host: str, svc: str) -> str | None:
        layout = self.hosts[host]
        return get_version(layout.address, layout.services[svc])

    def all_on(self, svc: str, version: str, hosts: list[str] | None = None) -> bool:
        return all(self.version(h, svc) == version for h in (hosts or self.hosts))

    def host_status(self, name: str) -> dict:
        try:
            return json.loads((self.hosts[name].root / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def status(self) -> dict:
        return ops.status(self.store)

    def queue_empty(self) -> bool:
        return not self.store.children(layout.DEPLOY)

    def history(self) -> list[dict]:
        return ops.history(self.store, 100)

    def boot(self, versions: dict[str, str], timeout: float = 60.0) -> None:
        """Define the services, stage ``versions`` and start every host on them."""
        self.define()
        for svc, version in versions.items():
            self.stage(svc, version)
        self.start()
        for svc, version in versions.items():
            wait_for(lambda s=svc, v=version: self.all_on(s, v), timeout,
                     f"every host on {svc} {version}")
            wait_for(lambda s=svc: len(self.store.children(layout.presence_dir(s))) == len(self.hosts),
                     timeout, f"every host registered for {svc}")
