"""The agent's INI config (``/etc/dcdeploy/agent.conf``, see conf/agent.conf.example)."""

from __future__ import annotations

import configparser
import math
import os
import shlex
import socket
from dataclasses import dataclass, field
from pathlib import Path

from ..health import Local, LocalCheck
from .. import trust
from ..model import InvalidData, check_name
from ..store import parse_store_url


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class AgentConfig:
    host: str
    rack: str
    store: str
    root: Path
    services: dict[str, dict[str, str]]  # service -> host-local variables
    session_timeout: float = 10.0
    start_timeout: float = 60.0
    keep_releases: int = 3
    poll_interval: float = 5.0
    supervisor_url: str | None = None
    extra: dict[str, str] = field(default_factory=dict)  # keys for optional parts (p2p)
    checks: dict[str, LocalCheck] = field(default_factory=dict)  # [check:NAME] sections
    # Operator keys this host trusts (trust.py), by key id; loaded at start from local
    # files (trusted_keys), never from the store.
    trust_policy: trust.Policy = field(default_factory=lambda: trust.Policy({}, True))

    def variables(self, svc: str) -> dict[str, str]:
        return {"host": self.host, "rack": self.rack, **self.services.get(svc, {})}

    def health(self, svc: str) -> Local:
        """What a health check of ``svc`` may use on this host (see health.resolve)."""
        return Local(svc, self.variables(svc), self.checks)


# Numeric keys of the optional swarm part (agent/distribution.py), validated at load time so
# a typo is a clear error at start-up, not a crash in the middle of a deploy.
SWARM_NUMBERS = (("tracker_port", int, 1), ("seed_grace", float, 0), ("mlock_cap", int, 0),
                 ("kick_secs", float, 0), ("swarm_stall_secs", float, 0),
                 ("link_mbit", float, 0.001),
                 # not the swarm's: how often an idle agent checks the store still admits it
                 ("store_check_secs", float, 1))


def _number(where: str, raw: str, kind: type, minimum: float) -> float:
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{where}: {raw!r} is not a number") from None
    if value < minimum:
        raise ConfigError(f"{where}: must be >= {minimum}, got {value}")
    return value


def _check(path: Path, name: str, section: configparser.SectionProxy) -> LocalCheck:
    """``[check:NAME]``: ``argv`` (split like a shell would, but never run by one; the
    program an absolute path) and an optional ``timeout`` in seconds."""
    where = f"{path} [check:{name}]"
    unknown = sorted(set(section) - {"argv", "timeout"})
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (keys: argv, timeout)")
    try:
        argv = tuple(shlex.split(section.get("argv", ""), comments=False, posix=True))
    except ValueError as exc:
        raise ConfigError(f"{where} argv: {exc}") from None
    if not argv:
        raise ConfigError(f"{where}: 'argv' is required (e.g. argv = /usr/bin/curl -sf "
                          "http://127.0.0.1:{port}/health)")
    if not os.path.isabs(argv[0]):
        raise ConfigError(f"{where} argv: {argv[0]!r} is not an absolute path (the agent "
                          "runs checks without a shell or a PATH search)")
    timeout = None
    if section.get("timeout", "").strip():
        timeout = _number(f"{where} timeout", section["timeout"].strip(), float, 0.001)
        if not math.isfinite(timeout):
            raise ConfigError(f"{where} timeout: must be a finite number of seconds")
    return LocalCheck(name, argv, timeout)


def load(path: Path) -> AgentConfig:
    """Parse and validate; raises :class:`ConfigError` naming the file, section and key."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path) as fh:
            parser.read_file(fh)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except configparser.Error as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not parser.has_section("agent"):
        raise ConfigError(f"{path}: no [agent] section")
    agent = parser["agent"]
    known = {"host", "rack", "store", "root", "session_timeout", "start_timeout",
             "keep_releases", "poll_interval", "supervisor_url", "trusted_keys",
             "insecure_unsigned"}
    host = agent.get("host") or socket.gethostname().split(".")[0]
    store = os.environ.get("DCDEPLOY_STORE") or agent.get("store", "")
    try:
        check_name(f"{path} [agent]", "host", host)
        if parse_store_url(store)[0] == "consul":
            from ..store.consul import consul_auth
            consul_auth(store)  # token file and TLS files: refused here, not at first use
    except (InvalidData, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not agent.get("root"):
        raise ConfigError(f"{path} [agent]: 'root' is required (e.g. /var/lib/dcdeploy)")
    services = {}
    checks = {}
    for section in parser.sections():
        if section.startswith("check:"):
            name = section.split(":", 1)[1].strip()
            try:
                check_name(f"{path} [{section}]", "name", name)
            except InvalidData as exc:
                raise ConfigError(str(exc)) from None
            checks[name] = _check(path, name, parser[section])
        if section.startswith("service:"):
            name = section.split(":", 1)[1].strip()
            try:
                check_name(f"{path} [{section}]", "name", name)
            except InvalidData as exc:
                raise ConfigError(str(exc)) from None
            services[name] = dict(parser[section])
    if not services:
        raise ConfigError(f"{path}: no [service:NAME] section: this host runs no service")
    where = f"{path} [agent]"
    for key, kind, minimum in SWARM_NUMBERS:  # kept as text in ``extra``, checked here
        if agent.get(key, "").strip():
            _number(f"{where} {key}", agent[key].strip(), kind, minimum)
    try:
        from .access import events_prove_access
        events_prove_access(dict(agent))
    except ValueError as exc:
        raise ConfigError(f"{where} {exc}") from None
    if agent.get("metrics_listen", "").strip():
        from ..metrics import ListenError, parse_listen
        try:
            parse_listen(f"{where} metrics_listen", agent["metrics_listen"], 9700)
        except ListenError as exc:
            raise ConfigError(str(exc)) from None
    if agent.get("transmission_rpc", "").strip():
        from urllib.parse import urlsplit
        from ..p2p.daemon import check_loopback
        try:  # the RPC can write files anywhere: only the agent on this host may reach it
            check_loopback("transmission_rpc host",
                           urlsplit(agent["transmission_rpc"].strip()).hostname or "")
        except ValueError as exc:
            raise ConfigError(f"{where} {exc}") from None
    from ..fetch import Limits  # the unpack_* bounds on release archives
    try:
        Limits.from_config(dict(agent))
    except ValueError as exc:
        raise ConfigError(f"{where} {exc}") from None
    # file_root: the only directory file:// release URLs may read (none: file:// refused).
    if agent.get("file_root", "").strip() and not os.path.isabs(agent["file_root"].strip()):
        raise ConfigError(f"{where} file_root: must be an absolute path, got "
                          f"{agent['file_root']!r}")
    return AgentConfig(
        host=host, rack=agent.get("rack", ""), store=store, root=Path(agent["root"]),
        services=services,
        session_timeout=_number(f"{where} session_timeout",
                                agent.get("session_timeout", "10"), float, 0.5),
        start_timeout=_number(f"{where} start_timeout", agent.get("start_timeout", "60"),
                              float, 0.1),
        keep_releases=int(_number(f"{where} keep_releases", agent.get("keep_releases", "3"),
                                  int, 1)),
        poll_interval=_number(f"{where} poll_interval", agent.get("poll_interval", "5"),
                              float, 0.1),
        supervisor_url=agent.get("supervisor_url"),
        extra={k: v for k, v in agent.items() if k not in known},
        checks=checks,
        trust_policy=_trust(where, agent),  # last: other mistakes in the file are named first
    )


def _trust(where: str, agent: configparser.SectionProxy) -> trust.Policy:
    """``trusted_keys`` (a glob of PEM public keys) and ``insecure_unsigned``. A host with
    neither refuses to start: it would run whatever anyone who can write the store says."""
    try:
        insecure = agent.getboolean("insecure_unsigned", fallback=False)
    except ValueError:
        raise ConfigError(f"{where} insecure_unsigned: {agent['insecure_unsigned']!r} is not "
                          "true or false") from None
    pattern = agent.get("trusted_keys", "").strip()
    if not pattern:
        if not insecure:
            raise ConfigError(
                f"{where}: no trusted_keys: this host would run whatever anyone who can "
                "write the store says. Pin the operator keys (trusted_keys = "
                "/etc/dcdeploy/keys/*.pub, made with dcdeploy keygen), or set "
                "insecure_unsigned = true to accept unsigned data knowingly")
        return trust.Policy({}, True)
    try:
        keys = trust.load_trusted(pattern)
    except (trust.TrustError, OSError) as exc:
        raise ConfigError(f"{where} trusted_keys: {exc}") from None
    return trust.Policy(keys, insecure)
