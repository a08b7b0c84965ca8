"""A host's files and processes on one machine: its own supervisord, agent, directories.

Used by the demo, the integration tests, the namespace testbed and the benchmarks. The
supervisord drop-in is the one shipped in ``conf/dcdeploy.conf`` with this host's paths put
in, so what is tested is what an operator installs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import xmlrpc.client
from dataclasses import dataclass, field
from pathlib import Path

from supervisor.xmlrpc import SupervisorTransport

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# The placeholder for the venv's Python in the shipped drop-in (the README says to set it).
DROPIN_PYTHON = "/opt/dcdeploy/venv/bin/python"
INSTALLED_CONF_DIR = Path(sys.prefix) / "share" / "supervisor-dcdeploy" / "conf"  # data_files


def dropin_text(name: str = "dcdeploy.conf") -> str:
    """A shipped file of ``conf/`` (from the source tree, or where pip installed it)."""
    for path in (CONF_DIR / name, INSTALLED_CONF_DIR / name):
        if path.is_file():
            return path.read_text()
    raise FileNotFoundError(f"conf/{name} not found")


@dataclass
class HostLayout:
    name: str
    rack: str
    root: Path
    store_url: str
    services: dict[str, int]  # service -> port
    address: str = "127.0.0.1"
    python: str = sys.executable
    session_timeout: float = 4.0
    start_timeout: float = 20.0
    extra_programs: str = ""  # more supervisord sections (e.g. transmission-daemon)
    agent_extra: dict[str, str] = field(default_factory=dict)  # more [agent] keys
    # more agent.conf sections, e.g. {"check:ready": {"argv": "..."}}
    agent_sections: dict[str, dict[str, str]] = field(default_factory=dict)
    # The operator keys the host pins (a glob of .pub files). None: the host accepts
    # unsigned data (insecure_unsigned = true), for labs where signing is not the point.
    trusted_keys: str | None = None

    @property
    def conf(self) -> Path:
        return self.root / "supervisord.conf"

    @property
    def agent_conf(self) -> Path:
        return self.root / "agent.conf"

    @property
    def sock(self) -> Path:
        return self.root / "supervisor.sock"

    def endpoint(self, svc: str) -> str:
        return f"http://{self.address}:{self.services[svc]}/"


def write_host(layout: HostLayout) -> Path:
    """Write the host's supervisord.conf, agent.conf and directories; return supervisord.conf."""
    root = layout.root
    for sub in ("logs", "conf.d"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    agent_lines = ["[agent]", f"host = {layout.name}", f"rack = {layout.rack}",
                   f"store = {layout.store_url}", f"root = {root}",
                   f"session_timeout = {layout.session_timeout}",
                   f"start_timeout = {layout.start_timeout}", "keep_releases = 3"]
    if layout.trusted_keys:
        agent_lines.append(f"trusted_keys = {layout.trusted_keys}")
    elif "insecure_unsigned" not in layout.agent_extra:
        agent_lines += ["; a lab host without a pinned key: unsigned store data is acted on",
                        "insecure_unsigned = true"]
    agent_lines += [f"{k} = {v}" for k, v in layout.agent_extra.items()]
    for svc, port in layout.services.items():
        agent_lines += ["", f"[service:{svc}]", f"port = {port}", f"address = {layout.address}"]
    for section, keys in layout.agent_sections.items():
        agent_lines += ["", f"[{section}]", *(f"{k} = {v}" for k, v in keys.items())]
    layout.agent_conf.write_text("\n".join(agent_lines) + "\n")

    dropin = dropin_text()
    dropin = dropin.replace("/etc/dcdeploy/agent.conf", str(layout.agent_conf))
    dropin = dropin.replace("/var/log/supervisor/", f"{root}/logs/")
    dropin = dropin.replace(f"command = {DROPIN_PYTHON} ", f"command = {layout.python} ")
    (root / "conf.d" / "dcdeploy.conf").write_text(dropin)

    programs = []
    for svc, port in layout.services.items():
        programs.append(f"""[program:{svc}]
command = {layout.python} {root}/{svc}/current/app.py --port {port} --bind {layout.address}
autostart = false
autorestart = true
startsecs = 1
startretries = 1
stopwaitsecs = 5
stopasgroup = true
killasgroup = true
environment = DCDEPLOY_HOST="{layout.name}"
stdout_logfile = {root}/logs/{svc}.log
redirect_stderr = true
""")
    (root / "conf.d" / "services.conf").write_text("\n".join(programs) + layout.extra_programs)

    layout.conf.write_text(f"""[unix_http_server]
file = {layout.sock}

[supervisord]
logfile = {root}/logs/supervisord.log
pidfile = {root}/supervisord.pid
childlogdir = {root}/logs
nodaemon = true
identifier = {layout.name}
environment = PYTHONPATH="{Path(__file__).resolve().parents[2]}",DCDEPLOY_LOG_FORMAT="json"

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl = unix://{layout.sock}

[include]
files = {root}/conf.d/*.conf

{dropin_text("ctlplugin.conf")}""")
    return layout.conf


def start_host(layout: HostLayout, netns: str | None = None) -> subprocess.Popen:
    """Start the host's supervisord (which starts the agent); return its process."""
    cmd = [layout.python, "-m", "supervisor.supervisord", "-n", "-c", str(layout.conf)]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    out = open(layout.root / "logs" / "supervisord.stdout", "ab")
    try:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        out.close()


def host_rpc(layout: HostLayout, timeout: float = 10.0) -> xmlrpc.client.ServerProxy:
    """supervisord's XML-RPC proxy over the host's unix socket."""
    transport = SupervisorTransport(None, None, f"unix://{layout.sock}")
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)


def wait_rpc(layout: HostLayout, timeout: float = 20.0) -> None:
    """Block until the host's supervisord answers over its socket."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            host_rpc(layout).supervisor.getState()
            return
        except (OSError, xmlrpc.client.Fault):
            if time.monotonic() > deadline:
                raise TimeoutError(f"supervisord of {layout.name} not answering on "
                                   f"{layout.sock}") from None
            time.sleep(0.1)


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc), children first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop_host(layout: HostLayout, proc: subprocess.Popen | None,
              sig: int = signal.SIGKILL) -> None:
    """Stop a host. SIGKILL kills supervisord and every process below it at once (a host
    crash); SIGTERM lets supervisord stop its programs in order."""
    if proc is None or proc.poll() is not None:
        return
    if sig == signal.SIGKILL:
        for pid in [proc.pid, *descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=10)
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        stop_host(layout, proc, signal.SIGKILL)
