"""The libtorrent engine's client: :class:`LtEngine` talks to this host's
``python -m supervisor_dcdeploy.p2p.ltdaemon`` over its unix socket (see ``ltdaemon.py`` for
what the daemon accepts). The fetch, verify, repair and prune logic is the engine
interface's (``engine.py``), the same as Transmission's.

Each request opens a fresh connection, so a daemon restarted by supervisord is simply
reconnected to; while the socket is missing or refuses, requests are retried with jitter
for up to ``retry_secs`` (60 s), then fail as :class:`DownloadError`.
"""

from __future__ import annotations

import base64
import json
import socket
from pathlib import Path
from typing import Any

import structlog
from tenacity import (Retrying, retry_if_exception_type, stop_after_delay,
                      wait_random_exponential)

from .engine import Engine, TorrentState
from .errors import DownloadError
from .ltdaemon import MAX_REQUEST, SOCKET_NAME
from .torrent import infohash

log = structlog.get_logger("dcdeploy.p2p.ltengine")

FLUSH_CALLS = 3

_UNREACHABLE = (FileNotFoundError, ConnectionRefusedError, ConnectionResetError,
                BrokenPipeError, EOFError)


def state_from_json(d: dict[str, Any]) -> TorrentState:
    return TorrentState(infohash=str(d["infohash"]).lower(), name=str(d.get("name", "")),
                        status=str(d.get("status", "")), done_bytes=int(d["done_bytes"]),
                        total_bytes=int(d["total_bytes"]), error=int(d.get("error", 0)),
                        error_string=str(d.get("error_string", "")),
                        download_dir=str(d.get("download_dir", "")),
                        peers=int(d.get("peers", 0)), rate_down=int(d.get("rate_down", 0)),
                        rate_up=int(d.get("rate_up", 0)), uploaded=int(d.get("uploaded", 0)),
                        corrupt=int(d.get("corrupt", 0)))


class LtEngine(Engine):
    """The libtorrent engine. ``control`` is the daemon's socket (``<state-dir>/control.sock``),
    ``download_dir`` where releases land (one of the daemon's ``--data-root`` directories)."""

    name = "libtorrent"

    def __init__(self, control: Path, download_dir: Path, *, rpc_retry_secs: float = 60.0,
                 poll: float = 0.5, timeout: float = 15.0) -> None:
        self.control = Path(control)
        if self.control.is_dir():
            self.control = self.control / SOCKET_NAME
        self.download_dir = Path(download_dir)
        self.rpc_retry_secs = rpc_retry_secs
        self.poll = poll
        self.timeout = timeout

    # -- the control channel ----------------------------------------------------------------
    def _exchange(self, req: dict[str, Any]) -> Any:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(self.timeout)
            s.connect(str(self.control))
            s.sendall(json.dumps(req).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    raise EOFError("the daemon closed the connection")
                buf += chunk
                if len(buf) > MAX_REQUEST:
                    raise DownloadError("ltdaemon answer too long")
        out = json.loads(buf)
        if not out.get("ok"):
            raise DownloadError(f"ltdaemon at {self.control} refused {req.get('op')}: "
                                f"{out.get('error')}")
        return out.get("result")

    def _call(self, op: str, *, retry_secs: float | None = None, **args: Any) -> Any:
        req = {"op": op, **args}
        try:
            for try_ in Retrying(retry=retry_if_exception_type(_UNREACHABLE),
                                 stop=stop_after_delay(self.rpc_retry_secs if retry_secs is None
                                                       else retry_secs),
                                 wait=wait_random_exponential(multiplier=0.2, max=2.0),
                                 reraise=True):
                with try_:
                    return self._exchange(req)
        except _UNREACHABLE as exc:
            raise DownloadError(f"ltdaemon at {self.control} unreachable: {exc} (is the "
                                "ltdaemon program running?)") from None
        except (OSError, ValueError) as exc:  # a timeout, a garbled answer
            raise DownloadError(f"ltdaemon at {self.control}: {exc}") from None
        raise AssertionError("unreachable")

    # -- primitives -----------------------------------------------------------------------
    def ping(self, retry_secs: float | None = None) -> dict[str, Any]:
        return self._call("ping", retry_secs=retry_secs)

    def state(self, infohash_: str) -> TorrentState | None:
        got = self._call("state", infohash=infohash_)
        return None if got is None else state_from_json(got)

    def states(self) -> list[TorrentState]:
        return [state_from_json(d) for d in self._call("states")]

    def add(self, metainfo: bytes, *, download_dir: Path | None = None,
            origin: bool = False) -> str:
        where = Path(download_dir or self.download_dir).resolve()
        ih = self._call("add", metainfo=base64.b64encode(metainfo).decode(),
                        save_path=str(where), origin=origin)
        log.info("swarm.added", engine=self.name, infohash=ih, download_dir=str(where),
                 origin=origin)
        return ih

    def detail(self, infohash_: str) -> dict[str, Any] | None:
        """Diagnostics for one torrent (pieces held, peers with flags and rates); None when
        the daemon does not have it. Read-only; see ``LtDaemon.detail``."""
        return self._call("detail", infohash=infohash_)

    def start(self, infohash_: str) -> None:
        self._call("start", infohash=infohash_)

    def verify(self, infohash_: str) -> None:
        self._call("verify", infohash=infohash_)

    def reannounce(self, infohash_: str) -> None:
        self._call("reannounce", infohash=infohash_, retry_secs=5.0)

    def settle(self, infohash_: str) -> None:
        """Have the daemon write libtorrent's cached blocks of ``infohash_`` to the files
        (ltdaemon ``flush``): libtorrent reports a piece had once its hash passed, which
        can be before the write. Not flushed in time: logged, and the sha256 check after
        (with its re-check and repair) decides, as it does with a daemon started before
        ``flush`` existed (it refuses the op until supervisord restarts it)."""
        flushed = False
        # The daemon waits at most 10 s per call (under this client's socket timeout); a
        # big release's queued writes on a slow disk may need more: ask up to 3 times.
        for _ in range(FLUSH_CALLS):
            try:
                flushed = bool(self._call("flush", infohash=infohash_))
            except DownloadError as exc:
                if "unknown op" not in str(exc):
                    raise
                break
            if flushed or self.state(infohash_) is None:
                break
        if not flushed:
            log.warning("swarm.not_flushed", engine=self.name, infohash=infohash_,
                        action="verify the sha256 anyway (re-check and repair on a mismatch)")

    def remove(self, infohash_: str, delete_data: bool) -> None:
        self._call("remove", infohash=infohash_, delete_data=delete_data)
        log.info("swarm.removed", engine=self.name, infohash=infohash_,
                 delete_data=delete_data)


__all__ = ["LtEngine", "infohash", "state_from_json"]


def daemon_command(state_dir: Path, data_roots: list[Path], address: str, port: int,
                   tuning: dict[str, Any] | None = None, python: str = "") -> list[str]:
    """The ltdaemon's command line (for supervisord or Popen). ``tuning``: libtorrent
    settings, plus ``"super_seed": true`` for ``--super-seed`` and ``"share_pieces": false``
    for ``--no-share-pieces`` (the shares are on by default)."""
    import sys
    tuning = dict(tuning or {})
    super_seed = bool(tuning.pop("super_seed", False))
    share_pieces = bool(tuning.pop("share_pieces", True))
    cmd = [python or sys.executable, "-m", "supervisor_dcdeploy.p2p.ltdaemon", "--state-dir",
           str(state_dir), "--address", address, "--port", str(port)]
    for root in data_roots:
        cmd += ["--data-root", str(root)]
    if tuning:
        cmd += ["--tuning", json.dumps(tuning)]
    if super_seed:
        cmd.append("--super-seed")
    if not share_pieces:
        cmd.append("--no-share-pieces")
    return cmd


class LtDaemonProcess:
    """An ltdaemon child process (what ``p2p.node`` runs for ``--engine libtorrent``; on an
    agent's host supervisord runs it instead). Same surface as :class:`.daemon.DaemonProcess`."""

    def __init__(self, state_dir: Path, data_roots: list[Path], address: str, port: int,
                 tuning: dict[str, Any] | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.data_roots = list(data_roots)
        self.address, self.port, self.tuning = address, port, tuning
        self.proc: Any = None

    @property
    def control(self) -> Path:
        return self.state_dir / SOCKET_NAME

    @property
    def url(self) -> str:
        return f"unix:{self.control}"

    def start(self, wait: float = 15.0) -> None:
        import subprocess
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.control.unlink(missing_ok=True)  # a stale socket would look like a live daemon
        out = open(self.state_dir / "daemon.log", "ab")
        self.proc = subprocess.Popen(
            daemon_command(self.state_dir, self.data_roots, self.address, self.port,
                           self.tuning),
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        out.close()
        log.info("ltdaemon.started", pid=self.proc.pid, state_dir=str(self.state_dir))
        client = LtEngine(self.control, self.state_dir, rpc_retry_secs=wait)
        try:
            if self.proc.poll() is None:
                client.ping()
        except DownloadError:
            pass
        if self.proc.poll() is not None:
            raise RuntimeError(f"ltdaemon exited with {self.proc.returncode}; see "
                               f"{self.state_dir}/daemon.log")
        if not self.control.exists():
            raise TimeoutError(f"ltdaemon at {self.control} not answering after {wait}s")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = 9, timeout: float = 20.0) -> None:
        import os
        import subprocess
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        self.kill(15)
