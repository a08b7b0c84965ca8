"""transmission-daemon configuration and process handling.

The agent runs the daemon as a supervisord program (``daemon_command`` gives its command line;
see docs/distribution.md for the ``[program:transmission]`` section); tests, the benchmark and
``dcdeploy seed`` start it with :class:`DaemonProcess`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from ..files import atomic_write

log = structlog.get_logger("dcdeploy.p2p.daemon")

DAEMON = "transmission-daemon"

# Settings that make a LAN swarm of our own hosts fast and closed. Each is explained, with
# measurements, in docs/distribution.md ("Settings that matter").
LAN_SETTINGS: dict[str, Any] = {
    # Closed swarm: peers come only from our tracker (the torrents are private anyway).
    "dht-enabled": False,
    "pex-enabled": False,
    "lpd-enabled": False,
    "port-forwarding-enabled": False,
    "blocklist-enabled": False,
    # uTP backs off under load (LEDBAT) and costs CPU; on our own LAN TCP is what we want.
    "utp-enabled": False,
    # Encryption is obfuscation, not security, and costs CPU (RC4) on every byte: prefer clear.
    "encryption": 0,
    # Never queue: a release must start downloading (and seeding) at once.
    "download-queue-enabled": False,
    "seed-queue-enabled": False,
    "queue-stalled-enabled": False,
    "start-added-torrents": True,
    # Seed for as long as the agent wants: it removes torrents itself.
    "ratio-limit-enabled": False,
    "idle-seeding-limit-enabled": False,
    "speed-limit-down-enabled": False,
    "speed-limit-up-enabled": False,
    "alt-speed-enabled": False,
    "alt-speed-time-enabled": False,
    # Enough connections for every host of a large rack; few unchoke slots, as classic
    # BitTorrent: each upload is faster, so receivers complete pieces (and can re-share them)
    # sooner. Measured 4 vs 32 vs 2 in docs/distribution.md.
    "peer-limit-global": 500,
    "peer-limit-per-torrent": 200,
    "upload-slots-per-torrent": 4,
    # Write-back cache for received blocks (default 4 MiB).
    "cache-size-mb": 64,
    "prefetch-enabled": True,
    # Sparse allocation: no up-front write of the whole file (free space is checked before).
    "preallocation": 1,
    "rename-partial-files": False,
    "incomplete-dir-enabled": False,
    "watch-dir-enabled": False,
    "trash-original-torrent-files": False,
    "scrape-paused-torrents-enabled": False,
    "message-level": 1,
    "umask": 18,
    # RPC: loopback only, password required, loopback whitelist (docs/distribution.md,
    # "Security"). Whoever reaches the RPC can add a torrent writing anywhere the daemon
    # may write, so only the agent on the same host may.
    "rpc-enabled": True,
    "rpc-authentication-required": True,
    "rpc-username": "dcdeploy",
    "rpc-whitelist-enabled": True,
    "rpc-whitelist": "127.0.0.1,::1",
    # Host-header check against DNS rebinding from a browser on the host.
    "rpc-host-whitelist-enabled": True,
    "rpc-host-whitelist": "localhost",
    # The done-script runs a command as the daemon's user: never.
    "script-torrent-done-enabled": False,
    "script-torrent-done-filename": "",
    "peer-port-random-on-start": False,
    "peer-socket-tos": "default",
}


RPC_USER = LAN_SETTINGS["rpc-username"]
SECRET_FILE = "rpc-secret"  # in the daemon's config dir, 0600
# Keys a ``tuning`` override may not change: every ``rpc-*`` and ``script-*`` key (the RPC's
# protection, and the done-scripts that run commands).
LOCKED_PREFIXES = ("rpc-", "script-")


def check_loopback(what: str, address: str) -> str:
    """``address`` when it is a loopback IP; :class:`ValueError` naming it otherwise."""
    try:
        loopback = ipaddress.ip_address(address).is_loopback
    except ValueError:
        raise ValueError(f"{what} {address!r} is not an IP address (use 127.0.0.1)") from None
    if not loopback:
        raise ValueError(f"{what} {address!r} is not a loopback address: transmission's RPC "
                         "is reachable by the agent on the same host only (use 127.0.0.1)")
    return address


def settings(*, download_dir: Path, rpc_bind: str, rpc_port: int, peer_port: int,
             bind_address: str, rpc_password: str, **tuning: Any) -> dict[str, Any]:
    """The settings dictionary (pure). ``tuning`` uses Python names for settings keys
    (``cache_size_mb=128`` sets ``cache-size-mb``) and overrides :data:`LAN_SETTINGS`,
    except the RPC and script keys (:data:`LOCKED_PREFIXES`). Raises :class:`ValueError` when
    ``rpc_bind`` is not a loopback address, the password is empty, or ``tuning`` names a
    locked key."""
    check_loopback("rpc_bind", rpc_bind)
    if not rpc_password:
        raise ValueError("rpc_password is empty")
    out = dict(LAN_SETTINGS)
    out.update({"download-dir": str(download_dir), "incomplete-dir": str(download_dir),
                "rpc-bind-address": rpc_bind, "rpc-port": rpc_port, "peer-port": peer_port,
                "rpc-password": rpc_password,
                "bind-address-ipv4": bind_address, "bind-address-ipv6": "::1"})
    for key, value in tuning.items():
        name = key.replace("_", "-")
        if name.startswith(LOCKED_PREFIXES):
            raise ValueError(f"tuning key {key!r} is fixed by dcdeploy (RPC protection)")
        out[name] = value
    return out


def ensure_secret(config_dir: Path) -> str:
    """The RPC password in ``config_dir/rpc-secret``, made (random, mode 0600, O_EXCL) when
    the file does not exist yet. Raises :class:`OSError`, or :class:`ValueError` when the
    file exists but is empty or readable by others (fix its mode or delete it)."""
    path = Path(config_dir) / SECRET_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return read_secret(path)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_urlsafe(32) + "\n")
    log.info("daemon.secret_created", path=str(path))
    return read_secret(path)


def read_secret(path: Path) -> str:
    """The password in ``path`` (what the agent's RPC client sends). Raises
    :class:`OSError` (missing, unreadable) or :class:`ValueError` (empty, or group/other
    may read it)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd) as fh:
        if os.fstat(fh.fileno()).st_mode & 0o077:
            raise ValueError(f"{path}: the transmission RPC password file must be mode 0600 "
                             "(chmod 600 it)")
        secret = fh.read(4096).strip()
    if not secret:
        raise ValueError(f"{path}: the transmission RPC password file is empty")
    return secret


def write_settings(config_dir: Path, *, download_dir: Path, rpc_bind: str, rpc_port: int,
                   peer_port: int, bind_address: str, **tuning: Any) -> Path:
    """Write ``config_dir/settings.json`` (creating both directories, the config dir 0700,
    and the RPC password file on first use: :func:`ensure_secret`); return its path.

    Rewriting while the daemon runs has no effect until it restarts (the daemon also rewrites
    the file on exit, keeping our values, with the password salted and hashed)."""
    config_dir = Path(config_dir)
    config_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(config_dir, 0o700)  # settings.json holds the password until the daemon hashes it
    Path(download_dir).mkdir(parents=True, exist_ok=True)
    data = settings(download_dir=download_dir, rpc_bind=rpc_bind, rpc_port=rpc_port,
                    peer_port=peer_port, bind_address=bind_address,
                    rpc_password=ensure_secret(config_dir), **tuning)
    path = config_dir / "settings.json"
    atomic_write(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())  # 0600
    return path


def daemon_command(config_dir: Path, *, logfile: Path | None = None) -> list[str]:
    """Foreground daemon reading ``config_dir/settings.json`` (for supervisord or Popen)."""
    cmd = [DAEMON, "-f", "-g", str(config_dir)]
    if logfile is not None:
        cmd += ["-e", str(logfile)]
    return cmd


def rpc_url(address: str, port: int) -> str:
    return f"http://{address}:{port}/transmission/rpc"


@dataclass
class DaemonProcess:
    """A transmission-daemon child process (optionally inside a network namespace; its RPC
    is then on that namespace's loopback). Start it after :func:`write_settings`."""

    config_dir: Path
    rpc_address: str
    rpc_port: int
    netns: str | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return rpc_url(self.rpc_address, self.rpc_port)

    @property
    def secret_path(self) -> Path:
        return Path(self.config_dir) / SECRET_FILE

    def start(self, wait: float = 15.0) -> None:
        """Start the daemon and block until its RPC answers (``TimeoutError`` otherwise)."""
        cmd = daemon_command(self.config_dir, logfile=self.config_dir / "daemon.log")
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        out = open(self.config_dir / "daemon.stdout", "ab")
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()
        log.info("daemon.started", pid=self.proc.pid, config_dir=str(self.config_dir),
                 netns=self.netns)
        self.wait_rpc(wait)

    def wait_rpc(self, timeout: float) -> None:
        import requests

        auth = (RPC_USER, read_secret(self.secret_path))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"transmission-daemon exited with {self.proc.returncode}; "
                                   f"see {self.config_dir}/daemon.log")
            try:
                # 409 with a session id is the daemon's normal first answer (401: wrong
                # password, e.g. a settings.json from elsewhere: keep waiting, then fail).
                if requests.get(self.url, timeout=1.0, auth=auth).status_code in (200, 409):
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"transmission RPC at {self.url} not answering after {timeout}s")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 20.0) -> None:
        """Signal the daemon's process group and wait for it. Idempotent."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        log.info("daemon.stopped", pid=self.proc.pid, signal=sig)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)
