"""Start and stop real ZooKeeper servers (standalone or an ensemble member) for the demo,
the tests and the testbed. Uses Debian's ``zookeeper`` package and the machine's Java."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

CLASSPATH = "/usr/share/zookeeper/*:/usr/share/java/*"
MAIN = "org.apache.zookeeper.server.quorum.QuorumPeerMain"


class ZooKeeperNotInstalled(RuntimeError):
    pass


def four_letter(host: str, port: int, cmd: str, timeout: float = 1.0) -> str:
    """Send a ZooKeeper four-letter command (``ruok``, ``srvr``); '' when it cannot answer."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(cmd.encode())
            chunks = []
            while True:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks).decode(errors="replace")
    except OSError:
        return ""


def server_mode(host: str, port: int) -> str | None:
    """'leader', 'follower', 'standalone', or None when the server is not serving."""
    for line in four_letter(host, port, "srvr").splitlines():
        if line.startswith("Mode:"):
            return line.split(":", 1)[1].strip()
    return None


def mntr(host: str, port: int, timeout: float = 2.0) -> dict[str, str]:
    """The server's ``mntr`` report as a dict (``zk_server_state`` -> ``leader``...); empty
    when it cannot answer or ``mntr`` is not in its ``4lw.commands.whitelist``."""
    out = {}
    for line in four_letter(host, port, "mntr", timeout).splitlines():
        key, sep, value = line.partition("\t")
        if sep:
            out[key.strip()] = value.strip()
    return out


@dataclass(frozen=True)
class RequestCount:
    """Requests ZooKeeper itself counted under one top-level path (its per-namespace
    counters: ``zk_cnt_<ns>_read_per_namespace`` / ``..._write_per_namespace``), which
    leave out session pings, and the watch notifications the servers sent (all paths: the
    ``zk_sum_node_*_watch_count`` counters). Subtract two of these to count what happened
    in between. ZooKeeper 3.8 counts ``exists`` as a read, not ``sync``, and each operation
    of a multi as a write of its own."""

    reads: int
    writes: int
    notifications: int = 0

    @property
    def total(self) -> int:
        return self.reads + self.writes

    def __sub__(self, other: RequestCount) -> RequestCount:
        return RequestCount(self.reads - other.reads, self.writes - other.writes,
                            self.notifications - other.notifications)


def namespace_requests(servers: list[tuple[str, int]], namespace: str) -> RequestCount:
    """Reads and writes under ``/<namespace>`` as counted by the servers.

    A read is counted by the one server that answered it, so reads are summed over the
    servers; a write is applied (and counted) by every member of an ensemble, so writes are
    the largest count of any one server. Notifications are summed (each server notifies its
    own clients). Raises RuntimeError naming a server that does not
    answer ``mntr`` (down, or ``mntr`` not whitelisted in its zoo.cfg)."""
    reads = writes = notifications = 0
    for host, port in servers:
        report = mntr(host, port)
        if not report:
            raise RuntimeError(f"zookeeper {host}:{port} does not answer mntr (is it up, with "
                               "4lw.commands.whitelist=mntr in its zoo.cfg?)")
        reads += int(report.get(f"zk_cnt_{namespace}_read_per_namespace", 0))
        writes = max(writes, int(report.get(f"zk_cnt_{namespace}_write_per_namespace", 0)))
        notifications += sum(int(report.get(f"zk_sum_node_{kind}_watch_count", 0))
                             for kind in ("created", "deleted", "children", "changed"))
    return RequestCount(reads, writes, notifications)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (``/proc/<pid>/stat``)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class TestPKI:
    """PEM files of a throwaway CA, a server certificate (for 127.0.0.1 and localhost)
    and a client certificate; made by :func:`make_test_pki`. Tests and labs only."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_test_pki(directory: Path, names: tuple[str, ...] = ("127.0.0.1", "localhost"),
                  days: int = 2) -> TestPKI:
    """Make a CA and two certificates it signs, with the ``openssl`` command; keys 0600."""
    directory.mkdir(parents=True, exist_ok=True)
    san = ",".join(f"IP:{n}" if n.replace(".", "").isdigit() else f"DNS:{n}" for n in names)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    def key(name: str) -> Path:
        path = directory / name
        run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-out", str(path))
        path.chmod(0o600)
        return path

    ca_key = key("ca.key")
    ca = directory / "ca.pem"
    run("req", "-x509", "-new", "-key", str(ca_key), "-subj", "/CN=dcdeploy test CA",
        "-days", str(days), "-out", str(ca))
    out = {}
    for who, ext in (("server", f"subjectAltName={san}\nextendedKeyUsage=serverAuth"),
                     ("client", "extendedKeyUsage=clientAuth")):
        k = key(f"{who}.key")
        csr = directory / f"{who}.csr"
        run("req", "-new", "-key", str(k), "-subj", f"/CN=dcdeploy test {who}", "-out", str(csr))
        (directory / f"{who}.ext").write_text(ext + "\n")
        cert = directory / f"{who}.pem"
        run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
            "-CAcreateserial", "-days", str(days), "-extfile", str(directory / f"{who}.ext"),
            "-out", str(cert))
        out[who] = (cert, k)
    return TestPKI(ca, out["server"][0], out["server"][1], out["client"][0], out["client"][1])


@dataclass
class ZooKeeperServer:
    """One ZooKeeper server process. ``peers`` (id -> (host, quorum_port, election_port))
    makes it an ensemble member; without it the server runs standalone."""

    data_dir: Path
    client_port: int
    host: str = "127.0.0.1"
    server_id: int = 1
    peers: dict[int, tuple[str, int, int]] = field(default_factory=dict)
    tick_ms: int = 250
    netns: str | None = None  # run inside this network namespace (testbed)
    heap_mb: int = 192
    # TLS: a second, TLS-only client port served by Netty, with the server's certificate
    # and key and the CA that client certificates must chain to; client_auth is
    # ZooKeeper's ssl.clientAuth ("none", "want" or "need"). The plain client_port stays
    # (on self.host) for the four-letter readiness probe.
    secure_port: int | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    client_auth: str = "none"
    # More zoo.cfg lines (key -> value), e.g. maxClientCnxns=0 for a bench with hundreds of
    # sessions from one address (ZooKeeper refuses the 61st by default).
    extra_config: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    def write_config(self) -> Path:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        lines = [f"tickTime={self.tick_ms}", f"dataDir={self.data_dir}",
                 f"clientPort={self.client_port}", f"clientPortAddress={self.host}",
                 "initLimit=20", "syncLimit=10", "admin.enableServer=false",
                 "4lw.commands.whitelist=ruok,srvr,stat,mntr",
                 f"minSessionTimeout={2 * self.tick_ms}", f"maxSessionTimeout={120 * self.tick_ms}",
                 "preAllocSize=4096", "snapCount=10000"]
        if self.secure_port is not None:
            if not (self.tls_cert and self.tls_key and self.tls_ca):
                raise ValueError("secure_port needs tls_cert, tls_key and tls_ca")
            keystore = self.data_dir / "server-keystore.pem"  # ZooKeeper's PEM keystore:
            keystore.touch(mode=0o600)  # the key and its certificate in one file
            keystore.write_text(self.tls_key.read_text() + self.tls_cert.read_text())
            lines += [f"secureClientPort={self.secure_port}",
                      f"secureClientPortAddress={self.host}",
                      "serverCnxnFactory=org.apache.zookeeper.server.NettyServerCnxnFactory",
                      f"ssl.keyStore.location={keystore}", "ssl.keyStore.type=PEM",
                      f"ssl.trustStore.location={self.tls_ca}", "ssl.trustStore.type=PEM",
                      f"ssl.clientAuth={self.client_auth}",
                      "authProvider.x509="
                      "org.apache.zookeeper.server.auth.X509AuthenticationProvider"]
        lines += [f"{key}={value}" for key, value in self.extra_config.items()]
        if self.peers:
            (self.data_dir / "myid").write_text(f"{self.server_id}\n")
            for sid, (h, qport, eport) in sorted(self.peers.items()):
                lines.append(f"server.{sid}={h}:{qport}:{eport}")
        cfg = self.data_dir / "zoo.cfg"
        cfg.write_text("\n".join(lines) + "\n")
        (self.data_dir / "log4j.properties").write_text(
            "log4j.rootLogger=WARN, F\nlog4j.appender.F=org.apache.log4j.FileAppender\n"
            f"log4j.appender.F.File={self.data_dir}/zookeeper.log\n"
            "log4j.appender.F.layout=org.apache.log4j.PatternLayout\n"
            "log4j.appender.F.layout.ConversionPattern=%d %p %c: %m%n\n")
        return cfg

    def start(self) -> None:
        if not Path("/usr/share/zookeeper").is_dir():
            raise ZooKeeperNotInstalled(
                "ZooKeeper is not installed: apt-get install -y zookeeper (see README)")
        cfg = self.write_config()
        cmd = ["java", f"-Xmx{self.heap_mb}m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
               "-Dzookeeper.jmx.log4j.disable=true",
               f"-Dlog4j.configuration=file:{self.data_dir}/log4j.properties",
               "-Dlogback.configurationFile=/nonexistent",
               "-cp", CLASSPATH, MAIN, str(cfg)]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        log = open(self.data_dir / "stdout.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def wait_serving(self, timeout: float = 60.0) -> None:
        """Block until the server answers ``ruok`` and is in a quorum (or standalone)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"zookeeper {self.server_id} exited with {self.proc.returncode};"
                                   f" see {self.data_dir}/stdout.log")
            if server_mode(self.host, self.client_port) is not None:
                return
            time.sleep(0.1)
        raise TimeoutError(f"zookeeper {self.host}:{self.client_port} not serving after {timeout}s")

    def cpu_seconds(self) -> float:
        """CPU seconds the server's JVM has used (the process started directly, not through
        ``ip netns exec``, whose pid is that of the JVM after its exec)."""
        if self.proc is None:
            raise RuntimeError("zookeeper not started")
        return cpu_seconds(self.proc.pid)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        self.kill(signal.SIGTERM) if self.running else None


PORT_FLOOR = 10000
_handed_out: set[int] = set()
_ports_lock = threading.Lock()


def ephemeral_range(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int]:
    """The kernel's range for automatically assigned (outgoing) source ports."""
    try:
        low, high = (int(x) for x in Path(path).read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now, for a server the caller starts next.

    Chosen *below* the kernel's ephemeral range: a port from ``bind(0)`` is one an outgoing
    connection may take as its source port before the caller's server binds it ("Address
    already in use": seen with the many connections of the consul-fake tests). Never the
    same port twice in one process."""
    low, _ = ephemeral_range()
    rng = random.Random()
    with _ports_lock:
        for _ in range(500) if low - 1 > PORT_FLOOR else ():
            port = rng.randint(PORT_FLOOR, low - 1)
            if port in _handed_out:
                continue
            with socket.socket() as sock:
                try:
                    sock.bind((host, port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
        with socket.socket() as sock:  # no room below the range: the kernel's choice
            sock.bind((host, 0))
            return sock.getsockname()[1]
