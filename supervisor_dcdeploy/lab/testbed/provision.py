"""Write a host's or a ZooKeeper server's configuration: the one step shared by the
namespace testbed and the Vagrant VMs (``provision/host.sh`` and ``provision/zk.sh`` call
this module, so CI exercises exactly what a VM would run).

``python -m supervisor_dcdeploy.lab.testbed.provision host --name h1 --rack r1 --address ADDR
--root DIR --store zk://.../dc --service a=8001 [--service b=8002] [--transmission
[--engine libtorrent|transmission]]`` (``--transmission`` runs a swarm engine, libtorrent
unless ``--engine transmission``; the flag's name is historical)
``python -m supervisor_dcdeploy.lab.testbed.provision zk --id 1 --address ADDR --data-dir DIR
--peer 1=ADDR --peer 2=ADDR --peer 3=ADDR``
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from ..hostenv import HostLayout, write_host
from ..zkserver import ZooKeeperServer
from ...p2p.engine import ENGINES

SCRIPTS = Path(__file__).resolve().parent / "provision"
TRANSMISSION_RPC_PORT = 9091
TRANSMISSION_PEER_PORT = 51413


def transmission_program(root: Path, address: str) -> str:
    """The supervisord section running this host's transmission-daemon, with its settings
    written under ``root/transmission`` (peers on the host's own address; the RPC on
    loopback with the password in ``root/transmission/rpc-secret``, the agent's default)."""
    from ...p2p import daemon
    config_dir = root / "transmission"
    daemon.write_settings(config_dir, download_dir=root / "downloads", rpc_bind="127.0.0.1",
                          rpc_port=TRANSMISSION_RPC_PORT, peer_port=TRANSMISSION_PEER_PORT,
                          bind_address=address)
    cmd = " ".join(daemon.daemon_command(config_dir))
    return f"""
[program:transmission]
command = {cmd}
autostart = true
autorestart = true
startsecs = 1
stopasgroup = true
killasgroup = true
stdout_logfile = {root}/logs/transmission.log
redirect_stderr = true
"""


def ltdaemon_program(root: Path, address: str, python: str) -> str:
    """The supervisord section running this host's libtorrent daemon (``conf/ltdaemon.conf.example``):
    state and control socket under ``root/ltdaemon``, releases only in ``root/downloads``
    (the agent's default ``swarm_dir``), peers on the host's own address."""
    from ...p2p.ltengine import daemon_command
    cmd = " ".join(daemon_command(root / "ltdaemon", [root / "downloads"], address,
                                  TRANSMISSION_PEER_PORT, python=python))
    return f"""
[program:ltdaemon]
command = {cmd}
autostart = true
autorestart = true
startsecs = 1
stopasgroup = true
killasgroup = true
stdout_logfile = {root}/logs/ltdaemon.log
redirect_stderr = true
"""


def host_layout(args: argparse.Namespace) -> HostLayout:
    services = {}
    for item in args.service:
        name, _, port = item.partition("=")
        services[name] = int(port)
    extra = {"poll_interval": str(args.poll_interval)}
    if getattr(args, "file_root", None):
        extra["file_root"] = args.file_root  # file:// release URLs are read only there
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "logs").mkdir(exist_ok=True)
    programs = ""
    if args.transmission and getattr(args, "engine", "libtorrent") == "libtorrent":
        programs = ltdaemon_program(root, args.address, args.python)
        extra["swarm_engine"] = "libtorrent"
        extra["ltdaemon_socket"] = str(root / "ltdaemon" / "control.sock")
        extra["address"] = args.address
    elif args.transmission and shutil.which("transmission-daemon"):
        programs = transmission_program(root, args.address)
        extra["transmission_rpc"] = f"http://127.0.0.1:{TRANSMISSION_RPC_PORT}/transmission/rpc"
        extra["address"] = args.address  # what peers dial
    return HostLayout(name=args.name, rack=args.rack, root=root, store_url=args.store,
                      services=services, address=args.address, python=args.python,
                      session_timeout=args.session_timeout, start_timeout=args.start_timeout,
                      extra_programs=programs, agent_extra=extra)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="provision")
    sub = parser.add_subparsers(dest="what", required=True)
    host = sub.add_parser("host")
    host.add_argument("--name", required=True)
    host.add_argument("--rack", required=True)
    host.add_argument("--address", required=True)
    host.add_argument("--root", required=True)
    host.add_argument("--store", required=True)
    host.add_argument("--service", action="append", required=True, help="NAME=PORT")
    host.add_argument("--python", default=sys.executable)
    host.add_argument("--session-timeout", type=float, default=4.0)
    host.add_argument("--start-timeout", type=float, default=15.0)
    host.add_argument("--poll-interval", type=float, default=1.0)
    host.add_argument("--file-root", default="",
                      help="the directory file:// release URLs may read (default: none)")
    host.add_argument("--transmission", action="store_true",
                      help="run a BitTorrent engine (the agent's swarm)")
    host.add_argument("--engine", choices=ENGINES,
                      default="libtorrent", help="which engine --transmission runs")
    zk = sub.add_parser("zk")
    zk.add_argument("--id", type=int, required=True)
    zk.add_argument("--address", required=True)
    zk.add_argument("--data-dir", required=True)
    zk.add_argument("--client-port", type=int, default=2181)
    zk.add_argument("--tick-ms", type=int, default=200)
    zk.add_argument("--peer", action="append", default=[], help="ID=ADDRESS")
    args = parser.parse_args(argv)
    if args.what == "host":
        print(write_host(host_layout(args)))
        return 0
    peers = {}
    for item in args.peer:
        sid, _, addr = item.partition("=")
        peers[int(sid)] = (addr, 2888, 3888)
    server = ZooKeeperServer(Path(args.data_dir), args.client_port, host=args.address,
                             server_id=args.id, peers=peers, tick_ms=args.tick_ms)
    print(server.write_config())
    return 0


if __name__ == "__main__":
    sys.exit(main())
